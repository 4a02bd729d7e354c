"""Statistics of a randomly initialised Llama (no download), saved for the solver benchmark.

Random weights give flat spectra (the singular values of the Fisher-gradient ``D`` are Marchenko-Pastur
like): the hard case of the eigensolver, and what the end-to-end benchmarks on random-weight 1B/7B
shapes feed it. Example (CPU, about a minute)::

    python benchmarks/random_llama_stats.py --hidden 1024 --intermediate 2752 --layers 4 \\
        --examples 64 --seq-len 256 --out /tmp/rand1024.safetensors
    python benchmarks/bench_solver.py --stats /tmp/rand1024.safetensors --threads 1 --phases
"""
from __future__ import annotations

import argparse
import sys

import torch

from harness import random_llama

from lora_da_fast import LoraDAConfig, collect_statistics  # after harness: a source tree without install


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2752)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.hidden % 64:
        print("--hidden must be a multiple of 64 (head size 64)", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    # built on the CPU, then moved: the same random weights whatever the device
    model = random_llama(args.hidden, args.layers, args.intermediate, args.hidden // 64, args.hidden // 64,
                         args.vocab, max(4096, args.seq_len)).to(args.device)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.examples, args.seq_len), generator=g)
    stats = collect_statistics(model, [{"input_ids": r} for r in ids], LoraDAConfig(batch_size=8), progress=True)
    stats.save(args.out)
    print(f"{len(stats.modules)} modules, {len(stats.Z)} input groups, {stats.num_tokens} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
