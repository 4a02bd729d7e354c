"""The torch reference ``sym_accumulate`` on the packed triangle against the square ``addmm_`` it replaced
(b74eaa6: ``Z.addmm_(X_S^T, X_S)`` on a full ``d x d`` fp32 accumulator), CPU, same inputs, interleaved;
also checks that the packed entries equal the square accumulator's upper triangle bit for bit.

    python benchmarks/sym_accumulate_cpu.py --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from lora_da_fast.ops import reference
from lora_da_fast.triangle import pack_upper

CASES = [(576, 460), (1536, 460), (576, 2000), (1536, 3000), (700, 37)]  # (d_in, tokens): SmolLM2 widths


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"| d_in | tokens (90% selected) | square addmm_ ms | packed ms | packed / square | bit-identical |")
    print("|---|---|---|---|---|---|")
    for d, n in CASES:
        x = torch.randn(n, d, generator=gen)
        mask = torch.rand(n, generator=gen) < 0.9
        z0 = torch.randn(d, d, generator=gen)
        square, packed = z0 + z0.T, pack_upper(z0 + z0.T)

        def old():
            xs = x[mask].float()
            square.addmm_(xs.T, xs)

        def new():
            reference.sym_accumulate(packed, x, mask)

        old(), new()
        same = torch.equal(packed, pack_upper(square))
        t_old, t_new = best(old, args.repeat), best(new, args.repeat)
        t_old, t_new = min(t_old, best(old, args.repeat)), min(t_new, best(new, args.repeat))
        print(f"| {d} | {n} | {t_old * 1e3:.1f} | {t_new * 1e3:.1f} | {t_new / t_old:.2f} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
