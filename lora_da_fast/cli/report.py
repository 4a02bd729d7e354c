"""What a run tells its user: the time of each phase, peak memory, the per-module table and summary."""
from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from typing import Dict, Optional

import torch

from .output import REPORT_FILE


def lora_scaling(lora_alpha: float, r: int, rslora: bool = False) -> float:
    """PEFT's scaling of ``lora_B @ lora_A``: ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA."""
    return lora_alpha / (math.sqrt(r) if rslora else r)


def scaling(lora_config) -> float:
    """:func:`lora_scaling` of a ``LoraConfig``."""
    return lora_scaling(lora_config.lora_alpha, lora_config.r, lora_config.use_rslora)


class Clock:
    """Wall and process CPU seconds per phase (CPU time tells a slow phase from a busy machine)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.wall: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}
        self.current: Optional[str] = None  # the phase running now (named by an out-of-memory message)

    @contextlib.contextmanager
    def phase(self, name: str):
        stop = self.begin(name)
        try:
            yield
        finally:
            stop()

    def begin(self, name: str):
        """Time the phase ``name`` from now; returns the function that ends it (for a phase that ends inside
        a callee, e.g. the save, whose time goes into the report the save writes)."""
        w, c = time.perf_counter(), time.process_time()
        self.current = name

        def stop() -> None:
            self.wall[name] = time.perf_counter() - w
            self.cpu[name] = time.process_time() - c
        return stop

    def total(self) -> float:
        return time.perf_counter() - self.start


def peak_memory(device) -> Dict[str, float]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # kB on Linux, bytes on macOS
    out = {"cpu_max_rss_gb": rss_bytes / 2**30}
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
    loose = [n for n, m in report["modules"].items()
             if any(x.startswith("not determined by the data") for x in m.get("notes") or [])]
    if noted:
        print(f"{len(noted)} module(s) with notes (raised damping, solver fallback, ill-defined subspace, not "
              f"determined by the data): see the notes column and {REPORT_FILE}", file=stream)
    if loose:
        print(f"{len(loose)} of them not determined by the data at fp32 precision: a rerun that differs only in "
              "rounding (batch size, number of ranks) can give them visibly different adapters "
              "(docs/troubleshooting.md)", file=stream)
    cache = report.get("statistics_cache") or {}
    if cache.get("resumed_from_examples"):
        print(f"statistics pass resumed from a checkpoint after {cache['resumed_from_examples']} examples", file=stream)
    print(f"time: {report['wall_time_s']:.1f}s ({phases})", file=stream)
    mem = report["peak_memory"]
    line = f"peak memory: CPU RSS {mem['cpu_max_rss_gb']:.2f} GB"
    if "cuda_max_allocated_gb" in mem:
        line += f", CUDA allocated {mem['cuda_max_allocated_gb']:.2f} GB"
    planned = (report.get("plan") or {}).get("planned_peak_bytes")
    if planned:  # the memory plan: weights + statistics + the larger of the pass's activations and the solve
        line += f"; planned {planned / 2**30:.2f} GB"
    print(line, file=stream)
    print(f"adapter: {report['adapter']} (load with PeftModel.from_pretrained(base, {report['adapter']!r}, is_trainable=True); "
          f"report: {REPORT_FILE})", file=stream)
