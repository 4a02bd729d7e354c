"""lora_da_fast: fast, exact LoRA-DA initialisation (arXiv 2510.24561) for Hugging Face models."""
from .config import LoraDAConfig
from .errors import ConfigError, DataError, LoraDAError, NumericalError, TargetError
from .peft_integration import apply_lora_da, initialize_lora_da
from .solver import LoraDAResult, LoraFactors, ModuleReport, solve_lora_da
from .statistics import FisherStatistics, ModuleStatistics, collect_statistics
from .text import examples_from_pairs, examples_from_texts

__version__ = "0.1.0"

__all__ = [
    "LoraDAConfig", "collect_statistics", "solve_lora_da", "FisherStatistics", "ModuleStatistics",
    "LoraFactors", "LoraDAResult", "ModuleReport", "LoraDAError", "ConfigError", "DataError",
    "TargetError", "NumericalError", "initialize_lora_da", "apply_lora_da", "examples_from_texts",
    "examples_from_pairs", "__version__",
]
