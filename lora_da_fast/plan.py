"""The memory plan: when the statistics of every target do not fit at once, the model is streamed
through several passes of ``layers_per_pass`` layers (a slice each); each slice's statistics are solved
and freed before the next pass."""
from __future__ import annotations

import math
import re
from typing import Dict, List, Tuple

import torch
from torch import nn

from . import comm
from .config import LoraDAConfig
from .targets import linear_shape

# Fraction of the free device memory that the planner gives to statistics; the rest is for the
# activations of the pass and the solver's workspace.
STATS_MEMORY_FRACTION = 0.5


def layer_of(name: str) -> str:
    """The layer a module belongs to: its name up to the first numeric component
    (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``); modules outside numbered layers map to ''."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else ""


def statistics_bytes(targets: Dict[str, nn.Module]) -> Dict[str, int]:
    """fp32 bytes of each module's statistics: ``G`` and ``y``, plus ``Z`` counted once per distinct
    input (modules of one layer with the same ``d_in`` may share it; counted pessimistically once per
    distinct ``(layer, d_in)`` so the estimate does not need a forward pass)."""
    out, seen = {}, set()
    for name, m in targets.items():
        d_out, d_in = linear_shape(m)
        b = 4 * (d_out * d_in + d_out)
        key = (layer_of(name), d_in, m.weight.device)
        if key not in seen:
            seen.add(key)
            b += 4 * d_in * d_in
        out[name] = b
    return out


def plan_slices(targets: Dict[str, nn.Module], cfg: LoraDAConfig) -> Tuple[List[List[str]], dict]:
    """Split the targets into slices of whole layers. Returns the slices and a description of the plan."""
    layers: Dict[str, List[str]] = {}
    for name in targets:
        layers.setdefault(layer_of(name), []).append(name)
    order = list(layers)
    need = statistics_bytes(targets)
    total = sum(need.values())
    lpp = cfg.layers_per_pass
    budget = None
    if lpp == "auto":
        dev = next(iter(targets.values())).weight.device
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            budget = comm.min_over_ranks(int(free * STATS_MEMORY_FRACTION))  # one plan for all ranks
            passes = max(1, math.ceil(total / max(budget, 1)))
            lpp = math.ceil(len(order) / passes)
        else:
            lpp = None  # host memory: one pass
    if lpp is None:
        lpp = len(order)
    slices = [sum((layers[l] for l in order[i:i + lpp]), []) for i in range(0, len(order), lpp)]
    info = {"layers": len(order), "layers_per_pass": lpp, "passes": len(slices),
            "statistics_gb": total / 1e9, "budget_gb": None if budget is None else budget / 1e9,
            "largest_slice_gb": max(sum(need[n] for n in s) for s in slices) / 1e9}
    return slices, info
