"""Block sizes of the batched LOBPCG on one statistics file (issue 17): for each option set, the operator
passes per module (bytes-weighted median, as ``bench_solver.py --proxies`` counts them), iterations, the
CPU time and the error of ``lora_B @ lora_A`` against the dense float64 reference, on the CUDA code path
on CPU tensors (``--cuda-path``: explicit inverse, the GPU's choices) or the CPU's own::

    python benchmarks/solver_blocks.py --stats FILE --cuda-path --threads 2 \\
        --options '{}' '{"expand_all": true}' '{"extra": 24, "expand_all": true}'

The Rayleigh-Ritz basis has ``k + kw + kp`` columns (``BatchedOptions.block``); above 32 a GPU runs its
``eigh`` on the host. Counts are exact; times are one run each (a noisy machine moves them).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics as pystats
import time

import torch

import solver_proxies as sp  # (first: makes lora_da_fast importable from a source tree)
from bench_solver import rel_errors

from lora_da_fast import FisherStatistics, LoraDAConfig
from lora_da_fast.solve import solve_reference
from lora_da_fast.solve.batched import BatchedOptions, solve_batched


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stats", required=True, help="a FisherStatistics file")
    ap.add_argument("--options", nargs="+", default=["{}"], help="BatchedOptions fields, one JSON object per run")
    ap.add_argument("--cuda-path", action="store_true", help="the CUDA code path on CPU tensors")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="skip the dense float64 reference (errors)")
    ap.add_argument("--json", default=None, help="append one JSON line per option set to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    stats = FisherStatistics.load(args.stats)
    cfg = LoraDAConfig(rank=8, beta=0.03, population_size=100_000)
    groups = stats.groups()
    weights = [sp.module_pass_bytes(stats, m, groups) for m in stats.modules]
    ref = None if args.no_reference else solve_reference(stats, cfg)
    for text in args.options:
        opts = json.loads(text)
        if args.cuda_path:
            opts.setdefault("apply", "inverse")
        k, kw, kp = BatchedOptions(**opts).block(cfg.rank)
        diag: dict = {}
        ctx = sp.cuda_path(None) if args.cuda_path else contextlib.nullcontext()
        t0, c0 = time.perf_counter(), time.process_time()
        with ctx:
            res = solve_batched(stats, cfg, diagnostics=diag, **opts)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        passes = [diag[m]["passes"] for m in stats.modules]
        its = [diag[m]["iterations"] for m in stats.modules]
        row = dict(options=opts, basis=k + kw + kp, block=[k, kw, kp], cuda_path=args.cuda_path,
                   passes_wmedian=sp.weighted_median(passes, weights), passes_max=max(passes),
                   iterations=[min(its), pystats.median(its), max(its)], wall_s=wall, cpu_s=cpu)
        if ref is not None:
            errs = rel_errors(res, ref)
            row.update(max_rel_err=max(errs), median_rel_err=pystats.median(errs))
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
