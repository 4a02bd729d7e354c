"""``lora-da-fast`` command line (also ``python -m lora_da_fast``).

``lora-da-fast init --model M --data D --out DIR`` loads a causal LM and calibration data, gathers the
LoRA-DA statistics in one pass, solves every target module, and writes a standard PEFT adapter
(``adapter_config.json``, ``adapter_model.safetensors``) plus ``lora_da_report.json`` into ``DIR``.
The folder is written under a temporary name next to ``DIR`` and renamed at the end, so ``DIR`` is
either the previous content or the complete new adapter.

Exit status: 0 success; 2 bad input (one line ``lora-da-fast: error: ...`` on stderr, no traceback;
every :class:`LoraDAError` is such an error); 1 an internal error (traceback, then one line); 130
interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from typing import Dict, List, Optional

from .errors import ConfigError, DataError, LoraDAError

PROG = "lora-da-fast"
REPORT_FILE = "lora_da_report.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", REPORT_FILE)
REGEX_CHARS = set("^$*+?()[]{}|\\")

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
                    help="statistics file: if FILE exists, load the statistics from it and skip the data pass; "
                         "otherwise save them there after the pass (rerun the solve with other --beta, "
                         "--gamma, --rank, --population-size without touching the data)")
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
    rt = p.add_argument_group("runtime")
    rt.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="model dtype; auto = float32 on CPU, the checkpoint's dtype on GPU (default: %(default)s)")
    rt.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    rt.add_argument("--quiet", action="store_true", help="no progress bars, table or summary; errors only")
    rt.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of the table")
    return parser


# --------------------------------------------------------------------------------------------------
# Helpers


def parse_target_modules(text: str):
    """``all-linear`` | regex (contains a regex metacharacter other than '.') | comma-separated names."""
    text = text.strip()
    if text == "all-linear" or REGEX_CHARS & set(text):
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
        entries = os.listdir(out)
        if entries and not any(f in entries for f in ADAPTER_FILES):
            raise ConfigError(f"--out {out} is a non-empty folder that holds no adapter; not replacing it")
    parent = os.path.dirname(out) or "."
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create {parent} ({exc.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable")


def subsample(records: List[dict], n: int, seed: int = 0) -> List[dict]:
    if n >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


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


def _stats_fingerprint(args, names: List[str], num_records: int) -> dict:
    # What makes a statistics file reusable; rank, alpha, beta, gamma and N only matter to the solve.
    return {"model": args.model, "data": args.data, "num_records": num_records, "num_samples": args.num_samples,
            "max_length": args.max_length, "token_mask": args.token_mask, "targets": names}


def _load_stats_cache(path: str, expect: dict):
    from .statistics import FisherStatistics

    stats = FisherStatistics.load(path)
    have = stats.meta.get("cli") if isinstance(stats.meta, dict) else None
    if have is not None:
        diff = [k for k in expect if have.get(k) != expect[k]]
        if diff:
            raise ConfigError(f"--stats-cache {path} was made for another run (differs in: {', '.join(diff)}); "
                              "delete it or give another file")
    return stats


def _write_adapter(peft_model, report: dict, out: str) -> None:
    """Save into a temp folder next to ``out``, then rename it into place (replacing an old ``out``)."""
    parent = os.path.dirname(out) or "."
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
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
    except OSError as exc:
        if old is not None and not os.path.lexists(out):
            os.rename(old, out)  # put the previous adapter back
            old = None
        raise ConfigError(f"--out {out}: cannot write the adapter ({exc.strerror or exc})") from None
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

    @contextlib.contextmanager
    def phase(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = time.perf_counter() - w
            self.cpu[name] = time.process_time() - c

    def total(self) -> float:
        return time.perf_counter() - self.start


def run_init(args) -> dict:
    """The ``init`` command; returns the report (also written to ``DIR/lora_da_report.json``)."""
    clock = _Clock()
    show = not args.quiet
    if args.quiet:
        _quiet_libraries()
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if show else None

    # Everything cheap is checked before loading a model.
    out = os.path.abspath(args.out)
    check_out(out, args.overwrite)
    targets = parse_target_modules(args.target_modules)
    if args.max_length < 2:
        raise ConfigError("--max-length must be at least 2 (one token has no next-token target)")
    stats_cache = os.path.abspath(args.stats_cache) if args.stats_cache else None
    if stats_cache and os.path.isdir(stats_cache):
        raise ConfigError(f"--stats-cache {stats_cache} is a folder; give a file path")

    from tqdm.auto import tqdm

    from .builtins import load_data, load_model, records_to_examples

    with clock.phase("load_data"):
        records = load_data(args.data)
        chosen = subsample(records, args.num_samples)
    population = args.population_size or len(records)

    from peft import LoraConfig, get_peft_model

    from .config import LoraDAConfig
    from .peft_integration import apply_lora_da, lora_target_names, resolve_lora_da_config, select_statistics
    from .solver import solve_lora_da
    from .statistics import collect_statistics

    cfg_in = LoraDAConfig(rank=args.rank, population_size=population, beta=args.beta, gamma=args.gamma,
                          token_mask=args.token_mask, batch_size=args.batch_size)
    try:
        lora_config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora,
                                 target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid LoRA settings: {exc}") from None

    with clock.phase("load_model"):
        if say:
            say(f"loading {args.model} ...")
        model, tokenizer, model_folder = load_model(args.model, args.dtype, args.device, log=say)
    device = next(model.parameters()).device

    names = lora_target_names(model, lora_config)
    cfg = resolve_lora_da_config(lora_config, cfg_in, names)
    fingerprint = _stats_fingerprint(args, names, len(records))

    stats = None
    cache_loaded = stats_cache is not None and os.path.isfile(stats_cache)
    if cache_loaded:
        with clock.phase("load_statistics"):
            stats = _load_stats_cache(stats_cache, fingerprint)
        if say:
            say(f"statistics loaded from {stats_cache}")
    else:
        with clock.phase("tokenize"):
            examples = records_to_examples(tokenizer, tqdm(chosen, desc="tokenize", unit="ex", disable=not show,
                                                           dynamic_ncols=True), args.max_length)
        with clock.phase("statistics"):
            stats = collect_statistics(model, examples, cfg, progress=show, num_examples=len(examples))
        if stats_cache:
            stats.meta = dict(stats.meta, cli=fingerprint)
            try:
                stats.save(stats_cache)
            except OSError as exc:
                raise ConfigError(f"--stats-cache {stats_cache}: cannot write it ({exc.strerror or exc})") from None
    stats = select_statistics(stats, names, model, cfg.token_mask)

    with clock.phase("solve"):
        result = solve_lora_da(stats, cfg, progress=show)

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
        "statistics_cache": {"path": stats_cache, "loaded": cache_loaded} if stats_cache else None,
        "lora_config": {"r": lora_config.r, "lora_alpha": lora_config.lora_alpha, "use_rslora": lora_config.use_rslora,
                        "target_modules": targets, "scaling": _scaling(lora_config)},
        "lora_da_config": cfg.to_dict(),
        "device": str(device),
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


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    args.argv = argv
    try:
        report = run_init(args)
    except LoraDAError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, or a failure we did not foresee: keep the traceback
        traceback.print_exc()
        print(f"{PROG}: internal error: {type(exc).__name__}: {_one_line(exc)} (please report it with the "
              "traceback above)", file=sys.stderr)
        return 1
    if args.json:
        _dump_json(report, sys.stdout)
    elif not args.quiet:
        print_summary(report)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
