"""The kept tokens (lora_da_fast.tokens, statistics.token_store): the path decision, the canonical row
order whatever the batches, the file layout, and the token-space solve of a FisherStatistics."""
import pytest
import torch

from lora_da_fast.data import Batch
from lora_da_fast.errors import DataError
from lora_da_fast.statistics.token_store import TokenStore, finish
from lora_da_fast.tokens import TOKEN_RATIO, TokenStatistics, token_groups


def test_decision_is_a_function_of_counts_and_shapes():
    shapes = {"qkv": (576, 960), "o": (576, 576), "down": (1536, 576)}
    assert token_groups("auto", 626, shapes) == {"qkv", "o", "down"}  # 24 x 48 tokens of SmolLM2
    big = 256 * 1024
    assert token_groups("auto", big, shapes) == set()
    assert token_groups("auto", TOKEN_RATIO * 576, shapes) == {"qkv", "o", "down"}
    assert token_groups("auto", TOKEN_RATIO * 576 + 1, shapes) == {"down"}
    assert token_groups("auto", TOKEN_RATIO * 1536 + 1, shapes) == set()
    assert token_groups("never", 10, shapes) == set() and token_groups("always", big, shapes) == set(shapes)
    with pytest.raises(ValueError):
        token_groups("sometimes", 10, shapes)


def _batches(lengths, bs, order):
    """Right-padded batches of examples with the given lengths, taken in ``order``."""
    out = []
    for s in range(0, len(order), bs):
        idx = order[s:s + bs]
        t = max(lengths[i] for i in idx)
        mask = torch.zeros(len(idx), t, dtype=torch.long)
        for r, i in enumerate(idx):
            mask[r, :lengths[i]] = 1
        out.append(Batch(mask.clone(), mask, mask.clone(), int(mask.sum()), tuple(idx)))
    return out


TARGETS = {"g": torch.nn.Linear(3, 2), "m": torch.nn.Linear(3, 2), "other": torch.nn.Linear(3, 2)}


def _run_store(lengths, bs, order, X_of, D_of, labels_every=None):
    store = TokenStore({"g"}, {"g": "g", "m": "g", "other": "h"})
    for batch in _batches(lengths, bs, order):
        gm = batch.attention_mask.reshape(-1).bool()
        pos = torch.arange(batch.attention_mask.shape[1]).repeat(batch.attention_mask.shape[0])
        sm = gm & (pos % labels_every != 0) if labels_every else gm
        store.set_batch(batch, gm, sm)
        b, t = batch.attention_mask.shape
        x = torch.stack([X_of(i, p) for i in batch.indices for p in range(t)])
        d = torch.stack([D_of(i, p) for i in batch.indices for p in range(t)])
        store.add("g", x, d, gm)
        store.add("m", x, 2 * d, gm)
        store.add("other", x, d, gm)  # off the token path: ignored
    return finish(store.local_rows(TARGETS), {"g"}, ["g", "m"])


def test_rows_in_canonical_order_whatever_the_batches():
    lengths = [5, 2, 7, 3, 4]
    X_of = lambda i, p: torch.tensor([i, p, i * p], dtype=torch.float32)  # noqa: E731
    D_of = lambda i, p: torch.tensor([i + 0.5, p + 0.25], dtype=torch.float32)  # noqa: E731
    a = _run_store(lengths, 1, [0, 1, 2, 3, 4], X_of, D_of)
    b = _run_store(lengths, 3, [2, 0, 4, 3, 1], X_of, D_of)  # sorted by length, padded batches
    for t in (a, b):
        assert t.num_rows == sum(lengths) and t.selected is None
        assert torch.equal(t.example, torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)]))
    assert torch.equal(a.key, b.key) and torch.equal(a.X["g"], b.X["g"])
    assert torch.equal(a.delta["m"], 2 * a.delta["g"]) and torch.equal(a.delta["g"], b.delta["g"])
    assert set(a.delta) == {"g", "m"}
    c = _run_store(lengths, 2, [4, 3, 2, 1, 0], X_of, D_of, labels_every=3)
    assert c.selected is not None and int(c.selected.sum()) == sum(n - len(range(0, n, 3)) for n in lengths)


def test_module_not_reached_in_a_batch_leaves_zero_rows():
    store = TokenStore({"g"}, {"g": "g", "m": "g"})
    for k, batch in enumerate(_batches([2, 3], 1, [0, 1])):
        gm = batch.attention_mask.reshape(-1).bool()
        store.set_batch(batch, gm, gm)
        x = torch.ones(gm.shape[0], 4)
        store.add("g", x, torch.ones(gm.shape[0], 2), gm)
        if k == 1:
            store.add("m", x, torch.ones(gm.shape[0], 2), gm)
    targets = {"g": torch.nn.Linear(4, 2), "m": torch.nn.Linear(4, 2)}
    t = finish(store.local_rows(targets), {"g"}, ["g", "m"])
    assert t.delta["m"][:2].abs().sum() == 0 and bool((t.delta["m"][2:] == 1).all())


def test_file_layout_round_trip_and_checks():
    key = torch.tensor([1, 2, 5], dtype=torch.int64)
    t = TokenStatistics(key, torch.tensor([True, False, True]), {"g": torch.randn(3, 4)},
                        {"a": torch.randn(3, 2), "b": torch.randn(3, 5)})
    tensors = t.to_tensors("tok.", ["h", "g"], ["c", "a", "b"])
    assert set(tensors) == {"tok.key", "tok.selected", "tok.X.1", "tok.D.1", "tok.D.2"}
    back = TokenStatistics.from_tensors(tensors, "tok.", ["h", "g"], ["c", "a", "b"], ["h", "g", "g"])
    assert torch.equal(back.X["g"], t.X["g"]) and torch.equal(back.delta["b"], t.delta["b"])
    assert torch.equal(back.selected, t.selected)
    assert TokenStatistics.from_tensors({}, "tok.", ["g"], ["a"], ["g"]) is None
    bad = dict(tensors)
    del bad["tok.D.2"]
    with pytest.raises(DataError, match="output gradients of module b: missing"):
        TokenStatistics.from_tensors(bad, "tok.", ["h", "g"], ["c", "a", "b"], ["h", "g", "g"])
    bad = dict(tensors, **{"tok.X.1": torch.randn(2, 4)})
    with pytest.raises(DataError, match="tokens of group g: expected 3 rows"):
        TokenStatistics.from_tensors(bad, "tok.", ["h", "g"], ["c", "a", "b"], ["h", "g", "g"])
    bad = dict(tensors, **{"tok.key": torch.tensor([3, 2, 5])})
    with pytest.raises(DataError, match="increasing"):
        TokenStatistics.from_tensors(bad, "tok.", ["h", "g"], ["c", "a", "b"], ["h", "g", "g"])
    sub = t.subset(["g"], ["a"])
    assert set(sub.delta) == {"a"} and t.subset(["h"], []) is None
    merged = t.subset(["g"], ["a"]).merge(TokenStatistics(key, t.selected, {}, {"b": t.delta["b"]}))
    assert set(merged.delta) == {"a", "b"}
