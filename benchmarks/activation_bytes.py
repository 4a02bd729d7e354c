"""What one statistics-pass batch keeps for its backward, measured on random-weight Llama shapes (CPU): the
tensors autograd saves plus the module inputs the statistics hooks hold, counted once per storage, weights
and buffers excluded. Per layer and token, against the memory plan's estimate
(``lora_da_fast.plan.ACTIVATION_FACTOR`` x element size x the sum of ``d_in + d_out`` over the layer's
targets). Layers and the rest (embeddings, loss) are separated by measuring 1- and 2-layer models.

    python benchmarks/activation_bytes.py --dtype bfloat16
"""
from __future__ import annotations

import argparse
import sys

import torch

from harness import random_llama

from lora_da_fast import LoraDAConfig
from lora_da_fast.data import Example, iter_batches
from lora_da_fast.plan import ACTIVATION_FACTOR
from lora_da_fast.statistics import StatisticsPass
from lora_da_fast.targets import linear_shape

SHAPES = {  # hidden, intermediate, heads, kv heads
    "smollm2-135m": (576, 1536, 9, 3),
    "llama-1b-wide": (2048, 5632, 32, 4),
    "llama-7b-wide": (4096, 11008, 32, 32),
}
VOCAB = 32000


def kept_bytes(hidden, inter, heads, kv, layers, tokens, dtype) -> tuple:
    torch.manual_seed(0)
    model = random_llama(hidden, layers, inter, heads, kv, vocab=VOCAB, max_positions=4096, dtype=dtype)
    weights = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    held = {}

    def keep(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            held[s.data_ptr()] = s.nbytes()
        return t

    def hold(module, inputs, output):
        keep(inputs[0])

    gen = torch.Generator().manual_seed(0)
    ex = [Example(torch.randint(0, VOCAB, (tokens,), generator=gen), torch.randint(0, VOCAB, (tokens,), generator=gen), 0)]
    with StatisticsPass(model, LoraDAConfig(batch_size=1, backend="torch")) as sp:
        hooks = [m.register_forward_hook(hold) for m in sp.targets.values()]
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            sp.step(next(iter(iter_batches(ex, 1, 0))))
        for h in hooks:
            h.remove()
        per_layer_elems = sum(sum(linear_shape(m)) for m in sp.targets.values()) / layers
    return sum(held.values()), per_layer_elems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    size = torch.finfo(dtype).bits // 8
    print(f"| shape | dtype | kept per layer and token (B) | / (element size x sum(d_in + d_out)) | "
          f"rest per token (B) | rest / vocab |")
    print("|---|---|---|---|---|---|")
    for name, (h, f, nh, kv) in SHAPES.items():
        one, elems = kept_bytes(h, f, nh, kv, 1, args.tokens, dtype)
        two, _ = kept_bytes(h, f, nh, kv, 2, args.tokens, dtype)
        per_layer = (two - one) / args.tokens
        rest = one / args.tokens - per_layer
        print(f"| {name} | {args.dtype} | {per_layer:.0f} | {per_layer / (size * elems):.3f} "
              f"(plan: {ACTIVATION_FACTOR}) | {rest:.0f} | {rest / VOCAB:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
