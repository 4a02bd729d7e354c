"""Statistics kernels against cuBLAS and the reference path, bf16, 16k tokens, d_in in {576, 2048, 4096, 11008}.

For each ``d`` (``d_out = d_in`` for the gradient), with a token mask selecting ~90% of the rows:

- ``sym_accumulate``: the Triton kernel (upper triangle of ``Z += X_S^T X_S``, mask inside the kernel);
  ``torch bf16 X^T X``: one cuBLAS bf16 matmul of the same shape (full product, all rows, bf16 output);
  ``reference``: :func:`lora_da_fast.ops.reference.sym_accumulate` (mask gather + fp32 upcast + fp32 matmul).
- ``grad_stats``: the fused Triton kernel (``G``, ``y``); ``torch bf16 dY^T X``: one cuBLAS bf16 matmul;
  ``reference``: :func:`lora_da_fast.ops.reference.grad_stats`; ``reference G matmul``: the reference's fp32
  ``addmm`` alone, on already gathered fp32 inputs.

``TFLOP/s`` is effective: the FLOP of the full product on all rows (``2 N d_out d_in``) over the time,
so that rows of one op compare like their times. ``vs torch bf16`` and ``vs reference`` are speed-ups
(baseline time / this row's time). ``err`` is the relative Frobenius error of one kernel call against the
reference (upper triangle for ``Z``).

Two modes:
- ``python benchmarks/bench_kernels.py --out DIR``: prints the table (medians of triton.testing.do_bench,
  which flushes L2 before every call) and writes ``DIR/bench_kernels.md`` and ``.json``. About 60-90 s
  on an H200 (compilation and autotuning included). Without CUDA: the reference path only, at a small
  size, the rest marked skipped.
- ``pytest benchmarks/bench_kernels.py --benchmark-only``: pytest-benchmark timings (wall clock with a
  device sync); the Triton rows carry TFLOP/s and both speed-ups in ``extra_info``. Without CUDA only
  the small reference case runs; the rest is skipped.

Targets (H200): sym_accumulate >= 1.6x the cuBLAS bf16 X^T X and >= 3x the reference; grad_stats no
slower than the reference's G matmul alone.
"""
from __future__ import annotations

import argparse
import time

import torch

from harness import environment, gpu_name, median_of, sync, write_results

from lora_da_fast.ops import reference, triton_ops  # after harness: a source tree without install
from lora_da_fast.triangle import packed_size

TOKENS = 16384
SIZES = (576, 2048, 4096, 11008)
SELECTED = 0.9  # fraction of rows the token mask keeps (padding and prompt tokens drop the rest)
CPU_TOKENS, CPU_SIZE = 1024, 128
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


# --------------------------------------------------------------------------------------------------
# Cases: each returns {name: callable} of one op at one size, plus the FLOP of the full product.


def make_inputs(n: int, d_in: int, d_out: int, device, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d_in, device=device, dtype=dtype, generator=g)
    dy = torch.randn(n, d_out, device=device, dtype=dtype, generator=g)
    mask = torch.rand(n, device=device, generator=g) < SELECTED
    return x, dy, mask


def sym_cases(x, mask, with_kernels: bool):
    d = x.shape[1]
    # the accumulators are packed upper triangles (lora_da_fast/triangle.py), as in the statistics pass
    Z = torch.zeros(packed_size(d), device=x.device, dtype=torch.float32)
    Zr = torch.zeros_like(Z)
    cases = {"reference": lambda: reference.sym_accumulate(Zr, x, mask)}
    if with_kernels:
        cases["triton"] = lambda: triton_ops.sym_accumulate(Z, x, mask)
        cases["torch bf16 X^T X"] = lambda: torch.mm(x.T, x)
    return cases


def grad_cases(dy, x, mask, with_kernels: bool):
    d_out, d_in = dy.shape[1], x.shape[1]
    G = torch.zeros(d_out, d_in, device=x.device, dtype=torch.float32)
    y = torch.zeros(d_out, device=x.device, dtype=torch.float32)
    Gr, yr = torch.zeros_like(G), torch.zeros_like(y)
    cases = {"reference": lambda: reference.grad_stats(Gr, yr, dy, x, mask, mask)}
    if with_kernels:
        dg, xg = dy[mask].float(), x[mask].float()
        cases["triton"] = lambda: triton_ops.grad_stats(G, y, dy, x, mask, mask)
        cases["torch bf16 dY^T X"] = lambda: torch.mm(dy.T, x)
        cases["reference G matmul"] = lambda: Gr.addmm_(dg.T, xg)
    return cases


def check_errors(x, dy, mask):
    """Relative error of one kernel call against the reference (fresh accumulators)."""
    d_in, d_out = x.shape[1], dy.shape[1]
    Z, Zr = (torch.zeros(packed_size(d_in), device=x.device) for _ in range(2))
    triton_ops.sym_accumulate(Z, x, mask)
    reference.sym_accumulate(Zr, x, mask)
    z_err = float((Z - Zr).norm() / Zr.norm())  # (both packed: the upper triangle)
    del Z, Zr
    G, Gr = (torch.zeros(d_out, d_in, device=x.device) for _ in range(2))
    y, yr = (torch.zeros(d_out, device=x.device) for _ in range(2))
    triton_ops.grad_stats(G, y, dy, x, mask, mask)
    reference.grad_stats(Gr, yr, dy, x, mask, mask)
    g_err = float((G - Gr).norm() / Gr.norm())
    y_err = float((y - yr).norm() / yr.norm())
    return z_err, max(g_err, y_err)


# --------------------------------------------------------------------------------------------------
# Script mode


def time_ms(fn) -> float:
    if HAS_CUDA:
        import triton.testing

        fn()  # compile / autotune outside the timing
        sync(DEVICE)
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return median_of(fn, 5, warmup=1) * 1e3


def run_table(sizes, tokens):
    device = DEVICE
    rows = []
    for d in sizes:
        x, dy, mask = make_inputs(tokens, d, d, device)
        errs = check_errors(x, dy, mask) if HAS_CUDA else (None, None)
        for op, cases, base_name, err in (
                ("sym_accumulate", sym_cases(x, mask, HAS_CUDA), "torch bf16 X^T X", errs[0]),
                ("grad_stats", grad_cases(dy, x, mask, HAS_CUDA), "torch bf16 dY^T X", errs[1])):
            flop = 2.0 * tokens * d * d
            ms = {name: time_ms(fn) for name, fn in cases.items()}
            for name in ("triton", base_name, "reference", "reference G matmul"):
                if name not in ms:
                    if name in ("triton", base_name):
                        rows.append(dict(op=op, impl=name, d=d, ms=None, note="skipped: needs CUDA"))
                    continue
                t = ms[name]
                rows.append(dict(
                    op=op, impl=name, d=d, ms=t, tflops=flop / t / 1e9,
                    vs_torch_bf16=(ms[base_name] / t) if base_name in ms else None,
                    vs_reference=ms["reference"] / t,
                    err=err if name == "triton" else None))
        del x, dy, mask
        if HAS_CUDA:
            torch.cuda.empty_cache()
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def render(rows, tokens) -> str:
    dev = gpu_name(DEVICE) or "CPU (reference only)"
    lines = [f"Kernel benchmark: {tokens} tokens ({SELECTED:.0%} selected), bf16, {dev}; "
             f"ms = median; TFLOP/s = 2*N*d_out*d_in / t; vs = baseline time / this time.", "",
             "| kernel | impl | d_in | ms | TFLOP/s | vs torch bf16 matmul | vs reference | err vs ref |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["ms"] is None:
            lines.append(f"| {r['op']} | {r['impl']} | {r['d']} | {r['note']} | | | | |")
            continue
        lines.append(f"| {r['op']} | {r['impl']} | {r['d']} | {r['ms']:.3f} | {r['tflops']:.3g} | "
                     f"{fmt(r['vs_torch_bf16'], '.2f')} | {fmt(r['vs_reference'], '.2f')} | "
                     f"{fmt(r['err'], '.1e')} |")
    lines.append("")
    by = {(r["op"], r["impl"], r["d"]): r for r in rows if r["ms"] is not None}
    for r in rows:
        if r["impl"] != "triton" or r["ms"] is None:
            continue
        if r["op"] == "sym_accumulate":
            ok = r["vs_torch_bf16"] >= 1.6 and r["vs_reference"] >= 3.0
            lines.append(f"- target sym_accumulate d={r['d']}: {r['vs_torch_bf16']:.2f}x cuBLAS (>= 1.6), "
                         f"{r['vs_reference']:.2f}x reference (>= 3): {'met' if ok else 'MISSED'}")
        else:
            g = by.get(("grad_stats", "reference G matmul", r["d"]))
            ratio = g["ms"] / r["ms"]
            lines.append(f"- target grad_stats d={r['d']}: {ratio:.2f}x the reference's G matmul alone "
                         f"(>= 1): {'met' if ratio >= 1.0 else 'MISSED'}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for bench_kernels.md and bench_kernels.json")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--sizes", default=None, help="comma-separated d_in values")
    args = ap.parse_args(argv)
    if HAS_CUDA:
        tokens = args.tokens or TOKENS
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(SIZES)
    else:
        tokens = args.tokens or CPU_TOKENS
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [CPU_SIZE]
    t0 = time.time()
    rows = run_table(sizes, tokens)
    text = render(rows, tokens) + f"\n(total {time.time() - t0:.0f} s)\n"
    print(text)
    write_results(args.out, {"bench_kernels.md": text,
                             "bench_kernels.json": {"tokens": tokens, "rows": rows, "device": gpu_name(DEVICE) or "cpu",
                                                    "env": environment(DEVICE)}})


# --------------------------------------------------------------------------------------------------
# pytest-benchmark mode

try:
    import pytest
except ImportError:  # pragma: no cover - script mode needs no pytest
    pytest = None

if pytest is not None:
    needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
    BENCH_SIZES = SIZES if HAS_CUDA else (CPU_SIZE,)
    BENCH_TOKENS = TOKENS if HAS_CUDA else CPU_TOKENS

    def _bench(benchmark, fn, rounds):
        fn()  # compile / autotune outside the timing
        sync(DEVICE)

        def run():
            fn()
            sync(DEVICE)

        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)

    def _cases(op, d):
        x, dy, mask = make_inputs(BENCH_TOKENS, d, d, DEVICE)
        if op == "sym_accumulate":
            return sym_cases(x, mask, HAS_CUDA), "torch bf16 X^T X"
        return grad_cases(dy, x, mask, HAS_CUDA), "torch bf16 dY^T X"

    @pytest.mark.parametrize("d", BENCH_SIZES)
    @pytest.mark.parametrize("op", ["sym_accumulate", "grad_stats"])
    def test_reference(benchmark, op, d):
        cases, _ = _cases(op, d)
        benchmark.extra_info.update(op=op, d_in=d, tokens=BENCH_TOKENS)
        _bench(benchmark, cases["reference"], rounds=3)

    @needs_cuda
    @pytest.mark.parametrize("d", SIZES)
    @pytest.mark.parametrize("op", ["sym_accumulate", "grad_stats"])
    def test_torch_bf16_matmul(benchmark, op, d):
        cases, base = _cases(op, d)
        benchmark.extra_info.update(op=op, d_in=d, tokens=BENCH_TOKENS)
        _bench(benchmark, cases[base], rounds=20)

    @needs_cuda
    @pytest.mark.parametrize("d", SIZES)
    @pytest.mark.parametrize("op", ["sym_accumulate", "grad_stats"])
    def test_triton(benchmark, op, d):
        cases, base = _cases(op, d)
        ms = {name: time_ms(fn) for name, fn in cases.items()}
        flop = 2.0 * BENCH_TOKENS * d * d
        benchmark.extra_info.update(
            op=op, d_in=d, tokens=BENCH_TOKENS, tflops=flop / ms["triton"] / 1e9,
            vs_torch_bf16=ms[base] / ms["triton"], vs_reference=ms["reference"] / ms["triton"])
        if op == "grad_stats":
            benchmark.extra_info["vs_reference_G_matmul"] = ms["reference G matmul"] / ms["triton"]
        _bench(benchmark, cases["triton"], rounds=20)


if __name__ == "__main__":
    main()
