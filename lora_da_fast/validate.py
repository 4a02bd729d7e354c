"""Checks of a model and its calibration examples made before any data pass, so that a problem is a
one-line library error (:class:`~lora_da_fast.errors.ConfigError`, :class:`~lora_da_fast.errors.DataError`)
naming the limit, not an ``IndexError`` (or a CUDA device-side assert) in the middle of the pass.
"""
from __future__ import annotations

import re
from typing import Callable, List, Optional

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


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs through ``torch.compile``: a wrapper (``torch.compile(m)``, the original in
    ``_orig_mod``) or a module compiled in place (``m.compile()``)."""
    # its own attributes, not those a wrapper such as PeftModel forwards from the model inside it
    return "_orig_mod" in module._modules or vars(module).get("_compiled_call_impl") is not None


def check_not_compiled(model: nn.Module) -> None:
    """:class:`ConfigError` if ``model`` or one of its modules is compiled by ``torch.compile``. The
    statistics pass hooks the target modules of the eager model (under dynamo, hooks added after
    compiling are graph breaks and recompilations), and PEFT names every layer of a compiled wrapper
    ``_orig_mod.<name>``: an adapter made on it does not load into the uncompiled model (and its
    ``"all-linear"`` takes in the output head). PEFT's order is ``get_peft_model``, then ``torch.compile``."""
    name = next((n for n, m in model.named_modules() if _compiled(m)), None)
    if name is None:
        return
    what = "the model" if not name else f"module {name} of the model"
    eager = " (model._orig_mod)" if not name and "_orig_mod" in model._modules else ""
    raise ConfigError(f"{what} is compiled by torch.compile: LoRA-DA hooks the eager modules; pass the model as it "
                      f"was before torch.compile{eager} and compile the result afterwards, e.g. "
                      "torch.compile(peft_model) (PEFT's order)")


def check_not_wrapped(model: nn.Module) -> None:
    """:class:`ConfigError` if ``model`` is a ``PeftModel`` or already holds PEFT adapter layers: a second
    wrapping would re-initialise the adapter of the first ``PeftModel`` (it shares these modules). A
    compiled model is refused first (:func:`check_not_compiled`)."""
    check_not_compiled(model)
    if isinstance(model, PeftModel):
        raise ConfigError("the model is already a PeftModel: pass the base model (before get_peft_model); "
                          "initialize_lora_da wraps it itself")
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            raise ConfigError(f"the model already holds PEFT adapter layers (e.g. {name}), from an earlier "
                              "get_peft_model or initialize_lora_da: wrapping it again would reset that adapter; "
                              "pass a fresh copy of the base model")


def _accessor(model: nn.Module, name: str) -> Optional[nn.Module]:
    """``model.<name>()`` (a transformers accessor such as ``get_input_embeddings``), ``None`` where the
    model has none or does not implement it."""
    get = getattr(model, name, None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def embedding_rows(model: nn.Module) -> Optional[int]:
    """Rows of the model's input embedding (the token ids it accepts), ``None`` if unknown."""
    rows = getattr(_accessor(model, "get_input_embeddings"), "num_embeddings", None)
    return int(rows) if isinstance(rows, int) else None


def vocabulary_size(model: nn.Module) -> Optional[int]:
    """Classes of the causal-LM loss (the output head's rows, else ``config.vocab_size``), ``None`` if
    unknown."""
    rows = getattr(_accessor(model, "get_output_embeddings"), "out_features", None)
    if not isinstance(rows, int):
        rows = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(rows) if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0 else None


def _first_outside(values: List[torch.Tensor], low: int, high: int, allowed: Optional[int] = None):
    """``(i, value)``: the first value outside ``[low, high)`` (other than ``allowed``) of the first tensor
    of ``values`` holding one, or ``None``; one pass over all of them when every value is inside."""

    def outside(v: torch.Tensor) -> torch.Tensor:
        out = (v < low) | (v >= high)
        return out & (v != allowed) if allowed is not None else out

    if not values or not bool(outside(torch.cat([v.reshape(-1) for v in values])).any()):
        return None
    for i, v in enumerate(values):
        bad = v.reshape(-1)[outside(v.reshape(-1))]
        if bad.numel():
            return i, int(bad[0])
    return None


def position_limit(model: nn.Module) -> Optional[int]:
    """The most tokens an example may have, for a model with learned position embeddings (beyond them
    the forward pass fails); ``None`` for models without such a hard limit (e.g. rotary positions)."""
    inputs = _accessor(model, "get_input_embeddings")
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
                       where: Optional[Callable[[int], str]] = None,
                       labels: Optional[List[torch.Tensor]] = None, ignore_index: int = -100) -> None:
    """:class:`DataError` before the pass if an example has a token id outside the model's embedding,
    more tokens than its learned positions, lies on the ``meta`` device, or (with ``labels``, one 1-D
    tensor per example, for the causal-LM loss) has a next-token label outside the vocabulary other than
    ``ignore_index``: a raw ``IndexError`` after some forwards otherwise (a device-side assert on CUDA).
    ``input_ids``: one 1-D tensor per example; ``where(i)`` names example ``i`` (default: "example i")."""
    where = where or (lambda i: f"example {i}")
    for i, ids in enumerate(input_ids):
        if ids.device.type == "meta":
            raise DataError(f"{where(i)} is on the meta device (it holds no token ids)")
    if not input_ids:
        return
    rows = embedding_rows(model)
    bad = _first_outside(input_ids, 0, rows) if rows is not None else None
    if bad is not None:
        i, value = bad
        raise DataError(f"{where(i)} has token id {value}, outside the model's embedding of {rows} rows "
                        f"(ids 0 to {rows - 1}): the tokenizer does not match the model")
    vocab = vocabulary_size(model) if labels is not None else None
    # the loss reads the labels from the second token on (label t+1 is the target of position t)
    bad = _first_outside([t[1:] for t in labels], 0, vocab, allowed=ignore_index) if vocab is not None else None
    if bad is not None:
        i, value = bad
        raise DataError(f"{where(i)} has label {value}, outside the model's vocabulary of {vocab} tokens "
                        f"(labels 0 to {vocab - 1}, or {ignore_index} for no loss)")
    limit = position_limit(model)
    if limit is not None:
        for i, ids in enumerate(input_ids):
            if ids.shape[-1] > limit:
                err = DataError(f"{where(i)} has {ids.shape[-1]} tokens, more than the model's {limit} positions "
                                f"(max_position_embeddings)")
                err.position_limit = limit  # for a caller that can say how to shorten the examples
                raise err
