"""What the sensitivity costs and how good the default estimate is, side by side in one process: the solve
alone (``sensitivity="never"``), with the default first-order estimate of every module (``"auto"``) and
with the measurement by a second solve (``"always"``), alternating, best of ``--repeat``. Then the
estimates against the measurements (the same one-ulp move), per kind of estimate, and the flags.

    .venv/bin/python benchmarks/sensitivity_cost.py                                  # SmolLM2, 200 x <= 64 tokens
    .venv/bin/python benchmarks/sensitivity_cost.py --num-samples 24 --max-length 48 --keep-tokens auto
    .venv/bin/python benchmarks/sensitivity_cost.py --model tiny-llama --num-samples 200
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import builtin_examples, environment, git_state  # noqa: E402

from lora_da_fast import LoraDAConfig, collect_statistics  # noqa: E402
from lora_da_fast.cli.builtins import load_model  # noqa: E402
from lora_da_fast.solve import solve_local  # noqa: E402
from lora_da_fast.solve.sensitivity import SENSITIVITY_FLAG  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="rotten-tomatoes")
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--keep-tokens", default="never", choices=("auto", "always", "never"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    model, tok, _ = load_model(a.model, device="cpu")
    exs, num_records = builtin_examples(tok, a.data, a.num_samples, a.max_length)
    base = dict(population_size=num_records, keep_tokens=a.keep_tokens, rank=a.rank)
    stats = collect_statistics(model, exs, LoraDAConfig(**base), progress=False)
    times = {k: [] for k in ("never", "auto", "always")}
    res = {}
    for _ in range(a.repeat):
        for k in times:
            t0 = time.perf_counter()
            res[k] = solve_local(stats, LoraDAConfig(sensitivity=k, **base))
            times[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    git = git_state()
    names = list(res["auto"].reports)
    print(f"# {a.model}, {a.num_samples} x <= {a.max_length} tokens ({stats.num_tokens} tokens), {len(names)} modules, "
          f"keep_tokens={a.keep_tokens}, rank {a.rank}; commit {git['commit']}{' (dirty)' if git['dirty'] else ''}; "
          f"{environment('cpu')}; best of {a.repeat}, alternating")
    print("| sensitivity | solve s | vs never |")
    print("|---|---|---|")
    for k, v in best.items():
        print(f"| {k} | {v:.2f} | {v / best['never']:.2f}x |")
    by = {}
    for m in names:
        est, meas = res["auto"].reports[m], res["always"].reports[m]
        by.setdefault(est.sensitivity_by, []).append((est.sensitivity, meas.sensitivity, m))
    print("| estimate | modules | estimate / measured (measured > 1e-5): min, median, max | flagged estimated | "
          "flagged measured | missed |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for kind, v in by.items():
        ratios = sorted(e / m for e, m, _ in v if m > 1e-5)
        fe = sum(e > SENSITIVITY_FLAG for e, _, _ in v)
        fm = sum(m > SENSITIVITY_FLAG for _, m, _ in v)
        missed = sum(m > SENSITIVITY_FLAG >= e for e, m, _ in v)
        span = (f"{ratios[0]:.2f}, {ratios[len(ratios) // 2]:.2f}, {ratios[-1]:.2f}" if ratios
                else "(none above 1e-5)")
        print(f"| {kind} | {len(v)} | {span} | {fe} | {fm} | {missed} |")
        rows[kind] = v
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "git": git, "env": environment("cpu"), "times": times, "best": best,
                       "estimates": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
