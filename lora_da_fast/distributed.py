"""torch.distributed support: each rank takes a shard of the calibration examples and the statistics
sums are all-reduced, so the result equals a single-process run on the whole set (to fp32 rounding)."""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return not is_active() or dist.get_rank() == 0


def shard(items: Iterable[T]) -> Iterator[T]:
    """Round-robin shard: item ``i`` goes to rank ``i % world_size`` (shards may differ by one)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for i, item in enumerate(items):
        if i % world == rank:
            yield item


def all_reduce_pass(sp) -> None:
    """Sum a StatisticsPass's accumulators and counters over all ranks, in place."""
    acc = sp.acc
    counts = torch.tensor([sp.n, sp.T, sp.skipped], dtype=torch.float64)
    dist.all_reduce(counts)
    sp.n, sp.T, sp.skipped = (int(v) for v in counts.tolist())
    for table in (acc.Z, acc.G, acc.y):
        for t in table.values():
            dist.all_reduce(t)
    for name, parts in acc.seq.items():
        if sp.cfg.output_fisher != "sequence_lowrank":
            break
        local = torch.cat(parts) if parts else acc.G[name].new_zeros(0, acc.G[name].shape[0])
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local.cpu())
        acc.seq[name] = [torch.cat(gathered).to(acc.G[name].device)]
