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

import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .version import __version__
from .config import LoraDAConfig
from .data import Example
from .errors import DataError
from .fileio import write_atomic
from .fisher import FORMAT_VERSION, FisherStatistics

CHECKPOINT_VERSION = 2
_META_KEY = "lora_da_fast_checkpoint"
_FINISHED = "F."  # tensor-name prefix of the finished slices' statistics

# What each part of a fingerprint covers, in words (messages name the parts that differ).
PART_NAMES = {
    "code": "lora_da_fast version",
    "model": "model (class, config, weights or dtype)",
    "targets": "target modules",
    "statistics": "statistics settings (token mask, output Fisher)",
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
    """Digest of every example's tokens and labels, in pass order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.input_ids.numpy().tobytes())
        h.update(b"|")
        h.update(e.labels.numpy().tobytes())
        h.update(b";")
    return h.hexdigest()


def fingerprint_parts(model: nn.Module, cfg: LoraDAConfig, targets: Dict[str, nn.Module],
                      examples: Sequence[Example], slices: Optional[List[List[str]]] = None) -> Dict[str, str]:
    """A digest per part of what a statistics pass depends on (keys of :data:`PART_NAMES`).

    ``targets`` and ``batching`` change which sums exist and the order in which they are added; the
    other parts change their values. A finished statistics file stays valid for a run that differs only
    in those two (the solve checks that every target has statistics); a checkpoint needs every part.
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
        "statistics": _digest(_dumps([cfg.token_mask, cfg.output_fisher])),
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


def _read(path: str, tensors: bool) -> Tuple[dict, Optional[Dict[str, torch.Tensor]]]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
        if not isinstance(meta, dict) or not isinstance(meta.get("done"), int):
            raise ValueError("no checkpoint header")
    except Exception as exc:
        raise DataError(f"{path} is not a readable statistics checkpoint ({type(exc).__name__}); "
                        "delete it to start the pass again") from None
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
    header = None
    if finished is not None:
        more, header = finished.to_tensors(_FINISHED)
        tensors.update(more)
    meta = {"fingerprint": combine(parts), "parts": parts, "version": CHECKPOINT_VERSION, "slice": slice_index,
            "done": done, "n": state["n"], "T": state["T"], "names": names, "finished": header}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)}),
                 lambda exc: f"cannot write the statistics checkpoint {path} ({exc.strerror or exc}); "
                             "free some disk space or choose another path")


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
    return FisherStatistics.from_tensors(tensors, meta["finished"], _FINISHED)


def resume(sp, path: str) -> int:
    """Load the sums of the checkpoint ``path`` (already :func:`check` ed) into ``sp``; returns the
    number of examples of its slice already done."""
    meta, tensors = _read(path, tensors=True)
    state = {"n": meta["n"], "T": meta["T"]}
    for key, names in meta["names"].items():
        state[key] = {name: tensors.get(f"{key}.{i}") for i, name in enumerate(names)}
    sp.load_state_dict(state)
    return int(meta["done"])
