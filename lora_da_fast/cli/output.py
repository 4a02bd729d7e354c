"""The output folder: checked before any work, written into a temporary folder of this run next to it
and claimed at the end, so that ``--out`` is either its previous content or the complete new adapter;
and the cleanup of what a killed run left behind.

Claiming. Without ``--overwrite`` the adapter is renamed to ``--out`` only if nothing is there (an atomic
no-replace rename where the system offers it): a folder that appeared during the run (another run, the
user) is kept, and so is the new adapter, next to it as ``DIR.new-XXXXXX``. With ``--overwrite`` only an
adapter folder (or an empty one) is replaced, swapped atomically with the new one where the system offers
it; a folder that holds the run's own inputs is refused before any work.

Ownership. Temporaries are folders with an owner marker (:mod:`lora_da_fast.cli.ownership`); a previous
adapter is moved aside only into such a folder, so a killed run's leftovers are recognised with certainty
and a previous adapter caught between two renames is put back.
"""
from __future__ import annotations

import os
import secrets
import stat
from typing import Callable, Dict, List, Optional

from safetensors import SafetensorError

from ..errors import ConfigError
from ..fileio import dump_json, make_temp_dir, remove_temp_dir, write_failure
from .ownership import exchange, remove_stale_temporaries as _remove_stale, rename_noreplace

REPORT_FILE = "lora_da_report.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", REPORT_FILE)
_NEW = "adapter"  # the new adapter inside the run's temporary folder
_OLD = "old"  # a previous adapter moved aside (only where the system cannot swap two folders)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symbolic links resolved)."""
    p, f = _real(path), _real(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def _not_replaceable(out: str) -> Optional[str]:
    """Why ``out`` (which exists) may not be replaced by an adapter, or ``None`` if it may."""
    if os.path.islink(out) or not os.path.isdir(out):
        return "exists and is not a folder"
    try:
        entries = os.listdir(out)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if entries and not any(f in entries for f in ADAPTER_FILES):
        return "is a non-empty folder that holds no adapter"
    return None


def check_out(out: str, overwrite: bool, inputs: Optional[Dict[str, str]] = None) -> None:
    """Refuse an existing ``out`` without ``--overwrite``, and with it anything but an adapter folder; refuse
    an ``out`` that holds one of ``inputs`` (``{option: path}``: the run's own data, model, statistics);
    create its parent folder."""
    for option, path in (inputs or {}).items():
        if path and inside(path, out):
            what = "is" if _real(path) == _real(out) else "is inside"
            raise ConfigError(f"{option} {path} {what} --out {out}: the adapter folder is replaced as a whole at "
                              f"the end, which would delete it; choose another --out (or keep {option} elsewhere)")
    if os.path.lexists(out):
        if not overwrite:
            raise ConfigError(f"--out {out} exists; add --overwrite to replace it")
        problem = _not_replaceable(out)
        if problem:
            raise ConfigError(f"--out {out} {problem}; not replacing it")
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


def _restore(log: Optional[Callable[[str], None]]):
    def restore(tmp: str, owner: dict) -> None:
        """A killed run's temporary folder: put back the previous adapter it had moved aside."""
        out, old = owner.get("out"), os.path.join(tmp, _OLD)
        if not isinstance(out, str) or not os.path.isdir(old) or os.path.dirname(_real(out)) != os.path.dirname(_real(tmp)):
            return
        if not os.path.lexists(out):
            os.rename(old, out)
            if log:
                log(f"note: {out} put back (a killed run had moved it aside)")
        else:  # something else is there now: keep both
            kept = f"{out}.previous-{secrets.token_hex(3)}"
            rename_noreplace(old, kept)
            if log:
                log(f"note: the adapter that a killed run had moved aside from {out} is in {kept}")
    return restore


def remove_stale_temporaries(out: str, stats_cache: Optional[str], log: Optional[Callable[[str], None]] = None
                             ) -> List[str]:
    """Clear what killed runs (SIGKILL, power loss) left next to ``out`` and ``stats_cache`` (and inside
    ``out``): only folders with an owner marker of a run that is certainly gone
    (:func:`lora_da_fast.cli.ownership.remove_stale_temporaries`); a previous adapter caught between two
    renames is put back first. Returns the folders removed."""
    folders = [os.path.dirname(os.path.abspath(out)), os.path.abspath(out)]
    if stats_cache:
        folders.append(os.path.dirname(os.path.abspath(stats_cache)))
    removed: List[str] = []
    for folder in dict.fromkeys(folders):
        if os.path.isdir(folder) and not os.path.islink(folder):
            removed += _remove_stale(folder, restore=_restore(log))
    return removed


def _fsync_files(folder: str) -> None:
    for name in os.listdir(folder):
        p = os.path.join(folder, name)
        if stat.S_ISREG(os.lstat(p).st_mode):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _keep_aside(new: str, out: str) -> str:
    """Move the complete new adapter ``new`` next to ``out`` under a fresh name; returns that name."""
    while True:
        kept = f"{out}.new-{secrets.token_hex(3)}"
        try:
            rename_noreplace(new, kept)
            return kept
        except FileExistsError:  # pragma: no cover - 24 random bits
            continue


def _claim(new: str, out: str, overwrite: bool, tmp: str) -> None:
    """Put the complete adapter ``new`` (inside the run's temporary folder ``tmp``) at ``out``."""
    for _ in range(3):
        if not overwrite or not os.path.lexists(out):
            try:
                rename_noreplace(new, out)
                return
            except FileExistsError:
                if not overwrite:
                    kept = _keep_aside(new, out)
                    raise ConfigError(f"--out {out} appeared while the run was going (another run or program "
                                      f"created it): it was left as it is, and the new adapter was saved to {kept}; "
                                      "move it where you want it") from None
                continue  # appeared just now: check it below
        problem = _not_replaceable(out)
        if problem:
            kept = _keep_aside(new, out)
            raise ConfigError(f"--out {out} changed while the run was going and now {problem}: not replacing it; "
                              f"the new adapter was saved to {kept}")
        if exchange(new, out):  # atomic: out is the new adapter, `new` the previous one (removed with tmp)
            return
        old = os.path.join(tmp, _OLD)  # no swap on this system: two renames, the previous adapter in tmp
        os.rename(out, old)
        try:
            os.rename(new, out)
        except BaseException:  # also Ctrl-C between the two renames
            if not os.path.lexists(out):
                os.rename(old, out)  # put the previous adapter back
            raise
        return
    raise ConfigError(f"--out {out} keeps changing while the adapter is being saved; not replacing it")


def write_adapter(peft_model, report: dict, out: str, overwrite: bool = False) -> None:
    """Save the adapter and ``report`` into a temporary folder of this run next to ``out``, then claim
    ``out`` (see the module doc); the temporary folder is removed whatever happens."""
    try:
        tmp = make_temp_dir(out, out=out)
    except (OSError, SafetensorError) as exc:
        raise write_failure("the adapter", out, exc) from None
    claimed = False
    try:
        new = os.path.join(tmp, _NEW)
        os.mkdir(new)  # mode from the umask, as any folder the user creates
        peft_model.save_pretrained(new)
        with open(os.path.join(new, REPORT_FILE), "w") as f:
            dump_json(report, f)
        _fsync_files(new)
        _claim(new, out, overwrite, tmp)
        claimed = True
    except (OSError, SafetensorError) as exc:
        raise write_failure("the adapter", out, exc) from None
    finally:  # a previous adapter that could not be put back stays (the next run's cleanup restores it)
        if claimed or not os.path.isdir(os.path.join(tmp, _OLD)):
            remove_temp_dir(tmp)
