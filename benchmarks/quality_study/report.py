"""The quality study's report: per-method summaries, the Markdown tables and the training-loss plot."""
from __future__ import annotations

import math
import statistics as pystats
from typing import Dict, List

from .tasks import Task


def window_mean(xs: List[float], k: int, w: int) -> float:
    seg = [x for x in xs[max(0, k - w):k] if math.isfinite(x)]
    return sum(seg) / len(seg) if seg else float("nan")


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

