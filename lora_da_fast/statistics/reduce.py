"""Data-parallel statistics: each rank runs the pass on its shard of the examples, then the sums are
added up over the ranks here: every ``Z`` (already a packed triangle, :mod:`lora_da_fast.triangle`, sent
as it is), every ``G`` and ``y``, in buckets, one ``all_reduce`` each; the per-example sums of
``sequence_lowrank`` are all-gathered and put back in the
single-process example order. The counts travel in the status exchange that comes first, with a
checksum of the layout, so ranks with different targets fail with a clear error. The result equals a
single-process run on the whole set to fp32 rounding (only the summation order differs).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from .. import comm
from ..errors import DistributedError
from .token_store import gather_over_ranks


def reduce_over_ranks(sp, round_robin: bool = True, bucket_bytes: Optional[int] = None) -> None:
    """Sum a :class:`~.statistics_pass.StatisticsPass`'s accumulators and counters over all ranks, in
    place, before its ``finalize`` (a no-op without an active process group).

    Counts ``n`` and ``T`` are summed. ``Z``: the packed triangles, as they are. Sequence sums: all-gathered, in the
    single-process order when every rank took a round-robin :func:`~lora_da_fast.comm.shard` of the
    same examples (``round_robin``, as the engine does), in rank order otherwise (the solver does not
    depend on that order).
    """
    if not comm.is_active():
        return
    acc = sp.acc
    cap = comm.bucket_elems(bucket_bytes)
    layout = comm.layout_crc([sp.cfg.output_fisher]
                          + [(k, tuple(t.shape)) for table in (acc.Z, acc.G, acc.y) for k, t in table.items()])
    table = comm.exchange("the statistics all-reduce", [sp.n, sp.T, int(round_robin), layout])
    world = table.shape[0]
    if len(set(table[:, 4].tolist())) != 1:
        raise DistributedError("the ranks disagree on the statistics layout (target modules, their shapes or "
                               "output_fisher differ between ranks): every rank must load the same model "
                               "with the same configuration")
    n_r = [int(v) for v in table[:, 1].tolist()]
    round_robin = bool(table[:, 3].min() == 1)
    sp.n, sp.T = sum(n_r), int(table[:, 2].sum())

    pieces: List[comm.Piece] = []
    for tab in (acc.Z, acc.G, acc.y):
        for t in tab.values():
            pieces += comm.flat_pieces(t, cap)
    comm.all_reduce_pieces(pieces, cap)

    if sp.cfg.output_fisher == "sequence_lowrank":
        _gather_sequence_sums(acc, n_r, round_robin, cap, world)
    gather_over_ranks(sp)  # the kept tokens (groups on the token path), all-gathered


def _gather_sequence_sums(acc, n_r: List[int], round_robin: bool, cap: int, world: int) -> None:
    """All-gather every module's per-example sums ``[n_r, d_out]`` into ``[sum n_r, d_out]``."""
    names = list(acc.seq)
    dev = comm.comm_device()
    me = dist.get_rank()
    local = {}
    for name in names:
        parts = acc.seq[name]
        local[name] = torch.cat(parts) if parts else acc.G[name].new_zeros(0, acc.G[name].shape[0])
    # Rows per (rank, module): n_r for every module the loss reached, but do not rely on it.
    rows = torch.zeros(world, max(len(names), 1), dtype=torch.int64)
    rows[me, :len(names)] = torch.tensor([local[nm].shape[0] for nm in names], dtype=torch.int64)
    rows = rows.to(dev)
    dist.all_reduce(rows)
    rows = rows.cpu()
    # Every rank sends each module padded to the largest row count, in segments of its flat view.
    per_rank_cap = max(1, cap // world)  # all_gather returns world x the bucket
    padded, gathered, segments = {}, {}, []
    for j, nm in enumerate(names):
        h, d_out = int(rows[:, j].max()), acc.G[nm].shape[0]
        if h == 0:
            continue
        padded[nm] = local[nm].new_zeros(h, d_out)
        padded[nm][: local[nm].shape[0]] = local[nm]
        gathered[nm] = local[nm].new_zeros(world, h, d_out)
        for a in range(0, h * d_out, per_rank_cap):
            segments.append(comm.Piece(min(per_rank_cap, h * d_out - a), (lambda nm=nm, a=a: (nm, a)), None))
    for bucket in comm.buckets(segments, per_rank_cap):
        spans = [(*p.read(), p.numel) for p in bucket]
        flat = torch.cat([padded[nm].view(-1)[a:a + k].to(dev) for nm, a, k in spans])
        outs = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(outs, flat)
        for r in range(world):
            off = 0
            for nm, a, k in spans:
                gathered[nm][r].view(-1)[a:a + k].copy_(outs[r][off:off + k])
                off += k
    for j, nm in enumerate(names):
        if nm not in gathered:
            acc.seq[nm] = []
            continue
        counts = [int(c) for c in rows[:, j].tolist()]
        total = sum(counts)
        if round_robin and counts == n_r and all(counts[r] == len(range(r, total, world)) for r in range(world)):
            full = acc.G[nm].new_empty(total, acc.G[nm].shape[0])
            for r in range(world):  # round-robin shard: rank r's j-th example is example j * world + r
                full[r::world] = gathered[nm][r, : counts[r]]
        else:
            full = torch.cat([gathered[nm][r, : counts[r]] for r in range(world)])
        acc.seq[nm] = [full]
