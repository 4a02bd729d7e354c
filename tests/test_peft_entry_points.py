"""Compute-then-apply on a ``PeftModel`` the user made with ``get_peft_model`` (``get_lora_da_state_dict``,
``initialize_lora_da_weights``): ``layers_to_transform``, ``rank_pattern``, ``alpha_pattern``, a plain
model with its ``LoraConfig``, a classification model with a ``loss_fn``, and the refusals. The expected
factors come from the library's own API on the untouched base model (statistics tested against a
float64 brute force elsewhere), solved by the dense float64 reference."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_da_fast import LoraDAConfig, collect_statistics, solve_lora_da
from lora_da_fast.errors import ConfigError, TargetError
from lora_da_fast.results import LoraFactors
from lora_da_fast.peft_integration import get_lora_da_state_dict, initialize_lora_da_weights, lora_layers

from .helpers import random_examples, rel_err, tiny_llama
from .test_loss_fn import classification_examples, classification_loss, tiny_llama_classifier
from .tolerances import TOL

DA = LoraDAConfig(rank=4, beta=0.1, population_size=500, solver="reference")


def user_config(**kw):
    kw.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    return LoraConfig(r=4, lora_alpha=8, layers_to_transform=[1], rank_pattern={"q_proj": 2},
                      alpha_pattern={"v_proj": 32}, **kw)


def expected(base, examples, ranks, loss_fn=None):
    """Our own API on the plain base model: one pass, each module solved with its rank."""
    cfg = LoraDAConfig(rank=4, beta=0.1, population_size=500, target_modules=list(ranks), solver="reference")
    stats = collect_statistics(base, examples, cfg, progress=False, loss_fn=loss_fn)
    out = {}
    for n, r in ranks.items():
        out.update(solve_lora_da(stats.subset([n]), LoraDAConfig(**{**cfg.to_dict(), "rank": r, "target_modules": [n]})))
    return out


def assert_products(got, want):
    assert set(got) == set(want)
    for n in want:
        err = rel_err(got[n].lora_B.double() @ got[n].lora_A.double(), want[n].lora_B.double() @ want[n].lora_A.double())
        assert err < TOL["solver_contract"], (n, err)


RANKS = {"model.layers.1.self_attn.q_proj": 2, "model.layers.1.self_attn.v_proj": 4, "model.layers.1.mlp.down_proj": 4}


def test_user_made_peft_model_with_patterns():
    base = tiny_llama(seed=7)
    examples = random_examples(12, seed=8, min_len=6)
    want = expected(copy.deepcopy(base), examples, RANKS)
    peft_model = get_peft_model(copy.deepcopy(base), user_config())
    layers = lora_layers(peft_model)
    assert {n: l.r["default"] for n, l in layers.items()} == RANKS  # what PEFT made of the patterns
    with torch.no_grad():  # an adapter that is not zero: the pass must not see it (adapter disabled)
        for l in layers.values():
            l.lora_B["default"].weight.normal_()
    W0 = {n: l.get_base_layer().weight.detach().clone() for n, l in layers.items()}
    factors = initialize_lora_da_weights(peft_model, examples, DA, progress=False)
    assert_products(factors, want)
    for n, l in layers.items():  # written into the adapter, base weights untouched
        A, B = l.lora_A["default"].weight, l.lora_B["default"].weight
        assert torch.equal(A, factors[n].lora_A) and torch.equal(B, factors[n].lora_B)
        assert torch.equal(l.get_base_layer().weight, W0[n])
    assert layers["model.layers.1.self_attn.v_proj"].scaling["default"] == 32 / 4  # alpha_pattern kept


def test_compute_on_the_plain_model_then_apply_and_subtract_init():
    base = tiny_llama(seed=7)
    examples = random_examples(12, seed=8, min_len=6)
    state = get_lora_da_state_dict(copy.deepcopy(base), examples, DA, lora_config=user_config(), progress=False)
    assert {n: f.lora_A.shape[0] for n, f in state.items()} == RANKS  # rank_pattern resolved as PEFT does
    assert_products(state, expected(copy.deepcopy(base), examples, RANKS))
    peft_model = get_peft_model(copy.deepcopy(base), user_config())
    initialize_lora_da_weights(peft_model, lora_da_state_dict=state, subtract_init=True)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want, got = base(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert rel_err(got, want) < TOL["stats_invariance_fp32"]  # initial adapted model == base model
    # precomputed statistics of the base model serve too
    stats = collect_statistics(copy.deepcopy(base), examples, LoraDAConfig(target_modules=list(RANKS)), progress=False)
    assert_products(get_lora_da_state_dict(peft_model, None, DA, stats=stats, progress=False), state)


def test_rank_pattern_through_initialize_lora_da():
    """One road per question: ``initialize_lora_da`` (wrap and initialise a plain model) solves
    ``rank_pattern`` as ``get_lora_da_state_dict`` does, each module with its own rank, in one engine run."""
    from lora_da_fast import initialize_lora_da

    base = tiny_llama(seed=7)
    examples = random_examples(12, seed=8, min_len=6)
    want = expected(copy.deepcopy(base), examples, RANKS)
    peft_model = initialize_lora_da(copy.deepcopy(base), examples, user_config(), DA, progress=False)
    layers = lora_layers(peft_model)
    got = {n: LoraFactors(l.lora_A["default"].weight.detach(), l.lora_B["default"].weight.detach())
           for n, l in layers.items()}
    assert {n: f.lora_A.shape[0] for n, f in got.items()} == RANKS
    assert_products(got, want)


def test_classification_peft_model_with_a_loss_fn():
    base = tiny_llama_classifier(seed=9)
    examples = classification_examples(10, seed=10)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    factors = initialize_lora_da_weights(peft_model, examples, DA, loss_fn=classification_loss, progress=False)
    ranks = {n: 4 for n in lora_layers(peft_model)}
    assert len(ranks) == 4
    assert_products(factors, expected(copy.deepcopy(base), examples, ranks, loss_fn=classification_loss))


def test_refusals():
    base = tiny_llama(seed=7)
    examples = random_examples(4, seed=8)
    peft_model = get_peft_model(copy.deepcopy(base), user_config())
    with pytest.raises(ConfigError, match="needs a peft.PeftModel"):
        initialize_lora_da_weights(base, examples, DA)
    with pytest.raises(ConfigError, match="read from the PeftModel"):
        get_lora_da_state_dict(peft_model, examples, DA, lora_config=user_config())
    with pytest.raises(ConfigError, match="no adapter 'other'"):
        get_lora_da_state_dict(peft_model, examples, DA, adapter_name="other")
    with pytest.raises(ConfigError, match="conflicts with LoraConfig.r"):
        get_lora_da_state_dict(peft_model, examples, LoraDAConfig(rank=8, population_size=5))
    with pytest.raises(ConfigError, match="give lora_config"):
        get_lora_da_state_dict(base, examples, DA)
    with pytest.raises(ConfigError, match="not both"):
        initialize_lora_da_weights(peft_model, examples, DA, lora_da_state_dict={})
    with pytest.raises(ConfigError, match="DoRA"):
        get_lora_da_state_dict(get_peft_model(copy.deepcopy(base), user_config(use_dora=True)), examples, DA)
    with pytest.raises(TargetError, match="rank 40 is larger"):
        get_lora_da_state_dict(base, examples, LoraDAConfig(rank=4, population_size=5),
                               lora_config=LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 40}))
