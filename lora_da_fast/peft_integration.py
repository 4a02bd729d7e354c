"""LoRA-DA for Hugging Face PEFT: a ``peft.PeftModel`` whose ``lora_A``/``lora_B`` hold the LoRA-DA
factors (docs/algorithm.md, "Solve": the factors in PEFT's layout).

The rank and the adapted modules come from the user's ``peft.LoraConfig``. The modules are resolved
with PEFT's own matching rules (:func:`lora_da_fast.targets.lora_target_names`) and their exact names
are given to the engine, so statistics, factors and LoRA layers refer to the same modules; after
wrapping, the set of LoRA layers PEFT created is checked against it.

Entry points, one road: :func:`get_lora_da_state_dict` computes the factors (on a ``PeftModel`` the user
made with ``get_peft_model``, or on a plain model with the ``LoraConfig`` it will be wrapped with: any
``target_modules``, ``layers_to_transform``, ``rank_pattern``, ``alpha_pattern``), through the engine;
:func:`initialize_lora_da_weights` applies them to a ``PeftModel`` in place, as PEFT's own data-driven
initialisers (EVA) do; :func:`initialize_lora_da` is the state-dict door plus ``get_peft_model`` plus
apply, for a plain model. All of them take a ``loss_fn`` for models other than causal LMs.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from torch import nn

from .config import LoraDAConfig
from .engine import run_lora_da, select_statistics
from .errors import ConfigError, TargetError
from .fileio import signals_held
from .fisher import FisherStatistics, ModuleStatistics
from .results import LoraDAResult, LoraFactors
from .statistics.statistics_pass import LossFn
from .targets import check_lora_config, lora_target_names
from .validate import check_not_compiled, check_not_wrapped

_DEFAULT_TARGETS = LoraDAConfig.__dataclass_fields__["target_modules"].default


def resolve_lora_da_config(lora_config, lora_da_config: Optional[LoraDAConfig], names: List[str]) -> LoraDAConfig:
    """The :class:`LoraDAConfig` to run: rank from ``lora_config.r``, targets = ``names``.

    A ``lora_da_config.rank`` different from ``lora_config.r`` is a :class:`ConfigError` (the rank is
    the LoraConfig's), and so is a ``lora_da_config.target_modules`` other than its default. The settings
    of the solve (``population_size``, the rank bound) are checked by the engine, before any data pass.
    """
    r = lora_config.r
    if lora_da_config is None:
        lora_da_config = LoraDAConfig(rank=r)
    if not isinstance(lora_da_config, LoraDAConfig):
        raise ConfigError(f"lora_da_config must be a LoraDAConfig, got {type(lora_da_config).__name__}")
    if lora_da_config.rank != r:
        raise ConfigError(f"LoraDAConfig.rank={lora_da_config.rank} conflicts with LoraConfig.r={r}: the rank is "
                          f"taken from the LoraConfig; pass LoraDAConfig(rank={r}, ...) or leave them equal")
    if lora_da_config.target_modules != _DEFAULT_TARGETS:
        raise ConfigError("LoraDAConfig.target_modules is ignored by initialize_lora_da (targets come from "
                          "LoraConfig.target_modules): leave it at its default")
    return dataclasses.replace(lora_da_config, target_modules=list(names))


def lora_layers(peft_model: nn.Module, adapter_name: str = "default") -> Dict[str, nn.Module]:
    """``{name: LoraLayer}`` of ``peft_model`` holding ``adapter_name``, named as in the base model."""
    root = peft_model.base_model.model if hasattr(peft_model, "base_model") else peft_model
    return {n: m for n, m in root.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {})}


def _checked_layers(peft_model: nn.Module, factors: Dict[str, LoraFactors], adapter_name: str,
                    subtract_init: bool) -> Dict[str, nn.Module]:
    """The adapter's LoRA layers, each with factors of its shapes (and, for ``subtract_init``, a
    floating-point base weight): every check of :func:`apply_lora_da`, before its first write."""
    layers = lora_layers(peft_model, adapter_name)
    if not layers:
        raise TargetError(f"the model has no LoRA layer for adapter {adapter_name!r}")
    missing = sorted(set(layers) - set(factors))
    extra = sorted(set(factors) - set(layers))
    if missing or extra:
        what = (f"{len(missing)} LoRA layer(s) without factors, e.g. {missing[0]}" if missing
                else f"factors for {len(extra)} module(s) PEFT did not wrap, e.g. {extra[0]}")
        raise TargetError(f"LoRA layers and LoRA-DA factors do not match: {what}")
    for name, layer in layers.items():
        f = factors[name]
        A = layer.lora_A[adapter_name].weight
        B = layer.lora_B[adapter_name].weight
        if tuple(A.shape) != tuple(f.lora_A.shape) or tuple(B.shape) != tuple(f.lora_B.shape):
            raise TargetError(f"{name}: LoRA shapes A{tuple(A.shape)} B{tuple(B.shape)} but factors "
                              f"A{tuple(f.lora_A.shape)} B{tuple(f.lora_B.shape)} (different rank?)")
        if subtract_init and not layer.get_base_layer().weight.dtype.is_floating_point:
            raise ConfigError(f"subtract_init needs a floating-point base weight; {name} is "
                              f"{layer.get_base_layer().weight.dtype}")
    return layers


def _planned_writes(peft_model: nn.Module, factors: Dict[str, LoraFactors], adapter_name: str,
                    subtract_init: bool) -> Callable[[], None]:
    """Every check, cast and allocation of :func:`apply_lora_da`; returns its writes, which allocate
    nothing (the LoRA weights as they were are kept to be put back if a write fails; ``subtract_init``
    works in two fp32 buffers per device, of the largest weight's size)."""
    layers = _checked_layers(peft_model, factors, adapter_name, subtract_init)
    lora: List[Tuple[torch.Tensor, torch.Tensor]] = []
    base = []
    size: Dict[torch.device, int] = {}
    for name, layer in layers.items():
        f = factors[name]
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        lora += [(A, f.lora_A.to(device=A.device, dtype=A.dtype)), (B, f.lora_B.to(device=B.device, dtype=B.dtype))]
        if subtract_init:
            W = layer.get_base_layer().weight
            base.append((W, layer.scaling[adapter_name], f.lora_B.to(W.device, torch.float32),
                         f.lora_A.to(W.device, torch.float32), bool(getattr(layer, "fan_in_fan_out", False))))
            size[W.device] = max(size.get(W.device, 0), W.numel())
    before = [p.detach().clone() for p, _ in lora]
    scratch = {dev: (torch.empty(n, dtype=torch.float32, device=dev), torch.empty(n, dtype=torch.float32, device=dev))
               for dev, n in size.items()}

    @torch.no_grad()
    def write() -> None:
        try:
            for param, value in lora:
                param.copy_(value)
        except BaseException:
            for (param, _), old in zip(lora, before):
                param.copy_(old)
            raise
        for W, scaling, B, A, transposed in base:  # W0 -= scaling * B @ A, in fp32, rounded once
            delta_buf, w_buf = scratch[W.device]
            delta = delta_buf[:W.numel()].view(B.shape[0], A.shape[1])
            torch.mm(B, A, out=delta).mul_(scaling)
            w = w_buf[:W.numel()].view(W.shape)
            w.copy_(W).sub_(delta.T if transposed else delta)
            W.copy_(w)

    return write


def apply_lora_da(peft_model: nn.Module, factors: Dict[str, LoraFactors], adapter_name: str = "default",
                  subtract_init: bool = False) -> None:
    """Copy ``factors`` (``lora_A`` ``r x d_in``, ``lora_B`` ``d_out x r``) into the adapter's LoRA layers,
    cast to each parameter's device and dtype. Every LoRA layer of the adapter must have factors.

    ``subtract_init=True``: ``W0 -= scaling * lora_B @ lora_A`` in every adapted layer (transposed for
    Conv1D, whose weight is ``d_in x d_out``), computed in fp32 and rounded once to the weight's dtype,
    so that the initial adapted model equals the base model.

    All or nothing: every check, cast and allocation comes before the first write, and the writes hold
    Ctrl-C and SIGTERM (delivered once they are done), so that a failure leaves the model unchanged.
    """
    write = _planned_writes(peft_model, factors, adapter_name, subtract_init)
    with signals_held():
        write()


# --------------------------------------------------------------------------------------------------
# A door that fails leaves the model as found


def _contents(value):
    return dict(value) if isinstance(value, dict) else set(value)


class _ModelState:
    """What a door may change in a model, kept so that a failure can put it back exactly: every module's
    attributes (children, parameters, buffers, hooks, ``training``; PEFT swaps children for LoRA layers,
    adds a ``peft_config`` and, for gradient checkpointing, an input hook), every parameter's
    ``requires_grad``, ``.grad`` and data (dtype, device; PEFT freezes the base), and the attributes of
    the model's config (PEFT sets ``pretraining_tp``). References only: no weight is copied."""

    def __init__(self, model: nn.Module):
        self.modules = [(m, dict(vars(m)), {k: _contents(v) for k, v in vars(m).items() if isinstance(v, (dict, set))})
                        for m in model.modules()]
        self.params = [(p, p.requires_grad, p.grad, p.data) for p in model.parameters()]
        config = getattr(model, "config", None)
        self.config = (config, dict(vars(config))) if hasattr(config, "__dict__") else None

    def restore(self) -> None:
        for m, attrs, contents in self.modules:
            for k in set(vars(m)) - set(attrs):
                del vars(m)[k]
            vars(m).update(attrs)
            for k, items in contents.items():  # in place: hook handles and PEFT hold these containers
                attrs[k].clear()
                attrs[k].update(items)
        for p, flag, grad, data in self.params:
            if (p.data_ptr(), p.dtype, p.device) != (data.data_ptr(), data.dtype, data.device):
                p.data = data
            p.grad = grad
            p.requires_grad_(flag)
        if self.config is not None:
            config, attrs = self.config
            for k in set(vars(config)) - set(attrs):
                del vars(config)[k]
            vars(config).update(attrs)


def _all_or_nothing(model: nn.Module, compute: Callable[[], object], apply: Callable[[object], object]):
    """``apply(compute())``, with ``model`` left exactly as found if either raises (:class:`_ModelState`):
    the pass, the solve, ``get_peft_model``, the writes, Ctrl-C. ``apply`` holds Ctrl-C and SIGTERM: one
    arriving during it is delivered once the model is complete (``subtract_init``'s rewritten base weights
    could not be put back)."""
    state = _ModelState(model)
    try:
        got = compute()
    except BaseException:
        state.restore()
        raise
    with signals_held():
        try:
            return apply(got)
        except BaseException:
            state.restore()
            raise


def initialize_lora_da(model: nn.Module, examples: Iterable, lora_config, lora_da_config: Optional[LoraDAConfig] = None,
                       subtract_init: bool = False, progress: bool = True,
                       stats: Optional[FisherStatistics] = None, loss_fn: Optional[LossFn] = None):
    """Wrap ``model`` with PEFT (as ``peft.get_peft_model`` does) and initialise the ``"default"`` adapter
    with LoRA-DA factors: :func:`get_lora_da_state_dict`, then ``get_peft_model``, then
    :func:`apply_lora_da`. Returns the ``peft.PeftModel``, ready for ``transformers.Trainer``. A call that
    fails or is interrupted leaves ``model`` exactly as found (Ctrl-C during the final writes, a moment,
    lets them finish: the model is then complete); a compiled model is refused (initialise first, then
    ``torch.compile(peft_model)``, PEFT's order).

    Args:
        model: a transformers model (``nn.Linear`` or ``Conv1D`` targets); it is wrapped in place.
        examples: calibration examples, as :func:`collect_statistics` takes them (dicts with
            ``input_ids`` and optionally ``attention_mask``/``labels``; see also
            :func:`examples_from_texts` and :func:`examples_from_pairs`). Unused when ``stats`` is given.
        lora_config: ``peft.LoraConfig``; its ``r`` is the rank (``rank_pattern`` gives modules their own)
            and its ``target_modules`` (with ``exclude_modules``, ``layers_to_transform``) select the
            modules. PEFT's scaling
            ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``) applies to the factors.
        lora_da_config: hyper-parameters; ``population_size`` is required when ``beta > 0``. Its
            ``rank`` must equal ``lora_config.r`` (:class:`ConfigError` otherwise).
        subtract_init: if True, ``W0 -= s * lora_B @ lora_A`` in every adapted layer so that the initial
            model equals the base model (as PiSSA/LoRA-GA do). Off by default: the paper starts from
            ``W0 + s * lora_B @ lora_A``.
        progress: tqdm progress bars for the statistics pass and the solve.
        stats: precomputed :class:`FisherStatistics` (e.g. ``FisherStatistics.load(path)``) covering
            the target modules; skips the data pass.
        loss_fn: ``(model, batch) -> per-example losses [B]`` replacing the causal-LM loss (a
            classification head, a custom objective); see :func:`lora_da_fast.run_lora_da`.

    Saving. Without ``subtract_init``, ``peft_model.save_pretrained(d)`` is a plain LoRA adapter of the
    unmodified base model: ``PeftModel.from_pretrained(base, d)`` reproduces the model, before or after
    training. With ``subtract_init=True`` the base weights in memory were changed, so an adapter saved
    alone does not apply to the stock base. Save the initial adapter before training and let PEFT
    convert the trained one into a plain LoRA (rank ``2r``) of the *unmodified* base::

        init_dir = os.path.join(output_dir, "lora_da_init")
        peft_model.save_pretrained(init_dir)          # before training
        trainer.train()
        peft_model.save_pretrained(os.path.join(output_dir, "final"),
                                   path_initial_model_for_weight_conversion=init_dir)
        # later: PeftModel.from_pretrained(original_base_model, os.path.join(output_dir, "final"))

    (PEFT does not support that conversion with ``use_rslora=True`` combined with ``alpha_pattern``.)
    """
    check_lora_config(lora_config)
    check_not_wrapped(model)  # wrapping it again would reset the adapter of the PeftModel sharing its modules

    def compute():
        factors = get_lora_da_state_dict(model, examples, lora_da_config, lora_config=lora_config, stats=stats,
                                         loss_fn=loss_fn, progress=progress)
        return factors, get_peft_model(model, lora_config)

    def apply(got):
        factors, peft_model = got
        apply_lora_da(peft_model, factors, "default", subtract_init=subtract_init)
        return peft_model

    return _all_or_nothing(model, compute, apply)


# --------------------------------------------------------------------------------------------------
# Compute, then apply (the shape of PEFT's own data-driven initialisers, e.g. EVA's
# get_eva_state_dict / initialize_lora_eva_weights)


def _adapter_plan(model: nn.Module, lora_config, adapter_name: str):
    """``(root, lora_config, {name: (name of the module holding W0 in root, rank)})`` for a ``PeftModel``
    (its LoRA layers of ``adapter_name``) or a plain model and the ``LoraConfig`` it will be wrapped with
    (the modules PEFT will wrap, ranks from ``rank_pattern`` as PEFT resolves them)."""
    check_not_compiled(model)  # before its names (`_orig_mod.` ...) are matched
    if isinstance(model, PeftModel):
        if lora_config is not None:
            raise ConfigError("lora_config is read from the PeftModel (peft_config[adapter_name]): leave it None")
        if adapter_name not in model.peft_config:
            raise ConfigError(f"the PeftModel has no adapter {adapter_name!r} (it has: "
                              f"{', '.join(map(repr, model.peft_config))})")
        lora_config = model.peft_config[adapter_name]
        if not isinstance(lora_config, LoraConfig):
            raise ConfigError(f"adapter {adapter_name!r} is a {type(lora_config).__name__}, not a LoRA adapter")
        check_lora_config(lora_config)
        root = model.base_model.model
        layers = lora_layers(model, adapter_name)
        if not layers:
            raise TargetError(f"the PeftModel has no LoRA layer for adapter {adapter_name!r}")
        name_of = {id(m): n for n, m in root.named_modules()}
        plan = {n: (name_of[id(layer.get_base_layer())], int(layer.r[adapter_name])) for n, layer in layers.items()}
        return root, lora_config, plan
    if lora_config is None:
        raise ConfigError("give lora_config (the LoraConfig you will pass to get_peft_model), or pass the PeftModel")
    names = lora_target_names(model, lora_config)  # checks the LoraConfig
    pattern = getattr(lora_config, "rank_pattern", None) or {}
    plan = {n: (n, int(pattern.get(get_pattern_key(pattern.keys(), n), lora_config.r))) for n in names}
    return model, lora_config, plan


def _renamed(stats: FisherStatistics, rename: Dict[str, str]) -> FisherStatistics:
    """``stats`` with its modules and input groups renamed (a group led by a module outside ``rename``,
    e.g. of a subset of the targets, keeps its name)."""
    def new(name: str) -> str:
        return rename.get(name, name)

    modules = {new(n): ModuleStatistics(new(st.group), st.G, st.y, st.seq_sums) for n, st in stats.modules.items()}
    return dataclasses.replace(stats, modules=modules, Z={new(g): z for g, z in stats.Z.items()})


def get_lora_da_state_dict(model: nn.Module, examples: Optional[Iterable] = None,
                           lora_da_config: Optional[LoraDAConfig] = None, *, lora_config=None,
                           adapter_name: str = "default", loss_fn: Optional[LossFn] = None,
                           stats: Optional[FisherStatistics] = None, num_examples: Optional[int] = None,
                           progress: bool = True) -> LoraDAResult:
    """Compute the LoRA-DA factors of an adapter without applying them: ``{module name: LoraFactors}``
    (with ``.reports``), for :func:`initialize_lora_da_weights` (``lora_da_state_dict=``) or to save
    (``torch.save``) and apply later. The counterpart of PEFT's ``get_eva_state_dict``.

    Args:
        model: a ``peft.PeftModel`` made with ``get_peft_model`` (its adapter ``adapter_name`` gives the
            modules and each module's rank: ``target_modules``, ``exclude_modules``,
            ``layers_to_transform``, ``rank_pattern``; the adapter is disabled during the statistics
            pass, so they describe the base model whatever the LoRA weights hold), or a plain model
            together with ``lora_config``, the ``peft.LoraConfig`` it will be wrapped with.
        examples: calibration examples (as :func:`lora_da_fast.collect_statistics` takes them: dicts,
            padded batches, a ``DataLoader``, a ``datasets`` object). Unused when ``stats`` is given.
        lora_da_config: hyper-parameters; ``rank`` must equal ``LoraConfig.r`` (modules of
            ``rank_pattern`` get their own rank), ``population_size`` is required when ``beta > 0``.
        loss_fn: ``(model, batch) -> per-example losses [B]`` instead of the causal-LM loss (any head,
            any objective); it receives the base model (``peft_model.base_model.model`` for a
            ``PeftModel``).
        stats: precomputed :class:`FisherStatistics` named as the base model's modules (from
            ``collect_statistics`` on the base model, or the CLI's ``--stats-cache`` file).
        num_examples: use only the first ``num_examples`` examples (e.g. of a training ``DataLoader``).

    ``alpha_pattern``, ``lora_alpha`` and ``use_rslora`` only scale the adapter's output; the factors do
    not depend on them. One engine run (:func:`lora_da_fast.run_lora_da`, which checks every setting before
    any forward): the statistics pass, then the solve, modules of each rank together. ``.info`` holds the
    run's plan and timings.
    """
    root, lora_config, plan = _adapter_plan(model, lora_config, adapter_name)
    names = list(plan)
    cfg = resolve_lora_da_config(lora_config, lora_da_config, names)
    # the engine runs on the base model, whose modules holding W0 are named `source` (for a PeftModel,
    # "<name>.base_layer"): statistics and factors are renamed between the two
    to_source = {n: s for n, (s, _) in plan.items()}
    to_name = {s: n for n, s in to_source.items()}
    run_cfg = dataclasses.replace(cfg, target_modules=list(to_source.values()))
    ranks = {s: r for s, r in plan.values()}
    if stats is not None:
        stats = _renamed(select_statistics(stats, names, None, cfg.token_mask), to_source)
    elif examples is None:
        raise ConfigError("give calibration examples (or precomputed stats=)")
    off = model.disable_adapter() if isinstance(model, PeftModel) and stats is None else contextlib.nullcontext()
    with off:
        got = run_lora_da(root, examples, run_cfg, progress=progress, stats=stats, ranks=ranks,
                          num_examples=num_examples, loss_fn=loss_fn)
    result = LoraDAResult({to_name[s]: f for s, f in got.items()}, {to_name[s]: r for s, r in got.reports.items()})
    result.info = got.info
    return result


def _as_factors(state: Dict) -> Dict[str, LoraFactors]:
    if not hasattr(state, "items"):
        raise ConfigError(f"lora_da_state_dict must be a dict of module name -> factors, got {type(state).__name__}")
    out = {}
    for name, f in state.items():
        if isinstance(f, dict) and {"lora_A", "lora_B"} <= set(f):
            f = (f["lora_A"], f["lora_B"])
        if not (isinstance(f, tuple) and len(f) == 2 and all(isinstance(t, torch.Tensor) for t in f)):
            raise ConfigError(f"lora_da_state_dict[{name!r}] must be LoraFactors(lora_A, lora_B), got {type(f).__name__}")
        out[name] = LoraFactors(*f)
    return out


def initialize_lora_da_weights(peft_model: nn.Module, examples: Optional[Iterable] = None,
                               lora_da_config: Optional[LoraDAConfig] = None, *,
                               lora_da_state_dict: Optional[Dict[str, LoraFactors]] = None,
                               adapter_name: str = "default", loss_fn: Optional[LossFn] = None,
                               stats: Optional[FisherStatistics] = None, num_examples: Optional[int] = None,
                               subtract_init: bool = False, progress: bool = True) -> Dict[str, LoraFactors]:
    """Initialise the LoRA weights of adapter ``adapter_name`` of a ``PeftModel`` the user made with
    ``get_peft_model``, in place, with LoRA-DA factors: computed from ``examples`` (or ``stats``) by
    :func:`get_lora_da_state_dict`, or given (``lora_da_state_dict``, e.g. computed earlier on the plain
    model). Returns the factors. The counterpart of PEFT's ``initialize_lora_eva_weights``. A call that
    fails or is interrupted leaves ``peft_model`` exactly as found, LoRA weights included (as
    :func:`initialize_lora_da`).

    ``subtract_init`` as in :func:`initialize_lora_da`. The LoRA parameters are written in place
    (``copy_``), so an optimizer or a ``transformers.Trainer`` built around the model already keeps
    working; call it before ``trainer.train()``, and before the model is sharded (DeepSpeed ZeRO-3,
    FSDP). With ``transformers.Trainer``::

        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        initialize_lora_da_weights(peft_model, calibration_examples,
                                   LoraDAConfig(rank=8, population_size=len(train_dataset)))
        trainer = Trainer(model=peft_model, args=training_args, train_dataset=train_dataset, ...)
        trainer.train()

    The calibration examples may be the trainer's own loader, ``trainer.get_train_dataloader()`` with
    ``num_examples=256`` (its padded batches are split into examples; a classification collator's
    ``labels`` of one class per example need a ``loss_fn``).
    """
    check_not_compiled(peft_model)
    if not isinstance(peft_model, PeftModel):
        raise ConfigError("initialize_lora_da_weights needs a peft.PeftModel (made with get_peft_model); for a plain "
                          "model use initialize_lora_da, which wraps it")
    if lora_da_state_dict is not None and (examples is not None or stats is not None):
        raise ConfigError("give either lora_da_state_dict or examples/stats, not both")

    def compute():
        if lora_da_state_dict is not None:
            return _as_factors(lora_da_state_dict)
        return get_lora_da_state_dict(peft_model, examples, lora_da_config, adapter_name=adapter_name,
                                      loss_fn=loss_fn, stats=stats, num_examples=num_examples, progress=progress)

    def apply(factors):
        apply_lora_da(peft_model, factors, adapter_name, subtract_init=subtract_init)
        return factors

    return _all_or_nothing(peft_model, compute, apply)
