"""Reproducibility of the adapter across batch sizes and ranks (issue 15): the same ``lora-da-fast init``
command run with ``--batch-size 1``, ``--batch-size 8`` and under ``torchrun --nproc-per-node 2``
(gloo, ``--device cpu``); per kind of module (q/k/v/o/gate/up/down) the median and max relative
difference ``||P_a - P_b||_F / ||P_b||_F`` of ``P = lora_B @ lora_A`` between the runs, and how many
modules got a different damping.

Default: real SmolLM2-135M and 24 Rotten Tomatoes snippets of at most 48 tokens (about 700 tokens, fewer
than ``down_proj``'s 1536 inputs). Each run is a separate CLI process, exactly what a user runs.

    .venv/bin/python benchmarks/reproducibility.py                 # the table
    .venv/bin/python benchmarks/reproducibility.py --keep-stats    # also keep each run's statistics file
    .venv/bin/python benchmarks/reproducibility.py --model tiny-llama --data FILE.jsonl

``--work DIR`` keeps the adapters (and statistics files) there; ``--reuse`` compares the adapters already
in ``DIR`` without running anything. ``--json FILE`` writes the table and per-module rows.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import REPO, environment, git_state  # noqa: E402

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _cli_args(a, out: str, batch_size: int, stats: str = None) -> List[str]:
    args = ["init", "--model", a.model, "--data", a.data, "--num-samples", str(a.num_samples),
            "--max-length", str(a.max_length), "--batch-size", str(batch_size), "--device", "cpu",
            "--out", out, "--overwrite", "--json", "--quiet"]
    if stats:
        args += ["--stats-cache", stats]
    return args + list(a.extra)


def run(a, name: str, batch_size: int, ranks: int) -> Tuple[str, float]:
    """One CLI run; returns its output folder and wall time."""
    out = os.path.join(a.work, name)
    stats = os.path.join(a.work, f"{name}.stats.safetensors") if a.keep_stats else None
    if stats and os.path.exists(stats):
        os.remove(stats)  # a fresh pass every time
    env = dict(os.environ)
    if ranks > 1:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [TORCHRUN, "--nproc-per-node", str(ranks), "--master-port", str(a.port), "-m", "lora_da_fast",
               *_cli_args(a, out, batch_size, stats)]
    else:
        cmd = [sys.executable, "-m", "lora_da_fast", *_cli_args(a, out, batch_size, stats)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"run {name} failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    return out, wall


def products(folder: str) -> Dict[str, torch.Tensor]:
    t = load_file(os.path.join(folder, "adapter_model.safetensors"))
    out = {}
    for k, A in t.items():
        if ".lora_A." in k:
            B = t[k.replace(".lora_A.", ".lora_B.")]
            name = k.split(".lora_A.")[0].replace("base_model.model.", "", 1)
            out[name] = B.double() @ A.double()
    return out


def reports(folder: str) -> Dict[str, dict]:
    with open(os.path.join(folder, "lora_da_report.json")) as f:
        return json.load(f)["modules"]


def kind(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    return last if last in KINDS else "other"


def compare(fa: str, fb: str) -> Dict[str, dict]:
    pa, pb = products(fa), products(fb)
    ra, rb = reports(fa), reports(fb)
    rows = {}
    for name in pa:
        diff = float(torch.linalg.norm(pa[name] - pb[name]) / torch.linalg.norm(pb[name]).clamp(min=1e-300))
        rows[name] = {"rel_diff": diff, "damping": (ra[name]["damping"], rb[name]["damping"]),
                      "damping_differs": ra[name]["damping"] != rb[name]["damping"],
                      "flags": (ra[name].get("notes") or [], rb[name].get("notes") or [])}
    return rows


def table(pairs: Dict[str, Dict[str, dict]]) -> str:
    head = "| kind | " + " | ".join(f"{p} median | {p} max | {p} damping differs" for p in pairs) + " |"
    sep = "|---|" + "---|---|---|" * len(pairs)
    lines = [head, sep]
    kinds = [k for k in KINDS + ("other",) if any(kind(n) == k for rows in pairs.values() for n in rows)]
    for k in kinds + ["all"]:
        cells = []
        for rows in pairs.values():
            sel = [r for n, r in rows.items() if k == "all" or kind(n) == k]
            d = [r["rel_diff"] for r in sel]
            cells += [f"{statistics.median(d):.1e}", f"{max(d):.1e}",
                      f"{sum(r['damping_differs'] for r in sel)}/{len(sel)}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="rotten-tomatoes")
    p.add_argument("--num-samples", type=int, default=24)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--ranks", type=int, default=2, help="torchrun processes (0: no torchrun run)")
    p.add_argument("--port", type=int, default=29531)
    p.add_argument("--work", default=None, help="folder for the adapters (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="compare the adapters already in --work")
    p.add_argument("--keep-stats", action="store_true", help="each run also writes its statistics file")
    p.add_argument("--json", default=None, help="write the per-module rows and the table here")
    p.add_argument("extra", nargs="*", help="more CLI arguments (after --)")
    a = p.parse_args(argv)
    tmp = None
    if a.work is None:
        tmp = a.work = tempfile.mkdtemp(prefix="lora-da-repro-")
    os.makedirs(a.work, exist_ok=True)
    runs = [("bs1", 1, 1), ("bs8", 8, 1)] + ([(f"ranks{a.ranks}", 8, a.ranks)] if a.ranks > 1 else [])
    folders, walls = {}, {}
    for name, bs, ranks in runs:
        if a.reuse:
            folders[name] = os.path.join(a.work, name)
            continue
        folders[name], walls[name] = run(a, name, bs, ranks)
        print(f"{name}: {walls[name]:.1f} s", file=sys.stderr)
    names = [r[0] for r in runs]
    pairs = {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            pairs[f"{names[i]} vs {names[j]}"] = compare(folders[names[i]], folders[names[j]])
    git = git_state()
    print(f"# {a.model}, {a.data}, {a.num_samples} examples x <= {a.max_length} tokens; commit {git['commit']}"
          f"{' (dirty)' if git['dirty'] else ''}; {environment('cpu')}")
    with open(os.path.join(folders[names[0]], "lora_da_report.json")) as f:
        rep = json.load(f)
    print(f"# {rep['num_examples']} examples, {rep['num_tokens']} tokens; wall s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
    print(table(pairs))
    flagged = {n: r["flags"][0] for n, r in next(iter(pairs.values())).items() if r["flags"][0]}
    if flagged:
        print(f"# {len(flagged)} modules with notes in {names[0]}, e.g. "
              + "; ".join(f"{n}: {v[0]}" for n, v in list(flagged.items())[:3]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"git": git, "env": environment("cpu"), "args": vars(a), "walls": walls,
                       "table": table(pairs), "pairs": pairs}, f, indent=1)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
