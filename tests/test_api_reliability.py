"""The Python API's side of issue 23 ("Reliability III"), one test (or a few) per defect:

- 4: a model compiled by ``torch.compile`` is refused by every door before any forward (PEFT's order is
  get_peft_model, then compile), and any failure of a door (in the pass, the solve, get_peft_model, the
  writes; an exception or Ctrl-C) leaves the model exactly as found;
- 5: per-token labels outside the vocabulary are a DataError naming the example, before any forward
  (for the built-in causal-LM loss only: with a loss_fn, labels mean what it says);
- 13: numpy numbers are accepted wherever a number is meant, and stored as Python numbers;
- 14: a non-finite loss names the examples it comes from, in the API's words;
- 15: compat's named_grads is checked before the statistics pass.
"""
import json
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from lora_da_fast import (LoraDAConfig, collect_statistics, get_lora_da_state_dict, initialize_lora_da,  # noqa: E402
                          initialize_lora_da_weights, run_lora_da)
from lora_da_fast import engine, peft_integration  # noqa: E402
from lora_da_fast.compat import estimate_lora_da_initializations  # noqa: E402
from lora_da_fast.errors import ConfigError, DataError, NumericalError  # noqa: E402
from lora_da_fast.statistics.statistics_pass import StatisticsPass  # noqa: E402

from .cli_helpers import assert_user_error, cache, data, run, tiny_cache  # noqa: E402,F401
from .helpers import VOCAB, random_examples, tiny_llama  # noqa: E402

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
         "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
         "_load_state_dict_pre_hooks")


def _cfg(**kw):
    kw.setdefault("rank", 2)
    kw.setdefault("population_size", 8)
    kw.setdefault("backend", "torch")
    kw.setdefault("batch_size", 2)
    return LoraDAConfig(**kw)


def _forwards(model):
    """A list that grows by one per forward of ``model`` (a hook on its input embedding) and its handle."""
    calls = []
    return calls, model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))


def _state(model):
    """Everything a door could change in ``model``: its modules (no LoRA layer left), modes, hooks, each
    parameter's flag, .grad, dtype, device and storage, attributes, config, and the weights' values."""
    return {
        "modules": [(n, id(m)) for n, m in model.named_modules()],
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: tuple(tuple(getattr(m, h).items()) for h in HOOKS) for n, m in model.named_modules()},
        "params": {n: (p.requires_grad, p.grad, p.dtype, p.device, p.data_ptr()) for n, p in model.named_parameters()},
        "attributes": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "config": model.config.to_dict() if hasattr(model, "config") else None,
        "values": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    }


def _assert_same(before, after):
    for key in ("modules", "modes", "hooks", "attributes", "config"):
        assert before[key] == after[key], key
    assert before["params"].keys() == after["params"].keys()
    for n, (flag, grad, dtype, device, ptr) in before["params"].items():
        flag2, grad2, dtype2, device2, ptr2 = after["params"][n]
        assert (flag, dtype, device, ptr) == (flag2, dtype2, device2, ptr2), n
        assert grad is grad2, n
    assert all(torch.equal(v, after["values"][n]) for n, v in before["values"].items())
    assert all(torch.equal(v, after["grads"][n]) for n, v in before["grads"].items())


def _model_in_use():
    """A model as a user holds it: mixed modes, a frozen head, a .grad, their own hook, gradient
    checkpointing (PEFT adds an input hook for it)."""
    model = tiny_llama(seed=0)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    model.model.layers[0].eval()
    model.lm_head.weight.requires_grad_(False)
    model.model.norm.weight.grad = torch.ones_like(model.model.norm.weight)
    model.model.layers[1].register_forward_hook(lambda m, i, o: None)
    return model


# --------------------------------------------------------------------------------------------------
# 4. Compiled models; a failed door leaves the model as found


def test_a_compiled_model_is_refused_by_every_door_before_any_forward():
    model = tiny_llama(seed=0)
    compiled = torch.compile(model)  # the wrapper only: nothing is compiled until a forward
    before = _state(model)
    calls, h = _forwards(model)
    ex = random_examples(4, seed=1)
    lora = LoraConfig(r=2, target_modules="all-linear")
    doors = [
        lambda m: initialize_lora_da(m, ex, lora, _cfg(), progress=False),
        lambda m: get_lora_da_state_dict(m, ex, _cfg(), lora_config=lora, progress=False),
        lambda m: run_lora_da(m, ex, _cfg(), progress=False),
        lambda m: collect_statistics(m, ex, _cfg(), progress=False),
        lambda m: estimate_lora_da_initializations(m, ex, None, ["q_proj"], 2, 8, progress=False),
    ]
    match = (r"the model is compiled by torch.compile: .*pass the model as it was before torch.compile "
             r"\(model._orig_mod\) .*torch.compile\(peft_model\)")
    for door in doors:
        with pytest.raises(ConfigError, match=match):
            door(compiled)
    # a PeftModel compiled after get_peft_model (PEFT's order): initialise it before compiling
    peft_model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="compiled by torch.compile"):
        initialize_lora_da_weights(torch.compile(peft_model), ex, _cfg(), progress=False)
    # a PeftModel made on a compiled model, a compiled layer, a model compiled in place
    on_compiled = get_peft_model(torch.compile(tiny_llama(seed=0)), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="module base_model.model of the model is compiled"):
        initialize_lora_da_weights(on_compiled, ex, _cfg(), progress=False)
    layered = tiny_llama(seed=0)
    layered.model.layers[1] = torch.compile(layered.model.layers[1])
    with pytest.raises(ConfigError, match="module model.layers.1 of the model is compiled"):
        collect_statistics(layered, ex, _cfg(), progress=False)
    in_place = tiny_llama(seed=0)
    in_place.compile()
    with pytest.raises(ConfigError, match="the model is compiled by torch.compile"):
        initialize_lora_da(in_place, ex, lora, _cfg(), progress=False)
    assert calls == []
    h.remove()
    _assert_same(before, _state(model))


class Boom(RuntimeError):
    pass


def _fail_in_pass(monkeypatch, exc):
    real = StatisticsPass.step
    seen = []

    def step(self, batch):  # the second batch fails: hooks on, parameters frozen, modes set
        seen.append(1)
        if len(seen) == 2:
            raise exc
        return real(self, batch)

    monkeypatch.setattr(StatisticsPass, "step", step)


def _fail_in_solve(monkeypatch, exc):
    def solve(*a, **k):
        raise exc

    monkeypatch.setattr(engine, "solve_lora_da", solve)


def _fail_after_get_peft_model(monkeypatch, exc):
    real = peft_integration.get_peft_model

    def wrap(model, config):  # every LoRA layer in, the base frozen, PEFT's hook added
        real(model, config)
        raise exc

    monkeypatch.setattr(peft_integration, "get_peft_model", wrap)


def _fail_inside_get_peft_model(monkeypatch, exc):
    from peft.tuners.lora.model import LoraModel

    real = LoraModel._create_and_replace
    seen = []

    def create(self, *a, **k):  # three LoRA layers in, then the injection stops
        seen.append(1)
        if len(seen) == 4:
            raise exc
        return real(self, *a, **k)

    monkeypatch.setattr(LoraModel, "_create_and_replace", create)


def _on_third_write(monkeypatch, action) -> list:
    """``action()`` during the third ``copy_`` of each ``apply_lora_da`` (a write into the model); returns
    the list of the last call's writes (one entry each)."""
    real_apply = peft_integration.apply_lora_da
    real_copy = torch.Tensor.copy_
    seen = []

    def apply(*a, **k):
        seen.clear()

        def copy(self, *args, **kwargs):
            seen.append(1)
            if len(seen) == 3:
                action()
            return real_copy(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "copy_", copy)
        try:
            return real_apply(*a, **k)
        finally:
            monkeypatch.setattr(torch.Tensor, "copy_", real_copy)

    monkeypatch.setattr(peft_integration, "apply_lora_da", apply)
    return seen


def _fail_in_writes(monkeypatch, exc):  # the third write into a LoRA weight fails
    def fail():
        raise exc

    _on_third_write(monkeypatch, fail)


FAILURES = {"pass": _fail_in_pass, "solve": _fail_in_solve, "get_peft_model": _fail_after_get_peft_model,
            "inside get_peft_model": _fail_inside_get_peft_model, "writes": _fail_in_writes}


@pytest.mark.parametrize("exc", [Boom("injected"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("where", list(FAILURES))
def test_initialize_lora_da_that_fails_leaves_the_model_as_found(where, exc, monkeypatch):
    model = _model_in_use()
    before = _state(model)
    FAILURES[where](monkeypatch, exc)
    with pytest.raises(type(exc)):
        initialize_lora_da(model, random_examples(6, seed=1), LoraConfig(r=2, target_modules="all-linear"), _cfg(),
                           progress=False)
    monkeypatch.undo()
    _assert_same(before, _state(model))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    if where == "writes":  # and the model can be initialised now
        pm = initialize_lora_da(model, random_examples(6, seed=1), LoraConfig(r=2, target_modules="all-linear"),
                                _cfg(), progress=False)
        assert any(isinstance(m, BaseTunerLayer) for m in pm.modules())


def test_ctrl_c_during_the_writes_lets_them_finish(monkeypatch):
    """SIGINT while the factors (and subtract_init's base weights) are written: the writes finish, then
    the interrupt is raised; the model is complete, as an uninterrupted call leaves it."""
    lora = LoraConfig(r=2, target_modules="all-linear")
    ex = random_examples(6, seed=1)
    done = tiny_llama(seed=0)
    initialize_lora_da(done, ex, lora, _cfg(), subtract_init=True, progress=False)
    seen = _on_third_write(monkeypatch, lambda: signal.raise_signal(signal.SIGINT))  # Ctrl-C in the third write
    model = tiny_llama(seed=0)
    with pytest.raises(KeyboardInterrupt):
        initialize_lora_da(model, ex, lora, _cfg(), subtract_init=True, progress=False)
    monkeypatch.undo()
    assert len(seen) > 3  # the writes went on after the signal
    expected = done.state_dict()
    got = model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize("where", ["pass", "solve", "writes"])
def test_initialize_lora_da_weights_that_fails_leaves_the_peft_model_as_found(where, monkeypatch):
    peft_model = get_peft_model(_model_in_use(), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    before = _state(peft_model)
    FAILURES[where](monkeypatch, KeyboardInterrupt() if where == "pass" else Boom("injected"))
    with pytest.raises((Boom, KeyboardInterrupt)):
        initialize_lora_da_weights(peft_model, random_examples(6, seed=1), _cfg(), progress=False)
    monkeypatch.undo()
    _assert_same(before, _state(peft_model))  # LoRA weights, flags, the adapter enabled


@pytest.mark.parametrize("where", ["pass", "solve"])
def test_run_lora_da_that_fails_leaves_the_model_as_found(where, monkeypatch):
    model = _model_in_use()
    before = _state(model)
    FAILURES[where](monkeypatch, Boom("injected"))
    with pytest.raises(Boom):
        run_lora_da(model, random_examples(6, seed=1), _cfg(), progress=False)
    monkeypatch.undo()
    _assert_same(before, _state(model))


# --------------------------------------------------------------------------------------------------
# 5. Labels outside the vocabulary


@pytest.mark.parametrize("label", [99999, VOCAB, -5])
def test_labels_outside_the_vocabulary_are_refused_before_any_forward(label):
    model = tiny_llama(seed=0)
    calls, h = _forwards(model)
    ex = random_examples(6, seed=1)
    ex[3] = {"input_ids": ex[3]["input_ids"], "labels": ex[3]["labels"].clone()}
    ex[3]["labels"][2] = label
    match = (rf"example 3 has label {label}, outside the model's vocabulary of {VOCAB} tokens "
             rf"\(labels 0 to {VOCAB - 1}, or -100 for no loss\)")
    with pytest.raises(DataError, match=match):
        collect_statistics(model, ex, _cfg(), progress=False)
    with pytest.raises(DataError, match=match):
        initialize_lora_da(model, ex, LoraConfig(r=2, target_modules=["q_proj"]), _cfg(), progress=False)
    assert calls == []
    h.remove()
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_labels_mean_what_a_loss_fn_says():
    """With a loss_fn, per-token labels are the loss_fn's (here: ignored; any value), never refused."""
    model = tiny_llama(seed=0)

    def loss(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
        return (ce * batch["attention_mask"][:, 1:]).sum(1) / batch["attention_mask"][:, 1:].sum(1).clamp(min=1)

    ex = [{"input_ids": e["input_ids"], "labels": torch.full_like(e["input_ids"], 99999)}
          for e in random_examples(4, seed=1)]
    stats = collect_statistics(model, ex, _cfg(), progress=False, loss_fn=loss)
    assert stats.num_examples == 4


# --------------------------------------------------------------------------------------------------
# 13. numpy numbers


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers():
    cfg = LoraDAConfig(rank=np.int32(4), population_size=np.int64(100), beta=np.float32(0.5), alpha=np.int64(1),
                       gamma=np.float64(1024.0), damping=np.float32(1e-6), max_damping=np.float64(1.0),
                       output_damping_ratio=np.float64(0.1), batch_size=np.int64(2), layers_per_pass=np.uint8(1),
                       seed=np.uint64(3))
    plain = LoraDAConfig(rank=4, population_size=100, beta=float(np.float32(0.5)), alpha=1, gamma=1024.0,
                         damping=float(np.float32(1e-6)), max_damping=1.0, output_damping_ratio=0.1, batch_size=2,
                         layers_per_pass=1, seed=3)
    assert cfg == plain and cfg.to_dict() == plain.to_dict()
    assert [type(v) for v in cfg.to_dict().values()] == [type(v) for v in plain.to_dict().values()]
    assert json.dumps(cfg.to_dict()) == json.dumps(plain.to_dict())
    model = tiny_llama(seed=0)
    ex = random_examples(3, seed=1)
    assert engine.fingerprint(model, ex, cfg) == engine.fingerprint(model, ex, plain)
    for bad in (dict(rank=True), dict(population_size=np.bool_(True)), dict(gamma=False), dict(seed=np.float64(1))):
        with pytest.raises(ConfigError):
            LoraDAConfig(**bad)
    # per-module ranks, num_examples, compat's integers and reals
    assert cfg.module_ranks(["a", "b"], {"a": np.int64(2)}) == {"a": 2, "b": 4}
    assert type(cfg.module_ranks(["a"], {"a": np.int64(2)})["a"]) is int
    stats = collect_statistics(model, ex, _cfg(), progress=False, num_examples=np.int64(2))
    assert stats.num_examples == 2
    out = estimate_lora_da_initializations(model, ex, None, ["q_proj"], np.int64(2), np.int64(100),
                                           batch_size=np.int32(2), variance_beta=np.float32(0.0),
                                           delta_normalization_power=np.float64(1.0), progress=False)
    assert all(f["lora_A"].shape[0] == 2 for f in out.values())


# --------------------------------------------------------------------------------------------------
# 14. Non-finite losses: the examples they come from, in the API's words


def test_a_loss_fn_nan_names_its_example_only():
    model = tiny_llama(seed=0)
    ex = random_examples(6, seed=1)
    poisoned = int(ex[4]["input_ids"][0])
    assert sum(int(e["input_ids"][0]) == poisoned for e in ex) == 1

    def loss(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none").mean(1)
        return torch.where(batch["input_ids"][:, 0] == poisoned, ce * float("nan"), ce)

    with pytest.raises(NumericalError) as err:
        collect_statistics(model, ex, _cfg(batch_size=6), progress=False, loss_fn=loss)
    msg = str(err.value)
    assert "loss_fn returned a non-finite loss on examples 4 (" in msg, msg
    assert "--dtype" not in msg


def test_an_overflow_names_the_examples_where_it_is_in_the_api_words():
    ex = random_examples(6, seed=1, min_len=4)
    hot = int(ex[2]["input_ids"][1])
    ex = [e if i == 2 else {k: v.masked_fill(v == hot, (hot + 1) % VOCAB) for k, v in e.items()}
          for i, e in enumerate(ex)]  # the token only example 2 holds
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[hot] = float("inf")  # a broken row of the weights
    with pytest.raises(NumericalError) as err:
        collect_statistics(model, ex, _cfg(batch_size=6), progress=False)
    msg = str(err.value)
    assert ("non-finite values first appear in the output of module model.embed_tokens on examples 2 (the model "
            "already runs in float32: check its weights and these examples)") in msg, msg
    half = tiny_llama(seed=0, dtype=torch.float16)
    with torch.no_grad():  # MLP activations of layer 1 beyond float16's range (65504), fine in float32
        half.model.layers[1].mlp.up_proj.weight.mul_(3000)
        half.model.layers[1].mlp.gate_proj.weight.mul_(3000)
    with pytest.raises(NumericalError) as err:
        collect_statistics(half, random_examples(2, seed=1), _cfg(batch_size=1), progress=False)
    msg = str(err.value)
    assert "(overflow in the model's dtype? run the model in float32, e.g. model.float())" in msg, msg
    assert "--dtype" not in msg


def test_the_cli_keeps_its_own_words_for_an_overflow(cache, data, tmp_path, capsys):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from lora_da_fast.cli import builtins as bi

    model_dir = tmp_path / "hot"
    shutil.copytree(bi.tiny_llama_folder(), model_dir)
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight.mul_(3000)
        m.model.layers[1].mlp.gate_proj.weight.mul_(3000)
    m.save_pretrained(model_dir)
    capsys.readouterr()  # what loading and saving printed
    rc, _, err = run(["init", "--model", model_dir, "--data", data, "--out", tmp_path / "o", "--rank", "4",
                      "--max-length", "32", "--batch-size", "1", "--device", "cpu", "--quiet", "--dtype",
                      "float16"], capsys)
    assert_user_error(rc, err, "(overflow in the model's dtype? try --dtype float32) [--data line ")
    assert "model.float()" not in err


# --------------------------------------------------------------------------------------------------
# 15. compat's named_grads, before the statistics pass


@pytest.mark.parametrize("grads,error,match", [
    ("missing", DataError, "no entry 'model.layers.1.self_attn.q_proj.weight'"),
    ("shape", DataError, r"has shape \(3, 3\), the module's weight is \(32, 32\)"),
    ("nan", NumericalError, r"named_grads\['model.layers.1.self_attn.q_proj.weight'\] holds NaN or inf"),
    ("integer", DataError, "must be a floating-point tensor, got dtype torch.int64"),
])
def test_named_grads_are_checked_before_the_pass(grads, error, match):
    model = tiny_llama(seed=0)
    calls, h = _forwards(model)
    key = "model.layers.1.self_attn.q_proj.weight"
    named = {n + ".weight": torch.zeros(32, 32) for n in ("model.layers.0.self_attn.q_proj",
                                                          "model.layers.1.self_attn.q_proj")}
    if grads == "missing":
        del named[key]
    elif grads == "shape":
        named[key] = torch.zeros(3, 3)
    elif grads == "nan":
        named[key] = torch.full((32, 32), float("nan"))
    else:
        named[key] = torch.zeros(32, 32, dtype=torch.long)
    with pytest.raises(error, match=match):
        estimate_lora_da_initializations(model, random_examples(4, seed=1), named, ["q_proj"], 2, 8, progress=False)
    assert calls == []
    h.remove()
