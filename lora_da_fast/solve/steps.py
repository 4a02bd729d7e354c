"""The steps of the per-module solve (docs/algorithm.md, "Solve"), written so that they also accept
stacks of same-shape problems (leading batch dimensions): the reference solve and the batched solver
share them."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..config import LoraDAConfig
from ..errors import NumericalError, TargetError
from ..fisher import FisherStatistics, ModuleStatistics, first_failing
from ..results import LoraFactors


def cholesky_with_retry(Z: torch.Tensor, damping: float, max_damping: float, what: str
                        ) -> Tuple[torch.Tensor, float]:
    """Cholesky factor of ``sym(Z) + lam I``; on failure retry with ``lam`` raised tenfold up to
    ``max_damping``. Returns ``(L, lam_used)``; raises :class:`NumericalError` naming ``what``."""
    Zs = 0.5 * (Z + Z.transpose(-1, -2))
    eye = torch.eye(Z.shape[-1], dtype=Z.dtype, device=Z.device)
    lam = damping
    while True:
        L, info = torch.linalg.cholesky_ex(Zs + lam * eye)
        if not bool((info != 0).any()) and bool(torch.isfinite(L).all()):
            return L, lam
        if lam * 10 > max_damping * (1 + 1e-12):
            raise NumericalError(
                f"Cholesky factorisation of the input factor of {what} failed even with damping {lam:g} "
                f"(max_damping={max_damping:g})")
        lam *= 10


def output_damping(st: ModuleStatistics, cfg: LoraDAConfig) -> float:
    if cfg.output_damping_ratio is None:
        return cfg.damping
    med = float(st.y.double().median())
    lam = cfg.output_damping_ratio * med
    return lam if lam > 0 else cfg.damping


def output_inverse(st: ModuleStatistics, n: int, lam: float, mode: str, dtype=torch.float64) -> torch.Tensor:
    """``u`` (``d_out``): ``1/(y + lam)``, or in ``sequence_lowrank`` mode the diagonal of
    ``(S^T S + lam I)^{-1}`` with ``S = stack(s_i)/sqrt(n)`` by Woodbury."""
    if mode == "diagonal":
        return 1.0 / (st.y.to(dtype) + lam)
    S = st.seq_sums.to(dtype) / math.sqrt(n)  # [n, d_out]
    K = S @ S.T + lam * torch.eye(S.shape[0], dtype=dtype, device=S.device)
    KinvS = torch.linalg.solve(K, S)
    diag = 1.0 - (S * KinvS).sum(dim=0)  # diag(S^T K^{-1} S)
    return diag.clamp(min=0) / lam


def fisher_gradient(L: torch.Tensor, G: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``D = -Zd^{-1} G^T diag(u)`` (``d_in x d_out``) from the Cholesky factor ``L`` of ``Zd``."""
    rhs = G.transpose(-1, -2) * u.unsqueeze(-2)
    return -torch.cholesky_solve(rhs, L)


def guidance(D: torch.Tensor, Zinv: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor,
             alpha: float, beta: float, population_size: Optional[int]) -> torch.Tensor:
    """``M = -alpha D D^T + beta c Zd^{-1}``, ``c = sum(u) / (N sigma^2)``, ``D`` already normalised."""
    M = -alpha * (D @ D.transpose(-1, -2))
    if beta > 0:
        c = u.sum(-1) / (population_size * sigma ** 2)
        M = M + (beta * c)[..., None, None] * Zinv
    return 0.5 * (M + M.transpose(-1, -2))


def canonical_signs(A0: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive (a deterministic basis)."""
    idx = A0.abs().argmax(dim=-2, keepdim=True)
    s = torch.sign(torch.gather(A0, -2, idx))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return A0 * s


def to_factors(A0: torch.Tensor, D: torch.Tensor, gamma: float) -> LoraFactors:
    """``lora_A = A0^T / sqrt(gamma)``, ``lora_B = (A0^T D)^T / sqrt(gamma)``, fp32."""
    B0 = A0.transpose(-1, -2) @ D  # [r, d_out]
    scale = 1.0 / math.sqrt(gamma)
    return LoraFactors((A0.transpose(-1, -2) * scale).float().contiguous(),
                       (B0.transpose(-1, -2) * scale).float().contiguous())


def check_rank(stats: FisherStatistics, rank: int) -> None:
    for name, st in stats.modules.items():
        if rank > min(st.d_in, st.d_out):
            raise TargetError(f"rank {rank} is larger than min(d_in, d_out) = {min(st.d_in, st.d_out)} "
                              f"of module {name}")


def check_nonzero(stats: FisherStatistics) -> None:
    checks = [(name, st.G.any()) for name, st in stats.modules.items()]
    bad = first_failing(checks)
    if bad is not None:
        raise NumericalError(f"module {bad} has an all-zero gradient: it was never reached by the "
                             "loss (is it used in the forward pass?)")
    bad = first_failing([(g, Z.any()) for g, Z in stats.Z.items()])
    if bad is not None:
        raise NumericalError(f"module {bad} has all-zero input statistics: it never received an input")
