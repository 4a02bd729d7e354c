"""Which modules LoRA-DA adapts, matched the way PEFT matches ``LoraConfig.target_modules``."""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Union

import torch
from torch import nn

from .errors import TargetError

try:  # transformers' Conv1D (GPT-2) stores its weight as [d_in, d_out].
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency, but keep the core importable
    Conv1D = ()

LINEAR_TYPES = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(Conv1D, type) and isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple:
    """``(d_out, d_in)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])


def _name_matches(name: str, target_modules: Union[str, Sequence[str]]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_modules(model: nn.Module, target_modules: Union[str, Sequence[str]]) -> Dict[str, nn.Module]:
    """Return ``{name: module}`` for the modules to adapt, in ``named_modules()`` order.

    ``"all-linear"`` means every ``nn.Linear``/``Conv1D`` but the output head (PEFT's meaning).
    Raises :class:`TargetError` if nothing matches or a match is not a linear layer.
    """
    named = list(model.named_modules())
    if target_modules == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found = {n: m for n, m in named if is_linear(m) and m is not head and n}
        if head is None:  # no HF head accessor: PEFT's fallback excludes a module named lm_head
            found = {n: m for n, m in found.items() if n.split(".")[-1] != "lm_head"}
    else:
        found = {n: m for n, m in named if n and _name_matches(n, target_modules)}
        bad = [n for n, m in found.items() if not is_linear(m)]
        if bad:
            raise TargetError(
                f"target modules must be nn.Linear or Conv1D layers; these are not: {', '.join(bad[:5])}")
    if not found:
        linear_names = sorted({n.split(".")[-1] for n, m in named if is_linear(m)})
        raise TargetError(
            f"target_modules={target_modules!r} matches no linear module; linear module names in this "
            f"model: {', '.join(linear_names) or '(none)'}")
    return found


def suffix_names(names: List[str]) -> List[str]:
    """Distinct last components of module names (for messages and LoraConfig.target_modules)."""
    return sorted({n.split(".")[-1] for n in names})


def module_device(module: nn.Module) -> torch.device:
    return module.weight.device
