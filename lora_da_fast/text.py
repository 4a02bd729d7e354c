"""Calibration examples from raw text, for users who have strings rather than token ids.

Both functions return a list of dicts of 1-D ``torch.long`` tensors (``input_ids``, ``attention_mask``,
``labels``), the format :func:`lora_da_fast.collect_statistics` and :func:`initialize_lora_da` take.
Examples left without any label token (empty text, or a prompt that fills ``max_length``) are kept:
the statistics pass skips and counts them.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

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


def _template_ids(tokenizer, messages: List[Dict[str, str]], add_generation_prompt: bool) -> List[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    if hasattr(out, "keys"):  # a BatchEncoding
        out = out["input_ids"]
    return [int(i) for i in out]


def check_chat_template(tokenizer) -> None:
    """:class:`ConfigError` unless ``tokenizer`` has a chat template."""
    if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
        raise ConfigError("the tokenizer has no chat template (tokenizer.chat_template is empty): use a chat/instruct "
                          "model's tokenizer, or leave the chat template off and format the strings yourself")


def chat_pair_ids(tokenizer, prompt: str, response: str) -> Tuple[List[int], List[int]]:
    """``(prompt ids, response ids)`` of one user/assistant exchange in the tokenizer's own chat template:
    the prompt is the rendered user turn up to the assistant's header (the generation prompt), the
    response everything the template adds after it (the reply and its end-of-turn tokens)."""
    user = [{"role": "user", "content": prompt}]
    p = _template_ids(tokenizer, user, add_generation_prompt=True)
    full = _template_ids(tokenizer, user + [{"role": "assistant", "content": response}], add_generation_prompt=False)
    if full[:len(p)] != p:
        raise DataError("the tokenizer's chat template does not render the prompt turn as a prefix of the whole "
                        "conversation, so the response's labels cannot be told apart: format the strings yourself")
    return p, full[len(p):]


def examples_from_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int,
                        add_eos: bool = True, chat_template: bool = False) -> List[Dict[str, torch.Tensor]]:
    """Prompt/response pairs: ``input_ids = prompt + response (+ eos)``, truncated to ``max_length``
    from the right; prompt tokens get label ``-100`` so that only the response is in the loss.

    The prompt is tokenised with the tokenizer's special tokens (e.g. BOS), the response without, each
    on its own (the usual supervised fine-tuning layout, so the label boundary is exact). Put any
    separator into the strings yourself, or set ``chat_template=True``: each pair is then rendered as a
    user turn and an assistant turn by the tokenizer's own chat template (``apply_chat_template``, with
    the template's default system prompt if it has one); the prompt tokens are the user turn up to the
    assistant's header, the labels the reply and the template's end-of-turn tokens (``add_eos`` is then
    not used). A tokenizer without a chat template is a :class:`ConfigError`.
    """
    _check_max_length(max_length)
    prompts = _check_strings(prompts, "prompts")
    responses = _check_strings(responses, "responses")
    if len(prompts) != len(responses):
        raise DataError(f"{len(prompts)} prompts but {len(responses)} responses")
    if chat_template:
        check_chat_template(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos and not chat_template else None
    out = []
    for prompt, response in zip(prompts, responses):
        if chat_template:
            p, r = chat_pair_ids(tokenizer, prompt, response)
        else:
            p = _ids(tokenizer, prompt, add_special_tokens=True)
            r = _ids(tokenizer, response, add_special_tokens=False)
        if eos is not None:
            r = r + [int(eos)]
        ids = (p + r)[:max_length]
        labels = ([IGNORE_INDEX] * len(p) + r)[:max_length]
        out.append(_example(ids, labels))
    return out
