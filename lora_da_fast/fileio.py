"""Atomic file writes, the temporary folders they go through, JSON helpers, and disk errors in words.

Every file the library writes (statistics, checkpoints) is written by :func:`write_atomic`: into a
temporary folder next to the target, flushed to disk, renamed over the target. A file is either its
previous content or complete, even after a crash, Ctrl-C or a full disk. (The CLI's adapter and its
report go through such a folder too, claimed as a whole: :mod:`lora_da_fast.cli.output`.)

Temporaries. Every temporary the library creates is a hidden folder ``.NAME.lora-da-tmp-TOKEN`` (TOKEN
random, made by :func:`make_temp_dir`) holding a marker file :data:`OWNER_FILE` that records TOKEN, the
run id (:data:`RUN_ID`, random per process), the process id and start time, the host and its boot id.
Reading these markers, removing the temporaries of runs that are certainly gone, and the no-replace and
exchange renames of the output folder are the CLI's (:mod:`lora_da_fast.cli.ownership`).

Disk errors. A full disk, a quota or a read-only file system raise ``OSError`` from Python and
``safetensors.SafetensorError`` from safetensors; :func:`disk_problem` recognises both, and
:func:`write_atomic` turns them into a :class:`~lora_da_fast.errors.ConfigError` naming the path and
saying to free space.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from typing import Callable, Iterator, Optional

from safetensors import SafetensorError

from .errors import ConfigError

RUN_ID = secrets.token_hex(8)  # this process's run: written into every temporary it creates
TMP_TAG = ".lora-da-tmp-"
OWNER_FILE = ".lora-da-fast-owner.json"
_OWNER_KIND = "lora-da-fast temporary"

# errno values of a disk that cannot take the write (not the caller's path being wrong)
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_DISK_WORDS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file too large for the file system", errno.EROFS: "read-only file system"}


# --------------------------------------------------------------------------------------------------
# Disk errors


def error_number(exc: BaseException) -> Optional[int]:
    """The ``errno`` of an ``OSError`` or of a ``SafetensorError`` (its text ends with ``(os error N)``)."""
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, SafetensorError):
        m = re.search(r"os error (\d+)", str(exc))
        return int(m.group(1)) if m else None
    return None


def disk_problem(exc: BaseException) -> Optional[str]:
    """Words for a full disk, a quota or a read-only file system behind ``exc`` (``OSError`` or
    ``SafetensorError``, also as the cause of another exception); ``None`` for anything else."""
    seen = 0
    while exc is not None and seen < 5:
        n = error_number(exc)
        if n in DISK_FULL_ERRNOS:
            return _DISK_WORDS[n]
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def write_error(exc: BaseException) -> str:
    """Short words for why a write failed (``OSError`` or ``SafetensorError``)."""
    words = disk_problem(exc)
    if words:
        return words
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return " ".join(str(exc).split()) or type(exc).__name__


def unreadable(path: str) -> Optional[str]:
    """Why the existing file ``path`` cannot be opened for reading, in words (``"permission denied"``), or
    ``None`` when it can or does not exist (the caller names a missing file in its own words). A reader
    that swallows ``OSError`` (e.g. a header sniffer) would otherwise call such a file "not ours"."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO: no wait for a writer
    except FileNotFoundError:
        return None
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        return (exc.strerror or type(exc).__name__).lower()
    os.close(fd)
    return None


def write_failure(what: str, path: str, exc: BaseException) -> ConfigError:
    """The :class:`ConfigError` for a failed write of ``what`` (e.g. "the statistics file") to ``path``:
    names the path, and says to free space when the disk is full, over quota or read-only."""
    why, disk = write_error(exc), disk_problem(exc)
    advice = ("; free space on that disk (or make it writable) or choose another path" if disk
              else "; check the path and its permissions")
    err = ConfigError(f"cannot write {what} {path} ({why}){advice}")
    err.disk = disk  # for a caller that says more (e.g. where a resume can start once there is space)
    return err


# --------------------------------------------------------------------------------------------------
# Owned temporaries


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _start_time(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux ``/proc/PID/stat`` field 22), ``None`` if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


_HOST = socket.gethostname()
_BOOT = _boot_id()
_ME = {"pid": os.getpid(), "start": _start_time(os.getpid())}


def _owner_record(token: str, **extra) -> dict:
    if _ME["pid"] != os.getpid():  # a forked child: its own pid and start time
        _ME.update(pid=os.getpid(), start=_start_time(os.getpid()))
    return {"kind": _OWNER_KIND, "token": token, "run_id": RUN_ID, "pid": _ME["pid"], "start": _ME["start"],
            "host": _HOST, "boot_id": _BOOT, **extra}


def make_temp_dir(target: str, **extra) -> str:
    """Create the hidden folder ``.NAME.lora-da-tmp-TOKEN`` next to ``target`` (NAME its base name)
    holding the owner marker (plus ``extra`` fields); returns its path. ``OSError`` /
    ``SafetensorError`` propagate."""
    parent = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target)[:120]  # the folder's name stays within NAME_MAX
    while True:
        token = secrets.token_hex(8)
        path = os.path.join(parent, f".{base}{TMP_TAG}{token}")
        try:
            os.mkdir(path)
            break
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
    try:
        with open(os.path.join(path, OWNER_FILE), "w") as f:
            json.dump(_owner_record(token, **extra), f)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def remove_temp_dir(path: str) -> None:
    """Remove a temporary folder this process created, its owner marker last: a process killed meanwhile
    (SIGKILL) leaves a folder that still carries its marker, which the next run recognises and removes
    (errors ignored)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            if name != OWNER_FILE:
                p = os.path.join(path, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(p)
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def signals_held(signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the body runs: a few steps that must happen together (create a
    temporary and remember it; rename into place and note it), so that an interrupt can never leave a
    temporary nobody will remove, or a state that the caller's message would misdescribe. A signal that
    arrives meanwhile is delivered, to the handler that was in place, as soon as the body ends. Outside
    the main thread (where handlers cannot be set) the body runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = {}
    try:
        for sig in signals:
            old[sig] = signal.signal(sig, lambda signum, frame: got.append(signum))
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(got):
            signal.raise_signal(sig)


def write_atomic(path: str, write: Callable[[str], None], what: str = "the file") -> None:
    """``write(tmp)`` then fsync and rename over ``path``; ``tmp`` lies in a temporary folder of this run
    next to ``path``, removed afterwards whatever happens. A failed write (``OSError`` or
    ``SafetensorError``: full disk, quota, read-only, permissions) becomes a :class:`ConfigError` naming
    ``what`` and ``path``; the previous ``path`` is left intact."""
    tmp_dir = None
    try:
        with signals_held():  # the temporary exists only once tmp_dir names it: removed below, always
            tmp_dir = make_temp_dir(path)
        tmp = os.path.join(tmp_dir, os.path.basename(path))
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except (OSError, SafetensorError) as exc:
        raise write_failure(what, path, exc) from None
    finally:
        if tmp_dir is not None:
            with signals_held():
                remove_temp_dir(tmp_dir)


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
