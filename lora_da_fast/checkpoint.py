"""Checkpoint and resume of the statistics pass.

A checkpoint is one safetensors file holding the pass's fp32 sums and counters, written atomically
(temp file, fsync, rename) at batch boundaries. Its fingerprint covers the model (class, config, target
shapes, a checksum of every parameter), the data (every example's tokens and labels, in pass order),
the configuration fields that change the sums or their order, and the code version: a resumed pass adds
the remaining batches in the same order as an uninterrupted one, so the result is bit-identical.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .data import Example
from .errors import ConfigError, DataError

CHECKPOINT_VERSION = 1


# What each part of a fingerprint covers, in words (messages name the parts that differ).
PART_NAMES = {
    "code": "lora_da_fast version",
    "model": "model (class, config, weights or dtype)",
    "targets": "target modules",
    "statistics": "statistics settings (token mask, output Fisher)",
    "batching": "batching (batch size, sort order, backend)",
    "data": "calibration data (examples, tokenizer, max length)",
}



def write_atomic(path: str, write: Callable[[str], None], explain: Callable[[OSError], str]) -> None:
    """``write(tmp)`` then fsync and rename over ``path``: ``path`` is either untouched or complete, even
    after a crash or Ctrl-C. An ``OSError`` becomes a :class:`ConfigError` with ``explain(exc)``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:  # an interrupted or failed write leaves the previous file intact
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise ConfigError(explain(exc)) from None
        raise

def _digest(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def fingerprint_parts(model, sp, examples: List[Example]) -> Dict[str, str]:
    """A digest per part of what a statistics pass depends on (keys of :data:`PART_NAMES`).

    ``targets`` and ``batching`` change which sums exist and the order in which they are added; the
    other parts change their values. A finished statistics file stays valid for a run that differs only
    in those two (the solve checks that every target has statistics); a checkpoint needs every part.
    """
    from . import __version__
    from .statistics import FORMAT_VERSION

    cfg = sp.cfg
    dumps = lambda obj: json.dumps(obj, sort_keys=True, default=str).encode()  # noqa: E731
    mc = getattr(model, "config", None)
    has_json = mc is not None and hasattr(mc, "to_json_string")
    config_json = mc.to_json_string(use_diff=False).encode() if has_json else b""
    with torch.no_grad():  # a checksum per parameter, computed where it lives (cheap even for 7B)
        sums = [torch.stack([p.double().sum(), (p.double() ** 2).sum()]).cpu() for p in model.parameters()]
    return {
        "code": _digest(dumps([__version__, FORMAT_VERSION, CHECKPOINT_VERSION])),
        "model": _digest(dumps(type(model).__name__), config_json,
                         torch.stack(sums).numpy().tobytes() if sums else b""),
        "targets": _digest(dumps([cfg.target_modules,
                                  [[n, list(m.weight.shape), str(m.weight.dtype)] for n, m in sp.targets.items()]])),
        "statistics": _digest(dumps([cfg.token_mask, cfg.output_fisher])),
        "batching": _digest(dumps([cfg.batch_size, cfg.sort_by_length, cfg.backend])),
        "data": _data_digest(examples),
    }


def combine(parts: Dict[str, str]) -> str:
    """One digest for a dict of parts."""
    return _digest(json.dumps(parts, sort_keys=True).encode())


# combine(parts) -> parts, so that a checkpoint stores its parts and a refusal can name what differs
_PARTS: Dict[str, Dict[str, str]] = {}


def _data_digest(examples: List[Example]) -> str:
    """Digest of every example's tokens and labels, in pass order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.input_ids.numpy().tobytes())
        h.update(b"|")
        h.update(e.labels.numpy().tobytes())
        h.update(b";")
    return h.hexdigest()


def fingerprint(model, sp, examples: List[Example]) -> str:
    """Digest of model, targets, configuration, data (every example's tokens and labels, in pass order)
    and code version: a checkpoint resumes only into a pass with the same fingerprint."""
    return fingerprint_with_parts(model, sp, examples)[0]


def fingerprint_with_parts(model, sp, examples: List[Example], like: Optional[Dict[str, str]] = None
                           ) -> Tuple[str, Dict[str, str]]:
    """``(fingerprint, its parts)``; with ``like`` (the parts of the same pass over other examples, e.g.
    all of them where ``examples`` is a rank's shard) only the data part is computed again."""
    parts = fingerprint_parts(model, sp, examples) if like is None else dict(like, data=_data_digest(examples))
    fp = combine(parts)
    _PARTS[fp] = parts
    return fp, parts


def differing(have: Optional[Dict[str, str]], want: Dict[str, str]) -> List[str]:
    """Words for the parts of ``want`` that ``have`` lacks or holds with another digest."""
    have = have if isinstance(have, dict) else {}
    return [PART_NAMES.get(k, k) for k in want if have.get(k) != want[k]]


def _write(sp, path: str, fp: str, done: int) -> None:
    from safetensors.torch import save_file

    state = sp.state_dict()
    tensors, names = {}, {}
    for key in ("G", "y", "Z", "seq"):
        names[key] = []
        for i, (name, t) in enumerate(state[key].items()):
            names[key].append(name)
            if t is not None:
                tensors[f"{key}.{i}"] = t.detach().contiguous().cpu()
    meta = {"fingerprint": fp, "done": done, "n": state["n"], "T": state["T"], "skipped": state["skipped"],
            "names": names, "version": CHECKPOINT_VERSION, "parts": _PARTS.get(fp)}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"lora_da_fast_checkpoint": json.dumps(meta)}),
                 lambda exc: f"cannot write the statistics checkpoint {path} ({exc.strerror or exc}); "
                             "free some disk space or choose another --stats-cache")


def saver(sp, path: str, fp: str, every: int) -> Callable[[int], None]:
    """``on_batch`` callback writing a checkpoint once at least ``every`` examples were added."""
    last = {"done": None}

    def on_batch(done: int) -> None:
        if last["done"] is None:
            last["done"] = done - sp.cfg.batch_size
        if done - last["done"] >= every:
            _write(sp, path, fp, done)
            last["done"] = done
    return on_batch


def _read(path: str, tensors: bool):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})["lora_da_fast_checkpoint"])
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
        if not isinstance(meta, dict) or not isinstance(meta.get("done"), int):
            raise ValueError("no checkpoint header")
    except Exception as exc:
        raise DataError(f"{path} is not a readable statistics checkpoint ({type(exc).__name__}); "
                        "delete it to start the pass again") from None
    return meta, data


def peek(path: str) -> Optional[dict]:
    """The header of the checkpoint ``path`` (``done``: examples done, ``fingerprint``, ``parts``), or
    ``None`` if there is none; :class:`DataError` if the file is not a checkpoint."""
    if not os.path.exists(path):
        return None
    return _read(path, tensors=False)[0]


def mismatch_message(path: str, meta: dict, fp: str) -> str:
    """Why the checkpoint ``path`` cannot be resumed into the pass of fingerprint ``fp``."""
    want = _PARTS.get(fp)
    what = differing(meta.get("parts"), want) if want else []
    return (f"the checkpoint {path} was made with another model, data, configuration or code version"
            + (f" (differs in: {', '.join(what)})" if what else "")
            + "; rerun with the same settings to resume, or delete it to start the pass again")


def resume(sp, path: str, fp: str) -> int:
    """Load ``path`` into ``sp`` if it exists; returns the number of examples already done."""
    if not os.path.exists(path):
        return 0
    meta, tensors = _read(path, tensors=True)
    if meta.get("fingerprint") != fp:
        raise DataError(mismatch_message(path, meta, fp))
    state = {"n": meta["n"], "T": meta["T"], "skipped": sp.skipped}
    for key, names in meta["names"].items():
        state[key] = {name: tensors.get(f"{key}.{i}") for i, name in enumerate(names)}
    sp.load_state_dict(state)
    return int(meta["done"])
