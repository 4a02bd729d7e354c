"""Calibration examples: normalisation of what users pass, and collation into padded batches.

Users pass an iterable (or a ``DataLoader``) of dicts with ``input_ids`` and optionally
``attention_mask`` and ``labels``, each either 1-D (one example) or 2-D (a padded batch). Everything is
split into single examples (padding trimmed from both ends), then re-batched by :func:`iter_batches`
with right padding, so the statistics do not depend on how the user batched or padded.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from .errors import DataError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, -100 = no loss
    index: int = -1  # position in the user's stream of examples (for messages)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_label_tokens(self) -> int:
        """Number of loss terms: positions t whose next label labels[t+1] is not -100."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


def _as_long(value, key: str) -> torch.Tensor:
    try:
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except Exception as exc:
        raise DataError(f"example field {key!r} is not a tensor or list of integers: {exc}") from None
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise DataError(f"example field {key!r} must hold integers, got dtype {t.dtype}")
    return t.to(torch.long).cpu()


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
    mask = item.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = _as_long(mask, "attention_mask")
        if mask.numel() != ids.numel():
            raise DataError("'attention_mask' must have the same shape as 'input_ids'")
        mask = mask.reshape(ids.shape)
    labels = item.get("labels")
    if labels is None:
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    else:
        labels = _as_long(labels, "labels")
        if labels.numel() != ids.numel():
            raise DataError("'labels' must have the same shape as 'input_ids'")
        labels = labels.reshape(ids.shape)
    out = []
    for row_ids, row_mask, row_labels in zip(ids, mask, labels):
        keep = (row_mask != 0).nonzero().flatten()
        if keep.numel() == 0:
            out.append(Example(row_ids[:0], row_labels[:0]))
            continue
        lo, hi = int(keep[0]), int(keep[-1]) + 1
        if int((row_mask[lo:hi] != 0).sum()) != hi - lo:
            raise DataError("attention_mask with holes inside a sequence (packed examples) is not supported")
        out.append(Example(row_ids[lo:hi], row_labels[lo:hi].masked_fill(row_mask[lo:hi] == 0, IGNORE_INDEX)))
    return out


def iter_examples(examples: Iterable[Dict]) -> Iterator[Example]:
    """Yield single trimmed examples from whatever the user passed."""
    if isinstance(examples, dict):
        examples = [examples]
    i = 0
    for item in examples:
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

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])


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
    return Batch(ids, mask, labels, int(mask.sum()), tuple(e.index for e in examples))


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
    number skipped for having no label token. Longest first with ``sort_by_length`` (batches of
    similar lengths waste little on padding; the statistics do not depend on the order; the sort is
    stable, so ties keep the user's order)."""
    usable: List[Example] = []
    skipped = 0
    for e in itertools.islice(iter_examples(examples), limit):
        if e.num_label_tokens == 0:
            skipped += 1
        else:
            usable.append(e)
    if sort_by_length:
        usable.sort(key=len, reverse=True)
    return usable, skipped
