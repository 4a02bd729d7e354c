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

from lora_da_fast import LoraDAConfig, collect_statistics


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
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.intermediate,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      vocab_size=args.vocab, max_position_embeddings=max(4096, args.seq_len))
    model = LlamaForCausalLM(cfg).to(args.device).eval()
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.examples, args.seq_len), generator=g)
    stats = collect_statistics(model, [{"input_ids": r} for r in ids], LoraDAConfig(batch_size=8), progress=True)
    stats.save(args.out)
    print(f"{len(stats.modules)} modules, {len(stats.Z)} input groups, {stats.num_tokens} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
