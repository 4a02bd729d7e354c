"""The memory plan: what one statistics pass and the solve after it hold, and, when the statistics of every
target do not fit next to the pass's activations, the split of the model into slices of whole layers
(``layers_per_pass``), each slice's statistics solved and freed before the next pass.

What is counted (bytes, estimated before any data is seen):

- **statistics**: per module ``G`` (``d_out x d_in``) and ``y`` in fp32, and per input group the packed
  upper triangle of ``Z`` (``d_in (d_in + 1) / 2`` fp32, :mod:`lora_da_fast.triangle`). The groups are
  those of the input-group probe when the plan decides the slices (``"auto"`` with a device budget) and
  the model can run it, else one ``Z`` per module (an upper bound);
- **activations** of one batch: what autograd keeps for the backward plus the module inputs the hooks
  hold, :data:`ACTIVATION_FACTOR` elements of the model's dtype per token per ``d_in + d_out`` of every
  target (measured), plus the loss's fp32 logits (:data:`LOGIT_BYTES_PER_VOCAB` per token and vocabulary
  entry); tokens per batch = ``batch_size`` x the longest example;
- **solve**: the batched solver's working set for one input group (its smallest unit of work) in float64;
  the solve runs after the pass, so a pass needs ``statistics + max(activations, solve)`` on top of the
  weights.

On a CUDA device ``layers_per_pass="auto"`` fits this into :data:`FIT_FRACTION` of the free memory (the
weights are already there); on the CPU it plans one pass. The run reports the planned peak next to the
peak it saw (``result.info["memory"]``: CUDA peak allocated, or the process's peak RSS on a CPU).
"""
from __future__ import annotations

import math
import re
import resource
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import comm
from .config import LoraDAConfig
from .statistics.hooks import input_embeddings, input_group_probe
from .targets import linear_shape
from .triangle import packed_size

# Tensors kept for the backward of one batch (autograd's saved tensors and the module inputs the hooks
# hold, by storage, weights excluded) per token and layer, in elements of the model's dtype, over the sum
# of d_in + d_out of the layer's targets: 1.09-1.10 measured on bf16 Llama shapes (SmolLM2-135M, 1B- and
# 7B-wide layers; benchmarks/RESULTS.md, "Statistics memory"); rounded up.
ACTIVATION_FACTOR = 1.15
# The loss, per token and vocabulary entry: the fp32 log-softmax kept for the backward (4), its gradient
# and that of the fp32 logits (8), the logits in the model's dtype (up to 4).
LOGIT_BYTES_PER_VOCAB = 16
# Share of the free device memory a plan may fill: the rest absorbs allocator fragmentation and library
# workspaces (cuBLAS, cuSOLVER).
FIT_FRACTION = 0.9
# Columns of the solver's iteration block per unit of rank (r + max(r, 8) <= 2 r + 8) and the float64
# vectors it keeps per column (search directions, residuals, products; as the batched solver counts them).
SOLVE_BLOCK_VECTORS = 24


def layer_of(name: str) -> str:
    """The layer a module belongs to: its name up to the first numeric component
    (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``); modules outside numbered layers map to ''."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else ""


def statistics_bytes(targets: Dict[str, nn.Module], leaders: Optional[Dict[str, str]] = None) -> Dict[str, int]:
    """fp32 bytes of each module's statistics as the pass allocates them: ``G`` and ``y``, plus the packed
    ``Z`` of its input group, counted on the group's first module. ``leaders``: module -> first module of its
    input group (:func:`~lora_da_fast.statistics.hooks.input_group_probe`); without it every module counts
    its own ``Z`` (an upper bound: modules sharing an input share one)."""
    out = {}
    for name, m in targets.items():
        d_out, d_in = linear_shape(m)
        b = 4 * (d_out * d_in + d_out)
        if leaders is None or leaders.get(name, name) == name:
            b += 4 * packed_size(d_in)
        out[name] = b
    return out


def activation_bytes(targets: Dict[str, nn.Module], tokens: int, vocab: int = 0) -> int:
    """Estimated bytes kept for the backward of one batch of ``tokens`` tokens (padding included):
    :data:`ACTIVATION_FACTOR` x the model's element size x the sum of ``d_in + d_out`` over the targets,
    per token, plus the loss over a vocabulary of ``vocab`` entries."""
    per_token = 0.0
    for m in targets.values():
        d_out, d_in = linear_shape(m)
        per_token += ACTIVATION_FACTOR * m.weight.element_size() * (d_in + d_out)
    per_token += LOGIT_BYTES_PER_VOCAB * vocab
    return int(per_token * tokens)


def solve_bytes(targets: Dict[str, nn.Module], leaders: Optional[Dict[str, str]], rank: int) -> int:
    """The batched solver's float64 working set for its smallest unit, one input group (the largest one):
    ``Zd`` expanded from its triangle, its Cholesky factor and inverse (``3.6 d^2`` with the expansion's
    packed copy and mask), and per module a copy of the factor in its stack, ``G`` and the iteration block.
    On a GPU the solver takes more (up to 40% of the free memory) when it is there, never less."""
    groups: Dict[str, List[Tuple[int, int]]] = {}
    for name, m in targets.items():
        d_out, d_in = linear_shape(m)
        groups.setdefault((leaders or {}).get(name, name), []).append((d_in, d_out))
    k = 2 * rank + 8
    worst = 0.0
    for mods in groups.values():
        d = mods[0][0]
        elems = 3.625 * d * d + sum(d * d + d_out * d + SOLVE_BLOCK_VECTORS * (d + d_out) * k for _, d_out in mods)
        worst = max(worst, 8 * elems)
    return int(worst)


def _probe_leaders(model: nn.Module, targets: Dict[str, nn.Module]) -> Optional[Dict[str, str]]:
    """The input groups from the pass's own probe (a 4-token forward), or ``None`` when the model cannot run
    it here (weights on the meta device, a model that needs its own loss function or inputs)."""
    if any(m.weight.device.type == "meta" for m in targets.values()):
        return None
    try:
        device = input_embeddings(model).weight.device
        return input_group_probe(model, targets, device)
    except Exception:  # noqa: BLE001 - any model: the plan then counts one Z per module
        return None


def _vocab(model: Optional[nn.Module]) -> int:
    head = model.get_output_embeddings() if model is not None and hasattr(model, "get_output_embeddings") else None
    w = getattr(head, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else 0


def _weight_bytes(model: Optional[nn.Module], device: torch.device) -> int:
    if model is None:
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device == device)


def plan_slices(targets: Dict[str, nn.Module], cfg: LoraDAConfig, model: Optional[nn.Module] = None,
                examples: Optional[Sequence] = None, leaders: Optional[Dict[str, str]] = None,
                free_bytes: Optional[int] = None) -> Tuple[List[List[str]], dict]:
    """Split the targets into slices of whole layers. Returns the slices and a description of the plan.

    ``model``: to count the weights and the vocabulary, and to probe the input groups when the slices are
    decided from the memory (one short forward; else every module counts its own ``Z``); ``examples``: the
    calibration examples (tokens per batch = ``cfg.batch_size`` x the longest); ``leaders``: the input
    groups when known (skips the probe); ``free_bytes``: the device memory free for the pass (default: what
    CUDA reports for the targets' device; ``None`` on a CPU, where ``"auto"`` plans one pass). Sizes in the
    returned description are in GB of 1e9 bytes.
    """
    layers: Dict[str, List[str]] = {}
    for name in targets:
        layers.setdefault(layer_of(name), []).append(name)
    order = list(layers)
    dev = next(iter(targets.values())).weight.device if targets else torch.device("cpu")
    lpp = cfg.layers_per_pass
    if lpp == "auto" and free_bytes is None and dev.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(dev)
        free_bytes = comm.min_over_ranks(int(free_bytes))  # one plan for all ranks
    if leaders is None and model is not None and lpp == "auto" and free_bytes is not None:
        leaders = _probe_leaders(model, targets)
    need = statistics_bytes(targets, leaders)
    total = sum(need.values())
    longest = max((len(e) for e in examples), default=0) if examples is not None else 0
    tokens = cfg.batch_size * longest
    act = activation_bytes(targets, tokens, _vocab(model))
    solve = solve_bytes(targets, leaders, cfg.rank)
    work = max(act, solve)
    room = None
    if lpp == "auto":
        if free_bytes is not None:
            room = int(FIT_FRACTION * free_bytes) - work
            lpp = _layers_fitting(order, layers, need, room)
        else:
            lpp = None  # host memory: one pass
    if lpp is None:
        lpp = len(order)
    slices = [sum((layers[l] for l in order[i:i + lpp]), []) for i in range(0, len(order), lpp)]
    largest = max((sum(need[n] for n in s) for s in slices), default=0)
    weights = _weight_bytes(model, dev)
    peak = weights + largest + work
    info = {"layers": len(order), "layers_per_pass": lpp, "passes": len(slices),
            "statistics_gb": total / 1e9, "budget_gb": None if room is None else room / 1e9,
            "largest_slice_gb": largest / 1e9, "activations_gb": act / 1e9, "tokens_per_batch": tokens,
            "solve_gb": solve / 1e9, "weights_gb": weights / 1e9,
            "free_gb": None if free_bytes is None else free_bytes / 1e9,
            "input_groups": "probe" if leaders is not None else "one per module (upper bound)",
            "planned_peak_gb": peak / 1e9, "planned_peak_bytes": peak,
            "fits": None if free_bytes is None else peak - weights <= FIT_FRACTION * free_bytes}
    return slices, info


def _layers_fitting(order: List[str], layers: Dict[str, List[str]], need: Dict[str, int], room: int) -> int:
    """The most layers per pass whose every slice's statistics fit in ``room`` bytes (at least 1)."""
    sizes = [sum(need[n] for n in layers[l]) for l in order]
    for lpp in range(len(order), 0, -1):
        if all(sum(sizes[i:i + lpp]) <= room for i in range(0, len(order), lpp)):
            return lpp
    return 1


class PeakMemory:
    """The peak memory a run saw on the targets' device: CUDA peak allocated (its counter is reset when the
    run starts) or, on a CPU, the process's peak resident set size (since the process started: it cannot
    be reset)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def report(self, plan: Optional[dict]) -> dict:
        if self.device.type == "cuda":
            seen, kind = torch.cuda.max_memory_allocated(self.device), "CUDA peak allocated"
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            seen = rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux
            kind = "CPU peak RSS of the process"
        return {"planned_peak_gb": None if not plan else plan.get("planned_peak_gb"),
                "seen_peak_gb": seen / 1e9, "seen": kind}
