"""End to end against the floor: one plain forward+backward over the calibration set.

Measures, in one run, on the same data and batch size:
  plain   - forward + backward with the model's own mean loss and weight gradients (what a training
            step over the set costs: the floor of any single-pass method),
  stats   - our statistics pass (all target modules, every statistic),
  solve   - our solve of every module,
  total   - stats + solve (the library's engine, ``lora_da_fast.engine.run_lora_da``),
and prints ``total / plain`` and the peak memory of the plain pass and of ours side by side. Models:
``smollm2-135m`` and ``tiny-llama`` (built-ins), ``llama-1b`` / ``llama-7b`` (Llama shapes with random
weights, from a config: no download), or a local HF folder. Data: random token ids (fixed length, no
padding: the floor and our pass see exactly the same tokens).

Peak memory: on CUDA, torch's peak allocated memory, reset before each phase (one process). On a CPU,
the peak resident set size, which a process cannot reset: the plain pass and ours then each run in a
fresh process of their own (same model, data and warm-up), so that neither peak includes the other's
(``--isolate``).

    python benchmarks/end_to_end.py --model smollm2-135m --num-examples 32 --seq-len 256 --batch-size 8
    python benchmarks/end_to_end.py --model llama-7b --device cuda --dtype bfloat16 \\
        --num-examples 256 --seq-len 1024 --batch-size 4 --json out/e2e.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from harness import (append_jsonl, builtin_examples, environment, git_state, gpu_name, library_debug_log, peak_gb,
                     peak_kind, random_llama, reset_peak, timed)

from lora_da_fast import LoraDAConfig, collect_statistics  # after harness: a source tree without install
from lora_da_fast.engine import run_lora_da

SHAPES = {  # hidden, layers, intermediate, heads, kv heads
    "llama-1b": (2048, 22, 5632, 32, 4),
    "llama-7b": (4096, 32, 11008, 32, 32),
}


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    """``(model, tokenizer)``; random-weight shapes have no tokenizer (``None``)."""
    if name in SHAPES:
        return random_llama(*SHAPES[name], vocab=32000, max_positions=4096, device=device, dtype=dtype), None
    from lora_da_fast.cli.builtins import load_model

    model, tok, _ = load_model(name, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16",
                                            torch.float16: "float16"}[dtype], device=str(device))
    return model.eval(), tok


def plain_pass(model, batches, device) -> float:
    """Forward + backward with HF's mean loss and weight gradients, over every batch (a batch: the token ids,
    or ``(ids, attention_mask, labels)`` of padded examples)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)

    def run():
        for b in batches:
            if isinstance(b, tuple):
                loss = model(input_ids=b[0], attention_mask=b[1], labels=b[2], use_cache=False).loss
            else:
                loss = model(input_ids=b, labels=b, use_cache=False).loss
            loss.backward()

    try:
        return timed(run, device).wall
    finally:
        for p, f in zip(model.parameters(), flags):
            p.grad = None
            p.requires_grad_(f)


def text_batches(tok, args, device: torch.device):
    """The CLI's sample of ``args.num_examples`` records of the built-in ``args.data`` (at most
    ``args.seq_len`` tokens each), sorted by length as our pass sorts them, and the same examples
    right-padded in batches of ``args.batch_size`` for the plain pass (padding masked, not scored)."""
    examples, _ = builtin_examples(tok, args.data, args.num_examples, args.seq_len)
    examples = sorted(examples, key=lambda e: int(e["input_ids"].numel()))
    batches = []
    for i in range(0, len(examples), args.batch_size):
        chunk = examples[i:i + args.batch_size]
        n = max(int(e["input_ids"].numel()) for e in chunk)
        ids = torch.zeros(len(chunk), n, dtype=torch.long)
        mask = torch.zeros(len(chunk), n, dtype=torch.long)
        labels = torch.full((len(chunk), n), -100, dtype=torch.long)
        for j, e in enumerate(chunk):
            k = int(e["input_ids"].numel())
            ids[j, :k] = e["input_ids"]
            mask[j, :k] = 1
            labels[j, :k] = e["labels"] if "labels" in e else e["input_ids"]
        batches.append((ids.to(device), mask.to(device), labels.to(device)))
    return examples, batches


def measure(args, device: torch.device, dtype: torch.dtype, phases) -> dict:
    """Build the model and data, warm up, and time ``phases`` ("plain", "ours" or both) in this process."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = build_model(args.model, device, dtype)
    out = {"build_s": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters())}
    if args.data == "random":
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (args.num_examples, args.seq_len), generator=g)
        batches = [ids[i:i + args.batch_size].to(device) for i in range(0, args.num_examples, args.batch_size)]
        examples = [{"input_ids": row} for row in ids]
        out["tokens"] = args.num_examples * args.seq_len
    else:  # real text: the CLI's built-in data, at most seq_len tokens each, in the order our pass takes them
        if tok is None:
            raise SystemExit(f"--data {args.data} needs a model with a tokenizer, not the random shape {args.model}")
        examples, batches = text_batches(tok, args, device)
        out["tokens"] = sum(int(e["input_ids"].numel()) for e in examples)
    lpp = args.layers_per_pass
    lpp = int(lpp) if lpp and lpp.isdigit() else lpp
    cfg = LoraDAConfig(population_size=100_000, batch_size=args.batch_size, backend=args.backend,
                       solver=args.solver, layers_per_pass=lpp)

    # Warm-up (kernel compilation and autotuning, cuBLAS handles) on one batch of the real shape.
    if "plain" in phases:
        plain_pass(model, batches[:1], device)
    if "ours" in phases:
        # kernels only: one batch is few tokens, which would send every group through its tokens (memory the
        # measured run does not hold, and a CPU's peak RSS cannot be reset)
        collect_statistics(model, examples[:args.batch_size], dataclasses.replace(cfg, keep_tokens="never"),
                           progress=False)

    if "plain" in phases:
        reset_peak(device)
        out["plain_s"] = plain_pass(model, batches, device)
        out["plain_peak_gb"] = peak_gb(device)
    if "ours" in phases:
        reset_peak(device)
        if args.solver_log:
            with library_debug_log(args.solver_log, "%(relativeCreated)9.0f ms  %(message)s"):
                t = timed(lambda: run_lora_da(model, examples, cfg, progress=False), device)
        else:
            t = timed(lambda: run_lora_da(model, examples, cfg, progress=False), device)
        res = t.result
        out.update(total_s=t.wall, ours_peak_gb=peak_gb(device), stats_s=res.info["statistics_s"],
                   solve_s=res.info["solve_s"], modules=len(res), passes=res.info["plan"]["passes"],
                   solvers_used=sorted({r.solver for r in res.reports.values()}))
    return out


def in_subprocess(argv, phase: str) -> dict:
    """:func:`measure` of one phase in a fresh Python process (this script, ``--phase``)."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="e2e_phase_")
    os.close(fd)
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--phase", phase,
                               "--phase-out", path])
        if proc.returncode != 0:
            raise SystemExit(f"the {phase} phase failed (exit {proc.returncode})")
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-examples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per example (with --data: at most)")
    ap.add_argument("--data", default="random", help="random token ids of --seq-len (default), or a built-in "
                    "data set of the CLI (rotten-tomatoes, gsm-symbolic): real text, padded batches")
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
    ap.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                    help="run the plain pass and ours each in a fresh process: their peak memories are then "
                         "separate (auto: yes on a CPU, whose peak RSS cannot be reset; no on CUDA, where the "
                         "peak allocated memory is reset before each phase)")
    ap.add_argument("--phase", choices=["plain", "ours"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.phase:  # a child of in_subprocess
        with open(args.phase_out, "w") as f:
            json.dump(measure(args, device, dtype, (args.phase,)), f)
        return 0
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type != "cuda")
    if isolate:
        plain = in_subprocess(argv, "plain")
        m = in_subprocess(argv, "ours")
        m.update(plain_s=plain["plain_s"], plain_peak_gb=plain["plain_peak_gb"])
    else:
        m = measure(args, device, dtype, ("plain", "ours"))
    plain_s, stats_s, solve_s, total_s = m["plain_s"], m["stats_s"], m["solve_s"], m["total_s"]
    plain_peak, ours_peak = m["plain_peak_gb"], m["ours_peak_gb"]
    git = git_state()
    peak_note = peak_kind(device)
    if isolate:
        peak_note += ", each phase in its own process"
    elif device.type != "cuda":
        peak_note += " of one process: ours includes the plain pass's"
    row = {
        "model": args.model, "params_b": m["params"] / 1e9, "dtype": str(dtype).replace("torch.", ""),
        "device": gpu_name(device) or platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "examples": args.num_examples, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "data": args.data, "tokens": m["tokens"], "modules": m["modules"],
        "passes": m["passes"], "build_s": m["build_s"], "plain_s": plain_s, "stats_s": stats_s,
        "solve_s": solve_s, "total_s": total_s, "total_over_plain": total_s / plain_s,
        "stats_over_plain": stats_s / plain_s, "plain_peak_gb": plain_peak, "ours_peak_gb": ours_peak,
        "peak": peak_note, "backend": args.backend, "solver": args.solver, "commit": git["commit"],
        "dirty": git["dirty"], "env": environment(device),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "solvers_used": m["solvers_used"],
    }
    print(f"{args.model}: {row['params_b']:.2f}B params, {row['tokens']} tokens, {row['modules']} modules, "
          f"{row['passes']} pass(es)")
    print(f"  plain fwd+bwd {plain_s:8.2f} s   peak {plain_peak:6.1f} GB")
    print(f"  statistics    {stats_s:8.2f} s   ({stats_s / plain_s:.2f}x plain)")
    print(f"  solve         {solve_s:8.2f} s   solvers {row['solvers_used']}")
    print(f"  total         {total_s:8.2f} s   ({total_s / plain_s:.2f}x plain)   peak {ours_peak:6.1f} GB")
    print(f"  peak memory   plain {plain_peak:.2f} GB, ours {ours_peak:.2f} GB ({ours_peak / plain_peak:.2f}x; "
          f"{peak_note})")
    append_jsonl(args.json, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
