"""The statistics pass: one forward+backward over the calibration set gathers, for every target module,
the mean per-example gradient ``G``, the input factor ``Z`` (once per group of modules that receive the
same input tensor), the diagonal output moment ``y`` and, for ``sequence_lowrank``, the per-example
summed output gradients (docs/algorithm.md, "Statistics").

How per-example semantics are kept whatever the batch: the loss back-propagated is ``sum_i L_i`` where
``L_i`` is example ``i``'s own mean token cross-entropy, so every ``delta_t = dL_i/dy_t`` is exactly what
a batch of one would give. Examples are re-batched with right padding (position ids unchanged) and
padding rows are masked out of every statistic.

The base weights never get a ``.grad``: every parameter is frozen during the pass, gradients flow from
the inputs of the target modules (made to require grad by a pre-hook, so the backward pass stops at the
earliest target), and ``G`` is accumulated in the hooks as ``delta^T x``.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import LoraDAConfig
from ..data import IGNORE_INDEX, Batch, Example, collate, iter_batches
from ..errors import ConfigError, DataError, NumericalError
from ..fisher import FisherStatistics, ModuleStatistics, check_finite
from ..triangle import packed_diagonal
from ..targets import find_target_modules
from .hooks import Accumulators, input_embeddings, input_group_probe, start_graph
from .token_store import TokenStore, finish

# A loss/forward callback: ``loss_fn(model, batch) -> losses`` with ``batch`` a dict of tensors on the
# model's device (:meth:`lora_da_fast.data.Batch.inputs`) and ``losses`` of shape ``[batch size]``.
LossFn = Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor]


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[L_i]``, ``L_i`` = mean next-token cross-entropy over example ``i``'s label tokens (fp32, ``[B]``)."""
    shift_logits = logits[:, :-1].float()  # upcast: the loss and its gradient in fp32, as HF does
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return ce.sum(dim=1) / counts


def per_example_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum_i L_i`` (:func:`per_example_losses`)."""
    return per_example_losses(logits, labels).sum()


def _examples(batch: Batch, rows: Optional[List[int]] = None) -> str:
    """The user's indices of the examples of ``batch`` (of its ``rows`` if given), for messages."""
    idx = [batch.indices[r] for r in rows] if rows is not None and batch.indices else list(batch.indices)
    idx = [i for i in idx if i >= 0]
    return ", ".join(map(str, idx)) if idx else "(unknown)"


# The advice for an overflow in half precision, in the Python API's words (the CLI puts its own option)
HALF_PRECISION_ADVICE = "overflow in the model's dtype? run the model in float32, e.g. model.float()"


def overflow_advice(dtype: torch.dtype) -> str:
    """What to do about a non-finite value computed in ``dtype``: float32 in half precision; in float32
    or float64, nothing a dtype can do."""
    if dtype in (torch.float32, torch.float64):
        return f"the model already runs in {str(dtype).replace('torch.', '')}: check its weights and these examples"
    return HALF_PRECISION_ADVICE


class StatisticsPass:
    """One statistics pass: hooks on the target modules, fp32 accumulators and counters.

    Use as a context manager; inside it, feed batches to :meth:`step`; after it, :meth:`finalize`.
    On entry the model is put in eval mode with every parameter frozen, and the input groups are
    detected; on exit the hooks are removed and ``requires_grad`` flags and modes restored exactly.
    ``targets`` (``{name: module}``) restricts the pass to a subset of the target modules (used to
    stream a large model through several passes). ``loss_fn`` (``(model, batch) -> losses [B]``, ``batch``
    from :meth:`~lora_da_fast.data.Batch.inputs`) replaces the causal-LM loss: ``L_i`` is its ``i``-th
    loss, so the per-example semantics follow from it; ``probe`` (an example) is what the input-group
    probe runs it on (the first tokens of it), otherwise the probe feeds the model dummy tokens.

    The accumulators (sums, not means, :class:`~.hooks.Accumulators`) and the counters ``n``
    (examples) and ``T`` (selected tokens) are plain tensors and ints: :meth:`state_dict` and
    :meth:`load_state_dict` checkpoint them, and :func:`~.reduce.reduce_over_ranks` adds them up over
    the ranks of a process group before :meth:`finalize`.
    """

    def __init__(self, model: nn.Module, cfg: LoraDAConfig, targets: Optional[Dict[str, nn.Module]] = None,
                 loss_fn: Optional[LossFn] = None, probe: Optional[Example] = None,
                 total_tokens: Optional[int] = None):
        if not isinstance(cfg, LoraDAConfig):
            raise ConfigError("cfg must be a LoraDAConfig")
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError(f"loss_fn must be a function (model, batch) -> per-example losses, got "
                              f"{type(loss_fn).__name__}")
        self.model, self.cfg, self.loss_fn = model, cfg, loss_fn
        self.targets = targets if targets is not None else find_target_modules(model, cfg.target_modules)
        try:
            self.emb = input_embeddings(model)
            self.device = self.emb.weight.device
        except ConfigError:
            if loss_fn is None:  # the default loss feeds input_ids to the model
                raise
            self.emb = None  # a loss_fn may run any model: batches go where its first parameter lives
            self.device = next(iter(model.parameters())).device
        # The input-group probe runs loss_fn on (the first tokens of) a real example: a model with its
        # own inputs or head need not accept a dummy batch. The default loss probes with dummy tokens.
        self._probe_batch = None
        if loss_fn is not None and probe is not None:
            k = min(len(probe), 8)
            self._probe_batch = Example(probe.input_ids[:k], probe.labels[:k], probe.index,
                                        {n: v[:k] for n, v in probe.token_fields.items()}, dict(probe.fields))
        self.pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        self.n = self.T = 0
        self.acc: Optional[Accumulators] = None
        # non-padding tokens of the whole calibration set (all ranks): which groups keep their tokens
        # (cfg.keep_tokens, lora_da_fast.tokens.token_groups); the rows gathered over the ranks
        self.total_tokens, self.token_rows = total_tokens, None
        self._handles: list = []
        self._saved = None

    def __enter__(self) -> "StatisticsPass":
        model = self.model
        self._saved = ({p: p.requires_grad for p in model.parameters()}, {m: m.training for m in model.modules()})
        try:
            model.eval()  # dropout off: statistics at W0, independent of random masks
            # ...but layers with gradient checkpointing enabled (transformers checks `self.training`)
            # keep it: their own flag alone is set, so dropout in their children stays off.
            for m in model.modules():
                if getattr(m, "gradient_checkpointing", False) is True and hasattr(m, "_gradient_checkpointing_func"):
                    m.training = True
            for p in model.parameters():
                p.requires_grad_(False)
            leaders = input_group_probe(model, self.targets, self.device, self._probe_forward())
            self.acc = Accumulators(self.targets, leaders, self.cfg)
            self.acc.tokens = TokenStore.for_pass(self.cfg.keep_tokens, self.total_tokens, self.targets, leaders)
            self._handles = [m.register_forward_hook(self.acc.forward_hook(name)) for name, m in self.targets.items()]
            # Gradients start at the inputs of the target modules: no parameter needs (or gets) a .grad,
            # and the backward pass stops at the earliest target instead of running down to the embeddings.
            self._handles += [m.register_forward_pre_hook(start_graph) for m in self.targets.values()]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._saved is not None:
            flags, modes = self._saved
            for p, f in flags.items():
                p.requires_grad_(f)
            for m, t in modes.items():
                m.training = t
            self._saved = None

    def _probe_forward(self) -> Optional[Callable[[], object]]:
        if self._probe_batch is None:
            return None
        batch = collate([self._probe_batch], self.pad_id)
        return lambda: self.loss_fn(self.model, batch.inputs(self.device))

    def _forward(self, batch: Batch):
        """The model's output on ``batch`` (default loss) or ``loss_fn``'s per-example losses."""
        if self.loss_fn is not None:
            return self.loss_fn(self.model, batch.inputs(self.device))
        return self.model(input_ids=batch.input_ids.to(self.device),
                          attention_mask=batch.attention_mask.to(self.device), use_cache=False)

    def _losses(self, batch: Batch) -> torch.Tensor:
        """``[L_i]`` of ``batch`` (fp32, ``[B]``): the causal-LM mean token loss of each example, or the
        per-example losses returned by ``loss_fn``."""
        if self.loss_fn is None:
            if "labels" in batch.fields:
                raise DataError(f"examples {_examples(batch)} have one label per example (a class?), but the "
                                "default loss is the causal-LM next-token loss, which needs per-token labels: "
                                "pass loss_fn= (a function (model, batch) -> per-example losses)")
            out = self._forward(batch)
            logits = out.logits if hasattr(out, "logits") else out[0]
            return per_example_losses(logits, batch.labels.to(logits.device))
        losses = self._forward(batch)
        b = batch.batch_size
        if not isinstance(losses, torch.Tensor):
            raise ConfigError(f"loss_fn must return a tensor of per-example losses (shape [{b}]), got "
                              f"{type(losses).__name__}")
        if tuple(losses.shape) != (b,) or not losses.is_floating_point():
            hint = (" (a batch mean such as out.loss? compute one loss per example, e.g. "
                    "cross_entropy(..., reduction='none'))" if losses.dim() == 0 else "")
            raise ConfigError(f"loss_fn must return one floating-point loss per example, shape [{b}]; got shape "
                              f"{list(losses.shape)}, dtype {losses.dtype}{hint}")
        if not losses.requires_grad:
            raise ConfigError("loss_fn's losses have no gradient: they must be computed from the outputs of the "
                              "model it is given (not under torch.no_grad, not detached)")
        return losses.float()

    def step(self, batch: Batch) -> None:
        """Forward and backward of one batch; the hooks accumulate every statistic."""
        acc = self.acc
        acc.set_batch(batch, self.cfg.token_mask, self.device)
        with torch.enable_grad():
            losses = self._losses(batch)
            loss = losses.sum()
            if not torch.isfinite(loss):
                bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
                del loss, losses
                raise NumericalError(self._non_finite_message(batch, bad))
            del losses
            loss.backward()
        self._check_finite(batch)
        self.n += batch.batch_size
        self.T += int(acc.masks[1].sum())

    def _non_finite_message(self, batch: Batch, bad: List[int]) -> str:
        """Where a non-finite loss comes from: the first module whose output is non-finite and the examples
        (rows) where it is, or else the examples whose loss is (``bad``: their rows)."""
        rows = bad or None  # a sum of finite losses that overflowed: every example of the batch
        found = self._first_non_finite(batch)
        if found is not None:
            name, out_rows, dtype = found
            return (f"non-finite values first appear in the output of module {name} on examples "
                    f"{_examples(batch, out_rows or rows)} ({overflow_advice(dtype)})")
        if self.loss_fn is not None:
            return (f"loss_fn returned a non-finite loss on examples {_examples(batch, rows)} (every module's "
                    "output is finite: check loss_fn on these examples)")
        return (f"non-finite loss on examples {_examples(batch, rows)} although every module's output is finite "
                "(logits beyond float32's range?)")

    def _first_non_finite(self, batch: Batch):
        """Rerun the batch's forward (no grad) to find the first module whose output is non-finite:
        ``(name, rows of the batch where it is, dtype it was computed in)`` or ``None``. The dtype is the
        module's own (its first floating-point parameter's), else its output's."""
        first: list = []
        b = batch.batch_size

        def hook(name):
            def fn(module, inputs, output):
                if first or not isinstance(output, torch.Tensor) or not output.is_floating_point():
                    return
                bad = ~torch.isfinite(output.detach())
                if not bool(bad.any()):
                    return
                rows = (bad.reshape(b, -1).any(dim=1).nonzero().flatten().tolist()
                        if output.dim() >= 2 and output.shape[0] == b else None)
                dtype = next((p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()),
                             output.dtype)
                first.append((name or type(module).__name__, rows, dtype))
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in self.model.named_modules()]
        try:
            with torch.no_grad():
                self._forward(batch)
        finally:
            for h in handles:
                h.remove()
        return first[0] if first else None

    def _check_finite(self, batch: Batch) -> None:
        """One cheap test per batch: a non-finite input makes the diagonal of its ``Z`` non-finite and a
        non-finite output gradient makes its ``y`` non-finite, for good. Named by module and example.
        (``Z`` is packed: its diagonal is a gather of ``d_in`` entries.)"""
        acc = self.acc
        per_device: Dict[torch.device, List[torch.Tensor]] = {}
        diagonals = {name: packed_diagonal(z) for name, z in acc.Z.items()}
        for t in list(acc.y.values()) + list(diagonals.values()):
            per_device.setdefault(t.device, []).append(t)
        if all(bool(torch.isfinite(torch.cat(ts)).all()) for ts in per_device.values()):
            return
        for name, diag in diagonals.items():
            if not bool(torch.isfinite(diag).all()):
                raise NumericalError(f"non-finite input activations of module {name} on examples {_examples(batch)} "
                                     f"({overflow_advice(self.targets[name].weight.dtype)})")
        # a non-finite gradient spreads to every module before it: the last one (module order) is the origin
        for name, y in reversed(list(acc.y.items())):
            if not bool(torch.isfinite(y).all()):
                raise NumericalError(f"non-finite output gradients of module {name} on examples {_examples(batch)} "
                                     f"({overflow_advice(self.targets[name].weight.dtype)})")

    def state_dict(self) -> Dict[str, object]:
        acc = self.acc
        return {"n": self.n, "T": self.T, "G": acc.G, "y": acc.y, "Z": acc.Z,
                "seq": {k: (torch.cat(v) if v else None) for k, v in acc.seq.items()},
                "tokens": acc.tokens.local_rows(self.targets) if acc.tokens is not None and acc.tokens.complete
                else None}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        acc = self.acc
        self.n, self.T = int(state["n"]), int(state["T"])
        for key in ("G", "y", "Z"):
            mine = getattr(acc, key)
            if set(mine) != set(state[key]):
                raise DataError(f"checkpoint does not match this model's target modules ({key})")
            for name, t in state[key].items():
                mine[name].copy_(t)
        for name, t in state["seq"].items():
            acc.seq[name] = [] if t is None else [t.to(acc.G[name].device)]
        if acc.tokens is not None:  # without the rows of a checkpoint those groups are solved through Z and G
            acc.tokens.load_rows(state.get("tokens"))

    def finalize(self, skipped: int = 0) -> FisherStatistics:
        """Means from the sums (reduce them over the ranks first under torch.distributed); ``skipped``:
        the examples left out for having no label token, recorded in the statistics."""
        if self.n == 0:
            raise DataError("no usable calibration example (every example is empty or has no label token)"
                            if skipped else "no calibration examples were given")
        if self.T == 0:
            raise DataError("the token mask selects no token in the whole calibration set")
        acc = self.acc
        # the packed triangles become the statistics in place (no copy: they stay packed to the solve)
        Z = {g: z.div_(self.T) for g, z in acc.Z.items()}
        modules = {}
        for name in acc.G:
            seq = torch.cat(acc.seq[name]) if acc.seq[name] else None
            modules[name] = ModuleStatistics(acc.leaders[name], acc.G[name].div_(self.n), acc.y[name].div_(self.T), seq)
        store = acc.tokens
        tokens = None
        if store is not None and store.complete:
            rows = self.token_rows if self.token_rows is not None else store.local_rows(self.targets)
            tokens = finish(rows, store.groups, list(store.leaders))
        stats = FisherStatistics(modules, Z, self.n, self.T, skipped, self.cfg.token_mask, self.cfg.output_fisher,
                                 meta={"model_class": type(self.model).__name__}, tokens=tokens)
        check_finite(stats)
        return stats


def run_pass(sp: "StatisticsPass", examples: List[Example], progress: bool = True, desc: str = "statistics",
             done: int = 0, on_batch: Optional[Callable[[int], None]] = None) -> None:
    """Feed ``examples[done:]`` to ``sp`` in batches of ``cfg.batch_size``, with a progress bar
    (tokens/s); ``on_batch(examples_done)`` is called after each batch (checkpoints)."""
    bar = tqdm(total=len(examples), initial=done, desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
    start, t0 = time.perf_counter(), sp.T
    try:
        for batch in iter_batches(examples[done:], sp.cfg.batch_size, sp.pad_id):
            sp.step(batch)
            done += batch.batch_size
            bar.update(batch.batch_size)
            rate = (sp.T - t0) / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(tok_per_s=f"{rate:.0f}", refresh=False)
            if on_batch is not None:
                on_batch(done)
    finally:
        bar.close()
