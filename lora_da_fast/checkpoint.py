"""Checkpoint and resume of the statistics pass.

A checkpoint is one safetensors file written atomically at batch boundaries: the fp32 sums and counters
of the pass in progress, which slice of the model it is (``layers_per_pass``), and the finished
statistics of the slices before it. Its fingerprint covers the model (class, config, target shapes, a
checksum of every parameter), the data (every example's tokens and labels, in pass order), the
configuration fields that change the sums or their order, the slice plan and the code version: a
resumed pass adds the remaining batches in the same order as an uninterrupted one, so the result is
bit-identical. The fingerprint's parts are computed by the caller and passed in explicitly, so that a
refusal can name the part that differs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import comm
from .config import LoraDAConfig
from .data import Example
from .errors import DataError
from .fileio import unreadable, write_atomic
from .fisher import FORMAT_VERSION, FisherStatistics, content_checksum, damaged_message, safetensors_header_has
from .version import __version__

CHECKPOINT_VERSION = 3  # 3: content checksum
_META_KEY = "lora_da_fast_checkpoint"
_FINISHED = "F."  # tensor-name prefix of the finished slices' statistics
_TOKENS = "tok."  # tensor-name prefix of the pass's kept token rows (lora_da_fast.statistics.token_store)

# What each part of a fingerprint covers, in words (messages name the parts that differ).
PART_NAMES = {
    "code": "lora_da_fast version",
    "model": "model (class, config, weights or dtype)",
    "targets": "target modules",
    "statistics": "statistics settings (token mask, output Fisher, loss function)",
    "batching": "batching (batch size, sort order, backend, layers per pass)",
    "data": "calibration data (examples, tokenizer, max length)",
}


def _digest(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode()


def data_digest(examples: Sequence[Example]) -> str:
    """Digest of every example's tokens, labels and other fields (a class label, per-token weights: what
    a ``loss_fn`` may read), in pass order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.input_ids.numpy().tobytes())
        h.update(b"|")
        h.update(e.labels.numpy().tobytes())
        for kind, table in (("t", e.token_fields), ("e", e.fields)):
            for name in sorted(table):  # examples without fields hash as before
                t = table[name].detach().cpu().contiguous()
                h.update(f"|{kind}:{name}:{t.dtype}:{tuple(t.shape)}|".encode())
                h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        h.update(b";")
    return h.hexdigest()


def loss_name(loss_fn) -> Optional[str]:
    """What the fingerprint records of a ``loss_fn``: its module and qualified name (``None`` for the
    built-in causal-LM loss). A name, not the code: two functions of one name (e.g. a lambda edited between
    runs) look alike; a different function or none is told apart."""
    if loss_fn is None:
        return None
    fn = getattr(loss_fn, "func", loss_fn)  # functools.partial: the wrapped function
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{qual}"


def fingerprint_parts(model: nn.Module, cfg: LoraDAConfig, targets: Dict[str, nn.Module],
                      examples: Sequence[Example], slices: Optional[List[List[str]]] = None,
                      loss_fn=None) -> Dict[str, str]:
    """A digest per part of what a statistics pass depends on (keys of :data:`PART_NAMES`).

    ``targets`` and ``batching`` change which sums exist and the order in which they are added; the
    other parts change their values. A finished statistics file stays valid for a run that differs only
    in those two (the solve checks that every target has statistics); a checkpoint needs every part.
    ``loss_fn`` enters the statistics part by name (:func:`loss_name`); without one the digest is the
    one files written before it was recorded carry.
    """
    mc = getattr(model, "config", None)
    config_json = mc.to_json_string(use_diff=False).encode() if hasattr(mc, "to_json_string") else b""
    with torch.no_grad():  # a checksum per parameter, computed where it lives (cheap even for 7B)
        sums = [torch.stack([p.double().sum(), (p.double() ** 2).sum()]).cpu() for p in model.parameters()]
    plan = [len(s) for s in slices] if slices is not None else None
    return {
        "code": _digest(_dumps([__version__, FORMAT_VERSION, CHECKPOINT_VERSION])),
        "model": _digest(_dumps(type(model).__name__), config_json,
                         torch.stack(sums).numpy().tobytes() if sums else b""),
        "targets": _digest(_dumps([[n, list(m.weight.shape), str(m.weight.dtype)] for n, m in targets.items()])),
        "statistics": _digest(_dumps([cfg.token_mask, cfg.output_fisher]
                                     + ([loss_name(loss_fn)] if loss_fn is not None else []))),
        "batching": _digest(_dumps([cfg.batch_size, cfg.sort_by_length, cfg.backend, plan])),
        "data": data_digest(examples),
    }


def combine(parts: Dict[str, str]) -> str:
    """One digest for a dict of parts."""
    return _digest(json.dumps(parts, sort_keys=True).encode())


def differing(have: Optional[Dict[str, str]], want: Dict[str, str]) -> List[str]:
    """Words for the parts of ``want`` that ``have`` lacks or holds with another digest."""
    have = have if isinstance(have, dict) else {}
    return [PART_NAMES.get(k, k) for k in want if have.get(k) != want[k]]


def is_checkpoint_file(path: str) -> bool:
    """Whether ``path`` is a checkpoint :func:`write` wrote (by its header; damaged or not)."""
    return os.path.isfile(path) and not os.path.islink(path) and safetensors_header_has(path, _META_KEY)


def _damaged(path: str, why: str) -> DataError:
    return DataError(damaged_message(path, why) + " (the statistics pass starts again)")


def _read(path: str, tensors: bool) -> Tuple[dict, Optional[Dict[str, torch.Tensor]]]:
    """The header (and the tensors, checked against the content checksum) of the checkpoint ``path``."""
    why = unreadable(path)
    if why:  # the header check below cannot tell an unreadable checkpoint from a file that is not one
        raise DataError(f"the checkpoint {path}: cannot read: {why}")
    if not safetensors_header_has(path, _META_KEY):  # not ours: never advise deleting it
        raise DataError(f"{path} exists and is not a lora_da_fast checkpoint: the statistics pass would "
                        "overwrite it; move it away or choose another path")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
        if not isinstance(meta, dict) or not isinstance(meta.get("done"), int):
            raise ValueError("no checkpoint header")
    except Exception as exc:  # safetensors and json raise several types for a damaged file
        raise _damaged(path, f"not a readable statistics checkpoint: {type(exc).__name__}") from None
    if meta.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"the checkpoint {path} was written by another lora_da_fast version (checkpoint format "
                        f"{meta.get('version')!r}, this version reads {CHECKPOINT_VERSION}): delete {path} and "
                        "rerun (the statistics pass starts again)")
    if data is not None:
        if not isinstance(meta.get("checksum"), str):
            raise _damaged(path, "no content checksum")
        if content_checksum(data, meta) != meta["checksum"]:
            raise _damaged(path, "content checksum mismatch: the file changed after it was written")
    return meta, data


def peek(path: str) -> Optional[dict]:
    """The header of the checkpoint ``path`` (``done``: examples done in its slice, ``slice``,
    ``fingerprint``, ``parts``), or ``None`` if there is none; :class:`DataError` if it is not one."""
    if not os.path.exists(path):
        return None
    return _read(path, tensors=False)[0]


def mismatch_message(path: str, meta: dict, parts: Dict[str, str]) -> str:
    """Why the checkpoint ``path`` cannot be resumed into a pass whose fingerprint has ``parts``."""
    what = differing(meta.get("parts"), parts)
    return (f"the checkpoint {path} was made with another model, data, configuration or code version"
            + (f" (differs in: {', '.join(what)})" if what else "")
            + "; rerun with the same settings to resume, or delete it to start the pass again")


def check(path: str, parts: Dict[str, str]) -> Optional[dict]:
    """The header of the checkpoint ``path`` if there is one and it matches ``parts``; ``None`` if there
    is none; :class:`DataError` naming what differs otherwise."""
    meta = peek(path)
    if meta is not None and meta.get("fingerprint") != combine(parts):
        raise DataError(mismatch_message(path, meta, parts))
    return meta


def write(path: str, state: Optional[dict], parts: Dict[str, str], slice_index: int, done: int,
          finished: Optional[FisherStatistics]) -> None:
    """Checkpoint a pass's ``state`` (``StatisticsPass.state_dict()``; ``None`` before its first batch)
    in slice ``slice_index`` with ``done`` examples of it, and the statistics of the slices before it."""
    state = state if state is not None else {"n": 0, "T": 0}
    tensors, names = {}, {}
    for key in ("G", "y", "Z", "seq"):
        names[key] = []
        for i, (name, t) in enumerate(state.get(key, {}).items()):
            names[key].append(name)
            if t is not None:
                tensors[f"{key}.{i}"] = t.detach().contiguous().cpu()
    rows = state.get("tokens") or {}
    for key, t in rows.items():
        tensors[f"{_TOKENS}{key}"] = t.detach().contiguous().cpu()
    header = None
    if finished is not None:
        more, header = finished.to_tensors(_FINISHED)
        tensors.update(more)
    meta = {"fingerprint": combine(parts), "parts": parts, "version": CHECKPOINT_VERSION, "slice": slice_index,
            "done": done, "n": state["n"], "T": state["T"], "names": names, "finished": header,
            "tokens": sorted(rows)}
    meta["checksum"] = content_checksum(tensors, meta)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)}),
                 "the statistics checkpoint")


def saver(sp, path: str, parts: Dict[str, str], every: int, slice_index: int,
          finished: Optional[FisherStatistics]) -> Callable[[int], None]:
    """``on_batch`` callback writing a checkpoint once at least ``every`` examples were added."""
    last = {"done": None}

    def on_batch(done: int) -> None:
        if last["done"] is None:
            last["done"] = done - sp.cfg.batch_size
        if done - last["done"] >= every:
            write(path, sp.state_dict(), parts, slice_index, done, finished)
            last["done"] = done
    return on_batch


def load_finished(path: str) -> Optional[FisherStatistics]:
    """The statistics of the slices finished before the checkpoint ``path`` was written (``None``: none)."""
    meta, tensors = _read(path, tensors=True)
    if not meta.get("finished"):
        return None
    try:
        return FisherStatistics.from_tensors(tensors, meta["finished"], _FINISHED)
    except DataError as exc:
        raise _damaged(path, f"finished statistics: {exc}") from None


def _check_state(path: str, meta: dict, tensors: Dict[str, torch.Tensor], mine: dict, needs_seq: bool) -> dict:
    """The pass state of the checkpoint, checked against the pass it is loaded into (``mine``: its
    fresh ``state_dict()``): the same modules, each tensor with the shape and dtype of the pass's own
    accumulator, the sequence sums ``[n, d_out]``, sane counters. :class:`DataError` otherwise."""
    n, T, done = meta.get("n"), meta.get("T"), meta.get("done")
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (n, T, done))
    if not ints or n > done or T < n:
        raise _damaged(path, f"counters: {n!r} examples, {T!r} tokens, {done!r} done")
    names = meta.get("names")
    if not isinstance(names, dict) or set(names) != {"G", "y", "Z", "seq"}:
        raise _damaged(path, "no record of the tensor names")
    state = {"n": n, "T": T}
    used = set()
    for key, listed in names.items():
        own = mine.get(key) or {}
        if not isinstance(listed, list) or sorted(map(str, listed)) != sorted(own):
            raise DataError(f"the checkpoint {path} does not match this run's target modules ({key}); delete it "
                            "and rerun (the statistics pass starts again)")
        state[key] = {}
        for i, name in enumerate(listed):
            t = tensors.get(f"{key}.{i}")
            used.add(f"{key}.{i}")
            ref = own[name]
            if key == "seq":
                if (t is None and needs_seq and n > 0) or (t is not None and (t.dim() != 2 or t.shape[0] != n)):
                    raise _damaged(path, f"sequence sums of {name}: expected {n} rows")
                width = mine["G"][name].shape[0] if name in mine["G"] else None
                ok = t is None or (t.dim() == 2 and t.dtype.is_floating_point
                                   and (width is None or t.shape[1] == width))
            else:
                ok = t is not None and ref is not None and t.shape == ref.shape and t.dtype == ref.dtype
            if not ok:
                got = "missing" if t is None else f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"
                raise _damaged(path, f"{key} of {name} is {got}, the pass holds "
                                     + (f"{str(ref.dtype).replace('torch.', '')} {list(ref.shape)}"
                                        if ref is not None else "none"))
            state[key][name] = t
    state["tokens"] = _check_token_rows(path, meta, tensors, mine.get("tokens"), used)
    extra = sorted(k for k in tensors if not k.startswith(_FINISHED) and k not in used)
    if extra:
        raise _damaged(path, f"tensors not expected: {', '.join(extra[:3])}")
    return state


def _check_token_rows(path: str, meta: dict, tensors: Dict[str, torch.Tensor], mine: Optional[dict],
                      used: set) -> Optional[Dict[str, torch.Tensor]]:
    """The kept token rows of the checkpoint (``None`` if it has none: the pass then solves those groups
    through their input factors), checked against the pass's own (``mine``: same groups and modules,
    widths, one row count)."""
    listed = meta.get("tokens") or []
    if not listed:
        return None
    if not isinstance(listed, list) or mine is None or sorted(listed) != sorted(mine):
        raise DataError(f"the checkpoint {path} does not match this run's kept tokens; delete it and rerun (the "
                        "statistics pass starts again)")
    rows = {}
    for key in listed:
        t = tensors.get(f"{_TOKENS}{key}")
        used.add(f"{_TOKENS}{key}")
        ref = mine[key]
        if t is None or t.dtype != ref.dtype or tuple(t.shape[1:]) != tuple(ref.shape[1:]) \
                or t.shape[0] != tensors.get(f"{_TOKENS}key", t).shape[0]:
            raise _damaged(path, f"token rows {key}")
        rows[key] = t
    return rows


def resume(sp, path: str) -> int:
    """Load the sums of the checkpoint ``path`` (already :func:`check` ed) into ``sp``; returns the
    number of examples of its slice already done."""
    meta, tensors = _read(path, tensors=True)
    needs_seq = getattr(sp.cfg, "output_fisher", "diagonal") == "sequence_lowrank"
    sp.load_state_dict(_check_state(path, meta, tensors, sp.state_dict(), needs_seq))
    return int(meta["done"])


class PassCheckpoint:
    """The checkpoint of one run's statistics passes: this rank's file (``FILE``, ``FILE.rankR`` under
    torch.distributed, where each rank checkpoints its own shard of the examples), the fingerprint parts
    it carries, and where a resumed run starts (slice and examples done).

    :meth:`open` checks an existing file against the run (a mismatch is a :class:`DataError` naming the
    part that differs); the engine then asks it for the finished slices' statistics (:meth:`finished`),
    loads the sums of the slice in progress (:meth:`resume_into`), writes as the pass goes
    (:meth:`on_batch`, :meth:`slice_done`) and removes the file when the run is done (:meth:`remove`).
    """

    def __init__(self, path: str, parts: Dict[str, str], every: int, resumed: Optional[dict]):
        self.path, self.parts, self.every, self.resumed = path, parts, every, resumed

    @classmethod
    def open(cls, base: str, parts: Dict[str, str], mine: Sequence[Example], every: int) -> "PassCheckpoint":
        parts = dict(parts)
        path = base
        if comm.is_active():  # each rank checkpoints its own shard: resuming needs the same number of ranks
            path = f"{base}.rank{comm.rank()}"
            parts["data"] = data_digest(mine)
        try:
            resumed = check(path, parts)
        except DataError as exc:
            hint = (" (under torchrun each rank checkpoints its own shard of the examples: resume with the "
                    "same number of ranks)" if comm.is_active() else "")
            raise DataError(f"{exc}{hint}") from None
        return cls(path, parts, every, resumed)

    @property
    def start_slice(self) -> int:
        return int(self.resumed["slice"]) if self.resumed is not None else 0

    @property
    def done(self) -> int:
        """Examples of the slice in progress that the file holds."""
        return int(self.resumed["done"]) if self.resumed is not None else 0

    def finished(self) -> Optional[FisherStatistics]:
        """The statistics of the slices finished before the file was written (``None``: none)."""
        return load_finished(self.path) if self.resumed is not None else None

    def resume_into(self, sp, slice_index: int) -> int:
        """Load the file's sums into the pass ``sp`` of slice ``slice_index`` if that is the slice the file
        stopped in; returns the number of its examples already done (0 otherwise)."""
        if slice_index == self.start_slice and self.done > 0:
            return resume(sp, self.path)
        return 0

    def on_batch(self, sp, slice_index: int, finished: Optional[FisherStatistics]) -> Callable[[int], None]:
        """The pass's ``on_batch`` callback: a checkpoint every ``every`` examples."""
        return saver(sp, self.path, self.parts, self.every, slice_index, finished)

    def slice_done(self, next_slice: int, finished: FisherStatistics) -> None:
        """A slice is done: the next one starts from here after a crash."""
        write(self.path, None, self.parts, next_slice, 0, finished)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
