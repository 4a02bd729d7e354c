"""Checks of a model and its calibration examples made before any data pass, so that a problem is a
one-line library error (:class:`~lora_da_fast.errors.ConfigError`, :class:`~lora_da_fast.errors.DataError`)
naming the limit, not an ``IndexError`` (or a CUDA device-side assert) in the middle of the pass.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, List, Optional

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .errors import ConfigError, DataError

# names of learned (absolute) position embeddings: GPT-2 "wpe", OPT/BART "embed_positions", BERT-like
# "position_embeddings"; rotary models have none (no hard limit on positions)
_POSITION_EMBEDDING = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)$")


def check_model_loaded(model: nn.Module) -> None:
    """:class:`ConfigError` if the model's weights are on the ``meta`` device (not loaded)."""
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise ConfigError(f"the model's weights are on the meta device (e.g. {name}): they hold no values; "
                              "load the model with its weights (not under init_empty_weights / device='meta')")


def check_not_wrapped(model: nn.Module) -> None:
    """:class:`ConfigError` if ``model`` is a ``PeftModel`` or already holds PEFT adapter layers: a second
    wrapping would re-initialise the adapter of the first ``PeftModel`` (it shares these modules)."""
    if isinstance(model, PeftModel):
        raise ConfigError("the model is already a PeftModel: pass the base model (before get_peft_model); "
                          "initialize_lora_da wraps it itself")
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            raise ConfigError(f"the model already holds PEFT adapter layers (e.g. {name}), from an earlier "
                              "get_peft_model or initialize_lora_da: wrapping it again would reset that adapter; "
                              "pass a fresh copy of the base model")


def embedding_rows(model: nn.Module) -> Optional[int]:
    """Rows of the model's input embedding (the token ids it accepts), ``None`` if unknown."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    rows = getattr(emb, "num_embeddings", None)
    return int(rows) if isinstance(rows, int) else None


def position_limit(model: nn.Module) -> Optional[int]:
    """The most tokens an example may have, for a model with learned position embeddings (beyond them
    the forward pass fails); ``None`` for models without such a hard limit (e.g. rotary positions)."""
    inputs = None
    get = getattr(model, "get_input_embeddings", None)
    try:
        inputs = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        pass
    rows = [m.num_embeddings for n, m in model.named_modules()
            if isinstance(m, nn.Embedding) and m is not inputs and _POSITION_EMBEDDING.search(n)]
    if not rows:
        return None
    limit = min(rows)
    configured = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(configured, int) and configured > 0:
        limit = min(limit, configured)
    return limit


def check_examples_fit(model: nn.Module, input_ids: List[torch.Tensor],
                       where: Optional[Callable[[int], str]] = None) -> None:
    """:class:`DataError` before the pass if an example has a token id outside the model's embedding,
    more tokens than its learned positions, or lies on the ``meta`` device. ``input_ids``: one 1-D
    tensor per example; ``where(i)`` names example ``i`` (default: "example i")."""
    where = where or (lambda i: f"example {i}")
    for i, ids in enumerate(input_ids):
        if ids.device.type == "meta":
            raise DataError(f"{where(i)} is on the meta device (it holds no token ids)")
    if not input_ids:
        return
    rows = embedding_rows(model)
    flat = torch.cat([ids.reshape(-1) for ids in input_ids])
    if rows is not None and flat.numel() and (int(flat.max()) >= rows or int(flat.min()) < 0):
        for i, ids in enumerate(input_ids):
            if ids.numel() and (int(ids.max()) >= rows or int(ids.min()) < 0):
                bad = int(ids.max()) if int(ids.max()) >= rows else int(ids.min())
                raise DataError(f"{where(i)} has token id {bad}, outside the model's embedding of {rows} rows "
                                f"(ids 0 to {rows - 1}): the tokenizer does not match the model")
    limit = position_limit(model)
    if limit is not None:
        for i, ids in enumerate(input_ids):
            if ids.shape[-1] > limit:
                err = DataError(f"{where(i)} has {ids.shape[-1]} tokens, more than the model's {limit} positions "
                                f"(max_position_embeddings)")
                err.position_limit = limit  # for a caller that can say how to shorten the examples
                raise err


def example_ids(examples: Iterable) -> List[torch.Tensor]:
    """The ``input_ids`` of each example (objects with an ``input_ids`` attribute or dicts)."""
    return [e.input_ids if hasattr(e, "input_ids") else e["input_ids"] for e in examples]
