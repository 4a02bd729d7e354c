"""What every benchmark script shares: timing with a device sync, repeats, the git state, a line that
describes the machine, peak memory, and result rows (JSON lines, Markdown tables).

Nothing here touches CUDA at import time: a device is synchronised, or its memory read, only when the
caller passes a CUDA device.

Importing this module also makes ``lora_da_fast`` importable from a source tree without an install: the
repository root is *appended* to ``sys.path``, so an installed copy, or one on ``PYTHONPATH`` (as
``gpu_check.sh`` sets it), comes first.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LIBRARY_PATHS = ("lora_da_fast", "kernels")  # what a measurement depends on, for the dirty flag
if REPO not in sys.path:
    sys.path.append(REPO)


# --------------------------------------------------------------------------------------------------
# Real data


def builtin_examples(tokenizer, data: str, num_samples: int, max_length: int) -> tuple:
    """``(examples, number of records)``: the CLI's sample of ``num_samples`` records of the built-in data set
    ``data`` (``rotten-tomatoes``, ``gsm-symbolic``), tokenized to at most ``max_length`` tokens each, as
    ``lora-da-fast init --data DATA --num-samples N --max-length L`` takes them."""
    from lora_da_fast.cli.builtins import load_records, records_to_examples
    from lora_da_fast.cli.init import subsample_indices

    records, _ = load_records(data)
    chosen = [records[i] for i in subsample_indices(len(records), num_samples)]
    return records_to_examples(tokenizer, chosen, max_length), len(records)


# --------------------------------------------------------------------------------------------------
# Timing


def is_cuda(device) -> bool:
    """Whether ``device`` (a ``torch.device``, a string such as ``"cuda:0"``, or None) is a CUDA device."""
    if device is None:
        return False
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    """Wait for the device's queued work (CUDA only; nothing on a CPU)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


class Timing(NamedTuple):
    wall: float  # seconds, wall clock, with a device sync on both sides
    cpu: float  # seconds of CPU time of this process (threads included): on a shared machine it depends
    #             much less on the neighbours' load than the wall time does
    result: Any = None


def timed(fn: Callable[[], Any], device=None) -> Timing:
    """``Timing(wall, cpu, result)`` of one call of ``fn``."""
    with timer(device) as t:
        out = fn()
    return Timing(t.wall, t.cpu, out)


class _Timer:
    wall: float = float("nan")
    cpu: float = float("nan")


@contextlib.contextmanager
def timer(device=None):
    """``with timer(device) as t: ...`` then ``t.wall`` and ``t.cpu`` (seconds), as :func:`timed`."""
    t = _Timer()
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield t
    finally:
        sync(device)
        t.wall, t.cpu = time.perf_counter() - w0, time.process_time() - c0


def repeat(fn: Callable[[], Any], k: int, device=None, warmup: int = 0) -> List[Timing]:
    """``k`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device) for _ in range(k)]


def best_of(fn: Callable[[], Any], k: int, device=None, warmup: int = 0) -> Timing:
    """The least wall and the least CPU time of ``k`` calls (each minimum on its own), with the last
    call's result."""
    runs = repeat(fn, k, device, warmup)
    return Timing(min(r.wall for r in runs), min(r.cpu for r in runs), runs[-1].result)


def median_of(fn: Callable[[], Any], k: int, device=None, warmup: int = 1) -> float:
    """Median wall seconds of ``k`` calls after ``warmup`` untimed ones."""
    return statistics.median(r.wall for r in repeat(fn, k, device, warmup))


# --------------------------------------------------------------------------------------------------
# Peak memory


def cpu_max_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (1e9 bytes). It cannot be reset: to compare
    two phases, run each in its own process."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9  # bytes on macOS, KiB on Linux


def reset_peak(device) -> None:
    """Start a new CUDA peak (nothing on a CPU: see :func:`cpu_max_rss_gb`)."""
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_gb(device) -> float:
    """Most memory allocated by torch on ``device`` since the last :func:`reset_peak`, in GB."""
    return torch.cuda.max_memory_allocated(device) / 1e9


def peak_gb(device) -> float:
    """CUDA: :func:`cuda_peak_gb`; CPU: :func:`cpu_max_rss_gb`."""
    return cuda_peak_gb(device) if is_cuda(device) else cpu_max_rss_gb()


def peak_kind(device) -> str:
    return "CUDA max allocated" if is_cuda(device) else "CPU max RSS"


# --------------------------------------------------------------------------------------------------
# Where and on what it ran


def git_state(paths: Optional[Sequence[str]] = LIBRARY_PATHS) -> Dict[str, Any]:
    """``{"commit": short hash or "unknown", "dirty": bool or None, "dirty_files": [...]}``; ``dirty``
    counts modified or untracked files under ``paths`` (None: the whole tree)."""
    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
        status = git("status", "--porcelain", *(["--", *paths] if paths else []))
        files = [line[3:] for line in status.splitlines() if line.strip()]
        return {"commit": commit, "dirty": bool(files) if commit != "unknown" else None, "dirty_files": files}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None, "dirty_files": []}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_name(device) -> Optional[str]:
    """The GPU's name for a CUDA ``device``, else None (CUDA is not queried for a CPU device)."""
    return torch.cuda.get_device_name(device) if is_cuda(device) else None


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device=None) -> str:
    """One line: CPU model and cores, torch threads, torch / triton / transformers versions, and the
    GPU's name when ``device`` is a CUDA device (or, with ``device=None``, when CUDA is available)."""
    parts = [f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
             f"torch {torch.__version__}"]
    for dist in ("triton", "transformers"):
        v = _version(dist)
        if v:
            parts.append(f"{dist} {v}")
    if device is None and torch.cuda.is_available():
        device = "cuda"
    name = gpu_name(device)
    if name:
        parts.append(f"GPU {name}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Models


def random_llama(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int = 32000,
                 max_positions: int = 4096, device="cpu", dtype: torch.dtype = torch.float32):
    """A Llama of these shapes with random weights (from a config: no download), built directly on
    ``device`` in ``dtype``, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=max_positions)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Results


def append_jsonl(path: Optional[str], row: dict) -> None:
    """Append ``row`` as one JSON line to ``path`` (nothing when ``path`` is None)."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def markdown_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(header: Sequence[Any], rows: Iterable[Iterable[Any]]) -> str:
    lines = [markdown_row(header), "|" + "---|" * len(header)]
    lines += [markdown_row(r) for r in rows]
    return "\n".join(lines)


def write_results(out_dir: Optional[str], files: Dict[str, Any]) -> None:
    """Write ``{file name: content}`` into ``out_dir`` (created): strings as text (a newline added when
    missing), anything else as indented JSON. Nothing when ``out_dir`` is None."""
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            if isinstance(content, str):
                f.write(content if content.endswith("\n") else content + "\n")
            else:
                json.dump(content, f, indent=1)


@contextlib.contextmanager
def library_debug_log(target, fmt: Optional[str] = None, logger: str = "lora_da_fast"):
    """Route the library's DEBUG log (today: the batched solver's per-chunk phases and iteration counts)
    to ``target``, a file name (overwritten) or a stream, for the duration of the block."""
    handler = logging.FileHandler(target, mode="w") if isinstance(target, str) else logging.StreamHandler(target)
    if fmt:
        handler.setFormatter(logging.Formatter(fmt))
    lg = logging.getLogger(logger)
    level = lg.level
    lg.addHandler(handler)
    lg.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        lg.removeHandler(handler)
        lg.setLevel(level)
        handler.close()
