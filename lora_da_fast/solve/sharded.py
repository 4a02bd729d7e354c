"""The solve spread over the ranks of a process group: it wraps the local solve and knows nothing of
how a module is solved. The input groups (a group's Cholesky factor is shared by its modules) are
assigned to ranks by estimated cost (greedy longest-processing-time, a pure function of the statistics,
so every rank computes the same plan), each rank solves its share with :func:`~.local.solve_local`, and
the factors are broadcast to every rank (``gather="all"``) or sent to rank 0 (``gather="main"``), the
reports likewise. If a rank's solve raises, every rank raises (the others a :class:`DistributedError`
naming it)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import comm
from ..errors import ConfigError, DistributedError
from ..results import LoraDAResult, LoraFactors
from .local import solve_local


def estimate_cost(stats, group: str, names: Sequence[str], cfg) -> float:
    """Relative cost (FLOP) of solving one input group: the factorisation of ``Zd`` (``d^3 / 3``, plus
    ``d^3`` for ``Zd^{-1}`` when ``beta > 0``) and per module the solve ``Zd^{-1} G^T`` and ``D D^T``
    (``2 d^2 d_out`` each), the norm of ``D`` (``4 d d_out min(d, d_out)``), the eigenproblem of ``M``
    (``9 d^3``, a dense symmetric eigendecomposition) and, in ``sequence_lowrank`` mode, the Woodbury
    solve (``2 n^2 d_out + n^3``). Only the ratios matter: they balance the ranks."""
    d = float(stats.z_dim(group))
    cost = d ** 3 / 3 + (d ** 3 if cfg.beta > 0 else 0.0)
    for nm in names:
        st = stats.modules[nm]
        d_out = float(st.d_out)
        cost += 4 * d * d * d_out + 4 * d * d_out * min(d, d_out) + 9 * d ** 3
        if st.seq_sums is not None:
            n = float(st.seq_sums.shape[0])
            cost += 2 * n * n * d_out + n ** 3
    return cost


def assign_groups(stats, cfg, world: int) -> List[List[str]]:
    """Input groups per rank, balanced by :func:`estimate_cost` (greedy longest processing time: the
    most expensive group first, each to the least loaded rank; ties to the lower rank). Deterministic,
    so every rank computes the same plan without communicating. A rank may get no group."""
    groups = [(g, names) for g, names in stats.groups().items() if names]
    costs = [estimate_cost(stats, g, names, cfg) for g, names in groups]
    load = [0.0] * world
    plan: List[List[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(groups)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        plan[r].append(i)
        load[r] += costs[i]
    return [[groups[i][0] for i in sorted(p)] for p in plan]


def solve_sharded(stats, cfg, progress: bool = False, gather: str = "all",
                  bucket_bytes: Optional[int] = None):
    """Solve ``stats`` with the work split over the ranks; returns a ``LoraDAResult`` like
    :func:`~.local.solve_local`, which it wraps (each rank solves its share locally).

    Every rank must call it with the same statistics (as left by the data-parallel pass) and config.
    The input groups are assigned by :func:`assign_groups`; each rank solves its share; the factors
    and reports are then broadcast to every rank (``gather="all"``: every rank returns the full
    result) or sent to rank 0 (``gather="main"``: rank 0 returns the full result, the other ranks
    their own share). If a rank's solve raises, every rank raises (the others a
    :class:`DistributedError` naming it). Factors received from other ranks are placed on the device of
    the module's statistics. Without a process group this is :func:`~.local.solve_local`.
    """
    if gather not in ("all", "main"):
        raise ConfigError(f"gather must be 'all' or 'main', got {gather!r}")
    if not comm.is_active():
        return solve_local(stats, cfg, progress=progress)
    world, me = dist.get_world_size(), dist.get_rank()
    groups = stats.groups()
    plan = assign_groups(stats, cfg, world)
    owner = {nm: r for r, gs in enumerate(plan) for g in gs for nm in groups[g]}
    layout = comm.layout_crc([cfg.rank, stats.num_examples, stats.num_tokens, stats.output_fisher]
                          + [(nm, st.group, st.d_out, st.d_in) for nm, st in stats.modules.items()])
    mine = set(plan[me])
    local = stats.subset([nm for nm, st in stats.modules.items() if st.group in mine])
    error: Optional[BaseException] = None
    res = LoraDAResult()
    try:
        if local.modules:
            res = solve_local(local, cfg, progress=progress and comm.is_main())
        for nm, st in local.modules.items():
            f = res[nm]
            if tuple(f.lora_A.shape) != (cfg.rank, st.d_in) or tuple(f.lora_B.shape) != (st.d_out, cfg.rank):
                raise RuntimeError(f"solver returned factors of shapes {tuple(f.lora_A.shape)}, "
                                   f"{tuple(f.lora_B.shape)} for module {nm}")
    except Exception as exc:
        error = exc
    table = comm.exchange("the sharded solve", [layout], error)
    if error is not None:
        raise error
    if len(set(table[:, 1].tolist())) != 1:
        raise DistributedError("the ranks hold different statistics or configurations (module names, shapes, "
                               "counts or rank differ): every rank must solve the same statistics")

    receive = gather == "all" or me == 0
    cap = comm.bucket_elems(bucket_bytes)
    dev = comm.comm_device()
    factors: Dict[str, LoraFactors] = {}
    for src in range(world):
        names = [nm for nm in stats.modules if owner[nm] == src]
        if not names or (gather == "main" and src == 0):
            if src == me:
                factors.update({nm: res[nm] for nm in names})
            continue
        if src == me:
            tensors = {nm: LoraFactors(res[nm].lora_A.contiguous(), res[nm].lora_B.contiguous()) for nm in names}
        elif receive:
            tensors = {}
            for nm in names:
                st = stats.modules[nm]
                z = st.G.device
                tensors[nm] = LoraFactors(torch.empty(cfg.rank, st.d_in, dtype=torch.float32, device=z),
                                          torch.empty(st.d_out, cfg.rank, dtype=torch.float32, device=z))
        else:
            continue  # gather="main": neither sender nor receiver of this share
        pieces: List[comm.Piece] = []
        for nm in names:
            pieces += comm.flat_pieces(tensors[nm].lora_A, cap) + comm.flat_pieces(tensors[nm].lora_B, cap)
        for bucket in comm.buckets(pieces, cap):
            size = sum(p.numel for p in bucket)
            if src == me:
                flat = comm.fill(bucket, torch.empty(0, dtype=torch.float32, device=dev))
            else:
                flat = torch.empty(size, dtype=torch.float32, device=dev)
            if gather == "all":
                dist.broadcast(flat, src=src)
            elif src == me:
                dist.send(flat, dst=0)
            else:
                dist.recv(flat, src=src)
            if src != me:
                comm.drain(bucket, flat)
        factors.update(tensors)

    mine = {nm: res.reports[nm] for nm in local.modules if nm in res.reports}
    reports = dict(mine)
    if gather == "all":
        everyone: List[Optional[dict]] = [None] * world
        dist.all_gather_object(everyone, mine)
        for part in everyone:
            reports.update(part or {})
    else:
        everyone = [None] * world if me == 0 else None
        dist.gather_object(mine, everyone, dst=0)
        if me == 0:
            for part in everyone:
                reports.update(part or {})
    order = [nm for nm in stats.modules if nm in factors]
    return LoraDAResult({nm: factors[nm] for nm in order}, {nm: reports[nm] for nm in order if nm in reports})
