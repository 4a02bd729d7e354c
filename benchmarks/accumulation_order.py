"""What each way of summing the input-factor statistics buys (issue 15): the same calibration set at two
batch sizes, the input factors ``Z`` and gradients ``G`` summed four ways, each solved with the dense
float64 reference, and the two batch sizes compared (``||P_a - P_b|| / ||P_b||``, ``P = lora_B @ lora_A``):

- ``fp32``: the pass's own statistics (fp32 sums batch after batch, as the library accumulates them);
- ``batch64``: each batch's fp32 product, summed over the batches in float64;
- ``example64``: each example's fp32 product, summed over the examples in float64 (then stored in fp32);
- ``fp64``: everything in float64.

The tokens come from the pass itself (``keep_tokens="always"``); batches are rebuilt as the engine makes
them (longest first, ``batch_size`` at a time). Default: the ``tiny-llama`` built-in on printable text
(512 tokens, 8 times its width: the input-factor path), whose ``o_proj`` input has a condition number ~1e6.

    .venv/bin/python benchmarks/accumulation_order.py
"""
from __future__ import annotations

import argparse
import random
import statistics
import string
import sys

import torch

from lora_da_fast import LoraDAConfig, run_lora_da
from lora_da_fast.cli.builtins import load_model, records_to_examples
from lora_da_fast.data import prepare_examples
from lora_da_fast.fisher import FisherStatistics, ModuleStatistics
from lora_da_fast.solve import solve_reference

TEXTS = ["the movie was great fun", "a slow and tedious film", "acting: superb; plot: thin",
         "I would watch it again", "", "two hours I will not get back"]


def rebuild(st: FisherStatistics, batches, mode: str) -> FisherStatistics:
    """``st``'s ``Z`` and ``G`` summed again from its tokens (``mode``: batch64, example64, fp64)."""
    tok = st.tokens
    ex = tok.example
    n, T = st.num_examples, st.num_tokens
    Z, mods = {}, {}
    groups = st.groups()
    for g, names in groups.items():
        X = tok.X[g].float()
        parts = [ex == e for b in batches for e in b] if mode == "example64" else \
            [torch.isin(ex, torch.tensor(b)) for b in batches]
        if mode == "fp64":
            Zs = X.double().T @ X.double()
        else:
            Zs = sum((X[p].T @ X[p]).double() for p in parts)
        Z[g] = (Zs / T).float() if mode != "fp64" else Zs / T
        for m in names:
            D = tok.delta[m].float()
            Gs = D.double().T @ X.double() if mode == "fp64" else sum((D[p].T @ X[p]).double() for p in parts)
            mods[m] = ModuleStatistics(g, (Gs / n).float() if mode != "fp64" else Gs / n, st.modules[m].y)
    return FisherStatistics(mods, Z, n, T)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,3")
    a = p.parse_args(argv)
    rng = random.Random(0)
    texts = ["".join(rng.choice(string.printable[:94]) for _ in range(40)) for _ in range(12)] + TEXTS
    model, tok, _ = load_model("tiny-llama", device="cpu")
    exs = records_to_examples(tok, [{"text": t} for t in texts], 32)
    cfg = LoraDAConfig(rank=4, population_size=1000, solver="reference", keep_tokens="always", sensitivity="never")
    runs = {}
    for bs in map(int, a.batch_sizes.split(",")):
        c = LoraDAConfig(**{**cfg.to_dict(), "batch_size": bs})
        st = run_lora_da(model, exs, c, progress=False, solve=False).statistics
        order, _ = prepare_examples(exs)
        batches = [[e.index for e in order[i:i + bs]] for i in range(0, len(order), bs)]
        runs[bs] = (st, batches)
    (sa, ba), (sb, bb) = runs.values()
    print(f"# tiny-llama, {sa.num_tokens} tokens, batch sizes {a.batch_sizes}; dense float64 reference solve")
    print("| summation | all modules median | all modules max | o_proj max |")
    print("|---|---|---|---|")
    for mode in ("fp32", "batch64", "example64", "fp64"):
        # (without their tokens: the input-factor path)
        xa = sa.subset(list(sa.modules)).to("cpu") if mode == "fp32" else rebuild(sa, ba, mode)
        xb = sb.subset(list(sb.modules)).to("cpu") if mode == "fp32" else rebuild(sb, bb, mode)
        xa.tokens = xb.tokens = None
        ra, rb = solve_reference(xa, cfg), solve_reference(xb, cfg)
        P = {k: (r[k].lora_B.double() @ r[k].lora_A.double()) for r in (ra,) for k in r}
        Q = {k: (rb[k].lora_B.double() @ rb[k].lora_A.double()) for k in rb}
        d = {k: float((P[k] - Q[k]).norm() / Q[k].norm()) for k in P}
        o = max(v for k, v in d.items() if k.endswith("o_proj"))
        print(f"| {mode} | {statistics.median(d.values()):.1e} | {max(d.values()):.1e} | {o:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
