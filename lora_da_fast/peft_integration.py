"""LoRA-DA for Hugging Face PEFT: a ``peft.PeftModel`` whose ``lora_A``/``lora_B`` hold the LoRA-DA
factors (docs/algorithm.md, "Solve": the factors in PEFT's layout).

The rank and the adapted modules come from the user's ``peft.LoraConfig``. The modules are resolved
with PEFT's own matching rules (:func:`lora_da_fast.targets.lora_target_names`) and their exact names
are given to the engine, so statistics, factors and LoRA layers refer to the same modules; after
wrapping, the set of LoRA layers PEFT created is checked against it.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import LoraDAConfig
from .engine import run_lora_da
from .errors import ConfigError, TargetError
from .fisher import FisherStatistics
from .results import LoraFactors
from .statistics.statistics_pass import LossFn
from .targets import check_lora_config, check_rank_fits, lora_target_names

_DEFAULT_TARGETS = LoraDAConfig.__dataclass_fields__["target_modules"].default


def resolve_lora_da_config(lora_config, lora_da_config: Optional[LoraDAConfig], names: List[str]) -> LoraDAConfig:
    """The :class:`LoraDAConfig` to run: rank from ``lora_config.r``, targets = ``names``.

    A ``lora_da_config.rank`` different from ``lora_config.r`` is a :class:`ConfigError` (the rank is
    the LoraConfig's), and so is a ``lora_da_config.target_modules`` other than its default.
    ``population_size`` is required when ``beta > 0`` and checked here, before any data pass.
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
    if lora_da_config.beta > 0 and lora_da_config.population_size is None:
        raise ConfigError("LoraDAConfig.population_size is required when beta > 0: give the number of "
                          "examples of the fine-tuning set (it scales the variance term), e.g. "
                          "LoraDAConfig(population_size=len(train_dataset))")
    return dataclasses.replace(lora_da_config, target_modules=list(names))


def lora_layers(peft_model: nn.Module, adapter_name: str = "default") -> Dict[str, nn.Module]:
    """``{name: LoraLayer}`` of ``peft_model`` holding ``adapter_name``, named as in the base model."""
    root = peft_model.base_model.model if hasattr(peft_model, "base_model") else peft_model
    return {n: m for n, m in root.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {})}


@torch.no_grad()
def apply_lora_da(peft_model: nn.Module, factors: Dict[str, LoraFactors], adapter_name: str = "default",
                  subtract_init: bool = False) -> None:
    """Copy ``factors`` (``lora_A`` ``r x d_in``, ``lora_B`` ``d_out x r``) into the adapter's LoRA layers,
    cast to each parameter's device and dtype. Every LoRA layer of the adapter must have factors.

    ``subtract_init=True``: ``W0 -= scaling * lora_B @ lora_A`` in every adapted layer (transposed for
    Conv1D, whose weight is ``d_in x d_out``), computed in fp32 and rounded once to the weight's dtype,
    so that the initial adapted model equals the base model.
    """
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
        A.copy_(f.lora_A.to(device=A.device, dtype=A.dtype))
        B.copy_(f.lora_B.to(device=B.device, dtype=B.dtype))
        if subtract_init:
            W = layer.get_base_layer().weight
            if not W.dtype.is_floating_point:
                raise ConfigError(f"subtract_init needs a floating-point base weight; {name} is {W.dtype}")
            delta = layer.scaling[adapter_name] * (f.lora_B.to(W.device, torch.float32)
                                                  @ f.lora_A.to(W.device, torch.float32))
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            W.copy_((W.to(torch.float32) - delta).to(W.dtype))


def initialize_lora_da(model: nn.Module, examples: Iterable, lora_config, lora_da_config: Optional[LoraDAConfig] = None,
                       subtract_init: bool = False, progress: bool = True,
                       stats: Optional[FisherStatistics] = None, loss_fn: Optional[LossFn] = None):
    """Wrap ``model`` with PEFT (as ``peft.get_peft_model`` does) and initialise the ``"default"`` adapter
    with LoRA-DA factors. Returns the ``peft.PeftModel``, ready for ``transformers.Trainer``.

    Args:
        model: a transformers model (``nn.Linear`` or ``Conv1D`` targets); it is wrapped in place.
        examples: calibration examples, as :func:`collect_statistics` takes them (dicts with
            ``input_ids`` and optionally ``attention_mask``/``labels``; see also
            :func:`examples_from_texts` and :func:`examples_from_pairs`). Unused when ``stats`` is given.
        lora_config: ``peft.LoraConfig``; its ``r`` is the rank and its ``target_modules`` (with
            ``exclude_modules``, ``layers_to_transform``) select the modules. PEFT's scaling
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
    names = lora_target_names(model, lora_config)
    cfg = resolve_lora_da_config(lora_config, lora_da_config, names)
    check_rank_fits(model, names, cfg.rank)
    result = run_lora_da(model, examples, cfg, progress=progress, stats=stats, loss_fn=loss_fn)
    peft_model = get_peft_model(model, lora_config)
    apply_lora_da(peft_model, result, "default", subtract_init=subtract_init)
    return peft_model
