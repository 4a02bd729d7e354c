"""Calibration examples from raw text, for users who have strings rather than token ids.

Both functions return a list of dicts of 1-D ``torch.long`` tensors (``input_ids``, ``attention_mask``,
``labels``), the format :func:`lora_da_fast.collect_statistics` and :func:`initialize_lora_da` take.
Examples left without any label token (empty text, or a prompt that fills ``max_length``) are kept:
the statistics pass skips and counts them.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .data import IGNORE_INDEX
from .errors import ConfigError, DataError


def _check_max_length(max_length) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        # One token has no next-token target: at least two are needed for a loss term.
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")


def _check_strings(values, what: str) -> List[str]:
    if isinstance(values, str):
        raise DataError(f"{what} must be a list of strings, not a single string")
    out = list(values)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise DataError(f"{what}[{i}] is not a string (got {type(v).__name__})")
    return out


def _ids(tokenizer, text: str, add_special_tokens: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _example(ids: List[int], labels: List[int]) -> Dict[str, torch.Tensor]:
    input_ids = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": torch.tensor(labels, dtype=torch.long)}


def examples_from_texts(tokenizer, texts: Sequence[str], max_length: int) -> List[Dict[str, torch.Tensor]]:
    """Tokenise each text (with the tokenizer's special tokens), truncate to ``max_length`` tokens; every
    token is a label (plain language-model loss)."""
    _check_max_length(max_length)
    out = []
    for text in _check_strings(texts, "texts"):
        ids = _ids(tokenizer, text, add_special_tokens=True)[:max_length]
        out.append(_example(ids, ids))
    return out


def examples_from_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int,
                        add_eos: bool = True) -> List[Dict[str, torch.Tensor]]:
    """Prompt/response pairs: ``input_ids = prompt + response (+ eos)``, truncated to ``max_length``
    from the right; prompt tokens get label ``-100`` so that only the response is in the loss.

    The prompt is tokenised with the tokenizer's special tokens (e.g. BOS), the response without, each
    on its own (the usual supervised fine-tuning layout, so the label boundary is exact). Put any
    separator or chat template into the strings yourself.
    """
    _check_max_length(max_length)
    prompts = _check_strings(prompts, "prompts")
    responses = _check_strings(responses, "responses")
    if len(prompts) != len(responses):
        raise DataError(f"{len(prompts)} prompts but {len(responses)} responses")
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    out = []
    for prompt, response in zip(prompts, responses):
        p = _ids(tokenizer, prompt, add_special_tokens=True)
        r = _ids(tokenizer, response, add_special_tokens=False)
        if eos is not None:
            r = r + [int(eos)]
        ids = (p + r)[:max_length]
        labels = ([IGNORE_INDEX] * len(p) + r)[:max_length]
        out.append(_example(ids, labels))
    return out
