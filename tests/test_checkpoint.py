"""Checkpoint/resume of the statistics pass, and the per-batch non-finite check."""
import os

import pytest
import torch

from lora_da_fast import LoraDAConfig, collect_statistics
from lora_da_fast.errors import DataError, NumericalError

from .helpers import random_examples, tiny_llama


class Interrupt(KeyboardInterrupt):
    pass


def _interrupt_after(model, calls):
    state = {"n": 0}

    def hook(m, i, o):
        state["n"] += 1
        if state["n"] > calls:
            raise Interrupt()
    return model.model.layers[0].register_forward_hook(hook)


def test_interrupted_pass_resumes_bit_identically(tmp_path):
    model = tiny_llama(seed=1)
    ex = random_examples(11, seed=2)
    cfg = LoraDAConfig(batch_size=2, backend="torch", output_fisher="sequence_lowrank")
    ref = collect_statistics(model, ex, cfg, progress=False)
    ck = str(tmp_path / "pass.ckpt")
    h = _interrupt_after(model, 1 + 3)  # the group probe, then three batches
    with pytest.raises(Interrupt):
        collect_statistics(model, ex, cfg, progress=False, checkpoint=ck, checkpoint_every=4)
    h.remove()
    assert os.path.exists(ck)  # written after 4 examples (2 batches); the third batch was lost
    assert not any(p.name.startswith("pass.ckpt.tmp") for p in tmp_path.iterdir())
    got = collect_statistics(model, ex, cfg, progress=False, checkpoint=ck, checkpoint_every=4)
    assert not os.path.exists(ck)
    assert (got.num_examples, got.num_tokens) == (ref.num_examples, ref.num_tokens)
    for name, st in ref.modules.items():
        assert torch.equal(got.modules[name].G, st.G), name
        assert torch.equal(got.modules[name].y, st.y)
        assert torch.equal(got.modules[name].seq_sums, st.seq_sums)
    for g in ref.Z:
        assert torch.equal(got.Z[g], ref.Z[g])


def test_checkpoint_of_other_data_or_config_is_refused(tmp_path):
    model = tiny_llama(seed=1)
    ex = random_examples(6, seed=2)
    cfg = LoraDAConfig(batch_size=2, backend="torch")
    ck = str(tmp_path / "pass.ckpt")
    h = _interrupt_after(model, 1 + 2)
    with pytest.raises(Interrupt):
        collect_statistics(model, ex, cfg, progress=False, checkpoint=ck, checkpoint_every=2)
    h.remove()
    with pytest.raises(DataError, match="another model, data"):
        collect_statistics(model, random_examples(6, seed=3), cfg, progress=False, checkpoint=ck)
    with pytest.raises(DataError, match="another model, data"):
        collect_statistics(model, ex, LoraDAConfig(batch_size=3, backend="torch"), progress=False, checkpoint=ck)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    with pytest.raises(DataError, match="another model, data"):
        collect_statistics(model, ex, cfg, progress=False, checkpoint=ck)
    with open(ck, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DataError, match="exists and is not a lora_da_fast checkpoint"):
        collect_statistics(model, ex, cfg, progress=False, checkpoint=ck)


def test_non_finite_activations_are_named_by_module_and_example():
    model = tiny_llama(seed=1)
    ex = random_examples(6, seed=2)

    def poison(m, i, o):  # an overflow inside layer 1's MLP for the example of length 11 only
        return o.masked_fill(torch.tensor(o.shape[1] == 11), float("inf"))

    h = model.model.layers[1].mlp.act_fn.register_forward_hook(poison)
    lengths = [len(e["input_ids"]) for e in ex]
    assert 11 in lengths
    with pytest.raises(NumericalError, match=rf"layers\.1\.mlp\.act_fn on examples {lengths.index(11)} "):
        collect_statistics(model, ex, LoraDAConfig(batch_size=1, backend="torch"), progress=False)
    h.remove()


def test_non_finite_gradients_are_named_by_module_and_example():
    model = tiny_llama(seed=1)
    ex = random_examples(6, seed=2)
    lengths = [len(e["input_ids"]) for e in ex]

    def poison_grad(m, grad_in, grad_out):  # a backward-only overflow: the loss stays finite
        if grad_out[0].shape[1] == 11:
            return (torch.full_like(grad_in[0], float("nan")),)

    h = model.model.layers[1].mlp.act_fn.register_full_backward_hook(poison_grad)
    with pytest.raises(NumericalError, match=rf"output gradients of module .*layers\.1\.mlp\.(gate|up)_proj on "
                                             rf"examples {lengths.index(11)} "):
        collect_statistics(model, ex, LoraDAConfig(batch_size=1, backend="torch"), progress=False)
    h.remove()


def test_data_digest_covers_per_example_fields():
    """A checkpoint or statistics file made with other class labels (what a loss_fn reads) is another
    calibration set: its data digest differs; examples without fields keep their digest."""
    import torch

    from lora_da_fast.checkpoint import data_digest
    from lora_da_fast.data import prepare_examples

    def digest(**extra):
        exs, _ = prepare_examples([{"input_ids": torch.tensor([1, 2, 3]), **extra}], sort_by_length=False)
        return data_digest(exs)

    assert digest(labels=torch.tensor(1)) != digest(labels=torch.tensor(0))
    assert digest(weights=torch.tensor([1.0, 2.0, 3.0])) != digest(weights=torch.tensor([1.0, 2.0, 4.0]))
    assert digest() == digest()
