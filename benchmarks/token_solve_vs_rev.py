"""The token-space solve of this working tree against the same file of a git revision, side by side in
one process, on real SmolLM2 statistics with every group's tokens kept (best of ``--repeat``,
alternating), with the largest relative difference of ``lora_B @ lora_A`` between the two.

    .venv/bin/python benchmarks/token_solve_vs_rev.py --base f7c6982      # sigma by SVD (before) vs eigvalsh
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from harness import builtin_examples, environment, git_state  # noqa: E402

import lora_da_fast.solve.token_space as new  # noqa: E402
from lora_da_fast import LoraDAConfig  # noqa: E402
from lora_da_fast.cli.builtins import load_model  # noqa: E402
from lora_da_fast.data import prepare_examples  # noqa: E402
from lora_da_fast.statistics import StatisticsPass, run_pass  # noqa: E402


def load_revision(rev: str):
    """``lora_da_fast/solve/token_space.py`` of ``rev``, loaded as a module of the current package."""
    text = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:lora_da_fast/solve/token_space.py"], check=True,
                          capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "token_space_base.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("lora_da_fast.solve.token_space_base", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--num-samples", type=int, default=24)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    old = load_revision(a.base)
    model, tok, _ = load_model("smollm2-135m", device="cpu")
    exs, num_records = builtin_examples(tok, "rotten-tomatoes", a.num_samples, a.max_length)
    ex, _ = prepare_examples(exs)
    cfg = LoraDAConfig(batch_size=8, population_size=num_records, keep_tokens="always", sensitivity="never")
    with StatisticsPass(model, cfg, total_tokens=sum(map(len, ex))) as sp:
        run_pass(sp, ex, progress=False)
    st = sp.finalize()
    groups = new.token_path_groups(st, cfg)
    times = {a.base: [], "working tree": []}
    res = {}
    for _ in range(a.repeat):
        for name, mod in ((a.base, old), ("working tree", new)):
            t0 = time.perf_counter()
            res[name] = mod.solve_token_groups(st, cfg, groups)
            times[name].append(time.perf_counter() - t0)
    ref, got = res[a.base], res["working tree"]
    diff = max(float((got[n].lora_B.double() @ got[n].lora_A.double() - ref[n].lora_B.double() @ ref[n].lora_A.double())
                     .norm() / (ref[n].lora_B.double() @ ref[n].lora_A.double()).norm()) for n in ref)
    git = git_state()
    print(f"# SmolLM2-135M, {a.num_samples} x <= {a.max_length} tokens ({st.num_tokens} tokens), {len(groups)} groups "
          f"through their tokens; commit {git['commit']}{' (dirty)' if git['dirty'] else ''}; {environment('cpu')}")
    for name, v in times.items():
        print(f"{name:>14}: {', '.join(f'{t:.2f}' for t in v)} s (best {min(v):.2f})")
    print(f"ratio {a.base} / working tree (best): {min(times[a.base]) / min(times['working tree']):.2f}x; "
          f"max relative difference of lora_B @ lora_A: {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
