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

from typing import Optional

import torch

from ..triangle import packed_size, upper_mask

__all__ = ["sym_accumulate", "grad_stats"]


def sym_accumulate(Z: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
    """``Z += X_S^T X_S`` with ``X_S = x[mask]``; ``Z``: the packed upper triangle, fp32 ``[d (d + 1) / 2]``.

    The selected rows are gathered and upcast to fp32 before the product: every product and sum is
    exact fp32 arithmetic, which is what the kernels are compared against. The triangle is expanded into
    a ``d x d`` scratch matrix for ``addmm_`` and packed back, so each entry is the very ``addmm_`` result
    a full square accumulator would hold (bit for bit); the scratch lives for the call only.
    """
    d = x.shape[-1]
    if Z.shape != (packed_size(d),):
        raise ValueError(f"Z must be the packed triangle [{packed_size(d)}] of a {d}x{d} matrix, got {tuple(Z.shape)}")
    xs = x if mask is None else x[mask]
    if xs.shape[0] == 0:
        return
    xs = xs.to(torch.float32)
    upper = upper_mask(d, Z.device)
    full = torch.zeros(d, d, dtype=Z.dtype, device=Z.device).masked_scatter_(upper, Z)
    full.addmm_(xs.T, xs)
    Z.copy_(full.masked_select(upper))


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
