"""Factorisations of ``Zd`` for the batched solver (docs/algorithm.md, "Solve"): one Cholesky factor ``L``
per input group (``Zd = L L^T``), and on the explicit path (GPU) ``Zd^{-1}`` itself.

- :func:`cholesky_ex`: ``torch.linalg.cholesky_ex`` on a stack of factors; large matrices on a GPU are
  factorised one at a time (the batched cuSOLVER routines are made for many small matrices).
- :func:`spd_inverse`: ``Zd^{-1} = L^{-T} L^{-1}`` from the factors. CPU: LAPACK's ``potri``. GPU: a
  recursive blocked inverse, ``n^3 / 3`` for ``L^{-1}`` and ``n^3 / 3`` for ``L^{-T} L^{-1}``, in large
  triangular solves and GEMMs, where ``torch.cholesky_inverse`` on CUDA solves against the identity
  (``2 n^3``).
- :func:`gpu_style`: whether a tensor gets the GPU's choices, here and in :mod:`.operator` and
  :mod:`.lobpcg` (the one place tests patch to run them on the CPU).
"""
from __future__ import annotations

from typing import Tuple

import torch


def gpu_style(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where the GPU choices apply (explicit blocked inverse, per-item factorisation of
    large matrices, plain GEMM orientation). Tests patch it to run those choices on the CPU: here, once
    for the whole solver (:mod:`.operator` and :mod:`.lobpcg` look it up through this module)."""
    return t.device.type == "cuda"


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


__all__ = ["cholesky_ex", "gpu_style", "spd_inverse"]
