"""The exact solve through the tokens (lora_da_fast.solve.token_space) against a dense float64
transcription of docs/algorithm.md steps 1-8 on the same tokens (Z = X^T P X / T, G = Delta^T X / n)."""
import numpy as np
import pytest
import torch

from lora_da_fast import LoraDAConfig
from lora_da_fast.solve.token_space import TokenBasis, solve_group_tokens, usable

from .helpers import dense_product_np, rel_err
from .tolerances import TOL


def dense_fp64(X, sel, deltas, us, n, T, cfg):
    """docs/algorithm.md section 3 with explicit float64 inverses (numpy): lora_B @ lora_A per module."""
    X = X.double().numpy()
    Xs = X if sel is None else X[sel.numpy()]
    Z = Xs.T @ Xs / T
    Zd = (Z + Z.T) / 2 + cfg.damping * np.eye(X.shape[1])
    Zinv = np.linalg.inv(Zd)
    out = {}
    for name, delta in deltas.items():
        G = delta.double().numpy().T @ X / n
        out[name] = dense_product_np(Zinv, G, us[name].double().numpy(), cfg)
    return out


def tokens(gen, T_all, d_in, d_outs, duplicates=0, scale=1.0, spread=0.0):
    """Random inputs (rows with a spread of scales, some exact duplicates: repeated token ids) and
    output gradients."""
    X = torch.randn(T_all, d_in, generator=gen, dtype=torch.float64) * scale
    if spread:
        X = X * torch.logspace(0, -spread, d_in, dtype=torch.float64)[torch.randperm(d_in, generator=gen)]
    for j in range(duplicates):
        X[T_all - 1 - j] = X[j]
    deltas = {f"m{i}": torch.randn(T_all, d, generator=gen, dtype=torch.float64) * 1e-2 for i, d in enumerate(d_outs)}
    us = {k: 1.0 / (torch.rand(v.shape[1], generator=gen, dtype=torch.float64) * 1e-3 + 1e-4)
          for k, v in deltas.items()}
    return X.float().double(), deltas, us  # fp32-representable, as a pass stores them


@pytest.mark.parametrize("T_all,d_in", [(20, 48), (48, 48), (90, 32)])
@pytest.mark.parametrize("beta", [0.0, 0.03, 5.0])
@pytest.mark.parametrize("mask", ["attention", "labels"])
def test_matches_dense_fp64(T_all, d_in, beta, mask):
    gen = torch.Generator().manual_seed(T_all * 7 + d_in + int(beta * 10) + (mask == "labels"))
    X, deltas, us = tokens(gen, T_all, d_in, (16, 40), duplicates=3)
    sel = None if mask == "attention" else torch.rand(T_all, generator=gen) < 0.7
    T = T_all if sel is None else int(sel.sum())
    n = 5
    cfg = LoraDAConfig(rank=4, beta=beta, population_size=1000, damping=1e-6)
    factors, reports = solve_group_tokens("g", X, sel, deltas, us, {k: 1e-6 for k in deltas}, n, T, cfg)
    ref = dense_fp64(X, sel, deltas, us, n, T, cfg)
    for name, f in factors.items():
        P = f.lora_B.double() @ f.lora_A.double()
        err = rel_err(P, ref[name][0])
        print(f"T_all={T_all} d_in={d_in} beta={beta} {mask} {name}: {err:.1e}")
        assert err <= TOL["tokens_vs_dense_fp64"], (name, err)
        # lora_A has orthonormal rows / sqrt(gamma); the report's eigenvalues are M's smallest
        A = f.lora_A.double() * cfg.gamma ** 0.5
        assert torch.allclose(A @ A.T, torch.eye(cfg.rank, dtype=torch.float64), atol=1e-6)
        w = ref[name][1]
        rep = reports[name]
        assert rep.solver == "tokens-fp64" and rep.damping == cfg.damping
        assert np.allclose(rep.eigenvalues, w[: cfg.rank + 1], rtol=1e-6, atol=1e-9 * np.abs(w).max())


def test_span_of_the_inputs():
    """With fewer tokens than inputs, lora_A's rows lie in the span of the tokens' inputs, exactly
    (the dense path puts rounding noise of G outside it, amplified by 1/damping)."""
    gen = torch.Generator().manual_seed(3)
    X, deltas, us = tokens(gen, 12, 64, (24,))
    cfg = LoraDAConfig(rank=4, beta=0.03, population_size=1000)
    factors, _ = solve_group_tokens("g", X, None, deltas, us, {"m0": 1e-6}, 3, 12, cfg)
    Q, _ = torch.linalg.qr(X.T)  # [64, 12] basis of the span
    A = factors["m0"].lora_A.double()
    outside = A - (A @ Q) @ Q.T
    assert float(outside.norm() / A.norm()) < 1e-6  # fp32 rounding of lora_A only


def test_ill_conditioned_spectrum_and_scale():
    """Inputs whose scales span 6 decades (Z's spectrum 12) and a large norm (late MLP inputs): the
    token path still matches the float64 oracle where the oracle itself is accurate (T > d_in)."""
    gen = torch.Generator().manual_seed(5)
    X, deltas, us = tokens(gen, 200, 40, (24,), scale=30.0, spread=3.0)
    cfg = LoraDAConfig(rank=4, beta=0.03, population_size=1000)
    factors, _ = solve_group_tokens("g", X, None, deltas, us, {"m0": 1e-6}, 7, 200, cfg)
    ref = dense_fp64(X, None, deltas, us, 7, 200, cfg)
    assert rel_err(factors["m0"].lora_B.double() @ factors["m0"].lora_A.double(), ref["m0"][0]) \
        <= TOL["tokens_vs_dense_fp64"]


def test_basis_invariants():
    gen = torch.Generator().manual_seed(1)
    X, deltas, _ = tokens(gen, 30, 50, (8,))
    sel = torch.arange(30) % 3 != 0
    b = TokenBasis(X, sel, int(sel.sum()))
    assert b.k == 30
    # V^T Z V and V^T G^T from the basis equal the direct products
    Z = X[sel].T @ X[sel] / int(sel.sum())
    assert rel_err(b.zq(0.0), b.V.T @ Z @ b.V) < 1e-12
    G = deltas["m0"].T @ X / 4
    assert rel_err(b.project_gradient(deltas["m0"], 4), b.V.T @ G.T) < 1e-12
    assert usable(30, 50, 8) and not usable(8, 50, 8) and not usable(100, 8, 8)


def test_output_moments_from_tokens():
    from lora_da_fast.solve.token_space import token_output_moments

    gen = torch.Generator().manual_seed(2)
    delta = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    example = torch.arange(40) // 8 * 3  # 5 examples of 8 tokens, indices 0, 3, ..., 12
    sel = torch.rand(40, generator=gen) < 0.6
    y, seq = token_output_moments(delta, sel, example, int(sel.sum()), True)
    assert torch.allclose(y, (delta[sel] ** 2).sum(0) / int(sel.sum()), rtol=1e-14)
    want = torch.stack([(delta * (sel & (example == i))[:, None]).sum(0) for i in range(0, 15, 3)])
    assert torch.allclose(seq, want, rtol=1e-14, atol=1e-15)
    assert token_output_moments(delta, None, example, 40, False)[1] is None


def test_the_tie_note_follows_the_eigenvalues_not_the_damping_scale():
    """Fewer tokens than inputs and a variance term: M's largest eigenvalue is c / lam on the directions the
    inputs never reach, so the eigengap relative to ||M|| is tiny; the note "ill-defined subspace" speaks
    of eigenvalues r and r+1 coinciding and must not fire when they visibly differ (issue 22: Gemma 3
    270M's layer 0 got it with eigenvalues 2% apart and a measured sensitivity of 3e-7)."""
    gen = torch.Generator().manual_seed(22)
    X, deltas, us = tokens(gen, 20, 48, (16, 40))
    cfg = LoraDAConfig(rank=4, beta=5.0, population_size=1000, damping=1e-8)
    _, reports = solve_group_tokens("g", X, None, deltas, us, {k: 1e-6 for k in deltas}, 5, 20, cfg)
    for name, rep in reports.items():
        lo, hi = rep.eigenvalues[cfg.rank - 1], rep.eigenvalues[cfg.rank]
        assert rep.eigengap < 1e-6 and (hi - lo) > 1e-3 * abs(hi), (name, rep.eigengap, rep.eigenvalues)
        assert not any("ill-defined" in n for n in rep.notes), (name, rep.notes)
