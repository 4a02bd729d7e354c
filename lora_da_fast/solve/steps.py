"""The steps of the per-module solve (docs/algorithm.md, "Solve"), written so that they also accept
stacks of same-shape problems (leading batch dimensions): the reference solve and the batched solver
share them."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from ..config import LoraDAConfig
from ..errors import NumericalError
from ..fisher import FisherStatistics, ModuleStatistics, first_failing
from ..results import LoraFactors


# The input damping must leave Zd = sym(Z) + lam I with its smallest eigenvalue at least this fraction of
# lam (docs/algorithm.md, "The damping rule").
DAMPING_MARGIN = 0.5


# Eigenvalues r and r+1 of M closer than this, relative to their own size, make the note below: the r-th
# direction could be swapped for the (r+1)-th at a change of the objective below this fraction.
TIED = 1e-6


def tie_note(w: Sequence[float], r: int) -> Optional[str]:
    """The report's note when eigenvalues ``r`` and ``r + 1`` of ``M`` (``w``, ascending) coincide relative to
    their own size (not to ``||M||``: ``M``'s largest eigenvalue can be the damping's ``c / lam`` on
    directions the inputs never reach, which says nothing about how well the data separate these two)."""
    if len(w) <= r:
        return None
    lo, hi = w[r - 1], w[r]
    rel = (hi - lo) / max(abs(lo), abs(hi), 1e-300)
    if rel >= TIED:
        return None
    return (f"ill-defined subspace: eigenvalues {r} and {r + 1} of M coincide to {rel:.1e} of their size; this "
            "subspace is one of a family of (nearly) equally good ones")


def damping_note(damping: float, lam: float) -> str:
    """The report's note for an input damping raised from ``damping`` to ``lam`` by :func:`input_damping`."""
    return (f"damping raised from {damping:g} to {lam:g} after a failed Cholesky (float64, of sym(Z) + "
            f"{1 - DAMPING_MARGIN:g} x damping: Z has an eigenvalue below -{(1 - DAMPING_MARGIN) * lam / 10:g}, "
            "fp32 rounding of a singular or ill-conditioned input factor)")


def input_damping(Z: torch.Tensor, damping: float, max_damping: float, names: Sequence[str],
                  symmetric: bool = False) -> List[float]:
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

    ``symmetric``: ``Z`` is already symmetric; a float64 stack is then used in place (its diagonal is
    shifted for the test and restored bit for bit), with no copy but the factor. :class:`NumericalError`
    naming ``names[i]`` when even ``max_damping`` does not do; a non-finite ``Z`` is reported as such."""
    stack = Z[None] if Z.dim() == 2 else Z
    if symmetric and stack.dtype == torch.float64:
        work = stack
    else:
        work = stack.to(torch.float64)
        work = work + work.transpose(-1, -2)  # 2 sym(Z), a copy: the caller's Z is left as it is
        work.mul_(0.5)
    for i, ok in enumerate(torch.isfinite(work).flatten(1).all(dim=1).tolist()):
        if not ok:
            raise NumericalError(f"the input factor of {names[i]} is not finite")
    lams = [float(damping)] * work.shape[0]
    todo = list(range(work.shape[0]))
    while todo:
        part = work if len(todo) == work.shape[0] else work[torch.tensor(todo, device=work.device)]
        diag = part.diagonal(dim1=-2, dim2=-1)
        saved = diag.clone()
        shift = torch.tensor([(1 - DAMPING_MARGIN) * lams[i] for i in todo], dtype=torch.float64, device=work.device)
        diag.add_(shift[:, None])
        L, info = torch.linalg.cholesky_ex(part)
        ok = ((info == 0) & torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all(dim=-1)).tolist()
        diag.copy_(saved)  # exactly the values it had
        del L
        failed = [i for i, good in zip(todo, ok) if not good]
        for i in failed:
            if lams[i] * 10 > max_damping * (1 + 1e-12):
                raise NumericalError(
                    f"Cholesky factorisation of the input factor of {names[i]} failed even with damping {lams[i]:g} "
                    f"(max_damping={max_damping:g}): its smallest eigenvalue is below "
                    f"-{(1 - DAMPING_MARGIN) * lams[i]:g}")
            lams[i] *= 10
        todo = failed
    return lams


def cholesky_with_retry(Z: torch.Tensor, damping: float, max_damping: float, what: str
                        ) -> Tuple[torch.Tensor, float]:
    """Cholesky factor of ``Zd = sym(Z) + lam I`` (in ``Z``'s dtype) with ``lam`` from
    :func:`input_damping`. Returns ``(L, lam)``; raises :class:`NumericalError` naming ``what``."""
    Zs = 0.5 * (Z + Z.transpose(-1, -2))
    lam = input_damping(Zs, damping, max_damping, [what], symmetric=True)[0]
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


def check_nonzero(stats: FisherStatistics) -> None:
    checks = [(name, st.G.any()) for name, st in stats.modules.items()]
    bad = first_failing(checks)
    if bad is not None:
        raise NumericalError(f"module {bad} has an all-zero gradient: it was never reached by the "
                             "loss (is it used in the forward pass?)")
    bad = first_failing([(g, Z.any()) for g, Z in stats.Z.items()])
    if bad is not None:
        raise NumericalError(f"module {bad} has all-zero input statistics: it never received an input")
