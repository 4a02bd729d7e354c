"""The model, batches and the loss of the quality study."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from lora_da_fast.cli.builtins import load_model as lib_load

from .tasks import IGNORE

def load_model(spec: str):
    """(model, tokenizer) in float32 on CPU, via lora_da_fast.cli.builtins (cached conversion of the GGUF)."""
    model, tok, _ = lib_load(spec, dtype="float32", device="cpu")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    model.config.use_cache = False
    return model, tok


def collate(examples: Sequence[dict], pad_id: int, key: str = "input_ids"):
    """Left-padded batch (so that the response tokens line up at the end) with explicit positions."""
    T = max(len(e[key]) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e[key])
        ids[i, T - n:] = e[key]
        mask[i, T - n:] = 1
        if key == "input_ids":
            labels[i, T - n:] = e["labels"]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, pos, labels


_KEEP_OK: Dict[int, bool] = {}


def forward_logits(model, ids, mask, pos, keep: int):
    """Logits of the last ``keep`` positions (``logits_to_keep`` when the model takes it)."""
    key = id(type(model))
    if _KEEP_OK.get(key, True):
        try:
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)
            _KEEP_OK[key] = True
            return out.logits[:, -keep:]
        except TypeError:
            _KEEP_OK[key] = False
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -keep:]


def loss_sum(model, examples: Sequence[dict], pad_id: int):
    """(sum of next-token cross-entropies over label tokens, number of label tokens) for a batch."""
    ids, mask, pos, labels = collate(examples, pad_id)
    T = ids.shape[1]
    has = labels != IGNORE
    has[:, 0] = False
    first = int(has.float().argmax(1)[has.any(1)].min()) if has.any() else T - 1
    keep = T - first + 1  # positions first-1 .. T-1
    logits = forward_logits(model, ids, mask, pos, keep)
    tgt = labels[:, T - keep + 1:]
    lg = logits[:, :-1].float()
    total = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return total, int((tgt != IGNORE).sum())

