"""The JSONL reader under fuzzing (hypothesis): it never fails with anything but a one-line DataError,
round-trips what it is given, and the CLI reads ``--data`` before the model (bad data is a one-line
error, exit 2, never a traceback)."""
import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lora_da_fast.cli import builtins as bi  # noqa: E402
from lora_da_fast.errors import DataError  # noqa: E402

from .cli_helpers import run  # noqa: E402


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
