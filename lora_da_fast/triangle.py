"""The packed layout of the symmetric input factors ``Z`` (docs/algorithm.md, "Statistics"): only the upper
triangle, diagonal included, is accumulated, reduced over ranks, kept and saved; the solvers expand one
group (or one stack of groups) at a time.

Layout: row by row, row ``i`` holding ``Z[i, i:]``, so entry ``(i, j)``, ``i <= j``, of a ``d x d`` matrix
sits at ``i * d - i * (i - 1) / 2 + (j - i)`` of a vector of ``d * (d + 1) / 2`` entries (the order of
``torch.triu_indices(d, d)``). The Triton kernel (``kernels/sym_accumulate.py``) writes this layout
directly; everything here is plain torch and touches no device at import time.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

__all__ = ["packed_size", "packed_dim", "row_offsets", "packed_diagonal", "upper_mask", "pack_upper",
           "pack_symmetric", "unpack_symmetric"]


def packed_size(d: int) -> int:
    """Entries of the packed upper triangle of a ``d x d`` matrix: ``d (d + 1) / 2``."""
    return d * (d + 1) // 2


def packed_dim(n: int) -> int:
    """The ``d`` whose packed triangle has ``n`` entries; :class:`ValueError` if ``n`` is not one."""
    d = (math.isqrt(8 * n + 1) - 1) // 2
    if n < 0 or packed_size(d) != n:
        raise ValueError(f"{n} entries are not the packed upper triangle of a square matrix")
    return d


def row_offsets(d: int, device=None) -> torch.Tensor:
    """int64 ``[d]``: where row ``i`` (its diagonal entry) starts in the packed vector."""
    i = torch.arange(d, dtype=torch.int64, device=device)
    return i * (2 * d - i + 1) // 2


def packed_diagonal(p: torch.Tensor) -> torch.Tensor:
    """The diagonal ``[d]`` of a packed triangle ``p`` (a gather of ``d`` entries, no expansion)."""
    return p[row_offsets(packed_dim(p.shape[-1]), p.device)]


def upper_mask(d: int, device=None) -> torch.Tensor:
    """bool ``[d, d]``: the upper triangle, diagonal included (row-major order = the packed order)."""
    return torch.ones(d, d, dtype=torch.bool, device=device).triu_()


# Widths up to which the CPU paths use cached index vectors (8 d^2 bytes each width) instead of masks.
MAX_INDEXED_DIM = 2048


def _indexed(t: torch.Tensor, d: int) -> bool:
    return t.device.type == "cpu" and d <= MAX_INDEXED_DIM


@functools.lru_cache(maxsize=4)
def _cpu_flat_indices(d: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 flat positions in a row-major ``d x d`` matrix of the packed entries ``(i, j)`` and of their
    mirrors ``(j, i)`` (CPU: an index gather/scatter is several times faster there than a masked one;
    ``8 d^2`` bytes, kept for the last few widths up to :data:`MAX_INDEXED_DIM`)."""
    i, j = torch.triu_indices(d, d)
    return i * d + j, j * d + i


def pack_upper(Z: torch.Tensor) -> torch.Tensor:
    """The upper triangle of square ``Z`` (diagonal included), packed (a new contiguous vector)."""
    if Z.dim() != 2 or Z.shape[0] != Z.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(Z.shape)}")
    if Z.device.type == "meta":  # shapes only (memory plans): masked_select has no meta kernel
        return Z.new_empty(packed_size(Z.shape[0]))
    if _indexed(Z, Z.shape[0]):
        return Z.reshape(-1).index_select(0, _cpu_flat_indices(Z.shape[0])[0])
    return Z.masked_select(upper_mask(Z.shape[0], Z.device))


def pack_symmetric(Z: torch.Tensor) -> torch.Tensor:
    """``sym(Z) = (Z + Z^T) / 2`` packed: the input factor the solvers used for a square ``Z`` given in full
    (bit-identical to ``pack_upper(Z)`` when ``Z`` is exactly symmetric)."""
    if Z.dim() != 2 or Z.shape[0] != Z.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(Z.shape)}")
    return pack_upper(0.5 * (Z + Z.T))


def unpack_symmetric(p: torch.Tensor, dtype: Optional[torch.dtype] = None, device=None,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense symmetric ``d x d`` matrix of the packed triangle ``p``, in ``dtype`` on ``device`` (those
    of ``p`` by default), written into ``out`` when given (any contiguous ``d x d`` tensor, e.g. one matrix
    of a stack). Entries are converted, never recomputed: the mirrored entries equal the upper ones bit for
    bit. Working memory besides the result: ``p`` in the target dtype and a ``d x d`` bool mask (index
    vectors on a CPU)."""
    d = packed_dim(p.shape[-1])
    if out is None:
        out = torch.empty(d, d, dtype=dtype or p.dtype, device=device if device is not None else p.device)
    elif tuple(out.shape) != (d, d):
        raise ValueError(f"out must be {d}x{d}, got {tuple(out.shape)}")
    src = p.to(device=out.device, dtype=out.dtype)
    if _indexed(out, d) and out.is_contiguous():
        upper, mirror = _cpu_flat_indices(d)
        flat = out.view(-1)
        flat.index_copy_(0, upper, src)
        flat.index_copy_(0, mirror, src)
        return out
    mask = upper_mask(d, out.device)
    out.masked_scatter_(mask, src)  # upper triangle, row by row
    out.T.masked_scatter_(mask, src)  # lower triangle: the same entries, column by column
    return out
