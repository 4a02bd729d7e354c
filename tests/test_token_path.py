"""The token path end to end (docs/algorithm.md, "Two paths"): a pass keeps the tokens of the groups
with few tokens and the solve goes through them, exactly (against the float64 brute force), whatever
the batch size, the example order or the solver, and through a statistics file."""
import numpy as np
import pytest
import torch

from lora_da_fast import FisherStatistics, LoraDAConfig, run_lora_da, solve_lora_da
from lora_da_fast.engine import RunOptions

from .helpers import brute_force_statistics, dense_product_np, random_examples, rel_err, tiny_gpt2, tiny_llama
from .tolerances import TOL


def dense_oracle(Z, G, y, cfg):
    """docs/algorithm.md steps 1-8 with explicit float64 inverses (numpy): lora_B @ lora_A."""
    Z, G, y = (np.asarray(t, dtype=np.float64) for t in (Z, G, y))
    Zinv = np.linalg.inv((Z + Z.T) / 2 + cfg.damping * np.eye(Z.shape[0]))
    return dense_product_np(Zinv, G, 1.0 / (y + cfg.damping), cfg)[0]


def product(f):
    return f.lora_B.double() @ f.lora_A.double()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("token_mask", ["attention", "labels"])
def test_few_tokens_match_the_float64_brute_force(arch, token_mask):
    """Fewer tokens than inputs (every Z singular): a float64 model's pass and the token-space solve
    agree with the float64 brute force (plain autograd, one example at a time) on every module."""
    model = (tiny_llama if arch == "llama" else tiny_gpt2)(dtype=torch.float64)
    examples = random_examples(3, seed=4, min_len=4, max_len=7, prompt_frac=0.3)
    cfg = LoraDAConfig(rank=4, population_size=1000, batch_size=2, token_mask=token_mask)
    res = run_lora_da(model, examples, cfg, progress=False, keep_statistics=True)
    stats = res.statistics
    assert stats.tokens is not None and stats.num_tokens < 32
    assert {r.solver for r in res.reports.values()} == {"tokens-fp64"}
    bf = brute_force_statistics(model, examples, token_mask=token_mask)
    worst = 0.0
    for name, f in res.items():
        want = dense_oracle(bf["Z"][name], bf["G"][name], bf["y"][name], cfg)
        worst = max(worst, rel_err(product(f), want))
    print(f"{arch}/{token_mask}: worst relative error vs the float64 brute force {worst:.1e}")
    assert worst <= TOL["tokens_vs_brute_force_fp64"]


def test_same_adapter_whatever_the_batches_and_solver():
    """Bit-identical inputs give bit-identical adapters: batch size, example order and solver do not
    matter on the token path (o_proj included, whose Z is the worst conditioned)."""
    model = tiny_llama()
    examples = random_examples(7, seed=1, min_len=5, max_len=9)  # at most 63 tokens: 2 d_in = 64
    runs = []
    for bs, solver, order in [(1, "auto", examples), (4, "auto", examples), (3, "reference", examples[::-1])]:
        cfg = LoraDAConfig(rank=4, population_size=1000, batch_size=bs, solver=solver)
        runs.append(run_lora_da(model, order, cfg, progress=False))
    assert any(n.endswith("o_proj") for n in runs[0])
    assert {r.solver for r in runs[0].reports.values()} == {"tokens-fp64"}
    for other in runs[1:]:
        for name, f in runs[0].items():
            assert rel_err(product(other[name]), product(f)) <= TOL["stats_invariance_fp32"], name
            assert other.reports[name].damping == runs[0].reports[name].damping == 1e-6


def test_statistics_file_keeps_the_tokens(tmp_path):
    model = tiny_llama()
    examples = random_examples(5, seed=2, max_len=10)
    cfg = LoraDAConfig(rank=4, population_size=1000)
    res = run_lora_da(model, examples, cfg, progress=False, options=RunOptions(statistics_file=str(tmp_path / "s.st")))
    loaded = FisherStatistics.load(str(tmp_path / "s.st"))
    assert loaded.tokens is not None and set(loaded.tokens.X) == set(res.statistics.tokens.X)
    again = solve_lora_da(loaded, cfg)
    for name, f in res.items():
        assert torch.equal(again[name].lora_A, f.lora_A) and torch.equal(again[name].lora_B, f.lora_B)
    # the input-factor path on the same file: the statistics without their tokens
    loaded.tokens = None
    dense = solve_lora_da(loaded, cfg)
    assert {r.solver for r in dense.reports.values()} != {"tokens-fp64"}


def test_keep_tokens_never_and_always():
    model = tiny_llama()
    examples = random_examples(4, seed=3)
    never = run_lora_da(model, examples, LoraDAConfig(rank=4, population_size=100, keep_tokens="never"),
                        progress=False, keep_statistics=True)
    assert never.statistics.tokens is None and "tokens-fp64" not in {r.solver for r in never.reports.values()}
    always = run_lora_da(model, examples, LoraDAConfig(rank=4, population_size=100, keep_tokens="always"),
                         progress=False, keep_statistics=True)
    assert set(always.statistics.tokens.X) == set(always.statistics.Z)


def test_sensitivity_flags_what_the_data_does_not_determine():
    """One fp32 ulp in the statistics: the token path's adapters barely move (o_proj included); through
    the input factors, o_proj of a tiny random model (Z's condition number ~1e6, more tokens than inputs)
    moves by more than 1e-3 and is flagged."""
    from lora_da_fast.solve.sensitivity import SENSITIVITY_FLAG

    model = tiny_llama()
    few = random_examples(7, seed=1, min_len=5, max_len=9)
    res = run_lora_da(model, few, LoraDAConfig(rank=4, population_size=1000), progress=False)
    sens = {n: r.sensitivity for n, r in res.reports.items()}
    print("token path:", {n.split("layers.")[-1]: f"{v:.1e}" for n, v in sens.items()})
    assert all(v is not None and v < SENSITIVITY_FLAG for v in sens.values())
    many = random_examples(40, seed=2, min_len=20, max_len=40)
    cfg = LoraDAConfig(rank=4, population_size=1000, sensitivity="always", keep_tokens="never")
    dense = run_lora_da(model, many, cfg, progress=False)
    sens = {n: r.sensitivity for n, r in dense.reports.items()}
    print("input factors:", {n.split("layers.")[-1]: f"{v:.1e}" for n, v in sens.items()})
    flagged = {n for n, r in dense.reports.items() if any("not determined by the data" in x for x in r.notes)}
    assert flagged == {n for n, v in sens.items() if v > SENSITIVITY_FLAG}
    assert any(n.endswith("o_proj") for n in flagged)
    # the default estimates every module to first order, without a second solve: the same modules flagged,
    # the estimates within the table's ratio of the measured changes
    default = run_lora_da(model, many, LoraDAConfig(rank=4, population_size=1000), progress=False)
    lo, hi = TOL["first_order_sensitivity_ratio"]
    for n, r in default.reports.items():
        assert r.sensitivity_by == "first-order" and dense.reports[n].sensitivity_by == "second solve", n
        if sens[n] > 1e-5:
            assert lo <= r.sensitivity / sens[n] <= hi, (n, r.sensitivity, sens[n])
    assert {n for n, r in default.reports.items() if any("not determined by the data" in x for x in r.notes)} == flagged
    never = run_lora_da(model, many, LoraDAConfig(rank=4, population_size=1000, sensitivity="never"), progress=False)
    assert all(r.sensitivity is None for r in never.reports.values())
