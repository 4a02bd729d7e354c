"""The statistics pass against a float64 brute force, its invariances, and what it leaves behind."""
import random
import warnings

import pytest
import torch

from lora_da_fast import FisherStatistics, LoraDAConfig, collect_statistics
from lora_da_fast.errors import DataError, TargetError

from .helpers import (brute_force_statistics, pad_batch, random_examples, rel_err, tiny_gpt2, tiny_llama)
from .tolerances import TOL

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _compare(stats: FisherStatistics, ref, tol: float) -> float:
    assert stats.num_examples == ref["n"]
    assert stats.num_tokens == ref["T"]
    worst = 0.0
    for name, st in stats.modules.items():
        for got, want in ((st.G, ref["G"][name]), (stats.dense_Z(st.group), ref["Z"][name]), (st.y, ref["y"][name])):
            err = rel_err(got, want)
            worst = max(worst, err)
            assert err < tol, (name, err)
        if st.seq_sums is not None:  # rows are per example, in batching order: compare Gram matrices
            err = rel_err(st.seq_sums.T @ st.seq_sums, ref["seq"][name].T @ ref["seq"][name])
            worst = max(worst, err)
            assert err < tol, (name, "seq", err)
    return worst


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("token_mask", ["attention", "labels"])
def test_matches_float64_brute_force(arch, token_mask):
    model = MODELS[arch]()
    examples = random_examples(7, seed=1, prompt_frac=0.4 if token_mask == "labels" else 0.0)
    cfg = LoraDAConfig(batch_size=3, token_mask=token_mask, output_fisher="sequence_lowrank", backend="torch")
    stats = collect_statistics(model, examples, cfg, progress=False)
    ref = brute_force_statistics(model, examples, token_mask=token_mask)
    worst = _compare(stats, ref, TOL["stats_fp32_vs_fp64"])
    print(f"{arch}/{token_mask}: worst relative error vs float64 brute force {worst:.2e}")


def test_groups_detected_from_shared_inputs():
    stats = collect_statistics(tiny_llama(), random_examples(2), LoraDAConfig(backend="torch"), progress=False)
    groups = stats.groups()
    assert groups["model.layers.0.self_attn.q_proj"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert groups["model.layers.1.mlp.gate_proj"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert len(groups) == 8  # 4 input groups per layer
    gpt = collect_statistics(tiny_gpt2(), random_examples(2), LoraDAConfig(backend="torch"), progress=False)
    assert len(gpt.Z) == len(gpt.modules) == 8  # every GPT-2 Conv1D has its own input
    assert "lm_head" not in gpt.modules


def _stats(model, examples, **kw):
    kw.setdefault("backend", "torch")
    return collect_statistics(model, examples, LoraDAConfig(**kw), progress=False)


def _assert_same(a: FisherStatistics, b: FisherStatistics, tol: float, order_free_seq=False):
    assert (a.num_examples, a.num_tokens) == (b.num_examples, b.num_tokens)
    for name in a.modules:
        sa, sb = a.modules[name], b.modules[name]
        assert rel_err(sa.G, sb.G) < tol
        assert rel_err(sa.y, sb.y) < tol
        assert rel_err(a.Z[sa.group], b.Z[sb.group]) < tol
        if sa.seq_sums is not None:
            if order_free_seq:  # rows are per example: compare as Gram matrices
                assert rel_err(sa.seq_sums.T @ sa.seq_sums, sb.seq_sums.T @ sb.seq_sums) < tol
            else:
                assert rel_err(sa.seq_sums, sb.seq_sums) < tol


@pytest.mark.parametrize("token_mask", ["attention", "labels"])
def test_batch_size_padding_and_order_invariance(token_mask):
    model = tiny_llama(seed=3)
    examples = random_examples(9, seed=4, prompt_frac=0.3)
    tol = TOL["stats_invariance_fp32"]
    kw = dict(token_mask=token_mask, output_fisher="sequence_lowrank")
    base = _stats(model, examples, batch_size=1, sort_by_length=False, **kw)
    _assert_same(base, _stats(model, examples, batch_size=8, **kw), tol, order_free_seq=True)
    _assert_same(base, _stats(model, examples, batch_size=8, sort_by_length=False, **kw), tol)
    # user-padded 2-D batches, left and right padding
    for side in ("left", "right"):
        batches = [pad_batch(examples[i:i + 4], side=side) for i in range(0, 9, 4)]
        _assert_same(base, _stats(model, batches, batch_size=3, **kw), tol, order_free_seq=True)
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    _assert_same(base, _stats(model, shuffled, batch_size=4, **kw), tol, order_free_seq=True)


def test_pass_leaves_model_exactly_as_it_was():
    model = tiny_gpt2()
    model.train()
    model.transformer.h[0].eval()  # a mixed train/eval pattern must survive
    model.transformer.wte.weight.requires_grad_(False)  # and a mixed requires_grad pattern
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    _stats(model, random_examples(4))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in model.named_parameters():
        assert p.grad is None, n
    for n, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks, n


def test_hooks_removed_after_an_error():
    model = tiny_llama()
    bad = random_examples(2) + [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1.5, 2.0, 3.0])}]
    with pytest.raises(DataError):
        _stats(model, bad)
    for n, m in model.named_modules():
        assert not m._forward_hooks, n
    assert all(p.requires_grad for p in model.parameters())


def test_dropout_is_disabled_during_the_pass():
    model = tiny_gpt2()
    model.train()
    ex = random_examples(3)
    a, b = _stats(model, ex), _stats(model, ex)
    _assert_same(a, b, 1e-7)


def test_examples_without_labels_are_skipped_and_counted():
    model = tiny_llama()
    ex = random_examples(3)
    ex.append({"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, -100, -100])})
    ex.append({"input_ids": torch.tensor([5]), "labels": torch.tensor([5])})  # one token: nothing to predict
    stats = _stats(model, ex)
    assert stats.num_examples == 3 and stats.num_skipped == 2
    with pytest.raises(DataError, match="no usable"):
        _stats(model, ex[3:])


def test_num_examples_takes_the_first_examples_of_an_endless_stream():
    import itertools

    from lora_da_fast.errors import ConfigError

    model = tiny_llama()
    ex = random_examples(5)
    cfg = LoraDAConfig(backend="torch")
    # a generator that never ends: only the first 3 examples are drawn
    stream = itertools.cycle(ex)
    a = collect_statistics(model, stream, cfg, progress=False, num_examples=3)
    _assert_same(a, _stats(model, ex[:3]), 1e-6)
    assert a.num_examples == 3
    # rows of a 2-D batch count one each
    b = collect_statistics(model, [pad_batch(ex[:2]), pad_batch(ex[2:])], cfg, progress=False, num_examples=3)
    assert b.num_examples == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="num_examples"):
            collect_statistics(model, ex, cfg, progress=False, num_examples=bad)


def test_target_modules_by_list_and_regex():
    model = tiny_llama()
    ex = random_examples(2)
    s1 = _stats(model, ex, target_modules=["q_proj", "model.layers.1.mlp.down_proj"])
    assert sorted(s1.modules) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                  "model.layers.1.self_attn.q_proj"]
    s2 = _stats(model, ex, target_modules=r".*\.v_proj")
    assert sorted(s2.modules) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(TargetError, match="q_proj"):
        _stats(model, ex, target_modules=["nope"])
    with pytest.raises(TargetError, match="not"):
        _stats(model, ex, target_modules=["mlp"])


def test_save_and_load_round_trip(tmp_path):
    stats = _stats(tiny_llama(), random_examples(4), output_fisher="sequence_lowrank")
    path = tmp_path / "stats.safetensors"
    stats.save(str(path))
    back = FisherStatistics.load(str(path))
    assert list(back.modules) == list(stats.modules)
    assert (back.num_examples, back.num_tokens, back.output_fisher) == (
        stats.num_examples, stats.num_tokens, "sequence_lowrank")
    for name, st in stats.modules.items():
        b = back.modules[name]
        assert b.group == st.group
        assert torch.equal(b.G, st.G) and torch.equal(b.y, st.y) and torch.equal(b.seq_sums, st.seq_sums)
    for g in stats.Z:
        assert torch.equal(back.Z[g], stats.Z[g])
    (tmp_path / "junk").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError):
        FisherStatistics.load(str(tmp_path / "junk"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    """A bf16/fp16 model: statistics accumulate in fp32 and agree with the fp32 model's to the
    precision of the model's own activations."""
    ex = random_examples(5, seed=2)
    ref = _stats(tiny_llama(seed=5), ex)
    half = _stats(tiny_llama(seed=5, dtype=dtype), ex)
    for name, st in half.modules.items():
        assert st.G.dtype == torch.float32 and half.Z[st.group].dtype == torch.float32
        assert rel_err(st.G, ref.modules[name].G) < TOL["stats_invariance_half"], name
        assert rel_err(half.Z[st.group], ref.Z[st.group]) < TOL["stats_invariance_half"], name


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_statistics(reentrant):
    model = tiny_llama(seed=6)
    ex = random_examples(5, seed=7)
    ref = _stats(model, ex, output_fisher="sequence_lowrank")
    with warnings.catch_warnings():  # renamed activation_checkpointing_enable in recent transformers
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    layer = model.model.layers[0]
    calls = []
    orig = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or orig(*a, **k)
    got = _stats(model, ex, output_fisher="sequence_lowrank")
    assert calls, "checkpointing was not used during the pass"
    assert model.training and model.model.layers[0].self_attn.training  # modes restored
    _assert_same(ref, got, TOL["stats_invariance_fp32"])
