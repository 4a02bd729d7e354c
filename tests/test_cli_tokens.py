"""The token path and the sensitivity flag through the CLI: --keep-tokens, --sensitivity, the report."""
import json

import pytest

pytest.importorskip("peft")

from lora_da_fast import cli  # noqa: E402
from lora_da_fast.solve.sensitivity import SENSITIVITY_FLAG  # noqa: E402

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
        assert m["sensitivity"] is not None and m["sensitivity_by"] == "first-order", name  # estimated, all
    assert rep["lora_da_config"]["keep_tokens"] == "auto"
    rc, _, err = run(args(data, tmp_path / "always", "--quiet", "--keep-tokens", "always"), capsys)
    assert rc == 0, err
    tokens = _report(tmp_path / "always")["modules"]
    assert {m["solver"] for m in tokens.values()} == {"tokens-fp64"}
    rc, out, err = run(args(data, tmp_path / "never", "--keep-tokens", "never", "--sensitivity", "always"), capsys)
    assert rc == 0, err
    factor = _report(tmp_path / "never")["modules"]
    # the summary counts the modules the data does not determine
    loose = sum(any(n.startswith("not determined by the data") for n in m["notes"]) for m in factor.values())
    assert loose >= 5 and f"{loose} of them not determined by the data at fp32 precision" in out, out
    assert "tokens-fp64" not in {m["solver"] for m in factor.values()}
    assert all(m["sensitivity"] is not None for m in factor.values())
    # The flag is the report's: a note exactly where the sensitivity passes SENSITIVITY_FLAG (1e-4).
    for mods in (tokens, factor):
        for name, m in mods.items():
            noted = any("not determined by the data" in n for n in m["notes"])
            assert noted == (m["sensitivity"] > SENSITIVITY_FLAG), (name, m["sensitivity"], m["notes"])
    # Through the tokens, every module the input factor leaves undetermined (> 1e-3 here: 9 of 14, up to
    # 0.2 for layer 0's gate_proj) moves at least 10x less (measured 115-22000x). Not "every module under
    # the flag": layer 0's MLP inputs are so ill-conditioned on this random model that one ulp of them still
    # moves gate_proj by ~1.5e-4 through the tokens, and the report says so (its note is checked above).
    undetermined = [n for n, m in factor.items() if m["sensitivity"] > 1e-3]
    assert len(undetermined) >= 5, factor
    for name in undetermined:
        assert tokens[name]["sensitivity"] <= factor[name]["sensitivity"] / 10, (name, tokens[name], factor[name])
    rc, _, err = run(args(data, tmp_path / "x", "--keep-tokens", "sometimes"), capsys)
    assert rc == 2 and "invalid choice" in err
