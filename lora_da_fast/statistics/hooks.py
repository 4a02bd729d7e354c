"""The hooks of the statistics pass: which modules share an input, where the backward pass starts, and
the fp32 accumulators the backward hooks add to (docs/algorithm.md, "Statistics")."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import LoraDAConfig
from ..data import IGNORE_INDEX, Batch
from ..errors import ConfigError, DataError
from ..ops import get_ops
from ..targets import linear_shape
from .token_store import TokenStore
from ..triangle import packed_size


def input_group_probe(model: nn.Module, targets: Dict[str, nn.Module], device,
                      run: Optional[Callable[[], object]] = None) -> Dict[str, str]:
    """Map each target module to the first module (forward order) that receives the *same input tensor*.

    Runs one short no-grad forward (a dummy 4-token input, or ``run()`` when given: a ``loss_fn`` on a
    short real example) and compares input tensors by storage pointer, shape, strides and
    dtype (like PEFT's EVA, this does not depend on module names). References to the inputs are held
    during the probe so that no storage is reused while the comparison runs.
    """
    seen: List[Tuple[tuple, str, torch.Tensor]] = []
    leader: Dict[str, str] = {}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
            for k, lead, _ in seen:
                if k == key:
                    leader.setdefault(name, lead)
                    return
            seen.append((key, name, x))
            leader.setdefault(name, name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in targets.items()]
    try:
        with torch.no_grad():
            if run is not None:
                run()
            else:
                ids = torch.zeros(1, 4, dtype=torch.long, device=device)
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    # Modules the probe never reached form their own group (a zero-statistics error comes later).
    return {n: leader.get(n, n) for n in targets}


def start_graph(module: nn.Module, args) -> None:
    """Forward pre-hook: make a target's input require grad if nothing upstream does (all weights are
    frozen during the pass), so that autograd records everything downstream of it."""
    x = args[0] if args else None
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
        x.requires_grad_(True)


def input_embeddings(model: nn.Module) -> nn.Module:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise ConfigError("the model has no input embedding layer to start the backward pass from")
    return emb


class Accumulators:
    """The fp32 sums of one statistics pass and the hooks that add to them.

    ``G[name]`` ``[d_out, d_in]``, ``y[name]`` ``[d_out]``, ``Z[leader]`` ``[d_in (d_in + 1) / 2]`` (the
    packed upper triangle, :mod:`lora_da_fast.triangle`; one per input group, keyed by the group's first
    module), ``seq[name]``: per-batch ``[B, d_out]`` per-example sums in ``sequence_lowrank`` mode. Sums, not means: checkpoints save
    them and the reduction over ranks adds them."""

    def __init__(self, targets: Dict[str, nn.Module], leaders: Dict[str, str], cfg: LoraDAConfig):
        self.targets, self.leaders, self.cfg = targets, leaders, cfg
        self.G: Dict[str, torch.Tensor] = {}
        self.y: Dict[str, torch.Tensor] = {}
        self.Z: Dict[str, torch.Tensor] = {}
        self.seq: Dict[str, List[torch.Tensor]] = {n: [] for n in targets}
        self.ops_of: Dict[str, object] = {}
        for name, m in targets.items():
            d_out, d_in = linear_shape(m)
            dev = m.weight.device
            if dev.type == "meta":
                raise ConfigError(f"module {name} has its weights offloaded (meta device): the statistics "
                                  "pass needs every target on a real device (use more GPUs or CPU memory)")
            self.ops_of[name] = get_ops(cfg.backend, dev)  # per module: a model may span CPU and GPUs
            self.G[name] = torch.zeros(d_out, d_in, dtype=torch.float32, device=dev)
            self.y[name] = torch.zeros(d_out, dtype=torch.float32, device=dev)
            if leaders[name] == name:
                self.Z[name] = torch.zeros(packed_size(d_in), dtype=torch.float32, device=dev)
        self.masks: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self.tokens: Optional[TokenStore] = None  # the rows of the groups on the token path (set by the pass)

    def set_batch(self, batch: Batch, token_mask: str, device) -> None:
        attn = batch.attention_mask.to(device).bool()
        if token_mask == "attention":
            stat = attn
        else:  # position t is selected when its next label is not -100
            nxt = torch.zeros_like(attn)
            nxt[:, :-1] = batch.labels[:, 1:].to(device) != IGNORE_INDEX
            stat = nxt & attn
        b, t = attn.shape
        seq_ids = torch.arange(b, device=device).repeat_interleave(t)
        self.batch_size = b
        self.masks = (attn.reshape(-1), stat.reshape(-1), seq_ids)
        if self.tokens is not None:
            self.tokens.set_batch(batch, self.masks[0], self.masks[1])

    def forward_hook(self, name: str) -> Callable:
        def fn(module, inputs, output):
            # No graph (probe, or the first forward of reentrant checkpointing): nothing to collect.
            if not isinstance(output, torch.Tensor) or not output.requires_grad or self.masks is None:
                return
            x = inputs[0]
            output.register_hook(lambda g: self._backward(name, x, g))
        return fn

    def _backward(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        grad_mask, stat_mask, seq_ids = self.masks
        dev = self.G[name].device
        x2 = x.reshape(-1, x.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        if x2.shape[0] != grad_mask.shape[0]:
            raise DataError(f"module {name} receives {x2.shape[0]} rows for {grad_mask.shape[0]} tokens: "
                            "its input is not laid out per token")
        if grad_mask.device != dev:  # model split across devices: masks follow the module
            grad_mask, stat_mask, seq_ids = (t.to(dev) for t in (grad_mask, stat_mask, seq_ids))
        # hooks see a module's input before a dispatcher (accelerate) moves it to the module's device
        x2, g2 = x2.to(dev), g2.to(dev)
        ops = self.ops_of[name]
        if name in self.Z:
            ops.sym_accumulate(self.Z[name], x2, stat_mask)
        seq = None
        if self.cfg.output_fisher == "sequence_lowrank":
            seq = torch.zeros(self.batch_size, g2.shape[1], dtype=torch.float32, device=dev)
            self.seq[name].append(seq)
        ops.grad_stats(self.G[name], self.y[name], g2, x2, grad_mask, stat_mask,
                            seq_sums=seq, seq_ids=seq_ids)
        if self.tokens is not None:
            self.tokens.add(name, x2, g2, grad_mask)
