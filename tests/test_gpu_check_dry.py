"""The GPU check script (benchmarks/gpu_check.sh) runs every step on a GPU session's scarce device time;
its CPU dry run (``GPU_CHECK_DRY=1``: the same scripts at tiny shapes) must pass on every commit, so a
benchmark left behind by a change (e.g. square accumulators after the packed layout) fails here, not on
the device."""
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_passes_every_step(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_BUDGET_S="900", PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    steps = re.findall(r"^\| (\w+) \| (\S+) \| \d+ \|$", summary, flags=re.M)
    assert len(steps) >= 7, summary
    failed = [(name, rc) for name, rc in steps if rc != "0"]
    assert not failed, f"steps that failed: {failed}\n{proc.stdout[-4000:]}"
