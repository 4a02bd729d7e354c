"""End to end against the floor: one plain forward+backward over the calibration set.

Measures, in one run, on the same data and batch size:
  plain   - forward + backward with the model's own mean loss and weight gradients (what a training
            step over the set costs: the floor of any single-pass method),
  stats   - our statistics pass (all target modules, every statistic),
  solve   - our solve of every module,
  total   - stats + solve,
and prints ``total / plain`` and the peak memory of each phase. Models: ``smollm2-135m`` and
``tiny-llama`` (built-ins), ``llama-1b`` / ``llama-7b`` (Llama shapes with random weights, from a config:
no download), or a local HF folder. Data: random token ids (fixed length, no padding: the floor and our
pass see exactly the same tokens).

    python benchmarks/end_to_end.py --model smollm2-135m --num-examples 32 --seq-len 256 --batch-size 8
    python benchmarks/end_to_end.py --model llama-7b --device cuda --dtype bfloat16 \
        --num-examples 256 --seq-len 1024 --batch-size 4 --json out/e2e.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_da_fast import LoraDAConfig, collect_statistics  # noqa: E402
from lora_da_fast.pipeline import run_lora_da  # noqa: E402

SHAPES = {  # hidden, layers, intermediate, heads, kv heads
    "llama-1b": (2048, 22, 5632, 32, 4),
    "llama-7b": (4096, 32, 11008, 32, 32),
}


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    if name in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        h, n, f, heads, kv = SHAPES[name]
        cfg = LlamaConfig(hidden_size=h, num_hidden_layers=n, intermediate_size=f, num_attention_heads=heads,
                          num_key_value_heads=kv, vocab_size=32000, max_position_embeddings=4096)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        return model.eval()
    from lora_da_fast.builtins import load_model

    model, _, _ = load_model(name, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16",
                                          torch.float16: "float16"}[dtype], device=str(device))
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # process peak RSS (Linux: KiB)


def plain_pass(model, batches, device) -> float:
    """Forward + backward with HF's mean loss and weight gradients, over every batch."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        sync(device)
        t0 = time.perf_counter()
        for ids in batches:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        sync(device)
        return time.perf_counter() - t0
    finally:
        for p, f in zip(model.parameters(), flags):
            p.grad = None
            p.requires_grad_(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-examples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (GPU default), float16")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--solver", default="auto")
    ap.add_argument("--layers-per-pass", default=None)
    ap.add_argument("--json", default=None, help="append one JSON line with the results to this file")
    ap.add_argument("--solver-log", default=None, metavar="FILE",
                    help="write the batched solver's DEBUG log (per chunk phase times, iterations per stack) "
                         "to FILE; each phase then waits for the GPU, which adds a little to the solve time")
    args = ap.parse_args(argv)
    if args.solver_log:
        import logging

        handler = logging.FileHandler(args.solver_log, mode="w")
        handler.setFormatter(logging.Formatter("%(relativeCreated)9.0f ms  %(message)s"))
        lg = logging.getLogger("lora_da_fast.batched_solver")
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(args.model, device, dtype)
    build_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.num_examples, args.seq_len), generator=g)
    batches = [ids[i:i + args.batch_size].to(device) for i in range(0, args.num_examples, args.batch_size)]
    examples = [{"input_ids": row} for row in ids]
    lpp = args.layers_per_pass
    lpp = int(lpp) if lpp and lpp.isdigit() else lpp
    cfg = LoraDAConfig(population_size=100_000, batch_size=args.batch_size, backend=args.backend,
                       solver=args.solver, layers_per_pass=lpp)

    # Warm-up (kernel compilation and autotuning, cuBLAS handles) on one batch of the real shape.
    plain_pass(model, batches[:1], device)
    collect_statistics(model, examples[:args.batch_size], cfg, progress=False)

    reset_peak(device)
    plain_s = plain_pass(model, batches, device)
    plain_peak = peak_gb(device)
    reset_peak(device)
    sync(device)
    t1 = time.perf_counter()
    res = run_lora_da(model, examples, cfg, progress=False, log=None)
    sync(device)
    total_s = time.perf_counter() - t1
    ours_peak = peak_gb(device)
    stats_s, solve_s = res.info["statistics_s"], res.info["solve_s"]
    n_params = sum(p.numel() for p in model.parameters())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    row = {
        "model": args.model, "params_b": n_params / 1e9, "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "examples": args.num_examples, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "tokens": args.num_examples * args.seq_len, "modules": len(res),
        "passes": res.info["plan"]["passes"], "build_s": build_s, "plain_s": plain_s, "stats_s": stats_s,
        "solve_s": solve_s, "total_s": total_s, "total_over_plain": total_s / plain_s,
        "stats_over_plain": stats_s / plain_s, "plain_peak_gb": plain_peak, "ours_peak_gb": ours_peak,
        "backend": args.backend, "solver": args.solver, "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "solvers_used": sorted({r.solver for r in res.reports.values()}),
    }
    print(f"{args.model}: {row['params_b']:.2f}B params, {row['tokens']} tokens, {len(res)} modules, "
          f"{row['passes']} pass(es)")
    print(f"  plain fwd+bwd {plain_s:8.2f} s   peak {plain_peak:6.1f} GB")
    print(f"  statistics    {stats_s:8.2f} s   ({stats_s / plain_s:.2f}x plain)")
    print(f"  solve         {solve_s:8.2f} s   solvers {row['solvers_used']}")
    print(f"  total         {total_s:8.2f} s   ({total_s / plain_s:.2f}x plain)   peak {ours_peak:6.1f} GB")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
