"""Checkpoint and resume of the statistics pass.

A checkpoint is one safetensors file holding the pass's fp32 sums and counters, written atomically
(temp file, fsync, rename) at batch boundaries. Its fingerprint covers the model (class, config, target
shapes, a checksum of every parameter), the data (every example's tokens and labels, in pass order),
the configuration fields that change the sums or their order, and the code version: a resumed pass adds
the remaining batches in the same order as an uninterrupted one, so the result is bit-identical.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, List

import torch

from .data import Example
from .errors import DataError

CHECKPOINT_VERSION = 1


def fingerprint(model, sp, examples: List[Example]) -> str:
    from . import __version__
    from .statistics import FORMAT_VERSION

    h = hashlib.sha256()
    cfg = sp.cfg
    h.update(json.dumps({
        "code": [__version__, FORMAT_VERSION, CHECKPOINT_VERSION],
        "config": [cfg.token_mask, cfg.output_fisher, cfg.target_modules, cfg.batch_size, cfg.sort_by_length,
                   cfg.backend],
        "model": type(model).__name__,
        "targets": [[n, list(m.weight.shape), str(m.weight.dtype)] for n, m in sp.targets.items()],
    }, sort_keys=True, default=str).encode())
    mc = getattr(model, "config", None)
    if mc is not None and hasattr(mc, "to_json_string"):
        h.update(mc.to_json_string(use_diff=False).encode())
    with torch.no_grad():  # a checksum per parameter, computed where it lives (cheap even for 7B)
        sums = [torch.stack([p.double().sum(), (p.double() ** 2).sum()]).cpu() for p in model.parameters()]
    h.update(torch.stack(sums).numpy().tobytes() if sums else b"")
    for e in examples:
        h.update(e.input_ids.numpy().tobytes())
        h.update(b"|")
        h.update(e.labels.numpy().tobytes())
        h.update(b";")
    return h.hexdigest()


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
            "names": names, "version": CHECKPOINT_VERSION}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata={"lora_da_fast_checkpoint": json.dumps(meta)})
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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


def resume(sp, path: str, fp: str) -> int:
    """Load ``path`` into ``sp`` if it exists; returns the number of examples already done."""
    if not os.path.exists(path):
        return 0
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})["lora_da_fast_checkpoint"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise DataError(f"{path} is not a readable statistics checkpoint ({type(exc).__name__}); "
                        "delete it to start the pass again") from None
    if meta.get("fingerprint") != fp:
        raise DataError(f"the checkpoint {path} was made with another model, data, configuration or code "
                        "version; delete it (or choose another --stats-cache) to start the pass again")
    state = {"n": meta["n"], "T": meta["T"], "skipped": sp.skipped}
    for key, names in meta["names"].items():
        state[key] = {name: tensors.get(f"{key}.{i}") for i, name in enumerate(names)}
    sp.load_state_dict(state)
    return int(meta["done"])
