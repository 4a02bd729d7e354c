"""What a run writes, and only that (issue 14): the run removes or renames only paths it created itself
(temporary folders with an owner marker, never a name pattern); ``--out`` is claimed at the end without
replacing a folder that appeared meanwhile; a full disk, a quota or a read-only file system anywhere is
exit 2 with the path and "free space" (a real small tmpfs where this machine lets the tests mount one,
else simulated); a broken stdout after a complete adapter is exit 0 or one line, never a traceback.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors import SafetensorError  # noqa: E402

from lora_da_fast import cli, fileio  # noqa: E402
from lora_da_fast.cli import output, ownership  # noqa: E402
from lora_da_fast.errors import ConfigError  # noqa: E402

from .cli_helpers import (ROOT, adapter_bytes, args, assert_user_error, cache, cache_env, can_mount,  # noqa: E402,F401
                          cli_command, cli_env, data, dead_pid, fake_stale_temporary, leftovers, resize, run,
                          small_disk, tiny_cache)

ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"


class _FakePeft:
    def __init__(self, tag):
        self.tag = tag

    def save_pretrained(self, folder):
        with open(os.path.join(folder, "adapter_model.safetensors"), "w") as f:
            f.write(self.tag)


def _content(folder):
    return open(os.path.join(folder, "adapter_model.safetensors")).read()


@pytest.fixture(params=["swap", "two renames"])
def rename_mode(request, monkeypatch):
    """Both ways of claiming --out: the atomic renameat2 of Linux, and the fallback of systems without it."""
    if request.param == "two renames":
        monkeypatch.setattr(ownership, "_renameat2", None)
    elif ownership._renameat2 is None:
        pytest.skip("renameat2 is not available here")
    return request.param


# --------------------------------------------------------------------------------------------------
# Ownership: only what the run created


def test_only_marked_temporaries_of_dead_runs_are_removed(tmp_path):
    out, stats = tmp_path / "adapter", tmp_path / "s.st"
    dead = dead_pid()
    # names that older versions removed or moved by pattern alone: the user's, never touched
    user_dirs = [tmp_path / "adapter.old-2024", tmp_path / f"adapter.old-{dead}", tmp_path / f".adapter.tmp-{dead}-x1y2"]
    user_files = [tmp_path / "s.st.notes.tmp-2023.txt", tmp_path / f"s.st.tmp-{dead}",
                  tmp_path / f"s.st.partial.tmp-{dead}"]
    users = {}
    for path in user_dirs:
        path.mkdir()
        users[path / "adapter_config.json"] = f"the user's {path.name}"
    for path in user_files:
        users[path] = f"the user's {path.name}"
    for path, text in users.items():
        path.write_text(text)
    stale = fake_stale_temporary(stats)  # a killed run's: removed
    reused = fake_stale_temporary(stats, pid=os.getpid())  # our pid, another run id: an earlier process
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = fake_stale_temporary(stats, pid=sleeper.pid, start=None)  # a live process: kept
        recycled = fake_stale_temporary(stats, pid=sleeper.pid, start="1")  # that pid, another start: gone
        other_host = fake_stale_temporary(stats, host="another-machine")  # cannot tell: kept
        mine = fileio.make_temp_dir(str(out))  # this process's own: kept
        copied = tmp_path / ".s.st.lora-da-tmp-0123456789abcdef"  # a marker whose token is not its name's
        shutil.copytree(stale, copied)
        # a run killed between creating its folder and writing the marker (or between removing the marker
        # and the folder) leaves it empty: removed; the same name holding anything at all, or another name: kept
        empty = tmp_path / ".adapter.lora-da-tmp-00112233445566ff"
        empty.mkdir()
        not_empty = tmp_path / ".adapter.lora-da-tmp-aabbccddeeff0011"
        not_empty.mkdir()
        (not_empty / "x").write_text("something")
        other_name = tmp_path / ".adapter.lora-da-tmp-notours"
        other_name.mkdir()
        removed = output.remove_stale_temporaries(str(out), str(stats))
        assert sorted(removed) == sorted([stale, reused, recycled, str(empty)])
        for kept in (alive, other_host, mine, copied, not_empty, other_name):
            assert os.path.isdir(kept), kept
    finally:
        sleeper.kill()
        sleeper.wait()
    for path, text in users.items():
        assert path.read_text() == text


def test_the_cli_never_touches_the_users_files(cache, data, tmp_path, capsys):
    dead = dead_pid()
    out = tmp_path / "adapter"
    backup = tmp_path / "adapter.old-2024"
    backup.mkdir()
    (backup / "adapter_config.json").write_text("my backup")
    (tmp_path / f"adapter.old-{dead}").mkdir()
    notes = tmp_path / "s.st.notes.tmp-2023.txt"
    notes.write_text("notes")
    (tmp_path / f"s.st.tmp-{dead}").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    stale = fake_stale_temporary(tmp_path / "s.st")
    # a failed run (after the cleanup) and a successful one, without --overwrite
    rc, _, err = run(args(data, out, "--stats-cache", tmp_path / "s.st", "--quiet", "--rank", "40"), capsys)
    assert rc == 2, err
    assert not os.path.exists(stale) and sorted(os.listdir(tmp_path)) == before
    rc, _, err = run(args(data, out, "--stats-cache", tmp_path / "s.st", "--quiet"), capsys)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["adapter", "s.st"])
    assert (backup / "adapter_config.json").read_text() == "my backup" and notes.read_text() == "notes"


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch, rename_mode):
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
    if rename_mode == "swap":
        cli.write_adapter(_FakePeft("new"), {}, out, overwrite=True)  # one atomic swap: nothing to interrupt
        assert _content(out) == "new"
        cli.write_adapter(_FakePeft("old"), {}, out, overwrite=True)
    else:
        with pytest.raises(KeyboardInterrupt):
            cli.write_adapter(_FakePeft("new"), {}, out, overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert _content(out) == "old"
    assert leftovers(tmp_path) == []
    cli.write_adapter(_FakePeft("new"), {}, out, overwrite=True)
    assert _content(out) == "new"
    assert leftovers(tmp_path) == []


def test_killed_between_the_two_renames_puts_the_adapter_back(tmp_path):
    """SIGKILL after the previous adapter was moved into the run's temporary folder: the next run puts it
    back; if something else took its place meanwhile, both are kept."""
    out = tmp_path / "adapter"
    for something_there in (False, True):
        cli.write_adapter(_FakePeft("previous"), {}, str(out), overwrite=True)
        tmp = fake_stale_temporary(out, out=str(out))
        os.rename(out, os.path.join(tmp, "old"))
        if something_there:
            out.mkdir()
            (out / "x").write_text("new thing")
        notes = []
        output.remove_stale_temporaries(str(out), None, notes.append)
        assert not os.path.exists(tmp)
        if not something_there:
            assert _content(out) == "previous" and "put back" in notes[0]
        else:
            kept = [p for p in os.listdir(tmp_path) if p.startswith("adapter.previous-")]
            assert (out / "x").read_text() == "new thing" and len(kept) == 1
            assert _content(tmp_path / kept[0]) == "previous" and kept[0] in notes[0]


# --------------------------------------------------------------------------------------------------
# Claiming --out at the end


def test_claim_never_replaces_what_appeared(tmp_path, rename_mode):
    out = str(tmp_path / "adapter")
    os.mkdir(out)  # appeared during the run (after the start check)
    with pytest.raises(ConfigError, match="appeared while the run was going") as e:
        cli.write_adapter(_FakePeft("new"), {}, out, overwrite=False)
    kept = str(e.value).split("the new adapter was saved to ")[1].split(";")[0]
    assert os.listdir(out) == [] and _content(kept) == "new"
    assert [p for p in leftovers(tmp_path)] == [os.path.basename(kept)]
    shutil.rmtree(kept)
    with open(os.path.join(out, "thesis.tex"), "w") as f:  # with --overwrite: only an adapter folder goes
        f.write("mine")
    with pytest.raises(ConfigError, match="changed while the run was going and now is a non-empty folder that "
                                          "holds no adapter: not replacing it"):
        cli.write_adapter(_FakePeft("new"), {}, out, overwrite=True)
    assert os.listdir(out) == ["thesis.tex"]
    assert len([p for p in os.listdir(tmp_path) if p.startswith("adapter.new-")]) == 1


def _during_run(monkeypatch, action):
    """Run ``action()`` right after the statistics pass and the solve of the next CLI run."""
    import lora_da_fast.cli.init as init

    real = init.execute

    def wrapped(*a, **k):
        result = real(*a, **k)
        action()
        return result
    monkeypatch.setattr(init, "execute", wrapped)


def test_out_that_appears_during_the_run(cache, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "adapter"
    # another run (other settings) finished first on the same --out: refused, both adapters kept
    rc, _, err = run(args(data, tmp_path / "first", "--quiet", "--rank", "2"), capsys)
    assert rc == 0, err
    first = adapter_bytes(tmp_path / "first")
    _during_run(monkeypatch, lambda: shutil.copytree(tmp_path / "first", out))
    rc, _, err = run(args(data, out, "--quiet"), capsys)
    assert_user_error(rc, err, f"--out {out} appeared while the run was going (another run or program created it): "
                               "it was left as it is, and the new adapter was saved to ")
    assert adapter_bytes(out) == first
    kept = err.split("the new adapter was saved to ")[1].split(";")[0]
    assert json.load(open(os.path.join(kept, cli.REPORT_FILE)))["lora_config"]["r"] == 4
    assert leftovers(tmp_path) == [os.path.basename(kept)]
    # with --overwrite, an adapter folder that appeared is replaced (it is what --overwrite allows)
    shutil.rmtree(kept)
    shutil.rmtree(out)
    rc, _, err = run(args(data, out, "--quiet", "--overwrite"), capsys)
    assert rc == 0, err
    assert json.load(open(out / cli.REPORT_FILE))["lora_config"]["r"] == 4 and leftovers(tmp_path) == []


def test_two_processes_on_one_out(cache, data, tmp_path):
    """Two real runs with different settings on the same --out, started together: one exits 0, the other
    2, and --out holds the first one's adapter, complete."""
    out = tmp_path / "adapter"
    procs = [subprocess.Popen(cli_command(*args(data, out, "--quiet", "--rank", r)), cwd=ROOT, env=cli_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ("2", "4")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert loser.count("\n") == 1 and ("appeared while the run was going" in loser or "exists; add --overwrite" in loser)
    winner_rank = [r for (rc, _), r in zip(results, (2, 4)) if rc == 0][0]
    assert json.load(open(out / cli.REPORT_FILE))["lora_config"]["r"] == winner_rank
    assert all(p.startswith("adapter.new-") for p in leftovers(tmp_path))


# --------------------------------------------------------------------------------------------------
# Full disk, quota, read-only: exit 2 with the path and "free space"


def test_full_disk_simulated(cache, data, tmp_path, capsys, monkeypatch):
    """Every library raises its own way (safetensors: SafetensorError, Python: OSError): the same answer."""
    import peft
    import transformers

    import lora_da_fast.checkpoint as ckpt

    def raise_(exc):
        def f(*a, **k):
            raise exc
        return f

    with monkeypatch.context() as m:  # the adapter: safetensors full
        m.setattr(peft.PeftModel, "save_pretrained", raise_(SafetensorError(ENOSPC_SAFETENSORS)))
        rc, _, err = run(args(data, tmp_path / "o", "--quiet"), capsys)
        assert_user_error(rc, err, f"cannot write the adapter {tmp_path / 'o'} (no space left on device); free space")
    with monkeypatch.context() as m:  # a checkpoint: over quota
        m.setattr(ckpt, "save_file", raise_(OSError(122, "Disk quota exceeded")))
        rc, _, err = run(args(data, tmp_path / "o", "--quiet", "--stats-cache", tmp_path / "s.st",
                              "--checkpoint-every", "1"), capsys)
        assert_user_error(rc, err, f"cannot write the statistics checkpoint {tmp_path / 's.st.partial'} (disk quota "
                                   "exceeded); free space")
        assert "to resume" not in err  # no checkpoint was written: nothing to resume from
    with monkeypatch.context() as m:  # the built-in model's cache: read-only
        m.setattr(transformers.LlamaForCausalLM, "save_pretrained", raise_(OSError(30, "Read-only file system")))
        with cache_env(tmp_path / "fresh_cache"):
            rc, _, err = run(args(data, tmp_path / "o", "--quiet"), capsys)
        assert_user_error(rc, err, "read-only file system during load_model (building the built-in model tiny-llama "
                                   f"in {tmp_path / 'fresh_cache'}): free space there, or set LORA_DA_FAST_CACHE")
    assert not os.path.exists(tmp_path / "o") and leftovers(tmp_path) == []


@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root (the simulated test covers the rest)")
def test_full_disk_on_a_real_small_tmpfs(cache, data, tmp_path, capsys):
    # --out on a disk too small for the adapter
    with small_disk(tmp_path / "tiny", 24) as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here")
        rc, _, err = run(args(data, disk / "adapter", "--quiet"), capsys)
        assert_user_error(rc, err, f"cannot write the adapter {disk / 'adapter'} (no space left on device); free space")
        assert os.listdir(disk) == []
    # the built-in model's cache on a full disk
    with small_disk(tmp_path / "model_cache", 64) as disk, cache_env(disk):
        rc, _, err = run(args(data, tmp_path / "o", "--quiet"), capsys)
        assert_user_error(rc, err, "no space left on device")
        assert "building the built-in model tiny-llama" in err and "LORA_DA_FAST_CACHE" in err
    # --stats-cache on a read-only disk: refused before any work
    with small_disk(tmp_path / "ro", 64, read_only=True) as disk:
        rc, _, err = run(args(data, tmp_path / "o", "--quiet", "--stats-cache", disk / "s.st"), capsys)
        assert_user_error(rc, err, "is not writable")
    # --stats-cache on a disk with room for one checkpoint but not two: the second write fails; the first is
    # resumed once there is space, and the adapter is the one of an uninterrupted run (which also measures
    # the size of a checkpoint: its statistics file is as large)
    rc, _, err = run(args(data, tmp_path / "reference", "--quiet", "--stats-cache", tmp_path / "ref.st"), capsys)
    assert rc == 0, err
    size_kb = os.path.getsize(tmp_path / "ref.st") // 1024
    with small_disk(tmp_path / "half", size_kb * 3 // 2 + 16) as disk:
        argv = args(data, tmp_path / "o", "--stats-cache", disk / "s.st", "--checkpoint-every", "1", "--quiet")
        rc, _, err = run(argv, capsys)
        assert_user_error(rc, err, f"cannot write the statistics checkpoint {disk / 's.st.partial'} (no space left on "
                                   "device); free space on that disk")
        assert err.rstrip().endswith("examples done): free space, then rerun the same command to resume")
        assert sorted(os.listdir(disk)) == ["s.st.partial"] and not os.path.exists(tmp_path / "o")
        resize(disk, size_kb * 4)
        rc, _, err = run(argv, capsys)
        assert rc == 0, err
        assert sorted(os.listdir(disk)) == ["s.st"]
    assert adapter_bytes(tmp_path / "o") == adapter_bytes(tmp_path / "reference")
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Broken output streams after a complete adapter


def test_broken_stdout_after_a_complete_adapter(cache, data, tmp_path):
    """``--json | head -c1`` (a reader gone), a closed stdout and /dev/full, in real processes (run side by
    side): exit 0, or one line and exit 2; never a traceback; the adapter is complete each time."""
    env = cli_env(cache)
    procs = {}
    r, w = os.pipe()
    procs["reader gone"] = subprocess.Popen(cli_command(*args(data, tmp_path / "a", "--quiet", "--json")), cwd=ROOT,
                                            env=env, stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    os.close(r)  # nobody reads: the first write fails (EPIPE), as after `head -c1` exited
    command = " ".join(f"'{a}'" for a in cli_command(*args(data, tmp_path / "b")))
    procs["closed"] = subprocess.Popen(["bash", "-c", f"exec {command} >&-"], cwd=ROOT, env=env,
                                       stderr=subprocess.PIPE, text=True)
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            procs["full"] = subprocess.Popen(cli_command(*args(data, tmp_path / "c", "--quiet", "--json")), cwd=ROOT,
                                             env=env, stdout=full, stderr=subprocess.PIPE, text=True)
    results = {k: (p.wait(timeout=300), p.stderr.read()) for k, p in procs.items()}
    for name, (rc, err) in results.items():
        assert "Traceback" not in err and "Exception ignored" not in err, (name, err)
    assert results["reader gone"] == (0, "")
    assert results["closed"][0] == 0
    if "full" in results:
        rc, err = results["full"]
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith("lora-da-fast: error: cannot write the report to stdout (no space left on device); "
                              f"the adapter is complete: {tmp_path / 'c'}")
    for folder in ("a", "b", "c")[:len(results)]:
        assert {"adapter_config.json", "adapter_model.safetensors", cli.REPORT_FILE} <= set(os.listdir(tmp_path / folder))
