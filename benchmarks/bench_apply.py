"""The batched solver's inner product, alone: a stack of square factors times a narrow block
(``[b, n, n] @ [b, n, k]``, what every LOBPCG iteration does twice with the explicit ``Zd^{-1}`` on a GPU,
its ``k`` the residual columns of the ``c`` modules sharing the factor side by side), in float64 and
float32, with the bandwidth it reaches (bytes of the factors read per second). A GPU's memory bandwidth
bounds this product for narrow blocks, so a low figure here means the solve's iterations run below the
hardware's speed.

    python benchmarks/bench_apply.py --device cuda --out DIR
    python benchmarks/bench_apply.py --device cpu --sizes 576,1536 --stack 1,2     (a CPU, small)
"""
from __future__ import annotations

import argparse
import sys

import torch

from harness import environment, gpu_name, markdown_table, median_of, write_results


def time_product(A: torch.Tensor, X: torch.Tensor, reps: int) -> float:
    """Median seconds of ``A @ X`` over ``reps`` runs (after one warm-up)."""
    return median_of(lambda: A @ X, reps, A.device, warmup=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="4096,11008", help="factor sizes n (comma-separated)")
    ap.add_argument("--stack", default="1,8", help="stack sizes b (comma-separated)")
    ap.add_argument("--cols", default="8,16,24,32", help="block widths k (comma-separated)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-gb", type=float, default=20.0, help="skip stacks whose factors exceed this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        for b in (int(v) for v in args.stack.split(",")):
            for dtype in (torch.float64, torch.float32):
                nbytes = b * n * n * torch.finfo(dtype).bits // 8
                if nbytes > args.budget_gb * 1e9:
                    continue
                A = torch.randn(b, n, n, dtype=dtype, device=device)
                for k in (int(v) for v in args.cols.split(",")):
                    X = torch.randn(b, n, k, dtype=dtype, device=device)
                    t = time_product(A, X, args.reps)
                    rows.append(dict(n=n, b=b, k=k, dtype=str(dtype).replace("torch.", ""), ms=t * 1e3,
                                     gb_per_s=nbytes / t / 1e9, tflops=2 * b * n * n * k / t / 1e12))
                    print(f"n={n:6d} b={b:2d} k={k:3d} {rows[-1]['dtype']:8s} {t * 1e3:8.3f} ms "
                          f"{rows[-1]['gb_per_s']:8.1f} GB/s {rows[-1]['tflops']:6.2f} TFLOP/s", flush=True)
                    del X
                del A
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    table = markdown_table(["n", "stack", "k", "dtype", "ms", "GB/s of factors", "TFLOP/s"],
                           [[r["n"], r["b"], r["k"], r["dtype"], f"{r['ms']:.3f}", f"{r['gb_per_s']:.0f}",
                             f"{r['tflops']:.2f}"] for r in rows])
    print(table)
    write_results(args.out, {
        "bench_apply.json": dict(device=gpu_name(device) or "cpu", torch=torch.__version__,
                                 env=environment(device), rows=rows),
        "bench_apply.md": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
