"""Scores of a model on a task's held-out examples: validation/test loss, accuracy, exact match."""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F

from .model import collate, forward_logits, loss_sum
from .tasks import IGNORE, Task


@torch.no_grad()
def eval_loss(model, examples: Sequence[dict], pad_id: int, bs: int) -> float:
    model.eval()
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))  # less padding; sums do not depend on order
    tot, n = 0.0, 0
    for i in range(0, len(examples), bs):
        s, c = loss_sum(model, examples[i:i + bs], pad_id)
        tot += float(s)
        n += c
    return tot / max(n, 1)


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _numeric_equal(pred: str, ref: str) -> bool:
    refm = _NUM.fullmatch(ref.strip().replace(" ", ""))
    if refm is None:
        return pred.strip() == ref.strip()
    m = _NUM.search(pred)
    if m is None:
        return False
    try:
        return abs(float(m.group().replace(",", "")) - float(ref.strip().replace(",", ""))) < 1e-6
    except ValueError:
        return False


@torch.no_grad()
def eval_test(model, task: Task, tok, bs: int):
    """(score, test loss). Score: classify: accuracy; generate: exact match of greedy decoding; lm: the
    held-out loss. Single-token classification takes both from one forward pass."""
    model.eval()
    pad = tok.pad_token_id
    if task.kind == "lm":
        loss = eval_loss(model, task.test, pad, bs)
        return loss, loss
    if task.kind == "classify" and all(len(c) == 1 for c in task.candidate_ids) and \
            all(len(e["input_ids"]) == len(e["prompt_ids"]) + 1 for e in task.test):
        cand_first = torch.tensor([c[0] for c in task.candidate_ids])
        correct, tot = 0, 0.0
        test = sorted(task.test, key=lambda e: len(e["input_ids"]))
        for i in range(0, len(test), bs):
            chunk = test[i:i + bs]
            ids, mask, pos, _ = collate(chunk, pad, key="prompt_ids")
            logits = forward_logits(model, ids, mask, pos, 1)[:, -1].float()
            tgt = torch.stack([e["input_ids"][-1] for e in chunk])
            tot += float(F.cross_entropy(logits, tgt, reduction="sum"))
            pred = logits[:, cand_first].argmax(1).tolist()
            correct += sum(int(task.candidates[p] == e["target"]) for e, p in zip(chunk, pred))
        return correct / len(task.test), tot / len(task.test)
    return eval_score(model, task, tok, bs), eval_loss(model, task.test, pad, bs)


@torch.no_grad()
def eval_score(model, task: Task, tok, bs: int) -> float:
    """classify: accuracy; generate: exact match of greedy decoding; lm: held-out loss."""
    model.eval()
    pad = tok.pad_token_id
    if task.kind == "lm":
        return eval_loss(model, task.test, pad, bs)
    correct = 0
    if task.kind == "classify":
        single = all(len(c) == 1 for c in task.candidate_ids)
        cand_first = torch.tensor([c[0] for c in task.candidate_ids])
        test = sorted(task.test, key=lambda e: len(e["input_ids"]))
        for i in range(0, len(test), bs):
            chunk = test[i:i + bs]
            if single:
                ids, mask, pos, _ = collate(chunk, pad, key="prompt_ids")
                logits = forward_logits(model, ids, mask, pos, 1)[:, -1].float()
                pred = logits[:, cand_first].argmax(1).tolist()
            else:  # multi-token responses: total log-likelihood of each candidate
                scores = []
                for c in task.candidates:
                    alt = [dict(e, **_swap_response(e, tok, c)) for e in chunk]
                    ids, mask, pos, labels = collate(alt, pad)
                    lg = forward_logits(model, ids, mask, pos, ids.shape[1])[:, :-1].float()
                    tgt = labels[:, 1:]
                    lp = -F.cross_entropy(lg.transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none").sum(1)
                    scores.append(lp)
                pred = torch.stack(scores, 1).argmax(1).tolist()
            for e, p in zip(chunk, pred):
                correct += int(task.candidates[p] == e["target"])
        return correct / len(task.test)
    # generate: greedy decoding, batched, left-padded
    test = sorted(task.test, key=lambda e: len(e["prompt_ids"]))
    for i in range(0, len(test), bs):
        chunk = test[i:i + bs]
        ids, mask, _, _ = collate(chunk, pad, key="prompt_ids")
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=task.max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id, use_cache=True)
        for e, row in zip(chunk, out[:, ids.shape[1]:]):
            text = tok.decode(row, skip_special_tokens=True)
            correct += int(_numeric_equal(text, e["target"]))
    return correct / len(task.test)


def _swap_response(e: dict, tok, response: str) -> dict:
    r = tok(response, add_special_tokens=False).input_ids
    p = e["prompt_ids"]
    return {"input_ids": torch.cat([p, torch.tensor(r)]), "labels": torch.cat([torch.full_like(p, IGNORE), torch.tensor(r)])}

