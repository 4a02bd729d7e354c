"""What measuring the sensitivity costs on the input-factor path, side by side in one process: the solve
alone (``sensitivity="never"``), the solve with the measurement (``"always"``: every group solved again
on statistics moved by one fp32 ulp, the eigensolver started from the subspaces being measured), and the
second solve alone started cold (a random start, as before) and warm; alternating, best of ``--repeat``.
Also: the sensitivities measured warm and cold agree, and how many modules are flagged.

    .venv/bin/python benchmarks/sensitivity_cost.py                      # SmolLM2, 32 x <= 128 tokens
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
from harness import environment, git_state  # noqa: E402

import torch  # noqa: E402

from lora_da_fast import LoraDAConfig, collect_statistics  # noqa: E402
from lora_da_fast.cli.builtins import load_model, load_records, records_to_examples  # noqa: E402
from lora_da_fast.cli.init import subsample_indices  # noqa: E402
from lora_da_fast.solve import solve_batched, solve_local  # noqa: E402
from lora_da_fast.solve.sensitivity import SENSITIVITY_FLAG, perturbed  # noqa: E402


def product_change(a, b) -> float:
    pa, pb = a.lora_B.double() @ a.lora_A.double(), b.lora_B.double() @ b.lora_A.double()
    return float(torch.linalg.matrix_norm(pb - pa) / torch.linalg.matrix_norm(pa))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="rotten-tomatoes")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    model, tok, _ = load_model(a.model, device="cpu")
    records, _ = load_records(a.data)
    exs = records_to_examples(tok, [records[i] for i in subsample_indices(len(records), a.num_samples)], a.max_length)
    base = dict(population_size=len(records), keep_tokens="never")
    stats = collect_statistics(model, exs, LoraDAConfig(**base), progress=False)
    cfg = {k: LoraDAConfig(sensitivity=k, **base) for k in ("never", "always")}
    names = list(stats.modules)
    moved = perturbed(stats, names, [], cfg["always"].seed + 1)
    times = {"solve": [], "solve + always": [], "second solve, cold": [], "second solve, warm": []}
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        ref = solve_local(stats, cfg["never"])
        times["solve"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        auto = solve_local(stats, cfg["always"])
        times["solve + always"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cold = solve_batched(moved, cfg["never"])
        times["second solve, cold"].append(time.perf_counter() - t0)
        start = {m: ref[m].lora_A.transpose(0, 1).double() for m in names}
        t0 = time.perf_counter()
        warm = solve_batched(moved, cfg["never"], start=start)
        times["second solve, warm"].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    sens_cold = {m: product_change(ref[m], cold[m]) for m in names}
    sens_warm = {m: product_change(ref[m], warm[m]) for m in names}
    agree = max(abs(sens_cold[m] - sens_warm[m]) for m in names)
    flagged = [m for m in names if auto.reports[m].sensitivity > SENSITIVITY_FLAG]
    git = git_state()
    print(f"# {a.model}, {a.num_samples} x <= {a.max_length} tokens ({stats.num_tokens} tokens), {len(names)} modules "
          f"(input-factor path); commit {git['commit']}{' (dirty)' if git['dirty'] else ''}; {environment('cpu')}; "
          f"best of {a.repeat}")
    print("| phase | s | vs the solve |")
    print("|---|---|---|")
    for k, v in best.items():
        print(f"| {k} | {v:.2f} | {v / best['solve']:.2f}x |")
    print(f"sensitivity warm vs cold: max |difference| {agree:.1e}; largest {max(sens_warm.values()):.1e}; "
          f"flagged (> {SENSITIVITY_FLAG:g}): {len(flagged)} of {len(names)}"
          + (f" ({', '.join(flagged[:6])}{' ...' if len(flagged) > 6 else ''})" if flagged else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "git": git, "env": environment("cpu"), "times": times, "best": best,
                       "sensitivity_cold": sens_cold, "sensitivity_warm": sens_warm, "flagged": flagged}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
