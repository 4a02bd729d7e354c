"""CLI errors (issues 8 and 14): bad input of every kind is one line on stderr and exit status 2, never a
traceback, and nothing a user had is touched; internal errors exit 1 pointing to a traceback file; limits
of the model (positions, embedding rows), settings that break the factors (--beta, --gamma), numerical
trouble named by module and data line. Runs on CPU with the built-in ``tiny-llama`` and small JSONL files.
"""
import json
import os
import re
import shutil
import tempfile

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lora_da_fast.cli import builtins as bi  # noqa: E402
from lora_da_fast import cli  # noqa: E402
from lora_da_fast.fisher import FisherStatistics  # noqa: E402

from .cli_helpers import (args, assert_user_error, cache, data, leftovers, run, stats_run,  # noqa: E402,F401
                          tiny_cache, write_jsonl)


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
    (tmp / "notes.txt").write_text("the user's notes")
    (tmp / "mine.st.partial").write_text("the user's file, not a checkpoint")
    (tmp / "with_data").mkdir()  # an adapter folder that holds the run's own data
    (tmp / "with_data" / "adapter_config.json").write_text("{}")
    (tmp / "with_data" / "calib.jsonl").write_text('{"text": "the movie was great fun"}\n')
    (tmp / "exists" / "model").mkdir()
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
        "targets one of two unknown": (args(d, never, "--target-modules", "q_proj,foo"),
                                       "target module name(s) 'foo' match no module"),
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
        "device meta": (args(d, never, "--device", "meta"), "--device meta holds no data"),
        "seed beyond 2**64": (args(d, never, "--seed", str(10 ** 30)),
                              "--seed: expected an integer from 0 to 18446744073709551615"),
        "seed not an integer": (args(d, never, "--seed", "1e30"), "--seed: expected an integer from 0 to"),
        "seed negative": (args(d, never, "--seed", "-1"), "--seed: expected an integer from 0 to"),
        "dtype": (args(d, never, "--dtype", "float8"), "invalid choice"),
        # output and statistics cache
        "out missing": (["init", "--model", "tiny-llama", "--data", d], "--out"),
        "out exists": (args(d, tmp / "exists"), "exists; add --overwrite to replace it"),
        "out is a file": (args(d, tmp / "afile", "--overwrite"), "exists and is not a folder"),
        "out holds no adapter": (args(d, tmp / "precious", "--overwrite"), "non-empty folder that holds no adapter"),
        "out under a file": (args(d, tmp / "afile" / "adapter"), "is not a folder"),
        "stats cache is a folder": (args(d, never, "--stats-cache", tmp / "empty_dir"), "is a folder; give a file"),
        "stats cache not statistics": (args(d, never, "--stats-cache", tmp / "garbage.stats"),
                                       "exists and is not a lora_da_fast statistics file (it holds something "
                                       "else, left as it is): give a new path for the statistics"),
        "stats cache is a user's file": (args(d, never, "--stats-cache", tmp / "notes.txt"),
                                         "is not a lora_da_fast statistics file"),
        "stats cache is the data": (args(d, never, "--stats-cache", d), "is the --data file: give another path"),
        "stats cache checkpoint is a user's file": (args(d, never, "--stats-cache", tmp / "mine.st"),
                                                    "mine.st.partial exists and is not a lora_da_fast checkpoint: "
                                                    "the statistics pass would overwrite it; move it away"),
        "stats cache under a file": (args(d, never, "--stats-cache", tmp / "afile" / "s.st"), "is not a folder"),
        "stats cache is out": (args(d, never, "--stats-cache", never), f"--stats-cache {never} is --out {never}"),
        "stats cache inside out": (args(d, tmp / "exists", "--overwrite", "--stats-cache", tmp / "exists" / "s.st"),
                                   "is inside --out"),
        "data inside out": (args(tmp / "with_data" / "calib.jsonl", tmp / "with_data", "--overwrite"),
                            f"--data {tmp / 'with_data' / 'calib.jsonl'} is inside --out {tmp / 'with_data'}: the "
                            "run's inputs may not live in the folder it writes the adapter to"),
        "model inside out": (["init", "--model", tmp / "exists" / "model", "--data", d, "--out", tmp / "exists",
                              "--overwrite"], "is inside --out"),
        "checkpoint every zero": (args(d, never, "--checkpoint-every", "0"), "--checkpoint-every"),
    }


def _case_ids():
    # the case names, for parametrize (the cases themselves are built per test, in its tmp_path)
    from pathlib import Path

    with tempfile.TemporaryDirectory() as t:
        return list(_bad_cases(Path(t), "d.jsonl"))


def snapshot(folder):
    """Every path under ``folder`` with its bytes (None for a folder)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in dirs:
            out[os.path.relpath(os.path.join(root, n), folder)] = None
        for n in files:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), folder)] = f.read()
    return out


@pytest.mark.parametrize("case", _case_ids())
def test_bad_input_one_line_exit_2(case, cache, data, tmp_path, capsys):
    argv, match = _bad_cases(tmp_path, data)[case]
    before, data_bytes = snapshot(tmp_path), open(data, "rb").read()
    rc, stdout, err = run(argv + ["--quiet"], capsys)
    assert_user_error(rc, err, match)
    assert stdout == ""
    assert not re.search(r"delete \S+ (and|to|or) ", err)  # no advice to delete: none is a damaged file of ours
    assert not os.path.exists(tmp_path / "never")
    assert snapshot(tmp_path) == before and open(data, "rb").read() == data_bytes  # nothing touched
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
    assert_user_error(rc, err, "config.json: permission denied")
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



# --------------------------------------------------------------------------------------------------
# Internal errors, out of memory, interruption


def test_internal_error_exit_1_with_traceback_file(cache, data, tmp_path, capsys, monkeypatch):
    import lora_da_fast.engine as solver

    def boom(*a, **k):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(solver, "solve_lora_da", boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rc, _, err = run(args(data, tmp_path / "o", "--quiet"), capsys)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "internal error: RuntimeError at test_cli_errors.py:" in err and "something unexpected" in err
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
    z = stats.dense_Z(group) if hasattr(stats, "dense_Z") else stats.Z[group]  # whatever the stored layout
    z = z - 3e-4 * torch.eye(z.shape[0])  # indefinite: needs damping 1e-3 to factorise
    stats = FisherStatistics(stats.modules, {**stats.Z, group: z}, stats.num_examples, stats.num_tokens,
                             stats.num_skipped, stats.token_mask, stats.output_fisher, stats.meta)
    stats.save(str(f))  # the fingerprint (meta) is kept: same model and data
    rc, stdout, err = run(args(data, tmp_path / "o", "--stats-cache", f), capsys)
    assert rc == 0, err
    mod = json.load(open(tmp_path / "o" / cli.REPORT_FILE))["modules"]["model.layers.1.mlp.down_proj"]
    assert mod["damping"] == pytest.approx(1e-3)
    assert any(n.startswith("damping raised from 1e-06 to 0.001 after a failed Cholesky") for n in mod["notes"])
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



def test_float32_overflow_does_not_advise_float32(cache, data, tmp_path, capsys):
    """The fp16 advice "try --dtype float32" is replaced when the run already was float32."""
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "hot32"
    shutil.copytree(bi.tiny_llama_folder(), model_dir)
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # MLP activations of layer 1 beyond float32's range (3.4e38)
        m.model.layers[1].mlp.up_proj.weight.mul_(1e20)
        m.model.layers[1].mlp.gate_proj.weight.mul_(1e20)
    m.save_pretrained(model_dir)
    capsys.readouterr()
    rc, _, err = run(["init", "--model", model_dir, "--data", data, "--out", tmp_path / "o", "--rank", "4",
                      "--max-length", "32", "--batch-size", "1", "--device", "cpu", "--quiet"], capsys)
    assert_user_error(rc, err, "non-finite values first appear in the output of module model.layers.1.mlp.")
    assert "try --dtype float32" not in err and "the model already runs in float32" in err
    assert not os.path.exists(tmp_path / "o")


# --------------------------------------------------------------------------------------------------
# Limits of the model: learned positions, embedding rows (exit 2 naming the limit, before the pass)


@pytest.fixture(scope="module")
def gpt2_folders(tmp_path_factory):
    """Two GPT-2 folders with the byte-level tokenizer: 16 learned positions; an embedding of 100 rows
    (the tokenizer's ids go up to 259)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = bi.byte_level_tokenizer()
    root = tmp_path_factory.mktemp("gpt2")
    for name, vocab, positions in (("short", len(tok), 16), ("small_vocab", 100, 64)):
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=positions,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        GPT2LMHeadModel(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_model_limits_are_named_before_the_pass(gpt2_folders, data, tmp_path, capsys):
    def argv(model, out, *extra):
        return ["init", "--model", gpt2_folders / model, "--data", data, "--out", tmp_path / out, "--rank", "2",
                "--batch-size", "3", "--device", "cpu", "--quiet", *extra]

    rc, _, err = run(argv("short", "o1", "--max-length", "32"), capsys)
    assert_user_error(rc, err, "--data line ")
    assert ("tokens, more than the model's 16 positions (max_position_embeddings) of "
            f"--model {gpt2_folders / 'short'}: use --max-length 16 or less") in err
    rc, _, err = run(argv("short", "o2", "--max-length", "16"), capsys)  # the advice works
    assert rc == 0, err
    rc, _, err = run(argv("small_vocab", "o3", "--max-length", "32"), capsys)
    assert_user_error(rc, err, f"--model {gpt2_folders / 'small_vocab'}: --data line 1 has token id ")
    assert "outside the model's embedding of 100 rows (ids 0 to 99): the tokenizer does not match" in err
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o3")


# --------------------------------------------------------------------------------------------------
# Settings that break the factors: an error naming module and setting, no adapter (issue 14, point 4)


def test_beta_and_gamma_that_break_the_factors(stats_run, data, tmp_path, capsys):
    f0, _ = stats_run
    f = tmp_path / "s.st"
    shutil.copy(f0, f)
    for option, value, match in (("--beta", "1e308", "are not finite (NaN or inf); likely cause: --beta 1e+308 is "
                                                      "too large"),
                                 ("--gamma", "1e308", "are zero (or below float32's smallest normal number): the "
                                                       "adapter would not train; likely cause: --gamma 1e+308 is "
                                                       "too large")):
        rc, _, err = run(args(data, tmp_path / "o", "--stats-cache", f, "--quiet", option, value), capsys)
        assert_user_error(rc, err, "the LoRA-DA factors of module model.layers.")
        assert match in err
        assert not os.path.exists(tmp_path / "o") and leftovers(tmp_path) == []
    # without a cache: the pass runs, the statistics are saved (they are fine), the adapter is not written
    g = tmp_path / "fresh.st"
    rc, _, err = run(args(data, tmp_path / "o", "--stats-cache", g, "--quiet", "--gamma", "1e308"), capsys)
    assert_user_error(rc, err, "likely cause: --gamma 1e+308")
    assert os.path.exists(g) and not os.path.exists(tmp_path / "o")
    rc, _, err = run(args(data, tmp_path / "o", "--stats-cache", g, "--quiet"), capsys)  # rerun: no pass
    assert rc == 0, err


# --------------------------------------------------------------------------------------------------
# Smaller points (issue 14, point 10)


def test_stats_cache_parent_is_created_and_the_summary(cache, data, tmp_path, capsys):
    stats = tmp_path / "new" / "sub" / "s.st"
    rc, stdout, err = run(args(data, tmp_path / "o", "--stats-cache", stats), capsys)
    assert rc == 0, err
    assert stats.exists()
    assert f"PeftModel.from_pretrained(base, {str(tmp_path / 'o')!r}, is_trainable=True)" in stdout
    report = json.load(open(tmp_path / "o" / cli.REPORT_FILE))
    timings = report["timings_s"]
    assert timings["fingerprint"] > 0 and {"load_model", "tokenize", "statistics", "solve", "save"} <= set(timings)
    assert sum(timings.values()) <= report["wall_time_s"] * 1.05  # phases do not overlap
    assert "fingerprint" in stdout.split("time: ")[1]
