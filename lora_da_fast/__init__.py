"""lora_da_fast: fast, exact LoRA-DA initialisation (arXiv 2510.24561) for Hugging Face models.

How it works: docs/algorithm.md in the repository."""
from .config import LoraDAConfig
from .engine import collect_statistics, run_lora_da, solve_lora_da
from .errors import ConfigError, DataError, DistributedError, LoraDAError, NumericalError, TargetError
from .fisher import FisherStatistics, ModuleStatistics
from .peft_integration import apply_lora_da, initialize_lora_da
from .results import LoraDAResult, LoraFactors, ModuleReport
from .text import examples_from_pairs, examples_from_texts
from .version import __version__

__all__ = [
    "LoraDAConfig", "collect_statistics", "solve_lora_da", "run_lora_da", "FisherStatistics", "ModuleStatistics",
    "LoraFactors", "LoraDAResult", "ModuleReport", "LoraDAError", "ConfigError", "DataError", "DistributedError",
    "TargetError", "NumericalError", "initialize_lora_da", "apply_lora_da", "examples_from_texts",
    "examples_from_pairs", "__version__",
]
