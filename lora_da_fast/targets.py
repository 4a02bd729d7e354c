"""Which modules LoRA-DA adapts: one resolver, PEFT's own matching rules, used by the API, the CLI and
the statistics pass alike (so statistics, factors and LoRA layers always refer to the same modules)."""
from __future__ import annotations

import copy
import re
from typing import Dict, List, Sequence, Union

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULT_TARGETS
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer: its weight is [d_in, d_out]

from .errors import ConfigError, TargetError

LINEAR_TYPES = (nn.Linear, Conv1D)
REGEX_CHARS = set("^$*+?()[]{}|\\")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple:
    """``(d_out, d_in)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])


def parse_target_modules(text: str) -> Union[str, List[str]]:
    """Command-line form: ``all-linear`` | a regex (it holds a regex metacharacter other than '.') |
    comma-separated names or dotted suffixes."""
    text = text.strip()
    if text == "all-linear":
        return text
    if REGEX_CHARS & set(text):
        try:
            re.compile(text)
        except re.error as exc:
            raise ConfigError(f"--target-modules {text!r} is not a valid regex ({exc})") from None
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--target-modules {text!r}: no module name")
    return names


def check_lora_config(lora_config) -> None:
    """:class:`ConfigError` for a ``peft.LoraConfig`` that LoRA-DA cannot initialise."""
    if not isinstance(lora_config, LoraConfig):
        raise ConfigError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    init = lora_config.init_lora_weights
    if not (isinstance(init, bool) or init == "gaussian"):
        # PiSSA, OLoRA, CorDA, LoRA-GA, EVA... are other initialisations (some also mutate the base).
        raise ConfigError(f"LoraConfig.init_lora_weights={init!r} is another initialisation method; "
                          "leave it at True for LoRA-DA")
    if getattr(lora_config, "use_dora", False):
        raise ConfigError("DoRA (use_dora=True) is not supported: its magnitude vector is computed from the "
                          "initial LoRA weights, which LoRA-DA replaces")
    if getattr(lora_config, "target_parameters", None):
        raise ConfigError("LoraConfig.target_parameters is not supported: LoRA-DA adapts Linear/Conv1D modules")


def _all_linear(model: nn.Module) -> List[str]:
    """PEFT's ``"all-linear"``: every Linear/Conv1D but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = [n for n, m in model.named_modules() if n and is_linear(m) and m is not head]
    if head is None:  # no HF head accessor: PEFT's fallback excludes a module named lm_head
        found = [n for n in found if n.split(".")[-1] != "lm_head"]
    return found


def _linear_names(model: nn.Module) -> str:
    return ", ".join(sorted({n.split(".")[-1] for n, m in model.named_modules() if is_linear(m)})) or "(none)"


def lora_target_names(model: nn.Module, lora_config) -> List[str]:
    """Full names of the modules PEFT wraps for ``lora_config`` (in ``named_modules()`` order).

    Follows PEFT: ``target_modules=None`` takes PEFT's default for the model type, ``"all-linear"``
    every Linear/Conv1D but the output head, a string is a regex (full match), a list matches names
    or dotted suffixes; ``exclude_modules``, ``layers_to_transform`` and ``modules_to_save`` apply.
    Raises :class:`TargetError` if nothing matches, if a name of a list matches no module, or if a
    match is not a Linear/Conv1D layer.
    """
    check_lora_config(lora_config)
    probe = copy.deepcopy(lora_config)
    tm = probe.target_modules
    if tm is None:
        defaults = PEFT_DEFAULT_TARGETS
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise TargetError(f"LoraConfig.target_modules is None and PEFT has no default targets for model "
                              f"type {model_type!r}: set target_modules (e.g. 'all-linear')")
        probe.target_modules = set(defaults[model_type])
    elif isinstance(tm, str) and tm.lower() == "all-linear":
        probe.target_modules = set(_all_linear(model))  # PEFT expands it to the set of full names too
    all_names = [n for n, _ in model.named_modules() if n]
    names = [n for n in all_names if check_target_module_exists(probe, n)]
    if not names:
        raise TargetError(f"target_modules={tm!r} matches no module; linear module names in this "
                          f"model: {_linear_names(model)}")
    if isinstance(tm, (list, set, tuple)):  # each name the user gave must match something
        unknown = [t for t in tm if not any(n == t or n.endswith("." + t) for n in all_names)]
        if unknown:
            raise TargetError(f"target module name(s) {', '.join(map(repr, sorted(unknown)))} match no module; "
                              f"linear module names in this model: {_linear_names(model)}")
    modules = dict(model.named_modules())
    bad = [n for n in names if not is_linear(modules[n])]
    if bad:
        raise TargetError("LoRA-DA adapts nn.Linear and Conv1D layers only; these targets are not: "
                          f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return names


def find_target_modules(model: nn.Module, target_modules: Union[str, Sequence[str]]) -> Dict[str, nn.Module]:
    """``{name: module}`` for ``target_modules`` (``"all-linear"``, a regex, or a list of names or dotted
    suffixes), matched as :func:`lora_target_names` matches a ``LoraConfig`` with those targets."""
    spec = target_modules if isinstance(target_modules, str) else list(target_modules)
    names = lora_target_names(model, LoraConfig(r=1, target_modules=spec))
    modules = dict(model.named_modules())
    return {n: modules[n] for n in names}
