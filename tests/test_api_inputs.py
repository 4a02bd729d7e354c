"""The Python API's input checks (issues 8 and 14): bad input is a library error (ConfigError, DataError,
TargetError, NumericalError) raised before the data pass; a model or PeftModel it was not asked to
initialise is never modified; factors that would make an unusable adapter (NaN, zero) are an error
naming the module and the setting, before the model is wrapped."""
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from lora_da_fast import LoraDAConfig, collect_statistics, initialize_lora_da, solve_lora_da  # noqa: E402
from lora_da_fast import peft_integration  # noqa: E402
from lora_da_fast.errors import ConfigError, DataError, NumericalError, TargetError  # noqa: E402
from lora_da_fast.results import LoraFactors, check_factors  # noqa: E402

from .helpers import VOCAB, random_examples, tiny_gpt2, tiny_llama  # noqa: E402


def _forward_counter(model):
    calls = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def _lora_state(peft_model):
    return {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}


def test_api_bad_input_is_refused_before_the_pass():
    model = tiny_llama(seed=0)
    calls, h = _forward_counter(model)
    ex = random_examples(4, seed=1)
    cfg = LoraDAConfig(rank=20, population_size=4)
    with pytest.raises(TargetError, match=r"rank 20 is larger than min\(d_in, d_out\) = 16 of module "
                                          r"model.layers.0.self_attn.k_proj"):
        initialize_lora_da(model, ex, LoraConfig(r=20, target_modules="all-linear"), cfg, progress=False)
    with pytest.raises(TargetError, match="matches no module; linear module names in this model: down_proj"):
        initialize_lora_da(model, ex, LoraConfig(r=4, target_modules=["qproj"]),
                           LoraDAConfig(rank=4, population_size=4), progress=False)
    with pytest.raises(TargetError, match="'foo' match no module"):
        initialize_lora_da(model, ex, LoraConfig(r=4, target_modules=["q_proj", "foo"]),
                           LoraDAConfig(rank=4, population_size=4), progress=False)
    assert calls == []  # refused before any forward pass
    h.remove()
    for field, value in [("population_size", 0), ("population_size", -1), ("gamma", 0.0), ("gamma", -2.0),
                         ("damping", 0.0), ("damping", -1e-6), ("gamma", float("nan"))]:
        with pytest.raises(ConfigError, match=field):
            LoraDAConfig(**{field: value})
    with pytest.raises(DataError, match="no usable calibration example"):
        collect_statistics(model, [{"input_ids": torch.tensor([5]), "labels": torch.tensor([5])}],
                           LoraDAConfig(backend="torch"), progress=False)
    stats = collect_statistics(model, ex + [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100] * 3)}],
                               LoraDAConfig(backend="torch"), progress=False)
    assert (stats.num_examples, stats.num_skipped) == (4, 1)


def test_module_never_reached_is_named():
    model = tiny_llama(seed=0)
    model.model.layers[0].mlp.unused = torch.nn.Linear(32, 32)  # a target the forward pass never calls
    cfg = LoraDAConfig(rank=2, population_size=8, backend="torch")
    stats = collect_statistics(model, random_examples(4, seed=1), cfg, progress=False)
    with pytest.raises(NumericalError, match=r"module model\.layers\.0\.mlp\.unused has an all-zero gradient"):
        solve_lora_da(stats, cfg)


# --------------------------------------------------------------------------------------------------
# Models already wrapped, failed calls


def test_a_wrapped_model_is_refused_and_the_first_adapter_kept():
    model = tiny_llama(seed=0)
    ex = random_examples(6, seed=1)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    cfg = LoraDAConfig(rank=2, population_size=8, backend="torch")
    pm = initialize_lora_da(model, ex, lora, cfg, progress=False)
    first = _lora_state(pm)
    calls, h = _forward_counter(model)
    with pytest.raises(ConfigError, match=r"the model already holds PEFT adapter layers \(e\.g\. model\.layers\.0\."
                                          r"self_attn\.q_proj\).*wrapping it again would reset that adapter"):
        initialize_lora_da(model, ex, lora, cfg, progress=False)  # the base model, wrapped in place by the first
    with pytest.raises(ConfigError, match="the model is already a PeftModel: pass the base model"):
        initialize_lora_da(pm, ex, lora, cfg, progress=False)
    assert calls == []  # refused before the pass
    h.remove()
    after = _lora_state(pm)
    assert first.keys() == after.keys() and all(torch.equal(first[k], after[k]) for k in first)


def test_a_failed_call_leaves_the_model_as_given(monkeypatch):
    model = tiny_llama(seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ex = random_examples(6, seed=1)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    cfg = LoraDAConfig(rank=2, population_size=8, backend="torch")

    def broken(*a, **k):
        raise TargetError("simulated failure while copying the factors")

    monkeypatch.setattr(peft_integration, "apply_lora_da", broken)
    with pytest.raises(TargetError, match="simulated"):
        initialize_lora_da(model, ex, lora, cfg, progress=False)
    monkeypatch.undo()
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())  # unwrapped again
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    pm = initialize_lora_da(model, ex, lora, cfg, progress=False)  # and it can be initialised now
    assert any("lora_A" in k for k in _lora_state(pm))


# --------------------------------------------------------------------------------------------------
# Examples the model cannot take: library errors naming the limit, before the pass (issue 14, point 9)


def test_examples_beyond_the_model_are_refused_before_the_pass():
    model = tiny_llama(seed=0)
    cfg = LoraDAConfig(rank=2, population_size=8, backend="torch")
    calls, h = _forward_counter(model)
    ex = random_examples(4, seed=1)
    too_big = ex + [{"input_ids": torch.tensor([1, VOCAB + 5, 3])}]
    with pytest.raises(DataError, match=rf"has token id {VOCAB + 5}, outside the model's embedding of {VOCAB} rows "
                                        rf"\(ids 0 to {VOCAB - 1}\): the tokenizer does not match the model"):
        collect_statistics(model, too_big, cfg, progress=False)
    with pytest.raises(DataError, match="has token id -1"):
        collect_statistics(model, ex + [{"input_ids": torch.tensor([1, -1, 3])}], cfg, progress=False)
    with pytest.raises(DataError, match="is on the meta device"):
        collect_statistics(model, [{"input_ids": torch.zeros(5, dtype=torch.long, device="meta")}], cfg,
                           progress=False)
    with pytest.raises(DataError, match="outside the model's embedding"):
        initialize_lora_da(model, too_big, LoraConfig(r=2, target_modules=["q_proj"]), cfg, progress=False)
    # a memory plan probes the input groups with a forward: the examples are checked before it too
    auto = LoraDAConfig(rank=2, population_size=8, backend="torch", layers_per_pass="auto")
    with pytest.raises(DataError, match="outside the model's embedding"):
        collect_statistics(model, too_big, auto, progress=False)
    assert calls == []
    h.remove()
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    # learned positions (GPT-2: 128): an example longer than that is refused, naming the limit
    gpt2 = tiny_gpt2(seed=0)
    long_example = [{"input_ids": torch.randint(0, VOCAB, (130,))}]
    with pytest.raises(DataError, match="has 130 tokens, more than the model's 128 positions"):
        collect_statistics(gpt2, random_examples(2, seed=1) + long_example, cfg, progress=False)


def test_a_model_on_the_meta_device_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    cfg = LoraDAConfig(rank=2, population_size=8, backend="torch")
    with pytest.raises(ConfigError, match="the model's weights are on the meta device"):
        initialize_lora_da(model, random_examples(2), LoraConfig(r=2, target_modules=["q_proj"]), cfg, progress=False)
    with pytest.raises(ConfigError, match="the model's weights are on the meta device"):
        collect_statistics(model, random_examples(2), cfg, progress=False)


# --------------------------------------------------------------------------------------------------
# Factors that would make an unusable adapter (issue 14, point 4)


def test_broken_factors_are_an_error_before_the_model_is_wrapped():
    model = tiny_llama(seed=0)
    ex = random_examples(6, seed=1)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(NumericalError, match=r"the LoRA-DA factors of module model\.layers\.0\.self_attn\.q_proj are "
                                             r"zero .* likely cause: gamma = 1e\+308 is too large"):
        initialize_lora_da(model, ex, lora, LoraDAConfig(rank=2, population_size=8, gamma=1e308, backend="torch"),
                           progress=False)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    stats = collect_statistics(model, ex, LoraDAConfig(backend="torch", target_modules=["q_proj"]), progress=False)
    for solver in ("batched", "reference"):  # whichever solver, never NaN factors handed out
        cfg = LoraDAConfig(rank=2, population_size=1, beta=1e300, solver=solver, target_modules=["q_proj"])
        try:
            factors = solve_lora_da(stats, cfg)
        except NumericalError as exc:
            assert "are not finite (NaN or inf); likely cause: beta = 1e+300 is too large" in str(exc)
        else:
            assert all(torch.isfinite(f.lora_A).all() and torch.isfinite(f.lora_B).all() for f in factors.values())


def test_check_factors_names_the_module_and_the_setting():
    g = torch.Generator().manual_seed(0)
    ok = LoraFactors(torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g))
    check_factors({"a": ok, "b": ok})  # healthy: nothing raised
    nan_b = LoraFactors(ok.lora_A, ok.lora_B.clone().index_fill_(0, torch.tensor([3]), float("nan")))
    with pytest.raises(NumericalError, match=r"module b are not finite .*likely cause: beta = 1e\+20 is too large"):
        check_factors({"a": ok, "b": nan_b}, beta=1e20, gamma=1024.0)
    with pytest.raises(NumericalError, match="module b are not finite .*the module's statistics hold extreme values"):
        check_factors({"a": ok, "b": nan_b}, beta=0.03, gamma=1024.0)
    subnormal = LoraFactors(ok.lora_A * 1e-39, ok.lora_B)  # below float32's smallest normal: useless
    with pytest.raises(NumericalError, match="module a are zero .*the module's statistics are \\(nearly\\) zero"):
        check_factors({"a": subnormal, "b": ok}, beta=0.03, gamma=1024.0)
    zero = LoraFactors(torch.zeros(2, 8), ok.lora_B)
    with pytest.raises(NumericalError, match=r"module a are zero .*likely cause: gamma = 1e\+40 is too large"):
        check_factors({"a": zero}, gamma=1e40)
