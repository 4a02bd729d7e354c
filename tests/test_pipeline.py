"""Streaming a model through several statistics passes gives the same factors as one pass."""
import pytest
import torch

from lora_da_fast import LoraDAConfig, collect_statistics, solve_lora_da
from lora_da_fast.pipeline import layer_of, plan_slices, run_lora_da
from lora_da_fast.targets import find_target_modules

from .helpers import random_examples, rel_err, tiny_gpt2, tiny_llama
from .tolerances import TOL


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
            a = res[name].lora_B.double() @ res[name].lora_A.double()
            b = ref[name].lora_B.double() @ ref[name].lora_A.double()
            assert rel_err(a, b) < TOL["solver_contract"], name


def test_plan_auto_on_cpu_is_one_pass():
    model = tiny_llama()
    targets = find_target_modules(model, "all-linear")
    slices, info = plan_slices(targets, LoraDAConfig(layers_per_pass="auto"))
    assert len(slices) == 1 and info["passes"] == 1 and sum(map(len, slices)) == len(targets)
    slices, info = plan_slices(targets, LoraDAConfig(layers_per_pass=1))
    assert [len(s) for s in slices] == [7, 7]
