"""The token path and the sensitivity flag through the CLI: --keep-tokens, --sensitivity, the report."""
import json

import pytest

pytest.importorskip("peft")

from lora_da_fast import cli  # noqa: E402

from .cli_helpers import args, cache, data, run, tiny_cache  # noqa: E402,F401


def _report(folder):
    return json.load(open(folder / cli.REPORT_FILE))


def test_keep_tokens_and_sensitivity_options(cache, data, tmp_path, capsys):
    rc, _, err = run(args(data, tmp_path / "auto", "--quiet"), capsys)
    assert rc == 0, err
    rep = _report(tmp_path / "auto")
    # 128 < tokens <= 256: the down_proj groups (d_in 128) through their tokens, the others (d_in 64) not
    assert 2 * 64 < rep["num_tokens"] <= 2 * 128
    for name, m in rep["modules"].items():
        assert (m["solver"] == "tokens-fp64") == name.endswith("down_proj"), name
        assert (m["sensitivity"] is not None) == name.endswith("down_proj"), name
    assert rep["lora_da_config"]["keep_tokens"] == "auto"
    rc, _, err = run(args(data, tmp_path / "always", "--quiet", "--keep-tokens", "always"), capsys)
    assert rc == 0, err
    rep = _report(tmp_path / "always")
    assert {m["solver"] for m in rep["modules"].values()} == {"tokens-fp64"}
    assert all(m["sensitivity"] < 1e-4 for m in rep["modules"].values())
    rc, _, err = run(args(data, tmp_path / "never", "--quiet", "--keep-tokens", "never", "--sensitivity", "always"),
                     capsys)
    assert rc == 0, err
    rep = _report(tmp_path / "never")
    assert "tokens-fp64" not in {m["solver"] for m in rep["modules"].values()}
    assert all(m["sensitivity"] is not None for m in rep["modules"].values())
    rc, _, err = run(args(data, tmp_path / "x", "--keep-tokens", "sometimes"), capsys)
    assert rc == 2 and "invalid choice" in err
