"""Solver benchmark: the batched solver against the per-module dense float64 reference and against the
authors' method (per-module ``torch.lobpcg`` with 10 iterations), on model-shaped synthetic statistics.

Two ways to run it:

- pytest-benchmark (CPU, SmolLM2-135M shape; ``BENCH_LAYERS`` picks the number of layers, default 30,
  ``BENCH_THREADS`` torch's threads)::

      BENCH_THREADS=1 pytest benchmarks/bench_solver.py --benchmark-only

- script, printing a table (method, seconds, max/median relative error of ``lora_B @ lora_A`` against
  the dense float64 reference)::

      python benchmarks/bench_solver.py --shape smollm2 --device cpu --out /tmp/bench
      python benchmarks/bench_solver.py --shape llama7b --device cuda --out /tmp/bench

  or on real statistics saved by ``lora-da-fast init --stats-cache FILE`` (or ``FisherStatistics.save``)::

      python benchmarks/bench_solver.py --stats FILE --threads 1 --out /tmp/bench

  With ``llama7b`` the per-module methods run on ``--ref-modules`` modules only (default 4, all with
  ``d_in = 4096``); their total over the 224 modules is extrapolated from those and marked ``~``.

- proxies of the GPU solve measured on a CPU (issue 17; ``benchmarks/solver_proxies.py``), today's
  solver (``--baseline``, a git revision of ``lora_da_fast/solve/batched.py``) next to the current one in
  one run: bytes per operator pass and fixed flops of the 7B and 1B shapes, device kernels, host syncs and
  host time per LOBPCG iteration on the CUDA code path, and on each ``--stats`` file (comma-separated)
  operator passes per module, errors against the dense float64 reference and the CPU solve time::

      python benchmarks/bench_solver.py --proxies --stats SMOLLM2,RANDOM --threads 2 --out /tmp/proxies

Statistics: for every input group a symmetric positive definite ``Z`` with a geometric spectrum that
moves, layer by layer, from ``4e-9..0.6`` (first layer) to ``1e-3..4e4`` (last), the values seen on
SmolLM2 (ALGORITHM.md); gradients ``G`` in the range of ``Z`` (``G^T = Q diag(sqrt(s)) W``, ``W`` of low
rank plus noise) scaled like a real mean gradient (``~2 rms(delta) rms(x)``), and ``y`` log-uniform
around a per-layer level going from ``2e-3`` to ``3e-8``.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics as pystats
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from harness import environment, git_state, gpu_name, library_debug_log, sync, timed, write_results

from lora_da_fast import FisherStatistics, LoraDAConfig, LoraDAResult, ModuleStatistics
from lora_da_fast.solve import solve_batched, solve_reference
from lora_da_fast.solve.steps import (canonical_signs, cholesky_with_retry, fisher_gradient, guidance, output_damping,
                                      output_inverse, to_factors)

SHAPES = {
    # name: (layers, hidden, mlp, q_out, kv_out)
    "smollm2": (30, 576, 1536, 576, 192),
    "llama7b": (32, 4096, 11008, 4096, 4096),
}


def _lerp_log(a: float, b: float, t: float) -> float:
    return 10 ** (math.log10(a) + t * (math.log10(b) - math.log10(a)))


def synthetic_statistics(shape: str = "smollm2", layers: Optional[int] = None, device="cpu", seed: int = 0,
                         population: int = 256) -> FisherStatistics:
    """Model-shaped statistics (see the module docstring): 7 modules and 4 input groups per layer."""
    n_layers, hidden, mlp, q_out, kv_out = SHAPES[shape]
    n_layers = layers or n_layers
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    f64 = dict(dtype=torch.float64, device=device)
    bases = {}
    for d in sorted({hidden, mlp}):
        bases[d], _ = torch.linalg.qr(torch.randn(d, d, generator=gen, **f64))
    Z: Dict[str, torch.Tensor] = {}
    modules: Dict[str, ModuleStatistics] = {}
    for layer in range(n_layers):
        t = layer / max(1, n_layers - 1)
        lo, hi = _lerp_log(4e-9, 1e-3, t), _lerp_log(0.6, 4e4, t)
        ylevel = _lerp_log(2e-3, 3e-8, t)
        p = f"model.layers.{layer}."
        spec = [(p + "self_attn.q_proj", hidden, [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)],
                 "self_attn."),
                (p + "self_attn.o_proj", hidden, [("o_proj", hidden)], "self_attn."),
                (p + "mlp.gate_proj", hidden, [("gate_proj", mlp), ("up_proj", mlp)], "mlp."),
                (p + "mlp.down_proj", mlp, [("down_proj", hidden)], "mlp.")]
        for group, d_in, outs, sub in spec:
            Q = bases[d_in]
            s = torch.logspace(math.log10(lo), math.log10(hi), d_in, **f64)
            s = s[torch.randperm(d_in, generator=gen, device=device)]
            v = torch.randn(d_in, 1, generator=gen, **f64)
            v = v / torch.linalg.vector_norm(v)
            Qg = Q - 2 * v @ (v.T @ Q)  # a different basis per group: one Householder reflection
            Z[group] = ((Qg * s) @ Qg.T).float()
            root = Qg * s.sqrt()
            for name, d_out in outs:
                y = ylevel * torch.exp(torch.empty(d_out, **f64).uniform_(-1.15, 1.15, generator=gen))
                W = (torch.randn(d_in, 16, generator=gen, **f64) @ torch.randn(16, d_out, generator=gen, **f64)
                     / 4.0 + 0.3 * torch.randn(d_in, d_out, generator=gen, **f64))
                # rms(x) ~ sqrt(mean s), rms(delta) ~ sqrt(y): G ~ 2 rms(delta) rms(x) per entry
                Gt = root @ (Qg.T @ W)
                Gt = Gt * (2 * math.sqrt(ylevel) * float(s.mean().sqrt()) / float(Gt.pow(2).mean().sqrt()))
                modules[p + sub + name] = ModuleStatistics(group, Gt.T.float().contiguous(), y.float())
                del W, Gt
            del root, Qg
    return FisherStatistics(modules, Z, population, population * 1024, meta={"synthetic": shape})


def subset(stats: FisherStatistics, names: Sequence[str]) -> FisherStatistics:
    return stats.subset(list(names))


def dense_z(stats: FisherStatistics, group: str) -> torch.Tensor:
    """The dense float64 ``Z`` of ``group`` (the statistics may keep it packed)."""
    if hasattr(stats, "dense_Z"):
        return stats.dense_Z(group, torch.float64)
    return stats.Z[group].double()


def solve_lobpcg10(stats: FisherStatistics, cfg: LoraDAConfig, niter: int = 10) -> LoraDAResult:
    """The authors' per-module method: the reference steps (float64, one Cholesky per group, explicit
    ``Zd^{-1}`` and ``M``), with ``torch.lobpcg(M, k=r, largest=False, niter=10)`` in place of ``eigh``."""
    result = LoraDAResult()
    gen = torch.Generator().manual_seed(cfg.seed)
    for group, names in stats.groups().items():
        if not names:
            continue
        L, _ = cholesky_with_retry(stats.dense_Z(group, torch.float64), cfg.damping, cfg.max_damping, group)
        Zinv = torch.cholesky_inverse(L) if cfg.beta > 0 else None
        for name in names:
            st = stats.modules[name]
            u = output_inverse(st, stats.num_examples, output_damping(st, cfg), stats.output_fisher).to(L.device)
            D = fisher_gradient(L, st.G.double(), u)
            sigma = torch.linalg.matrix_norm(D, ord=2)
            D = D / sigma
            M = guidance(D, Zinv, u, sigma, cfg.alpha, cfg.beta, cfg.population_size)
            X0 = torch.randn(M.shape[0], cfg.rank, generator=gen, dtype=M.dtype).to(M.device)
            _, V = torch.lobpcg(M, k=cfg.rank, X=X0, largest=False, niter=niter)
            result[name] = to_factors(canonical_signs(V), D, cfg.gamma)
    return result


def rel_errors(got: LoraDAResult, ref: LoraDAResult) -> List[float]:
    out = []
    for name, f in ref.items():
        want = f.lora_B.double() @ f.lora_A.double()
        have = got[name].lora_B.double().to(want.device) @ got[name].lora_A.double().to(want.device)
        out.append(float(torch.linalg.norm(have - want) / torch.linalg.norm(want)))
    return out


def run(shape: str, device: str, layers: Optional[int] = None, ref_modules: Optional[int] = None,
        repeat: int = 2, beta: float = 0.03, phases: bool = False, stats_path: Optional[str] = None,
        extras: Optional[Sequence[int]] = None) -> List[dict]:
    device = torch.device(device)
    t0 = time.perf_counter()
    if stats_path is not None:
        stats = FisherStatistics.load(stats_path, device=device)
    else:
        stats = synthetic_statistics(shape, layers, device)
    sync(device)
    print(f"statistics: {len(stats.modules)} modules, {len(stats.Z)} input groups, "
          f"{'loaded' if stats_path else 'built'} in {time.perf_counter() - t0:.1f} s on {device}", flush=True)
    cfg = LoraDAConfig(rank=8, beta=beta, population_size=100_000)
    names = list(stats.modules)
    if ref_modules is None and shape == "llama7b" and stats_path is None:
        ref_modules = 4
    if ref_modules:
        # modules with the smallest d_in only: a dense eigendecomposition of 11008 x 11008 per module
        # is minutes of device time
        hidden = min(st.d_in for st in stats.modules.values())
        names = [n for n in names if stats.modules[n].d_in == hidden][:ref_modules]
    small = subset(stats, names)
    frac = len(names) / len(stats.modules)
    rows = []
    # batched and lobpcg interleaved, best of ``repeat`` each (wall and CPU time, each its own minimum;
    # on a shared CPU machine the CPU time depends much less on the neighbours' load): the load drifts
    # variants of the batched solver (``--extra``: other block sizes), run alongside the default one
    variants = {"batched": {}}
    for e in extras or ():
        # every residual column expanded, as on a GPU (on a CPU only the wanted ones are by default)
        variants[f"batched (extra={e}, all columns)"] = {"extra": e, "expand_all": True}
    best = {key: (math.inf, math.inf) for key in variants}
    best["lobpcg"] = (math.inf, math.inf)
    results = {}
    for _ in range(repeat):
        for key, opts in variants.items():
            w, c, results[key] = timed(lambda: solve_batched(stats, cfg, **opts), device)
            print(f"{key}: {w:.2f} s wall, {c:.2f} s CPU", flush=True)
            best[key] = min(best[key], (w, c))
        res_b = results["batched"]
        w, c, res_l = timed(lambda: solve_lobpcg10(small, cfg), device)
        print(f"torch.lobpcg niter=10 ({len(names)} modules): {w:.2f} s wall, {c:.2f} s CPU", flush=True)
        best["lobpcg"] = min(best["lobpcg"], (w, c))
    w, c, ref = timed(lambda: solve_reference(small, cfg), device)
    best["reference"] = (w, c)
    print(f"reference (dense float64, {len(names)} modules): {w:.2f} s wall, {c:.2f} s CPU", flush=True)
    solvers = {}
    for rep in res_b.reports.values():
        solvers[rep.solver] = solvers.get(rep.solver, 0) + 1
    methods = [(key, key, results[key]) for key in variants]
    methods += [("reference-dense-fp64", "reference", ref), ("lobpcg-niter10", "lobpcg", res_l)]
    for method, key, res in methods:
        batched = key in variants
        scale = 1.0 if batched else 1.0 / frac
        errs = rel_errors(res, ref)
        rows.append(dict(method=method, seconds=best[key][0] * scale, cpu_seconds=best[key][1] * scale,
                         extrapolated=not batched and frac < 1.0,
                         modules_timed=len(stats.modules) if batched else len(names),
                         max_rel_err=max(errs), median_rel_err=pystats.median(errs)))
    for row in rows:
        row["speedup_of_batched"] = row["seconds"] / rows[0]["seconds"]
        row["cpu_speedup_of_batched"] = row["cpu_seconds"] / rows[0]["cpu_seconds"]
    print(f"batched solver paths: {solvers}")
    if phases:  # one more run with per-phase timings (synchronising: not the timed run)
        with library_debug_log(sys.stdout):
            solve_batched(stats, cfg)
    return rows


# --------------------------------------------------------------------------------------------------
# Proxies of the GPU solve, measured on a CPU, today's solver next to the current one (issue 17)

# the solver before issue 17: Rayleigh-Ritz on the host, explicit L^{-1} read four times per pass, a second
# LOBPCG for sigma, the norm of Zd^{-1} by power iteration
BASELINE_REV = "b74eaa6"


def proxies(stats_paths: Sequence[str], baseline_rev: str = BASELINE_REV, threads: int = 2, repeat: int = 2,
            ref_modules: Optional[int] = None, tiny_stacks: Sequence[int] = (1, 8, 64)) -> dict:
    """Every proxy of ``solver_proxies`` for today's solver (``baseline_rev``) and the current one, and on
    each statistics file: passes per module, errors against the dense float64 reference (on
    ``ref_modules`` modules, all by default) and the CPU solve time with ``threads`` threads (interleaved,
    best of ``repeat``; ``repeat=0``: not timed)."""
    import solver_proxies as sp

    torch.set_num_threads(threads)
    base = sp.load_baseline(baseline_rev)
    out = {"baseline": baseline_rev, "threads": threads}
    out["shapes"] = {shape: sp.shape_proxies(base, shape) for shape in ("llama7b", "llama1b")}
    print("shapes:", out["shapes"], flush=True)
    with_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-iteration counts and host time: one thread, tiny sizes
    out["iterations"] = sp.iteration_counts(base, stacks=tiny_stacks)
    torch.set_num_threads(with_threads)
    for row in out["iterations"]:
        print({k: v for k, v in row.items() if k != "top_ops"}, flush=True)
    out["stats"] = {}
    for path in stats_paths:
        stats = FisherStatistics.load(path)
        cfg = LoraDAConfig(rank=8, beta=0.03, population_size=100_000)
        groups = stats.groups()
        weights = {m: sp.module_pass_bytes(stats, m, groups) for m in stats.modules}
        passes, gpu_res = sp.passes_per_module(base, stats, cfg, threads)
        row = {}
        for label, p in passes.items():
            vals = [p[m] for m in stats.modules]
            row[label] = dict(passes_wmedian=sp.weighted_median(vals, [weights[m] for m in stats.modules]),
                              passes_min=min(vals), passes_max=max(vals), passes_median=pystats.median(vals))
        names = list(stats.modules)
        if ref_modules:
            names = sorted(names, key=lambda m: (stats.modules[m].d_in, names.index(m)))[:ref_modules]
        ref = solve_reference(subset(stats, names), cfg)
        for label in ("today", "new"):  # errors of the CUDA code path
            errs = rel_errors(LoraDAResult({m: gpu_res[label][m] for m in names}), ref)
            row[label].update(max_rel_err=max(errs), median_rel_err=pystats.median(errs), modules_checked=len(names))
        if repeat:
            # CPU solve time, each solver with its CPU defaults, interleaved: today's solver (dense Z, as it
            # reads them) and the current one
            dense = sp.DenseZStats(stats)
            best = {"today": (math.inf, math.inf), "new": (math.inf, math.inf)}
            res = {}
            for _ in range(repeat):
                for label, fn in (("today", lambda: base.solve_batched(dense, cfg)),
                                  ("new", lambda: solve_batched(stats, cfg))):
                    w, c, res[label] = timed(fn)
                    best[label] = min(best[label], (w, c))
                    print(f"{os.path.basename(path)} {label}: {w:.2f} s wall, {c:.2f} s CPU", flush=True)
            for label in ("today", "new"):
                errs = rel_errors(LoraDAResult({m: res[label][m] for m in names}), ref)
                row[label].update(seconds=best[label][0], cpu_seconds=best[label][1], cpu_max_rel_err=max(errs))
        row["modules"] = len(stats.modules)
        out["stats"][os.path.basename(path)] = row
        print(os.path.basename(path), row, flush=True)
    return out


def format_proxies(p: dict) -> str:
    """Markdown tables of :func:`proxies`, with the targets of issue 17."""
    lines = [f"Today = `lora_da_fast/solve/batched.py` at {p['baseline']}; new = the working tree.", ""]
    lines.append("| proxy (shapes, meta tensors) | today | new | target |")
    lines.append("|---|---|---|---|")
    for shape, r in p["shapes"].items():
        lines.append(f"| bytes per operator pass, all modules, {shape} (GB) | {r['today']['pass_gb']:.1f} | "
                     f"{r['new']['pass_gb']:.1f} | {'<= 150' if shape == 'llama7b' else ''} |")
        lines.append(f"| fixed flops: Cholesky + inverse, {shape} (TFLOP) | {r['today']['fixed_tflop']:.1f} | "
                     f"{r['new']['fixed_tflop']:.1f} | {'<= 50' if shape == 'llama7b' else ''} |")
        lines.append(f"| + the damping rule's check factorisation (issue 15), {shape} (TFLOP) | "
                     f"{r['today']['damping_rule_tflop']:.1f} | {r['new']['damping_rule_tflop']:.1f} | |")
        lines.append(f"| norm estimate of Zd^-1, {shape} (GB read) | {r['today']['norm_gb']:.0f} | "
                     f"{r['new']['norm_gb']:.0f} | 0 |")
    lines += ["", "| per LOBPCG iteration, CUDA code path on CPU tensors, n=96 | modules per factor | stack | "
              "device kernels | host syncs | host LAPACK/BLAS ops | CPU ms (all work) | host linear algebra ms | "
              "host ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in p["iterations"]:
        lines.append(f"| {r['solver']} | {r['modules_per_factor']} | {r['stack']} | {r['kernels']:.0f} | "
                     f"{r['syncs']:.0f} | {r['host_ops']:.0f} | {r['ms']:.2f} | {r['host_lapack_ms']:.2f} | "
                     f"{r['host_ms']:.2f} |")
    for name, r in p["stats"].items():
        lines += ["", f"| {name} ({r['modules']} modules) | passes per module, CUDA code path: bytes-weighted "
                  "median (min / median / max) | max rel err | median rel err | CPU solve, "
                  f"{p['threads']} threads: wall s | CPU s | max rel err |", "|---|---|---|---|---|---|---|"]
        for label in ("today", "new"):
            q = r[label]
            timing = (f"{q['seconds']:.2f} | {q['cpu_seconds']:.2f} | {q['cpu_max_rel_err']:.1e}" if "seconds" in q
                      else "not timed | | ")
            lines.append(f"| {label} | {q['passes_wmedian']:.1f} ({q['passes_min']:.1f} / {q['passes_median']:.1f} / "
                         f"{q['passes_max']:.1f}) | {q['max_rel_err']:.1e} | {q['median_rel_err']:.1e} | {timing} |")
    return "\n".join(lines)


def format_table(rows: List[dict], shape: str, device: str) -> str:
    cpu = device == "cpu"
    head = f"| method ({shape}, {device}) | wall s | batched x faster (wall) |"
    if cpu:
        head += " CPU s | batched x faster (CPU) |"
    head += " max rel err | median rel err |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mark = "~" if r["extrapolated"] else ""
        note = f" (from {r['modules_timed']} modules)" if r["extrapolated"] else ""
        line = f"| {r['method']}{note} | {mark}{r['seconds']:.2f} | {r['speedup_of_batched']:.1f} |"
        if cpu:
            line += f" {mark}{r['cpu_seconds']:.2f} | {r['cpu_speedup_of_batched']:.1f} |"
        line += f" {r['max_rel_err']:.1e} | {r['median_rel_err']:.1e} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--stats", default=None, metavar="FILE",
                    help="real statistics (a FisherStatistics file, e.g. from lora-da-fast init --stats-cache) "
                         "instead of synthetic ones of --shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the model (quick runs)")
    ap.add_argument("--ref-modules", type=int, default=None,
                    help="run the per-module methods on this many modules only (default: all for smollm2, "
                         "4 for llama7b)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="best of this many runs of the batched solver and of the LOBPCG baseline")
    ap.add_argument("--beta", type=float, default=0.03)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--extra", default=None, metavar="E[,E...]",
                    help="also time the batched solver with these block sizes rank + E (the default is "
                         "max(rank, 8)), every residual column expanded; larger blocks need fewer iterations "
                         "on flat spectra")
    ap.add_argument("--out", default=None, help="directory for results.json and table.md")
    ap.add_argument("--phases", action="store_true",
                    help="after the timed runs, one more batched run printing per-phase times")
    ap.add_argument("--proxies", action="store_true",
                    help="the CPU proxies of the GPU solve (issue 17), today's solver (--baseline) next to the "
                         "current one: bytes per pass and fixed flops of the 7B/1B shapes, kernels, syncs and "
                         "host time per iteration, and on each --stats file passes per module, errors and time")
    ap.add_argument("--baseline", default=BASELINE_REV, help="git revision of today's solver for --proxies")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if args.stats is not None and not args.proxies and not os.path.isfile(args.stats):
        print(f"--stats: no such file: {args.stats}", file=sys.stderr)
        return 2
    if args.proxies:
        paths = args.stats.split(",") if args.stats else []
        for path in paths:
            if not os.path.isfile(path):
                print(f"--stats: no such file: {path}", file=sys.stderr)
                return 2
        result = proxies(paths, args.baseline, args.threads or 2, args.repeat, args.ref_modules)
        table = format_proxies(result)
        print(table)
        if args.out:
            result["env"], result["git"] = environment("cpu"), git_state()
            write_results(args.out, {"proxies.json": result, "proxies.md": table})
        return 0
    try:
        extras = [int(e) for e in args.extra.split(",")] if args.extra else None
    except ValueError:
        print(f"--extra: comma-separated integers expected, got {args.extra!r}", file=sys.stderr)
        return 2
    rows = run(args.shape, args.device, args.layers, args.ref_modules, args.repeat, args.beta, args.phases,
               args.stats, extras)
    label = os.path.basename(args.stats) if args.stats else args.shape
    table = format_table(rows, label, args.device)
    print(table)
    if args.out:
        meta = dict(shape=None if args.stats else args.shape, stats=args.stats, device=args.device,
                    device_name=gpu_name(args.device) or "cpu", threads=torch.get_num_threads(),
                    torch=torch.__version__, layers=args.layers, beta=args.beta, env=environment(args.device),
                    git=git_state())
        write_results(args.out, {"results.json": dict(meta=meta, rows=rows), "table.md": table})
    return 0


# --------------------------------------------------------------------------------------------------
# pytest-benchmark


try:
    import pytest
except ImportError:  # script mode without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def smollm2_stats():
        if os.environ.get("BENCH_THREADS"):
            torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
        layers = int(os.environ.get("BENCH_LAYERS", "30"))
        return synthetic_statistics("smollm2", layers)

    @pytest.fixture(scope="module")
    def bench_cfg():
        return LoraDAConfig(rank=8, beta=0.03, population_size=100_000)

    @pytest.fixture(scope="module")
    def dense_reference(smollm2_stats, bench_cfg):
        return solve_reference(smollm2_stats, bench_cfg)

    def test_bench_batched(benchmark, smollm2_stats, bench_cfg, dense_reference):
        res = benchmark.pedantic(solve_batched, args=(smollm2_stats, bench_cfg), rounds=2, iterations=1)
        errs = rel_errors(res, dense_reference)
        benchmark.extra_info.update(max_rel_err=max(errs), median_rel_err=pystats.median(errs))
        assert max(errs) <= 1e-4

    def test_bench_reference(benchmark, smollm2_stats, bench_cfg):
        benchmark.pedantic(solve_reference, args=(smollm2_stats, bench_cfg), rounds=1, iterations=1)

    def test_bench_lobpcg10(benchmark, smollm2_stats, bench_cfg, dense_reference):
        res = benchmark.pedantic(solve_lobpcg10, args=(smollm2_stats, bench_cfg), rounds=1, iterations=1)
        errs = rel_errors(res, dense_reference)
        benchmark.extra_info.update(max_rel_err=max(errs), median_rel_err=pystats.median(errs))


if __name__ == "__main__":
    sys.exit(main())
