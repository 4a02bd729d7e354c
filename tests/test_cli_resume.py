"""The statistics cache and the checkpointed pass (issues 8 and 14): reuse and refusal by fingerprint;
interruption (SIGINT, SIGKILL, SIGTERM) and resume, bit-identical to an uninterrupted run; damaged files
(flipped bits, edited counters, wrong shapes, truncation) reported as damaged, never trusted nor saved
again; determinism. Runs on CPU with the built-in ``tiny-llama`` and small JSONL files.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lora_da_fast import cli  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from lora_da_fast.fisher import FisherStatistics  # noqa: E402

from .cli_helpers import (ROOT, adapter_bytes, args, assert_user_error, cache, data, dead_pid,  # noqa: E402,F401
                          fake_stale_temporary, leftovers, long_args, long_data, run, stats_run, tiny_cache)
from .helpers import interrupt_after  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Statistics cache: fingerprint, reuse, refusal


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
# Interruption and resume


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
    fake_stale_temporary(partial)  # killed mid-write: the run's marked temporary folder, removed by the next run
    users = tmp_path / f"s.st.partial.tmp-{dead_pid()}"  # a name older versions deleted: not ours, kept
    users.write_bytes(b"the user's")
    _resume(long_data, stats, out, capsys)
    assert adapter_bytes(out) == reference
    assert leftovers(tmp_path) == [users.name] and users.read_bytes() == b"the user's"


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
    assert_user_error(rc, err, f"{partial} exists and is not a lora_da_fast checkpoint: the statistics pass would "
                               "overwrite it; move it away")
    assert open(partial, "rb").read() == b"garbage"  # not ours: left as it is, no advice to delete it


def test_failed_save_of_the_statistics_keeps_the_checkpoint(cache, long_data, reference, tmp_path, capsys,
                                                            monkeypatch):
    """The checkpoint is removed only after FILE is written: a failure in between (a full disk, simulated:
    safetensors raises its own error type) loses nothing, and says where a resume starts."""
    import lora_da_fast.fisher as fisher

    def full_disk(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(fisher, "save_file", full_disk)
    stats, out = tmp_path / "s.st", tmp_path / "adapter"
    rc, _, err = run(long_args(long_data, out, "--stats-cache", stats, "--checkpoint-every", "4", "--quiet"), capsys)
    assert_user_error(rc, err, f"cannot write the statistics file {stats} (no space left on device); free space on "
                               "that disk (or make it writable) or choose another path; the statistics pass is "
                               f"checkpointed in {stats}.partial (40 of 40 examples done): free space, then rerun "
                               "the same command to resume")
    assert os.path.exists(str(stats) + cli.PARTIAL_SUFFIX) and not os.path.exists(stats) and not os.path.exists(out)
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    _resume(long_data, stats, out, capsys)
    assert adapter_bytes(out) == reference


def test_a_checkpoint_left_beside_finished_statistics_is_removed(stats_run, data, tmp_path, capsys):
    """A run stopped between saving FILE and removing FILE.partial (found by the kill loop) leaves an obsolete
    checkpoint: the next run that loads FILE removes it, and those of other rank counts, never another file."""
    from safetensors.torch import save_file
    from lora_da_fast.checkpoint import _META_KEY, is_checkpoint_file

    f0, a0 = stats_run
    f = tmp_path / "s.st"
    shutil.copy(f0, f)
    stale = [str(f) + cli.PARTIAL_SUFFIX, str(f) + cli.PARTIAL_SUFFIX + ".rank1"]
    for p in stale:
        save_file({"x": torch.zeros(1)}, p, metadata={_META_KEY: "{}"})
        assert is_checkpoint_file(p)
    mine = tmp_path / ("s.st" + cli.PARTIAL_SUFFIX + ".rank1.notes")
    mine.write_text("mine")
    rc, _, err = run(args(data, tmp_path / "a", "--stats-cache", f, "--quiet"), capsys)
    assert rc == 0, err
    assert adapter_bytes(tmp_path / "a") == adapter_bytes(a0)
    assert not any(os.path.exists(p) for p in stale) and mine.read_text() == "mine"


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
# Damaged files: reported as damaged (exit 2, "delete FILE and rerun"), never trusted nor saved again


def _rewrite_header(src, dst, edit):
    """Copy the safetensors file ``src`` to ``dst`` with its lora_da_fast header edited by ``edit(header)``
    and the tensors unchanged (the checksum is not updated: as a hand edit would)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(iter(meta))
    header = json.loads(meta[key])
    edit(header)
    save_file(tensors, str(dst), metadata={key: json.dumps(header)})


def _flip_last_byte(path):
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 0x10  # a bit of the last tensor's data
    open(path, "wb").write(bytes(raw))


def test_damaged_statistics_cache_is_reported(stats_run, data, tmp_path, capsys):
    f0, _ = stats_run
    f = tmp_path / "s.st"
    raw = open(f0, "rb").read()

    def flipped():
        f.write_bytes(raw)
        _flip_last_byte(f)

    def counters():
        _rewrite_header(f0, f, lambda h: h.update(num_examples=h["num_examples"] + 1))

    def truncated():
        f.write_bytes(raw[:len(raw) // 2])

    def wrong_shape():  # written through the API (a valid checksum): caught by the schema check
        stats = FisherStatistics.load(str(f0))
        st = stats.modules["model.layers.0.mlp.up_proj"]
        stats.modules["model.layers.0.mlp.up_proj"] = type(st)(st.group, st.G, st.y[:1], st.seq_sums)
        stats.save(str(f))

    cases = [(flipped, "content checksum mismatch: the file changed after it was written"),
             (counters, "content checksum mismatch"),
             (truncated, "unreadable"),
             (wrong_shape, "module model.layers.0.mlp.up_proj: gradient [128, 64] and output moment [1] do not fit")]
    for make, why in cases:
        make()
        before = open(f, "rb").read()
        rc, _, err = run(args(data, tmp_path / "o", "--stats-cache", f, "--quiet"), capsys)
        assert_user_error(rc, err, f"--stats-cache {f} is damaged (")
        assert why in err and err.rstrip().endswith(f"delete {f} and rerun"), (make.__name__, err)
        assert open(f, "rb").read() == before and not os.path.exists(tmp_path / "o")
    os.remove(f)
    rc, _, err = run(args(data, tmp_path / "o", "--stats-cache", f, "--quiet"), capsys)  # the advice works
    assert rc == 0, err


def test_damaged_checkpoint_is_reported_and_not_resumed(cache, long_data, tmp_path, capsys, monkeypatch):
    interrupt_after(monkeypatch, 6)
    stats, out = tmp_path / "s.st", tmp_path / "adapter"
    argv = long_args(long_data, out, "--stats-cache", stats, "--checkpoint-every", "2", "--quiet")
    rc, _, err = run(argv, capsys)
    assert rc == 130, err
    monkeypatch.undo()
    partial = str(stats) + cli.PARTIAL_SUFFIX
    good = open(partial, "rb").read()
    for damage, why in ((_flip_last_byte, "content checksum mismatch"),
                        (lambda p: _rewrite_header(p, p, lambda h: h.update(n=h["n"] + 1, T=h["T"] + 9)),
                         "content checksum mismatch")):
        open(partial, "wb").write(good)
        damage(partial)
        before = open(partial, "rb").read()
        rc, _, err = run(argv, capsys)
        assert_user_error(rc, err, f"{partial} is damaged ({why}")
        assert err.rstrip().endswith(f"delete {partial} and rerun (the statistics pass starts again)")
        assert "to resume" not in err  # a resume from it cannot succeed: no such hint
        assert not os.path.exists(stats) and not os.path.exists(out)  # damaged sums never saved as FILE
        assert open(partial, "rb").read() == before
    os.remove(partial)
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
