"""Plain ``torch.distributed`` communication, with no knowledge of LoRA-DA: rank queries, the process group
of a ``torchrun`` launch, a status exchange that turns a failure on one rank into an error on every rank,
and bucketed collectives over pieces of tensors (one triangle of a symmetric matrix, slices of a flat one).

Failures. Every collective step starts with a *status exchange*: one ``all_reduce`` of a ``[world, 8]``
int64 table where each rank fills its own row (failed flag, a payload of counts or layout checksums).
A rank whose local work raised takes part in that exchange through :func:`guard` /
:func:`report_failure`, so the healthy ranks learn which rank failed and why, and raise
:class:`DistributedError` instead of waiting in a collective that will never complete; the failing
rank re-raises its own exception. A rank that dies without reporting (killed, segfault, out of host
memory) is seen by its peers when their next collective fails: at once with gloo (the TCP connection
closes), after the process-group timeout with NCCL (:func:`init_from_env` sets it from
``LORA_DA_DIST_TIMEOUT``, seconds, default 1800), unless the launcher ends the job first. Those errors
are re-raised as :class:`DistributedError` too.

Buckets. Tensors are cut into :class:`Piece` s (a run of fp32 elements with a reader and a writer),
packed into buckets of ``bucket_bytes`` (default 256 MiB, env ``LORA_DA_BUCKET_MB``) staged on one
communication device (the rank's current CUDA device for NCCL, the CPU for gloo), one collective per
bucket. Tensors spread over several devices of one rank (``device_map="auto"``) are handled alike.
"""

import contextlib
import os
import zlib
from datetime import timedelta
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import ConfigError, DistributedError

T = TypeVar("T")

#: Bucket size of the statistics all-reduce and of the factor gather, in bytes. ``None``: the
#: environment variable ``LORA_DA_BUCKET_MB`` if set, else 256 MiB.
BUCKET_BYTES: Optional[int] = None
DEFAULT_BUCKET_BYTES = 256 * 2 ** 20
DEFAULT_TIMEOUT_S = 1800.0
_STATUS_WIDTH = 8  # int64 entries per rank in the status exchange: [failed, payload x 7]
_MAX_MESSAGE = 2000


# --------------------------------------------------------------------------------------------------
# Process group helpers (for the CLI and for scripts run under torchrun)

_owns_group = False


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
    t = torch.tensor([int(value)], dtype=torch.int64, device=comm_device())
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
    the engine does): the round-robin order then lets the statistics reduction put per-example results
    back in the single-process order.
    """
    r, world = dist.get_rank(), dist.get_world_size()
    for i, item in enumerate(items):
        if i % world == r:
            yield item


def _message(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def comm_device() -> torch.device:
    """Where collective buffers live: the current CUDA device for NCCL, the CPU otherwise."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange(where: str, payload: Sequence[int] = (), error: Optional[BaseException] = None) -> torch.Tensor:
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
    table = table.to(comm_device())
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
        exchange(where, error=exc)
    except Exception:  # pragma: no cover - exchange already swallows errors of failing ranks
        pass


@contextlib.contextmanager
def guard(where: str = "the statistics pass") -> Iterator[None]:
    """Wrap the *local* work of a rank (no collectives inside): if it raises, the other ranks are told
    through :func:`report_failure` before the exception propagates, while the healthy ranks wait in
    the :func:`exchange` that starts the next collective step::

        with guard("the statistics pass"):
            local_work()
        reduce_over_ranks()  # begins with exchange(...): raises DistributedError if a rank failed
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
        exchange(where)


# --------------------------------------------------------------------------------------------------
# Bucketed collectives over pieces of tensors


class Piece:
    """A run of fp32 elements of some tensor: ``read()`` returns them as a 1-D tensor, ``write(v)``
    stores ``v`` back. Pieces are what the buckets are filled with."""

    __slots__ = ("numel", "read", "write")

    def __init__(self, numel: int, read: Callable[[], torch.Tensor], write: Callable[[torch.Tensor], None]):
        self.numel, self.read, self.write = numel, read, write


def flat_pieces(t: torch.Tensor, cap: int) -> List[Piece]:
    """``t`` (contiguous) as slices of at most ``cap`` elements."""
    flat = t.view(-1)
    out = []
    for a in range(0, flat.numel(), cap):
        v = flat[a:a + cap]
        out.append(Piece(v.numel(), (lambda v=v: v), (lambda x, v=v: v.copy_(x))))
    return out


def buckets(pieces: Sequence[Piece], cap: int) -> Iterator[List[Piece]]:
    bucket, size = [], 0
    for p in pieces:
        if bucket and size + p.numel > cap:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel
    if bucket:
        yield bucket


def bucket_elems(bucket_bytes: Optional[int], element_size: int = 4) -> int:
    if bucket_bytes is None:
        bucket_bytes = BUCKET_BYTES
    if bucket_bytes is None:
        env = os.environ.get("LORA_DA_BUCKET_MB")
        bucket_bytes = int(float(env) * 2 ** 20) if env else DEFAULT_BUCKET_BYTES
    if bucket_bytes < element_size:
        raise ConfigError(f"bucket size must be at least {element_size} bytes, got {bucket_bytes}")
    return bucket_bytes // element_size


def fill(bucket: Sequence[Piece], buf: torch.Tensor) -> torch.Tensor:
    size = sum(p.numel for p in bucket)
    flat = buf[:size] if buf.numel() >= size else torch.empty(size, dtype=buf.dtype, device=buf.device)
    off = 0
    for p in bucket:
        flat[off:off + p.numel].copy_(p.read())
        off += p.numel
    return flat


def drain(bucket: Sequence[Piece], flat: torch.Tensor) -> None:
    off = 0
    for p in bucket:
        p.write(flat[off:off + p.numel])
        off += p.numel


def all_reduce_pieces(pieces: Sequence[Piece], cap: int) -> int:
    """Sum the pieces over all ranks, bucket by bucket; returns the number of buckets."""
    if not pieces:
        return 0
    dev = comm_device()
    buf = torch.empty(min(cap, sum(p.numel for p in pieces)), dtype=torch.float32, device=dev)
    count = 0
    for bucket in buckets(pieces, cap):
        flat = fill(bucket, buf)
        dist.all_reduce(flat)
        drain(bucket, flat)
        count += 1
    return count


def layout_crc(parts: Iterable[object]) -> int:
    """A CRC of a description (names, shapes) that must be the same on every rank."""
    return zlib.crc32(repr(list(parts)).encode())
