"""The run's own temporary folders next to ``--out``, their owner records, and the renames the output folder
uses: a rename that never replaces, and an atomic swap of two paths.

Owner records. Every temporary the library creates is a hidden folder ``.NAME.lora-da-tmp-TOKEN`` made by
:func:`lora_da_fast.fileio.make_temp_dir` (TOKEN random), holding a marker file
:data:`~lora_da_fast.fileio.OWNER_FILE` that records TOKEN, the run id (:data:`~lora_da_fast.fileio.RUN_ID`,
random per process), the process id and start time, the host and its boot id. A later run reads these
markers (:func:`read_owner`) and removes such a folder (:func:`remove_stale_temporaries`) only when the
marker matches the folder's name and its process is certainly gone (:func:`owner_gone`): same host, and
another boot, or the pid not alive, or alive but started at another time (a reused pid). Nothing is ever
removed or renamed by a name pattern alone, so a user's ``adapter.old-2024`` or ``stats.tmp-2023.txt`` is
never touched; the one exception holds nothing: an *empty* folder named exactly as our temporaries
(``.NAME.lora-da-tmp-`` and 16 hex digits), what a run killed between creating its folder and writing the
marker (or between removing the marker and the folder) leaves, is removed with ``rmdir``.

Renames. :func:`rename_noreplace` and :func:`exchange` use Linux ``renameat2`` (``RENAME_NOREPLACE``,
``RENAME_EXCHANGE``) where the system and file system offer it; otherwise :func:`rename_noreplace` falls
back to a check and a hard link or rename, and :func:`exchange` reports that it cannot swap.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
from typing import Callable, List, Optional

from ..fileio import OWNER_FILE, RUN_ID, TMP_TAG, _BOOT, _HOST, _OWNER_KIND, _start_time


# --------------------------------------------------------------------------------------------------
# Owner records


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


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


_EMPTY_TMP = re.compile(r"\..+" + re.escape(TMP_TAG) + r"[0-9a-f]{16}")


def _remove_empty_unmarked(folder: str) -> List[str]:
    """Empty folders named as our temporaries, without a marker: a run killed between creating its folder
    and writing the marker, or between removing the marker and the folder (its last two steps). Removed
    with ``rmdir``, which only removes an empty folder: nothing in them can be lost. (A live run's folder
    is empty for the microseconds between those steps; if it is removed then, that run's write fails
    and says so.)"""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        path = os.path.join(folder, name)
        if not _EMPTY_TMP.fullmatch(name) or os.path.islink(path) or not os.path.isdir(path):
            continue
        with contextlib.suppress(OSError):
            if not os.listdir(path):
                os.rmdir(path)
                removed.append(path)
    return removed


def remove_stale_temporaries(folder: str, restore: Optional[Callable[[str, dict], None]] = None) -> List[str]:
    """Remove the temporaries of dead runs in ``folder`` (see :func:`stale_temporaries`), and empty unmarked
    ones (:func:`_remove_empty_unmarked`); ``restore(path, owner)``, if given, is called first (e.g. to put
    back a previous adapter a killed run had moved into it). Returns the folders removed."""
    removed = _remove_empty_unmarked(folder)
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
