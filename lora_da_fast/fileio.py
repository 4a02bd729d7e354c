"""Atomic file writes, the run's own temporaries, and disk errors in words.

Every file the library writes (statistics, checkpoints, reports) is written by :func:`write_atomic`:
into a temporary folder next to the target, flushed to disk, renamed over the target. A file is
either its previous content or complete, even after a crash, Ctrl-C or a full disk.

Ownership. Every temporary the library creates is a hidden folder ``.NAME.lora-da-tmp-TOKEN`` (TOKEN
random) holding a marker file :data:`OWNER_FILE` that records TOKEN, the run id (:data:`RUN_ID`, random
per process), the process id and start time, the host and its boot id. A later run removes such a folder
(:func:`remove_stale_temporaries`) only when the marker matches the folder's name and its process is
certainly gone: same host, and another boot, or the pid not alive, or alive but started at another time
(a reused pid). Nothing is ever removed or renamed by a name pattern alone, so a user's
``adapter.old-2024`` or ``stats.tmp-2023.txt`` is never touched.

Disk errors. A full disk, a quota or a read-only file system raise ``OSError`` from Python and
``safetensors.SafetensorError`` from safetensors; :func:`disk_problem` recognises both, and
:func:`write_atomic` turns them into a :class:`~lora_da_fast.errors.ConfigError` naming the path and
saying to free space.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import secrets
import shutil
import socket
from typing import Callable, List, Optional

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


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


def read_owner(path: str) -> Optional[dict]:
    """The marker of the temporary folder ``path`` if it is one of ours (a marker whose token is the
    one in the folder's name); ``None`` otherwise."""
    name = os.path.basename(path.rstrip(os.sep))
    if TMP_TAG not in name or os.path.islink(path) or not os.path.isdir(path):
        return None
    token = name.rsplit(TMP_TAG, 1)[1]
    try:
        with open(os.path.join(path, OWNER_FILE)) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or owner.get("kind") != _OWNER_KIND or owner.get("token") != token:
        return None
    return owner


def owner_gone(owner: dict) -> bool:
    """Whether the process that wrote ``owner`` is certainly gone (unknown: not gone)."""
    if owner.get("host") != _HOST:
        return False  # another machine on a shared file system: cannot tell
    if owner.get("boot_id") and _BOOT and owner["boot_id"] != _BOOT:
        return True  # the machine rebooted since
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():  # this process, or an earlier one that had its pid (then it is gone)
        return owner.get("run_id") != RUN_ID
    if not _pid_alive(pid):
        return True
    start = _start_time(pid)
    return start is not None and owner.get("start") is not None and start != owner["start"]  # pid reused


def remove_temp_dir(path: str) -> None:
    """Remove a temporary folder this process created (errors ignored)."""
    shutil.rmtree(path, ignore_errors=True)


def stale_temporaries(folder: str) -> List[str]:
    """The temporary folders in ``folder`` left by runs that are certainly gone (see the module doc)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    out = []
    for name in sorted(names):
        if not name.startswith(".") or TMP_TAG not in name:
            continue
        path = os.path.join(folder, name)
        owner = read_owner(path)
        if owner is not None and owner_gone(owner):
            out.append(path)
    return out


def remove_stale_temporaries(folder: str, restore: Optional[Callable[[str, dict], None]] = None) -> List[str]:
    """Remove the temporaries of dead runs in ``folder`` (see :func:`stale_temporaries`); ``restore(path,
    owner)``, if given, is called first (e.g. to put back a previous adapter a killed run had moved
    into it). Returns the folders removed."""
    removed = []
    for path in stale_temporaries(folder):
        owner = read_owner(path) or {}
        if restore is not None:
            with contextlib.suppress(OSError):
                restore(path, owner)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------------
# Renames that never replace, or swap


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _load_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _rename2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; ``True`` if done, ``False`` if the system or file system does not
    offer it (then the caller falls back); ``OSError`` for any other failure."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dst)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists (never replaces it, also when it
    appears at the last moment, where the system offers ``RENAME_NOREPLACE``)."""
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    if not os.path.isdir(src):
        try:
            os.link(src, dst)  # fails if dst exists
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system: the check above is all there is
            pass
        else:
            os.remove(src)
            return
    os.rename(src, dst)  # for a folder, a non-empty one at dst makes this fail; an empty one is the small window


def exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` atomically; ``False`` if the system cannot (nothing done)."""
    return _rename2(a, b, _RENAME_EXCHANGE)


# --------------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str, write: Callable[[str], None], what: str = "the file") -> None:
    """``write(tmp)`` then fsync and rename over ``path``; ``tmp`` lies in a temporary folder of this run
    next to ``path``, removed afterwards whatever happens. A failed write (``OSError`` or
    ``SafetensorError``: full disk, quota, read-only, permissions) becomes a :class:`ConfigError` naming
    ``what`` and ``path``; the previous ``path`` is left intact."""
    tmp_dir = None
    try:
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


def write_json_atomic(path: str, obj, what: str = "the file") -> None:
    """``obj`` as strict JSON in ``path``, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            dump_json(obj, f)
    write_atomic(path, write, what)
