"""The drop-in ``lora_da_fast.compat.estimate_lora_da_initializations`` against the authors' own
``lora_da.estimate_lora_da_initializations`` (github.com/zqy0126/LoRA-DA), side by side in one run, on
the same model, examples and ``named_grads``; and both against the exact answer (dense float64 solve).

Rows (wall and CPU seconds, one run each):
  authors_grad   - the gradient pass of the authors' script (``run_exp.estimate_gradient``, re-done here:
                   batch size 1, HF mean loss times the batch size, every parameter's ``.grad``, divided
                   by the number of examples): ``named_grads`` for both calls;
  authors        - their call: batch size 1, ``fisher_layers_per_pass`` layers per Fisher pass,
                   ``lobpcg_niter`` LOBPCG iterations (their defaults 1 and 10);
  compat         - our drop-in, same arguments (``named_grads`` given);
  compat_no_grad - our drop-in with ``named_grads=None``: G from the same pass (replaces authors_grad too);
  exact          - statistics + dense float64 reference solve (``solver="reference"``), G = named_grads.
Accuracy: per module, ``||lora_B @ lora_A - exact|| / ||exact||`` (max, median, count of NaN).

Their ``lora_da.py`` is never part of this repository: give its path (``--authors``, or
``$LORA_DA_AUTHORS``); it is copied to a temporary folder and imported from there.

    python benchmarks/bench_compat.py --authors /path/to/LoRA-DA/lora_da.py --out benchmarks/results/DIR
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from harness import environment, git_state, markdown_table, timed, write_results

from lora_da_fast import LoraDAConfig, collect_statistics, solve_lora_da  # after harness: a source tree
from lora_da_fast.cli.builtins import load_model, rotten_tomatoes
from lora_da_fast.cli.init import subsample_indices
from lora_da_fast.compat import authors_target_names, estimate_lora_da_initializations
from lora_da_fast.fisher import ModuleStatistics
from lora_da_fast.text import examples_from_texts

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def import_authors(path: str):
    """The authors' module, imported from a temporary copy of ``path`` (a file or its folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, "lora_da.py")
    if not os.path.isfile(path):
        raise SystemExit(f"--authors {path}: no such file (the authors' lora_da.py from github.com/zqy0126/LoRA-DA)")
    tmp = tempfile.mkdtemp(prefix="authors_lora_da_")
    copy = os.path.join(tmp, "authors_lora_da.py")
    shutil.copyfile(path, copy)
    spec = importlib.util.spec_from_file_location("authors_lora_da", copy)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def authors_gradient(model, dataset):
    """``named_grads`` as the authors' ``run_exp.estimate_gradient`` makes them at batch size 1: the mean
    over examples of every trainable parameter's gradient of HF's loss (model in train mode)."""
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    for ex in dataset:
        batch = {k: v[None] for k, v in ex.items()}
        model(**batch).loss.backward()
    grads = {n: p.grad.detach().cpu() / len(dataset) for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return grads


def errors(out, exact, names):
    errs = []
    for n in names:
        f = out[n + ".weight"]
        P = exact[n].lora_B.double() @ exact[n].lora_A.double()
        e = float(torch.linalg.norm(f["lora_B"].double() @ f["lora_A"].double() - P) / torch.linalg.norm(P))
        errs.append(e)
    finite = [e for e in errs if math.isfinite(e)]
    return {"max": max(finite) if finite else float("nan"), "median": statistics.median(finite) if finite else float("nan"),
            "nan": len(errs) - len(finite), "modules": len(errs)}


def exact_solution(model, ds, names, args, named_grads):
    cfg = LoraDAConfig(rank=args.rank, population_size=args.population_size, beta=args.beta, gamma=args.gamma,
                       target_modules=names, solver="reference", batch_size=args.pass_batch_size)
    stats = collect_statistics(model, ds, cfg, progress=False)
    if named_grads is not None:
        stats.modules = {n: ModuleStatistics(st.group, named_grads[n + ".weight"].float(), st.y, st.seq_sums)
                         for n, st in stats.modules.items()}
    return solve_lora_da(stats, cfg), stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authors", default=os.environ.get("LORA_DA_AUTHORS"), help="the authors' lora_da.py")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-examples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.03, help="variance_beta (their experiment: 0.03)")
    ap.add_argument("--gamma", type=float, default=1024.0, help="their experiment: 1024")
    ap.add_argument("--population-size", type=int, default=100000, help="their experiment: 100000")
    ap.add_argument("--fisher-layers-per-pass", default="1",
                    help="the authors' fisher_layers_per_pass, comma-separated for several rows (their default 1, "
                         "their experiment 8)")
    ap.add_argument("--lobpcg-niter", type=int, default=10)
    ap.add_argument("--pass-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for results.json and table.md")
    args = ap.parse_args(argv)
    if not args.authors:
        ap.error("--authors PATH (or $LORA_DA_AUTHORS): the authors' lora_da.py; fetch github.com/zqy0126/LoRA-DA")
    if args.threads:
        torch.set_num_threads(args.threads)
    authors = import_authors(args.authors)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    model, tokenizer, _ = load_model(args.model, "float32", "cpu")
    records = rotten_tomatoes()
    texts = [records[i]["text"] for i in subsample_indices(len(records), args.num_examples)]
    ds = examples_from_texts(tokenizer, texts, args.max_length)  # dicts of 1-D tensors: their loader's format
    tokens = sum(len(e["input_ids"]) for e in ds)
    names = authors_target_names(model, ALL_LINEAR)
    print(f"{args.model}: {len(names)} target modules, {len(ds)} examples, {tokens} tokens; {environment()}",
          flush=True)
    common = dict(variance_beta=args.beta, gamma=args.gamma)
    rows, results = {}, {}

    t = timed(lambda: authors_gradient(model, ds))
    named_grads = t.result
    rows["authors_grad"] = t
    print(f"authors' gradient pass: {t.wall:.1f} s", flush=True)

    t = timed(lambda: estimate_lora_da_initializations(model, ds, named_grads, ALL_LINEAR, args.rank,
                                                        args.population_size, pass_batch_size=args.pass_batch_size,
                                                        progress=False, **common))
    rows["compat"], results["compat"] = t, t.result
    print(f"compat: {t.wall:.1f} s", flush=True)

    for lpp in [int(x) for x in args.fisher_layers_per_pass.split(",")]:
        key = f"authors_lpp{lpp}"
        t = timed(lambda: authors.estimate_lora_da_initializations(
            model, ds, named_grads, ALL_LINEAR, args.rank, args.population_size, batch_size=1,
            lobpcg_niter=args.lobpcg_niter, fisher_layers_per_pass=lpp, **common))
        rows[key], results[key] = t, t.result
        print(f"authors (fisher_layers_per_pass={lpp}): {t.wall:.1f} s", flush=True)

    t = timed(lambda: estimate_lora_da_initializations(model, ds, None, ALL_LINEAR, args.rank, args.population_size,
                                                        pass_batch_size=args.pass_batch_size, progress=False,
                                                        **common))
    rows["compat_no_grad"], results["compat_no_grad"] = t, t.result
    print(f"compat, named_grads=None: {t.wall:.1f} s", flush=True)

    t = timed(lambda: exact_solution(model, ds, names, args, named_grads))
    rows["exact"] = t
    exact, _ = t.result
    exact_own, _ = exact_solution(model, ds, names, args, None)  # for compat_no_grad: G from the pass
    print(f"exact (dense float64): {t.wall:.1f} s", flush=True)

    acc = {k: errors(v, exact_own if k == "compat_no_grad" else exact, names) for k, v in results.items()}
    base, base_cpu = rows["compat"].wall, rows["compat"].cpu
    table = []
    for k, tm in rows.items():
        a = acc.get(k, {})
        table.append([k, f"{tm.wall:.1f}", f"{tm.cpu:.1f}", f"{tm.wall / base:.2f}", f"{tm.cpu / base_cpu:.2f}",
                      f"{a['max']:.1e}" if a else "", f"{a['median']:.1e}" if a else "", a.get("nan", "")])
    ng = rows["compat_no_grad"]
    for k in [k for k in rows if k.startswith("authors_lpp")]:  # their whole pipeline vs ours without named_grads
        wall, cpu = rows[k].wall + rows["authors_grad"].wall, rows[k].cpu + rows["authors_grad"].cpu
        table.append([f"{k} + authors_grad (ratios: x compat_no_grad)", f"{wall:.1f}", f"{cpu:.1f}",
                      f"{wall / ng.wall:.2f}", f"{cpu / ng.cpu:.2f}", "", "", ""])
    md = markdown_table(["row", "wall s", "cpu s", "x compat (wall)", "x compat (cpu)", "max rel err",
                         "median rel err", "NaN modules"], table)
    print(md)
    meta = {"command": "python benchmarks/bench_compat.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started": started, "env": environment(), "git": git_state(), "model": args.model,
            "examples": len(ds), "tokens": tokens, "modules": len(names), "args": vars(args)}
    out = {"meta": meta, "rows": {k: {"wall": v.wall, "cpu": v.cpu} for k, v in rows.items()}, "accuracy": acc}
    write_results(args.out, {"results.json": out, "table.md": md})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
