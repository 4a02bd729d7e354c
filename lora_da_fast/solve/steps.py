"""The steps of the per-module solve (docs/algorithm.md, "Solve"), written so that they also accept
stacks of same-shape problems (leading batch dimensions): the reference solve and the batched solver
share them."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from ..config import LoraDAConfig
from ..errors import NumericalError, TargetError
from ..fisher import FisherStatistics, ModuleStatistics, first_failing
from ..results import LoraFactors


# The input damping must leave Zd = sym(Z) + lam I with its smallest eigenvalue at least this fraction of
# lam (docs/algorithm.md, "The damping rule").
DAMPING_MARGIN = 0.5


def damping_note(damping: float, lam: float) -> str:
    """The report's note for an input damping raised from ``damping`` to ``lam`` by :func:`input_damping`."""
    return (f"damping raised from {damping:g} to {lam:g} after a failed Cholesky (float64, of sym(Z) + "
            f"{1 - DAMPING_MARGIN:g} x damping: Z has an eigenvalue below -{(1 - DAMPING_MARGIN) * lam / 10:g}, "
            "fp32 rounding of a singular or ill-conditioned input factor)")


def input_damping(Z: torch.Tensor, damping: float, max_damping: float, names: Sequence[str]) -> List[float]:
    """The damping of each input factor of a stack ``Z`` (``[g, d, d]``, or one ``[d, d]`` matrix; any
    float dtype), a function of the final statistics alone, computed in float64 the same way by every
    solver and in every run (docs/algorithm.md, "The damping rule"):

    ``lam`` is the smallest of ``damping * 10^k`` (``k = 0, 1, ...``, up to ``max_damping``) for which
    ``sym(Z) + (1 - DAMPING_MARGIN) lam I`` has a float64 Cholesky factorisation, that is (to float64
    rounding) ``lambda_min(sym(Z)) > -(1 - DAMPING_MARGIN) lam``. Then ``Zd = sym(Z) + lam I`` is
    positive definite with ``lambda_min(Zd) >= DAMPING_MARGIN * lam``: the factorisation of ``Zd`` cannot
    fail, in float64 or float32 alike, and ``||Zd^{-1}|| <= 2 / lam`` (a ``Zd`` that only just factorises
    would amplify rounding by far more). The default ``damping`` is kept whenever ``Z`` is positive
    semi-definite to within ``damping / 2``, as the statistics of exact arithmetic are.

    :class:`NumericalError` naming ``names[i]`` when even ``max_damping`` does not do; a non-finite
    ``Z`` is reported as such."""
    stack = Z[None] if Z.dim() == 2 else Z
    lams = []
    for i in range(stack.shape[0]):  # one matrix at a time: two float64 copies of one Z at most in memory
        Zi = stack[i].to(torch.float64)
        Zs = Zi + Zi.transpose(-1, -2)  # 2 sym(Z), a copy: the caller's Z is left as it is
        Zs.mul_(0.5)
        if not bool(torch.isfinite(Zs).all()):
            raise NumericalError(f"the input factor of {names[i]} is not finite")
        diag = Zs.diagonal()
        lam = float(damping)
        while True:
            shift = (1 - DAMPING_MARGIN) * lam
            diag.add_(shift)
            L, info = torch.linalg.cholesky_ex(Zs)
            ok = int(info) == 0 and bool(torch.isfinite(L.diagonal()).all())
            diag.sub_(shift)
            del L
            if ok:
                break
            if lam * 10 > max_damping * (1 + 1e-12):
                raise NumericalError(
                    f"Cholesky factorisation of the input factor of {names[i]} failed even with damping {lam:g} "
                    f"(max_damping={max_damping:g}): its smallest eigenvalue is below -{shift:g}")
            lam *= 10
        lams.append(lam)
    return lams


def cholesky_with_retry(Z: torch.Tensor, damping: float, max_damping: float, what: str
                        ) -> Tuple[torch.Tensor, float]:
    """Cholesky factor of ``Zd = sym(Z) + lam I`` (in ``Z``'s dtype) with ``lam`` from
    :func:`input_damping`. Returns ``(L, lam)``; raises :class:`NumericalError` naming ``what``."""
    lam = input_damping(Z, damping, max_damping, [what])[0]
    Zs = 0.5 * (Z + Z.transpose(-1, -2))
    L, info = torch.linalg.cholesky_ex(Zs + lam * torch.eye(Z.shape[-1], dtype=Z.dtype, device=Z.device))
    if int(info) != 0 or not bool(torch.isfinite(L).all()):  # cannot happen in float64 (lambda_min(Zd) >= lam / 2)
        raise NumericalError(f"Cholesky factorisation of the input factor of {what} failed with damping {lam:g}")
    return L, lam


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
