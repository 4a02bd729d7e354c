"""The loss/forward callback (``loss_fn``) against a float64 brute force of its per-example statistics
(a sequence-classification model, a custom weighted loss), its refusals, and the data model it needs:
per-token and per-example fields, per-example labels, map-style and Hugging Face ``datasets`` inputs."""
import pytest
import torch
import torch.nn.functional as F

from lora_da_fast import LoraDAConfig, collect_statistics
from lora_da_fast.data import IGNORE_INDEX, collate, iter_examples, prepare_examples
from lora_da_fast.errors import ConfigError, DataError

from .helpers import VOCAB, brute_force_statistics, interrupt_after, rel_err, tiny_gpt2, tiny_llama
from .test_statistics import _compare
from .tolerances import TOL

PAD = VOCAB - 1  # never a real token below: the classification head pools the last non-pad token


def tiny_llama_classifier(seed: int = 0, num_labels: int = 3):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      num_labels=num_labels, pad_token_id=PAD)
    return LlamaForSequenceClassification(cfg)


def classification_examples(n: int, seed: int = 0, num_labels: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(1, 13, (1,), generator=g))  # a 1-token example is usable here
        out.append({"input_ids": torch.randint(0, PAD, (length,), generator=g),
                    "labels": int(torch.randint(0, num_labels, (1,), generator=g)),
                    "text": "a text column, left out"})
    return out


def classification_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def weighted_lm_loss(model, batch):
    """Per example: ``scale * sum_t w_t CE_t / sum_t w_t`` over its next-token terms (a per-token weight
    field ``w`` and a per-example field ``scale``)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="none").view(labels.shape)
    w = batch["w"][:, 1:] * (labels != IGNORE_INDEX)
    return batch["scale"] * (ce * w).sum(1) / w.sum(1)


def weighted_examples(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 14, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 3] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels, "w": torch.rand(length, generator=g) + 0.1,
                    "scale": float(torch.rand(1, generator=g)) + 0.5})
    return out


@pytest.mark.parametrize("token_mask", ["attention", "labels"])
def test_sequence_classification_matches_float64_brute_force(token_mask):
    model = tiny_llama_classifier()
    examples = classification_examples(9, seed=1)
    cfg = LoraDAConfig(batch_size=4, token_mask=token_mask, output_fisher="sequence_lowrank", backend="torch")
    stats = collect_statistics(model, examples, cfg, progress=False, loss_fn=classification_loss)
    ref = brute_force_statistics(model, examples, token_mask=token_mask, loss_fn=classification_loss)
    assert "score" in stats.modules  # the classification head is a target too
    worst = _compare(stats, ref, TOL["stats_fp32_vs_fp64"])
    print(f"classification/{token_mask}: worst relative error vs float64 brute force {worst:.2e}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_custom_loss_with_fields_matches_float64_brute_force(arch):
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch](seed=2)
    examples = weighted_examples(8, seed=3)
    cfg = LoraDAConfig(batch_size=3, output_fisher="sequence_lowrank", backend="torch")
    stats = collect_statistics(model, examples, cfg, progress=False, loss_fn=weighted_lm_loss)
    ref = brute_force_statistics(model, examples, loss_fn=weighted_lm_loss)
    worst = _compare(stats, ref, TOL["stats_fp32_vs_fp64"])
    # ...and the weights matter: the plain causal-LM statistics are far from these
    plain = collect_statistics(model, [{k: e[k] for k in ("input_ids", "labels")} for e in examples], cfg,
                               progress=False)
    name = next(iter(stats.modules))
    assert rel_err(plain.modules[name].G, ref["G"][name]) > 100 * TOL["stats_fp32_vs_fp64"]
    print(f"custom loss/{arch}: worst relative error vs float64 brute force {worst:.2e}")


def test_loss_fn_equal_to_the_default_loss_gives_the_same_statistics():
    model = tiny_llama(seed=4)
    examples = weighted_examples(6, seed=5)
    for e in examples:
        e["w"] = torch.ones_like(e["w"])
        e["scale"] = 1.0
    cfg = LoraDAConfig(batch_size=4, backend="torch")
    a = collect_statistics(model, examples, cfg, progress=False, loss_fn=weighted_lm_loss)
    b = collect_statistics(model, [{k: e[k] for k in ("input_ids", "labels")} for e in examples], cfg, progress=False)
    for name in a.modules:
        assert rel_err(a.modules[name].G, b.modules[name].G) < TOL["stats_invariance_fp32"]
        assert rel_err(a.modules[name].y, b.modules[name].y) < TOL["stats_invariance_fp32"]


@pytest.mark.parametrize("bad,match", [
    (lambda m, b: classification_loss(m, b).mean(), "one floating-point loss per example.*batch mean"),
    (lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), "tensor of per-example"),
    (lambda m, b: classification_loss(m, b).detach(), "no gradient"),
    (lambda m, b: classification_loss(m, b)[:1], r"shape \[3\]"),
    ("not a function", "must be a function"),
])
def test_bad_loss_fn_is_refused(bad, match):
    model = tiny_llama_classifier()
    with pytest.raises(ConfigError, match=match):
        collect_statistics(model, classification_examples(3), LoraDAConfig(batch_size=3, backend="torch"),
                           progress=False, loss_fn=bad)


def test_per_example_labels_need_a_loss_fn():
    with pytest.raises(DataError, match="one label per example.*loss_fn"):
        collect_statistics(tiny_llama(), classification_examples(3), LoraDAConfig(backend="torch"), progress=False)


def test_model_left_as_found_after_a_loss_fn_pass():
    model = tiny_llama_classifier()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    collect_statistics(model, classification_examples(4), LoraDAConfig(batch_size=2, backend="torch"),
                       progress=False, loss_fn=classification_loss)
    assert all(m.training for m in model.modules())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, before[n])
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------
# The data model


def test_fields_travel_with_their_examples():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 0], [0, 8, 9, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]]),
             "labels": torch.tensor([2, 1]),  # one per example
             "w": torch.tensor([[0.1, 0.2, 0.3, 9.0], [9.0, 0.4, 0.5, 9.0]]),  # per token
             "meta": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),  # per example, a vector
             "text": ["a", "b"]}  # not numeric: left out
    a, b = list(iter_examples([batch]))
    assert a.input_ids.tolist() == [5, 6, 7] and b.input_ids.tolist() == [8, 9]
    assert a.labels.tolist() == [5, 6, 7]  # per-token labels default to the ids
    assert a.fields["labels"].item() == 2 and b.fields["labels"].item() == 1
    assert torch.allclose(b.token_fields["w"], torch.tensor([0.4, 0.5]))
    assert b.fields["meta"].tolist() == [3.0, 4.0] and "text" not in a.fields and "text" not in a.token_fields
    out = collate([b, a], pad_token_id=0)
    assert out.fields["labels"].tolist() == [1, 2]
    assert torch.allclose(out.fields["w"], torch.tensor([[0.4, 0.5, 0.0], [0.1, 0.2, 0.3]]))
    inputs = out.inputs()
    assert inputs["labels"].tolist() == [1, 2] and inputs["input_ids"].shape == (2, 3)


def test_single_examples_fields_and_usable():
    one = list(iter_examples([{"input_ids": [4], "labels": 1, "w": [0.5]}]))[0]
    assert one.fields["labels"].item() == 1 and one.token_fields["w"].tolist() == [0.5]
    assert one.usable and one.num_label_tokens == 0  # a class label makes a 1-token example usable
    usable, skipped = prepare_examples([{"input_ids": [4]}, {"input_ids": [4], "labels": 0}])
    assert len(usable) == 1 and skipped == 1


@pytest.mark.parametrize("items,match", [
    ([{"input_ids": [1, 2], "labels": 0}, {"input_ids": [1, 2, 3]}], "different fields"),
    ([{"input_ids": [1, 2], "v": [1.0, 2.0, 3.0]}, {"input_ids": [3, 4], "v": [1.0]}], "different shapes"),
    ([{"input_ids": [[1, 2], [3, 4]], "v": [1.0, 2.0, 3.0]}], "one entry per example"),
])
def test_inconsistent_fields_raise_data_error(items, match):
    with pytest.raises(DataError, match=match):
        collate(list(iter_examples(items)))


def test_map_style_dataset_and_datasetdict_message():
    class MapStyle(torch.utils.data.Dataset):  # __getitem__ and __len__ only
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    rows = [{"input_ids": torch.tensor([1, 2, 3])}, {"input_ids": torch.tensor([4, 5])}]
    assert [e.input_ids.tolist() for e in iter_examples(MapStyle(rows))] == [[1, 2, 3], [4, 5]]
    with pytest.raises(DataError, match="iterable of dicts"):
        list(iter_examples(42))


def test_hugging_face_datasets_objects():
    datasets = pytest.importorskip("datasets")
    examples = classification_examples(5, seed=7)
    cols = {"input_ids": [e["input_ids"].tolist() for e in examples], "labels": [e["labels"] for e in examples],
            "text": [e["text"] for e in examples]}
    ds = datasets.Dataset.from_dict(cols)
    model = tiny_llama_classifier()
    cfg = LoraDAConfig(batch_size=2, backend="torch")
    a = collect_statistics(model, ds, cfg, progress=False, loss_fn=classification_loss)
    b = collect_statistics(model, examples, cfg, progress=False, loss_fn=classification_loss)
    c = collect_statistics(model, ds.with_format("torch"), cfg, progress=False, loss_fn=classification_loss)
    for name in a.modules:
        assert rel_err(a.modules[name].G, b.modules[name].G) < TOL["stats_invariance_fp32"]
        assert rel_err(c.modules[name].G, b.modules[name].G) < TOL["stats_invariance_fp32"]
    with pytest.raises(DataError, match="pass one split"):
        collect_statistics(model, datasets.DatasetDict({"train": ds}), cfg, progress=False, loss_fn=classification_loss)


def test_a_checkpoint_of_another_loss_is_refused(tmp_path, monkeypatch):
    """The loss function is part of the statistics' fingerprint (by name): a checkpoint made with the
    causal-LM loss is not resumed with a ``loss_fn``, nor one made with one ``loss_fn`` with another."""
    from lora_da_fast import checkpoint as ckpt
    from lora_da_fast.engine import fingerprint

    model = tiny_llama(seed=0)
    ex = weighted_examples(4, seed=1)
    cfg = LoraDAConfig(rank=2, population_size=8, backend="torch")
    plain = fingerprint(model, ex, cfg)
    weighted = fingerprint(model, ex, cfg, loss_fn=weighted_lm_loss)
    other = fingerprint(model, ex, cfg, loss_fn=classification_loss)
    assert ckpt.differing(plain, weighted) == [ckpt.PART_NAMES["statistics"]]
    assert ckpt.differing(weighted, other) == [ckpt.PART_NAMES["statistics"]]
    assert fingerprint(model, ex, cfg, loss_fn=weighted_lm_loss) == weighted
    assert ckpt.loss_name(weighted_lm_loss) == f"{__name__}.weighted_lm_loss"

    ck = str(tmp_path / "ck")
    interrupt_after(monkeypatch, 2)  # the run stops after its 2nd example
    with pytest.raises(KeyboardInterrupt):
        collect_statistics(model, ex, cfg, progress=False, checkpoint=ck, checkpoint_every=1)
    monkeypatch.undo()
    with pytest.raises(DataError, match="loss function"):
        collect_statistics(model, ex, cfg, progress=False, checkpoint=ck, loss_fn=weighted_lm_loss)
    got = collect_statistics(model, ex, cfg, progress=False, checkpoint=ck)  # the same loss resumes
    assert got.num_examples == 4
