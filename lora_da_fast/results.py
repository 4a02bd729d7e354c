"""What a solve returns: the factors of each module, its report, and the result of a whole run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, NamedTuple

import torch


class LoraFactors(NamedTuple):
    """PEFT layout: ``lora_A`` is ``r x d_in``, ``lora_B`` is ``d_out x r`` (fp32)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor


@dataclass
class ModuleReport:
    """What the solve found for one module (shown in the CLI table and written to the report)."""

    d_in: int
    d_out: int
    group: str
    damping: float  # damping of Z actually used (raised if a Cholesky failed)
    output_damping: float  # damping of the output factor
    sigma: float  # ||D||_2 before normalisation
    eigenvalues: List[float]  # the r + 1 smallest eigenvalues of M (when known)
    eigengap: float  # (lambda_{r+1} - lambda_r) / max|lambda|: small means an ill-defined subspace
    residual: float  # max_k ||M a_k - theta_k a_k|| / ||M||
    solver: str
    update_norm: float = 0.0  # ||lora_B @ lora_A||_F
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class LoraDAResult(dict):
    """``{module_name: LoraFactors}`` with ``.reports`` (``{module_name: ModuleReport}``)."""

    def __init__(self, factors=None, reports=None):
        super().__init__(factors or {})
        self.reports: Dict[str, ModuleReport] = reports or {}
        self.info: Dict[str, object] = {}  # run-level facts (plan, timings) when made by the engine
        self.statistics = None  # the FisherStatistics solved, when the engine was asked to keep them
