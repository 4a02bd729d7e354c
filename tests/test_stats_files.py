"""Statistics files and checkpoints (issue 14, point 6): a content checksum and a schema check (names,
shapes against the header, dtypes, counters), so a damaged file is reported as damaged and never
trusted; and the file helpers under them (atomic writes, disk errors in words, renames that never
replace)."""
import errno
import json
import os
import signal

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora_da_fast import LoraDAConfig, collect_statistics, fileio
from lora_da_fast import checkpoint as ckpt
from lora_da_fast.cli import ownership
from lora_da_fast.errors import ConfigError, DataError
from lora_da_fast.fisher import FisherStatistics, ModuleStatistics, check_tensors, is_statistics_file
from lora_da_fast.statistics import StatisticsPass

from .helpers import random_examples, tiny_llama


@pytest.fixture(scope="module")
def stats():
    cfg = LoraDAConfig(backend="torch", output_fisher="sequence_lowrank", target_modules=["q_proj", "down_proj"])
    return collect_statistics(tiny_llama(seed=0), random_examples(5, seed=1), cfg, progress=False)


def _same(a: FisherStatistics, b: FisherStatistics) -> bool:
    ta, ha = a.to_tensors()
    tb, hb = b.to_tensors()
    return ha == hb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_round_trip_and_checksum(stats, tmp_path):
    f = tmp_path / "s.st"
    stats.save(str(f))
    assert is_statistics_file(str(f)) and _same(FisherStatistics.load(str(f)), stats)
    tensors, header = stats.to_tensors("F.")  # as in a checkpoint: the prefix does not change the checksum
    assert header["checksum"] == stats.to_tensors()[1]["checksum"]
    assert _same(FisherStatistics.from_tensors(tensors, header, "F."), stats)
    assert list(os.listdir(tmp_path)) == ["s.st"]  # the write's temporary folder is gone


def test_every_kind_of_damage_is_named(stats):
    tensors, header = stats.to_tensors()
    name = "model.layers.0.mlp.down_proj"
    i = header["modules"].index(name)

    def expect(t, h, match):
        with pytest.raises(DataError, match=match):
            check_tensors(t, h)

    flipped = dict(tensors)
    flipped[f"G.{i}"] = tensors[f"G.{i}"].clone()
    flipped[f"G.{i}"].view(torch.int32)[0, 0] ^= 1  # one bit
    expect(flipped, header, "content checksum mismatch")
    expect(tensors, {**header, "num_examples": header["num_examples"] + 1}, "content checksum mismatch")
    expect(tensors, {k: v for k, v in header.items() if k != "checksum"}, "no content checksum")
    # written by code that got it wrong, with a valid checksum: the schema check catches it
    for edit, match in [
        (lambda s: s.modules[name].__setattr__("y", s.modules[name].y[:1]), "gradient .* and output moment \\[1\\]"),
        (lambda s: s.modules[name].__setattr__("G", s.modules[name].G[:, :5]), "modules of width"),
        (lambda s: s.modules[name].__setattr__("seq_sums", s.modules[name].seq_sums[:2]), "sequence sums"),
        (lambda s: s.__setattr__("num_tokens", 0), "counters"),
        (lambda s: s.__setattr__("token_mask", "everything"), "token mask"),
    ]:
        bad = FisherStatistics({n: ModuleStatistics(st.group, st.G, st.y, st.seq_sums) for n, st in stats.modules.items()},
                               dict(stats.Z), stats.num_examples, stats.num_tokens, stats.num_skipped, stats.token_mask,
                               stats.output_fisher, dict(stats.meta))
        edit(bad)
        t, h = bad.to_tensors()
        expect(t, h, match)
    extra = dict(tensors, **{"G.99": torch.zeros(1)})
    expect(extra, header, "checksum mismatch")  # an extra tensor changes the content


def test_damaged_and_foreign_files(stats, tmp_path):
    f = tmp_path / "s.st"
    stats.save(str(f))
    raw = f.read_bytes()
    f.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(DataError, match=rf"{f} is damaged \(content checksum mismatch.*\): delete {f} and rerun"):
        FisherStatistics.load(str(f))
    f.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataError, match=r"is damaged \(unreadable"):
        FisherStatistics.load(str(f))
    other = tmp_path / "notes.jsonl"
    other.write_text('{"text": "not statistics"}\n')
    with pytest.raises(DataError, match=rf"{other} is not a lora_da_fast statistics file$"):
        FisherStatistics.load(str(other))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    assert not is_statistics_file(str(tmp_path / "other.safetensors"))


def _checkpoint(tmp_path, n_batches=2):
    model = tiny_llama(seed=0)
    cfg = LoraDAConfig(backend="torch", batch_size=2, target_modules=["q_proj", "v_proj"])
    ex = random_examples(6, seed=1)
    from lora_da_fast.data import iter_batches, prepare_examples
    from lora_da_fast.targets import find_target_modules

    exs, _ = prepare_examples(ex)
    targets = find_target_modules(model, cfg.target_modules)
    parts = ckpt.fingerprint_parts(model, cfg, targets, exs)
    path = str(tmp_path / "c.partial")
    with StatisticsPass(model, cfg, targets=targets) as sp:
        for k, batch in enumerate(iter_batches(exs, 2, sp.pad_id)):
            if k == n_batches:
                break
            sp.step(batch)
        state = sp.state_dict()
    return model, cfg, targets, parts, path, state


def test_checkpoint_checksum_and_schema(tmp_path):
    model, cfg, targets, parts, path, state = _checkpoint(tmp_path)
    ckpt.write(path, state, parts, 0, 4, None)
    assert ckpt.is_checkpoint_file(path) and ckpt.check(path, parts)["done"] == 4
    with StatisticsPass(model, cfg, targets=targets) as sp:
        assert ckpt.resume(sp, path) == 4
        assert all(torch.equal(sp.state_dict()["G"][n], state["G"][n]) for n in state["G"])
    # a wrong-shape sum with a valid checksum (written by faulty code): refused, not broadcast
    name = next(iter(state["G"]))
    bad = dict(state, G={**state["G"], name: state["G"][name][:1].clone()})
    ckpt.write(path, bad, parts, 0, 4, None)
    with StatisticsPass(model, cfg, targets=targets) as sp:
        with pytest.raises(DataError, match=rf"is damaged \(G of {name} is float32 \[1, 32\], the pass holds float32 "
                                            r"\[32, 32\]\): delete .* and rerun \(the statistics pass starts again\)"):
            ckpt.resume(sp, path)
    # counters a hand edit changed: the checksum covers the header
    ckpt.write(path, state, parts, 0, 4, None)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["lora_da_fast_checkpoint"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["n"] += 1
    save_file(tensors, path, metadata={"lora_da_fast_checkpoint": json.dumps(meta)})
    with StatisticsPass(model, cfg, targets=targets) as sp:
        with pytest.raises(DataError, match="content checksum mismatch"):
            ckpt.resume(sp, path)
    # not ours: never advised to delete
    with open(path, "w") as f:
        f.write("a user's file")
    with pytest.raises(DataError, match="exists and is not a lora_da_fast checkpoint: the statistics pass would "
                                        "overwrite it; move it away or choose another path"):
        ckpt.check(path, parts)


# --------------------------------------------------------------------------------------------------
# File helpers


def test_write_atomic_turns_every_disk_error_into_one_message(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"previous")
    for exc, words in [(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                        "no space left on device"),
                       (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
                       (OSError(errno.EROFS, "Read-only file system"), "read-only file system")]:
        def write(tmp, exc=exc):
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise exc

        with pytest.raises(ConfigError, match=rf"cannot write the thing {target} \({words}\); free space on that "
                                              r"disk \(or make it writable\) or choose another path") as e:
            fileio.write_atomic(str(target), write, "the thing")
        assert e.value.disk == words
        assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["f.bin"]
    with pytest.raises(ConfigError, match=r"\(Permission denied\); check the path"):
        fileio.write_atomic(str(target), lambda tmp: (_ for _ in ()).throw(PermissionError(13, "Permission denied")),
                            "the thing")


@pytest.mark.parametrize("signum, exc", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_write_atomic_interrupted_as_its_temporary_is_made_leaves_nothing(tmp_path, monkeypatch, signum, exc):
    """Ctrl-C (or SIGTERM) arriving the moment the temporary folder exists, before write_atomic holds its
    name: delivered once that name is held, so the temporary is removed (it was left behind before)."""
    real = fileio.make_temp_dir

    def interrupted(target, **extra):
        path = real(target, **extra)
        signal.raise_signal(signum)  # the handler runs here, before the caller has the path
        return path

    def terminate(signum, frame):
        raise SystemExit(143)

    monkeypatch.setattr(fileio, "make_temp_dir", interrupted)
    old = signal.signal(signal.SIGTERM, terminate)
    try:
        with pytest.raises(exc):
            fileio.write_atomic(str(tmp_path / "f.bin"), lambda tmp: open(tmp, "wb").close(), "the thing")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert os.listdir(tmp_path) in ([], ["f.bin"])


@pytest.mark.parametrize("mode", ["renameat2", "fallback"])
def test_rename_noreplace_and_exchange(tmp_path, monkeypatch, mode):
    if mode == "fallback":
        monkeypatch.setattr(ownership, "_renameat2", None)
    elif ownership._renameat2 is None:
        pytest.skip("renameat2 is not available here")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_text("a")
    b.mkdir()  # even an empty folder is never replaced
    with pytest.raises(FileExistsError):
        ownership.rename_noreplace(str(a), str(b))
    assert (a / "x").read_text() == "a" and os.listdir(b) == []
    (b / "y").write_text("b")
    swapped = ownership.exchange(str(a), str(b))
    assert swapped == (mode == "renameat2")
    if swapped:
        assert (b / "x").read_text() == "a" and (a / "y").read_text() == "b"
    c = tmp_path / "c.txt"
    c.write_text("file")
    ownership.rename_noreplace(str(c), str(tmp_path / "d.txt"))
    assert (tmp_path / "d.txt").read_text() == "file" and not c.exists()
