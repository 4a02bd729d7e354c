"""The memory plan of Llama shapes on the meta device (no weights, no GPU): statistics bytes with packed ``Z``
against the square ``Z`` of b74eaa6, and whether one pass fits a GPU of a given size.

The input groups of a shape (which modules share one ``Z``) come from the pass's own probe run on a twin
of the same architecture and depth with tiny widths on the CPU: the groups depend on the wiring, not the
widths. Device capacity: ``--gpu-gib`` GiB (an "80 GB" A100/H100 has 80 GiB), minus ``--context-gib``
for the CUDA context; the weights are resident before the plan, so the plan gets the rest as free memory.

    python benchmarks/memory_plan.py --shape llama-7b --batch-size 4 --seq-len 1024 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness import git_state

from lora_da_fast import LoraDAConfig
from lora_da_fast.data import Example
from lora_da_fast.plan import FIT_FRACTION, plan_slices, statistics_bytes
from lora_da_fast.statistics.hooks import input_group_probe
from lora_da_fast.targets import find_target_modules, linear_shape

SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocab
    "smollm2-135m": (576, 30, 1536, 9, 3, 49152),
    "llama-1b": (2048, 22, 5632, 32, 4, 32000),
    "llama-7b": (4096, 32, 11008, 32, 32, 32000),
}
GIB = 2 ** 30


def llama(hidden, layers, inter, heads, kv, vocab, device, dtype):
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


def twin_leaders(layers: int, heads: int, kv: int) -> dict:
    """Input groups probed on a tiny-width Llama of the same depth and attention layout (CPU)."""
    torch.manual_seed(0)
    twin = llama(8 * heads, layers, 24, heads, kv, 64, "cpu", torch.float32)
    targets = find_target_modules(twin, "all-linear")
    return input_group_probe(twin, targets, torch.device("cpu"))


def square_z_bytes(targets, leaders) -> int:
    """The accumulators as b74eaa6 allocated them: G, y and one square fp32 Z per input group."""
    total = 0
    for name, m in targets.items():
        d_out, d_in = linear_shape(m)
        total += 4 * (d_out * d_in + d_out) + (4 * d_in * d_in if leaders[name] == name else 0)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="llama-7b")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--context-gib", type=float, default=1.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    hidden, layers, inter, heads, kv, vocab = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    model = llama(hidden, layers, inter, heads, kv, vocab, "meta", dtype)
    targets = find_target_modules(model, "all-linear")
    leaders = twin_leaders(layers, heads, kv)
    assert set(leaders) == set(targets)
    packed = sum(statistics_bytes(targets, leaders).values())
    square = square_z_bytes(targets, leaders)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    free = int(args.gpu_gib * GIB - args.context_gib * GIB - weights)
    ex = [Example(torch.zeros(args.seq_len, dtype=torch.long), torch.zeros(args.seq_len, dtype=torch.long), 0)]
    cfg = LoraDAConfig(layers_per_pass="auto", batch_size=args.batch_size)
    slices, plan = plan_slices(targets, cfg, model, ex, leaders=leaders, free_bytes=free)
    work = max(plan["activations_gb"], plan["solve_gb"]) * 1e9
    square_fits = square + work <= FIT_FRACTION * free
    groups = sum(1 for n in targets if leaders[n] == n)
    row = {"shape": args.shape, "modules": len(targets), "input_groups": groups, "dtype": args.dtype,
           "tokens_per_batch": plan["tokens_per_batch"], "weights_gib": weights / GIB,
           "accumulators_square_gib": square / GIB, "accumulators_packed_gib": packed / GIB,
           "packed_over_square": packed / square, "activations_gib": plan["activations_gb"] * 1e9 / GIB,
           "solve_gib": plan["solve_gb"] * 1e9 / GIB, "gpu_gib": args.gpu_gib, "free_gib": free / GIB,
           "fit_fraction": FIT_FRACTION, "passes_packed": plan["passes"], "passes_square_would_need":
           1 if square_fits else "> 1", "planned_peak_gib": plan["planned_peak_gb"] * 1e9 / GIB,
           "commit": git_state()["commit"], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"{args.shape}: {len(targets)} modules, {groups} input groups, {args.dtype}, "
          f"{args.batch_size} x {args.seq_len} tokens per batch")
    print(f"  weights                 {row['weights_gib']:7.2f} GiB")
    print(f"  accumulators, square Z  {row['accumulators_square_gib']:7.2f} GiB (b74eaa6)")
    print(f"  accumulators, packed Z  {row['accumulators_packed_gib']:7.2f} GiB ({row['packed_over_square']:.3f}x)")
    print(f"  activations (estimate)  {row['activations_gib']:7.2f} GiB; solve, largest group {row['solve_gib']:.2f} GiB")
    print(f"  {args.gpu_gib:g} GiB GPU: free after weights and context {row['free_gib']:.2f} GiB, plan fills "
          f"{FIT_FRACTION:.0%}: packed needs {(packed + work) / GIB:.2f} GiB -> {plan['passes']} pass(es), "
          f"planned peak {row['planned_peak_gib']:.2f} GiB; square would need {(square + work) / GIB:.2f} GiB -> "
          f"{'one pass' if square_fits else 'more than one pass'}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
