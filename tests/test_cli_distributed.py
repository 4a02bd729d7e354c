"""`torchrun --nproc-per-node 2 -m lora_da_fast init ...` on CPU (gloo): same adapter as one process,
rank 0 alone writes it, a bad input fails on every rank with one line."""
import json
import os
import random
import shutil
import string
import subprocess
import sys

import pytest
import torch

from .helpers import rel_err
from .test_cli import TEXTS, adapter_tensors, base_args
from .tolerances import TOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")

pytestmark = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not found")


def _torchrun(argv, env, tmp_path):
    cmd = [TORCHRUN, "--nproc-per-node", "2", "--master-port", "29517", "-m", "lora_da_fast", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_torchrun_two_ranks_equals_one_process(tmp_path):
    env = dict(os.environ, LORA_DA_FAST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    data = tmp_path / "calib.jsonl"
    # Enough distinct tokens (random printable text) that every Z is full rank: with a singular Z the
    # damping amplifies fp32 rounding in G's null-space component by 1/damping, and two summation
    # orders then give visibly different subspaces (docs/implementation.md, "Numerics").
    rng = random.Random(0)
    texts = ["".join(rng.choice(string.printable[:94]) for _ in range(40)) for _ in range(12)]
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts + TEXTS) + "\n")
    # o_proj is left out: its input (attention outputs of a tiny random model) has a covariance with
    # condition number ~1e6, so the fp32 summation order alone moves its subspace by ~1e-2 (the same
    # statistics agree to 1e-7; see docs/implementation.md, "Numerics").
    targets = ["--target-modules", "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"]
    one = subprocess.run([sys.executable, "-m", "lora_da_fast", *base_args(str(data), tmp_path / "one", "--quiet",
                                                                           *targets)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    two = _torchrun(base_args(str(data), tmp_path / "two", "--json", *targets), env, tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    report = json.loads(two.stdout)  # rank 0 alone printed the report
    assert report["world_size"] == 2
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if ".lora_A." not in k:
            continue
        kb = k.replace(".lora_A.", ".lora_B.")
        pa, pb = a[kb].double() @ a[k].double(), b[kb].double() @ b[k].double()
        worst = max(worst, rel_err(pb, pa))
    print(f"worst relative difference of lora_B @ lora_A, 2 ranks vs 1 process: {worst:.2e}")
    # Only the summation order of the fp32 statistics differs (1e-7 relative); measured 7e-6.
    assert worst < TOL["solver_contract"]
    assert sorted(os.listdir(tmp_path)) == sorted(["cache", "calib.jsonl", "one", "two"])  # nothing else written

    bad = _torchrun(["init", "--model", "tiny-llama", "--data", str(tmp_path / "missing.jsonl"), "--out",
                     str(tmp_path / "three"), "--device", "cpu"], env, tmp_path)
    assert bad.returncode != 0
    # both ranks say it, each in one message (their lines may interleave on the shared stderr)
    for r in (0, 1):
        assert bad.stderr.count(f"lora-da-fast: error (rank {r}): --data ") == 1, bad.stderr[-2000:]
    assert bad.stderr.count("missing.jsonl: no such file") == 2
    assert not os.path.exists(tmp_path / "three")
