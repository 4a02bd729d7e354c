"""lora_da_fast: fast, exact LoRA-DA initialisation (arXiv 2510.24561) for Hugging Face models.

How it works: docs/algorithm.md in the repository.

The public names below are loaded on first use (PEP 562), so ``import lora_da_fast`` and the import of
a leaf such as ``lora_da_fast.triangle`` load neither transformers nor peft (nor torch, for the package
itself); ``from lora_da_fast import initialize_lora_da`` loads what that function needs.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "LoraDAConfig": "config",
    "run_lora_da": "engine", "collect_statistics": "engine", "solve_lora_da": "engine",
    "prepare_run": "engine", "execute": "engine", "RunOptions": "engine",
    "LoraDAError": "errors", "ConfigError": "errors", "DataError": "errors", "DistributedError": "errors",
    "TargetError": "errors", "NumericalError": "errors",
    "FisherStatistics": "fisher", "ModuleStatistics": "fisher",
    "initialize_lora_da": "peft_integration", "initialize_lora_da_weights": "peft_integration",
    "get_lora_da_state_dict": "peft_integration", "apply_lora_da": "peft_integration",
    "LoraFactors": "results", "LoraDAResult": "results", "ModuleReport": "results",
    "examples_from_texts": "text", "examples_from_pairs": "text",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # loaded once
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs; nothing is imported at run time
    from .config import LoraDAConfig
    from .engine import RunOptions, collect_statistics, execute, prepare_run, run_lora_da, solve_lora_da
    from .errors import ConfigError, DataError, DistributedError, LoraDAError, NumericalError, TargetError
    from .fisher import FisherStatistics, ModuleStatistics
    from .peft_integration import apply_lora_da, get_lora_da_state_dict, initialize_lora_da, initialize_lora_da_weights
    from .results import LoraDAResult, LoraFactors, ModuleReport
    from .text import examples_from_pairs, examples_from_texts
