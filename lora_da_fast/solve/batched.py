"""Batched LoRA-DA solver: every module's subspace computed in stacks of same-shape problems.

Same result as :func:`lora_da_fast.solve.reference.solve_reference` (docs/algorithm.md, "Solve") up to the
accuracy contract, much faster. The work is organised as follows:

1. **Stream.** Input groups are taken in chunks whose working memory stays under ``max_batch_bytes``;
   everything a chunk allocates (factors, right-hand sides, iteration blocks) is freed before the next.
2. **Factorise.** One Cholesky per input group, ``Zd = sym(Z) + lam I = L L^T``, stacked over groups of
   the same ``d_in`` (``cholesky_ex``), with a per-item damping retry (x10 up to ``max_damping``, noted).
3. **Never form ``D`` or ``Zd^{-1}``.** ``D = -Zd^{-1} G^T diag(u)`` (``d_in x d_out``) is only applied:
   ``D x = -Zd^{-1} G^T (u x)``, ``D^T x = -u (G Zd^{-1} x)``, with ``Zd^{-1} x = L^{-T} (L^{-1} x)``
   (two triangular solves on narrow blocks on CPU, products with an explicit ``L^{-1}`` on GPU).
   Stacks hold the modules of one shape whose groups have the same number of them (q/k/v of a 7B
   model, gate/up, ...): the modules of one factor are then applied side by side, each factor read once.
   Forming ``D`` costs ``d_in^2 d_out`` per module; the ~100 columns an eigen-solve applies cost less.
4. **Eigen-solve.** ``sigma^2 M = M' = -alpha D D^T + beta (sum(u)/N) Zd^{-1}`` has the eigenvectors of
   ``M`` and does not need ``sigma``. Its ``r`` smallest eigenvectors come from a batched LOBPCG
   (block ``k = r + extra``, basis ``[X, W, P]``, Rayleigh-Ritz on the small projected pencil in float64,
   ``P`` built in coefficient space so that the basis stays orthonormal) on the stack of same-shape
   modules, started from ``D Omega``. Stopping rule, per module: the Davis-Kahan bound
   ``||R_r||_F / (theta_{r+1} - theta_r - ||r_{r+1}||)`` on the subspace angle below ``tol``, or the
   residual at rounding level. When the variance term dominates ``M'``'s spectrum the residuals are
   also preconditioned by ``Zd`` (``[X, R, Zd R, P]``). Modules that do not converge within ``maxiter``
   are solved densely (reported).
5. **Normalise.** ``sigma = ||D||_2``: with ``beta = 0`` it is the top Ritz value of the same solve
   (``M' = -alpha D D^T``: the truncated SVD of ``D``); otherwise a second LOBPCG on ``-D D^T`` started
   from ``M'``'s Ritz vectors (nearly invariant already) converges in a few iterations.
6. **Factors.** ``A0`` = canonical signs of the ``r`` Ritz vectors, ``B0^T = D^T A0 / sigma`` (``r``
   columns through ``Zd^{-1}``), PEFT layout as :func:`lora_da_fast.solve.steps.to_factors`.

Small problems (``d_in`` at most ``dense_below``) are solved densely, in stacks, in float64.

Precision: the working dtype defaults to float64 on CPU and on GPUs with full-rate float64 (P100, V100,
A100, H100/H200, B200: float64 GEMMs there run at the float32 rate, so float64 costs nothing but
memory); float32 elsewhere. In float32 the Rayleigh-Ritz step, the convergence tests, ``sigma`` and the
reports are float64, but the factorisation and the products are float32, whose error grows like
``cond(Zd) * eps32``: a chunk of groups is solved in float32 only when a float32 Cholesky succeeds and
every estimated ``cond(Zd) * eps32 <= 1e-4``, else in float64 (noted in the reports), and a float32
module that does not converge is solved densely from float64 factors. Real statistics (``Z`` singular,
damping ``1e-6``) are far from that bound: float64 is the default wherever it is fast.

The result does not depend on ``cfg.seed`` beyond the stopping tolerance, and is bit-identical for the
same seed, options and machine.
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..config import LoraDAConfig
from ..errors import ConfigError, NumericalError
from ..fisher import FisherStatistics
from ..results import LoraDAResult, LoraFactors, ModuleReport
from .steps import canonical_signs, damping_note, input_damping, output_damping, output_inverse

__all__ = ["BatchedOptions", "solve_batched"]

log = logging.getLogger(__name__)


SOLVER_ITERATIVE = "lobpcg-batched"
SOLVER_DENSE = "dense-batched"
SOLVER_FALLBACK = "dense-fallback"

# relative accuracy of sigma^2 = ||D||_2^2 (Kato-Temple bound): lora_B is divided by sigma, so this is
# the relative error it adds to lora_B @ lora_A (the contract allows 1e-4)
SIGMA2_TOL = 1e-10


@contextmanager
def _phase(name: str, device: torch.device, acc: Dict[str, float]):
    """Wall time of a phase, added to ``acc`` (only with DEBUG logging: it synchronises the GPU)."""
    if not log.isEnabledFor(logging.DEBUG):
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class BatchedOptions:
    """Options of :func:`solve_batched` (none changes the result beyond the stopping tolerance).

    Args:
        dtype: working dtype of the factorisations and iterations; ``None``: float64 on CPU and on GPUs
            with full-rate float64, float32 elsewhere.
        device: where to solve; ``None``: the device of the statistics.
        max_batch_bytes: bound on the working memory of one chunk of input groups (at least one group
            is always taken); ``None``: 32 MiB on CPU (cache-sized stacks are faster), 40% of the free
            memory on a GPU.
        dense_below: modules with ``d_in`` at most this are solved by a dense eigendecomposition.
        extra: block size of the eigensolver is ``rank + extra`` (``None``: ``max(rank, 8)``).
        tol: bound on the sine of the angle between the computed and the exact ``r``-dimensional
            subspace (Davis-Kahan estimate from the residuals and the Ritz gap). The estimate is
            conservative: measured errors of ``lora_B @ lora_A`` are 2e-8..6e-8 at ``1e-6`` (SmolLM2
            and random-weight statistics), 2000x under the 1e-4 contract; each further decade costs
            ~2 iterations on SmolLM2 statistics, ~4 on the flatter spectra of a random-weight model
            (1024 wide), where 20-40 iterations are needed.
        maxiter: iterations before a module falls back to the dense solve; ``None``: 500 on GPU, 150 on
            CPU, where fewer are allowed when a dense solve would cost less than the iterations.
        apply: ``"solve"`` (triangular solves with ``L``), ``"inverse"`` (explicit ``L^{-1}``, GEMMs)
            or ``"auto"`` (``"inverse"`` on GPU, ``"solve"`` on CPU).
        num_threads: on CPU, torch's intra-op threads during the solve, per worker (restored
            afterwards); ``None``: 1 with several workers, else the setting is left alone.
        workers: on CPU, chunks of groups solved at the same time by this many threads, each with one
            torch intra-op thread (``num_threads`` if given); ``None``: torch's current number of
            threads. The result does not depend on it. On GPU chunks are solved one after the other.
        expand_all: expand every residual column of the block in each iteration (fewer iterations)
            rather than the ``rank`` wanted ones; ``None``: on GPU only, where an iteration costs the
            reading of the factors whatever the width, while on CPU the cost grows with the columns.
    """

    dtype: Optional[torch.dtype] = None
    device: Optional[torch.device] = None
    max_batch_bytes: Optional[int] = None
    dense_below: int = 128
    extra: Optional[int] = None
    tol: float = 1e-6
    maxiter: Optional[int] = None
    apply: str = "auto"
    num_threads: Optional[int] = None
    expand_all: Optional[bool] = None
    workers: Optional[int] = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {self.dtype!r}")
        if self.apply not in ("auto", "solve", "inverse"):
            raise ConfigError(f"apply must be 'auto', 'solve' or 'inverse', got {self.apply!r}")
        if self.max_batch_bytes is not None and self.max_batch_bytes <= 0:
            raise ConfigError("max_batch_bytes must be positive")
        if not (0 < self.tol < 1):
            raise ConfigError("tol must be in (0, 1)")
        if self.maxiter is not None and self.maxiter < 1:
            raise ConfigError("maxiter must be a positive integer")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("num_threads must be a positive integer")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("workers must be a positive integer")


# --------------------------------------------------------------------------------------------------
# Device and dtype choices


def _fast_fp64(device: torch.device) -> bool:
    """GPUs whose float64 GEMM runs at half or more of the float32 rate (the xx.0 data-centre parts)."""
    if device.type != "cuda":
        return device.type == "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return minor == 0 and major >= 6


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.4 * free)
    # CPU: the iterations are bound by memory traffic over L and G; stacks that stay in the caches are
    # faster (30 SmolLM2 layers, one thread: 7.4 s with 16-32 MiB chunks, 10.7 s with 1 GiB)
    return 32 << 20


# --------------------------------------------------------------------------------------------------
# Factorisation


def _per_item(A: torch.Tensor) -> bool:
    """Large matrices on a GPU are factorised one at a time: the batched cuSOLVER/cuBLAS routines are
    made for many small matrices."""
    return A.device.type == "cuda" and A.shape[0] > 1 and A.shape[-1] > 256


def _cholesky_ex(Z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if not _per_item(Z):
        return torch.linalg.cholesky_ex(Z)
    L = torch.empty_like(Z)
    infos = []
    for i in range(Z.shape[0]):
        Li, info = torch.linalg.cholesky_ex(Z[i])
        L[i] = Li
        infos.append(info)
    return L, torch.stack(infos)


def _tril_inverse(L: torch.Tensor) -> torch.Tensor:
    """``L^{-1}`` for a stack of lower-triangular factors."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    if not _per_item(L):
        return torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    out = torch.empty_like(L)
    for i in range(L.shape[0]):
        out[i] = torch.linalg.solve_triangular(L[i], eye, upper=False)
    return out


def cholesky_stack(Z: torch.Tensor, damping: float, max_damping: float, names: Sequence[str]
                   ) -> Tuple[torch.Tensor, List[float]]:
    """Cholesky factors of ``Z_i + lam_i I`` for a stack ``Z`` (``[g, d, d]``, already symmetrised,
    overwritten); items whose factorisation fails (or is not finite) are retried with ``lam_i`` raised
    tenfold, as :func:`lora_da_fast.solve.steps.cholesky_with_retry` does for one matrix."""
    lams = [float(damping)] * Z.shape[0]
    diag = Z.diagonal(dim1=-2, dim2=-1)
    diag.add_(damping)
    L, info = _cholesky_ex(Z)
    # a NaN anywhere in Z reaches the diagonal of L at or after its row: checking the diagonal is enough
    bad = (info != 0) | ~torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all(dim=-1)
    while bool(bad.any()):
        for i in torch.nonzero(bad).flatten().tolist():
            lam = lams[i]
            if lam * 10 > max_damping * (1 + 1e-12):
                raise NumericalError(
                    f"Cholesky factorisation of the input factor of {names[i]} failed even with damping "
                    f"{lam:g} (max_damping={max_damping:g})")
            diag[i].add_(9 * lam)
            lams[i] = 10 * lam
        idx = torch.nonzero(bad).flatten()
        Li, info_i = _cholesky_ex(Z[idx])
        L[idx] = Li
        bad_i = (info_i != 0) | ~torch.isfinite(Li.diagonal(dim1=-2, dim2=-1)).all(dim=-1)
        bad = torch.zeros_like(bad)
        bad[idx] = bad_i
    return L, lams


def _mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` for a tall ``A`` and a narrow ``B``. On CPU computed as ``(B^T A^T)^T``: MKL's batched
    GEMM runs 2-4x faster with the long dimension as the column count (measured, float64)."""
    if A.device.type != "cpu":
        return A @ B
    return (B.transpose(-1, -2) @ A.transpose(-1, -2)).transpose(-1, -2)


def _zinv(L: Optional[torch.Tensor], Linv: Optional[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """``Zd^{-1} X = L^{-T} (L^{-1} X)`` with the explicit inverse if given, else two triangular solves
    (not ``cholesky_solve``: it copies ``L`` into column-major order on every call)."""
    if Linv is not None:
        return Linv.transpose(-1, -2) @ (Linv @ X)
    Y = torch.linalg.solve_triangular(L, X, upper=False)
    return torch.linalg.solve_triangular(L.transpose(-1, -2), Y, upper=True)


def _factor_runs(idx: torch.Tensor) -> Tuple[int, Optional[object]]:
    """``(c, sel)`` when ``idx`` is ``c`` repeats of each of increasing factor indices (``sel``: a slice
    if they are consecutive, else their index tensor), else ``(0, None)``."""
    if idx.numel() == 0:
        return 0, None
    uniq, counts = torch.unique_consecutive(idx, return_counts=True)
    c = int(counts[0])
    if not bool((counts == c).all()) or (uniq.numel() > 1 and not bool((uniq[1:] > uniq[:-1]).all())):
        return 0, None
    first, last = int(uniq[0]), int(uniq[-1])
    if last - first + 1 == uniq.numel():
        return c, slice(first, last + 1)
    return c, uniq


# --------------------------------------------------------------------------------------------------
# The operator A = -a D D^T + b Zd^{-1} on a stack, with D = -Zd^{-1} G^T diag(u) never formed


class _Operator:
    """``A = -a D D^T + b Zd^{-1} = Zd^{-1} (-a G^T diag(u^2) G Zd^{-1} + b I)`` for a stack of modules.

    ``Lsrc``: ``[g, n, n]`` Cholesky factors of the chunk's ``Zd``; ``idx``: ``[s]`` the factor of each
    module of the stack; ``G``: ``[s, d_out, n]``; ``u``: ``[s, d_out]``; ``b``: ``[s]`` float64 or
    ``None``; ``Linvsrc``: explicit ``L^{-1}`` per factor (GPU) or ``None`` (triangular solves).
    Forming ``D`` would cost ``n^2 d_out`` per module, applying it through ``Zd^{-1}`` costs ``4 n^2`` per
    column: with the ~100 columns an eigen-solve applies, never forming it is cheaper once ``d_out``
    exceeds ~200, i.e. for every module of a real model.

    When the stack holds the same number ``c`` of modules of every factor, in factor order (q/o/down:
    one per group; k/v, gate/up: two), ``Zd^{-1}`` is applied to the ``c`` modules' columns side by side,
    with the chunk's factors themselves: no per-module copy of ``L`` and ``c`` times fewer, wider solves.
    Otherwise (a subset of a stack, once some modules have converged) the factors are gathered per module.
    """

    def __init__(self, Lsrc: torch.Tensor, idx: torch.Tensor, G: torch.Tensor, u: torch.Tensor, a: float,
                 b: Optional[torch.Tensor], Linvsrc: Optional[torch.Tensor]):
        self.Lsrc, self.Linvsrc, self.idx = Lsrc, Linvsrc, idx
        self.G, self.u, self.a, self.b = G, u, a, b
        self._L = self._Linv = None
        self.per_factor, self._sel = _factor_runs(idx)
        self._fL = self._fLinv = None

    @property
    def L(self) -> torch.Tensor:
        """The stack's factors, one per module (gathered on first use: the dense fallback, ``zd_mul``)."""
        if self._L is None:
            self._L = self._factors()[0] if self.per_factor == 1 else self.Lsrc[self.idx]
        return self._L

    def _factors(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The distinct factors of the stack, in order (a view of the chunk's when they are consecutive)."""
        if self._fL is None:
            self._fL = self.Lsrc[self._sel]
            self._fLinv = None if self.Linvsrc is None else self.Linvsrc[self._sel]
        return self._fL, self._fLinv

    def __len__(self) -> int:
        return self.G.shape[0]

    def subset(self, idx: torch.Tensor) -> "_Operator":
        return _Operator(self.Lsrc, self.idx[idx], self.G[idx], self.u[idx], self.a,
                         None if self.b is None else self.b[idx], self.Linvsrc)

    def with_coefficients(self, a: float, b: Optional[torch.Tensor]) -> "_Operator":
        op = _Operator(self.Lsrc, self.idx, self.G, self.u, a, b, self.Linvsrc)
        op._L, op._Linv, op._fL, op._fLinv = self._L, self._Linv, self._fL, self._fLinv
        return op

    def zinv(self, X: torch.Tensor) -> torch.Tensor:
        """``Zd^{-1} X = L^{-T} (L^{-1} X)``."""
        c = self.per_factor
        if c:
            L, Linv = self._factors()
            # the c modules of each factor side by side: [f*c, n, m] -> [f, n, c*m] (views for c = 1)
            s, n, m = X.shape
            Xg = X.reshape(-1, c, n, m).transpose(1, 2).reshape(-1, n, c * m)
            Yg = _zinv(None if Linv is not None else L, Linv, Xg)
            return Yg.reshape(-1, n, c, m).transpose(1, 2).reshape(s, n, m)
        if self.Linvsrc is not None:
            if self._Linv is None:
                self._Linv = self.Linvsrc[self.idx]
            return _zinv(None, self._Linv, X)
        return _zinv(self.L, None, X)

    def d_mul(self, X: torch.Tensor) -> torch.Tensor:
        """``D X = -Zd^{-1} G^T (u * X)`` (``X``: ``[s, d_out, m]``)."""
        return -self.zinv(_mm(self.G.transpose(-1, -2), self.u[..., None] * X))

    def dt_mul(self, X: torch.Tensor) -> torch.Tensor:
        """``D^T X = -u * (G Zd^{-1} X)`` (``X``: ``[s, n, m]``)."""
        return -self.u[..., None] * _mm(self.G, self.zinv(X))

    def zd_mul(self, X: torch.Tensor) -> torch.Tensor:
        """``Zd X = L (L^T X)`` (the preconditioner of the variance-dominated case)."""
        return _mm(self.L, _mm(self.L.transpose(-1, -2), X))

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        Y = self.zinv(X)
        V = _mm(self.G.transpose(-1, -2), (self.u * self.u)[..., None] * _mm(self.G, Y))
        V = V * (-self.a)
        if self.b is not None:
            V = V + self.b.to(V.dtype)[:, None, None] * X
        return self.zinv(V)


# --------------------------------------------------------------------------------------------------
# Batched LOBPCG


def _tiny(dtype: torch.dtype) -> float:
    return 1e-200 if dtype == torch.float64 else 1e-30


def _project_out(W: torch.Tensor, bases: Sequence[torch.Tensor], passes: int = 1) -> torch.Tensor:
    for _ in range(passes):
        for B in bases:
            W = W - _mm(B, B.transpose(-1, -2) @ W)
    return W


def _householder_on(W: torch.Tensor) -> bool:
    return W.device.type == "cpu"


def _orthonormalize(W: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``W`` (``[b, n, m]``, full column rank). CPU: Householder QR.
    GPU: CholeskyQR2 with a float64 Gram matrix (two GEMMs and an ``m x m`` factorisation: batched
    Householder QR of tall thin blocks is a loop of latency-bound calls there), Householder QR if the
    Gram matrix is not numerically definite."""
    if _householder_on(W):
        return torch.linalg.qr(W)[0]
    for _ in range(2):
        Gm = W.transpose(-1, -2).double() @ W.double()
        R, info = torch.linalg.cholesky_ex(Gm, upper=True)
        if bool((info != 0).any()):
            return torch.linalg.qr(W)[0]
        W = torch.linalg.solve_triangular(R.to(W.dtype), W, upper=True, left=False)
    return W


def _orth_against(W: torch.Tensor, bases: Sequence[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Orthonormal columns spanning ``W`` projected out of the orthonormal ``bases``. Columns that vanish
    (an exact eigenvector's residual) are replaced by random directions, so that the block keeps its
    shape and the Rayleigh-Ritz basis stays well conditioned."""
    W = _project_out(W, bases, passes=1)
    norms = torch.linalg.vector_norm(W, dim=-2)
    bad = ~(norms > _tiny(W.dtype)) | ~torch.isfinite(norms)
    if bool(bad.any()):
        rnd = torch.randn(W.shape, generator=gen, dtype=W.dtype, device=W.device)
        W = torch.where(bad[:, None, :], _project_out(rnd, bases, passes=2), torch.nan_to_num(W))
    # columns of very different norms (converged and unconverged residuals): equilibrate first
    W = W / torch.linalg.vector_norm(W, dim=-2, keepdim=True)
    Q = _orthonormalize(W)
    if bases:
        # A projected column can be tiny against the others: QR then leaves it slightly outside the
        # complement of ``bases``; a second projection after the normalisation ("twice is enough",
        # Kahan-Parlett) and a QR restore orthogonality to rounding level.
        Q = _orthonormalize(_project_out(Q, bases, passes=1))
    return Q


def _rayleigh_ritz(S: torch.Tensor, AS: torch.Tensor, k: Optional[int] = None):
    """Rayleigh-Ritz on the pencil ``(S^T A S, S^T S)`` (``S``: ``[b, n, m]``), in float64.

    Returns ``theta`` (ascending, ``[b, m]``, on the device of ``S``) and, on that device in ``S``'s
    dtype, the coefficients ``Cx`` of the ``k`` lowest Ritz vectors (``S Cx``, orthonormal) and ``Cp``
    of the LOBPCG direction ``P``: the part of those Ritz vectors outside the first ``k`` columns of
    ``S``, orthonormalised and orthogonal to ``S Cx`` (``None`` if ``k`` is ``None``). The ``m x m``
    problems are solved on the CPU: tiny batched eigen-problems are a loop of latency-bound calls on a GPU.
    """
    dev, dt = S.device, S.dtype
    Sd, ASd = S.double(), AS.double()
    GA = (Sd.transpose(-1, -2) @ ASd).cpu()
    GB = (Sd.transpose(-1, -2) @ Sd).cpu()
    GA = 0.5 * (GA + GA.transpose(-1, -2))
    GB = 0.5 * (GB + GB.transpose(-1, -2))
    m = GB.shape[-1]
    eye = torch.eye(m, dtype=GB.dtype)
    Lb, info = torch.linalg.cholesky_ex(GB)
    if bool((info != 0).any()):  # cannot happen with the orthonormalised blocks; be safe
        Lb = torch.linalg.cholesky(GB + 1e-14 * GB.diagonal(dim1=-2, dim2=-1).amax(-1)[:, None, None] * eye)
    Lbinv = torch.linalg.solve_triangular(Lb, eye.expand_as(GB), upper=False)
    At = Lbinv @ GA @ Lbinv.transpose(-1, -2)
    theta, V = torch.linalg.eigh(0.5 * (At + At.transpose(-1, -2)))
    C = Lbinv.transpose(-1, -2) @ V
    if k is None:
        return theta.to(dev), C[..., : m].to(device=dev, dtype=dt), None
    Cx = C[..., :k]
    # P: the part of the new Ritz vectors outside the old X (the first k columns of S), in the
    # orthonormal frame of span(S) given by Lb^T, projected out of the new X (V[:, :k]), orthonormalised.
    Cp0 = Cx.clone()
    Cp0[:, :k, :] = 0
    T = V[..., k:].transpose(-1, -2) @ (Lb.transpose(-1, -2) @ Cp0)  # [b, m - k, k]
    Qt, _ = torch.linalg.qr(T)
    Cp = Lbinv.transpose(-1, -2) @ (V[..., k:] @ Qt)
    return theta.to(dev), Cx.to(device=dev, dtype=dt), Cp.to(device=dev, dtype=dt)


@dataclass
class _EigResult:
    theta: torch.Tensor  # [b, k] float64, ascending Ritz values
    X: torch.Tensor  # [b, n, k] Ritz vectors (working dtype)
    res: torch.Tensor  # [b, k] float64 residual norms
    iters: torch.Tensor  # [b] int64
    converged: torch.Tensor  # [b] bool


def lobpcg_batched(op: _Operator, X: torch.Tensor, nwant: int, *, gen: torch.Generator, tol: Optional[float],
                   abs_tol: float, maxiter: int, value_tol: Optional[float] = None,
                   anorm_floor: Optional[torch.Tensor] = None, zd_precond: bool = False,
                   AX: Optional[torch.Tensor] = None, wcols: Optional[int] = None) -> _EigResult:
    """Smallest eigenpairs of the symmetric operator ``op`` on a stack (``X``: ``[b, n, k]`` start).

    An item stops when ``||R_{:nwant}||_F <= tol * (theta_{nwant} - theta_{nwant-1} - ||r_{nwant}||)``
    (Davis-Kahan bound on the subspace sine) or ``||R_{:nwant}||_F <= abs_tol * ||A||`` with
    ``||A||`` estimated as ``max(|theta|, anorm_floor)`` (``tol=None``: no condition on the vectors);
    with ``value_tol`` also
    ``min(||r_0||, ||r_0||^2 / gap_0) <= value_tol * |theta_0|`` (then ``theta_0`` is within that
    relative distance of an eigenvalue). Finished items leave the batch (the operator is restricted to
    the rest when at most half remain). ``zd_precond`` adds ``Zd R`` to the search space.
    """
    b, n, k = X.shape
    dt = X.dtype
    kw = k if wcols is None else min(k, wcols)  # residual columns expanded per iteration
    full_op = op
    if AX is None:  # otherwise X is orthonormal already and AX = op(X)
        X = _orth_against(X, [], gen)
        AX = op(X)
    theta, C, _ = _rayleigh_ritz(X, AX)
    X, AX = _mm(X, C), _mm(AX, C)
    P = AP = None
    out_theta = torch.zeros(b, k, dtype=torch.float64, device=X.device)
    out_res = torch.zeros(b, k, dtype=torch.float64, device=X.device)
    out_X = torch.empty_like(X)
    iters = torch.zeros(b, dtype=torch.int64, device=X.device)
    conv = torch.zeros(b, dtype=torch.bool, device=X.device)
    active = torch.arange(b, device=X.device)  # global indices of the items in the batch
    op_items = active  # global indices the current operator is restricted to
    pos = active  # positions of the active items in the current operator
    floor = anorm_floor.double() if anorm_floor is not None else torch.zeros(b, dtype=torch.float64,
                                                                                device=X.device)
    for it in range(maxiter + 1):
        R = AX - X * theta[:, None, :k].to(dt)
        rn = torch.linalg.vector_norm(R.double(), dim=-2)
        th = theta[:, :k]
        anorm = torch.maximum(th.abs().amax(-1), floor[active])
        rw = torch.linalg.vector_norm(rn[:, :nwant], dim=-1)
        if tol is None:  # the value only (below)
            ok = torch.ones_like(rw, dtype=torch.bool)
        elif k > nwant:
            gap = th[:, nwant] - th[:, nwant - 1] - rn[:, nwant]
            ok = (rw <= tol * gap) & (gap > 0)
            ok |= rw <= abs_tol * anorm
        else:
            ok = rw <= abs_tol * anorm
        if value_tol is not None:
            # |theta_0 - lambda| <= min(||r_0||, ||r_0||^2 / gap) (Kato-Temple, gap to the next Ritz value)
            gap0 = th[:, 1] - th[:, 0] - rn[:, 1] if k > 1 else torch.zeros_like(rw)
            err0 = torch.where(gap0 > 0, torch.minimum(rn[:, 0], rn[:, 0] ** 2 / gap0.clamp(min=1e-300)), rn[:, 0])
            ok &= (err0 <= value_tol * th[:, 0].abs()) | (rn[:, 0] <= abs_tol * anorm)
        done = ok if it < maxiter else torch.ones_like(ok)
        if bool(done.any()):
            g = active[done]
            out_theta[g], out_res[g], out_X[g] = th[done], rn[done], X[done]
            iters[g] = it
            conv[g] = ok[done]
            keep = ~done
            if not bool(keep.any()):
                break
            active, pos = active[keep], pos[keep]
            X, AX, R, theta = X[keep], AX[keep], R[keep], theta[keep]
            if P is not None:
                P, AP = P[keep], AP[keep]
            if 2 * active.numel() <= op_items.numel():
                op = full_op.subset(active)
                op_items, pos = active, torch.arange(active.numel(), device=X.device)
        Rw = R[..., :kw]
        blocks = [Rw]
        if zd_precond:
            blocks.append(_apply_at(op, pos, Rw, precondition=True))
        bases = [X] if P is None else [X, P]
        W = _orth_against(torch.cat(blocks, dim=-1), bases, gen)
        AW = _apply_at(op, pos, W)
        S = torch.cat([X, W] + ([P] if P is not None else []), dim=-1)
        AS = torch.cat([AX, AW] + ([AP] if AP is not None else []), dim=-1)
        del R, W, AW
        theta, Cx, Cp = _rayleigh_ritz(S, AS, k)
        X, AX, P, AP = _mm(S, Cx), _mm(AS, Cx), _mm(S, Cp), _mm(AS, Cp)
        del S, AS
    return _EigResult(out_theta, out_X, out_res, iters, conv)


def _apply_at(op: _Operator, pos: torch.Tensor, W: torch.Tensor, precondition: bool = False) -> torch.Tensor:
    """``op`` (or its preconditioner ``Zd``) applied to the items ``pos`` of its stack: the other items
    get zero blocks (never more than the active ones: the operator is restricted to the active items
    once half of them are done), which costs flops but no copy of the factors."""
    fn = op.zd_mul if precondition else op
    nstack = len(op)
    if pos.numel() == nstack:
        return fn(W)
    Wf = W.new_zeros((nstack,) + tuple(W.shape[1:]))
    Wf[pos] = W
    return fn(Wf)[pos]


# --------------------------------------------------------------------------------------------------
# One stack of same-shape modules


@dataclass
class _StackSolution:
    A: torch.Tensor  # [b, d_in, r] orthonormal Ritz vectors
    theta: torch.Tensor  # [b, >= r+1] float64 smallest eigenvalues of M' (ascending)
    res: torch.Tensor  # [b] float64 max_k<r ||M' a_k - theta_k a_k||
    anorm: torch.Tensor  # [b] float64 estimate of ||M'||
    sigma2: torch.Tensor  # [b] float64 ||D||_2^2
    solver: List[str]
    notes: List[List[str]]


def _zinv_norm(L: torch.Tensor, Linv: Optional[torch.Tensor], gen: torch.Generator, iters: int = 4) -> torch.Tensor:
    """Estimate of ``||Zd^{-1}||`` per factor of the stack ``L`` (block power iteration with a
    Rayleigh-Ritz step: a lower bound within a few percent; it only scales the stopping rule, the
    preconditioning decision and the reports)."""
    Lf = None if Linv is not None else L
    X = torch.randn(L.shape[0], L.shape[-1], 2, generator=gen, dtype=L.dtype, device=L.device)
    for _ in range(iters):
        X = _orthonormalize(_zinv(Lf, Linv, X))
    theta, _, _ = _rayleigh_ritz(X, _zinv(Lf, Linv, X))
    return theta[:, -1].clamp(min=0)


def _solve_dense(op: _Operator, alpha: float, bprime: Optional[torch.Tensor], r: int, k: int,
                 L: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense float64 solve of a stack: ``(A, theta[:k], res, anorm, sigma2)``; ``L``: float64 factors
    (default: the operator's, upcast)."""
    L = op.L.double() if L is None else L
    D = -torch.cholesky_solve(op.G.double().transpose(-1, -2) * op.u.double()[:, None, :], L)
    DDt = D @ D.transpose(-1, -2)
    if D.shape[-1] < D.shape[-2]:
        sigma2 = torch.linalg.eigvalsh(D.transpose(-1, -2) @ D)[:, -1]
    else:
        sigma2 = torch.linalg.eigvalsh(0.5 * (DDt + DDt.transpose(-1, -2)))[:, -1]
    M = -alpha * DDt
    if bprime is not None:
        M = M + bprime.double()[:, None, None] * torch.cholesky_inverse(L)
    M = 0.5 * (M + M.transpose(-1, -2))
    w, V = torch.linalg.eigh(M)
    A = V[..., :r]
    res = torch.linalg.vector_norm(M @ A - A * w[:, None, :r], dim=-2).amax(-1)
    anorm = w.abs().amax(-1)
    kk = min(k, w.shape[-1])
    return A, w[:, :kk], res, anorm, sigma2


def _wide_blocks_free(op: "_Operator") -> bool:
    """On a GPU an apply to 16 columns costs what one to 8 does (reading L^{-1} and G dominates): expand
    every residual column; on CPU the cost is per column: expand the wanted ones only."""
    return op.G.device.type != "cpu"


def _solve_stack(op: _Operator, alpha: float, bprime: Optional[torch.Tensor], r: int,
                 opt: BatchedOptions, gen: torch.Generator, zinv_norm: Optional[torch.Tensor] = None,
                 exact_factors=None) -> _StackSolution:
    """Ritz vectors, eigenvalues, residuals and ``sigma^2`` of a stack; ``exact_factors(positions)``
    gives float64 Cholesky factors for the dense fallback when the working dtype is float32."""
    b, d_out, n = op.G.shape
    extra = opt.extra if opt.extra is not None else max(r, 8)
    k = r + extra
    dt = op.G.dtype
    notes: List[List[str]] = [[] for _ in range(b)]
    if n <= opt.dense_below or n < 5 * k:
        A, theta, res, anorm, sigma2 = _solve_dense(op, alpha, bprime, r, r + 1)
        return _StackSolution(A.to(dt), theta, res, anorm, sigma2, [SOLVER_DENSE] * b, notes)

    eps = torch.finfo(dt).eps
    abs_tol = 1e3 * eps if dt == torch.float64 else 20 * eps
    floor = None
    zd_precond = False
    Mop = op.with_coefficients(alpha, bprime)
    Omega = torch.randn(b, d_out, k, generator=gen, dtype=dt, device=op.G.device)
    X0 = _orth_against(op.d_mul(Omega), [], gen)
    del Omega
    AX0 = Mop(X0)
    if bprime is not None:
        # ||M'|| <= alpha sigma^2 + beta' ||Zd^{-1}||: the variance term can dominate the spectrum
        # (large beta, tiny N): then the plain residual is a poor search direction and Zd R is added.
        floor = bprime.double() * zinv_norm
        theta0, _, _ = _rayleigh_ritz(X0, AX0)
        zd_precond = bool((floor > 0.1 * theta0[:, 0].abs()).any())
    value_tol = SIGMA2_TOL if bprime is None else None  # beta = 0: theta_0 = -alpha sigma^2 is needed exactly
    # Past the flops of a dense solve (forming M' ~ 2 n^2 d_out, eigh ~ 10 n^3) iterating is a loss:
    # such hard cases (wanted eigenvalues inside a spectrum spread by the variance term) go dense.
    expand_all = opt.expand_all if opt.expand_all is not None else _wide_blocks_free(op)
    per_iter = (2 if zd_precond else 1) * k * (4 * n * n + 4 * n * d_out) + 8 * n * (3 * k) ** 2
    # (on a GPU an iteration is cheap next to a large dense eigh: iterate longer there)
    on_gpu = op.G.device.type == "cuda"
    cap = opt.maxiter if opt.maxiter is not None else (500 if on_gpu else 150)
    maxiter = cap if on_gpu else int(min(cap, max(30, (2 * n * n * d_out + 10 * n ** 3) / per_iter)))
    eig = lobpcg_batched(Mop, X0, r, gen=gen, tol=opt.tol, abs_tol=abs_tol, maxiter=maxiter,
                         value_tol=value_tol, anorm_floor=floor, zd_precond=zd_precond, AX=AX0,
                         wcols=k if expand_all else r)
    del X0, AX0
    if log.isEnabledFor(logging.DEBUG):  # (reading the counts waits for the GPU)
        log.debug("stack %s x %s x %s: M' solve %s iterations (zd_precond=%s)", b, n, d_out,
                  eig.iters.tolist(), zd_precond)
    theta = eig.theta
    anorm = torch.maximum(theta.abs().amax(-1), floor if floor is not None else torch.zeros_like(theta[:, 0]))
    A = eig.X[..., :r]
    res = eig.res[:, :r].amax(-1)
    solver = [SOLVER_ITERATIVE] * b
    if bprime is None:
        sigma2 = -theta[:, 0] / alpha
    else:
        # sigma^2 = largest eigenvalue of D D^T: start from M''s Ritz vectors (nearly D's top singular
        # vectors whenever the bias term matters), stop when the top Ritz value is exact to SIGMA2_TOL
        # (the vector itself is not used: no condition on it).
        sop = op.with_coefficients(1.0, None)
        ev = lobpcg_batched(sop, eig.X[..., :min(k, 4)], 1, gen=gen, tol=None, abs_tol=abs_tol,
                            maxiter=cap, value_tol=SIGMA2_TOL, wcols=2)
        sigma2 = -ev.theta[:, 0]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("stack %s x %s x %s: sigma solve %s iterations", b, n, d_out, ev.iters.tolist())
        eig_conv = eig.converged & ev.converged
        del ev
        eig = replace(eig, converged=eig_conv)
    bad = torch.nonzero(~eig.converged).flatten()
    if bad.numel():
        sub = op.subset(bad)
        L64 = exact_factors(bad) if exact_factors is not None and dt != torch.float64 else None
        Ad, thd, resd, anormd, s2d = _solve_dense(sub, alpha, None if bprime is None else bprime[bad], r, k, L64)
        A = A.clone()
        A[bad] = Ad.to(dt)
        kk = thd.shape[-1]
        theta = theta.clone()
        theta[bad, :kk] = thd
        res, anorm, sigma2 = res.clone(), anorm.clone(), sigma2.clone()
        res[bad], anorm[bad], sigma2[bad] = resd, anormd, s2d
        for i, it in zip(bad.tolist(), eig.iters[bad].tolist()):
            solver[i] = SOLVER_FALLBACK
            notes[i].append(f"LOBPCG did not converge in {it} iterations: dense float64 eigendecomposition")
    return _StackSolution(A, theta, res, anorm, sigma2, solver, notes)


# --------------------------------------------------------------------------------------------------
# Driver


@dataclass
class _Module:
    name: str
    group: str
    lam_y: float
    u: torch.Tensor  # [d_out] float64 on the solve device


def _group_bytes(stats: FisherStatistics, names: Sequence[str], d_in: int, k: int, itemsize: int,
                 explicit_inverse: bool) -> int:
    """Working memory of one group: its symmetrised ``Z`` and ``L`` (and ``L^{-1}``), and per module a
    copy of ``L`` (or of ``L^{-1}``) in its stack, ``G`` in the working dtype and the iteration blocks."""
    per_group = (3 if explicit_inverse else 2) * d_in * d_in
    per_mod = sum(d_in * d_in + stats.modules[m].d_out * d_in
                  + 24 * (d_in + stats.modules[m].d_out) * k for m in names)
    return itemsize * (per_group + per_mod)


def _plan_chunks(stats: FisherStatistics, groups: Dict[str, List[str]], budget: int, k: int, itemsize: int,
                 explicit_inverse: bool) -> List[List[str]]:
    """Chunks of groups (same ``d_in`` first, in statistics order) whose working memory fits ``budget``."""
    order: Dict[int, List[str]] = {}
    for g, names in groups.items():
        if names:
            order.setdefault(stats.z_dim(g), []).append(g)
    chunks: List[List[str]] = []
    for d_in, gs in order.items():
        cur, used = [], 0
        for g in gs:
            nb = _group_bytes(stats, groups[g], d_in, k, itemsize, explicit_inverse)
            if cur and used + nb > budget:
                chunks.append(cur)
                cur, used = [], 0
            cur.append(g)
            used += nb
        if cur:
            chunks.append(cur)
    return chunks


def solve_batched(stats: FisherStatistics, cfg: LoraDAConfig, progress: bool = False,
                  options: Optional[BatchedOptions] = None, **kwargs) -> LoraDAResult:
    """LoRA-DA factors of every module of ``stats`` (same result as ``solve_reference`` to the accuracy
    contract), solved in stacks. ``options`` or keyword arguments: see :class:`BatchedOptions`."""
    opt = options if options is not None else BatchedOptions(**kwargs)
    if options is not None and kwargs:
        opt = replace(options, **kwargs)
    groups = stats.groups()
    first = next(iter(stats.Z.values()))
    device = torch.device(opt.device) if opt.device is not None else first.device
    dt = opt.dtype or (torch.float64 if _fast_fp64(device) else torch.float32)
    explicit_inverse = opt.apply == "inverse" or (opt.apply == "auto" and device.type == "cuda")
    budget = opt.max_batch_bytes or _default_budget(device)
    r = cfg.rank
    k = r + (opt.extra if opt.extra is not None else max(r, 8))
    itemsize = torch.finfo(dt).bits // 8
    chunks = _plan_chunks(stats, groups, budget, k, itemsize, explicit_inverse)
    # one random stream per chunk, drawn from the seed: the result does not depend on which worker
    # solves which chunk, or when
    seeds = torch.randint(0, 2 ** 62, (len(chunks),), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    threads = torch.get_num_threads()
    workers = 1
    if device.type == "cpu":
        workers = max(1, min(opt.workers if opt.workers is not None else threads, len(chunks)))

    factors: Dict[str, LoraFactors] = {}
    reports: Dict[str, ModuleReport] = {}

    def solve(i: int) -> int:
        gen = torch.Generator(device=device)
        gen.manual_seed(seeds[i])
        _solve_chunk(stats, cfg, groups, chunks[i], device, dt, explicit_inverse, opt, gen, factors, reports)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return sum(len(groups[g]) for g in chunks[i])

    if device.type == "cpu" and (opt.num_threads is not None or workers > 1):
        # several workers: one intra-op thread each (narrow products gain little from more threads,
        # independent chunks gain all of them), unless num_threads says otherwise
        torch.set_num_threads(opt.num_threads or 1)
    bar = tqdm(total=len(stats.modules), desc="solve (batched)", unit="module", disable=not progress)
    try:
        if workers == 1:
            for i in range(len(chunks)):
                bar.update(solve(i))
        else:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-da-solve")
            try:
                for fut in as_completed([pool.submit(solve, i) for i in range(len(chunks))]):
                    bar.update(fut.result())
            finally:  # on an error or Ctrl-C: no new chunk starts, the running ones finish
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return LoraDAResult({n: factors[n] for n in stats.modules}, {n: reports[n] for n in stats.modules})


def _sym_stack(stats: FisherStatistics, chunk: List[str], dt: torch.dtype, device: torch.device) -> torch.Tensor:
    """The dense symmetric ``Z_g`` of the groups of ``chunk``, stacked: each expanded from its packed
    triangle straight into the stack (``FisherStatistics.dense_Z``; exact in float64 from float32)."""
    d = stats.z_dim(chunk[0])
    Zs = torch.empty((len(chunk), d, d), dtype=dt, device=device)
    for i, g in enumerate(chunk):
        stats.dense_Z(g, out=Zs[i])
    return Zs


# float32 is used for a chunk only when every cond(Zd) * eps32 is at most this
FLOAT32_COND_EPS = 1e-4


def _precision_for(stats: FisherStatistics, chunk: List[str], cfg: LoraDAConfig, device: torch.device,
                   gen: torch.Generator) -> Tuple[torch.dtype, Optional[str]]:
    """Float32 when it is accurate enough for the chunk, else float64 with the reason. The error of a
    float32 solve grows like ``cond(Zd) * eps32`` (and a float32 Cholesky of a singular ``Z`` with the
    default damping fails, where float64 would not: raising the damping would change the answer)."""
    Zs = _sym_stack(stats, chunk, torch.float32, device)
    Zs.diagonal(dim1=-2, dim2=-1).add_(cfg.damping)
    L, info = _cholesky_ex(Zs)
    if bool((info != 0).any()) or not bool(torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all()):
        return torch.float64, "solved in float64: the float32 Cholesky factorisation of Zd failed"
    X = torch.randn(L.shape[0], L.shape[-1], 2, generator=gen, dtype=L.dtype, device=device)
    for _ in range(4):
        X = _orthonormalize(_mm(Zs, X))
    zmax = _rayleigh_ritz(X, _mm(Zs, X))[0][:, -1]
    cond = float((zmax * _zinv_norm(L, None, gen)).max())
    if cond * torch.finfo(torch.float32).eps > FLOAT32_COND_EPS:
        return torch.float64, f"solved in float64: cond(Zd) ~ {cond:.1e} is too large for float32"
    return torch.float32, None


def _solve_chunk(stats: FisherStatistics, cfg: LoraDAConfig, groups: Dict[str, List[str]], chunk: List[str],
                 device: torch.device, dt: torch.dtype, explicit_inverse: bool, opt: BatchedOptions,
                 gen: torch.Generator, factors: Dict[str, LoraFactors], reports: Dict[str, ModuleReport]) -> None:
    r = cfg.rank
    t: Dict[str, float] = {}
    chunk_notes: List[str] = []

    def shape(m: str) -> Tuple[int, int]:
        return stats.modules[m].d_in, stats.modules[m].d_out

    def key(m: str, g: str) -> Tuple[int, int, int]:  # a module's stack: its shape and how many share it
        return shape(m) + (sum(shape(x) == shape(m) for x in groups[g]),)

    # groups with the same modules next to each other (q/k/v groups, then o groups, ...): a stack's
    # factors are then a contiguous slice of the chunk's (see _Operator)
    chunk = sorted(chunk, key=lambda g: sorted(key(m, g) for m in groups[g]))
    # one Cholesky per group, stacked (every group of a chunk has the same d_in)
    with _phase("cholesky", device, t):
        if dt == torch.float32:
            dt, note = _precision_for(stats, chunk, cfg, device, gen)
            chunk_notes += [note] if note else []
        # the damping rule (steps.input_damping, float64, from the statistics alone), then the factors
        Zs = _sym_stack(stats, chunk, dt, device)
        chosen = input_damping(Zs, cfg.damping, cfg.max_damping, chunk)
        Zs.diagonal(dim1=-2, dim2=-1).add_(torch.tensor(chosen, dtype=dt, device=device)[:, None] - cfg.damping)
        L, more = cholesky_stack(Zs, cfg.damping, cfg.max_damping, chunk)
        lams = [c - cfg.damping + m for c, m in zip(chosen, more)]
    Linv = None
    with _phase("inverse", device, t):
        if explicit_inverse:
            Linv = _tril_inverse(L)
        znorm = _zinv_norm(L, Linv, gen) if cfg.beta > 0 else None
    mods: Dict[str, _Module] = {}
    with _phase("output factors", device, t):
        for g in chunk:
            for m in groups[g]:
                st = stats.modules[m]
                lam_y = output_damping(st, cfg)
                u = output_inverse(st, stats.num_examples, lam_y, stats.output_fisher).to(device)
                mods[m] = _Module(m, g, lam_y, u)
    # stacks of same-shape modules, split by how many modules of that shape their group has, so that
    # every factor of a stack serves the same number of its modules (q/k/v of a 7B model: one stack of
    # three per group, o_proj: one of one)
    gidx = {g: i for i, g in enumerate(chunk)}
    stacks: Dict[Tuple[int, int, int], List[str]] = {}
    for g in chunk:
        for m in groups[g]:
            stacks.setdefault(key(m, g), []).append(m)
    for names in stacks.values():
        with _phase("stacks", device, t):
            idx = torch.tensor([gidx[mods[m].group] for m in names], device=device)
            G = torch.empty((len(names),) + tuple(stats.modules[names[0]].G.shape), dtype=dt, device=device)
            for i, m in enumerate(names):
                G[i].copy_(stats.modules[m].G)
            u = torch.stack([mods[m].u for m in names]).to(dt)
            op = _Operator(L, idx, G, u, cfg.alpha, None, Linv)
            bprime = None
            if cfg.beta > 0:
                bprime = torch.stack([cfg.beta * mods[m].u.sum() / cfg.population_size for m in names])
        with _phase("eigensolver", device, t):
            def exact_factors(pos, idx=idx):
                gs = [chunk[i] for i in idx[pos].tolist()]
                Z64 = _sym_stack(stats, gs, torch.float64, device)
                Z64.diagonal(dim1=-2, dim2=-1).add_(torch.tensor([lams[gidx[g]] for g in gs], dtype=torch.float64,
                                                                 device=device)[:, None])
                return _cholesky_ex(Z64)[0]

            sol = _solve_stack(op, cfg.alpha, bprime, r, opt, gen, None if znorm is None else znorm[idx],
                               exact_factors)
        with _phase("factors", device, t):
            for n in sol.notes:
                n.extend(chunk_notes)
            _emit(stats, cfg, names, mods, op, sol, {g: lams[i] for g, i in gidx.items()}, factors, reports)
        del op, G, u, sol
    if t:
        log.debug("chunk of %d groups (d_in %d): %s", len(chunk), L.shape[-1],
                  ", ".join(f"{k} {v:.3f} s" for k, v in t.items()))


def _emit(stats: FisherStatistics, cfg: LoraDAConfig, names: List[str], mods: Dict[str, _Module], op: _Operator,
          sol: _StackSolution, lams: Dict[str, float], factors: Dict[str, LoraFactors],
          reports: Dict[str, ModuleReport]) -> None:
    """Factors ``lora_A = A0^T / sqrt(gamma)``, ``lora_B = D^T A0 / (sigma sqrt(gamma))`` and reports."""
    r = cfg.rank
    A0 = canonical_signs(sol.A)
    sigma = sol.sigma2.clamp(min=0).sqrt()
    if not bool(torch.isfinite(sigma).all()) or not bool((sigma > 0).all()):
        bad = names[int(torch.nonzero(~(torch.isfinite(sigma) & (sigma > 0)))[0])]
        raise NumericalError(f"the Fisher-gradient of module {bad} is zero or non-finite")
    scale = 1.0 / math.sqrt(cfg.gamma)
    B = op.dt_mul(A0).double() / sigma[:, None, None]  # [b, d_out, r] = B0^T
    lora_A = (A0.transpose(-1, -2).double() * scale).float()
    lora_B = (B * scale).float()
    # ||lora_B lora_A||_F^2 = tr((B^T B)(A A^T)) with r x r matrices
    Ad, Bd = lora_A.double(), lora_B.double()
    upd = torch.einsum("bij,bji->b", Bd.transpose(-1, -2) @ Bd, Ad @ Ad.transpose(-1, -2)).clamp(min=0).sqrt()
    s2 = sol.sigma2
    mnorm = (sol.anorm / s2).tolist()
    ev = (sol.theta / s2[:, None]).tolist()
    resid = (sol.res / sol.anorm.clamp(min=torch.finfo(torch.float64).tiny)).tolist()
    for i, m in enumerate(names):
        st = stats.modules[m]
        w = ev[i][: r + 1]
        gap = (w[r] - w[r - 1]) / mnorm[i] if len(w) > r and mnorm[i] > 0 else float("inf")
        notes = list(sol.notes[i])
        lam = lams[mods[m].group]
        if lam != cfg.damping:
            notes.append(damping_note(cfg.damping, lam))
        if gap < 1e-6:
            notes.append(f"ill-defined subspace: eigenvalues {r} and {r + 1} of M differ by {gap:.1e} of ||M||; "
                         "this subspace is one of a family of (nearly) equally good ones")
        out = st.G.device  # the factors live where the statistics do, whatever device solved them
        factors[m] = LoraFactors(lora_A[i].contiguous().to(out), lora_B[i].contiguous().to(out))
        reports[m] = ModuleReport(
            d_in=st.d_in, d_out=st.d_out, group=mods[m].group, damping=lam, output_damping=mods[m].lam_y,
            sigma=float(sigma[i]), eigenvalues=w, eigengap=gap, residual=resid[i], solver=sol.solver[i],
            update_norm=float(upd[i]), notes=notes)
