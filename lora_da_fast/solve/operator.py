"""The operator of the batched solver's eigen-problem (docs/algorithm.md, "Solve") applied to a stack of
``s`` same-shape modules without forming ``D`` or ``M'``:
``M' W = -a D D^T W + b Zd^{-1} W = Zd^{-1} (-a G^T diag(u^2) G (Zd^{-1} W) + b W)``, with
``D = -Zd^{-1} G^T diag(u)``.

Two products with ``Zd^{-1}`` (GEMMs with the explicit inverse of :func:`.factor.spd_inverse`, or two
triangular solves with the Cholesky factor each) and two with ``G``. ``Zd^{-1} W`` is returned with
``M' W``: ``D D^T W = (b Zd^{-1} W - M' W) / a`` gives ``sigma = ||D||_2`` with no further pass. The stack
holds the same number ``c`` of modules of each factor, in factor order (:func:`_factor_runs`): ``Zd^{-1}``
is applied to the ``c`` modules' blocks side by side, each factor read once per product. The operator
also applies ``Zd`` (the preconditioner of the variance-dominated case), ``D`` and ``D^T``, gives the
operator on a subset of its modules or with the converged ones' factors dropped, and counts the passes
each module cost (diagnostics).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from . import factor


def _mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` for a tall ``A`` and a narrow ``B``. On CPU computed as ``(B^T A^T)^T``: MKL's batched
    GEMM runs 2-4x faster with the long dimension as the column count (measured, float64)."""
    if factor.gpu_style(A):
        return A @ B
    return (B.transpose(-1, -2) @ A.transpose(-1, -2)).transpose(-1, -2)


def _mm_into(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``A @ B`` written into ``out`` (a column slice of a basis buffer) when given."""
    if out is None:
        return _mm(A, B)
    if factor.gpu_style(A):
        return torch.matmul(A, B, out=out)
    return out.copy_(_mm(A, B))


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
