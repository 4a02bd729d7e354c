"""The input damping rule (lora_da_fast.solve.steps.input_damping): a function of the final statistics
alone, in float64, with a margin; the same in the reference and the batched solver."""
import pytest
import torch

from lora_da_fast.errors import NumericalError
from lora_da_fast.solve.steps import DAMPING_MARGIN, cholesky_with_retry, damping_note, input_damping


def psd(d, rank, gen, scale=1.0):
    v = torch.randn(d, rank, generator=gen, dtype=torch.float64)
    return scale * (v @ v.T) / rank


@pytest.mark.parametrize("shift,want", [(0.0, 1e-6), (-0.4e-6, 1e-6), (-0.6e-6, 1e-5), (-3e-4, 1e-3),
                                        (-0.49e-3, 1e-3), (-0.51e-3, 1e-2)])
def test_rule_is_the_smallest_damping_with_margin(shift, want):
    """lam = the smallest damping * 10^k with lambda_min(sym Z) > -(1 - margin) lam; a singular Z
    (rank 5 of 12) whose smallest eigenvalue is moved by ``shift``."""
    gen = torch.Generator().manual_seed(0)
    Z = psd(12, 5, gen) + shift * torch.eye(12, dtype=torch.float64)
    assert input_damping(Z, 1e-6, 1.0, ["g"]) == [pytest.approx(want)]
    L, lam = cholesky_with_retry(Z, 1e-6, 1.0, "g")
    assert lam == pytest.approx(want)
    # the factor is of sym(Z) + lam I, whose smallest eigenvalue is at least margin * lam
    assert torch.allclose(L @ L.T, Z + lam * torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert float(torch.linalg.eigvalsh(L @ L.T)[0]) >= DAMPING_MARGIN * lam * (1 - 1e-6)


def test_stack_decides_each_item_alone_and_in_any_dtype():
    gen = torch.Generator().manual_seed(1)
    Zs = torch.stack([psd(10, 10, gen), psd(10, 3, gen) - 2e-5 * torch.eye(10, dtype=torch.float64),
                      psd(10, 4, gen, scale=1e3)])
    lams = input_damping(Zs, 1e-6, 1.0, ["a", "b", "c"])
    assert lams == [pytest.approx(1e-6), pytest.approx(1e-4), pytest.approx(1e-6)]
    # one at a time, or from a float32 copy converted to float64: the same decision
    assert [input_damping(Zs[i], 1e-6, 1.0, ["x"])[0] for i in range(3)] == lams
    assert input_damping(Zs.float(), 1e-6, 1.0, ["a", "b", "c"]) == input_damping(Zs.float().double(), 1e-6, 1.0,
                                                                                   ["a", "b", "c"])
    # an asymmetric Z is symmetrised first
    A = Zs[1] + torch.triu(torch.ones(10, 10, dtype=torch.float64), 1) * 1e-3
    assert input_damping(A, 1e-6, 1.0, ["b"]) == input_damping(0.5 * (A + A.T), 1e-6, 1.0, ["b"])


def test_errors_name_the_module():
    gen = torch.Generator().manual_seed(2)
    Z = psd(8, 8, gen) - 1.0 * torch.eye(8, dtype=torch.float64) * 10
    with pytest.raises(NumericalError, match="input factor of grp failed even with damping 1 "):
        input_damping(Z, 1e-6, 1.0, ["grp"])
    Z[2, 3] = float("nan")
    with pytest.raises(NumericalError, match="input factor of grp is not finite"):
        input_damping(Z, 1e-6, 1.0, ["grp"])


def test_note_keeps_the_reported_words():
    assert damping_note(1e-6, 1e-3).startswith("damping raised from 1e-06 to 0.001 after a failed Cholesky")


@pytest.mark.parametrize("solver", ["reference", "batched"])
def test_both_solvers_use_the_rule(solver):
    """A singular Z shifted to a smallest eigenvalue of about -0.7e-6 (below -damping / 2): both solvers
    take the rule's 1e-5 and say so; the other group keeps 1e-6."""
    from lora_da_fast import FisherStatistics, LoraDAConfig, ModuleStatistics, solve_lora_da

    gen = torch.Generator().manual_seed(4)
    mods, Z = {}, {}
    for g, shift in (("g0", 0.0), ("g1", -0.7e-6)):
        Z[g] = (psd(160, 40, gen) + shift * torch.eye(160, dtype=torch.float64)).float()
        mods[f"{g}.m"] = ModuleStatistics(g, torch.randn(24, 160, generator=gen) * 1e-2,
                                          torch.rand(24, generator=gen) * 1e-3 + 1e-5)
    stats = FisherStatistics(mods, Z, 10, 100)
    res = solve_lora_da(stats, LoraDAConfig(rank=4, population_size=1000, solver=solver))
    want = input_damping(torch.stack([stats.dense_Z(g) for g in ("g0", "g1")]), 1e-6, 1.0, ["g0", "g1"])
    assert want == [pytest.approx(1e-6), pytest.approx(1e-5)]
    assert res.reports["g0.m"].damping == pytest.approx(1e-6)
    # no damping note; G is random, not in the range of this singular Z, so the (default) sensitivity
    # note is all there is: the null space's rounding is amplified by 1/damping
    assert all(n.startswith("not determined by the data") for n in res.reports["g0.m"].notes)
    assert res.reports["g1.m"].damping == pytest.approx(1e-5)
    assert damping_note(1e-6, 1e-5) in res.reports["g1.m"].notes
