"""Configuration validation, example normalisation, and property tests of the pass with hypothesis."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_da_fast import LoraDAConfig, collect_statistics
from lora_da_fast.data import IGNORE_INDEX, iter_batches, iter_examples
from lora_da_fast.errors import ConfigError, DataError

from .helpers import pad_batch, rel_err, tiny_llama
from .tolerances import TOL


@pytest.mark.parametrize("field,value,match", [
    ("rank", 0, "rank"), ("rank", 2.5, "rank"), ("population_size", 0, "population_size"),
    ("beta", -1.0, "beta"), ("beta", float("nan"), "beta"), ("gamma", 0, "gamma"), ("damping", 0.0, "damping"),
    ("damping", -1e-6, "damping"), ("token_mask", "all", "token_mask"), ("output_fisher", "full", "output_fisher"),
    ("target_modules", "(", "regex"), ("target_modules", [], "target_modules"), ("target_modules", 3, "target_modules"),
    ("batch_size", 0, "batch_size"), ("backend", "cuda", "backend"), ("solver", "magic", "solver"),
    ("output_damping_ratio", 0.0, "output_damping_ratio"), ("max_damping", 1e-9, "max_damping"),
    ("seed", "x", "seed"), ("population_size", True, "population_size"),
])
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        LoraDAConfig(**{field: value})


def test_config_defaults_are_the_papers():
    c = LoraDAConfig()
    assert (c.rank, c.beta, c.alpha, c.gamma, c.damping) == (8, 0.03, 1.0, 1024.0, 1e-6)
    assert c.to_dict()["target_modules"] == "all-linear"
    with pytest.raises(ConfigError, match="alpha and beta"):
        LoraDAConfig(alpha=0.0, beta=0.0)


def test_examples_are_trimmed_and_rebatched():
    batch = pad_batch([{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2, 3])},
                       {"input_ids": torch.tensor([4]), "labels": torch.tensor([-100])}], side="left")
    ex = list(iter_examples([batch]))
    assert [e.input_ids.tolist() for e in ex] == [[1, 2, 3], [4]]
    assert ex[1].num_label_tokens == 0
    # lists are accepted, labels default to the input ids
    ex2 = list(iter_examples([{"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 0]}]))
    assert ex2[0].input_ids.tolist() == [5, 6, 7] and ex2[0].labels.tolist() == [5, 6, 7]
    b = list(iter_batches(iter(ex + ex2), 2))
    assert [x.batch_size for x in b] == [2, 1]
    assert b[0].attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b[0].labels[1].tolist() == [-100, IGNORE_INDEX, IGNORE_INDEX]


@pytest.mark.parametrize("item,match", [
    ("text", "dict"), ({"ids": [1]}, "input_ids"), ({"input_ids": [[[1]]]}, "1-D or 2-D"),
    ({"input_ids": [1.5, 2.0]}, "integers"), ({"input_ids": [1, 2], "attention_mask": [1]}, "same shape"),
    ({"input_ids": [1, 2], "labels": [1, 2, 3]}, "same shape"),
    ({"input_ids": [1, 2, 3], "attention_mask": [1, 0, 1]}, "holes"),
])
def test_bad_examples_raise_data_error(item, match):
    with pytest.raises(DataError, match=match):
        list(iter_examples([item]))


@given(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=3), st.floats(),
                          st.lists(st.integers(-3, 70), max_size=6),
                          st.dictionaries(st.sampled_from(["input_ids", "attention_mask", "labels", "x"]),
                                          st.lists(st.one_of(st.integers(-200, 200), st.floats()), max_size=5))),
                max_size=4))
@settings(max_examples=150, deadline=None)
def test_normalisation_never_fails_with_anything_but_data_error(items):
    try:
        for e in iter_examples(items):
            assert e.input_ids.dim() == 1 and e.labels.shape == e.input_ids.shape
    except DataError:
        pass


_MODEL = None


def _model():
    global _MODEL
    if _MODEL is None:
        _MODEL = tiny_llama(seed=21, hidden=16, layers=1)
    return _MODEL


@given(lengths=st.lists(st.integers(1, 10), min_size=1, max_size=6), batch_size=st.integers(1, 4),
       side=st.sampled_from(["left", "right"]), token_mask=st.sampled_from(["attention", "labels"]),
       prompt=st.integers(0, 4), seed=st.integers(0, 2 ** 16))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_statistics_do_not_depend_on_batching(lengths, batch_size, side, token_mask, prompt, seed):
    g = torch.Generator().manual_seed(seed)
    ex = []
    for n in lengths:
        ids = torch.randint(0, 64, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        ex.append({"input_ids": ids, "labels": labels})
    if all(int((e["labels"][1:] != IGNORE_INDEX).sum()) == 0 for e in ex):
        with pytest.raises(DataError):
            collect_statistics(_model(), ex, LoraDAConfig(backend="torch"), progress=False)
        return
    cfg1 = LoraDAConfig(batch_size=1, token_mask=token_mask, backend="torch")
    cfgb = LoraDAConfig(batch_size=batch_size, token_mask=token_mask, backend="torch")
    try:
        a = collect_statistics(_model(), ex, cfg1, progress=False)
    except DataError as exc:  # e.g. the labels token mask selects nothing
        with pytest.raises(DataError, match=str(exc)[:20]):
            collect_statistics(_model(), [pad_batch(ex, side)], cfgb, progress=False)
        return
    b = collect_statistics(_model(), [pad_batch(ex, side)], cfgb, progress=False)
    assert (a.num_examples, a.num_tokens, a.num_skipped) == (b.num_examples, b.num_tokens, b.num_skipped)
    for name, s in a.modules.items():
        assert rel_err(b.modules[name].G, s.G) < TOL["stats_invariance_fp32"]
        assert rel_err(b.Z[s.group], a.Z[s.group]) < TOL["stats_invariance_fp32"]
        assert rel_err(b.modules[name].y, s.y) < TOL["stats_invariance_fp32"]


@pytest.mark.parametrize("seed", [-1, 2 ** 64, 10 ** 30, 1.0, True])
def test_seed_outside_the_generators_range_is_a_config_error(seed):
    # torch.Generator.manual_seed takes [0, 2**64): anything else must fail here, before any pass
    with pytest.raises(ConfigError, match="seed must be an integer"):
        LoraDAConfig(seed=seed)
