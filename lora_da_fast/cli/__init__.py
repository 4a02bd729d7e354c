"""``lora-da-fast`` command line (also ``python -m lora_da_fast``).

``lora-da-fast init --model M --data D --out DIR`` loads a causal LM and calibration data, runs the
LoRA-DA engine (statistics pass, solve) and writes a standard PEFT adapter (``adapter_config.json``,
``adapter_model.safetensors``) plus ``lora_da_report.json`` into ``DIR``. The folder is written under a
temporary name next to ``DIR`` and renamed at the end, so ``DIR`` is either the previous content or the
complete new adapter; ``--overwrite`` replaces only an adapter's files and keeps everything else in ``DIR``
(:mod:`.output`).

With ``--stats-cache FILE`` the statistics pass checkpoints into ``FILE.partial`` every
``--checkpoint-every`` examples; after Ctrl-C or a crash, rerunning the same command resumes from it
(bit-identical to an uninterrupted run), and the finished statistics go to ``FILE`` (atomically). A
``FILE`` or checkpoint made for another model, data or configuration is refused, naming what differs.

Exit status: 0 success; 2 bad input or environment (one line ``lora-da-fast: error: ...`` on stderr, no
traceback; every :class:`LoraDAError` is such an error, and so is a full disk, a quota or a read-only file
system, whatever library raised it); 1 a failure that is not the input's fault: out of memory (one line
saying what to lower) or an internal error (one line pointing to a file with the traceback); 130
interrupted (Ctrl-C), 143 terminated (SIGTERM), and no adapter was written (the previous ``DIR``, if any,
is as it was). An interrupt that arrives once the adapter is in place (it is held while the adapter is
renamed into place) comes too late to stop anything: one line says so, and the run ends as a success
(exit 0: ``DIR`` is the complete new adapter). Once the adapter is complete, a broken stdout (``| head``,
a closed stream, ``/dev/full``) gives exit 0 (a reader that stopped) or one line and exit 2, never a
traceback. The console script and ``python -m lora_da_fast`` enter through :mod:`lora_da_fast.__main__`,
which handles an interrupt during the imports.

The package: :mod:`.args` (the parser), :mod:`.init` (the command), :mod:`.builtins` (the built-in models
and data sets, loading of a model folder or a JSONL file), :mod:`.output` (the output folder),
:mod:`.ownership` (the run's temporary folders next to it, their owner records, the no-replace and
exchange renames), :mod:`.stats_cache`, :mod:`.report` (timings, table, summary).
"""
from __future__ import annotations

import contextlib
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
from ..fileio import disk_problem, dump_json, json_safe, write_error
from .args import PROG, build_parser
from .builtins import BUILTIN_MODELS, cache_dir
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


_DTYPE_ADVICE = "overflow in the model's dtype? try --dtype float32"


def _explain(exc: LoraDAError, args, state: RunState) -> str:
    """The error's message, with what the user can do when the library's text cannot know it."""
    msg = one_line(exc)
    limit = getattr(exc, "position_limit", None)
    if limit is not None:  # an example longer than the model's learned positions
        msg += f" of --model {args.model}: use --max-length {limit} or less"
    if "the tokenizer does not match the model" in msg:
        msg = f"--model {args.model}: {msg}"
    if isinstance(exc, NumericalError):
        m = re.search(r"on examples ([\d, ]+)", msg)
        if m:
            idx = [int(t) for t in m.group(1).replace(",", " ").split()]
            if state.data_lines is not None and all(0 <= i < len(state.data_lines) for i in idx):
                msg += f" [{where(idx, state.data_lines)}]"
        if "Cholesky" in msg:
            msg += "; raise --max-damping or --damping"
        from ..statistics.statistics_pass import HALF_PRECISION_ADVICE  # loaded by the run that raised this
        msg = msg.replace(HALF_PRECISION_ADVICE, _DTYPE_ADVICE)  # the API's words, the CLI's option
        msg = re.sub(r"likely cause: (beta|gamma) = ", r"likely cause: --\1 ", msg)
    if getattr(exc, "disk", None):
        msg += _partial_hint(state, "free space, then rerun the same command to resume")
    return msg


def _partial_hint(state: RunState, advice: str = "rerun the same command to resume") -> str:
    """Where the statistics pass is checkpointed, if a readable checkpoint is there (else nothing: a
    resume could not succeed)."""
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
            f"{state.status.get('examples', '?')} examples done): {advice}")


def _disk_message(exc: BaseException, words: str, args, state: RunState) -> str:
    """One line for a full disk / quota / read-only file system that a library raised in its own way."""
    path = getattr(exc, "filename", None)
    phase = state.status.get("phase") or (state.clock.current if state.clock else None)
    msg = f"{words}" + (f" writing {path}" if path else "") + (f" during {phase}" if phase else "")
    if phase == "load_model" and getattr(args, "model", None) in BUILTIN_MODELS:
        msg += (f" (building the built-in model {args.model} in {cache_dir()}): free space there, or set "
                "LORA_DA_FAST_CACHE to a folder on another disk")
    else:
        msg += ": free space on that disk (or make it writable), or write elsewhere"
    return msg + _partial_hint(state, "free space, then rerun the same command to resume")


def _err(line: str) -> None:
    """One line on stderr, in one write (ranks share stderr); nothing if stderr is closed or broken."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def _open_std_fds() -> None:
    """File descriptors 0-2 closed at the start (``>&-``): open the null device on them, so that no file
    the run opens takes their number (a library writing to fd 1 would write into it)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            with contextlib.suppress(OSError):
                got = os.open(os.devnull, os.O_RDWR)
                if got != fd:
                    os.dup2(got, fd)
                    os.close(got)


def _silence(stream) -> None:
    """Point a broken stream's file descriptor at the null device, so that Python's final flush of what
    is left in its buffer does not fail again (with a traceback) at exit."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)


def _emit(report: dict, args) -> int:
    """The report (``--json``) or the summary on stdout, once the adapter is complete. A reader that
    stopped (``| head``): exit 0; a stream that cannot take it (``/dev/full``): one line, exit 2."""
    stream = sys.stdout
    if stream is None or args.quiet and not args.json:  # stdout closed at the start: nothing to show
        return 0
    try:
        if args.json:
            dump_json(report, stream)
        else:
            print_summary(report, stream)
        stream.flush()
    except BrokenPipeError:
        _silence(stream)
        return 0
    except (OSError, ValueError) as exc:
        _silence(stream)
        _err(f"{PROG}: error: cannot write the {'report' if args.json else 'summary'} to stdout "
             f"({write_error(exc)}); the adapter is complete: {report.get('adapter')}")
        return 2
    return 0


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


def _too_late(exc: KeyboardInterrupt, state: RunState) -> None:
    """An interrupt once the adapter is in place: nothing is undone; say so (the run exits 0)."""
    what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
    _err(f"{PROG}: {what} after the adapter was complete: {state.adapter} holds the new adapter (exit status 0)")


def _finish(report: dict, args, state: RunState) -> int:
    """The summary or ``--json`` report of a complete adapter; an interrupt meanwhile changes nothing on disk."""
    try:
        return _emit(report, args)
    except KeyboardInterrupt as exc:
        _too_late(exc, state)
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _open_std_fds()
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
        _err(f"{PROG}: error: cannot join the torch.distributed process group ({one_line(exc)[:200]})")
        return 2
    main_rank = comm.is_main()
    tag = f" (rank {comm.rank()})" if comm.is_active() else ""
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:  # SIGTERM stays ours until the summary is out: an adapter in place is never reported as missing
        report = _run(args, argv, state, tag)
        if isinstance(report, int):
            return report
        return _finish(report, args, state) if main_rank else 0
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _run(args, argv: List[str], state: RunState, tag: str):
    """:func:`run_init`: the report, or the exit status of a failure (its one line printed)."""
    try:
        return run_init(args, state)
    except LoraDAError as exc:
        _err(f"{PROG}: error{tag}: {_explain(exc, args, state)}")
        return 2
    except KeyboardInterrupt as exc:
        if state.adapter is not None:  # delivered once the adapter was in place (held during the claim)
            _too_late(exc, state)
            return state.report
        what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        _err(f"{PROG}: {what}; no adapter was written{_partial_hint(state)}")
        return 143 if isinstance(exc, _Terminated) else 130
    except Exception as exc:  # noqa: BLE001 - a bug, or a failure we did not foresee
        words = disk_problem(exc)
        if words:  # a full disk raised by a library in its own way (safetensors, transformers...)
            _err(f"{PROG}: error{tag}: {_disk_message(exc, words, args, state)}")
            return 2
        if _is_out_of_memory(exc):
            phase = state.status.get("phase") or (state.clock.current if state.clock else None)
            _err(f"{PROG}: error: out of memory{f' during {phase}' if phase else ''} ({one_line(exc)[:200]}): "
                 f"lower --batch-size (now {args.batch_size}) or --max-length (now {args.max_length}), stream the "
                 f"model with --layers-per-pass auto (now {args.layers_per_pass or 'one pass'}), adapt fewer modules "
                 f"(--target-modules), or use a device with more memory{_partial_hint(state)}")
            return 1
        path = _crash_report(exc, argv)
        tb = traceback.extract_tb(exc.__traceback__)
        at = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
        if path is None and sys.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                traceback.print_exc()
        where = f"the traceback is in {path}" if path else "the traceback is above"
        _err(f"{PROG}: internal error: {type(exc).__name__}{at}: {one_line(exc)[:300]} ({where}; please report "
             f"it with that file){_partial_hint(state)}")
        return 1
    finally:
        comm.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
