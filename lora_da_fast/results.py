"""What a solve returns: the factors of each module, its report, and the result of a whole run."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, NamedTuple, Optional

import torch

from .errors import NumericalError
from .fisher import first_failing


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
    eigengap: float  # (lambda_{r+1} - lambda_r) / max|lambda| (the note on a tie compares them with themselves)
    residual: float  # max_k ||M a_k - theta_k a_k|| / ||M||
    solver: str
    update_norm: float = 0.0  # ||lora_B @ lora_A||_F
    notes: List[str] = field(default_factory=list)
    # ||delta (lora_B @ lora_A)||_F / ||lora_B @ lora_A||_F when every entry of the statistics moves by one
    # fp32 ulp (LoraDAConfig.sensitivity; None: not known). Above 1e-4 the result is not determined by
    # the data at fp32 precision (two runs can differ by ~1e-3), and a note says so.
    sensitivity: Optional[float] = None
    # how: "first-order" (from every eigenvector of the solve), "first-order (guard vectors)" (an
    # iterative solve's), "second solve" (measured: sensitivity="always"), None
    sensitivity_by: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


class LoraDAResult(dict):
    """``{module_name: LoraFactors}`` with ``.reports`` (``{module_name: ModuleReport}``)."""

    def __init__(self, factors=None, reports=None):
        super().__init__(factors or {})
        self.reports: Dict[str, ModuleReport] = reports or {}
        self.info: Dict[str, object] = {}  # run-level facts (plan, timings) when made by the engine
        self.statistics = None  # the FisherStatistics solved, when the engine was asked to keep them


def _likely_cause(kind: str, beta: Optional[float], gamma: Optional[float]) -> str:
    """The setting that most likely made factors non-finite or zero, in words ("" if none stands out)."""
    if kind == "non-finite":
        if beta is not None and beta > 1e6:
            return f"; likely cause: beta = {beta:g} is too large (the variance term overflows; the default is 0.03)"
        if gamma is not None and gamma < 1e-30:
            return f"; likely cause: gamma = {gamma:g} is too small (the factors are divided by sqrt(gamma))"
        return "; the module's statistics hold extreme values: check them (or rerun in float32)"
    if gamma is not None and gamma > 1e30:
        return (f"; likely cause: gamma = {gamma:g} is too large (the factors are divided by sqrt(gamma) = "
                f"{math.sqrt(gamma):.3g}, below float32's range; the default is 1024)")
    return "; the module's statistics are (nearly) zero"


def check_factors(factors: Dict[str, LoraFactors], beta: Optional[float] = None,
                  gamma: Optional[float] = None) -> None:
    """:class:`NumericalError` naming the first module whose factors are not finite, or whose ``lora_A``
    or ``lora_B`` is zero (or below float32's smallest normal number, which is zero for training), and
    the setting that likely caused it (``beta``, ``gamma``), so that no unusable adapter is written.
    One device read per device (:func:`~lora_da_fast.fisher.first_failing`)."""
    tiny = torch.finfo(torch.float32).tiny
    finite, nonzero = [], []
    for name, f in factors.items():
        finite.append((name, torch.isfinite(f.lora_A).all() & torch.isfinite(f.lora_B).all()))
        big = lambda t: (t.abs().max() >= tiny) if t.numel() else torch.tensor(False, device=t.device)  # noqa: E731
        nonzero.append((name, big(f.lora_A) & big(f.lora_B)))
    bad = first_failing(finite)
    if bad is not None:
        raise NumericalError(f"the LoRA-DA factors of module {bad} are not finite (NaN or inf)"
                             + _likely_cause("non-finite", beta, gamma))
    bad = first_failing(nonzero)
    if bad is not None:
        raise NumericalError(f"the LoRA-DA factors of module {bad} are zero (or below float32's smallest normal "
                             "number): the adapter would not train" + _likely_cause("zero", beta, gamma))
