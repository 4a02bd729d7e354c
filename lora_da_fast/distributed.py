"""torch.distributed support: data-parallel statistics, a sharded solve, and the helpers a launcher needs.

Data parallel statistics. Each rank takes a round-robin shard of the usable calibration examples
(:func:`shard`), runs its own forward+backward, and :func:`all_reduce_pass` sums the accumulators over
the ranks: only the upper triangle of each input factor ``Z`` (diagonal included, packed row by row;
the lower triangle of an accumulator is not meaningful, see :mod:`reference`), every ``G`` and ``y``,
flattened into buckets of ``bucket_bytes`` (default 256 MiB, env ``LORA_DA_BUCKET_MB``), one
``all_reduce`` per bucket. The counts (examples, tokens, skipped) travel in a small int64 status
exchange that comes first. The per-example sequence sums (``sequence_lowrank``) are all-gathered and
put back in the single-process example order. The result equals a single-process run on the whole set
to fp32 rounding (only the summation order differs).

Failures. Every collective step starts with a *status exchange*: one ``all_reduce`` of a ``[world, 8]``
int64 table where each rank fills its own row (failed flag, counts, a fingerprint of its layout).
A rank whose local work raised takes part in that exchange through :func:`guard` /
:func:`report_failure`, so the healthy ranks learn which rank failed and why, and raise
:class:`DistributedError` instead of waiting in a collective that will never complete; the failing
rank re-raises its own exception. Nothing is written by this module, so no partial adapter can exist.
A rank that dies without reporting (killed, segfault, out of host memory) is seen by its peers when
their next collective fails: at once with gloo (the TCP connection closes), after the process-group
timeout with NCCL (``init_from_env`` sets it from ``LORA_DA_DIST_TIMEOUT``, seconds, default 1800),
unless the launcher ends the job first (``torchrun`` stops every local worker when one exits with an
error). Those errors are re-raised as :class:`DistributedError` too.

Sharded solve. :func:`solve_sharded` assigns the input groups (a group's Cholesky factor is shared by
its modules) to ranks by estimated cost (greedy longest-processing-time), each rank solves its share
with :func:`lora_da_fast.solver.solve_lora_da`, and the factors are broadcast to every rank
(``gather="all"``) or sent to rank 0 (``gather="main"``), the reports likewise.

Models split over several devices (``device_map="auto"``): accumulators live on each module's device,
the buckets are staged on one communication device (the rank's current CUDA device for NCCL, the CPU
for gloo), so statistics spread over several GPUs of one rank are reduced correctly.
"""
from __future__ import annotations

import contextlib
import os
import threading
import zlib
from datetime import timedelta
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import ConfigError, LoraDAError

T = TypeVar("T")

#: Bucket size of the statistics all-reduce and of the factor gather, in bytes. ``None``: the
#: environment variable ``LORA_DA_BUCKET_MB`` if set, else 256 MiB.
BUCKET_BYTES: Optional[int] = None
DEFAULT_BUCKET_BYTES = 256 * 2 ** 20
DEFAULT_TIMEOUT_S = 1800.0
_STATUS_WIDTH = 8  # int64 entries per rank in the status exchange: [failed, payload x 7]
_MAX_MESSAGE = 2000


class DistributedError(LoraDAError, RuntimeError):
    """Another rank failed (or vanished) during a distributed step; its own log has the details."""


# --------------------------------------------------------------------------------------------------
# Process group helpers (for the CLI and for scripts run under torchrun)

_owns_group = False
_state = threading.local()


def is_active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """True on rank 0, and always without a process group: the rank that prints and writes files."""
    return not is_active() or dist.get_rank() == 0


def local_devices() -> List[int]:
    """The CUDA device indices this process should use: the machine's GPUs split evenly between the
    ``LOCAL_WORLD_SIZE`` processes of this machine (all of them without torchrun).

    With 8 GPUs and ``--nproc-per-node 2``, local rank 0 gets ``[0..3]`` and local rank 1 ``[4..7]``:
    each process holds one replica of the model split over its 4 GPUs (``device_map="auto"`` with
    :func:`max_memory_for_rank`), and the replicas split the calibration set.
    """
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_world <= 1:
        return list(range(count))
    per = count // local_world
    if per == 0:
        raise ConfigError(f"{local_world} processes on this machine but only {count} CUDA devices: "
                          "use at most one process per GPU")
    return list(range(local_rank * per, (local_rank + 1) * per))


def max_memory_for_rank(fraction: float = 0.9) -> Optional[Dict[object, int]]:
    """``max_memory`` for ``from_pretrained(..., device_map="auto", max_memory=...)`` that confines this
    process's replica to its own GPUs (:func:`local_devices`); ``None`` without CUDA.

    ``fraction`` of each GPU's memory is offered to the weights; the rest is left to the activations
    and the statistics (which accelerate does not know about: lower it for large models, see
    docs/distributed.md).
    """
    devs = local_devices()
    if not devs:
        return None
    return {i: int(torch.cuda.get_device_properties(i).total_memory * fraction) for i in devs}


def init_from_env(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``...) when ``WORLD_SIZE > 1``; returns whether a multi-rank group is active.

    Backend: NCCL when CUDA is available, else gloo. With NCCL the current CUDA device is set to the
    first of :func:`local_devices`. ``timeout_s`` (default ``LORA_DA_DIST_TIMEOUT`` or 1800 s) bounds
    how long a collective waits for a rank that vanished without reporting its failure.
    Does nothing if a group already exists (e.g. made by ``accelerate launch`` or the caller).
    """
    global _owns_group
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_active()
    if dist.is_initialized():
        return is_active()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        devs = local_devices()
        if devs:
            torch.cuda.set_device(devs[0])
    if timeout_s is None:
        timeout_s = float(os.environ.get("LORA_DA_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    _owns_group = True
    return is_active()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_active():
        dist.barrier()


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` over the ranks (itself without a process group): for decisions every rank
    must take alike, e.g. ``layers_per_pass="auto"`` planned from each rank's free memory."""
    if not is_active():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled; for small things such as a checked path or a plan)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    global _owns_group
    if _owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_group = False


# --------------------------------------------------------------------------------------------------
# Sharding and failure reporting


def shard(items: Iterable[T]) -> Iterator[T]:
    """Round-robin shard: item ``i`` goes to rank ``i % world_size`` (shards differ by at most one; a
    rank may get none).

    Give it the list of *usable* examples, in the order a single process would use them (as
    ``statistics.prepare_examples`` does): the round-robin order then lets :func:`all_reduce_pass` put
    the per-example sequence sums back in the single-process order.
    """
    _state.round_robin = True
    r, world = dist.get_rank(), dist.get_world_size()
    for i, item in enumerate(items):
        if i % world == r:
            yield item


def _message(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _comm_device() -> torch.device:
    """Where collective buffers live: the current CUDA device for NCCL, the CPU otherwise."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange(where: str, payload: Sequence[int] = (), error: Optional[BaseException] = None) -> torch.Tensor:
    """The status exchange: every rank contributes ``[failed, *payload]`` (int64, padded to 8) and gets
    the ``[world, 8]`` table of all rows.

    If some rank failed, the messages are gathered, and every healthy rank raises
    :class:`DistributedError` naming the failing ranks and their errors; a failing rank returns (its
    caller re-raises its own exception). If the collective itself fails (a peer process is gone or the
    timeout passed) every rank that sees it raises :class:`DistributedError`.
    """
    if len(payload) > _STATUS_WIDTH - 1:
        raise ValueError("status payload too long")
    world, me = dist.get_world_size(), dist.get_rank()
    table = torch.zeros(world, _STATUS_WIDTH, dtype=torch.int64)
    table[me, 0] = int(error is not None)
    table[me, 1:1 + len(payload)] = torch.tensor([int(v) for v in payload], dtype=torch.int64)
    table = table.to(_comm_device())
    try:
        dist.all_reduce(table)
        table = table.cpu()
        failed = [r for r in range(world) if table[r, 0] != 0]
        messages: List[Optional[str]] = [None] * world
        if failed:
            dist.all_gather_object(messages, f"{where}: {_message(error)}" if error is not None else None)
    except Exception as exc:
        if error is not None:  # already failing: keep the original error, the caller re-raises it
            return torch.zeros(world, _STATUS_WIDTH, dtype=torch.int64)
        raise DistributedError(
            f"rank {me}: the status exchange before {where} failed: another rank exited or did not arrive "
            f"within the process-group timeout ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). "
            "The failing rank's own log has the cause.") from exc
    if failed and error is None:
        detail = "; ".join(f"rank {r} failed in {messages[r]}" for r in failed)
        raise DistributedError(f"{detail} -- so rank {me} stops before {where}")
    return table


def report_failure(exc: BaseException, where: str = "the statistics pass") -> None:
    """Tell the other ranks that this rank failed (they are, or will be, in a status exchange).

    Call it from the failing rank where its peers will next enter a collective step (the end of the
    statistics pass, the end of the local solve); it never raises, so the caller's own exception
    stays the one that propagates.
    """
    if not is_active() or isinstance(exc, DistributedError):
        return
    try:
        _exchange(where, error=exc)
    except Exception:  # pragma: no cover - _exchange already swallows errors of failing ranks
        pass


@contextlib.contextmanager
def guard(where: str = "the statistics pass") -> Iterator[None]:
    """Wrap the *local* work of a rank (no collectives inside): if it raises, the other ranks are told
    through :func:`report_failure` before the exception propagates. Use it around the loop of a
    statistics pass whose :meth:`StatisticsPass.finalize` the healthy ranks will call::

        with StatisticsPass(model, cfg) as sp, distributed.guard():
            for batch in ...:
                sp.step(batch)
        stats = sp.finalize()
    """
    try:
        yield
    except BaseException as exc:
        report_failure(exc, where)
        raise


@contextlib.contextmanager
def step(where: str) -> Iterator[None]:
    """Local work of every rank, then a status exchange: if the block raises on some rank, every rank
    stops there (the failing one with its own exception, the others with :class:`DistributedError`
    naming it) instead of waiting in a later collective. A no-op wrapper without a process group."""
    with guard(where):
        yield
    if is_active():
        _exchange(where)


# --------------------------------------------------------------------------------------------------
# Bucketed collectives over pieces of tensors


class _Piece:
    """A run of fp32 elements of some tensor: ``read()`` returns them as a 1-D tensor, ``write(v)``
    stores ``v`` back. Pieces are what the buckets are filled with."""

    __slots__ = ("numel", "read", "write")

    def __init__(self, numel: int, read: Callable[[], torch.Tensor], write: Callable[[torch.Tensor], None]):
        self.numel, self.read, self.write = numel, read, write


def _flat_pieces(t: torch.Tensor, cap: int) -> List[_Piece]:
    """``t`` (contiguous) as slices of at most ``cap`` elements."""
    flat = t.view(-1)
    out = []
    for a in range(0, flat.numel(), cap):
        v = flat[a:a + cap]
        out.append(_Piece(v.numel(), (lambda v=v: v), (lambda x, v=v: v.copy_(x))))
    return out


def _upper_pieces(Z: torch.Tensor, cap: int) -> List[_Piece]:
    """The upper triangle of square ``Z`` (diagonal included), packed row-major, in blocks of rows of
    at most about ``cap`` elements. Only these ``d (d + 1) / 2`` entries are sent; the lower triangle
    of ``Z`` is left as it is (the caller mirrors the upper one)."""
    d = Z.shape[0]
    rows = max(1, min(d, cap // max(d, 1)))
    out = []
    for i0 in range(0, d, rows):
        i1 = min(d, i0 + rows)
        rect = Z[i0:i1, i0:]  # rows i0..i1, columns from the diagonal of row i0 on
        mask = torch.ones(i1 - i0, d - i0, dtype=torch.bool, device=Z.device).triu()
        n = int((i1 - i0) * (d - i0) - (i1 - i0) * (i1 - i0 - 1) // 2)
        out.append(_Piece(n, (lambda r=rect, m=mask: r[m]), (lambda x, r=rect, m=mask: r.masked_scatter_(m, x.to(r.device)))))
    return out


def _buckets(pieces: Sequence[_Piece], cap: int) -> Iterator[List[_Piece]]:
    bucket, size = [], 0
    for p in pieces:
        if bucket and size + p.numel > cap:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel
    if bucket:
        yield bucket


def _bucket_elems(bucket_bytes: Optional[int], element_size: int = 4) -> int:
    if bucket_bytes is None:
        bucket_bytes = BUCKET_BYTES
    if bucket_bytes is None:
        env = os.environ.get("LORA_DA_BUCKET_MB")
        bucket_bytes = int(float(env) * 2 ** 20) if env else DEFAULT_BUCKET_BYTES
    if bucket_bytes < element_size:
        raise ConfigError(f"bucket size must be at least {element_size} bytes, got {bucket_bytes}")
    return bucket_bytes // element_size


def _fill(bucket: Sequence[_Piece], buf: torch.Tensor) -> torch.Tensor:
    size = sum(p.numel for p in bucket)
    flat = buf[:size] if buf.numel() >= size else torch.empty(size, dtype=buf.dtype, device=buf.device)
    off = 0
    for p in bucket:
        flat[off:off + p.numel].copy_(p.read())
        off += p.numel
    return flat


def _drain(bucket: Sequence[_Piece], flat: torch.Tensor) -> None:
    off = 0
    for p in bucket:
        p.write(flat[off:off + p.numel])
        off += p.numel


def _all_reduce_pieces(pieces: Sequence[_Piece], cap: int) -> int:
    """Sum the pieces over all ranks, bucket by bucket; returns the number of buckets."""
    if not pieces:
        return 0
    dev = _comm_device()
    buf = torch.empty(min(cap, sum(p.numel for p in pieces)), dtype=torch.float32, device=dev)
    count = 0
    for bucket in _buckets(pieces, cap):
        flat = _fill(bucket, buf)
        dist.all_reduce(flat)
        _drain(bucket, flat)
        count += 1
    return count


def _fingerprint(parts: Iterable[object]) -> int:
    """A CRC of a description (names, shapes) that must be the same on every rank."""
    return zlib.crc32(repr(list(parts)).encode())


# --------------------------------------------------------------------------------------------------
# Data-parallel statistics


def all_reduce_pass(sp, bucket_bytes: Optional[int] = None) -> None:
    """Sum a :class:`~lora_da_fast.statistics.StatisticsPass`'s accumulators and counters over all
    ranks, in place (called by ``StatisticsPass.finalize`` under an active process group).

    Counts ``n``, ``T`` and ``skipped`` are summed (``prepare_examples`` lets only rank 0 count the
    skipped examples, since every rank reads the whole stream). ``Z``: upper triangles only. Sequence
    sums: all-gathered, in the single-process order after a round-robin :func:`shard`, in rank order
    otherwise (the solver does not depend on that order).
    """
    acc = sp.acc
    # Sticky: with layers_per_pass, one shard() feeds several passes.
    round_robin = bool(getattr(_state, "round_robin", False))
    cap = _bucket_elems(bucket_bytes)
    layout = _fingerprint([sp.cfg.output_fisher]
                          + [(k, tuple(t.shape)) for table in (acc.Z, acc.G, acc.y) for k, t in table.items()])
    table = _exchange("the statistics all-reduce", [sp.n, sp.T, sp.skipped, int(round_robin), layout])
    world = table.shape[0]
    if len(set(table[:, 5].tolist())) != 1:
        raise DistributedError("the ranks disagree on the statistics layout (target modules, their shapes or "
                               "output_fisher differ between ranks): every rank must load the same model "
                               "with the same configuration")
    n_r = [int(v) for v in table[:, 1].tolist()]
    round_robin = bool(table[:, 4].min() == 1)
    sp.n, sp.T, sp.skipped = sum(n_r), int(table[:, 2].sum()), int(table[:, 3].sum())

    pieces: List[_Piece] = []
    for z in acc.Z.values():
        pieces += _upper_pieces(z, cap)
    for tab in (acc.G, acc.y):
        for t in tab.values():
            pieces += _flat_pieces(t, cap)
    _all_reduce_pieces(pieces, cap)

    if sp.cfg.output_fisher == "sequence_lowrank":
        _gather_sequence_sums(acc, n_r, round_robin, cap, world)


def _gather_sequence_sums(acc, n_r: List[int], round_robin: bool, cap: int, world: int) -> None:
    """All-gather every module's per-example sums ``[n_r, d_out]`` into ``[sum n_r, d_out]``."""
    names = list(acc.seq)
    dev = _comm_device()
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
            segments.append(_Piece(min(per_rank_cap, h * d_out - a), (lambda nm=nm, a=a: (nm, a)), None))
    for bucket in _buckets(segments, per_rank_cap):
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


# --------------------------------------------------------------------------------------------------
# Sharded solve


@contextlib.contextmanager
def no_sharding() -> Iterator[None]:
    """Inside it, ``solve_lora_da`` solves every module on this rank alone, even in a process group
    (used by :func:`solve_sharded` for each rank's share; also for callers that solve on one rank)."""
    prev = getattr(_state, "no_sharding", False)
    _state.no_sharding = True
    try:
        yield
    finally:
        _state.no_sharding = prev


def sharding_enabled() -> bool:
    """Whether ``solve_lora_da`` should hand over to :func:`solve_sharded`."""
    return is_active() and not getattr(_state, "no_sharding", False)


def estimate_cost(stats, group: str, names: Sequence[str], cfg) -> float:
    """Relative cost (FLOP) of solving one input group: the factorisation of ``Zd`` (``d^3 / 3``, plus
    ``d^3`` for ``Zd^{-1}`` when ``beta > 0``) and per module the solve ``Zd^{-1} G^T`` and ``D D^T``
    (``2 d^2 d_out`` each), the norm of ``D`` (``4 d d_out min(d, d_out)``), the eigenproblem of ``M``
    (``9 d^3``, a dense symmetric eigendecomposition) and, in ``sequence_lowrank`` mode, the Woodbury
    solve (``2 n^2 d_out + n^3``). Only the ratios matter: they balance the ranks."""
    d = float(stats.Z[group].shape[0])
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


def restrict(stats, groups: Sequence[str]):
    """A :class:`FisherStatistics` holding only the given input groups and their modules (tensors shared)."""
    from .statistics import FisherStatistics

    keep = set(groups)
    modules = {nm: st for nm, st in stats.modules.items() if st.group in keep}
    return FisherStatistics(modules, {g: z for g, z in stats.Z.items() if g in keep}, stats.num_examples,
                            stats.num_tokens, stats.num_skipped, stats.token_mask, stats.output_fisher,
                            dict(stats.meta))


def solve_sharded(stats, cfg, progress: bool = False, gather: str = "all",
                  bucket_bytes: Optional[int] = None):
    """Solve ``stats`` with the work split over the ranks; returns a ``LoraDAResult`` like
    :func:`~lora_da_fast.solver.solve_lora_da` (which calls this under an active process group).

    Every rank must call it with the same statistics (as left by the data-parallel pass) and config.
    The input groups are assigned by :func:`assign_groups`; each rank solves its share; the factors
    and reports are then broadcast to every rank (``gather="all"``: every rank returns the full
    result) or sent to rank 0 (``gather="main"``: rank 0 returns the full result, the other ranks
    their own share). If a rank's solve raises, every rank raises (the others a
    :class:`DistributedError` naming it). Factors received from other ranks are placed on the device of
    the module's statistics. Without a process group this is ``solve_lora_da``.
    """
    from .solver import LoraDAResult, LoraFactors, solve_lora_da

    if gather not in ("all", "main"):
        raise ConfigError(f"gather must be 'all' or 'main', got {gather!r}")
    if not is_active():
        with no_sharding():
            return solve_lora_da(stats, cfg, progress=progress)
    world, me = dist.get_world_size(), dist.get_rank()
    groups = stats.groups()
    plan = assign_groups(stats, cfg, world)
    owner = {nm: r for r, gs in enumerate(plan) for g in gs for nm in groups[g]}
    layout = _fingerprint([cfg.rank, stats.num_examples, stats.num_tokens, stats.output_fisher]
                          + [(nm, st.group, st.d_out, st.d_in) for nm, st in stats.modules.items()])
    local = restrict(stats, plan[me])
    error: Optional[BaseException] = None
    res = LoraDAResult()
    try:
        if local.modules:
            with no_sharding():
                res = solve_lora_da(local, cfg, progress=progress and is_main())
        for nm, st in local.modules.items():
            f = res[nm]
            if tuple(f.lora_A.shape) != (cfg.rank, st.d_in) or tuple(f.lora_B.shape) != (st.d_out, cfg.rank):
                raise RuntimeError(f"solver returned factors of shapes {tuple(f.lora_A.shape)}, "
                                   f"{tuple(f.lora_B.shape)} for module {nm}")
    except Exception as exc:
        error = exc
    table = _exchange("the sharded solve", [layout], error)
    if error is not None:
        raise error
    if len(set(table[:, 1].tolist())) != 1:
        raise DistributedError("the ranks hold different statistics or configurations (module names, shapes, "
                               "counts or rank differ): every rank must solve the same statistics")

    receive = gather == "all" or me == 0
    cap = _bucket_elems(bucket_bytes)
    dev = _comm_device()
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
        pieces: List[_Piece] = []
        for nm in names:
            pieces += _flat_pieces(tensors[nm].lora_A, cap) + _flat_pieces(tensors[nm].lora_B, cap)
        for bucket in _buckets(pieces, cap):
            size = sum(p.numel for p in bucket)
            if src == me:
                flat = _fill(bucket, torch.empty(0, dtype=torch.float32, device=dev))
            else:
                flat = torch.empty(size, dtype=torch.float32, device=dev)
            if gather == "all":
                dist.broadcast(flat, src=src)
            elif src == me:
                dist.send(flat, dst=0)
            else:
                dist.recv(flat, src=src)
            if src != me:
                _drain(bucket, flat)
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
