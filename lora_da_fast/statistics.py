"""The statistics pass: one forward+backward over the calibration set gathers, for every target module,
the mean per-example gradient ``G``, the input factor ``Z`` (once per group of modules that receive the
same input tensor), the diagonal output moment ``y`` and, for ``sequence_lowrank``, the per-example
summed output gradients. See ALGORITHM.md, "Statistics gathered over the calibration set".

How per-example semantics are kept whatever the batch: the loss back-propagated is ``sum_i L_i`` where
``L_i`` is example ``i``'s own mean token cross-entropy, so every ``delta_t = dL_i/dy_t`` is exactly what
a batch of one would give. Examples are re-batched with right padding (position ids unchanged) and
padding rows are masked out of every statistic.

The base weights never get a ``.grad``: every parameter is frozen during the pass, gradients flow from
the inputs of the target modules (made to require grad by a pre-hook, so the backward pass stops at the
earliest target), and ``G`` is accumulated in the hooks as ``delta^T x``.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .config import LoraDAConfig
from .data import IGNORE_INDEX, Batch, Example, iter_batches, iter_examples
from .errors import ConfigError, DataError, NumericalError
from .targets import find_target_modules, linear_shape

FORMAT_VERSION = 1


@dataclass
class ModuleStatistics:
    """Statistics of one target module (Linear layout: ``G`` is ``d_out x d_in``)."""

    group: str  # key of this module's input factor in FisherStatistics.Z
    G: torch.Tensor  # [d_out, d_in] fp32, mean per-example gradient (1/n) sum_i dL_i/dW
    y: torch.Tensor  # [d_out] fp32, (1/T) sum_{i, t in S_i} delta_t ** 2
    seq_sums: Optional[torch.Tensor] = None  # [n, d_out] fp32, s_i = sum_{t in S_i} delta_t

    @property
    def d_out(self) -> int:
        return int(self.G.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.G.shape[1])


@dataclass
class FisherStatistics:
    """Everything the solver needs; independent of rank, beta, gamma (rerun the solver without data)."""

    modules: Dict[str, ModuleStatistics]
    Z: Dict[str, torch.Tensor]  # group -> [d_in, d_in] fp32 symmetric, (1/T) sum x x^T
    num_examples: int  # n: examples with at least one label token
    num_tokens: int  # T: selected tokens (token_mask)
    num_skipped: int = 0  # examples without any label token
    token_mask: str = "attention"
    output_fisher: str = "diagonal"
    meta: Dict[str, object] = field(default_factory=dict)

    def groups(self) -> Dict[str, List[str]]:
        """Input group -> names of the modules sharing it, in module order."""
        out: Dict[str, List[str]] = {g: [] for g in self.Z}
        for name, st in self.modules.items():
            out[st.group].append(name)
        return out

    def save(self, path: str) -> None:
        """Write to a safetensors file (atomically: a temp file renamed over ``path``)."""
        from safetensors.torch import save_file

        tensors = {}
        names = list(self.modules)
        groups = list(self.Z)
        for i, g in enumerate(groups):
            tensors[f"Z.{i}"] = self.Z[g].contiguous().cpu()
        for i, name in enumerate(names):
            st = self.modules[name]
            tensors[f"G.{i}"] = st.G.contiguous().cpu()
            tensors[f"y.{i}"] = st.y.contiguous().cpu()
            if st.seq_sums is not None:
                tensors[f"s.{i}"] = st.seq_sums.contiguous().cpu()
        header = {
            "format_version": FORMAT_VERSION,
            "modules": names,
            "module_groups": [groups.index(self.modules[n].group) for n in names],
            "groups": groups,
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "num_skipped": self.num_skipped,
            "token_mask": self.token_mask,
            "output_fisher": self.output_fisher,
            "meta": self.meta,
        }
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, tmp, metadata={"lora_da_fast": json.dumps(header)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, device: Optional[torch.device] = None) -> "FisherStatistics":
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise DataError(f"statistics file not found: {path}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                header = json.loads(meta["lora_da_fast"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise DataError(f"{path} is not a lora_da_fast statistics file ({exc})") from None
        if header.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path} has statistics format {header.get('format_version')}, "
                            f"this version reads {FORMAT_VERSION}")
        mv = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        groups = header["groups"]
        Z = {g: mv(tensors[f"Z.{i}"]) for i, g in enumerate(groups)}
        modules = {}
        for i, (name, gi) in enumerate(zip(header["modules"], header["module_groups"])):
            s = tensors.get(f"s.{i}")
            modules[name] = ModuleStatistics(groups[gi], mv(tensors[f"G.{i}"]), mv(tensors[f"y.{i}"]),
                                             None if s is None else mv(s))
        return cls(modules, Z, header["num_examples"], header["num_tokens"], header["num_skipped"],
                   header["token_mask"], header["output_fisher"], header.get("meta", {}))


# --------------------------------------------------------------------------------------------------
# Accumulation backends


def get_ops(backend: str, device: torch.device):
    """The module implementing ``sym_accumulate``/``grad_stats`` for ``backend`` on ``device``."""
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return reference
    try:
        from . import ops
    except ImportError as exc:
        if backend == "auto":
            return reference
        raise ConfigError(f"backend='triton' needs triton ({exc})") from None
    return ops


def _input_group_probe(model: nn.Module, targets: Dict[str, nn.Module], device) -> Dict[str, str]:
    """Map each target module to the first module (forward order) that receives the *same input tensor*.

    Runs one short no-grad forward (a dummy 4-token input) and compares input tensors by storage pointer, shape, strides and
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
        ids = torch.zeros(1, 4, dtype=torch.long, device=device)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    # Modules the probe never reached form their own group (a zero-statistics error comes later).
    return {n: leader.get(n, n) for n in targets}


def _start_graph(module: nn.Module, args) -> None:
    """Forward pre-hook: make a target's input require grad if nothing upstream does (all weights are
    frozen during the pass), so that autograd records everything downstream of it."""
    x = args[0] if args else None
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
        x.requires_grad_(True)


def _examples(batch: Batch) -> str:
    idx = [i for i in batch.indices if i >= 0]
    return ", ".join(map(str, idx)) if idx else "(unknown)"


def _input_embeddings(model: nn.Module) -> nn.Module:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise ConfigError("the model has no input embedding layer to start the backward pass from")
    return emb


def per_example_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum_i L_i``, ``L_i`` = mean next-token cross-entropy over example ``i``'s label tokens (fp32)."""
    shift_logits = logits[:, :-1].float()  # upcast: the loss and its gradient in fp32, as HF does
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return (ce.sum(dim=1) / counts).sum()


class _Accumulator:
    """Hooks and fp32 accumulators of one statistics pass."""

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
                self.Z[name] = torch.zeros(d_in, d_in, dtype=torch.float32, device=dev)
        self.masks: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

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


class StatisticsPass:
    """One statistics pass: hooks on the target modules, fp32 accumulators and counters.

    Use as a context manager; inside it, feed batches to :meth:`step`; after it, :meth:`finalize`.
    On entry the model is put in eval mode with every parameter frozen, and the input groups are
    detected; on exit the hooks are removed and ``requires_grad`` flags and modes restored exactly.
    ``targets`` (``{name: module}``) restricts the pass to a subset of the target modules (used to
    stream a large model through several passes).

    The accumulators (sums, not means) and counters are plain tensors/ints: :meth:`state_dict` and
    :meth:`load_state_dict` checkpoint them; the distributed module all-reduces them.
    """

    def __init__(self, model: nn.Module, cfg: LoraDAConfig, targets: Optional[Dict[str, nn.Module]] = None):
        if not isinstance(cfg, LoraDAConfig):
            raise ConfigError("cfg must be a LoraDAConfig")
        self.model, self.cfg = model, cfg
        self.targets = targets if targets is not None else find_target_modules(model, cfg.target_modules)
        self.emb = _input_embeddings(model)
        self.device = self.emb.weight.device
        self.pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        self.n = self.T = self.skipped = 0
        self.acc: Optional[_Accumulator] = None
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
            leaders = _input_group_probe(model, self.targets, self.device)
            self.acc = _Accumulator(self.targets, leaders, self.cfg)
            self._handles = [m.register_forward_hook(self.acc.forward_hook(name)) for name, m in self.targets.items()]
            # Gradients start at the inputs of the target modules: no parameter needs (or gets) a .grad,
            # and the backward pass stops at the earliest target instead of running down to the embeddings.
            self._handles += [m.register_forward_pre_hook(_start_graph) for m in self.targets.values()]
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

    def usable(self, examples: Iterable, limit: Optional[int] = None) -> Iterator[Example]:
        """Single examples from ``examples`` (the first ``limit`` of them if given); those without a
        label token are skipped and counted."""
        for e in itertools.islice(iter_examples(examples), limit):
            if e.num_label_tokens == 0:
                self.skipped += 1
                continue
            yield e

    def step(self, batch: Batch) -> None:
        """Forward and backward of one batch; the hooks accumulate every statistic."""
        acc = self.acc
        acc.set_batch(batch, self.cfg.token_mask, self.device)
        with torch.enable_grad():
            out = self.model(input_ids=batch.input_ids.to(self.device),
                             attention_mask=batch.attention_mask.to(self.device), use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            loss = per_example_loss_sum(logits, batch.labels.to(logits.device))
            if not torch.isfinite(loss):
                del out, logits, loss
                raise NumericalError(f"non-finite values first appear in the output of module "
                                     f"{self._first_non_finite(batch)} on examples {_examples(batch)} "
                                     "(overflow in the model's dtype? try --dtype float32)")
            loss.backward()
        self._check_finite(batch)
        self.n += batch.batch_size
        self.T += int(acc.masks[1].sum())

    def _first_non_finite(self, batch: Batch) -> str:
        """Rerun the batch's forward (no grad) to find the first module whose output is non-finite."""
        first: List[str] = []

        def hook(name):
            def fn(module, inputs, output):
                if not first and isinstance(output, torch.Tensor) and output.is_floating_point() \
                        and not bool(torch.isfinite(output).all()):
                    first.append(name or type(module).__name__)
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in self.model.named_modules()]
        try:
            with torch.no_grad():
                self.model(input_ids=batch.input_ids.to(self.device),
                           attention_mask=batch.attention_mask.to(self.device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return first[0] if first else "(none found: the loss itself overflowed)"

    def _check_finite(self, batch: Batch) -> None:
        """One cheap test per batch: a non-finite input makes the diagonal of its ``Z`` non-finite and a
        non-finite output gradient makes its ``y`` non-finite, for good. Named by module and example."""
        acc = self.acc
        per_device: Dict[torch.device, List[torch.Tensor]] = {}
        for t in list(acc.y.values()) + [z.diagonal() for z in acc.Z.values()]:
            per_device.setdefault(t.device, []).append(t)
        if all(bool(torch.isfinite(torch.cat(ts)).all()) for ts in per_device.values()):
            return
        for name, z in acc.Z.items():
            if not bool(torch.isfinite(z.diagonal()).all()):
                raise NumericalError(f"non-finite input activations of module {name} on examples "
                                     f"{_examples(batch)} (overflow in the model's dtype? try --dtype float32)")
        # a non-finite gradient spreads to every module before it: the last one (module order) is the origin
        for name, y in reversed(list(acc.y.items())):
            if not bool(torch.isfinite(y).all()):
                raise NumericalError(f"non-finite output gradients of module {name} on examples "
                                     f"{_examples(batch)} (overflow in the model's dtype? try --dtype float32)")

    def state_dict(self) -> Dict[str, object]:
        acc = self.acc
        return {"n": self.n, "T": self.T, "skipped": self.skipped, "G": acc.G, "y": acc.y, "Z": acc.Z,
                "seq": {k: (torch.cat(v) if v else None) for k, v in acc.seq.items()}}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        acc = self.acc
        self.n, self.T, self.skipped = int(state["n"]), int(state["T"]), int(state["skipped"])
        for key in ("G", "y", "Z"):
            mine = getattr(acc, key)
            if set(mine) != set(state[key]):
                raise DataError(f"checkpoint does not match this model's target modules ({key})")
            for name, t in state[key].items():
                mine[name].copy_(t)
        for name, t in state["seq"].items():
            acc.seq[name] = [] if t is None else [t.to(acc.G[name].device)]

    def finalize(self) -> FisherStatistics:
        """Means from the sums (all-reduced over ranks first when torch.distributed is initialised)."""
        from . import distributed

        if distributed.is_active():
            distributed.all_reduce_pass(self)
        if self.n == 0:
            raise DataError("no usable calibration example (every example is empty or has no label token)"
                            if self.skipped else "no calibration examples were given")
        if self.T == 0:
            raise DataError("the token mask selects no token in the whole calibration set")
        return _finalize(self.acc, self.n, self.T, self.skipped, self.cfg, self.model)


def prepare_examples(sp: "StatisticsPass", examples: Iterable, limit: Optional[int] = None,
                     shard: bool = True) -> List[Example]:
    """The usable examples of ``examples`` (of its first ``limit`` examples if given; skipped ones counted
    in ``sp.skipped``), longest first when ``cfg.sort_by_length`` (batches of similar lengths waste
    little on padding; the statistics do not depend on the order), and, under torch.distributed with
    ``shard``, this rank's shard of them (:func:`shard_examples`)."""
    exs = list(sp.usable(examples, limit))
    if sp.cfg.sort_by_length:
        exs.sort(key=len, reverse=True)  # stable: ties keep the user's order
    return shard_examples(sp, exs) if shard else exs


def shard_examples(sp: "StatisticsPass", exs: List[Example]) -> List[Example]:
    """This rank's shard of the prepared examples ``exs`` (all of them without torch.distributed)."""
    from . import distributed

    if not distributed.is_active():
        return exs
    # every rank saw (and counted) every example; the count is summed over ranks later
    if not distributed.is_main():
        sp.skipped = 0
    return list(distributed.shard(exs))


def run_pass(sp: "StatisticsPass", examples: List[Example], progress: bool = True, desc: str = "statistics",
             done: int = 0, on_batch: Optional[Callable[[int], None]] = None) -> None:
    """Feed ``examples[done:]`` to ``sp`` in batches of ``cfg.batch_size``, with a progress bar
    (tokens/s); ``on_batch(examples_done)`` is called after each batch (checkpoints)."""
    from tqdm.auto import tqdm

    from . import distributed

    progress = progress and distributed.is_main()
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


def collect_statistics(model: nn.Module, examples: Iterable, cfg: LoraDAConfig,
                       progress: bool = True, num_examples: Optional[int] = None,
                       checkpoint: Optional[str] = None, checkpoint_every: int = 64) -> FisherStatistics:
    """One forward+backward pass over ``examples``; returns the :class:`FisherStatistics`.

    ``examples``: dicts with ``input_ids`` (and optionally ``attention_mask``, ``labels``), 1-D examples
    or 2-D padded batches, or a ``DataLoader`` of either. Examples without a label token are skipped and
    counted. The model's parameters, ``requires_grad`` flags and train/eval modes are restored on exit.
    Under an initialised ``torch.distributed`` process group, each rank takes its shard of the examples
    and the sums are all-reduced. ``num_examples``: use only the first ``num_examples`` examples (rows of
    2-D batches count one each), e.g. of an endless iterator; ``None``: all of them.

    ``checkpoint``: a file that receives the pass's state every ``checkpoint_every`` examples (atomic
    writes, with a fingerprint of model, data, config and code version); if it exists when the pass
    starts, the pass resumes from it (bit-identical to an uninterrupted run) or refuses a mismatch.
    It is deleted once the pass completes.
    """
    from . import checkpoint as ckpt
    from . import distributed

    if checkpoint is not None and distributed.is_active():
        checkpoint = f"{checkpoint}.rank{distributed.rank()}"  # each rank checkpoints its own shard
    if num_examples is not None and (isinstance(num_examples, bool) or not isinstance(num_examples, int)
                                     or num_examples < 1):
        raise ConfigError(f"num_examples must be a positive integer or None, got {num_examples!r}")
    with distributed.guard(), StatisticsPass(model, cfg) as sp:
        exs = prepare_examples(sp, examples, num_examples)
        done, on_batch = 0, None
        if checkpoint is not None:
            fp = ckpt.fingerprint(model, sp, exs)
            done = ckpt.resume(sp, checkpoint, fp)
            on_batch = ckpt.saver(sp, checkpoint, fp, checkpoint_every)
        run_pass(sp, exs, progress, done=done, on_batch=on_batch)
    stats = sp.finalize()
    if checkpoint is not None and os.path.exists(checkpoint):
        os.remove(checkpoint)
    return stats


def _finalize(acc: _Accumulator, n: int, T: int, skipped: int, cfg: LoraDAConfig, model) -> FisherStatistics:
    Z = {g: reference.symmetrize_upper(z).div_(T) for g, z in acc.Z.items()}
    modules = {}
    for name in acc.G:
        seq = torch.cat(acc.seq[name]) if acc.seq[name] else None
        modules[name] = ModuleStatistics(acc.leaders[name], acc.G[name].div_(n), acc.y[name].div_(T), seq)
    stats = FisherStatistics(modules, Z, n, T, skipped, cfg.token_mask, cfg.output_fisher,
                             meta={"model_class": type(model).__name__})
    check_finite(stats)
    return stats


def first_failing(checks: List[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """The label of the first ``(label, flag)`` whose boolean scalar tensor is false, or ``None``. The
    flags are reduced on their devices and read with one transfer per device (not one per module: on a
    GPU each read waits for the device)."""
    by_device: Dict[torch.device, List[int]] = {}
    for i, (_, flag) in enumerate(checks):
        by_device.setdefault(flag.device, []).append(i)
    bad = len(checks)
    for idxs in by_device.values():
        values = torch.stack([checks[i][1] for i in idxs]).tolist()
        bad = min([bad] + [i for i, ok in zip(idxs, values) if not ok])
    return checks[bad][0] if bad < len(checks) else None


def check_finite(stats: FisherStatistics) -> None:
    """Raise :class:`NumericalError` naming the first module whose statistics hold NaN or inf."""
    checks = [(f"input statistics Z in module {g}", torch.isfinite(z).all()) for g, z in stats.Z.items()]
    for name, st in stats.modules.items():
        for label, t in (("gradient G", st.G), ("output moment y", st.y), ("sequence sums", st.seq_sums)):
            if t is not None:
                checks.append((f"{label} in module {name}", torch.isfinite(t).all()))
    bad = first_failing(checks)
    if bad is not None:
        raise NumericalError(f"non-finite {bad} (overflow in the model's dtype?)")
