"""``lora-da-fast`` command line (also ``python -m lora_da_fast``).

``lora-da-fast init --model M --data D --out DIR`` loads a causal LM and calibration data, gathers the
LoRA-DA statistics in one pass, solves every target module, and writes a standard PEFT adapter
(``adapter_config.json``, ``adapter_model.safetensors``) plus ``lora_da_report.json`` into ``DIR``.
The folder is written under a temporary name next to ``DIR`` and renamed at the end, so ``DIR`` is
either the previous content or the complete new adapter.

With ``--stats-cache FILE`` the statistics pass checkpoints into ``FILE.partial`` every
``--checkpoint-every`` examples; after Ctrl-C or a crash, rerunning the same command resumes from it
(bit-identical to an uninterrupted run), and the finished statistics go to ``FILE`` (atomically). A
``FILE`` or checkpoint made for another model, data or configuration is refused, naming what differs.

Exit status: 0 success; 2 bad input (one line ``lora-da-fast: error: ...`` on stderr, no traceback;
every :class:`LoraDAError` is such an error); 1 a failure that is not the input's fault: out of memory
(one line saying what to lower) or an internal error (one line pointing to a file with the traceback);
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Dict, List, Optional, Tuple

from .errors import ConfigError, DataError, LoraDAError, NumericalError, TargetError

PROG = "lora-da-fast"
REPORT_FILE = "lora_da_report.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", REPORT_FILE)
REGEX_CHARS = set("^$*+?()[]{}|\\")
PARTIAL_SUFFIX = ".partial"
# Fingerprint parts a finished statistics file must share with the run that reuses it; targets and
# batching only decide which sums exist and their order (select_statistics checks the targets).
CACHE_PARTS = ("code", "model", "statistics", "data")

POPULATION_HELP = (
    "N of the LoRA-DA objective (ALGORITHM.md): the number of examples of the fine-tuning set you will "
    "train the adapter on. It weighs the variance term (sampling noise of fine-tuning on N examples, "
    "beta * sum(u) / (N sigma^2) * Zd^-1) against the bias term: a larger N trusts the data more and "
    "moves the subspace towards the Fisher-gradient's top directions. Default: the number of examples "
    "in --data, right when --data is the fine-tuning set; give the true size otherwise (the authors "
    "used 100000).")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr and exits with status 2."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .builtins import BUILTIN_DATA, BUILTIN_MODELS

    parser = _Parser(prog=PROG, description="LoRA-DA: data-aware LoRA initialisation for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser("init", help="compute a LoRA-DA adapter and save it as a standard PEFT adapter",
                       description="Compute LoRA-DA factors for a model and calibration data and save them as a "
                                   "standard PEFT LoRA adapter (load it with PeftModel.from_pretrained).")
    io = p.add_argument_group("input and output")
    io.add_argument("--model", required=True, metavar="M",
                    help="a local Hugging Face model folder, or a built-in name: "
                         + "; ".join(f"{k} ({v})" for k, v in BUILTIN_MODELS.items()))
    io.add_argument("--data", required=True, metavar="D",
                    help='a JSONL file with one {"text": ...} or {"prompt": ..., "response": ...} object per '
                         "line (prompt tokens are left out of the loss), or a built-in name: "
                         + "; ".join(f"{k} ({v})" for k, v in BUILTIN_DATA.items()))
    io.add_argument("--out", required=True, metavar="DIR",
                    help="output folder: adapter_config.json, adapter_model.safetensors, lora_da_report.json")
    io.add_argument("--overwrite", action="store_true", help="replace --out if it exists (an adapter folder)")
    io.add_argument("--stats-cache", metavar="FILE",
                    help="statistics file: if FILE exists and was made from the same model, data and settings, "
                         "load it and skip the data pass (rerun the solve with other --rank, --beta, --gamma, "
                         "--population-size, --target-modules subsets); otherwise run the pass, checkpointing "
                         "it in FILE.partial (rerun after Ctrl-C or a crash to resume), and save FILE at the end")
    io.add_argument("--checkpoint-every", type=_positive_int, default=32, metavar="N",
                    help="with --stats-cache: checkpoint the statistics pass every N examples; each checkpoint "
                         "writes all the statistics (as large as FILE), so raise N for large models "
                         "(default: %(default)s)")
    d = p.add_argument_group("calibration data")
    d.add_argument("--num-samples", type=_positive_int, default=256, metavar="n",
                   help="calibration examples drawn from --data (a fixed random subset, seed 0, in file order; "
                        "all of them if fewer) (default: %(default)s)")
    d.add_argument("--max-length", type=_positive_int, default=1024, metavar="T",
                   help="tokens per example; longer ones are truncated (default: %(default)s)")
    d.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                   help="examples per forward/backward; the result does not depend on it (default: %(default)s)")
    d.add_argument("--token-mask", choices=("attention", "labels"), default="attention",
                   help="tokens of the Kronecker factors: every non-padding token, or those with a next-token "
                        "label (default: %(default)s)")
    lo = p.add_argument_group("LoRA (written to adapter_config.json)")
    lo.add_argument("--rank", type=_positive_int, default=8, metavar="r", help="LoRA rank (default: %(default)s)")
    lo.add_argument("--lora-alpha", type=_positive_float, default=16.0, metavar="A",
                    help="PEFT lora_alpha; scaling A/r, or A/sqrt(r) with --rslora (default: %(default)s)")
    lo.add_argument("--rslora", action="store_true", help="rank-stabilised scaling lora_alpha/sqrt(r) (the paper's)")
    lo.add_argument("--target-modules", default="all-linear", metavar="T",
                    help="'all-linear' (every linear layer but the output head), comma-separated module names "
                         "or dotted suffixes (q_proj,v_proj), or a regex on full module names, as PEFT "
                         "(default: %(default)s)")
    da = p.add_argument_group("LoRA-DA")
    da.add_argument("--beta", type=_nonneg_float, default=0.03,
                    help="weight of the variance term; 0 gives the truncated SVD of the Fisher-gradient "
                         "(default: %(default)s)")
    da.add_argument("--gamma", type=_positive_float, default=1024.0,
                    help="the factors are divided by sqrt(gamma) (default: %(default)s)")
    da.add_argument("--population-size", type=_positive_int, default=None, metavar="N", help=POPULATION_HELP)
    da.add_argument("--damping", type=_positive_float, default=1e-6,
                    help="damping added to both Kronecker factors (default: %(default)s)")
    da.add_argument("--max-damping", type=_positive_float, default=1.0,
                    help="when a Cholesky factorisation fails the damping is raised tenfold, up to this bound; "
                         "the damping used is in the table and the report (default: %(default)s)")
    da.add_argument("--seed", type=int, default=0,
                    help="seed of the iterative eigensolver's start vectors; the subspace does not depend on it "
                         "(default: %(default)s)")
    rt = p.add_argument_group("runtime")
    rt.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="model dtype; auto = float32 on CPU, the checkpoint's dtype on GPU (default: %(default)s)")
    rt.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    rt.add_argument("--device-map", choices=["auto"], default=None,
                    help="split the model over the GPUs of this process (accelerate's device_map='auto'; under "
                         "torchrun, over this rank's share of the machine's GPUs) instead of --device")
    rt.add_argument("--quiet", action="store_true", help="no progress bars, table or summary; errors only")
    rt.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of the table")
    return parser


# --------------------------------------------------------------------------------------------------
# Helpers


def parse_target_modules(text: str):
    """``all-linear`` | regex (contains a regex metacharacter other than '.') | comma-separated names."""
    text = text.strip()
    if text == "all-linear":
        return text
    if REGEX_CHARS & set(text):
        try:
            re.compile(text)
        except re.error as exc:
            raise ConfigError(f"--target-modules {text!r} is not a valid regex ({exc})") from None
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--target-modules {text!r}: no module name")
    return names


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


def subsample_indices(total: int, n: int, seed: int = 0) -> List[int]:
    """Indices of a fixed random subset of ``n`` of ``total`` items, in order (all if ``n >= total``)."""
    if n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))


def subsample(records: List[dict], n: int, seed: int = 0) -> List[dict]:
    return [records[i] for i in subsample_indices(len(records), n, seed)]


def check_stats_cache(path: str) -> None:
    """``--stats-cache``: a file path in an existing, writable folder (checked before any work)."""
    if os.path.isdir(path):
        raise ConfigError(f"--stats-cache {path} is a folder; give a file path")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"--stats-cache {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--stats-cache {path}: the folder {parent} is not writable")


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


def peak_memory(device) -> Dict[str, float]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # kB on Linux, bytes on macOS
    out = {"cpu_max_rss_gb": rss_bytes / 2**30}
    import torch

    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def format_table(modules: Dict[str, dict]) -> str:
    """One row per module: shapes, damping, the two smallest eigenvalues of M and lambda_r, |B A|."""
    head = ("module", "d_in", "d_out", "damping", "eig_1", "eig_2", "eig_r", "gap", "|BA|_F", "notes")
    rows = []
    for name, m in modules.items():
        eig = m.get("eigenvalues") or []
        r = m.get("rank", len(eig) - 1 if eig else 0)
        pick = lambda i: _fmt(eig[i]) if 0 <= i < len(eig) else "-"  # noqa: E731
        rows.append((name, str(m["d_in"]), str(m["d_out"]), _fmt(m["damping"]), pick(0), pick(1), pick(r - 1),
                     _fmt(m["eigengap"]) if m.get("eigengap") not in (None, float("inf")) else "-",
                     _fmt(m["update_norm"]), "; ".join(m.get("notes") or [])))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i in (0, 9) else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i in (0, 9) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging only
        pass


def _load_stats_cache(path: str, want: Dict[str, str], say) -> Tuple[object, bool]:
    """The finished statistics in ``path`` if their fingerprint matches ``want`` (the parts of
    :data:`CACHE_PARTS`); :class:`ConfigError` naming what differs otherwise. Returns ``(stats,
    verified)``: a file without a fingerprint (saved through the Python API) is used as is."""
    from .checkpoint import differing
    from .statistics import FisherStatistics, check_finite

    if path.endswith(PARTIAL_SUFFIX):
        from .checkpoint import peek

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
        why = _one_line(exc) if isinstance(exc, DataError) else f"a damaged statistics file ({type(exc).__name__})"
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


def _save_stats_atomic(stats, path: str) -> None:
    """Write ``path`` through a temp file, flushed to disk before the rename: ``path`` is either absent or
    complete, even after a crash."""
    from .checkpoint import write_atomic

    write_atomic(path, stats.save, lambda exc: f"--stats-cache {path}: cannot write it ({exc.strerror or exc})")


def _write_adapter(peft_model, report: dict, out: str) -> None:
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
        _write_json_atomic(os.path.join(tmp, REPORT_FILE), report)
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


# --------------------------------------------------------------------------------------------------
# init


class _Clock:
    """Wall and process CPU seconds per phase (CPU time tells a slow phase from a busy machine)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.wall: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}
        self.current: Optional[str] = None  # the phase running now (named by an out-of-memory message)

    @contextlib.contextmanager
    def phase(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        self.current = name
        try:
            yield
        finally:
            self.wall[name] = time.perf_counter() - w
            self.cpu[name] = time.process_time() - c

    def total(self) -> float:
        return time.perf_counter() - self.start


class _RunState:
    """What ``main`` needs to explain a failure of ``run_init`` (filled in as the run goes)."""

    def __init__(self):
        self.clock: Optional[_Clock] = None
        self.partial: Optional[str] = None  # the statistics checkpoint of this run
        self.pass_examples = 0  # usable examples of the statistics pass
        self.data_lines: Optional[List[int]] = None  # --data line of each calibration example


def _no_label_indices(examples: List[dict]) -> List[int]:
    # an example is a loss term only if some position t has a next-token label (labels[t+1] != -100)
    from .data import IGNORE_INDEX

    return [i for i, e in enumerate(examples) if not bool((e["labels"][1:] != IGNORE_INDEX).any())]


def _where(indices: List[int], lines: Optional[List[int]]) -> str:
    shown = indices[:5]
    more = " ..." if len(indices) > 5 else ""
    if lines is not None:
        return "--data line " + ", ".join(str(lines[i]) for i in shown) + more
    return "calibration example " + ", ".join(map(str, shown)) + more


def run_init(args, state: Optional[_RunState] = None) -> dict:
    """The ``init`` command; returns the report (also written to ``DIR/lora_da_report.json``)."""
    from . import distributed

    state = state if state is not None else _RunState()
    clock = state.clock = _Clock()
    show = not args.quiet and distributed.is_main()  # under torchrun, rank 0 alone talks and writes
    if args.quiet:
        _quiet_libraries()
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if show else None

    # Everything cheap is checked before loading data or a model.
    out = os.path.abspath(args.out)
    if distributed.is_active():
        problem = None
        if distributed.is_main():  # one rank checks the output folder, every rank gets the verdict
            try:
                check_out(out, args.overwrite)
            except LoraDAError as exc:
                problem = str(exc)
        problem = distributed.broadcast_from_main(problem)
        if problem:
            raise ConfigError(problem)
    else:
        check_out(out, args.overwrite)
    targets = parse_target_modules(args.target_modules)
    if args.max_length < 2:
        raise ConfigError("--max-length must be at least 2 (one token has no next-token target)")
    stats_cache = os.path.abspath(args.stats_cache) if args.stats_cache else None
    if stats_cache:
        check_stats_cache(stats_cache)
    if distributed.is_main():
        remove_stale_temporaries(out, stats_cache)

    from .builtins import check_model_folder, load_model, load_records, records_to_examples
    from .config import LoraDAConfig

    def lora_da_config(population):
        try:
            return LoraDAConfig(rank=args.rank, population_size=population, beta=args.beta, gamma=args.gamma,
                                damping=args.damping, max_damping=args.max_damping, seed=args.seed,
                                token_mask=args.token_mask, batch_size=args.batch_size)
        except ConfigError as exc:
            raise ConfigError(f"invalid LoRA-DA settings: {exc}") from None

    lora_da_config(args.population_size)
    check_model_folder(args.model)

    from tqdm.auto import tqdm

    with clock.phase("load_data"):
        records, lines = load_records(args.data)
        keep = subsample_indices(len(records), args.num_samples)
        chosen = [records[i] for i in keep]
        state.data_lines = [lines[i] for i in keep] if lines is not None else None
    population = args.population_size or len(records)

    from peft import LoraConfig, get_peft_model

    from . import checkpoint as ckpt
    from .peft_integration import (apply_lora_da, check_rank_fits, lora_target_names, resolve_lora_da_config,
                                   select_statistics)
    from .solver import solve_lora_da
    from .statistics import StatisticsPass, collect_statistics, prepare_examples, run_pass, shard_examples

    cfg_in = lora_da_config(population)
    try:
        lora_config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora,
                                 target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid LoRA settings: {exc}") from None

    with clock.phase("load_model"):
        if say:
            say(f"loading {args.model} ...")
        model, tokenizer, model_folder = load_model(args.model, args.dtype, args.device, log=say,
                                                    device_map=args.device_map)
    device = next(model.parameters()).device

    try:
        names = lora_target_names(model, lora_config)
    except TargetError as exc:
        text = str(exc)
        if "matches no module" in text:  # PEFT's set of names is not what the user typed
            text = f"--target-modules {args.target_modules!r} matches no module; " + text.split("; ", 1)[-1]
        raise TargetError(text) from None
    check_rank_fits(model, names, args.rank)
    cfg = resolve_lora_da_config(lora_config, cfg_in, names)

    with clock.phase("tokenize"):
        examples = records_to_examples(tokenizer, tqdm(chosen, desc="tokenize", unit="ex", disable=not show,
                                                       dynamic_ncols=True), args.max_length)
    empty = _no_label_indices(examples)
    if len(empty) == len(examples):
        raise DataError(f"none of the {len(examples)} calibration examples has a label token (empty texts, or "
                        f"prompts that fill --max-length {args.max_length}): nothing to gather statistics from")
    if empty and say:
        say(f"{len(empty)} of {len(examples)} examples have no label token (empty, or the prompt fills "
            f"--max-length): skipped ({_where(empty, state.data_lines)})")

    stats, cache_loaded, verified, resumed = None, False, None, 0
    if stats_cache:
        # The fingerprint of this run's pass: model, targets, settings, the examples in pass order (all of
        # them, whatever the number of ranks: a file made under torchrun serves one process and back), code.
        sp = StatisticsPass(model, cfg)
        full = prepare_examples(sp, examples, shard=False)
        fp, parts = ckpt.fingerprint_with_parts(model, sp, full)
        want = {k: parts[k] for k in CACHE_PARTS}
        # rank 0 decides (every rank must take the same branch); each rank then reads the file itself
        if distributed.broadcast_from_main(os.path.isfile(stats_cache)):
            with clock.phase("load_statistics"), distributed.step("loading --stats-cache"):
                if not os.path.isfile(stats_cache):
                    raise ConfigError(f"--stats-cache {stats_cache}: rank 0 sees this file, rank "
                                      f"{distributed.rank()} does not (the ranks need a shared filesystem)")
                stats, verified = _load_stats_cache(stats_cache, want, say)
            cache_loaded = True
            if say:
                say(f"statistics loaded from {stats_cache}")
        else:
            # Under torchrun each rank runs and checkpoints its own shard (FILE.partial.rankR); resuming
            # needs the same number of ranks (the shards are part of the checkpoint's fingerprint).
            exs = shard_examples(sp, full)
            if distributed.is_active():
                fp, _ = ckpt.fingerprint_with_parts(model, sp, exs, like=parts)
            state.pass_examples = len(exs)
            partial = state.partial = stats_cache + PARTIAL_SUFFIX + (
                f".rank{distributed.rank()}" if distributed.is_active() else "")
            # collect_statistics(checkpoint=...) step by step, so that the checkpoint is removed only once
            # FILE is safely written (the API removes it when the pass ends).
            with clock.phase("statistics"):
                with distributed.guard(), sp:
                    meta = ckpt.peek(partial)
                    if meta is not None:
                        if meta.get("fingerprint") != fp:
                            hint = (" (under torchrun each rank checkpoints its own shard of the examples: "
                                    "resume with the same number of ranks)" if distributed.is_active() else "")
                            raise ConfigError(ckpt.mismatch_message(partial, meta, fp) + hint)
                        resumed = int(meta["done"])
                        if say:
                            say(f"resuming the statistics pass from {partial}: {resumed} of {len(exs)} "
                                "examples already done")
                    elif say:
                        say(f"statistics pass checkpointed every {args.checkpoint_every} examples in {partial} "
                            "(after Ctrl-C or a crash, rerun the same command to resume)")
                    done = ckpt.resume(sp, partial, fp)
                    run_pass(sp, exs, show, done=done,
                             on_batch=ckpt.saver(sp, partial, fp, args.checkpoint_every))
                stats = sp.finalize()  # (summed over the ranks under torchrun)
            stats.meta = dict(stats.meta, fingerprint={"parts": want},
                              cli={"model": args.model, "data": args.data, "num_samples": args.num_samples,
                                   "max_length": args.max_length, "token_mask": args.token_mask,
                                   "dtype": args.dtype})
            with distributed.step("writing --stats-cache"):  # rank 0 writes; the checkpoints go once it has
                if distributed.is_main():
                    _save_stats_atomic(stats, stats_cache)
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
            if distributed.is_main():  # checkpoints of earlier runs with another number of ranks
                for stale in glob.glob(glob.escape(stats_cache + PARTIAL_SUFFIX) + ".rank*"):
                    if ".tmp-" not in stale:
                        with contextlib.suppress(OSError):
                            os.remove(stale)
            if say:
                say(f"statistics saved to {stats_cache}")
    else:
        with clock.phase("statistics"):
            stats = collect_statistics(model, examples, cfg, progress=show)
    try:
        stats = select_statistics(stats, names, model, cfg.token_mask)
    except (TargetError, ConfigError) as exc:
        raise type(exc)(f"--stats-cache {stats_cache}: {exc}; delete it or give another file") from None

    with clock.phase("solve"):
        result = solve_lora_da(stats, cfg, progress=show)  # sharded over the ranks under torchrun
    if not distributed.is_main():
        return {}  # rank 0 alone builds and writes the adapter

    with clock.phase("adapter"):
        peft_model = get_peft_model(model, lora_config)
        apply_lora_da(peft_model, result)
    modules = {name: dict(rep.to_dict(), rank=cfg.rank) for name, rep in result.reports.items()}
    report = {
        "lora_da_fast_version": _version(),
        "command": [PROG] + list(getattr(args, "argv", []) or []),
        "model": args.model,
        "model_folder": model_folder,
        "model_class": type(model).__name__,
        "data": args.data,
        "num_records": len(records),
        "num_samples": len(chosen),
        "num_examples": stats.num_examples,
        "num_skipped": stats.num_skipped,
        "num_tokens": stats.num_tokens,
        "max_length": args.max_length,
        "statistics_cache": {"path": stats_cache, "loaded": cache_loaded, "fingerprint_checked": verified,
                             "resumed_from_examples": resumed,
                             "checkpoint_every": args.checkpoint_every} if stats_cache else None,
        "lora_config": {"r": lora_config.r, "lora_alpha": lora_config.lora_alpha, "use_rslora": lora_config.use_rslora,
                        "target_modules": targets, "scaling": _scaling(lora_config)},
        "lora_da_config": cfg.to_dict(),
        "device": str(device),
        "world_size": distributed.world_size(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "adapter": out,
        "timings_s": clock.wall,
        "cpu_time_s": clock.cpu,
        "peak_memory": peak_memory(device),
        "wall_time_s": clock.total(),
        "modules": modules,
    }
    with clock.phase("save"):
        _write_adapter(peft_model, report, out)
    # The save is timed after the rename: rewrite the report (atomically) with it.
    report["wall_time_s"] = clock.total()
    _write_json_atomic(os.path.join(out, REPORT_FILE), report)
    return report


def _json_safe(obj):
    """Strict JSON: non-finite floats (e.g. the eigengap of a module with d_in == r) become null."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _dump_json(obj, f) -> None:
    json.dump(_json_safe(obj), f, indent=1, allow_nan=False)
    f.write("\n")


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        _dump_json(obj, f)
    os.replace(tmp, path)


def _scaling(lora_config) -> float:
    import math

    r = lora_config.r
    return lora_config.lora_alpha / (math.sqrt(r) if lora_config.use_rslora else r)


def _version() -> str:
    from . import __version__

    return __version__


def print_summary(report: dict, stream=None) -> None:
    stream = stream or sys.stdout
    print(format_table(report["modules"]), file=stream)
    cpu = report.get("cpu_time_s", {})
    phases = ", ".join(f"{k} {v:.1f}s" + (f" (cpu {cpu[k]:.0f}s)" if cpu.get(k, 0) >= 1 else "")
                       for k, v in report["timings_s"].items())
    print(f"\n{len(report['modules'])} modules, rank {report['lora_config']['r']}, "
          f"{report['num_examples']} examples ({report['num_skipped']} skipped), {report['num_tokens']} tokens; "
          f"N = {report['lora_da_config']['population_size']}", file=stream)
    noted = [n for n, m in report["modules"].items() if m.get("notes")]
    if noted:
        print(f"{len(noted)} module(s) with notes (raised damping, solver fallback, ill-defined subspace): see the "
              f"notes column and {REPORT_FILE}", file=stream)
    cache = report.get("statistics_cache") or {}
    if cache.get("resumed_from_examples"):
        print(f"statistics pass resumed from a checkpoint after {cache['resumed_from_examples']} examples", file=stream)
    print(f"time: {report['wall_time_s']:.1f}s ({phases})", file=stream)
    mem = report["peak_memory"]
    line = f"peak memory: CPU RSS {mem['cpu_max_rss_gb']:.2f} GB"
    if "cuda_max_allocated_gb" in mem:
        line += f", CUDA allocated {mem['cuda_max_allocated_gb']:.2f} GB"
    print(line, file=stream)
    print(f"adapter: {report['adapter']} (load with PeftModel.from_pretrained(base, {report['adapter']!r}); "
          f"report: {REPORT_FILE})", file=stream)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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


def _explain(exc: LoraDAError, args, state: _RunState) -> str:
    """The error's message, with what the user can do when the library's text cannot know it."""
    msg = _one_line(exc)
    if isinstance(exc, NumericalError):
        m = re.search(r"on examples ([\d, ]+)", msg)
        if m:
            idx = [int(t) for t in m.group(1).replace(",", " ").split()]
            if state.data_lines is not None and all(0 <= i < len(state.data_lines) for i in idx):
                msg += f" [{_where(idx, state.data_lines)}]"
        if "Cholesky" in msg:
            msg += "; raise --max-damping or --damping"
        if "dtype" in msg and getattr(args, "dtype", None) == "float32":
            msg += " (already float32: check the model's weights and the data)"
    return msg


def _partial_hint(state: _RunState) -> str:
    from .checkpoint import peek

    if not state.partial:
        return ""
    try:
        meta = peek(state.partial)
    except LoraDAError:
        meta = None
    if not meta:
        return ""
    return (f"; the statistics pass is checkpointed in {state.partial} ({meta['done']} of "
            f"{state.pass_examples} examples done): rerun the same command to resume")


def _crash_report(exc: BaseException, argv: List[str]) -> Optional[str]:
    """Write the traceback and versions to a file in the temp folder; returns its path (None if unwritable)."""
    from importlib import metadata

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
    from . import distributed

    state = _RunState()
    try:  # under torchrun (WORLD_SIZE > 1): one process group; gloo for CPU runs
        distributed.init_from_env(backend="gloo" if str(args.device).startswith("cpu") else None)
    except Exception as exc:  # noqa: BLE001 - a launcher problem, not the user's data
        print(f"{PROG}: error: cannot join the torch.distributed process group ({_one_line(exc)[:200]})",
              file=sys.stderr)
        return 2
    main_rank = distributed.is_main()
    tag = f" (rank {distributed.rank()})" if distributed.is_active() else ""
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
            phase = state.clock.current if state.clock else None
            print(f"{PROG}: error: out of memory{f' during {phase}' if phase else ''} ({_one_line(exc)[:200]}): "
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
        print(f"{PROG}: internal error: {type(exc).__name__}{at}: {_one_line(exc)[:300]} ({where}; please report "
              f"it with that file){_partial_hint(state)}", file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        distributed.shutdown()
    if not main_rank:
        return 0
    if args.json:
        _dump_json(report, sys.stdout)
    elif not args.quiet:
        print_summary(report)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
