"""The eigen-solve of the batched solver (docs/algorithm.md, "Solve"): factorisations of ``Zd``, the
operator ``M' = -alpha D D^T + beta' Zd^{-1}`` applied to stacks of modules without forming ``D``, and a
block LOBPCG whose iterations stay on the stack's device.

Layout of the work on a stack of ``s`` same-shape modules (``n = d_in``):

- **Factors.** One Cholesky factor ``L`` per input group (``Zd = L L^T``) and, on the explicit path (GPU),
  ``Zd^{-1}`` itself (``spd_inverse``: a recursive blocked inverse, ``n^3 / 3`` for ``L^{-1}`` and
  ``n^3 / 3`` for ``L^{-T} L^{-1}``, where ``torch.cholesky_inverse`` on CUDA solves against the identity,
  ``2 n^3``). The stack holds the same number ``c`` of modules of each factor, in factor order: ``Zd^{-1}``
  is applied to the ``c`` modules' blocks side by side, each factor read once per product.
- **Operator.** ``M' W = Zd^{-1} (-a G^T diag(u^2) G (Zd^{-1} W) + b W)``: two products with ``Zd^{-1}``
  (GEMMs with the explicit inverse, or two triangular solves each) and two with ``G``. ``Zd^{-1} W`` is
  kept: ``D D^T W = (b Zd^{-1} W - M' W) / a`` gives ``sigma = ||D||_2`` with no further pass.
- **LOBPCG.** Basis ``[X, P, W]`` (``k``, ``kp`` and ``kw`` columns; ``[X, P, W, Zd W]`` when the variance
  term dominates), ``W`` the normalised residuals projected out of ``[X, P]`` once. Rayleigh-Ritz on the
  pencil ``(S^T M' S, S^T S)`` through a shifted Cholesky of the Gram matrix and one batched ``eigh`` on
  the device (one call for the whole stack while ``k + kp + kw <= 32``: cuSOLVER's batched Jacobi;
  torch loops over the stack above that size). ``P``, the part of the new Ritz vectors outside the old
  ``X``, is built and orthonormalised in coefficient space (Hetmaniuk-Lehoucq), so the basis stays
  well conditioned without a QR of the tall blocks.
- **One host synchronisation per iteration.** The residual norms and Ritz values are copied to the host
  without waiting (pinned memory on a GPU) before the ``eigh``, whose error check waits for the device:
  after it the host holds them and decides which modules have converged. A converged module is
  recorded, keeps iterating while other modules share its factor, and leaves the stack (with its
  factor) when the active factors are few enough to be worth a copy.

Stopping rule, per module: the Davis-Kahan bound ``||R_r||_F / (theta_{r+1} - theta_r - ||r_{r+1}||)`` on
the sine of the subspace angle below ``tol``, or the residual at rounding level.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch


# relative accuracy of sigma^2 = ||D||_2^2 (Kato-Temple bound): lora_B is divided by sigma, so half of
# this is the relative error it adds to lora_B @ lora_A (the contract allows 1e-4: 200x margin)
SIGMA2_TOL = 1e-6

# the Rayleigh-Ritz basis that torch's CUDA eigh solves for a whole stack in one call (batched Jacobi)
RR_BATCHED_MAX = 32

# Relative Cholesky shift of the Gram matrices of the Rayleigh-Ritz step, per working dtype: directions of
# the basis independent of the others by less than sqrt(shift) (relative) are damped instead of
# amplifying the rounding noise of the blocks; the Ritz pairs move by about the shift (relative), far
# below the stopping rule in float64, at the rounding level in float32.
GRAM_SHIFT = {torch.float64: 1e-14, torch.float32: 1e-6}


def gpu_style(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where the GPU choices apply (explicit blocked inverse, per-item factorisation of
    large matrices, plain GEMM orientation). Tests patch it to run those choices on the CPU."""
    return t.device.type == "cuda"


def _tiny(dtype: torch.dtype) -> float:
    return 1e-200 if dtype == torch.float64 else 1e-30


def _mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` for a tall ``A`` and a narrow ``B``. On CPU computed as ``(B^T A^T)^T``: MKL's batched
    GEMM runs 2-4x faster with the long dimension as the column count (measured, float64)."""
    if gpu_style(A):
        return A @ B
    return (B.transpose(-1, -2) @ A.transpose(-1, -2)).transpose(-1, -2)


def _mm_into(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``A @ B`` written into ``out`` (a column slice of a basis buffer) when given."""
    if out is None:
        return _mm(A, B)
    if gpu_style(A):
        return torch.matmul(A, B, out=out)
    return out.copy_(_mm(A, B))


# --------------------------------------------------------------------------------------------------
# Factorisation


def _per_item(A: torch.Tensor) -> bool:
    """Large matrices on a GPU are factorised one at a time: the batched cuSOLVER/cuBLAS routines are
    made for many small matrices."""
    return gpu_style(A) and A.shape[0] > 1 and A.shape[-1] > 256


def cholesky_ex(Z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if not _per_item(Z):
        return torch.linalg.cholesky_ex(Z)
    L = torch.empty_like(Z)
    infos = []
    for i in range(Z.shape[0]):
        Li, info = torch.linalg.cholesky_ex(Z[i])
        L[i] = Li
        infos.append(info)
    return L, torch.stack(infos)


# below this size the blocked inverse uses one library call per block (its extra flops are negligible)
_INVERSE_LEAF = 128


def _split(n: int) -> int:
    """Where a blocked recursion splits ``n``: near the middle, on a multiple of 64 when possible."""
    h = n // 2
    return h - h % 64 if h > 64 else h


def _trsm(A: torch.Tensor, B: torch.Tensor, upper: bool, left: bool = True) -> torch.Tensor:
    """``torch.linalg.solve_triangular`` for the blocked inverse. On a GPU, stacks of more than 8 large
    triangles are solved one at a time: torch sends such stacks to batched cuBLAS/MAGMA kernels made for
    small matrices, where one large solve per item runs at GEMM speed."""
    if gpu_style(A) and A.dim() == 3 and A.shape[0] > 8 and A.shape[-1] > 512:
        return torch.stack([torch.linalg.solve_triangular(A[i], B[i], upper=upper, left=left)
                            for i in range(A.shape[0])])
    return torch.linalg.solve_triangular(A, B, upper=upper, left=left)


def _tri_inverse_into(L: torch.Tensor, out: torch.Tensor) -> None:
    """``out = L^{-1}`` (lower triangular, ``n^3 / 3`` flops): ``[[A, 0], [C, B]]^{-1}`` has the blocks
    ``A^{-1}``, ``B^{-1}`` (recursively) and ``-B^{-1} C A^{-1}`` (two triangular solves)."""
    n = L.shape[-1]
    if n <= _INVERSE_LEAF:
        eye = torch.eye(n, dtype=L.dtype, device=L.device).expand_as(L)
        out.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return
    h = _split(n)
    A, C, B = L[..., :h, :h], L[..., h:, :h], L[..., h:, h:]
    _tri_inverse_into(A, out[..., :h, :h])
    _tri_inverse_into(B, out[..., h:, h:])
    T = _trsm(A, C, upper=False, left=False)  # C A^{-1}
    out[..., h:, :h] = _trsm(B, T, upper=False).neg_()
    out[..., :h, h:].zero_()


def _syrk(Q: torch.Tensor) -> torch.Tensor:
    """``Q^T Q`` computing each off-diagonal block once (half the flops of one GEMM, recursively)."""
    c = Q.shape[-1]
    if c <= _INVERSE_LEAF:
        return Q.transpose(-1, -2) @ Q
    h = _split(c)
    out = Q.new_empty(Q.shape[:-2] + (c, c))
    out[..., :h, :h] = _syrk(Q[..., :h])
    out[..., h:, h:] = _syrk(Q[..., h:])
    X = Q[..., h:].transpose(-1, -2) @ Q[..., :h]
    out[..., h:, :h] = X
    out[..., :h, h:] = X.transpose(-1, -2)
    return out


def _lauum_into(Li: torch.Tensor, L: torch.Tensor, out: torch.Tensor) -> None:
    """``out = Li^T Li`` for ``Li = L^{-1}`` (symmetric, ``n^3 / 3`` flops): with ``Li = [[P, 0], [Q, R]]``
    the blocks are ``P^T P + Q^T Q``, ``R^T Q = B^{-T} Q`` (a triangular solve) and ``R^T R``."""
    n = Li.shape[-1]
    if n <= _INVERSE_LEAF:
        out.copy_(Li.transpose(-1, -2) @ Li)
        return
    h = _split(n)
    P, Q, R = Li[..., :h, :h], Li[..., h:, :h], Li[..., h:, h:]
    _lauum_into(R, L[..., h:, h:], out[..., h:, h:])
    X = _trsm(L[..., h:, h:].transpose(-1, -2), Q, upper=True)  # R^T Q
    out[..., h:, :h] = X
    out[..., :h, h:] = X.transpose(-1, -2)
    _lauum_into(P, L[..., :h, :h], out[..., :h, :h])
    out[..., :h, :h] += _syrk(Q)


def spd_inverse(L: torch.Tensor) -> torch.Tensor:
    """``Zd^{-1} = L^{-T} L^{-1}`` (symmetric, full) from the Cholesky factors ``L`` (``[g, n, n]``).

    CPU: LAPACK's ``potri`` (``torch.cholesky_inverse``, ``2 n^3 / 3`` flops). GPU: the blocked recursion
    of ``_tri_inverse_into`` and ``_lauum_into`` (``2 n^3 / 3`` flops in large triangular solves and
    GEMMs), where ``torch.cholesky_inverse`` would solve against the identity (``2 n^3``)."""
    if not gpu_style(L):
        return torch.cholesky_inverse(L)
    Li = torch.empty_like(L)
    _tri_inverse_into(L, Li)
    out = torch.empty_like(L)
    _lauum_into(Li, L, out)
    return out


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
    ``None``; ``Zinvsrc``: the explicit ``Zd^{-1}`` per factor (GEMMs) or ``None`` (triangular solves).

    When the stack holds the same number ``c`` of modules of every factor, in factor order, ``Zd^{-1}`` is
    applied to the ``c`` modules' columns side by side with the chunk's factors themselves: no per-module
    copy, each factor read once per product. Otherwise (a subset for the dense fallback or the sigma
    refinement) the factors are gathered per module.

    ``passes`` (host array over the stack's items, shared with subsets through ``items``) counts the
    operator passes each module cost, in units of one application of ``A`` (its bytes: two reads of its
    share of the factor, two of ``G``); diagnostics only.
    """

    def __init__(self, Lsrc: torch.Tensor, idx: torch.Tensor, G: torch.Tensor, u: torch.Tensor, a: float,
                 b: Optional[torch.Tensor], Zinvsrc: Optional[torch.Tensor],
                 items: Optional[np.ndarray] = None, passes: Optional[np.ndarray] = None):
        self.Lsrc, self.Zinvsrc, self.idx = Lsrc, Zinvsrc, idx
        self.G, self.u, self.a, self.b = G, u, a, b
        self.ua = (u * u * (-a))[..., None] if a != 0 else None  # [s, d_out, 1]
        self.bw = None if b is None else b.to(G.dtype)[:, None, None]
        self.per_factor, self._sel = _factor_runs(idx)
        self._fL = self._fZ = self._L = None
        s = G.shape[0]
        self.items = np.arange(s) if items is None else items
        self.passes = np.zeros(s) if passes is None else passes
        n, d_out = G.shape[-1], G.shape[-2]
        share = n * n / max(1, self.per_factor)  # factor elements read per module and product
        self._w_zinv = share / (2 * share + 2 * n * d_out)  # one product with Zd^{-1}, as a fraction of A

    def __len__(self) -> int:
        return self.G.shape[0]

    def _count(self, w: float) -> None:
        self.passes[self.items] += w

    def _factors(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The distinct factors of the stack, in order (a view of the chunk's when they are consecutive)."""
        if self._fL is None and self._fZ is None:
            self._fL = None if self.Lsrc is None else self.Lsrc[self._sel]
            self._fZ = None if self.Zinvsrc is None else self.Zinvsrc[self._sel]
        return self._fL, self._fZ

    @property
    def L(self) -> torch.Tensor:
        """The stack's factors, one per module (gathered on first use: the dense fallback)."""
        if self._L is None:
            self._L = self._factors()[0] if self.per_factor == 1 else self.Lsrc[self.idx]
        return self._L

    def subset(self, pos: torch.Tensor) -> "_Operator":
        """The operator on the items ``pos`` of this stack (factors gathered per module when ``pos`` breaks
        the factor runs)."""
        hpos = pos.cpu().numpy()
        return _Operator(self.Lsrc, self.idx[pos], self.G[pos], self.u[pos], self.a,
                         None if self.b is None else self.b[pos], self.Zinvsrc, self.items[hpos], self.passes)

    def compact(self, pos: torch.Tensor, with_L: bool = True) -> "_Operator":
        """The operator on the items ``pos``, which must be all the items of some of its factors: those
        factors (and ``G``) are copied, so that the dropped ones stop costing bytes (``L`` only if
        ``with_L`` or there is no explicit inverse: the iterations need nothing else)."""
        if self.per_factor == 0:
            return self.subset(pos)
        fpos = self.idx[pos[:: self.per_factor]]
        Zsrc = None if self.Zinvsrc is None else self.Zinvsrc[fpos]
        Lsrc = self.Lsrc[fpos] if with_L or Zsrc is None else None
        c = self.per_factor
        idx = torch.arange(fpos.numel(), device=pos.device).repeat_interleave(c)
        hpos = pos.cpu().numpy()
        return _Operator(Lsrc, idx, self.G[pos], self.u[pos], self.a, None if self.b is None else self.b[pos],
                         Zsrc, self.items[hpos], self.passes)

    def with_coefficients(self, a: float, b: Optional[torch.Tensor]) -> "_Operator":
        op = _Operator(self.Lsrc, self.idx, self.G, self.u, a, b, self.Zinvsrc, self.items, self.passes)
        op._fL, op._fZ, op._L = self._fL, self._fZ, self._L
        return op

    def _side_by_side(self, X: torch.Tensor, fn, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``fn(Xg, out)`` per factor with the ``c`` modules' columns side by side (``[f, n, c*m]``); the
        result in ``out`` if given."""
        c = self.per_factor
        s, n, m = X.shape
        if c == 1:
            return fn(X, out)
        Xg = X.reshape(-1, c, n, m).transpose(1, 2).reshape(-1, n, c * m)
        Yg = fn(Xg, None).reshape(-1, n, c, m).transpose(1, 2)
        if out is None:
            return Yg.reshape(s, n, m)
        out.view(-1, c, n, m).copy_(Yg)
        return out

    def zinv(self, X: torch.Tensor, count: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``Zd^{-1} X`` (into ``out`` if given): ``Zinv @ X`` with the explicit inverse, else two triangular
        solves with ``L`` (not ``cholesky_solve``: it copies ``L`` into column-major order on every call)."""
        if count:
            self._count(self._w_zinv)
        if self.per_factor:
            L, Zi = self._factors()
        elif self.Zinvsrc is not None:
            L, Zi = None, self.Zinvsrc[self.idx]
        else:
            L, Zi = self.L, None
        if Zi is not None:
            fn = lambda Y, o: _mm_into(Zi, Y, o)  # noqa: E731
        else:
            def fn(Y, o):
                Y = torch.linalg.solve_triangular(L, Y, upper=False)
                Y = torch.linalg.solve_triangular(L.transpose(-1, -2), Y, upper=True)
                return Y if o is None else o.copy_(Y)
        return self._side_by_side(X, fn, out) if self.per_factor else fn(X, out)

    def zd_mul(self, X: torch.Tensor) -> torch.Tensor:
        """``Zd X = L (L^T X)`` (the preconditioner of the variance-dominated case)."""
        self._count(2 * self._w_zinv)
        if self.per_factor:
            L = self._factors()[0]
            return self._side_by_side(X, lambda Y, o: _mm(L, _mm(L.transpose(-1, -2), Y)))
        return _mm(self.L, _mm(self.L.transpose(-1, -2), X))

    def d_mul(self, X: torch.Tensor) -> torch.Tensor:
        """``D X = -Zd^{-1} G^T (u * X)`` (``X``: ``[s, d_out, m]``)."""
        self._count(0.5 - self._w_zinv)
        return -self.zinv(_mm(self.G.transpose(-1, -2), self.u[..., None] * X))

    def dt_mul(self, X: torch.Tensor) -> torch.Tensor:
        """``D^T X = -u * (G Zd^{-1} X)`` (``X``: ``[s, n, m]``)."""
        self._count(0.5 - self._w_zinv)
        return -self.u[..., None] * _mm(self.G, self.zinv(X))

    def apply(self, X: torch.Tensor, out: Optional[torch.Tensor] = None, yout: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(A X, Zd^{-1} X)``, written into ``out`` and ``yout`` when given."""
        self._count(1.0 - 2 * self._w_zinv)
        Y = self.zinv(X, out=yout)
        if self.ua is not None:
            V = _mm(self.G.transpose(-1, -2), _mm(self.G, Y) * self.ua)
            if self.bw is not None:
                V = V.addcmul_(self.bw, X)
        else:
            V = X * self.bw
        return self.zinv(V, out=out), Y

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        return self.apply(X)[0]


# --------------------------------------------------------------------------------------------------
# Small helpers of the setup (not of the iterations: these may wait for the device)


def _project_out(W: torch.Tensor, bases: Sequence[torch.Tensor], passes: int = 1) -> torch.Tensor:
    for _ in range(passes):
        for B in bases:
            W = W - _mm(B, B.transpose(-1, -2) @ W)
    return W


def orthonormalize(W: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``W`` (``[b, n, m]``, full column rank). CPU: Householder QR.
    GPU: CholeskyQR2 with a float64 Gram matrix (two GEMMs and an ``m x m`` factorisation: batched
    Householder QR of tall thin blocks is a loop of latency-bound calls there), Householder QR if the
    Gram matrix is not numerically definite."""
    if not gpu_style(W):
        return torch.linalg.qr(W)[0]
    for _ in range(2):
        Gm = W.transpose(-1, -2).double() @ W.double()
        R, info = torch.linalg.cholesky_ex(Gm, upper=True)
        if bool((info != 0).any()):
            return torch.linalg.qr(W)[0]
        W = torch.linalg.solve_triangular(R.to(W.dtype), W, upper=True, left=False)
    return W


def orth_against(W: torch.Tensor, bases: Sequence[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Orthonormal columns spanning ``W`` projected out of the orthonormal ``bases``. Columns that vanish
    (an exact eigenvector's residual, a rank-deficient start) are replaced by random directions, so that
    the block keeps its shape and the Rayleigh-Ritz basis stays well conditioned."""
    W = _project_out(W, bases, passes=1)
    norms = torch.linalg.vector_norm(W, dim=-2)
    bad = ~(norms > _tiny(W.dtype)) | ~torch.isfinite(norms)
    if bool(bad.any()):
        rnd = torch.randn(W.shape, generator=gen, dtype=W.dtype, device=W.device)
        W = torch.where(bad[:, None, :], _project_out(rnd, bases, passes=2), torch.nan_to_num(W))
    W = W / torch.linalg.vector_norm(W, dim=-2, keepdim=True)
    Q = orthonormalize(W)
    if bases:  # "twice is enough" (Kahan-Parlett): a second projection after the normalisation
        Q = orthonormalize(_project_out(Q, bases, passes=1))
    return Q


def rayleigh_ritz_small(S: torch.Tensor, AS: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ritz values (ascending, float64) and coefficients of an orthonormal ``S`` (setup use)."""
    H = S.transpose(-1, -2).double() @ AS.double()
    theta, V = torch.linalg.eigh(0.5 * (H + H.transpose(-1, -2)))
    return theta, V.to(S.dtype)


def zinv_norm(L: torch.Tensor, Zinv: Optional[torch.Tensor], gen: torch.Generator, iters: int = 4) -> torch.Tensor:
    """Estimate of ``||Zd^{-1}||`` per factor: with the explicit inverse its largest diagonal entry (a
    lower bound within a factor ``n``, free); else a block power iteration with a Rayleigh-Ritz step on
    the triangular factors ``L`` (a lower bound within a few percent). It only scales the stopping rule,
    the preconditioning decision and the reports."""
    if Zinv is not None:
        return Zinv.diagonal(dim1=-2, dim2=-1).amax(-1).double()

    def zi(X):
        Y = torch.linalg.solve_triangular(L, X, upper=False)
        return torch.linalg.solve_triangular(L.transpose(-1, -2), Y, upper=True)

    X = torch.randn(L.shape[0], L.shape[-1], 2, generator=gen, dtype=L.dtype, device=L.device)
    for _ in range(iters):
        X = orthonormalize(zi(X))
    theta, _ = rayleigh_ritz_small(X, zi(X))
    return theta[:, -1].clamp(min=0)


# --------------------------------------------------------------------------------------------------
# Batched LOBPCG


def _eigh_small(At: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of a stack of small symmetric matrices (lower triangles), waiting for the device once.

    Up to ``RR_BATCHED_MAX`` columns, or off a GPU: ``torch.linalg.eigh`` where the matrices are (one
    batched cuSOLVER call on a GPU; its error check is the wait). Wider on a GPU, where torch would loop
    over the stack with one cuSOLVER call per matrix: on the host, the stack split over torch's CPU
    threads (one copy each way; host time grows with the stack over the cores)."""
    m = At.shape[-1]
    if not gpu_style(At) or m <= RR_BATCHED_MAX:
        return torch.linalg.eigh(At)
    host = At.cpu()
    parts = min(host.shape[0], max(1, torch.get_num_threads()))
    if parts <= 1:
        theta, V = torch.linalg.eigh(host)
    else:
        chunks = torch.tensor_split(host, parts)
        with ThreadPoolExecutor(max_workers=parts) as pool:
            out = list(pool.map(torch.linalg.eigh, chunks))
        theta, V = torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    return theta.to(At.device, non_blocking=True), V.to(At.device, non_blocking=True)


def _rayleigh_ritz(GA: torch.Tensor, GB: torch.Tensor, k: int, kp: int, dt: torch.dtype
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz on the pencil ``(GA, GB)`` (``[b, m, m]`` Gram matrices of a basis ``S = [X, ...]``
    with unit columns, the first ``k`` of them the current ``X``), in float64 on the device.

    Returns the Ritz values (``[b, m]``, ascending) and the coefficients ``[Cx, Cp]`` (``[b, m, k + kp]``,
    in ``dt``): ``S Cx`` are the ``k`` lowest Ritz vectors (orthonormal) and ``S Cp`` the next LOBPCG
    direction ``P``: the part of the first ``kp`` Ritz vectors outside the old ``X``, orthogonal to
    ``S Cx``. In the whitened frame ``Q = S Lb^{-T}`` (``GB = Lb Lb^T``) the old ``X`` spans
    the first ``k`` coordinates (``Lb`` is triangular), so that part is the Ritz vectors' other rows.
    The shifts of the Gram matrices' diagonals are relative, so that nothing depends on the scale of the
    columns (Cholesky factorisations and the products ``S C`` are insensitive to it): the residual
    columns need no normalisation. A column exactly zero (an exact eigenvector's residual) breaks the
    factorisation: NaN for that item, which the host then finds broken and has solved densely."""
    GA, GB = GA.double(), GB.double()
    GB.diagonal(dim1=-2, dim2=-1).mul_(1 + GRAM_SHIFT[dt])
    Lb, _ = torch.linalg.cholesky_ex(GB)
    At = torch.linalg.solve_triangular(Lb, GA, upper=False)
    At = torch.linalg.solve_triangular(Lb, At.transpose(-1, -2), upper=False)  # Lb^-1 GA Lb^-T
    # (a broken item's NaN must not fail the whole stack's eigh: it is caught on the host, solved densely)
    theta, V = _eigh_small(At.nan_to_num_())  # (lower triangle; waits for the device: the one sync)
    Cw = V[..., :k]
    if kp:
        # P: the rows of the first kp Ritz vectors outside the old X, projected out of the new X (onto the
        # other Ritz vectors V_r): V_r T with T = V_r^T [0; V[k:, :kp]], orthonormalised (Cholesky QR of T,
        # shifted: a rank-deficient T gives short columns, not a breakdown). Unit, orthogonal P columns
        # keep the next Gram matrix well conditioned (without it the iteration diverges once the
        # residuals reach rounding level).
        Vr = V[..., k:]
        T = Vr[..., k:, :].transpose(-1, -2) @ V[..., k:, :kp]  # [m - k, kp]
        TT = T.transpose(-1, -2) @ T
        TT.diagonal(dim1=-2, dim2=-1).mul_(1 + GRAM_SHIFT[dt])  # (relative: short columns stay independent)
        Rt, _ = torch.linalg.cholesky_ex(TT, upper=True)
        Cw = torch.cat([Cw, Vr @ torch.linalg.solve_triangular(Rt, T, upper=True, left=False)], dim=-1)
    C = torch.linalg.solve_triangular(Lb.transpose(-1, -2), Cw, upper=True)
    return theta, C.to(dt)


@dataclass
class EigResult:
    theta: torch.Tensor  # [b, k] float64 (host), ascending Ritz values
    X: torch.Tensor  # [b, n, k] Ritz vectors (working dtype, device)
    S: Optional[torch.Tensor]  # [b, n, k + kp] the basis [X, P] when the item stopped (when track=True)
    AS: Optional[torch.Tensor]  # [b, n, k + kp] op(S)
    YS: Optional[torch.Tensor]  # [b, n, k + kp] Zd^{-1} S
    ncols: Optional[torch.Tensor]  # [b] columns of S that are set (k when the item stopped at once)
    res: torch.Tensor  # [b, k] float64 (host) residual norms
    anorm: torch.Tensor  # [b] float64 (host) estimate of ||A||
    iters: torch.Tensor  # [b] int64 (host)
    converged: torch.Tensor  # [b] bool (host)


def _criterion(th: np.ndarray, rn: np.ndarray, anorm: np.ndarray, nwant: int, tol: Optional[float],
               abs_tol: float, value_tol: Optional[float]) -> np.ndarray:
    """The stopping rule (host, on the copied Ritz values and residual norms)."""
    k = th.shape[1]
    rw = np.sqrt((rn[:, :nwant] ** 2).sum(-1))
    small = rw <= abs_tol * anorm
    if tol is None:
        ok = np.ones_like(small)
    elif k > nwant:
        gap = th[:, nwant] - th[:, nwant - 1] - rn[:, nwant]
        ok = ((rw <= tol * gap) & (gap > 0)) | small
    else:
        ok = small
    if value_tol is not None:
        # |theta_0 - lambda| <= min(||r_0||, ||r_0||^2 / gap) (Kato-Temple, gap to the next Ritz value)
        r0 = rn[:, 0]
        if k > 1:
            gap0 = th[:, 1] - th[:, 0] - rn[:, 1]
            with np.errstate(over="ignore"):
                err0 = np.where(gap0 > 0, np.minimum(r0, r0 ** 2 / np.maximum(gap0, 1e-300)), r0)
        else:
            err0 = r0
        ok &= (err0 <= value_tol * np.abs(th[:, 0])) | (r0 <= abs_tol * anorm)
    return ok


def lobpcg(op: _Operator, X: torch.Tensor, nwant: int, *, gen: torch.Generator, tol: Optional[float],
           abs_tol: float, maxiter: int, kw: Optional[int] = None, kp: Optional[int] = None,
           value_tol: Optional[float] = None, anorm_floor: Optional[torch.Tensor] = None,
           precond_floor: Optional[torch.Tensor] = None, track: bool = False,
           compact: float = 0.5) -> EigResult:
    """Smallest eigenpairs of the symmetric operator ``op`` on a stack (``X``: ``[b, n, k]`` start block).

    ``kw`` residual columns are expanded per iteration (default ``k``) and ``kp`` LOBPCG directions kept
    (default ``k``). An item stops when ``||R_{:nwant}||_F <= tol * (theta_{nwant} - theta_{nwant-1} -
    ||r_{nwant}||)`` (Davis-Kahan bound on the subspace sine) or ``||R_{:nwant}||_F <= abs_tol * ||A||``
    with ``||A||`` estimated as ``max(|Ritz values|, anorm_floor)`` (``tol=None``: no condition on the
    vectors); with ``value_tol`` also ``min(||r_0||, ||r_0||^2 / gap_0) <= value_tol * |theta_0|``.
    ``precond_floor``: when it exceeds a tenth of ``|theta_0|`` of the start for some item (the variance
    term dominates), ``Zd R`` is added to the search space. ``track``: also return ``A X`` and
    ``Zd^{-1} X``. When the factors with an active module are at most ``compact`` of the operator's, the
    others leave it (a copy of the active factors).
    """
    b, n, k = X.shape
    dt, dev = X.dtype, X.device
    kw = k if kw is None else min(kw, k)
    kp = min(k if kp is None else kp, kw)  # (the first iteration's P comes from the kw residual columns)
    tiny = _tiny(dt)
    floor_h = (anorm_floor.double().cpu().numpy() if anorm_floor is not None else np.zeros(b))

    # setup: orthonormal start, its Ritz vectors
    X = orth_against(X, [], gen)
    AX, YX = op.apply(X)
    theta, V = rayleigh_ritz_small(X, AX)
    X, AX, YX = _mm(X, V), _mm(AX, V), _mm(YX, V)
    zd = False
    if precond_floor is not None:
        zd = bool((precond_floor.double().to(dev) > 0.1 * theta[:, 0].abs()).any())
    nz = 2 if zd else 1
    M = k + kp + nz * kw  # basis [X, P, W (, Zd W)]
    M0 = k + nz * kw  # the first iteration has no P

    def buffers(nb, m):  # [S, A S] side by side (one Gram product), and Zd^{-1} S
        return (torch.empty(nb, n, 2 * m, dtype=dt, device=dev),
                torch.empty(nb, n, m, dtype=dt, device=dev) if track else None)

    B, Y = buffers(b, M0)
    B[..., :k] = X
    B[..., M0:M0 + k] = AX
    if track:
        Y[..., :k] = YX
    del X, AX, YX, V
    nxt = [buffers(b, M), buffers(b, M)]
    theta = theta[:, :k]
    thmax = theta[:, -1:]  # largest Ritz value of the last Rayleigh-Ritz basis (for ||A||)
    host = torch.empty(b, 2 * k + 1, dtype=torch.float64, pin_memory=dev.type == "cuda")

    out_theta = np.zeros((b, k))
    out_res = np.zeros((b, k))
    out_anorm = np.zeros(b)
    iters = np.zeros(b, dtype=np.int64)
    conv = np.zeros(b, dtype=bool)
    out_X = torch.empty(b, n, k, dtype=dt, device=dev)
    if track:  # the basis [X, P] and its images, for sigma
        out_S = torch.empty(b, n, k + kp, dtype=dt, device=dev)
        out_AS, out_YS = torch.empty_like(out_S), torch.empty_like(out_S)
        out_nc = np.full(b, k)
    gid = np.arange(b)  # global index of each item of the current operator and buffers
    active = np.ones(b, dtype=bool)  # over the current items
    kpc, Mc = 0, M0  # P columns and basis width of the current buffer
    # On a GPU the host learns which modules have converged after the Rayleigh-Ritz step's eigh (its one
    # wait for the device): a module is found converged one iteration late. Where waiting is free (CPU)
    # it is decided as soon as the residuals are known, before the operator is applied again.
    early = not gpu_style(B)

    def record(it: int, Bc: torch.Tensor, Yc: Optional[torch.Tensor]) -> bool:
        """Record the modules that have converged (or run out of iterations); whether any is left."""
        if copied is not None:
            copied.synchronize()
        hvals = hv.numpy()
        th_h, rn_h = hvals[:, :k], hvals[:, k:2 * k]
        an_h = np.maximum(np.maximum(np.abs(th_h[:, 0]), np.abs(hvals[:, 2 * k])), floor_h[gid])
        ok = _criterion(th_h, rn_h, an_h, nwant, tol, abs_tol, value_tol)
        broken = ~(np.isfinite(th_h).all(-1) & np.isfinite(rn_h).all(-1))  # (solved densely by the caller)
        ok &= ~broken
        done = (ok | broken | (it == maxiter)) & active
        if done.any():
            pos = np.nonzero(done)[0]
            g = gid[pos]
            out_theta[g], out_res[g], out_anorm[g] = th_h[pos], rn_h[pos], an_h[pos]
            iters[g] = it
            conv[g] = ok[pos]
            tpos = torch.as_tensor(pos, device=dev)
            tg = torch.as_tensor(g, device=dev)
            out_X[tg] = Bc[tpos, :, :k]
            if track:
                kx = k + kpc
                out_S[tg, :, :kx] = Bc[tpos, :, :kx]
                out_AS[tg, :, :kx] = Bc[tpos, :, Mc:Mc + kx]
                out_YS[tg, :, :kx] = Yc[tpos, :, :kx]
                out_nc[g] = kx
            active[pos] = False
        return bool(active.any())

    def compaction() -> Optional[torch.Tensor]:
        """The positions of the items to keep when the factors whose modules have all converged should
        leave the operator (few enough factors remain active), else None; updates the bookkeeping."""
        nonlocal gid, active
        c = op.per_factor
        if not c or active.all():
            return None
        fact = active.reshape(-1, c).any(-1)
        if fact.sum() > compact * fact.size:
            return None
        kpos = np.nonzero(np.repeat(fact, c))[0]
        gid, active = gid[kpos], active[kpos]
        return torch.as_tensor(kpos, device=dev)

    for it in range(maxiter + 1):
        X = B[..., :k]
        AX = B[..., Mc:Mc + k]
        R = torch.addcmul(AX, X, theta.to(dt)[:, None, :], value=-1)
        rn = torch.linalg.vector_norm(R, dim=-2)
        hv = host[: X.shape[0]]
        hv.copy_(torch.cat([theta, rn.double(), thmax], dim=-1), non_blocking=True)
        copied = None
        if dev.type == "cuda":  # (the eigh below waits for the device anyway: this wait is then free)
            copied = torch.cuda.Event()
            copied.record()
        if early:  # (CPU: waiting is free; converged modules leave before the next application)
            if not record(it, B, Y):
                break
            keep = compaction()
            if keep is not None:
                op = op.compact(keep, with_L=zd)
                B, Y, R = B[keep], (Y[keep] if track else None), R[keep]
                nxt = [buffers(keep.numel(), M), buffers(keep.numel(), M)]
                theta, thmax = theta[keep], thmax[keep]
                X, AX = B[..., :k], B[..., Mc:Mc + k]
        # W: the residuals (their scale does not matter: see _rayleigh_ritz), then Zd W (normalised);
        # projected out of [X, P]
        W = B[..., k + kpc:k + kpc + kw]
        W.copy_(R[..., :kw])
        del R
        if zd:
            ZW = op.zd_mul(W)
            torch.div(ZW, torch.linalg.vector_norm(ZW, dim=-2, keepdim=True).clamp(min=tiny),
                      out=B[..., k + kpc + kw:Mc])
            del ZW
        Wall = B[..., k + kpc:Mc]
        XP = B[..., :k + kpc]
        Wall.baddbmm_(XP, XP.transpose(-1, -2) @ Wall, alpha=-1)
        op.apply(Wall, out=B[..., Mc + k + kpc:], yout=Y[..., k + kpc:] if track else None)
        S, AS = B[..., :Mc], B[..., Mc:]
        if dt != torch.float64:  # Gram matrices of float32 blocks, in float64
            Sd = S.double()
            GB, GA = Sd.transpose(-1, -2) @ Sd, Sd.transpose(-1, -2) @ AS.double()
            del Sd
        elif kpc:
            G2 = S.transpose(-1, -2) @ B
            GB, GA = G2[..., :Mc], G2[..., Mc:]
        else:  # (S and A S are not adjacent in the first buffer)
            GB, GA = S.transpose(-1, -2) @ S, S.transpose(-1, -2) @ AS
        th_all, C = _rayleigh_ritz(GA, GB, k, kp, dt)
        # (the eigh has waited for the device: the copied Ritz values and residual norms are on the host)
        if not early and not record(it, B, Y):
            break
        # the next X and P, and their images
        (Bn, Yn), nxt = nxt[0], nxt[::-1]
        kx = k + kp
        torch.matmul(S, C, out=Bn[..., :kx])
        torch.matmul(AS, C, out=Bn[..., M:M + kx])
        if track:
            torch.matmul(Y, C, out=Yn[..., :kx])
        B, Y = Bn, Yn
        theta, thmax = th_all[:, :k], th_all[:, -1:]
        kpc, Mc = kp, M
        if not early:
            keep = compaction()
            if keep is not None:
                op = op.compact(keep, with_L=zd)
                B, Y = B[keep], (Y[keep] if track else None)
                nxt = [buffers(keep.numel(), M), buffers(keep.numel(), M)]
                theta, thmax = theta[keep], thmax[keep]
    if not track:
        out_S = out_AS = out_YS = out_nc = None
    return EigResult(torch.from_numpy(out_theta), out_X, out_S, out_AS, out_YS,
                     None if out_nc is None else torch.from_numpy(out_nc), torch.from_numpy(out_res),
                     torch.from_numpy(out_anorm), torch.from_numpy(iters), torch.from_numpy(conv))


def sigma_from_basis(S: torch.Tensor, AS: torch.Tensor, YS: torch.Tensor, bprime: torch.Tensor, alpha: float
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sigma^2, ok)``: the top Ritz value of ``D D^T = (b' Zd^{-1} - M') / alpha`` on the span of ``S``
    (the last LOBPCG basis ``[X, P]``, nearly orthonormal; from ``M' S`` and ``Zd^{-1} S``, no operator
    pass), and whether its Kato-Temple bound ``min(||r||, ||r||^2 / gap)`` (gap to the next Ritz value
    less its residual) is within ``SIGMA2_TOL`` of it. Host tensors."""
    dt = S.dtype
    DS = (YS * bprime.to(dt)[:, None, None] - AS) / alpha
    GB = (S.transpose(-1, -2) @ S).double()
    GB.diagonal(dim1=-2, dim2=-1).mul_(1 + GRAM_SHIFT[dt])
    Lb, _ = torch.linalg.cholesky_ex(GB)
    H = (S.transpose(-1, -2) @ DS).double()
    Ht = torch.linalg.solve_triangular(Lb, H, upper=False)
    Ht = torch.linalg.solve_triangular(Lb, Ht.transpose(-1, -2), upper=False)
    rho, Z = torch.linalg.eigh(Ht.nan_to_num_())  # (broken items: solved densely later)
    C2 = torch.linalg.solve_triangular(Lb.transpose(-1, -2), Z[..., -2:], upper=True).to(dt)
    Rz = _mm(DS, C2) - _mm(S, C2) * rho[:, None, -2:].to(dt)
    rn = torch.linalg.vector_norm(Rz.double(), dim=-2).cpu()
    rho = rho.cpu()
    top, r1 = rho[:, -1], rn[:, -1]
    gap = top - rho[:, -2] - rn[:, -2] if rho.shape[-1] > 1 else torch.zeros_like(top)
    err = torch.where(gap > 0, torch.minimum(r1, r1 ** 2 / gap.clamp(min=1e-300)), r1)
    ok = (err <= SIGMA2_TOL * top.abs()) & (top > 0)
    return top, ok


def solve_dense(op: _Operator, alpha: float, bprime: Optional[torch.Tensor], r: int, k: int,
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


def flops_per_iteration(n: int, d_out: int, k: int, cols: int) -> float:
    """Floating-point operations of one LOBPCG iteration on one module (``cols`` columns applied)."""
    return cols * (4 * n * n + 4 * n * d_out) + 8 * n * (k + 2 * cols) ** 2


__all__ = ["EigResult", "SIGMA2_TOL", "cholesky_ex", "lobpcg", "orth_against",
           "orthonormalize", "sigma_from_basis", "solve_dense", "spd_inverse", "zinv_norm"]
