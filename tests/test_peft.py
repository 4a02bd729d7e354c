"""PEFT integration: factors land in lora_A/lora_B, stock-PEFT round trip, subtract_init, errors.

Logit tolerances. A stock-PEFT reload runs the very same fp32 operations on the very same weights as
the initialised model, so its logits must be bit-identical (``torch.equal``). ``subtract_init`` changes
the computation: ``(W0 - s B A) x + s B (A x)`` instead of ``W0 x``; the rounding of the stored
``W0 - s B A`` (half an ulp per entry, relative ``eps32/2 * |s B A| / |W0|`` at most ``eps32``) and of
the two extra fp32 products give a relative error of a few ``eps32 = 1.2e-7`` per layer, amplified by
depth; measured 1e-7 to 3e-7 on these 2-layer models, so ``SUBTRACT_RTOL = 1e-5`` leaves a wide margin while
staying far below the LoRA-DA update itself (checked: > 1e-3 relative without subtract_init).
"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from lora_da_fast import ConfigError, LoraDAConfig, TargetError, collect_statistics, solve_lora_da  # noqa: E402
from lora_da_fast.peft_integration import (  # noqa: E402
    apply_lora_da, initialize_lora_da, lora_layers, resolve_lora_da_config)
from lora_da_fast.targets import lora_target_names  # noqa: E402

SUBTRACT_RTOL = 1e-5
VOCAB = 64


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def make_examples(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (int(torch.randint(5, 14, (1,), generator=g)),), generator=g)}
            for _ in range(n)]


def probe_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, VOCAB, (2, 10), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def lora_cfg(**kw):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **kw}
    return LoraConfig(**kw)


def da_cfg(**kw):
    return LoraDAConfig(**{"rank": 4, "population_size": 100, **kw})


@pytest.fixture(params=sorted(MODELS))
def kind(request):
    return request.param


def test_factors_land_in_lora_weights_exactly(kind):
    model = MODELS[kind]()
    ref = copy.deepcopy(model)
    lc = lora_cfg()
    names = lora_target_names(model, lc)
    cfg = resolve_lora_da_config(lc, da_cfg(), names)
    stats = collect_statistics(ref, make_examples(), cfg, progress=False)
    expected = solve_lora_da(stats, cfg)

    pm = initialize_lora_da(model, make_examples(), lc, da_cfg(), progress=False)
    assert isinstance(pm, PeftModel)
    assert pm.base_model.model is model  # the user's model object is the one wrapped
    layers = lora_layers(pm)
    assert sorted(layers) == sorted(names) == sorted(expected)
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A["default"].weight, expected[name].lora_A)
        assert torch.equal(layer.lora_B["default"].weight, expected[name].lora_B)


@pytest.mark.parametrize("rslora", [False, True])
def test_round_trip_with_stock_peft(kind, rslora, tmp_path):
    base = MODELS[kind]()
    model = copy.deepcopy(base)
    pm = initialize_lora_da(model, make_examples(), lora_cfg(use_rslora=rslora), da_cfg(), progress=False)
    ids = probe_batch()
    init_logits = logits(pm, ids)
    base_logits = logits(base, ids)
    assert rel(init_logits, base_logits) > 1e-3  # the adapter is not a no-op (LoRA-DA starts at W0 + s B A)

    pm.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert torch.equal(logits(reloaded, ids), init_logits)


def test_scaling_follows_peft(kind):
    for rslora, expected in ((False, 8 / 4), (True, 8 / 2)):
        pm = initialize_lora_da(MODELS[kind](), make_examples(), lora_cfg(use_rslora=rslora), da_cfg(),
                                progress=False)
        assert all(layer.scaling["default"] == pytest.approx(expected) for layer in lora_layers(pm).values())


def test_subtract_init_keeps_base_logits(kind):
    base = MODELS[kind]()
    pm = initialize_lora_da(copy.deepcopy(base), make_examples(), lora_cfg(use_rslora=True), da_cfg(),
                            subtract_init=True, progress=False)
    ids = probe_batch()
    assert rel(logits(pm, ids), logits(base, ids)) < SUBTRACT_RTOL
    with pm.disable_adapter():  # the residual base alone is a different model
        assert rel(logits(pm, ids), logits(base, ids)) > 1e-3


def test_subtract_init_conversion_to_plain_lora(kind, tmp_path):
    """The documented workflow: save the initial adapter, train, save with
    path_initial_model_for_weight_conversion; the result is a plain LoRA of the unmodified base."""
    base = MODELS[kind]()
    pm = initialize_lora_da(copy.deepcopy(base), make_examples(), lora_cfg(), da_cfg(), subtract_init=True,
                            progress=False)
    init_dir = tmp_path / "init"
    pm.save_pretrained(str(init_dir))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stand-in for training: move every LoRA weight
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    ids = probe_batch()
    trained = logits(pm, ids)
    pm.save_pretrained(str(tmp_path / "final"), path_initial_model_for_weight_conversion=str(init_dir))
    plain = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "final"))
    assert rel(logits(plain, ids), trained) < SUBTRACT_RTOL


def test_subtract_init_conv1d_transposes():
    """GPT-2's Conv1D stores W as d_in x d_out: the subtraction must follow (c_attn is 32 x 96)."""
    base = tiny_gpt2()
    pm = initialize_lora_da(copy.deepcopy(base), make_examples(), lora_cfg(), da_cfg(), subtract_init=True,
                            progress=False)
    layer = lora_layers(pm)["transformer.h.0.attn.c_attn"]
    W0 = base.transformer.h[0].attn.c_attn.weight
    delta = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    assert torch.allclose(layer.get_base_layer().weight, W0 - delta.T, rtol=0, atol=1e-7)


def test_stats_argument_skips_the_data_pass():
    model = tiny_llama()
    lc = lora_cfg(target_modules=["q_proj", "v_proj"])
    names = lora_target_names(model, lc)
    stats = collect_statistics(copy.deepcopy(model), make_examples(), resolve_lora_da_config(lc, da_cfg(), names),
                               progress=False)
    pm = initialize_lora_da(model, None, lc, da_cfg(), stats=stats, progress=False)
    assert sorted(lora_layers(pm)) == sorted(names)


def test_targets_follow_peft_matching():
    model = tiny_llama()
    lc = lora_cfg(target_modules=["q_proj", "down_proj"], layers_to_transform=[1])
    names = lora_target_names(model, lc)
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    pm = initialize_lora_da(model, make_examples(), lc, da_cfg(), progress=False)
    assert sorted(lora_layers(pm)) == sorted(names)
    excl = lora_target_names(tiny_llama(), lora_cfg(exclude_modules=["o_proj", "gate_proj"]))
    assert len(excl) == 10 and not any(n.endswith(("o_proj", "gate_proj")) for n in excl)
    assert "lm_head" not in " ".join(lora_target_names(tiny_llama(), lora_cfg()))
    regex = lora_target_names(tiny_llama(), lora_cfg(target_modules=r".*\.0\.mlp\..*_proj"))
    assert regex == [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    default = lora_target_names(tiny_llama(), lora_cfg(target_modules=None))  # PEFT's Llama default: q, v
    assert [n.split(".")[-1] for n in default] == ["q_proj", "v_proj"] * 2


def test_half_precision_model_keeps_fp32_adapter():
    model = tiny_llama().to(torch.bfloat16)
    lc = lora_cfg()
    names = lora_target_names(model, lc)
    cfg = resolve_lora_da_config(lc, da_cfg(), names)
    expected = solve_lora_da(collect_statistics(copy.deepcopy(model), make_examples(), cfg, progress=False), cfg)
    pm = initialize_lora_da(model, make_examples(), lc, da_cfg(), progress=False)
    for name, layer in lora_layers(pm).items():
        A = layer.lora_A["default"].weight
        assert A.dtype == torch.float32  # PEFT's autocast_adapter_dtype keeps adapters in fp32
        assert torch.equal(A, expected[name].lora_A)


def test_errors():
    ex = make_examples()
    with pytest.raises(ConfigError, match="conflicts with LoraConfig.r=4"):
        initialize_lora_da(tiny_llama(), ex, lora_cfg(), da_cfg(rank=8), progress=False)
    with pytest.raises(ConfigError, match="population_size is required"):
        initialize_lora_da(tiny_llama(), ex, lora_cfg(), LoraDAConfig(rank=4), progress=False)
    with pytest.raises(ConfigError, match="population_size is required"):
        initialize_lora_da(tiny_llama(), ex, lora_cfg(r=8), None, progress=False)
    with pytest.raises(TargetError, match="matches no module"):
        initialize_lora_da(tiny_llama(), ex, lora_cfg(target_modules=["nope"]), da_cfg(), progress=False)
    with pytest.raises(TargetError, match="Linear and Conv1D layers only"):
        initialize_lora_da(tiny_llama(), ex, lora_cfg(target_modules=["embed_tokens"]), da_cfg(), progress=False)
    with pytest.raises(ConfigError, match="another initialisation"):
        initialize_lora_da(tiny_llama(), ex, lora_cfg(init_lora_weights="pissa"), da_cfg(), progress=False)
    with pytest.raises(ConfigError, match="DoRA"):
        initialize_lora_da(tiny_llama(), ex, lora_cfg(use_dora=True), da_cfg(), progress=False)
    with pytest.raises(ConfigError, match="target_modules is ignored"):
        initialize_lora_da(tiny_llama(), ex, lora_cfg(), da_cfg(target_modules=["q_proj"]), progress=False)
    with pytest.raises(ConfigError, match="peft.LoraConfig"):
        initialize_lora_da(tiny_llama(), ex, {"r": 4}, da_cfg(), progress=False)


def test_error_leaves_model_unwrapped():
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ConfigError):
        initialize_lora_da(model, make_examples(), lora_cfg(), da_cfg(rank=8), progress=False)
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_apply_checks_factor_coverage():
    from peft import get_peft_model

    model = tiny_llama()
    lc = lora_cfg()
    names = lora_target_names(model, lc)
    cfg = resolve_lora_da_config(lc, da_cfg(), names)
    result = solve_lora_da(collect_statistics(model, make_examples(), cfg, progress=False), cfg)
    pm = get_peft_model(model, lc)
    partial = {n: f for n, f in result.items() if "q_proj" not in n}
    with pytest.raises(TargetError, match="without factors"):
        apply_lora_da(pm, partial)
