"""Reliability (issue 8): bad input, numerical trouble, interruption and resume, determinism, fuzzing.

Every user error must give exit status 2 and one line on stderr (no traceback); internal errors exit 1
pointing to a traceback file; an interrupted or killed run resumes from its checkpoint and gives the
same adapter, bit for bit, as an uninterrupted run; nothing half-written is ever left behind.
Runs on CPU with the built-in ``tiny-llama`` and small JSONL files.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lora_da_fast import LoraDAConfig, collect_statistics, solve_lora_da  # noqa: E402
from lora_da_fast import builtins as bi  # noqa: E402
from lora_da_fast import cli  # noqa: E402
from lora_da_fast.errors import ConfigError, DataError, NumericalError, TargetError  # noqa: E402
from lora_da_fast.fisher import FisherStatistics  # noqa: E402

from .helpers import random_examples, tiny_llama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the movie was great fun a slow and tedious film acting superb plot thin I would watch it again".split()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("LORA_DA_FAST_CACHE")
    os.environ["LORA_DA_FAST_CACHE"] = str(path)
    bi.tiny_llama_folder()
    yield path
    if old is None:
        os.environ.pop("LORA_DA_FAST_CACHE", None)
    else:
        os.environ["LORA_DA_FAST_CACHE"] = old


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def texts(n, seed=0, lo=3, hi=12):
    import random

    r = random.Random(seed)
    return [{"text": " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))} for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # lines 2 and 5 have no label token (an empty text is only <s>): skipped and counted
    recs = texts(6, seed=1)
    recs.insert(1, {"text": ""})
    recs.insert(4, {"text": ""})
    return write_jsonl(tmp_path_factory.mktemp("data") / "calib.jsonl", recs)


def args(data, out, *extra):
    return ["init", "--model", "tiny-llama", "--data", str(data), "--out", str(out), "--rank", "4",
            "--max-length", "32", "--batch-size", "3", "--device", "cpu", *extra]


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def adapter_bytes(folder) -> bytes:
    with open(os.path.join(folder, "adapter_model.safetensors"), "rb") as f:
        return f.read()


def assert_user_error(rc, err, match):
    assert rc == 2, err
    assert err.startswith("lora-da-fast: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert match in err, err


def leftovers(folder):
    return sorted(p for p in os.listdir(folder) if ".tmp-" in p or ".old-" in p)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, nothing written


def _bad_cases(tmp, data):
    (tmp / "empty_dir").mkdir()
    (tmp / "afile").write_text("x")
    (tmp / "broken_model").mkdir()
    (tmp / "broken_model" / "config.json").write_text("{}")
    (tmp / "garbage_model").mkdir()
    (tmp / "garbage_model" / "config.json").write_text("this is not json")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.jsonl").write_text("\n  \n\n")
    (tmp / "table.jsonl").write_text("text,label\ngreat,1\n")
    (tmp / "binary.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe\x00\x01')
    (tmp / "array.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    (tmp / "fields.jsonl").write_text('{"text": "ok"}\n\n{"prompt": "q", "answer": "a"}\n')
    (tmp / "types.jsonl").write_text('{"text": 3}\n')
    (tmp / "surrogate.jsonl").write_text('{"text": "broken emoji \\ud83d"}\n')
    (tmp / "deep.jsonl").write_text("[" * 100000 + "]" * 100000 + "\n")
    write_jsonl(tmp / "no_labels.jsonl", [{"text": ""}, {"prompt": "x" * 40, "response": "y"}])
    (tmp / "exists").mkdir()
    (tmp / "exists" / "adapter_config.json").write_text("{}")
    (tmp / "precious").mkdir()
    (tmp / "precious" / "thesis.tex").write_text("do not delete")
    (tmp / "garbage.stats").write_bytes(b"not safetensors")
    never = tmp / "never"
    d = data
    return {
        # model
        "model missing": (["init", "--model", tmp / "no_model", "--data", d, "--out", never], "no such folder"),
        "model unknown built-in": (["init", "--model", "llama-70b", "--data", d, "--out", never],
                                   "not a built-in model (built-in: smollm2-135m, tiny-llama)"),
        "model is a file": (["init", "--model", tmp / "afile", "--data", d, "--out", never], "not a folder"),
        "model without config": (["init", "--model", tmp / "empty_dir", "--data", d, "--out", never], "no config.json"),
        "model unloadable": (["init", "--model", tmp / "broken_model", "--data", d, "--out", never, "--device", "cpu"],
                             "cannot load a tokenizer"),
        "model config not json": (["init", "--model", tmp / "garbage_model", "--data", d, "--out", never,
                                   "--device", "cpu"], "cannot load"),
        # data
        "data missing": (args(tmp / "missing.jsonl", never), "no such file"),
        "data unknown built-in": (args("imdb", never), "not a built-in data set (built-in: rotten-tomatoes"),
        "data is a folder": (args(tmp / "empty_dir", never), "is a folder"),
        "data empty": (args(tmp / "empty.jsonl", never), "holds no records"),
        "data blank": (args(tmp / "blank.jsonl", never), "holds no records"),
        "data not JSONL": (args(tmp / "table.jsonl", never), "line 1: not valid JSON"),
        "data not UTF-8": (args(tmp / "binary.jsonl", never), "line 2: not UTF-8"),
        "data line not an object": (args(tmp / "array.jsonl", never), "line 2: expected a JSON object, got an array"),
        "data line without fields": (args(tmp / "fields.jsonl", never),
                                     "line 3: expected a \"text\" field or \"prompt\" and \"response\" fields, "
                                     "got keys ['answer', 'prompt']"),
        "data field not a string": (args(tmp / "types.jsonl", never),
                                    "line 1: \"text\" must be a string, got a number"),
        "data lone surrogate": (args(tmp / "surrogate.jsonl", never), "line 1: \"text\" holds an invalid Unicode"),
        "data nested too deeply": (args(tmp / "deep.jsonl", never), "line 1: JSON nested too deeply"),
        "data without label tokens": (args(tmp / "no_labels.jsonl", never),
                                      "none of the 2 calibration examples has a label token"),
        # LoRA / LoRA-DA settings
        "rank too large": (args(d, never, "--rank", "40"),
                           "rank 40 is larger than min(d_in, d_out) = 32 of module model.layers.0.self_attn.k_proj"),
        "rank zero": (args(d, never, "--rank", "0"), "--rank: expected a positive integer"),
        "targets match nothing": (args(d, never, "--target-modules", "q_prj,vproj"),
                                  "--target-modules 'q_prj,vproj' matches no module; linear module names in this "
                                  "model: down_proj, gate_proj, k_proj"),
        "targets bad regex": (args(d, never, "--target-modules", "layers.(0"), "is not a valid regex"),
        "population size zero": (args(d, never, "--population-size", "0"), "--population-size: expected a positive"),
        "population size negative": (args(d, never, "--population-size", "-5"), "--population-size"),
        "gamma zero": (args(d, never, "--gamma", "0"), "--gamma: expected a positive finite number"),
        "gamma negative": (args(d, never, "--gamma", "-1"), "--gamma"),
        "gamma nan": (args(d, never, "--gamma", "nan"), "--gamma"),
        "gamma inf": (args(d, never, "--gamma", "inf"), "--gamma"),
        "damping zero": (args(d, never, "--damping", "0"), "--damping: expected a positive finite number"),
        "damping negative": (args(d, never, "--damping", "-1e-6"), "--damping"),
        "max damping below damping": (args(d, never, "--damping", "1e-2", "--max-damping", "1e-3"),
                                      "max_damping (0.001) must be >= damping (0.01)"),
        "beta negative": (args(d, never, "--beta", "-1"), "--beta"),
        "max length 1": (args(d, never, "--max-length", "1"), "--max-length must be at least 2"),
        "token mask": (args(d, never, "--token-mask", "all"), "invalid choice"),
        "device": (args(d, never, "--device", "tpu"), "--device"),
        "dtype": (args(d, never, "--dtype", "float8"), "invalid choice"),
        # output and statistics cache
        "out missing": (["init", "--model", "tiny-llama", "--data", d], "--out"),
        "out exists": (args(d, tmp / "exists"), "exists; add --overwrite to replace it"),
        "out is a file": (args(d, tmp / "afile", "--overwrite"), "exists and is not a folder"),
        "out holds no adapter": (args(d, tmp / "precious", "--overwrite"), "non-empty folder that holds no adapter"),
        "out under a file": (args(d, tmp / "afile" / "adapter"), "is not a folder"),
        "stats cache is a folder": (args(d, never, "--stats-cache", tmp / "empty_dir"), "is a folder; give a file"),
        "stats cache folder missing": (args(d, never, "--stats-cache", tmp / "nodir" / "s.st"), "does not exist"),
        "stats cache not statistics": (args(d, never, "--stats-cache", tmp / "garbage.stats"),
                                       "is not a lora_da_fast statistics file"),
        "checkpoint every zero": (args(d, never, "--checkpoint-every", "0"), "--checkpoint-every"),
    }


def _case_ids():
    # the case names, for parametrize (the cases themselves are built per test, in its tmp_path)
    from pathlib import Path

    with tempfile.TemporaryDirectory() as t:
        return list(_bad_cases(Path(t), "d.jsonl"))


@pytest.mark.parametrize("case", _case_ids())
def test_bad_input_one_line_exit_2(case, cache, data, tmp_path, capsys):
    argv, match = _bad_cases(tmp_path, data)[case]
    rc, stdout, err = run(argv + ["--quiet"], capsys)
    assert_user_error(rc, err, match)
    assert stdout == ""
    assert not os.path.exists(tmp_path / "never")
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "do not delete"
    assert leftovers(tmp_path) == []


def test_unreadable_and_unwritable_paths(cache, data, tmp_path, capsys, monkeypatch):
    """Permissions (simulated: the tests may run as root, which ignores them)."""
    model = tmp_path / "model"
    shutil.copytree(bi.tiny_llama_folder(), model)
    real_access = os.access
    denied = set()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) not in denied and real_access(p, mode, **kw))
    denied.add(str(model))
    rc, _, err = run(["init", "--model", model, "--data", data, "--out", tmp_path / "o", "--quiet"], capsys)
    assert_user_error(rc, err, "cannot read the folder (permission denied)")
    denied.clear()
    denied.add(str(model / "config.json"))
    rc, _, err = run(["init", "--model", model, "--data", data, "--out", tmp_path / "o", "--quiet"], capsys)
    assert_user_error(rc, err, "config.json (permission denied)")
    denied.clear()
    (tmp_path / "ro").mkdir()
    denied.add(str(tmp_path / "ro"))
    rc, _, err = run(args(data, tmp_path / "ro" / "adapter", "--quiet"), capsys)
    assert_user_error(rc, err, "is not writable")
    rc, _, err = run(args(data, tmp_path / "o", "--stats-cache", tmp_path / "ro" / "s.st", "--quiet"), capsys)
    assert_user_error(rc, err, "is not writable")
    if os.geteuid() != 0:  # a real unreadable file
        f = tmp_path / "secret.jsonl"
        f.write_text('{"text": "a"}\n')
        f.chmod(0)
        rc, _, err = run(args(f, tmp_path / "o", "--quiet"), capsys)
        assert_user_error(rc, err, "cannot read it (Permission denied)")


def test_api_bad_input_is_refused_before_the_pass():
    from peft import LoraConfig

    from lora_da_fast import initialize_lora_da

    model = tiny_llama(seed=0)
    calls = []
    h = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    ex = random_examples(4, seed=1)
    cfg = LoraDAConfig(rank=20, population_size=4)
    with pytest.raises(TargetError, match=r"rank 20 is larger than min\(d_in, d_out\) = 16 of module "
                                          r"model.layers.0.self_attn.k_proj"):
        initialize_lora_da(model, ex, LoraConfig(r=20, target_modules="all-linear"), cfg, progress=False)
    with pytest.raises(TargetError, match="matches no module; linear module names in this model: down_proj"):
        initialize_lora_da(model, ex, LoraConfig(r=4, target_modules=["qproj"]),
                           LoraDAConfig(rank=4, population_size=4), progress=False)
    assert calls == []  # refused before any forward pass
    h.remove()
    for field, value in [("population_size", 0), ("population_size", -1), ("gamma", 0.0), ("gamma", -2.0),
                         ("damping", 0.0), ("damping", -1e-6), ("gamma", float("nan"))]:
        with pytest.raises(ConfigError, match=field):
            LoraDAConfig(**{field: value})
    with pytest.raises(DataError, match="no usable calibration example"):
        collect_statistics(model, [{"input_ids": torch.tensor([5]), "labels": torch.tensor([5])}],
                           LoraDAConfig(backend="torch"), progress=False)
    stats = collect_statistics(model, ex + [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100] * 3)}],
                               LoraDAConfig(backend="torch"), progress=False)
    assert (stats.num_examples, stats.num_skipped) == (4, 1)


# --------------------------------------------------------------------------------------------------
# Internal errors, out of memory, interruption of the save


def test_internal_error_exit_1_with_traceback_file(cache, data, tmp_path, capsys, monkeypatch):
    import lora_da_fast.engine as solver

    def boom(*a, **k):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(solver, "solve_lora_da", boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rc, _, err = run(args(data, tmp_path / "o", "--quiet"), capsys)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "internal error: RuntimeError at test_reliability.py:" in err and "something unexpected" in err
    path = err.split("the traceback is in ")[1].split(";")[0]
    report = open(path).read()
    assert "Traceback" in report and "in boom" in report and "command: lora-da-fast init" in report
    assert "torch " in report
    assert not os.path.exists(tmp_path / "o")

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(solver, "solve_lora_da", oom)
    rc, _, err = run(args(data, tmp_path / "o", "--quiet"), capsys)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "error: out of memory during solve" in err and "--batch-size (now 3)" in err

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(solver, "solve_lora_da", interrupt)
    rc, _, err = run(args(data, tmp_path / "o", "--quiet"), capsys)
    assert rc == 130 and err == "lora-da-fast: interrupted; no adapter was written\n"
    assert not os.path.exists(tmp_path / "o") and leftovers(tmp_path) == []


class _FakePeft:
    def __init__(self, tag):
        self.tag = tag

    def save_pretrained(self, folder):
        with open(os.path.join(folder, "adapter_model.safetensors"), "w") as f:
            f.write(self.tag)


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    out = str(tmp_path / "adapter")
    cli.write_adapter(_FakePeft("old"), {}, out)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # after the old adapter was moved aside, before the new one is in place
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        cli.write_adapter(_FakePeft("new"), {}, out)
    monkeypatch.setattr(os, "rename", real_rename)
    assert open(os.path.join(out, "adapter_model.safetensors")).read() == "old"
    assert leftovers(tmp_path) == []
    cli.write_adapter(_FakePeft("new"), {}, out)
    assert open(os.path.join(out, "adapter_model.safetensors")).read() == "new"
    assert leftovers(tmp_path) == []


def test_stale_temporaries_of_a_killed_run_are_cleared(tmp_path):
    pid = dead_pid()
    out = tmp_path / "adapter"
    (tmp_path / f".adapter.tmp-{pid}-x1y2").mkdir()
    old = tmp_path / f"adapter.old-{pid}"  # killed between the two renames: the previous adapter
    old.mkdir()
    (old / "adapter_config.json").write_text("{}")
    stats = tmp_path / "s.st"
    for name in (f"s.st.tmp-{pid}", f"s.st.partial.tmp-{pid}", f"s.st.tmp-{pid}.tmp-{pid}"):
        (tmp_path / name).write_text("half")
    mine = tmp_path / f"s.st.tmp-{os.getpid()}"  # a live process's file is not touched
    mine.write_text("busy")
    cli.output.remove_stale_temporaries(str(out), str(stats))
    assert (out / "adapter_config.json").exists()  # moved back into place
    assert sorted(os.listdir(tmp_path)) == ["adapter", mine.name]


# --------------------------------------------------------------------------------------------------
# Statistics cache: fingerprint, reuse, refusal


@pytest.fixture(scope="module")
def stats_run(cache, data, tmp_path_factory):
    """One run with --stats-cache: (statistics file, adapter folder)."""
    d = tmp_path_factory.mktemp("stats_run")
    rc = cli.main(args(data, d / "adapter", "--stats-cache", str(d / "s.st"), "--quiet"))
    assert rc == 0
    return d / "s.st", d / "adapter"


def test_stats_cache_reuse_and_refusal(stats_run, data, tmp_path, capsys):
    f0, a0 = stats_run
    assert not os.path.exists(str(f0) + ".partial") and leftovers(f0.parent) == []
    meta = FisherStatistics.load(str(f0)).meta
    assert set(meta["fingerprint"]["parts"]) == {"code", "model", "statistics", "data"}
    f = tmp_path / "s.st"
    shutil.copy(f0, f)
    rc, _, err = run(args(data, tmp_path / "a1", "--stats-cache", f), capsys)
    assert rc == 0, err
    assert f"statistics loaded from {f}" in err and "2 of 8 examples have no label token" in err
    assert "--data line 2, 5" in err
    report = json.load(open(tmp_path / "a1" / cli.REPORT_FILE))
    assert report["statistics_cache"]["loaded"] and report["statistics_cache"]["fingerprint_checked"]
    assert report["num_skipped"] == 2 and "statistics" not in report["timings_s"]
    assert adapter_bytes(tmp_path / "a1") == adapter_bytes(a0)
    # valid for a subset of the targets and another batch size (they only order the sums)
    rc, _, err = run(args(data, tmp_path / "a2", "--stats-cache", f, "--target-modules", "v_proj",
                          "--batch-size", "2", "--quiet"), capsys)
    assert rc == 0, err
    # refused: other data, another token mask, another dtype (other weights), targets it does not hold
    for extra, match in [(["--max-length", "16"], "differs in: calibration data"),
                         (["--num-samples", "3"], "differs in: calibration data"),
                         (["--token-mask", "labels"], "differs in: statistics settings"),
                         (["--dtype", "bfloat16"], "differs in: model")]:
        rc, _, err = run(args(data, tmp_path / "a3", "--stats-cache", f, "--quiet", *extra), capsys)
        assert_user_error(rc, err, match)
        assert "delete it or give another file" in err
    stats = FisherStatistics.load(str(f))
    del stats.modules["model.layers.1.mlp.down_proj"]
    stats.save(str(f))
    rc, _, err = run(args(data, tmp_path / "a3", "--stats-cache", f, "--quiet"), capsys)
    assert_user_error(rc, err, "the statistics have no entry for 1 target module(s), e.g. model.layers.1.mlp.down_proj")
    # a statistics file saved through the API (no fingerprint) is used, with a note
    stats = FisherStatistics.load(str(f0))
    stats.meta = {}
    stats.save(str(f))
    rc, _, err = run(args(data, tmp_path / "a4", "--stats-cache", f), capsys)
    assert rc == 0 and "has no fingerprint" in err
    assert json.load(open(tmp_path / "a4" / cli.REPORT_FILE))["statistics_cache"]["fingerprint_checked"] is False


# --------------------------------------------------------------------------------------------------
# Numerics through the CLI


def test_fp16_overflow_is_named_by_module_and_data_line(cache, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "hot"
    shutil.copytree(bi.tiny_llama_folder(), model_dir)
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # MLP activations of layer 1 beyond float16's range (65504), fine in float32
        m.model.layers[1].mlp.up_proj.weight.mul_(3000)
        m.model.layers[1].mlp.gate_proj.weight.mul_(3000)
    m.save_pretrained(model_dir)
    argv = ["init", "--model", model_dir, "--data", data, "--out", tmp_path / "o", "--rank", "4", "--max-length",
            "32", "--batch-size", "1", "--device", "cpu", "--quiet"]
    rc, _, err = run(argv + ["--dtype", "float16"], capsys)
    assert_user_error(rc, err, "non-finite values first appear in the output of module model.layers.1.mlp.")
    assert "on examples " in err and "try --dtype float32" in err
    # batches run longest first: the first batch is the longest example, named by its line in --data
    lines = open(data).read().splitlines()
    longest = max(range(len(lines)), key=lambda i: len(json.loads(lines[i])["text"]))
    assert f"[--data line {longest + 1}]" in err
    assert not os.path.exists(tmp_path / "o")
    rc, _, err = run(argv + ["--dtype", "float32"], capsys)  # the advice works
    assert rc == 0, err


def test_cholesky_retry_and_bad_statistics_are_reported(stats_run, data, tmp_path, capsys):
    f0, _ = stats_run
    f = tmp_path / "s.st"
    stats = FisherStatistics.load(str(f0))
    group = stats.modules["model.layers.1.mlp.down_proj"].group
    d = stats.Z[group].shape[0]
    stats.Z[group] = stats.Z[group] - 3e-4 * torch.eye(d)  # indefinite: needs damping 1e-3 to factorise
    stats.save(str(f))  # the fingerprint (meta) is kept: same model and data
    rc, stdout, err = run(args(data, tmp_path / "o", "--stats-cache", f), capsys)
    assert rc == 0, err
    mod = json.load(open(tmp_path / "o" / cli.REPORT_FILE))["modules"]["model.layers.1.mlp.down_proj"]
    assert mod["damping"] == pytest.approx(1e-3)
    assert "damping raised from 1e-06 to 0.001 after a failed Cholesky" in mod["notes"]
    row = next(l for l in stdout.splitlines() if l.startswith("model.layers.1.mlp.down_proj"))
    assert " 0.001 " in row and "damping raised" in row
    rc, _, err = run(args(data, tmp_path / "o2", "--stats-cache", f, "--max-damping", "1e-4", "--quiet"), capsys)
    assert_user_error(rc, err, "Cholesky factorisation of the input factor of model.layers.1.mlp.down_proj failed "
                               "even with damping 0.0001")
    assert "raise --max-damping" in err

    for what, edit, match in [
        ("zero", lambda s: s.modules["model.layers.0.mlp.up_proj"].G.zero_(),
         "module model.layers.0.mlp.up_proj has an all-zero gradient"),
        ("nan", lambda s: s.modules["model.layers.0.self_attn.o_proj"].G.fill_(float("nan")),
         "non-finite gradient G in module model.layers.0.self_attn.o_proj"),
    ]:
        stats = FisherStatistics.load(str(f0))
        edit(stats)
        stats.save(str(f))
        rc, _, err = run(args(data, tmp_path / "o3", "--stats-cache", f, "--quiet"), capsys)
        assert_user_error(rc, err, match)
        assert not os.path.exists(tmp_path / "o3")


def test_module_never_reached_is_named():
    model = tiny_llama(seed=0)
    model.model.layers[0].mlp.unused = torch.nn.Linear(32, 32)  # a target the forward pass never calls
    cfg = LoraDAConfig(rank=2, population_size=8, backend="torch")
    stats = collect_statistics(model, random_examples(4, seed=1), cfg, progress=False)
    with pytest.raises(NumericalError, match=r"module model\.layers\.0\.mlp\.unused has an all-zero gradient"):
        solve_lora_da(stats, cfg)


# --------------------------------------------------------------------------------------------------
# Interruption and resume


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("long") / "calib.jsonl", texts(40, seed=3, lo=5, hi=30))


def long_args(data, out, *extra):
    return ["init", "--model", "tiny-llama", "--data", str(data), "--out", str(out), "--rank", "4",
            "--max-length", "48", "--batch-size", "2", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def reference(cache, long_data, tmp_path_factory):
    """The adapter of an uninterrupted run without any checkpointing."""
    out = tmp_path_factory.mktemp("ref") / "adapter"
    assert cli.main(long_args(long_data, out, "--quiet")) == 0
    return adapter_bytes(out)


def _start_and_stop(cache, long_data, tmp_path, sig):
    stats = tmp_path / "s.st"
    partial = str(stats) + cli.PARTIAL_SUFFIX
    out = tmp_path / "adapter"
    env = dict(os.environ, LORA_DA_FAST_CACHE=str(cache))
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        child = subprocess.Popen([sys.executable, "-m", "lora_da_fast",
                                  *long_args(long_data, out, "--stats-cache", str(stats), "--checkpoint-every", "2")],
                                 stdout=so, stderr=se, cwd=ROOT, env=env)
        deadline = time.time() + 240
        while not os.path.exists(partial) and child.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert os.path.exists(partial), open(tmp_path / "stderr").read()
        child.send_signal(sig)
        rc = child.wait(timeout=120)
    return rc, stats, partial, out, open(tmp_path / "stderr").read()


def _resume(long_data, stats, out, capsys):
    rc, _, err = run(long_args(long_data, out, "--stats-cache", stats, "--checkpoint-every", "2"), capsys)
    assert rc == 0, err
    done = int(err.split("resuming the statistics pass from ")[1].split(": ")[1].split(" of ")[0])
    assert 0 < done <= 40 and "of 40 examples already done" in err
    assert not os.path.exists(str(stats) + cli.PARTIAL_SUFFIX) and os.path.exists(stats)
    report = json.load(open(os.path.join(out, cli.REPORT_FILE)))
    assert report["statistics_cache"]["resumed_from_examples"] == done


def test_sigint_mid_pass_then_resume_is_bit_identical(cache, long_data, reference, tmp_path, capsys):
    rc, stats, partial, out, err = _start_and_stop(cache, long_data, tmp_path, signal.SIGINT)
    last = err.strip().splitlines()[-1]
    assert rc == 130, err
    assert last.startswith("lora-da-fast: interrupted; no adapter was written; the statistics pass is "
                           f"checkpointed in {partial} (") and last.endswith("rerun the same command to resume")
    assert "Traceback" not in err
    assert not os.path.exists(out) and not os.path.exists(stats) and os.path.exists(partial)
    assert leftovers(tmp_path) == []
    _resume(long_data, stats, out, capsys)
    assert adapter_bytes(out) == reference
    assert leftovers(tmp_path) == []


def test_sigkill_mid_pass_then_resume_is_bit_identical(cache, long_data, reference, tmp_path, capsys):
    rc, stats, partial, out, _ = _start_and_stop(cache, long_data, tmp_path, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not os.path.exists(out) and os.path.exists(partial)
    (tmp_path / f"s.st.partial.tmp-{dead_pid()}").write_bytes(b"half a checkpoint")  # killed mid-write
    _resume(long_data, stats, out, capsys)
    assert adapter_bytes(out) == reference
    assert leftovers(tmp_path) == []


def test_sigterm_then_resume_and_mismatched_checkpoint(cache, long_data, reference, tmp_path, capsys, monkeypatch):
    """SIGTERM (a scheduler stopping the job) unwinds like Ctrl-C (exit 143); a checkpoint of another
    batch size is refused with what differs; a corrupt one is refused."""
    import lora_da_fast.checkpoint as ckpt

    real_saver = ckpt.saver

    def saver(sp, path, parts, every, *where):
        save = real_saver(sp, path, parts, every, *where)

        def on_batch(done):
            save(done)
            if done >= 6:
                os.kill(os.getpid(), signal.SIGTERM)
        return on_batch

    monkeypatch.setattr(ckpt, "saver", saver)
    stats = tmp_path / "s.st"
    out = tmp_path / "adapter"
    rc, _, err = run(long_args(long_data, out, "--stats-cache", stats, "--checkpoint-every", "2", "--quiet"), capsys)
    monkeypatch.setattr(ckpt, "saver", real_saver)
    assert rc == 143 and err.startswith("lora-da-fast: terminated; no adapter was written; the statistics pass is "
                                        "checkpointed in") and "(6 of 40 examples done)" in err, err
    partial = str(stats) + cli.PARTIAL_SUFFIX
    keep = open(partial, "rb").read()
    keep_partial = tmp_path / "kept.partial"
    shutil.copy(partial, keep_partial)
    rc, _, err = run(long_args(long_data, out, "--stats-cache", stats, "--quiet", "--batch-size", "4"), capsys)
    assert_user_error(rc, err, "differs in: batching (batch size, sort order, backend, layers per pass)")
    assert "rerun with the same settings to resume, or delete it" in err and open(partial, "rb").read() == keep
    _resume(long_data, stats, out, capsys)
    assert adapter_bytes(out) == reference

    shutil.copy(keep_partial, partial)
    rc, _, err = run(long_args(long_data, tmp_path / "a2", "--stats-cache", partial, "--quiet"), capsys)
    assert_user_error(rc, err, f"is the checkpoint of an unfinished pass: give --stats-cache {stats} to resume it")
    with open(partial, "wb") as f:
        f.write(b"garbage")
    rc, _, err = run(long_args(long_data, tmp_path / "a2", "--stats-cache", tmp_path / "s.st", "--quiet",
                               "--overwrite"), capsys)
    assert rc == 0  # the finished FILE exists: the stray checkpoint is not even read
    os.remove(stats)
    rc, _, err = run(long_args(long_data, tmp_path / "a3", "--stats-cache", stats, "--quiet"), capsys)
    assert_user_error(rc, err, "is not a readable statistics checkpoint")


def test_failed_save_of_the_statistics_keeps_the_checkpoint(cache, long_data, reference, tmp_path, capsys,
                                                            monkeypatch):
    """The checkpoint is removed only after FILE is written: a failure in between loses nothing."""
    def full_disk(stats, path):
        raise ConfigError(f"cannot write the statistics file {path} (No space left on device)")

    monkeypatch.setattr(FisherStatistics, "save", full_disk)
    stats, out = tmp_path / "s.st", tmp_path / "adapter"
    rc, _, err = run(long_args(long_data, out, "--stats-cache", stats, "--checkpoint-every", "4", "--quiet"), capsys)
    assert_user_error(rc, err, "No space left on device")
    assert os.path.exists(str(stats) + cli.PARTIAL_SUFFIX) and not os.path.exists(stats) and not os.path.exists(out)
    monkeypatch.undo()
    _resume(long_data, stats, out, capsys)
    assert adapter_bytes(out) == reference


# --------------------------------------------------------------------------------------------------
# Determinism


def test_same_inputs_same_adapter_bits_and_seed_does_not_move_the_subspace(cache, data, tmp_path, capsys):
    from safetensors.torch import load_file

    stats = tmp_path / "s.st"
    for name, extra in (("a", ["--stats-cache", stats, "--checkpoint-every", "1"]), ("b", [])):
        rc, _, err = run(args(data, tmp_path / name, "--quiet", *extra), capsys)
        assert rc == 0, err
    assert adapter_bytes(tmp_path / "a") == adapter_bytes(tmp_path / "b")  # checkpointing changes no bit
    rc, _, err = run(args(data, tmp_path / "c", "--quiet", "--seed", "12345", "--stats-cache", stats), capsys)
    assert rc == 0, err
    ta = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    tc = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    for key in ta:
        if not key.endswith("lora_A.weight"):
            continue
        A0, A1 = ta[key].double(), tc[key].double()
        P0 = A0.T @ torch.linalg.solve(A0 @ A0.T, A0)  # projector onto the subspace (row space of lora_A)
        P1 = A1.T @ torch.linalg.solve(A1 @ A1.T, A1)
        assert torch.allclose(P0, P1, atol=1e-6), key
        kb = key.replace("lora_A", "lora_B")
        BA0, BA1 = ta[kb].double() @ A0, tc[kb].double() @ A1
        assert torch.allclose(BA0, BA1, rtol=1e-5, atol=1e-6 * float(BA0.abs().max())), kb


# --------------------------------------------------------------------------------------------------
# Fuzz: the JSONL loader never fails with anything but DataError


lone_surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | lone_surrogates
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                              max_size=3),
                           max_leaves=8)
json_records = st.fixed_dictionaries({}, optional={"text": json_values, "prompt": json_values,
                                                   "response": json_values, "id": json_values})
json_lines = st.lists(st.one_of(json_records.map(json.dumps), json_values.map(json.dumps),
                                st.text(max_size=30)), max_size=6)


def _check_reader(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "d.jsonl")
        with open(path, "wb") as f:
            f.write(raw)
        try:
            records, lines = bi.read_jsonl_lines(path)
        except DataError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(f"--data {path}")
            return
    assert records and len(records) == len(lines) == len(set(lines))
    for r in records:
        assert set(r) in ({"text"}, {"prompt", "response"}) and all(isinstance(v, str) for v in r.values())


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_reader_random_bytes(raw):
    _check_reader(raw)


@settings(max_examples=150, deadline=None)
@given(json_lines, st.sampled_from(["\n", "\r\n", "\n\n"]))
def test_fuzz_reader_random_json(lines, sep):
    _check_reader(sep.join(lines).encode("utf-8", "surrogatepass"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.fixed_dictionaries({"text": st.text(max_size=30)}) |
                st.fixed_dictionaries({"prompt": st.text(max_size=10), "response": st.text(max_size=10)}),
                min_size=1, max_size=5),
       st.booleans())
def test_fuzz_reader_round_trip(records, ascii_only):
    body = "\n".join(json.dumps(dict(r, extra=1), ensure_ascii=ascii_only) for r in records)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "d.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.write(body)
        assert bi.read_jsonl(path) == records  # also with raw U+2028 and friends inside strings


@pytest.fixture(scope="module")
def unloadable_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("unloadable")
    (d / "config.json").write_text("{}")
    return str(d)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(raw=b'{"text": "fine"}\n')
@example(raw=b'{"text": "fine"}\n{"text": 1}\n')
@given(raw=st.one_of(st.binary(max_size=120),
                     json_lines.map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))))
def test_fuzz_cli_data_path(raw, unloadable_model, capsys):
    """The CLI reads --data before loading the model: bad data is a one-line error, good data reaches
    the (unloadable) model, a one-line error too. Never a traceback, never exit 1."""
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "d.jsonl")
        with open(data, "wb") as f:
            f.write(raw)
        rc, stdout, err = run(["init", "--model", unloadable_model, "--data", data, "--out", os.path.join(d, "o"),
                               "--device", "cpu", "--quiet"], capsys)
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"--data {data}" in err or f"--model {unloadable_model}" in err, err
        assert not os.path.exists(os.path.join(d, "o"))
