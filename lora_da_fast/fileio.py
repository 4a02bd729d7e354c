"""Atomic file writes: a file is either its previous content or complete, even after a crash or Ctrl-C.

One helper for every file the library writes (statistics, checkpoints, reports): write to a temp file
in the same folder, flush it to disk, rename it over the target.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Optional

from .errors import ConfigError


def write_atomic(path: str, write: Callable[[str], None],
                 explain: Optional[Callable[[OSError], str]] = None) -> None:
    """``write(tmp)`` then fsync and rename over ``path``. An ``OSError`` becomes a :class:`ConfigError`
    with ``explain(exc)`` (default: "cannot write PATH (reason)"); the temp file is removed on failure."""
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
            why = explain(exc) if explain is not None else f"cannot write {path} ({exc.strerror or exc})"
            raise ConfigError(why) from None
        raise


def json_safe(obj):
    """Strict JSON: non-finite floats (e.g. the eigengap of a module with d_in == r) become null."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dump_json(obj, f) -> None:
    """``obj`` as indented strict JSON (see :func:`json_safe`) and a newline."""
    json.dump(json_safe(obj), f, indent=1, allow_nan=False)
    f.write("\n")


def write_json_atomic(path: str, obj) -> None:
    """``obj`` as strict JSON in ``path``, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            dump_json(obj, f)
    write_atomic(path, write)
