"""Import cost of the package: this working tree against a git revision, side by side in one run.

Each measurement is a fresh interpreter (started outside the repository) that appends one tree to
``sys.path`` and times ``import lora_da_fast`` (and a leaf, ``lora_da_fast.triangle``) with
``time.perf_counter``; the two trees alternate, and the median of ``--repeats`` runs is reported with the
heavy libraries each import loaded.

    python benchmarks/import_time.py --base da37e79 [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "peft", "triton", "safetensors")

PROBE = """
import json, sys, time
sys.path.append({tree!r})   # appended: installed packages (Hugging Face's kernels) win over the tree's folders
t = time.perf_counter()
import {module}
dt = time.perf_counter() - t
print(json.dumps({{"s": dt, "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def measure(tree: str, module: str) -> dict:
    code = PROBE.format(tree=tree, module=module, heavy=HEAVY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare with (e.g. the commit before a change)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as base_tree:
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.base, "lora_da_fast"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", base_tree], input=archive, check=True)
        trees = {args.base: base_tree, "working tree": ROOT}
        for module in ("lora_da_fast", "lora_da_fast.triangle"):
            for tree in trees.values():  # warm the file cache
                measure(tree, module)
            runs = {name: [] for name in trees}
            for _ in range(args.repeats):
                for name, tree in trees.items():
                    runs[name].append(measure(tree, module))
            med = {name: statistics.median(r["s"] for r in rs) for name, rs in runs.items()}
            print(f"import {module}: median of {args.repeats} (alternating)")
            for name, rs in runs.items():
                print(f"  {name:>14}: {med[name]:.3f} s  loads {', '.join(rs[-1]['loaded']) or 'none of ' + '/'.join(HEAVY)}")
            print(f"  ratio {args.base} / working tree: {med[args.base] / med['working tree']:.1f}x")


if __name__ == "__main__":
    main()
