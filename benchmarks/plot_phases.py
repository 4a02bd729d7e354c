"""Plot time per phase versus model size from end_to_end.py JSON lines.

    python benchmarks/plot_phases.py benchmarks/results/h200-2026-11-28/e2e.jsonl [more.jsonl ...] \
        --out benchmarks/results/phases.png
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default="benchmarks/results/phases.png")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for f in args.files for line in open(f) if line.strip()]
    by_device = {}
    for r in rows:
        by_device.setdefault(r["device"], []).append(r)
    fig, axes = plt.subplots(1, len(by_device), figsize=(5.5 * len(by_device), 4), squeeze=False)
    for ax, (device, rs) in zip(axes[0], by_device.items()):
        rs.sort(key=lambda r: r["params_b"])
        x = [r["params_b"] for r in rs]
        for key, label, style in (("plain_s", "plain fwd+bwd (floor)", "k--o"), ("stats_s", "statistics pass", "b-o"),
                                  ("solve_s", "solve", "r-o"), ("total_s", "total (stats + solve)", "g-o")):
            ax.plot(x, [r[key] for r in rs], style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel("seconds")
        tokens = sorted({r["tokens"] for r in rs})
        ax.set_title(f"{device}, {rs[0]['dtype']}, {'/'.join(map(str, tokens))} tokens", fontsize=9)
        for r in rs:
            ax.annotate(r["model"], (r["params_b"], r["total_s"]), fontsize=7, textcoords="offset points",
                        xytext=(4, 4))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("LoRA-DA time per phase vs model size (benchmarks/end_to_end.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
