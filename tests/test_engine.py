"""The engine: streaming a model through several statistics passes gives the same factors as one pass,
in every entry point (``run_lora_da``, ``collect_statistics``, ``initialize_lora_da``); checkpoints of a
streamed run resume bit-identically."""
import os

import pytest
import torch
from peft import LoraConfig

from lora_da_fast import LoraDAConfig, collect_statistics, initialize_lora_da, solve_lora_da
from lora_da_fast import checkpoint as ckpt
from lora_da_fast.engine import RunOptions, run_lora_da
from lora_da_fast.peft_integration import lora_layers
from lora_da_fast.plan import layer_of, plan_slices
from lora_da_fast.targets import find_target_modules

from .helpers import interrupt_after, random_examples, rel_err, tiny_gpt2, tiny_llama
from .tolerances import TOL


def _product(f):
    return f.lora_B.double() @ f.lora_A.double()


def test_layer_of():
    assert layer_of("model.layers.3.mlp.up_proj") == "model.layers.3"
    assert layer_of("transformer.h.11.attn.c_attn") == "transformer.h.11"
    assert layer_of("score") == ""


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_layers_per_pass_equals_one_pass(make):
    model = make()
    ex = random_examples(6, seed=3)
    one = LoraDAConfig(rank=2, population_size=100, batch_size=4, backend="torch")
    ref = solve_lora_da(collect_statistics(model, ex, one, progress=False), one)
    for lpp in (None, 1):
        cfg = LoraDAConfig(rank=2, population_size=100, batch_size=4, backend="torch", layers_per_pass=lpp)
        res = run_lora_da(model, ex, cfg, progress=False)
        assert list(res) == list(ref)
        assert res.info["plan"]["passes"] == (1 if lpp is None else 2)
        assert res.info["examples"] == 6
        for name in ref:
            assert rel_err(_product(res[name]), _product(ref[name])) < TOL["solver_contract"], name


def test_collect_statistics_streams_with_layers_per_pass():
    """``collect_statistics`` honours ``layers_per_pass``: the statistics of two slices, merged, are the
    one-pass statistics (bit for bit: every sum is the same sum in the same order)."""
    model = tiny_llama()
    ex = random_examples(6, seed=4)
    one = collect_statistics(model, ex, LoraDAConfig(batch_size=4, backend="torch"), progress=False)
    two = collect_statistics(model, ex, LoraDAConfig(batch_size=4, backend="torch", layers_per_pass=1),
                             progress=False)
    assert list(two.modules) == list(one.modules) and list(two.Z) == list(one.Z)
    for name, st in one.modules.items():
        assert torch.equal(two.modules[name].G, st.G) and torch.equal(two.modules[name].y, st.y)
    for g, z in one.Z.items():
        assert torch.equal(two.Z[g], z)


def test_initialize_lora_da_streams_with_layers_per_pass(monkeypatch):
    """``initialize_lora_da(..., LoraDAConfig(layers_per_pass=1))`` runs one pass per layer (counted at the
    model's forward) and gives the adapter of one pass."""
    ex = random_examples(6, seed=5)
    lc = dict(r=2, lora_alpha=4, target_modules="all-linear")
    adapters = {}
    for lpp in (None, 1):
        model = tiny_llama(seed=1)
        calls = []
        handle = model.register_forward_hook(lambda m, a, o: calls.append(1))
        cfg = LoraDAConfig(rank=2, population_size=100, batch_size=3, backend="torch", layers_per_pass=lpp)
        pm = initialize_lora_da(model, ex, LoraConfig(**lc), cfg, progress=False)
        handle.remove()
        probes = 1 if lpp is None else 2  # each pass probes the input groups with one short forward
        batches = 2  # 6 examples, batch size 3
        assert len(calls) == probes * (1 + batches), (lpp, len(calls))
        adapters[lpp] = {n: (l.lora_B["default"].weight.double() @ l.lora_A["default"].weight.double())
                         for n, l in lora_layers(pm).items()}
    assert len(adapters[None]) == 14
    for name, ref in adapters[None].items():
        assert rel_err(adapters[1][name], ref) < TOL["solver_contract"], name


def test_streamed_checkpoint_resumes_bit_identically(tmp_path, monkeypatch):
    """A streamed run killed in its second pass resumes from the checkpoint (the first slice's statistics
    are in it) and gives the factors of an uninterrupted run, bit for bit."""
    model = tiny_llama()
    ex = random_examples(10, seed=6)
    cfg = LoraDAConfig(rank=2, population_size=100, batch_size=2, backend="torch", layers_per_pass=1)
    ref = run_lora_da(model, ex, cfg, progress=False)
    ck = str(tmp_path / "run.ckpt")
    interrupt_after(monkeypatch, 6, slice_index=1)
    with pytest.raises(KeyboardInterrupt):
        run_lora_da(model, ex, cfg, progress=False, options=RunOptions(checkpoint=ck, checkpoint_every=2))
    monkeypatch.undo()
    meta = ckpt.peek(ck)
    assert meta["slice"] == 1 and meta["done"] == 6
    got = run_lora_da(model, ex, cfg, progress=False, options=RunOptions(checkpoint=ck, checkpoint_every=2))
    assert got.info["resumed_from_examples"] == 6 and not os.path.exists(ck)
    for name in ref:
        assert torch.equal(got[name].lora_A, ref[name].lora_A) and torch.equal(got[name].lora_B, ref[name].lora_B)


def test_plan_auto_on_cpu_is_one_pass():
    model = tiny_llama()
    targets = find_target_modules(model, "all-linear")
    slices, info = plan_slices(targets, LoraDAConfig(layers_per_pass="auto"))
    assert len(slices) == 1 and info["passes"] == 1 and sum(map(len, slices)) == len(targets)
    slices, info = plan_slices(targets, LoraDAConfig(layers_per_pass=1))
    assert [len(s) for s in slices] == [7, 7]


# --------------------------------------------------------------------------------------------------
# Every check of a run is the engine's, before any forward (the whole pass is never lost to a setting)


def _forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("cfg, ranks, error, match", [
    (dict(rank=40, population_size=10), None, "TargetError", "rank 40 is larger than min(d_in, d_out) = 16 of module "
                                                              "model.layers.0.self_attn.k_proj"),
    (dict(rank=2), None, "ConfigError", "population_size is required when beta > 0"),
    (dict(rank=2, population_size=10), {"model.layers.1.mlp.down_proj": 33}, "TargetError",
     "rank 33 is larger than min(d_in, d_out) = 32 of module model.layers.1.mlp.down_proj"),
    (dict(rank=2, population_size=10), {"model.layers.1.mlp.nope": 2}, "ConfigError", "not targets"),
    (dict(rank=2, population_size=10), {"model.layers.1.mlp.down_proj": 0}, "ConfigError", "positive integer"),
])
def test_run_lora_da_checks_everything_before_any_forward(cfg, ranks, error, match):
    """``run_lora_da`` with a rank above ``min(d_in, d_out)``, without ``population_size`` (beta > 0), or with
    bad per-module ranks fails before the statistics pass: no forward of the model is run."""
    from lora_da_fast import errors

    model = tiny_llama()
    calls, handle = _forwards(model)
    with pytest.raises(getattr(errors, error), match=match.replace("(", r"\(").replace(")", r"\)")):
        run_lora_da(model, random_examples(6, seed=1), LoraDAConfig(batch_size=2, backend="torch", **cfg),
                    progress=False, ranks=ranks)
    handle.remove()
    assert calls == []


def test_statistics_alone_need_no_rank_or_population():
    """``solve=False`` (``collect_statistics``): rank and ``population_size`` play no part, nothing refused."""
    model = tiny_llama()
    stats = collect_statistics(model, random_examples(3, seed=1), LoraDAConfig(rank=40, batch_size=2, backend="torch"),
                               progress=False)
    assert len(stats.modules) == 14


def test_every_door_checks_before_any_forward():
    """The PEFT doors and compat reach the engine's one check: no forward before the refusal."""
    from lora_da_fast.compat import estimate_lora_da_initializations
    from lora_da_fast.errors import ConfigError, TargetError
    from lora_da_fast.peft_integration import get_lora_da_state_dict

    ex = random_examples(4, seed=2)
    doors = [
        (lambda m: initialize_lora_da(m, ex, LoraConfig(r=2, target_modules=["q_proj"]), LoraDAConfig(rank=2),
                                      progress=False), ConfigError, "population_size is required"),
        (lambda m: initialize_lora_da(m, ex, LoraConfig(r=2, target_modules=["k_proj"], rank_pattern={"k_proj": 40}),
                                      LoraDAConfig(rank=2, population_size=10), progress=False),
         TargetError, "rank 40 is larger"),
        (lambda m: get_lora_da_state_dict(m, ex, LoraDAConfig(rank=40, population_size=10),
                                          lora_config=LoraConfig(r=40, target_modules=["q_proj"]), progress=False),
         TargetError, "rank 40 is larger"),
        (lambda m: estimate_lora_da_initializations(m, ex, None, ["q_proj"], 40, 10, variance_beta=0.1, progress=False),
         TargetError, "rank 40 is larger"),
        (lambda m: estimate_lora_da_initializations(m, ex, None, ["q_proj"], 2, None, variance_beta=0.1,
                                                    progress=False), ConfigError, "population_size is required"),
    ]
    for i, (door, error, match) in enumerate(doors):
        model = tiny_llama()
        calls, handle = _forwards(model)
        with pytest.raises(error, match=match):
            door(model)
        handle.remove()
        assert calls == [], i
        assert all(p.requires_grad for p in model.parameters()), i  # left as found
