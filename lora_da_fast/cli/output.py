"""The output folder: checked before any work, written into a temporary folder of this run next to it
and claimed at the end; and the cleanup of what a killed run left behind.

What an adapter is. The run writes :data:`ADAPTER_FILES`: PEFT's ``adapter_config.json`` and
``adapter_model.safetensors``, and its report ``lora_da_report.json`` (PEFT's generated model card,
``README.md``, is left out: a ``README.md`` in ``--out`` is the user's). A previous adapter may also hold
``adapter_model.bin`` (older PEFT). These names, :data:`ADAPTER_NAMES`, are all that the run ever replaces
or removes in ``--out``.

Claiming. Without ``--overwrite`` the adapter is renamed to ``--out`` only if nothing is there (an atomic
no-replace rename where the system offers it): a folder that appeared during the run (another run, the
user) is kept, and so is the new adapter, next to it as ``DIR.new-XXXXXX``. With ``--overwrite``:

- ``--out`` holds an adapter and nothing else (or is empty): the folder is swapped with the new one, in one
  atomic step where the system offers it, so ``--out`` is the previous adapter or the complete new one;
- ``--out`` holds other entries as well (a Trainer's output, a project): they stay as they are, byte for
  byte, and the adapter's files are replaced one by one, each atomically (a temporary of this run inside
  ``--out``, then a rename over the old file). The previous ``adapter_config.json`` is moved out first and
  the new one renamed in last, so ``--out`` never holds a config beside another run's weights: it holds the
  previous adapter, the new one, or (a run killed in between) no ``adapter_config.json``: no adapter;
- anything else is refused, at the start and again at the claim: ``--out`` is not a folder, holds no
  adapter but other entries, or holds an adapter's name that is not a regular file (a folder, a link).

A folder that holds the run's own inputs is refused before any work.

Ownership. Temporaries are folders with an owner marker (:mod:`lora_da_fast.cli.ownership`); a previous
adapter is moved aside only into such a folder, so a killed run's leftovers are recognised with certainty
and a previous adapter caught between two renames is put back.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import time
from typing import Callable, Dict, List, Optional

from safetensors import SafetensorError

from ..errors import ConfigError
from ..fileio import (_fsync_dir, dump_json, make_temp_dir, remove_temp_dir, signals_held,
                      write_failure)
from .ownership import exchange, remove_stale_temporaries as _remove_stale, rename_noreplace

REPORT_FILE = "lora_da_report.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, REPORT_FILE)  # what the run writes
OLD_WEIGHTS_FILE = "adapter_model.bin"  # an older PEFT's weights: part of a previous adapter, removed with it
ADAPTER_NAMES = ADAPTER_FILES + (OLD_WEIGHTS_FILE,)
_MODEL_CARD = "README.md"  # written by PEFT's save_pretrained; not part of the adapter
_NEW = "adapter"  # the new adapter inside the run's temporary folder
_OLD = "old"  # a previous adapter moved aside (only where the system cannot swap two folders)

# Test hook (the kill-and-rerun tests): seconds to wait right after the claim, with Ctrl-C and SIGTERM held,
# so that a test can deliver a signal at that moment. Unset (always, outside tests) it costs nothing.
TEST_HOOK_PAUSE_ENV = "LORA_DA_FAST_TEST_HOOK_PAUSE_AFTER_CLAIM"
try:
    _TEST_HOOK_PAUSE = float(os.environ.get(TEST_HOOK_PAUSE_ENV) or 0)
except ValueError:
    _TEST_HOOK_PAUSE = 0.0


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symbolic links resolved)."""
    p, f = _real(path), _real(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def other_entries(folder: str) -> List[str]:
    """The entries of ``folder`` that are not an adapter's (:data:`ADAPTER_NAMES`): never replaced or removed."""
    return sorted(e for e in os.listdir(folder) if e not in ADAPTER_NAMES)


def _not_replaceable(out: str) -> Optional[str]:
    """Why the adapter in ``out`` (which exists) may not be replaced, or ``None`` if it may."""
    if os.path.islink(out) or not os.path.isdir(out):
        return "exists and is not a folder"
    try:
        entries = os.listdir(out)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if entries and not any(f in entries for f in ADAPTER_NAMES):
        return "is a non-empty folder that holds no adapter"
    for name in ADAPTER_NAMES:  # a rename over a link or a folder would replace it, not the file
        path = os.path.join(out, name)
        if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
            return f"holds {name} that is not a file (a folder or a link)"
    return None


def check_out(out: str, overwrite: bool, inputs: Optional[Dict[str, str]] = None) -> None:
    """Refuse an existing ``out`` without ``--overwrite``, and with it anything but an adapter folder; refuse
    an ``out`` that holds one of ``inputs`` (``{option: path}``: the run's own data, model, statistics);
    create its parent folder."""
    for option, path in (inputs or {}).items():
        if path and inside(path, out):
            what = "is" if _real(path) == _real(out) else "is inside"
            raise ConfigError(f"{option} {path} {what} --out {out}: the run's inputs may not live in the folder it "
                              f"writes the adapter to; choose another --out (or keep {option} elsewhere)")
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
        if other_entries(out):
            _replace_files(new, out)
        else:
            _swap(new, out, tmp)
        return
    raise ConfigError(f"--out {out} keeps changing while the adapter is being saved; not replacing it")


def _swap(new: str, out: str, tmp: str) -> None:
    """``out`` holds an adapter alone: swap the folders, atomically where the system can (else two renames,
    the previous adapter in ``tmp`` meanwhile); the previous one is removed with ``tmp``."""
    if exchange(new, out):  # atomic: out is the new adapter, `new` the previous one
        previous = new
    else:
        previous = os.path.join(tmp, _OLD)
        os.rename(out, previous)
        try:
            os.rename(new, out)
        except BaseException:  # also Ctrl-C between the two renames
            if not os.path.lexists(out):
                os.rename(previous, out)  # put the previous adapter back
            raise
    strays = other_entries(previous)  # put into out between the check and the swap: given back, never removed
    try:
        for name in strays:
            rename_noreplace(os.path.join(previous, name), os.path.join(out, name))
    except OSError:
        rename_noreplace(previous, f"{out}.previous-{secrets.token_hex(3)}")


def _replace_files(new: str, out: str) -> None:
    """``out`` holds other entries besides an adapter: replace the adapter's files (:data:`ADAPTER_FILES`, and
    nothing else of ``new``) one by one, weights first and config last, and keep the rest (see the module
    doc). The new files first go into a temporary folder of this run inside ``out``, on its file system, so
    that each is renamed over its old self in one step."""
    names = [n for n in (WEIGHTS_FILE, REPORT_FILE, CONFIG_FILE) if os.path.exists(os.path.join(new, n))]
    stage = make_temp_dir(os.path.join(out, _NEW), out=out)
    try:
        for name in names:
            shutil.move(os.path.join(new, name), os.path.join(stage, name))  # a rename on one file system
        _fsync_files(stage)
        config, aside = os.path.join(out, CONFIG_FILE), os.path.join(stage, f"{_OLD}-{CONFIG_FILE}")
        if os.path.lexists(config):
            os.rename(config, aside)  # from here on, no config in out until the new one
        done = []
        try:
            for name in names:
                if name == CONFIG_FILE:  # the previous adapter's weights in the old format go before it
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(out, OLD_WEIGHTS_FILE))
                os.replace(os.path.join(stage, name), os.path.join(out, name))
                done.append(name)
        except BaseException:
            if WEIGHTS_FILE not in done and os.path.lexists(aside) and not os.path.lexists(config):
                os.rename(aside, config)  # the previous adapter's weights are still there: it stays whole
            raise
        _fsync_dir(out)
    finally:
        remove_temp_dir(stage)


def write_adapter(peft_model, report: dict, out: str, overwrite: bool = False,
                  on_saved: Optional[Callable[[], None]] = None, on_claimed: Optional[Callable[[], None]] = None
                  ) -> None:
    """Save the adapter and ``report`` into a temporary folder of this run next to ``out``, then claim
    ``out`` (see the module doc); the temporary folder is removed whatever happens.

    ``on_saved()`` runs once the weights are written, before ``report`` is: the report is written once,
    with the adapter, so a caller completes it there (the save's time). ``on_claimed()`` runs right after
    the claim with Ctrl-C and SIGTERM held: an interrupt is delivered only once the caller has recorded
    that the adapter is in place, so what it then says about ``out`` is true."""
    tmp = None
    try:
        with signals_held():  # the temporary exists only once tmp names it: removed below, always
            tmp = make_temp_dir(out, out=out)
    except (OSError, SafetensorError) as exc:
        raise write_failure("the adapter", out, exc) from None
    claimed = False
    try:
        new = os.path.join(tmp, _NEW)
        os.mkdir(new)  # mode from the umask, as any folder the user creates
        peft_model.save_pretrained(new)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(new, _MODEL_CARD))
        if on_saved is not None:
            on_saved()
        with open(os.path.join(new, REPORT_FILE), "w") as f:
            dump_json(report, f)
        _fsync_files(new)
        with signals_held():
            _claim(new, out, overwrite, tmp)
            claimed = True
            if on_claimed is not None:
                on_claimed()
            if _TEST_HOOK_PAUSE:
                time.sleep(_TEST_HOOK_PAUSE)
    except (OSError, SafetensorError) as exc:
        raise write_failure("the adapter", out, exc) from None
    finally:  # a previous adapter that could not be put back stays (the next run's cleanup restores it)
        if claimed or not os.path.isdir(os.path.join(tmp, _OLD)):
            with signals_held():  # an interrupt mid-removal could take the owner marker and leave the rest
                remove_temp_dir(tmp)
