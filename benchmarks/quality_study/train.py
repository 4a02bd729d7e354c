"""Training runs of the quality study: the learning-rate sweep and the seeds of one method on one task."""
from __future__ import annotations

import math
import random
import time
from typing import List

import torch

from .evaluate import eval_loss, eval_test
from .methods import StatsCache, adapter_delta_norms, init_diagnostics, init_method, parse_method, restore, snapshot
from .model import loss_sum
from .report import window_mean
from .tasks import Task


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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

