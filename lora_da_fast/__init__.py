"""lora_da_fast: fast, exact LoRA-DA initialisation (arXiv 2510.24561) for Hugging Face models."""
from .config import LoraDAConfig
from .errors import ConfigError, DataError, LoraDAError, NumericalError, TargetError
from .solver import LoraDAResult, LoraFactors, ModuleReport, solve_lora_da
from .statistics import FisherStatistics, ModuleStatistics, collect_statistics

__version__ = "0.1.0"

__all__ = [
    "LoraDAConfig", "collect_statistics", "solve_lora_da", "FisherStatistics", "ModuleStatistics",
    "LoraFactors", "LoraDAResult", "ModuleReport", "LoraDAError", "ConfigError", "DataError",
    "TargetError", "NumericalError", "__version__",
]
