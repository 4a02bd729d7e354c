"""``--stats-cache FILE``: finished statistics reused when they were made from the same model, data and
settings (checked by fingerprint, naming what differs), else the pass runs checkpointed in
``FILE.partial`` and its statistics are saved to ``FILE``."""
from __future__ import annotations

import os
from typing import Dict, Tuple

from ..checkpoint import differing, peek
from ..errors import ConfigError, DataError, NumericalError
from ..fisher import FisherStatistics, check_finite

PARTIAL_SUFFIX = ".partial"
# Fingerprint parts a finished statistics file must share with the run that reuses it; targets and
# batching only decide which sums exist and their order (the engine checks the targets).
CACHE_PARTS = ("code", "model", "statistics", "data")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (the class name if it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def check_stats_cache(path: str) -> None:
    """``--stats-cache``: a file path in an existing, writable folder (checked before any work)."""
    if os.path.isdir(path):
        raise ConfigError(f"--stats-cache {path} is a folder; give a file path")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"--stats-cache {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--stats-cache {path}: the folder {parent} is not writable")


def load_stats_cache(path: str, want: Dict[str, str], say) -> Tuple[object, bool]:
    """The finished statistics in ``path`` if their fingerprint matches ``want`` (the parts of
    :data:`CACHE_PARTS`); :class:`ConfigError` naming what differs otherwise. Returns ``(stats,
    verified)``: a file without a fingerprint (saved through the Python API) is used as is."""
    if path.endswith(PARTIAL_SUFFIX):
        try:
            is_checkpoint = peek(path) is not None
        except DataError:
            is_checkpoint = False
        if is_checkpoint:
            raise ConfigError(f"--stats-cache {path} is the checkpoint of an unfinished pass: give --stats-cache "
                              f"{path[:-len(PARTIAL_SUFFIX)]} to resume it")
    try:
        stats = FisherStatistics.load(path)
    except (DataError, KeyError, IndexError, TypeError) as exc:  # KeyError...: a file with a damaged header
        why = one_line(exc) if isinstance(exc, DataError) else f"a damaged statistics file ({type(exc).__name__})"
        raise ConfigError(f"--stats-cache {path}: {why}; delete it to run the statistics pass again") from None
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
