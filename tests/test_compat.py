"""``lora_da_fast.compat``: the drop-in for the authors' ``estimate_lora_da_initializations(_for_betas)``
against this library's own API (same factors to the solve tolerance), the return format, several betas,
``named_grads`` given and not, the options implemented exactly, the refusals, and a model left as found.
An optional test compares with the authors' ``lora_da.py`` itself when ``LORA_DA_AUTHORS`` names it."""
import dataclasses
import importlib.util
import os

import pytest
import torch

from lora_da_fast import LoraDAConfig, collect_statistics, solve_lora_da
from lora_da_fast.compat import (authors_target_names, estimate_lora_da_initializations,
                                 estimate_lora_da_initializations_for_betas)
from lora_da_fast.errors import ConfigError, DataError, TargetError
from lora_da_fast.fisher import ModuleStatistics

from .helpers import brute_force_statistics, random_examples, rel_err, tiny_llama
from .tolerances import TOL

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
RANK, N, GAMMA = 4, 1000, 32.0


def authors_dataset(n: int, seed: int):
    """What the authors' loader yields: dicts of 1-D input_ids, attention_mask, labels."""
    out = []
    for e in random_examples(n, seed=seed, min_len=8, max_len=16, prompt_frac=0.25):
        out.append({"input_ids": e["input_ids"], "attention_mask": torch.ones_like(e["input_ids"]),
                    "labels": e["labels"]})
    return out


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=5)
    return model, authors_dataset(14, seed=6), authors_target_names(model, TARGETS)


def _call(model, ds, named_grads=None, **kw):
    kw.setdefault("variance_beta", 0.1)
    kw.setdefault("gamma", GAMMA)
    return estimate_lora_da_initializations(model, ds, named_grads, TARGETS, RANK, N, progress=False, **kw)


def _ours(model, ds, names, beta=0.1, G=None):
    """Our own API, dense float64 reference solve; ``G`` replaces the pass's gradients."""
    cfg = LoraDAConfig(rank=RANK, population_size=N, beta=beta, gamma=GAMMA, target_modules=names, solver="reference")
    stats = collect_statistics(model, ds, cfg, progress=False)
    if G is not None:
        stats = dataclasses.replace(stats, modules={n: ModuleStatistics(st.group, G[n].float(), st.y, st.seq_sums)
                                                    for n, st in stats.modules.items()})
    return solve_lora_da(stats, cfg), stats


def _product(f):
    return f["lora_B"].double() @ f["lora_A"].double()


def _assert_matches(out, ours, names, tol=TOL["solver_contract"]):
    assert list(out) == [n + ".weight" for n in names]
    for n in names:
        err = rel_err(_product(out[n + ".weight"]), ours[n].lora_B.double() @ ours[n].lora_A.double())
        assert err < tol, (n, err)


def test_format_and_agreement_with_our_api(setup):
    model, ds, names = setup
    assert names == sorted(names) and len(names) == 2 * len(TARGETS)
    out = _call(model, ds)
    mods = dict(model.named_modules())
    for n in names:
        f = out[n + ".weight"]
        assert set(f) == {"lora_A", "lora_B"}
        d_out, d_in = mods[n].weight.shape
        assert f["lora_A"].shape == (RANK, d_in) and f["lora_B"].shape == (d_out, RANK)
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in f.values())
    ours, _ = _ours(model, ds, names)
    _assert_matches(out, ours, names)
    # already divided by sqrt(gamma): lora_A has orthonormal rows times 1/sqrt(gamma)
    A = out[names[0] + ".weight"]["lora_A"].double()
    assert rel_err(A @ A.T * GAMMA, torch.eye(RANK, dtype=torch.float64)) < TOL["solver_contract"]


def test_named_grads_is_the_gradient(setup):
    model, ds, names = setup
    grad_examples = random_examples(6, seed=11, min_len=5, max_len=12)  # other examples than the Fisher's
    G = brute_force_statistics(model, grad_examples, target_modules=names)["G"]
    named_grads = {n + ".weight": g.float() for n, g in G.items()}
    named_grads["model.embed_tokens.weight"] = torch.zeros(3)  # other parameters are ignored
    out = _call(model, ds, named_grads)
    ours, _ = _ours(model, ds, names, G=G)
    _assert_matches(out, ours, names)
    without = _call(model, ds)  # None: G from the Fisher pass itself -- a different answer
    n = names[0] + ".weight"
    assert rel_err(_product(out[n]), _product(without[n])) > 1e-2


def test_several_betas_from_one_call(setup):
    model, ds, names = setup
    res = estimate_lora_da_initializations_for_betas(model, ds, None, TARGETS, RANK, N, [0.0, 0.1, 0.0, 1e4],
                                                     gamma=GAMMA, progress=False)
    assert list(res) == [0.0, 0.1, 1e4]
    for beta in res:
        ours, _ = _ours(model, ds, names, beta=beta)
        _assert_matches(res[beta], ours, names)
    assert max(rel_err(_product(res[0.0][n + ".weight"]), _product(res[1e4][n + ".weight"])) for n in names) > 1e-2


def test_delta_normalisation_and_balanced_factors(setup):
    model, ds, names = setup
    base = _call(model, ds)
    exact, _ = _ours(model, ds, names)  # its reports hold sigma = ||D||_2, from a dense float64 matrix norm
    raw = _call(model, ds, normalize_delta=False)
    powered = _call(model, ds, delta_normalization_power=0.5, delta_normalization_reference=2.0)
    balanced = _call(model, ds, balance_factors=True)
    tol = TOL["solver_contract"]
    for n in names:
        sigma = exact.reports[n].sigma
        P = _product(base[n + ".weight"])
        # D divided by nothing / by sigma^p ref^(1-p): same subspace, lora_B scaled by sigma / s
        assert rel_err(_product(raw[n + ".weight"]), sigma * P) < tol
        assert rel_err(_product(powered[n + ".weight"]), (sigma / 2.0) ** 0.5 * P) < tol
        A, B = balanced[n + ".weight"]["lora_A"].double(), balanced[n + ".weight"]["lora_B"].double()
        assert rel_err(B @ A, P) < tol
        BtB, AAt = B.T @ B, A @ A.T  # both diag(S) / gamma, S the singular values of the unscaled lora_B
        assert rel_err(BtB, AAt) < tol
        assert rel_err(BtB, torch.diag(BtB.diagonal())) < tol
        assert bool((B.gather(0, B.abs().argmax(0, keepdim=True)) > 0).all())  # canonical signs


@pytest.mark.parametrize("kw,error,match", [
    (dict(normalize_variance_guidance=True), ConfigError, "normalize_variance_guidance"),
    (dict(target_modules="q_proj"), ConfigError, "list of module names"),
    (dict(target_modules=["nope"]), TargetError, "match no nn.Linear"),
    (dict(fisher_token_mask="all"), ConfigError, "fisher_token_mask"),
    (dict(output_fisher_mode="full"), ConfigError, "output_fisher_mode"),
    (dict(population_size=None), ConfigError, "population_size"),
    (dict(lobpcg_niter=0), ConfigError, "lobpcg_niter"),
    (dict(delta_normalization_power=0.5, delta_normalization_reference=0.0), ConfigError, "reference"),
    (dict(rank=1000), TargetError, "rank 1000"),
    (dict(bias_alpha=0.0, variance_beta=0.0), ConfigError, "bias_alpha"),
    (dict(bias_alpha=-1.0), ConfigError, "bias_alpha"),
    (dict(batch_size=0), ConfigError, "batch_size"),
    (dict(balance_factors="yes"), ConfigError, "balance_factors"),
])
def test_refusals(setup, kw, error, match):
    model, ds, _ = setup
    args = dict(target_modules=TARGETS, rank=RANK, population_size=N, variance_beta=0.1, progress=False)
    args.update(kw)
    with pytest.raises(error, match=match):
        estimate_lora_da_initializations(model, ds, None, **args)


@pytest.mark.parametrize("grads,match", [({}, "no entry"), ("shape", "has shape")])
def test_bad_named_grads(setup, grads, match):
    model, ds, names = setup
    if grads == "shape":
        grads = {n + ".weight": torch.zeros(3, 3) for n in names}
    with pytest.raises(DataError, match=match):
        _call(model, ds, grads)


def test_iteration_counts_are_accepted_with_a_warning(setup):
    model, ds, names = setup
    with pytest.warns(UserWarning, match="lobpcg_niter=50 has no effect"):
        out = _call(model, ds, lobpcg_niter=50, variance_beta=0.0, normalize_variance_guidance=True)
    ours, _ = _ours(model, ds, names, beta=0.0)  # normalize_variance_guidance has no effect at beta 0
    _assert_matches(out, ours, names)


def test_model_left_exactly_as_found(setup):
    _, ds, _ = setup
    model = tiny_llama(seed=5)
    model.train()
    model.model.layers[0].eval()
    model.lm_head.weight.requires_grad_(False)
    grad = torch.ones_like(model.model.norm.weight)
    model.model.norm.weight.grad = grad
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda m, i, o: seen.append(1))
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for n, m in model.named_modules()}
    _call(model, ds)
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert hooks == {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                     for n, m in model.named_modules()}
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n])
        assert p.grad is (grad if n == "model.norm.weight" else None)
    assert torch.equal(grad, torch.ones_like(grad))
    handle.remove()


def _authors_module():
    path = os.environ.get("LORA_DA_AUTHORS")
    if not path:
        pytest.skip("set LORA_DA_AUTHORS to the authors' lora_da.py (github.com/zqy0126/LoRA-DA) to compare with it")
    if os.path.isdir(path):
        path = os.path.join(path, "lora_da.py")
    spec = importlib.util.spec_from_file_location("authors_lora_da", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_against_the_authors_code(setup, beta):
    """Their call (batch size 1, enough LOBPCG and power iterations to converge) and ours agree to the
    accuracy of their float32 solve; with their 10 LOBPCG iterations ours is closer to the exact answer."""
    authors = _authors_module()
    model, ds, names = setup
    G = brute_force_statistics(model, random_examples(6, seed=11, min_len=5, max_len=12), target_modules=names)["G"]
    named_grads = {n + ".weight": g.float() for n, g in G.items()}
    args = (model, ds, named_grads, TARGETS, RANK, N)
    kw = dict(variance_beta=beta, gamma=GAMMA)
    theirs = authors.estimate_lora_da_initializations(*args, lobpcg_niter=200, delta_svd_niter=200, **kw)
    theirs10 = authors.estimate_lora_da_initializations(*args, **kw)
    ours = estimate_lora_da_initializations(*args, progress=False, **kw)
    exact, _ = _ours(model, ds, names, beta=beta, G=G)
    assert list(theirs) == sorted(theirs) and set(theirs) == set(ours)
    worst = worst10 = worst_ours = 0.0
    for n in names:
        P = exact[n].lora_B.double() @ exact[n].lora_A.double()
        worst = max(worst, rel_err(_product(theirs[n + ".weight"]), P))
        worst10 = max(worst10, rel_err(_product(theirs10[n + ".weight"]), P))
        worst_ours = max(worst_ours, rel_err(_product(ours[n + ".weight"]), P))
        for key in ("lora_A", "lora_B"):
            assert theirs[n + ".weight"][key].shape == ours[n + ".weight"][key].shape
    print(f"beta {beta}: authors converged {worst:.1e}, authors 10 iterations {worst10:.1e}, ours {worst_ours:.1e}")
    assert worst < TOL["authors_fp32_solve"]
    assert worst_ours < TOL["solver_contract"] and worst_ours <= worst10


def test_the_librarys_own_keywords_and_reports(setup):
    """compat takes this library's keep_tokens and sensitivity beside the authors' signature, and fills a
    ``reports`` dict with the per-module reports (issue 22): the same factors as our API with those settings."""
    model, ds, names = setup
    reports = {}
    out = _call(model, ds, keep_tokens="never", sensitivity="always", reports=reports)
    assert list(reports) == [n + ".weight" for n in names]
    assert all(r.sensitivity is not None and r.solver != "tokens-fp64" for r in reports.values())
    _assert_matches(out, _ours(model, ds, names)[0], names)
    per_beta = {}
    estimate_lora_da_initializations_for_betas(model, ds, None, TARGETS, RANK, N, [0.0, 0.1], gamma=GAMMA,
                                               progress=False, keep_tokens="always", reports=per_beta)
    assert list(per_beta) == [0.0, 0.1] and all(r.solver == "tokens-fp64" for r in per_beta[0.1].values())
    with pytest.raises(ConfigError, match="keep_tokens"):
        _call(model, ds, keep_tokens="sometimes")
    with pytest.raises(ConfigError, match="reports must be a dict"):
        _call(model, ds, reports=[])
