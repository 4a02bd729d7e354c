"""Reference (pure PyTorch) accumulation ops: the readable specification of what every kernel computes.

These are the CPU fallback, the baseline of the kernel benchmarks, and the oracle of the kernel tests.
Each op has the same name and signature as its Triton launcher in :mod:`lora_da_fast.ops.triton_ops`.

Conventions (all ops):
- ``x`` is a 2-D activation ``[N, d_in]`` (tokens flattened over the batch), any float dtype.
- ``dy`` is the matching output gradient ``[N, d_out]`` (``dL_i/dy_t`` for the token's own example).
- Masks are ``[N]`` bool tensors selecting rows; accumulators are fp32 and updated in place.
- ``Z`` accumulators are **packed** upper triangles (diagonal included), fp32 ``[d (d + 1) / 2]``, row ``i``
  holding ``Z[i, i:]`` (:mod:`lora_da_fast.triangle`): the strict lower triangle is never stored.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from ..triangle import MAX_INDEXED_DIM, packed_size, row_offsets

__all__ = ["sym_accumulate", "grad_stats"]


# sym_accumulate splits the rows of Z into this many blocks (of at least MIN_ROW_BLOCK rows): the products
# cover (blocks + 1) / (2 blocks) of the square (5/8 with 4), in few enough calls that their fixed cost (a
# thread-pool round each) stays small next to the products.
ROW_BLOCKS = 4
MIN_ROW_BLOCK = 128


def _row_blocks(d: int, device: torch.device) -> List[Tuple[int, int, int, int, torch.Tensor]]:
    """``(i0, i1, a, b, index)`` per block of rows ``i0:i1`` of a ``d x d`` triangle: its packed entries are
    ``Z[a:b]`` and ``index`` their flat positions in the block's rectangle ``[i1 - i0, d - i0]`` (columns
    from ``i0``), row by row from each row's diagonal."""
    if device.type == "cpu" and d <= MAX_INDEXED_DIM:  # kept: packed-size int64 per width
        return _cpu_row_blocks(d)
    return _make_row_blocks(d, device)


@functools.lru_cache(maxsize=8)
def _cpu_row_blocks(d: int):
    return _make_row_blocks(d, torch.device("cpu"))


def _make_row_blocks(d: int, device: torch.device):
    offsets = row_offsets(d).tolist() + [packed_size(d)]
    rows = max(MIN_ROW_BLOCK, -(-d // ROW_BLOCKS))
    out = []
    for i0 in range(0, d, rows):
        i1 = min(d, i0 + rows)
        upper = torch.ones(i1 - i0, d - i0, dtype=torch.bool, device=device).triu_()
        out.append((i0, i1, offsets[i0], offsets[i1], upper.view(-1).nonzero().squeeze(1)))
    return out


def sym_accumulate(Z: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
    """``Z += X_S^T X_S`` with ``X_S = x[mask]``; ``Z``: the packed upper triangle, fp32 ``[d (d + 1) / 2]``.

    The selected rows are gathered and upcast to fp32 before the product: every product and sum is
    exact fp32 arithmetic, which is what the kernels are compared against. By blocks of rows
    (:data:`ROW_BLOCKS`): the block's packed rows are expanded into a rectangle from the diagonal block
    rightwards, ``addmm_`` adds ``X_S[:, rows]^T X_S[:, cols]`` to it and its upper part is packed back:
    5/8 of the products of the square ``X_S^T X_S``, each entry the dot product of the same two columns
    added to the same running sum (bit-identical to a square ``addmm_`` in the tests we ran, not promised).
    """
    d = x.shape[-1]
    if Z.shape != (packed_size(d),):
        raise ValueError(f"Z must be the packed triangle [{packed_size(d)}] of a {d}x{d} matrix, got {tuple(Z.shape)}")
    xs = x if mask is None else x[mask]
    if xs.shape[0] == 0:
        return
    xs = xs.to(torch.float32)
    blocks = _row_blocks(d, Z.device)
    # one scratch for every block (the first is the largest); below a block's diagonal it holds zeros or
    # finite sums of the previous block: computed by addmm_ and never read
    scratch = torch.zeros((blocks[0][1] - blocks[0][0]) * d, dtype=Z.dtype, device=Z.device)
    for i0, i1, a, b, index in blocks:
        block = scratch[:(i1 - i0) * (d - i0)].view(i1 - i0, d - i0)
        block.view(-1).index_copy_(0, index, Z[a:b])
        block.addmm_(xs[:, i0:i1].T, xs[:, i0:])  # the strict lower part of the block: computed, dropped
        torch.index_select(block.view(-1), 0, index, out=Z[a:b])


def grad_stats(
    G: torch.Tensor,
    y: torch.Tensor,
    dy: torch.Tensor,
    x: torch.Tensor,
    grad_mask: Optional[torch.Tensor] = None,
    stat_mask: Optional[torch.Tensor] = None,
    seq_sums: Optional[torch.Tensor] = None,
    seq_ids: Optional[torch.Tensor] = None,
) -> None:
    """Gradient statistics of one module for one batch, in place.

    - ``G += dy_{grad_mask}^T x_{grad_mask}`` (fp32 ``[d_out, d_in]``): the summed weight gradient.
    - ``y += sum_{t in stat_mask} dy_t ** 2`` (fp32 ``[d_out]``): the diagonal output moment.
    - if ``seq_sums`` is given (fp32 ``[num_seqs, d_out]``): ``seq_sums[seq_ids[t]] += dy_t`` for
      ``t`` in ``stat_mask`` (the per-example summed output gradients of ``sequence_lowrank``).

    ``grad_mask`` selects the rows that enter ``G`` (normally every non-padding token: the exact gradient);
    ``stat_mask`` the rows of the token set ``S`` (default: ``grad_mask``).
    """
    if stat_mask is None:
        stat_mask = grad_mask
    d = dy.to(torch.float32)
    dg = d if grad_mask is None else d[grad_mask]
    if dg.shape[0] > 0:
        xg = (x if grad_mask is None else x[grad_mask]).to(torch.float32)
        G.addmm_(dg.T, xg)
    ds = d if stat_mask is None else d[stat_mask]
    if ds.shape[0] > 0:
        y.add_((ds * ds).sum(dim=0))
        if seq_sums is not None:
            ids = seq_ids if stat_mask is None else seq_ids[stat_mask]
            seq_sums.index_add_(0, ids.to(torch.long), ds)
