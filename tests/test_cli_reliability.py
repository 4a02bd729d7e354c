"""Reliability III (issue 23), the command line's side: ``--overwrite`` replaces only an adapter's files and
keeps everything else in ``--out``; every exit says what is on disk (an interrupt once the adapter is in
place, an interrupt during start-up); the report is written once, with the adapter; ``--stats-cache``
through a symbolic link; a LoRA scaling beyond float32; ``--data`` read within a bound; unreadable files
named as such; a read-only statistics cache; custom code in a model folder; and the kill loop (SIGKILL,
SIGTERM, SIGINT at random moments, also right after the final rename, then a rerun to completion).
Runs on CPU with the built-in ``tiny-llama``; process-level behaviour in real subprocesses.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lora_da_fast import cli  # noqa: E402
from lora_da_fast.cli import output  # noqa: E402
from lora_da_fast.errors import ConfigError  # noqa: E402

from .cli_helpers import (ROOT, adapter_bytes, args, assert_user_error, cache, cli_command,  # noqa: E402,F401
                          cli_env, data, leftovers, long_args, long_data, run, small_disk, stats_run, tiny_cache)

REPORT = cli.REPORT_FILE
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", REPORT)  # what a run writes
ADAPTER_NAMES = ADAPTER_FILES + ("adapter_model.bin",)  # and what it may replace (an older PEFT's weights)
HAS_PROC = os.path.exists("/proc/self/maps")


def snapshot(folder):
    """Every path under ``folder`` with its bytes (None for a folder, the target for a link)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = None
            else:
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


def _not_adapter(snap):
    return {k: v for k, v in snap.items() if k.split(os.sep)[0] not in ADAPTER_NAMES}


@pytest.fixture(scope="module")
def reference(cache, data, tmp_path_factory):
    """The adapter folder of an uninterrupted run into a new --out."""
    out = tmp_path_factory.mktemp("reference") / "adapter"
    assert cli.main([str(a) for a in args(data, out, "--quiet")]) == 0
    return out


def _trainer_folder(path, tag="old"):
    """A Trainer's output folder as PEFT leaves it (an adapter among other things), with the user's notes."""
    (path / "checkpoint-500").mkdir(parents=True)
    (path / "checkpoint-500" / "optimizer.pt").write_bytes(b"optimizer state")
    (path / "trainer_state.json").write_text('{"global_step": 500}')
    (path / "notes.md").write_text("lr 2e-4 was best")
    (path / "README.md").write_text("# my model card")
    (path / "adapter_config.json").write_text(tag)
    (path / "adapter_model.safetensors").write_text(tag)
    (path / REPORT).write_text(json.dumps({"tag": tag}))
    (path / "adapter_model.bin").write_text(tag)


# --------------------------------------------------------------------------------------------------
# 1. --overwrite replaces the adapter's files only


def test_overwrite_replaces_only_the_adapter_files(cache, data, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "trainer"
    _trainer_folder(out)
    kept = _not_adapter(snapshot(out))
    rc, _, err = run(args(data, out, "--overwrite"), capsys)
    assert rc == 0, err
    after = snapshot(out)
    assert _not_adapter(after) == kept  # byte for byte
    assert (f"note: --out {out} also holds README.md, checkpoint-500, notes.md, trainer_state.json: kept as they "
            "are (only the adapter's files are replaced)") in err
    assert set(after) - set(kept) == set(ADAPTER_FILES)  # adapter_model.bin (the previous one's) is gone
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert after[name] == open(reference / name, "rb").read()
    assert leftovers(out) == [] and leftovers(tmp_path) == []

    # `--out .` in a project folder that holds an adapter_config.json: the project stays
    project = tmp_path / "project"
    (project / ".git" / "objects").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (project / "data").mkdir()
    (project / "data" / "calib.jsonl").write_text('{"text": "mine"}\n')
    (project / "train.py").write_text("print('train')")
    (project / "adapter_config.json").write_text("{}")
    os.symlink("train.py", project / "link.py")
    kept = _not_adapter(snapshot(project))
    monkeypatch.chdir(project)
    rc, _, err = run(args(data, ".", "--overwrite", "--quiet"), capsys)
    assert rc == 0, err
    assert _not_adapter(snapshot(project)) == kept
    assert adapter_bytes(project) == adapter_bytes(reference) and leftovers(project) == []
    monkeypatch.chdir(tmp_path)

    # an adapter folder alone (`make demo` run twice): swapped whole, nothing else appears
    rc, _, err = run(args(data, tmp_path / "demo", "--quiet", "--overwrite"), capsys)
    assert rc == 0, err
    rc, _, err = run(args(data, tmp_path / "demo", "--quiet", "--overwrite"), capsys)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "demo")) == sorted(ADAPTER_FILES) and leftovers(tmp_path) == []


def test_overwrite_refuses_an_adapter_name_that_is_not_a_file(cache, data, tmp_path, capsys):
    for name, make in [("adapter_config.json", lambda p: p.mkdir()),
                       ("adapter_model.safetensors", lambda p: os.symlink(tmp_path / "shared.safetensors", p))]:
        out = tmp_path / f"out-{name}"
        out.mkdir()
        (out / "adapter_model.bin").write_text("weights")
        make(out / name)
        before = snapshot(out)
        rc, _, err = run(args(data, out, "--overwrite", "--quiet"), capsys)
        assert_user_error(rc, err, f"--out {out} holds {name} that is not a file (a folder or a link); not "
                                   "replacing it")
        assert snapshot(out) == before


class _Adapter:
    """Stands for a PeftModel: a config, weights and PEFT's model card, all naming one tag."""

    def __init__(self, tag):
        self.tag = tag

    def save_pretrained(self, folder):
        for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
            with open(os.path.join(folder, name), "w") as f:
                f.write(self.tag)


def test_replacing_files_never_pairs_a_config_with_other_weights(tmp_path, monkeypatch):
    """A failure at each rename in --out of the file-by-file replacement in turn: the other entries are intact, and
    wherever ``--out`` holds a config, the weights and the report are of the same run (and an older
    ``adapter_model.bin`` only beside the previous config)."""
    out = tmp_path / "trainer"
    real = {"rename": os.rename, "replace": os.replace}
    for fail_at in range(1, 30):
        shutil.rmtree(out, ignore_errors=True)
        _trainer_folder(out)
        kept = _not_adapter(snapshot(out))
        calls = []

        def failing(kind):
            def f(src, dst, *a, **k):
                if str(out) in (os.path.dirname(str(src)), os.path.dirname(str(dst))):  # a step inside --out
                    calls.append(kind)
                if len(calls) == fail_at and str(out) in (os.path.dirname(str(src)), os.path.dirname(str(dst))):
                    raise OSError(5, "Input/output error", str(dst))
                return real[kind](src, dst, *a, **k)
            return f

        monkeypatch.setattr(os, "rename", failing("rename"))
        monkeypatch.setattr(os, "replace", failing("replace"))
        try:
            output.write_adapter(_Adapter("new"), {"tag": "new"}, str(out), overwrite=True)
            done = True
        except ConfigError as exc:
            assert "cannot write the adapter" in str(exc)
            done = False
        monkeypatch.setattr(os, "rename", real["rename"])
        monkeypatch.setattr(os, "replace", real["replace"])
        snap = snapshot(out)
        assert _not_adapter(snap) == kept, fail_at
        if "adapter_config.json" in snap:
            tag = snap["adapter_config.json"].decode()
            assert snap["adapter_model.safetensors"].decode() == tag and json.loads(snap[REPORT])["tag"] == tag
            assert ("adapter_model.bin" in snap) == (tag == "old"), fail_at
        assert leftovers(out) == [] and leftovers(tmp_path) == []
        if done:
            assert snap["adapter_config.json"] == b"new" and "adapter_model.bin" not in snap
            assert snap["README.md"] == b"# my model card"  # PEFT's card is not written over the user's
            break
    else:
        pytest.fail("the replacement never completed")
    assert fail_at > 4  # it did fail at every step before


# --------------------------------------------------------------------------------------------------
# 2. An interrupt once the adapter is in place: exit 0, and the line says so


@pytest.mark.parametrize("sig, word", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_an_interrupt_right_after_the_rename_tells_the_truth(sig, word, cache, data, tmp_path, capsys, monkeypatch):
    real = output._claim

    def claim_then_signal(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), sig)  # arrives the moment the adapter is renamed into place

    monkeypatch.setattr(output, "_claim", claim_then_signal)
    out = tmp_path / "adapter"
    rc, stdout, err = run(args(data, out, "--quiet", "--json"), capsys)
    assert rc == 0, err
    assert err == f"lora-da-fast: {word} after the adapter was complete: {out} holds the new adapter (exit status 0)\n"
    assert json.loads(stdout) == json.load(open(out / REPORT))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out)) and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# 3. --stats-cache through a symbolic link


def test_a_stats_cache_link_is_written_through_and_kept(cache, data, tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    link = tmp_path / "s.st"
    os.symlink(store / "s.st", link)  # dangling: the statistics do not exist yet
    rc, _, err = run(args(data, tmp_path / "a", "--stats-cache", link, "--quiet"), capsys)
    assert rc == 0, err
    assert os.path.islink(link) and os.readlink(link) == str(store / "s.st") and (store / "s.st").is_file()
    rc, _, err = run(args(data, tmp_path / "b", "--stats-cache", link), capsys)
    assert rc == 0 and f"statistics loaded from {store / 's.st'}" in err, err
    assert adapter_bytes(tmp_path / "a") == adapter_bytes(tmp_path / "b")
    assert leftovers(tmp_path) == [] and leftovers(store) == [] and sorted(os.listdir(store)) == ["s.st"]


# --------------------------------------------------------------------------------------------------
# 6. A LoRA scaling beyond float32


@pytest.mark.parametrize("extra, match", [
    (["--lora-alpha", "1e40"], "--lora-alpha 1e+40 gives a LoRA scaling of 2.5e+39 (lora_alpha / r), outside "
                               "float32's range (1.18e-38 to 3.4e+38): the adapter's output would be inf"),
    (["--lora-alpha", "1e40", "--rslora"], "scaling of 5e+39 (lora_alpha / sqrt(r))"),
    (["--lora-alpha", "1e-40"], "the adapter's output would be zero"),
])
def test_a_lora_scaling_beyond_float32_is_refused(extra, match, cache, data, tmp_path, capsys):
    rc, _, err = run(args(data, tmp_path / "o", "--quiet", *extra), capsys)
    assert_user_error(rc, err, match)
    assert not os.path.exists(tmp_path / "o")


# --------------------------------------------------------------------------------------------------
# 8. Ctrl-C or SIGTERM while the command starts (the imports take seconds)


def _signal_during_imports(command, sig, env):
    """Start ``command`` and signal it once torch is being loaded (its libraries mapped: the command line's
    heavy imports are under way)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            with open(f"/proc/{proc.pid}/maps") as f:
                if "libtorch" in f.read():
                    break
        except OSError:
            break
        time.sleep(0.002)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc to see when the imports run")
def test_an_interrupt_while_starting_is_one_line(cache, data, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "lora-da-fast")
    argv = args(data, tmp_path / "o", "--quiet")
    cases = [(cli_command(*argv), signal.SIGINT, 130, "interrupted")]
    if os.path.exists(script):  # the console script (setup.py's entry point)
        cases += [([script, *map(str, argv)], signal.SIGINT, 130, "interrupted"),
                  ([script, *map(str, argv)], signal.SIGTERM, 143, "terminated")]
    for command, sig, code, word in cases:
        rc, stdout, err = _signal_during_imports(command, sig, cli_env(cache))
        assert (rc, stdout, err) == (code, "", f"lora-da-fast: {word} while starting; nothing was written\n"), command
    assert not os.path.exists(tmp_path / "o")


# --------------------------------------------------------------------------------------------------
# 9. The report is written once, with the adapter


def test_the_report_is_written_once_with_the_adapter(cache, data, tmp_path, capsys, monkeypatch):
    import lora_da_fast.cli.init as init

    racer = tmp_path / "racer"
    rc, _, err = run(args(data, racer, "--quiet", "--rank", "2"), capsys)
    assert rc == 0, err
    real = init.write_adapter

    def write_then_race(peft_model, report, out, **kw):
        real(peft_model, report, out, **kw)
        shutil.rmtree(out)  # another --overwrite run claims --out right after this one
        shutil.copytree(racer, out)

    monkeypatch.setattr(init, "write_adapter", write_then_race)
    out = tmp_path / "adapter"
    rc, _, err = run(args(data, out, "--quiet"), capsys)
    assert rc == 0, err
    assert snapshot(out) == snapshot(racer)  # the other run's adapter with its own report, untouched
    monkeypatch.undo()
    rc, stdout, err = run(args(data, tmp_path / "b", "--quiet", "--json"), capsys)
    assert rc == 0, err
    report = json.loads(stdout)
    assert report == json.load(open(tmp_path / "b" / REPORT)) and "save" in report["timings_s"]


# --------------------------------------------------------------------------------------------------
# 10. --data read within a bound


def test_dev_zero_fails_fast(cache, tmp_path):
    """A real process (an unbounded read would take all memory: the subprocess and its timeout contain it)."""
    proc = subprocess.run(cli_command(*args("/dev/zero", tmp_path / "o", "--quiet")), cwd=ROOT, env=cli_env(cache),
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr == ("lora-da-fast: error: --data /dev/zero, line 1: not UTF-8 text (a NUL byte at byte 0: a "
                           "binary file, UTF-16, or a device such as /dev/zero); JSONL files are UTF-8\n")


def test_an_endless_data_stream_stops_at_the_limit(cache, tmp_path, capsys):
    fifo = tmp_path / "endless.jsonl"
    os.mkfifo(fifo)

    def feed():  # 64 MiB of valid records at most (an unbounded reader would stop there, not hang the suite)
        block = b'{"text": "the movie was great fun"}\n' * 2000
        try:
            with open(fifo, "wb") as f:
                for _ in range(64 * 2 ** 20 // len(block)):
                    f.write(block)
        except OSError:  # the reader stopped: a broken pipe
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    rc, _, err = run(args(fifo, tmp_path / "o", "--quiet", "--max-data-mb", "1"), capsys)
    with open(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), "rb"):  # frees the feeder if nobody opened the FIFO
        pass
    feeder.join(30)
    assert_user_error(rc, err, f"--data {fifo} holds more than 1 MiB (the --max-data-mb limit; or it is an endless "
                               "stream): give a smaller file, or raise --max-data-mb")
    assert not os.path.exists(tmp_path / "o")


# --------------------------------------------------------------------------------------------------
# 11. Unreadable files: "cannot read: permission denied"


_AS_USER = r"""
import json, os, sys
from lora_da_fast import cli, checkpoint
from lora_da_fast.errors import DataError
from lora_da_fast.fisher import FisherStatistics
d, data = sys.argv[1], sys.argv[2]
base = ["init", "--data", data, "--device", "cpu", "--quiet"]
results = {}
for case, extra in [("cache", ["--model", "tiny-llama", "--stats-cache", d + "/locked.st"]),
                    ("checkpoint", ["--model", "tiny-llama", "--stats-cache", d + "/fresh.st"]),
                    ("model", ["--model", d + "/model"])]:
    rc = cli.main(base + ["--out", d + "/out-" + case] + extra)
    results[case] = rc
for case, load in [("api cache", lambda: FisherStatistics.load(d + "/locked.st")),
                   ("api checkpoint", lambda: checkpoint.peek(d + "/fresh.st.partial"))]:
    try:
        load()
    except DataError as exc:
        print(case + ": " + str(exc), file=sys.stderr)
print(json.dumps(results))
"""


def _unprivileged():
    """A prefix that runs a command as an unprivileged user (root reads any file), or None if not possible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] if setpriv else None


def test_unreadable_files_are_named_as_such(stats_run, tiny_cache, data):
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    d = tempfile.mkdtemp(prefix="lora-da-unreadable-")
    try:
        os.chmod(d, 0o777)  # the unprivileged user works in here
        shutil.copy(stats_run[0], os.path.join(d, "locked.st"))
        shutil.copy(stats_run[0], os.path.join(d, "fresh.st.partial"))  # any file: it cannot be read
        shutil.copytree(os.path.join(tiny_cache, "tiny-llama"), os.path.join(d, "model"))
        shutil.copy(data, os.path.join(d, "calib.jsonl"))
        for root, dirs, files in os.walk(d):
            for n in dirs + files:
                os.chmod(os.path.join(root, n), 0o755 if n in dirs else 0o644)
        for p in ("locked.st", "fresh.st.partial", os.path.join("model", "model.safetensors")):
            os.chmod(os.path.join(d, p), 0)
        env = dict(os.environ, LORA_DA_FAST_CACHE=os.path.join(d, "cache"), HOME=d, HF_HOME=os.path.join(d, "hf"))
        proc = subprocess.run(prefix + [sys.executable, "-c", _AS_USER, d, os.path.join(d, "calib.jsonl")], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"cache": 2, "checkpoint": 2, "model": 2}, proc.stderr
        lines = proc.stderr.splitlines()
        assert lines == [
            f"lora-da-fast: error: --stats-cache {d}/locked.st: cannot read: permission denied",
            f"lora-da-fast: error: --stats-cache {d}/fresh.st: its checkpoint {d}/fresh.st.partial: cannot read: "
            "permission denied",
            f"lora-da-fast: error: --model {d}/model: cannot read {d}/model/model.safetensors: permission denied",
            f"api cache: {d}/locked.st: cannot read: permission denied",
            f"api checkpoint: the checkpoint {d}/fresh.st.partial: cannot read: permission denied"], proc.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# 12. A finished statistics cache on a read-only file system is only read


def test_a_read_only_stats_cache_is_used(stats_run, data, tmp_path, capsys, monkeypatch):
    f0, a0 = stats_run
    # simulated (any machine): the folder is not writable
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(f0, ro / "s.st")
    real_access = os.access
    with monkeypatch.context() as m:
        m.setattr(os, "access", lambda p, mode, **kw: (str(p) != str(ro) or not mode & os.W_OK)
                  and real_access(p, mode, **kw))
        rc, _, err = run(args(data, tmp_path / "a", "--stats-cache", ro / "s.st"), capsys)
    assert rc == 0 and f"statistics loaded from {ro / 's.st'}" in err, err
    assert adapter_bytes(tmp_path / "a") == adapter_bytes(a0)
    # a real read-only tmpfs, where this machine lets the tests mount one
    with small_disk(tmp_path / "disk", 4096) as disk:
        if disk is None:
            return
        shutil.copy(f0, disk / "s.st")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)
        rc, _, err = run(args(data, tmp_path / "b", "--stats-cache", disk / "s.st", "--quiet"), capsys)
        assert rc == 0, err
        assert adapter_bytes(tmp_path / "b") == adapter_bytes(a0) and os.listdir(disk) == ["s.st"]
        rc, _, err = run(args(data, tmp_path / "c", "--stats-cache", disk / "new.st", "--quiet"), capsys)
        assert_user_error(rc, err, "is not writable")  # statistics to write: refused before any work


# --------------------------------------------------------------------------------------------------
# 16. Custom code in a model folder: refused unless --trust-remote-code, never a prompt


_CUSTOM_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "lora_da_test_custom"


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
"""

_WITH_STDIN = r"""
import sys
from lora_da_fast import cli
rcs = [cli.main(sys.argv[1:]), cli.main(sys.argv[1:] + ["--trust-remote-code"])]
print(rcs, repr(sys.stdin.read()))
"""


_ONCE_WITH_STDIN = r"""
import sys
from lora_da_fast import cli
print([cli.main(sys.argv[1:])], repr(sys.stdin.read()))
"""


def test_custom_code_needs_trust_remote_code(tiny_cache, data, tmp_path):
    model, marker = tmp_path / "custom_model", tmp_path / "code-ran"
    shutil.copytree(os.path.join(tiny_cache, "tiny-llama"), model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="lora_da_test_custom", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(_CUSTOM_CODE.format(marker=str(marker)))
    env = dict(cli_env(tiny_cache), HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    argv = ["init", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o"), "--rank", "4",
            "--max-length", "32", "--device", "cpu", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", _WITH_STDIN, *argv], cwd=ROOT, env=env, input="y\ny\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # refused (exit 2) without running the folder's code; with the option it runs; stdin is never read
    assert proc.stdout == "[2, 0] 'y\\ny\\n'\n", proc.stdout + proc.stderr
    assert proc.stderr == (f"lora-da-fast: error: --model {model} holds custom code (auto_map in config.json): the "
                           "command line runs no code from a model folder unless you add --trust-remote-code (only "
                           "for a folder you trust)\n")
    assert marker.read_text() == "the folder's code ran" and (tmp_path / "o" / "adapter_config.json").is_file()
    # a model type transformers implements itself (a folder that still carries an auto_map): loaded with
    # transformers' own classes, without the option, the folder's code never run, stdin never read
    marker.unlink()
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    argv = argv[:6] + [str(tmp_path / "o2")] + argv[7:]
    proc = subprocess.run([sys.executable, "-c", _ONCE_WITH_STDIN, *argv], cwd=ROOT, env=env, input="y\ny\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[0] 'y\\ny\\n'\n", proc.stdout + proc.stderr
    assert not marker.exists() and (tmp_path / "o2" / "adapter_config.json").is_file()


# --------------------------------------------------------------------------------------------------
# The kill loop


_FINAL_LINES = ("lora-da-fast: interrupted; no adapter was written", "lora-da-fast: terminated; no adapter was written",
                "lora-da-fast: interrupted while starting; nothing was written",
                "lora-da-fast: terminated while starting; nothing was written")


def _wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not predicate():
        time.sleep(0.002)


def _torch_mapped(pid) -> bool:
    """Whether the process has torch's libraries mapped (the command line's imports are under way); True
    once it is gone (nothing left to wait for)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return True


def _report_bytes(out):
    try:
        with open(os.path.join(out, REPORT), "rb") as f:
            return f.read()
    except OSError:
        return None


def _config_inode(out):
    """The config's inode: a new one once a run put its adapter in place (the bytes are the same each run)."""
    try:
        return os.stat(os.path.join(out, "adapter_config.json")).st_ino
    except OSError:
        return None


def _stamp(path):
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns
    except OSError:
        return None


def _saving(folder, pid) -> bool:
    """Whether process ``pid`` has its adapter's temporary folder in ``folder`` (it is saving the adapter)."""
    for name in os.listdir(folder):
        if name.startswith(".adapter.lora-da-tmp-"):
            try:
                with open(os.path.join(folder, name, ".lora-da-fast-owner.json")) as f:
                    if json.load(f).get("pid") == pid:
                        return True
            except (OSError, ValueError):
                pass
    return False


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc to see when a run has started")
def test_kill_loop(cache, long_data, tmp_path, capsys):
    """Real runs with --stats-cache and --overwrite, stopped by SIGKILL, SIGTERM or SIGINT at a random moment
    of a phase (the start-up, the statistics pass, the save) and right after the final rename (held there by
    the test hook), then rerun to completion. After every run the exit status and the last line say what is
    on disk; the user's file in --out is intact; the last run's adapter is an uninterrupted run's, byte for
    byte, and nothing is left behind."""
    ref = tmp_path / "reference"
    assert cli.main([str(a) for a in long_args(long_data, ref, "--quiet")]) == 0
    reference = adapter_bytes(ref)
    out, stats = tmp_path / "adapter", tmp_path / "s.st"
    partial = str(stats) + cli.PARTIAL_SUFFIX
    argv = long_args(long_data, out, "--stats-cache", stats, "--checkpoint-every", "4", "--overwrite", "--quiet")
    seed = random.randrange(2 ** 32)
    rng = random.Random(seed)
    cycles = [(signal.SIGKILL, "pass"), (signal.SIGTERM, "after rename"), (signal.SIGINT, "start-up"),
              (signal.SIGTERM, "pass"), (signal.SIGINT, "save"), (signal.SIGINT, "after rename"),
              (signal.SIGKILL, "save"), (signal.SIGKILL, "after rename")]
    for i, (sig, when) in enumerate(cycles):
        if i == 3:  # from here --out also holds a file of the user's: the adapter is replaced file by file
            out.mkdir(exist_ok=True)
            (out / "notes.txt").write_text("mine")
        if when == "pass" and os.path.exists(stats):
            os.remove(stats)  # so that there is a statistics pass to interrupt (resumed from its checkpoint)
        before, inode, checkpoint = _report_bytes(out), _config_inode(out), _stamp(partial)
        left = set(leftovers(tmp_path))
        env = cli_env(cache)
        if when == "after rename":
            env[output.TEST_HOOK_PAUSE_ENV] = "2"
        proc = subprocess.Popen(cli_command(*argv), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if when == "start-up":
            _wait_for(lambda: _torch_mapped(proc.pid), proc)
            time.sleep(rng.uniform(0, 2))
        elif when == "pass":  # a checkpoint of this run is written: the pass is under way
            _wait_for(lambda: _stamp(partial) not in (None, checkpoint), proc)
            time.sleep(rng.uniform(0, 0.3))
        elif when == "save":
            _wait_for(lambda: _saving(tmp_path, proc.pid), proc)
            time.sleep(rng.uniform(0, 0.01))
        else:
            _wait_for(lambda: _config_inode(out) not in (None, inode), proc)
        if proc.poll() is None:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        rc, last = proc.returncode, (err.strip().splitlines() or [""])[-1]
        what = f"cycle {i} ({signal.Signals(sig).name} {when}, seed {seed}): rc {rc}, {err!r}"
        assert "Traceback" not in err, what
        now = _report_bytes(out)
        if i >= 3:
            assert (out / "notes.txt").read_text() == "mine", what
        if rc == 0:  # the new adapter is complete at --out
            assert now not in (None, before) and adapter_bytes(out) == reference, what
            if when == "after rename":
                word = "terminated" if sig == signal.SIGTERM else "interrupted"
                assert last == (f"lora-da-fast: {word} after the adapter was complete: {out} holds the new adapter "
                                "(exit status 0)"), what
        elif rc in (130, 143):  # nothing new at --out: the previous adapter (or nothing) as it was
            assert when != "after rename" and any(last.startswith(line) for line in _FINAL_LINES), what
            assert now == before and _config_inode(out) == inode, what
            assert set(leftovers(tmp_path)) <= left and (not out.exists() or leftovers(out) == []), what
        else:  # SIGKILL: any adapter at --out is complete (a config is there only beside its own weights)
            assert rc == -signal.SIGKILL and sig == signal.SIGKILL, what
            if _config_inode(out) is not None:
                assert adapter_bytes(out) == reference, what
            if when == "after rename":
                assert _config_inode(out) not in (None, inode) and now not in (None, before), what
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    assert adapter_bytes(out) == reference and (out / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == [] and leftovers(out) == [] and not os.path.exists(str(stats) + cli.PARTIAL_SUFFIX)
