"""``lora-da-fast`` command line (also ``python -m lora_da_fast``).

``lora-da-fast init --model M --data D --out DIR`` loads a causal LM and calibration data, runs the
LoRA-DA engine (statistics pass, solve) and writes a standard PEFT adapter (``adapter_config.json``,
``adapter_model.safetensors``) plus ``lora_da_report.json`` into ``DIR``. The folder is written under a
temporary name next to ``DIR`` and renamed at the end, so ``DIR`` is either the previous content or the
complete new adapter.

With ``--stats-cache FILE`` the statistics pass checkpoints into ``FILE.partial`` every
``--checkpoint-every`` examples; after Ctrl-C or a crash, rerunning the same command resumes from it
(bit-identical to an uninterrupted run), and the finished statistics go to ``FILE`` (atomically). A
``FILE`` or checkpoint made for another model, data or configuration is refused, naming what differs.

Exit status: 0 success; 2 bad input (one line ``lora-da-fast: error: ...`` on stderr, no traceback;
every :class:`LoraDAError` is such an error); 1 a failure that is not the input's fault: out of memory
(one line saying what to lower) or an internal error (one line pointing to a file with the traceback);
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).

The package: :mod:`.args` (the parser), :mod:`.init` (the command), :mod:`.output` (the output folder),
:mod:`.stats_cache`, :mod:`.report` (timings, table, summary).
"""
from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from importlib import metadata
from typing import List, Optional

from .. import comm
from ..checkpoint import peek
from ..errors import LoraDAError, NumericalError
from ..fileio import dump_json, json_safe
from .args import PROG, build_parser
from .init import RunState, run_init, where
from .output import REPORT_FILE, write_adapter
from .report import format_table, print_summary
from .stats_cache import PARTIAL_SUFFIX, one_line

__all__ = ["PARTIAL_SUFFIX", "PROG", "REPORT_FILE", "build_parser", "format_table", "json_safe", "main",
           "print_summary", "run_init", "write_adapter"]


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the run unwinds (temp files removed, old adapter kept)."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _explain(exc: LoraDAError, args, state: RunState) -> str:
    """The error's message, with what the user can do when the library's text cannot know it."""
    msg = one_line(exc)
    if isinstance(exc, NumericalError):
        m = re.search(r"on examples ([\d, ]+)", msg)
        if m:
            idx = [int(t) for t in m.group(1).replace(",", " ").split()]
            if state.data_lines is not None and all(0 <= i < len(state.data_lines) for i in idx):
                msg += f" [{where(idx, state.data_lines)}]"
        if "Cholesky" in msg:
            msg += "; raise --max-damping or --damping"
        if "dtype" in msg and getattr(args, "dtype", None) == "float32":
            msg += " (already float32: check the model's weights and the data)"
    return msg


def _partial_hint(state: RunState) -> str:
    path = state.status.get("checkpoint")
    if not path:
        return ""
    try:
        meta = peek(path)
    except LoraDAError:
        meta = None
    if not meta:
        return ""
    return (f"; the statistics pass is checkpointed in {path} ({meta['done']} of "
            f"{state.status.get('examples', '?')} examples done): rerun the same command to resume")


def _crash_report(exc: BaseException, argv: List[str]) -> Optional[str]:
    """Write the traceback and versions to a file in the temp folder; returns its path (None if unwritable)."""
    def version(pkg):
        try:
            return metadata.version(pkg)
        except Exception:
            return "?"

    path = os.path.join(tempfile.gettempdir(),
                        f"lora-da-fast-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt")
    try:
        with open(path, "w") as f:
            f.write(f"command: {PROG} {' '.join(argv)}\n")
            f.write(f"python {sys.version.split()[0]}; " + "; ".join(
                f"{p} {version(p)}" for p in ("lora-da-fast", "torch", "transformers", "peft", "safetensors")) + "\n\n")
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    except OSError:
        return None
    return path


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    args.argv = argv
    state = RunState()
    try:  # under torchrun (WORLD_SIZE > 1): one process group; gloo for CPU runs
        comm.init_from_env(backend="gloo" if str(args.device).startswith("cpu") else None)
    except Exception as exc:  # noqa: BLE001 - a launcher problem, not the user's data
        print(f"{PROG}: error: cannot join the torch.distributed process group ({one_line(exc)[:200]})",
              file=sys.stderr)
        return 2
    main_rank = comm.is_main()
    tag = f" (rank {comm.rank()})" if comm.is_active() else ""
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        report = run_init(args, state)
    except LoraDAError as exc:
        sys.stderr.write(f"{PROG}: error{tag}: {_explain(exc, args, state)}\n")  # one write: ranks share stderr
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        print(f"{PROG}: {what}; no adapter was written{_partial_hint(state)}", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    except Exception as exc:  # noqa: BLE001 - a bug, or a failure we did not foresee
        if _is_out_of_memory(exc):
            phase = state.status.get("phase") or (state.clock.current if state.clock else None)
            print(f"{PROG}: error: out of memory{f' during {phase}' if phase else ''} ({one_line(exc)[:200]}): "
                  f"lower --batch-size (now {args.batch_size}) or --max-length (now {args.max_length}), adapt "
                  f"fewer modules (--target-modules), or use a device with more memory{_partial_hint(state)}",
                  file=sys.stderr)
            return 1
        path = _crash_report(exc, argv)
        tb = traceback.extract_tb(exc.__traceback__)
        at = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
        if path is None:
            traceback.print_exc()
        where = f"the traceback is in {path}" if path else "the traceback is above"
        print(f"{PROG}: internal error: {type(exc).__name__}{at}: {one_line(exc)[:300]} ({where}; please report "
              f"it with that file){_partial_hint(state)}", file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        comm.shutdown()
    if not main_rank:
        return 0
    if args.json:
        dump_json(report, sys.stdout)
    elif not args.quiet:
        print_summary(report)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
