"""Calibration examples: normalisation of what users pass, and collation into padded batches.

Users pass an iterable (or a ``DataLoader``, a map-style ``torch.utils.data.Dataset``, or a Hugging
Face ``datasets.Dataset``/``IterableDataset``) of dicts with ``input_ids`` and optionally
``attention_mask`` and ``labels``, each either 1-D (one example) or 2-D (a padded batch). Everything is
split into single examples (padding trimmed from both ends), then re-batched by :func:`iter_batches`
with right padding, so the statistics do not depend on how the user batched or padded.

Other fields (for a ``loss_fn``, e.g. a class label for sequence classification) travel with their
example: a field with the shape of ``input_ids`` is *per token* (trimmed and padded with 0 like the
tokens), any other numeric field is *per example* (for a 2-D batch its first dimension is the batch).
``labels`` is per token when it has as many dimensions as ``input_ids`` (then it must have the same
shape), and a per-example label (one value per example, e.g. a class) when it has one dimension fewer.
Fields that are not numbers or arrays of numbers (e.g. the text column of a ``datasets`` row) are left
out.
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from .errors import DataError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, -100 = no loss
    index: int = -1  # position in the user's stream of examples (for messages)
    token_fields: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [T, ...] per-token field
    fields: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> per-example value (any shape)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_label_tokens(self) -> int:
        """Number of loss terms: positions t whose next label labels[t+1] is not -100."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())

    @property
    def usable(self) -> bool:
        """Has a loss term: a next-token label, or (a per-example ``labels`` field) any token at all."""
        if "labels" in self.fields:
            return len(self) > 0
        return self.num_label_tokens > 0


def _as_long(value, key: str) -> torch.Tensor:
    try:
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except Exception as exc:
        raise DataError(f"example field {key!r} is not a tensor or list of integers: {exc}") from None
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise DataError(f"example field {key!r} must hold integers, got dtype {t.dtype}")
    if t.device.type == "meta":
        raise DataError(f"example field {key!r} is on the meta device: it holds no values")
    return t.to(torch.long).cpu()


def _as_numeric(value) -> Optional[torch.Tensor]:
    """A CPU tensor of numbers, or ``None`` for anything else (strings, ``None``, ragged lists)."""
    try:
        t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except Exception:
        return None
    if t.device.type == "meta":
        raise DataError("an example field is on the meta device: it holds no values")
    return t.cpu()


_TOKEN_KEYS = ("input_ids", "attention_mask", "labels")


def _extra_fields(item, ids: torch.Tensor, batched: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(per-token, per-example)`` fields of ``item`` other than the token keys; ``ids`` is ``[B, T]``
    (a single example was given a batch dimension). Both come back with that batch dimension first:
    per-token fields ``[B, T, ...]``, per-example ones ``[B, ...]``."""
    token, example = {}, {}
    for key in item.keys():
        if key in _TOKEN_KEYS:
            continue
        t = _as_numeric(item[key])
        if t is None:
            continue  # text and other non-numeric columns: no model input, left out
        if not batched:
            t = t[None]
        if tuple(t.shape[:2]) == tuple(ids.shape):
            token[str(key)] = t
        elif t.dim() >= 1 and t.shape[0] == ids.shape[0]:
            example[str(key)] = t
        else:  # only a batch can get here
            raise DataError(f"field {key!r} of a batch of {ids.shape[0]} examples has shape {tuple(t.shape)}: "
                            "a per-example field needs one entry per example (first dimension), a per-token "
                            "field the shape of 'input_ids'")
    return token, example


def split_examples(item: Dict) -> List[Example]:
    """Split one user item (a single example or a padded batch) into trimmed examples."""
    if not isinstance(item, dict) and not hasattr(item, "keys"):
        raise DataError(f"each example must be a dict with 'input_ids', got {type(item).__name__}")
    if "input_ids" not in item:
        raise DataError(f"an example has no 'input_ids' (keys: {', '.join(map(str, item.keys()))})")
    ids = _as_long(item["input_ids"], "input_ids")
    if ids.dim() not in (1, 2):
        raise DataError(f"'input_ids' must be 1-D or 2-D, got shape {tuple(ids.shape)}")
    batched = ids.dim() == 2
    if not batched:
        ids = ids[None]
    token_fields, fields = _extra_fields(item, ids, batched)
    mask = item.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = _as_long(mask, "attention_mask")
        if mask.numel() != ids.numel():
            raise DataError("'attention_mask' must have the same shape as 'input_ids'")
        mask = mask.reshape(ids.shape)
    labels = item.get("labels")
    if labels is not None:  # one dimension fewer than input_ids: one label per example (e.g. a class)
        t = _as_numeric(labels)
        if t is not None and t.dim() == (1 if batched else 0):
            fields["labels"] = t if batched else t[None]
            labels = None
    if labels is None:
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    else:
        labels = _as_long(labels, "labels")
        if labels.numel() != ids.numel():
            raise DataError("'labels' must have the same shape as 'input_ids' (per-token labels) or one "
                            "dimension fewer (one label per example)")
        labels = labels.reshape(ids.shape)
    out = []
    for b, (row_ids, row_mask, row_labels) in enumerate(zip(ids, mask, labels)):
        row_fields = {k: v[b] for k, v in fields.items()}
        keep = (row_mask != 0).nonzero().flatten()
        if keep.numel() == 0:
            out.append(Example(row_ids[:0], row_labels[:0], token_fields={k: v[b, :0] for k, v in token_fields.items()},
                               fields=row_fields))
            continue
        lo, hi = int(keep[0]), int(keep[-1]) + 1
        if int((row_mask[lo:hi] != 0).sum()) != hi - lo:
            raise DataError("attention_mask with holes inside a sequence (packed examples) is not supported")
        out.append(Example(row_ids[lo:hi], row_labels[lo:hi].masked_fill(row_mask[lo:hi] == 0, IGNORE_INDEX),
                           token_fields={k: v[b, lo:hi] for k, v in token_fields.items()}, fields=row_fields))
    return out


def _is_datasets_object(obj, *names: str) -> bool:
    """Whether ``obj`` is one of the Hugging Face ``datasets`` classes ``names``. ``datasets`` is optional
    and never imported here: an object of it can only exist if the user imported it already."""
    mod = sys.modules.get("datasets")
    return mod is not None and any(isinstance(obj, getattr(mod, n, ())) for n in names)


def _items(examples) -> Iterable:
    """What to iterate: ``examples`` itself, or a map-style dataset (``__len__`` and ``__getitem__``
    without ``__iter__``, e.g. a ``torch.utils.data.Dataset`` subclass) by index."""
    if _is_datasets_object(examples, "DatasetDict", "IterableDatasetDict"):
        splits = ", ".join(map(repr, examples.keys()))
        raise DataError(f"got a datasets.DatasetDict (splits {splits}): pass one split, e.g. dataset['train']")
    if isinstance(examples, dict):
        return [examples]
    if not hasattr(examples, "__iter__") and hasattr(examples, "__getitem__") and hasattr(examples, "__len__"):
        return (examples[i] for i in range(len(examples)))
    if not hasattr(examples, "__iter__"):
        raise DataError(f"examples must be an iterable of dicts (a list, a DataLoader, a dataset), got "
                        f"{type(examples).__name__}")
    return examples


def iter_examples(examples: Iterable[Dict]) -> Iterator[Example]:
    """Yield single trimmed examples from whatever the user passed (see the module's docstring)."""
    i = 0
    for item in _items(examples):
        try:
            parts = split_examples(item)
        except DataError as exc:
            raise DataError(f"example {i}: {exc}") from None
        for e in parts:
            e.index = i
            i += 1
            yield e


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    num_tokens: int  # non-padding tokens
    indices: Tuple[int, ...] = ()  # Example.index of each row
    fields: Dict[str, torch.Tensor] = field(default_factory=dict)  # other fields: [B, T, ...] per token, [B, ...] per example

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def inputs(self, device=None) -> Dict[str, torch.Tensor]:
        """The batch as a ``loss_fn`` receives it: ``input_ids``, ``attention_mask``, ``labels`` (per token,
        ``[B, T]``) and every other field, on ``device``; a per-example ``labels`` field (one label per
        example, ``[B]``) replaces the per-token labels."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels, **self.fields}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


def _stack_fields(examples: List[Example], width: int) -> Dict[str, torch.Tensor]:
    """Per-token fields right-padded with 0 to ``width``, per-example fields stacked; every example of a
    batch must have the same fields (a per-example field with the same shape)."""
    first = examples[0]
    names_t, names_e = set(first.token_fields), set(first.fields)
    for e in examples[1:]:
        if set(e.token_fields) != names_t or set(e.fields) != names_e:
            diff = sorted((names_t ^ set(e.token_fields)) | (names_e ^ set(e.fields)))
            raise DataError(f"examples {first.index} and {e.index} have different fields ({', '.join(diff)}): every "
                            "example needs the same fields, each per token or per example in all of them")
    out: Dict[str, torch.Tensor] = {}
    b = len(examples)
    for k in sorted(names_t):
        vals = [e.token_fields[k] for e in examples]
        dtype = vals[0].dtype
        for v in vals[1:]:
            dtype = torch.promote_types(dtype, v.dtype)
        if any(tuple(v.shape[1:]) != tuple(vals[0].shape[1:]) for v in vals):
            raise DataError(f"per-token field {k!r} has different trailing shapes across examples "
                            f"{', '.join(str(e.index) for e in examples)}")
        t = torch.zeros((b, width) + tuple(vals[0].shape[1:]), dtype=dtype)
        for i, v in enumerate(vals):
            t[i, :v.shape[0]] = v
        out[k] = t
    for k in sorted(names_e):
        vals = [e.fields[k] for e in examples]
        if any(tuple(v.shape) != tuple(vals[0].shape) for v in vals):
            shapes = sorted({tuple(v.shape) for v in vals})
            raise DataError(f"field {k!r} has different shapes {shapes} across examples "
                            f"{', '.join(str(e.index) for e in examples)}: a per-example field needs one shape")
        dtype = vals[0].dtype
        for v in vals[1:]:
            dtype = torch.promote_types(dtype, v.dtype)
        out[k] = torch.stack([v.to(dtype) for v in vals])
    return out


def collate(examples: List[Example], pad_token_id: int = 0) -> Batch:
    """Right-pad examples into one batch (right padding keeps every position id unchanged)."""
    width = max(len(e) for e in examples)
    b = len(examples)
    ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = e.input_ids
        mask[i, :n] = 1
        labels[i, :n] = e.labels
    fields = _stack_fields(examples, width) if any(e.fields or e.token_fields for e in examples) else {}
    return Batch(ids, mask, labels, int(mask.sum()), tuple(e.index for e in examples), fields)


def iter_batches(examples: Iterable[Example], batch_size: int, pad_token_id: int = 0) -> Iterator[Batch]:
    """Collate a stream of examples into batches of ``batch_size`` (the last may be smaller)."""
    buf: List[Example] = []
    for e in examples:
        buf.append(e)
        if len(buf) == batch_size:
            yield collate(buf, pad_token_id)
            buf = []
    if buf:
        yield collate(buf, pad_token_id)


def prepare_examples(examples: Iterable, sort_by_length: bool = True,
                     limit: Optional[int] = None) -> Tuple[List[Example], int]:
    """The usable examples of ``examples`` (of its first ``limit`` single examples if given) and the
    number skipped for having no label token (:attr:`Example.usable`). Longest first with ``sort_by_length`` (batches of
    similar lengths waste little on padding; the statistics do not depend on the order; the sort is
    stable, so ties keep the user's order)."""
    usable: List[Example] = []
    skipped = 0
    for e in itertools.islice(iter_examples(examples), limit):
        if not e.usable:
            skipped += 1
        else:
            usable.append(e)
    if sort_by_length:
        usable.sort(key=len, reverse=True)
    return usable, skipped
