"""Cost of the token path (issue 15) side by side with the input-factor path, in one process: the
statistics pass with ``keep_tokens="never"`` and ``"auto"`` (alternating, best of ``--repeat``), the bytes
the statistics and the kept tokens take, and the solve: the default batched solver on the input factors
vs the token-space solve (both with ``sensitivity="never"``), and the token path's default sensitivity
measurement on top.

    .venv/bin/python benchmarks/token_path_cost.py                      # SmolLM2, 24 x 48 tokens
    .venv/bin/python benchmarks/token_path_cost.py --num-samples 48     # more tokens than 2 d_in for most groups
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

from lora_da_fast import LoraDAConfig  # noqa: E402
from lora_da_fast.cli.builtins import load_model  # noqa: E402
from lora_da_fast.data import prepare_examples  # noqa: E402
from lora_da_fast.solve import solve_local  # noqa: E402
from lora_da_fast.statistics import StatisticsPass, run_pass  # noqa: E402


def nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def stats_bytes(st) -> dict:
    dense = sum(nbytes(z) for z in st.Z.values()) + sum(nbytes(m.G) + nbytes(m.y) for m in st.modules.values())
    tok = 0
    if st.tokens is not None:
        tok = sum(nbytes(x) for x in st.tokens.X.values()) + sum(nbytes(d) for d in st.tokens.delta.values())
    return {"dense_mb": dense / 2**20, "tokens_mb": tok / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="rotten-tomatoes")
    p.add_argument("--num-samples", type=int, default=24)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    model, tok, _ = load_model(a.model, device="cpu")
    exs, num_records = builtin_examples(tok, a.data, a.num_samples, a.max_length)
    ex, _ = prepare_examples(exs)
    total = sum(map(len, ex))
    cfgs = {k: LoraDAConfig(batch_size=a.batch_size, population_size=num_records, keep_tokens=k, sensitivity="never")
            for k in ("never", "auto")}
    times = {"pass never": [], "pass auto": [], "solve never": [], "solve auto": [], "sensitivity auto": []}
    stats = {}
    for _ in range(a.repeat):
        for k, cfg in cfgs.items():
            t0 = time.perf_counter()
            with StatisticsPass(model, cfg, total_tokens=total) as sp:
                run_pass(sp, ex, progress=False)
            stats[k] = sp.finalize()
            times[f"pass {k}"].append(time.perf_counter() - t0)
        for k, cfg in cfgs.items():
            t0 = time.perf_counter()
            solve_local(stats[k], cfg)
            times[f"solve {k}"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        solve_local(stats["auto"], LoraDAConfig(batch_size=a.batch_size, population_size=num_records))
        times["sensitivity auto"].append(time.perf_counter() - t0 - min(times["solve auto"]))
    best = {k: min(v) for k, v in times.items()}
    groups = stats["auto"].groups()
    kept = [] if stats["auto"].tokens is None else list(stats["auto"].tokens.X)
    git = git_state()
    print(f"# {a.model}, {a.num_samples} x <= {a.max_length} tokens ({total} tokens), batch size {a.batch_size}; "
          f"{len(kept)} of {len(groups)} input groups keep their tokens; commit {git['commit']}"
          f"{' (dirty)' if git['dirty'] else ''}; {environment('cpu')}; best of {a.repeat}")
    print("| phase | input factors (keep_tokens=never) s | token path (auto) s | ratio |")
    print("|---|---|---|---|")
    for phase in ("pass", "solve"):
        n, t = best[f"{phase} never"], best[f"{phase} auto"]
        print(f"| {phase} | {n:.1f} | {t:.1f} | {t / n:.2f}x |")
    print(f"| sensitivity (auto: the token groups solved twice) | - | +{best['sensitivity auto']:.1f} | - |")
    mem = {k: stats_bytes(s) for k, s in stats.items()}
    print(f"statistics: never {mem['never']['dense_mb']:.0f} MB; auto {mem['auto']['dense_mb']:.0f} MB + tokens "
          f"{mem['auto']['tokens_mb']:.0f} MB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "git": git, "env": environment("cpu"), "times": times, "best": best,
                       "memory": mem, "kept_groups": kept, "tokens": total}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
