"""Shared fixtures and helpers of the CLI tests (``tests/test_cli_*.py``, ``tests/test_readers.py``).

The built-in ``tiny-llama`` is built once per session into a temporary cache; each test module points
``LORA_DA_FAST_CACHE`` at it while it runs (``cache`` fixture). Import the fixtures you use by name.
"""
import contextlib
import json
import os
import random
import subprocess
import sys
import uuid

import pytest

from lora_da_fast.cli import builtins as bi
from lora_da_fast import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the movie was great fun a slow and tedious film acting superb plot thin I would watch it again".split()


@contextlib.contextmanager
def cache_env(path):
    old = os.environ.get("LORA_DA_FAST_CACHE")
    os.environ["LORA_DA_FAST_CACHE"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("LORA_DA_FAST_CACHE", None)
        else:
            os.environ["LORA_DA_FAST_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A model cache holding the built-in tiny-llama, built once per session."""
    path = tmp_path_factory.mktemp("model_cache")
    with cache_env(path):
        bi.tiny_llama_folder()
    return path


@pytest.fixture(scope="module")
def cache(tiny_cache):
    """``LORA_DA_FAST_CACHE`` set to the session's model cache while the module runs."""
    with cache_env(tiny_cache):
        yield tiny_cache


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def texts(n, seed=0, lo=3, hi=12):
    r = random.Random(seed)
    return [{"text": " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))} for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # lines 2 and 5 have no label token (an empty text is only <s>): skipped and counted
    recs = texts(6, seed=1)
    recs.insert(1, {"text": ""})
    recs.insert(4, {"text": ""})
    return write_jsonl(tmp_path_factory.mktemp("data") / "calib.jsonl", recs)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("long") / "calib.jsonl", texts(40, seed=3, lo=5, hi=30))


def args(data, out, *extra):
    return ["init", "--model", "tiny-llama", "--data", str(data), "--out", str(out), "--rank", "4",
            "--max-length", "32", "--batch-size", "3", "--device", "cpu", *extra]


def long_args(data, out, *extra):
    return ["init", "--model", "tiny-llama", "--data", str(data), "--out", str(out), "--rank", "4",
            "--max-length", "48", "--batch-size", "2", "--device", "cpu", *extra]


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
    """Temporaries of this library (and the names older versions used) left in ``folder``."""
    return sorted(p for p in os.listdir(folder) if ".lora-da-tmp-" in p or ".tmp-" in p or ".old-" in p
                  or ".new-" in p)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def cli_env(cache_path) -> dict:
    return dict(os.environ, LORA_DA_FAST_CACHE=str(cache_path))


def cli_command(*argv):
    return [sys.executable, "-m", "lora_da_fast", *map(str, argv)]


# --------------------------------------------------------------------------------------------------
# A small disk: a tmpfs where this machine lets the tests mount one (root), else None


def can_mount() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0


@contextlib.contextmanager
def small_disk(folder, size_kb: int, read_only: bool = False):
    """Mount a tmpfs of ``size_kb`` KiB on ``folder`` (created); yields the folder, or ``None`` when this
    machine does not allow it (not root, no tmpfs). Unmounted at the end."""
    os.makedirs(folder, exist_ok=True)
    if not can_mount():
        yield None
        return
    opts = f"size={size_kb}k" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, f"lora-da-test-{uuid.uuid4().hex[:6]}", str(folder)],
                       capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize(folder, size_kb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(folder)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def stats_run(cache, data, tmp_path_factory):
    """One run with --stats-cache: (statistics file, adapter folder)."""
    d = tmp_path_factory.mktemp("stats_run")
    rc = cli.main(args(data, d / "adapter", "--stats-cache", str(d / "s.st"), "--quiet"))
    assert rc == 0
    return d / "s.st", d / "adapter"


def fake_stale_temporary(target, pid=None, **owner) -> str:
    """A temporary folder of this library next to ``target`` as a killed run leaves it: the owner marker
    of a process that is gone (``pid``, default a dead one) and a half-written file. ``owner`` overrides
    marker fields (e.g. ``host``)."""
    from lora_da_fast import fileio

    path = fileio.make_temp_dir(str(target), **{k: v for k, v in owner.items() if k == "out"})
    marker = os.path.join(path, fileio.OWNER_FILE)
    with open(marker) as f:
        record = json.load(f)
    record.update(pid=dead_pid() if pid is None else pid, run_id="0" * 16, start=None)
    record.update({k: v for k, v in owner.items() if k != "out"})
    with open(marker, "w") as f:
        json.dump(record, f)
    with open(os.path.join(path, os.path.basename(str(target))), "wb") as f:
        f.write(b"half a file")
    return path
