"""``--stats-cache FILE``: finished statistics reused when they were made from the same model, data and
settings (checked by fingerprint, naming what differs), else the pass runs checkpointed in
``FILE.partial`` and its statistics are saved to ``FILE``. A ``FILE`` that is a symbolic link is followed:
the statistics are written to its target and the link stays."""
from __future__ import annotations

import contextlib
import glob
import os
import re
from typing import Dict, Optional, Tuple

from ..checkpoint import differing, is_checkpoint_file
from ..errors import ConfigError, DataError, NumericalError
from ..fileio import unreadable
from ..fisher import FisherStatistics, check_finite, is_statistics_file

PARTIAL_SUFFIX = ".partial"
# Fingerprint parts a finished statistics file must share with the run that reuses it; targets and
# batching only decide which sums exist and their order (the engine checks the targets).
CACHE_PARTS = ("code", "model", "statistics", "data")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (the class name if it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def resolve_stats_cache(path: str) -> str:
    """``--stats-cache`` as the path the run reads and writes: a symbolic link (also one whose target does not
    exist yet) is followed, so that the statistics go through it to its target, next to which the
    checkpoint ``.partial`` lies too; a rename over the link itself would replace it by a regular file."""
    return os.path.realpath(path) if os.path.islink(path) else path


def remove_stale_checkpoints(path: str) -> None:
    """Once ``FILE`` holds finished statistics, the checkpoints of its pass (``FILE.partial``, and
    ``FILE.partial.rankR`` of any rank count) are obsolete: remove those that are checkpoints (never another
    file). Called after the save and after a load: a run stopped between the two leaves one behind. A folder
    that cannot be written (a read-only cache) keeps them."""
    base = path + PARTIAL_SUFFIX
    for other in [base] + glob.glob(glob.escape(base) + ".rank*"):
        if (other == base or re.fullmatch(r"\.rank\d+", other[len(base):])) and is_checkpoint_file(other):
            with contextlib.suppress(OSError):
                os.remove(other)


def _check_readable(path: str) -> None:
    """``FILE`` and ``FILE.partial``, where they exist, readable: the header checks below would call an
    unreadable file "not ours"."""
    for p in (path, path + PARTIAL_SUFFIX):
        why = unreadable(p) if os.path.isfile(p) else None
        if why:
            which = "" if p == path else f" its checkpoint {p}:"
            raise ConfigError(f"--stats-cache {path}:{which} cannot read: {why}")


def check_stats_cache(path: str, data: Optional[str] = None) -> None:
    """``--stats-cache``: a file path in a writable folder (created if missing, as ``--out``'s), not the
    ``--data`` file, and, when it exists, a readable statistics file (never a user's other file: the run
    would overwrite it). A finished ``FILE`` is only read, so its folder may be read-only. Checked before
    any work."""
    if os.path.isdir(path):
        raise ConfigError(f"--stats-cache {path} is a folder; give a file path")
    if data and os.path.exists(data) and os.path.exists(path) and os.path.samefile(path, data):
        raise ConfigError(f"--stats-cache {path} is the --data file: give another path for the statistics")
    _check_readable(path)
    if path.endswith(PARTIAL_SUFFIX) and is_checkpoint_file(path):
        raise ConfigError(f"--stats-cache {path} is the checkpoint of an unfinished pass: give --stats-cache "
                          f"{path[:-len(PARTIAL_SUFFIX)]} to resume it")
    if os.path.isfile(path) and not is_statistics_file(path):
        raise ConfigError(f"--stats-cache {path} exists and is not a lora_da_fast statistics file (it holds "
                          "something else, left as it is): give a new path for the statistics")
    if os.path.isfile(path):
        return  # finished statistics: read, never written (a mismatch is refused when the fingerprint is known)
    parent = os.path.dirname(path) or "."
    up = parent
    while up and not os.path.lexists(up):
        up = os.path.dirname(up) if os.path.dirname(up) != up else ""
    if up and not os.path.isdir(up):
        raise ConfigError(f"--stats-cache {path}: {up} is not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--stats-cache {path}: cannot create the folder {parent} ({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--stats-cache {path}: the folder {parent} is not writable")


def load_stats_cache(path: str, want: Dict[str, str], say) -> Tuple[object, bool]:
    """The finished statistics in ``path`` if their fingerprint matches ``want`` (the parts of
    :data:`CACHE_PARTS`); :class:`ConfigError` naming what differs otherwise. Returns ``(stats,
    verified)``: a file without a fingerprint (saved through the Python API) is used as is."""
    try:
        stats = FisherStatistics.load(path)
    except DataError as exc:  # damaged ("delete FILE and rerun"), or not a statistics file (left alone)
        raise DataError(f"--stats-cache {one_line(exc)}") from None
    try:  # a file edited or written by other code: the solver expects finite numbers
        check_finite(stats)
    except NumericalError as exc:
        raise NumericalError(f"--stats-cache {path}: {exc}; delete it to run the statistics pass again") from None
    fp = stats.meta.get("fingerprint") if isinstance(stats.meta, dict) else None
    if not isinstance(fp, dict):
        if say:
            say(f"note: {path} has no fingerprint (not written by lora-da-fast init): using it as is")
        return stats, False
    diff = differing(fp.get("parts"), want)
    if diff:
        raise ConfigError(f"--stats-cache {path} was made for another run (differs in: {', '.join(diff)}); "
                          "delete it or give another file")
    return stats, True
