"""The output folder: checked before any work, written under a temporary name next to it and renamed
into place at the end, so ``--out`` is either its previous content or the complete new adapter; and
the cleanup of what a killed run left behind."""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from typing import Optional

from ..errors import ConfigError
from ..fileio import write_json_atomic

REPORT_FILE = "lora_da_report.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", REPORT_FILE)


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an existing ``out`` without ``--overwrite``, and with it anything but an adapter folder."""
    if os.path.lexists(out):
        if not overwrite:
            raise ConfigError(f"--out {out} exists; add --overwrite to replace it")
        if not os.path.isdir(out) or os.path.islink(out):
            raise ConfigError(f"--out {out} exists and is not a folder; not replacing it")
        try:
            entries = os.listdir(out)
        except OSError as exc:
            raise ConfigError(f"--out {out}: cannot read the folder ({exc.strerror or exc})") from None
        if entries and not any(f in entries for f in ADAPTER_FILES):
            raise ConfigError(f"--out {out} is a non-empty folder that holds no adapter; not replacing it")
    parent = os.path.dirname(out) or "."
    up = parent
    while up and not os.path.lexists(up):
        up = os.path.dirname(up) if os.path.dirname(up) != up else ""
    if up and not os.path.isdir(up):
        raise ConfigError(f"--out {out}: {up} is not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create {parent} ({exc.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _stale(path: str, marker: str) -> bool:
    """``path`` is a temp file of a dead process: its name holds ``marker`` then that process's id."""
    m = re.search(re.escape(marker) + r"(\d+)", os.path.basename(path))
    return m is not None and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))


def remove_stale_temporaries(out: str, stats_cache: Optional[str]) -> None:
    """Clear what a killed run (SIGKILL, power loss) may have left: temp files of the statistics cache
    and its checkpoint, and temp adapter folders. A previous adapter moved aside just before the
    crash is moved back."""
    if stats_cache:
        for f in glob.glob(glob.escape(stats_cache) + "*.tmp-*"):
            if _stale(f, ".tmp-"):
                with contextlib.suppress(OSError):
                    os.remove(f)
    parent, base = os.path.dirname(out) or ".", os.path.basename(out)
    for d in glob.glob(os.path.join(glob.escape(parent), glob.escape(f".{base}.tmp-") + "*")):
        if _stale(d, ".tmp-"):
            shutil.rmtree(d, ignore_errors=True)
    for d in glob.glob(glob.escape(out) + ".old-*"):
        if _stale(d, ".old-"):
            if not os.path.lexists(out):
                with contextlib.suppress(OSError):
                    os.rename(d, out)
                    continue
            shutil.rmtree(d, ignore_errors=True)


def write_adapter(peft_model, report: dict, out: str) -> None:
    """Save into a temp folder next to ``out``, then rename it into place (replacing an old ``out``)."""
    parent = os.path.dirname(out) or "."
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-{os.getpid()}-", dir=parent)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write in {parent} ({exc.strerror or exc})") from None
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the adapter folder should not be
        peft_model.save_pretrained(tmp)
        write_json_atomic(os.path.join(tmp, REPORT_FILE), report)
        if os.path.lexists(out):
            old = f"{out}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        tmp = None
    except BaseException as exc:  # also Ctrl-C between the two renames
        if old is not None and not os.path.lexists(out):
            os.rename(old, out)  # put the previous adapter back
            old = None
        if isinstance(exc, OSError):
            raise ConfigError(f"--out {out}: cannot write the adapter ({exc.strerror or exc})") from None
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
