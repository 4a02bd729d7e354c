"""The initialisations compared by the quality study: PEFT's default, PiSSA, LoRA-GA and LoRA-DA (with its
variants), and the diagnostics of an initialised adapter."""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from typing import Dict, Optional

import torch

from lora_da_fast import LoraDAConfig, LoraFactors, apply_lora_da, collect_statistics, initialize_lora_da
from lora_da_fast.peft_integration import resolve_lora_da_config
from lora_da_fast.targets import lora_target_names

from .model import loss_sum
from .tasks import Task


METHOD_ALIASES = {
    "default": "default",
    "pissa": "pissa",
    "lora-ga": "lora-ga",
    "lora-da": "lora-da(beta=0.03)",
    "lora-da-b0": "lora-da(beta=0)",
}


FULL_METHODS = ["default", "pissa", "lora-ga", "lora-da", "lora-da-b0"]
# Why LoRA-DA does (not) win: the same subspace started at the base model (subtract_init), and with factors
# as large as PEFT's default A (gamma 4: rows of lora_A have norm 1/2) so that Adam moves s*B*A as fast.
ABLATION = "lora-da(beta=0.03,sub=1);lora-da(beta=0.03,gamma=4,sub=1)"


def parse_method(spec: str):
    full = METHOD_ALIASES.get(spec, spec)
    m = re.fullmatch(r"([a-z\-]+)(?:\((.*)\))?", full)
    if not m or m.group(1) not in ("default", "pissa", "lora-ga", "lora-da"):
        raise SystemExit(f"unknown method {spec!r}: use {', '.join(METHOD_ALIASES)} or "
                         "lora-da(beta=...,gamma=...,sub=0|1)")
    opts = {}
    for kv in filter(None, (m.group(2) or "").split(",")):
        k, v = kv.split("=")
        opts[k.strip()] = float(v)
    return m.group(1), opts


def lora_config(args, **kw):
    """The LoRA of every method. ``all-linear`` is resolved to explicit module names first (PEFT's
    ``preprocess_loraga`` does not expand it), so every method adapts exactly the same modules."""
    from peft import LoraConfig
    targets = args.target_list
    return LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora, lora_dropout=0.0,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM", **kw)


def lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


REF_GAMMA = 1024.0


class StatsCache:
    """One LoRA-DA statistics pass per task, shared by the LoRA-DA variants (they differ in the solve), and
    the factors solved for each beta (at gamma = 1024; other gammas rescale them)."""

    def __init__(self):
        self.stats, self.seconds = None, 0.0
        self.factors: Dict[float, tuple] = {}


def _scaled(factors: Dict[str, tuple], scale: float):
    return {n: LoraFactors(a * scale, b * scale) for n, (a, b) in factors.items()}


def init_method(method: str, base, task: Task, args, seed: int, tok, stats_cache: StatsCache):
    """Returns (peft_model, info) where info holds the init time and notes."""
    from peft import get_peft_model
    name, opts = parse_method(method)
    model = copy.deepcopy(base)
    calib = task.train[:args.calib]
    info: Dict[str, object] = {}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if name == "default":
        pm = get_peft_model(model, lora_config(args, init_lora_weights=True))
    elif name == "pissa":
        pm = get_peft_model(model, lora_config(args, init_lora_weights="pissa_niter_4"))
    elif name == "lora-ga":
        from peft import LoraGAConfig, preprocess_loraga
        cfg = lora_config(args, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

        def train_step():
            for i in range(0, len(calib), args.batch_size):
                s, c = loss_sum(model, calib[i:i + args.batch_size], tok.pad_token_id)
                (s / max(c, 1)).backward()

        preprocess_loraga(model, cfg, train_step)
        pm = get_peft_model(model, cfg)
        info["calibration_examples"] = len(calib)
    else:  # lora-da
        beta, gamma, sub = opts.get("beta", 0.03), opts.get("gamma", REF_GAMMA), bool(opts.get("sub", 0))
        dacfg = LoraDAConfig(rank=args.rank, beta=beta, gamma=REF_GAMMA, population_size=len(task.train),
                             batch_size=args.batch_size)
        cfg = lora_config(args)
        examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in calib]
        if stats_cache.stats is None:  # one statistics pass per task, reused by every variant (only the solve differs)
            full = resolve_lora_da_config(cfg, dataclasses.replace(dacfg, population_size=1),
                                          lora_target_names(model, cfg))
            ts = time.perf_counter()
            stats_cache.stats = collect_statistics(model, examples, full, progress=False)
            stats_cache.seconds = time.perf_counter() - ts
        scale = math.sqrt(REF_GAMMA / gamma)
        t0 = time.perf_counter()
        if beta not in stats_cache.factors:  # solve once per beta, with the library's own entry point
            pm = initialize_lora_da(model, examples, cfg, dacfg, subtract_init=False, progress=False,
                                    stats=stats_cache.stats)
            solve_s = time.perf_counter() - t0
            stats_cache.factors[beta] = ({n: (l.lora_A["default"].weight.detach().clone(),
                                              l.lora_B["default"].weight.detach().clone())
                                          for n, l in lora_layers(pm).items()}, solve_s)
            if scale != 1.0 or sub:
                apply_lora_da(pm, _scaled(stats_cache.factors[beta][0], scale), "default", subtract_init=sub)
        else:  # another gamma / subtract_init of a solved beta: gamma only rescales the factors
            pm = get_peft_model(model, cfg)
            apply_lora_da(pm, _scaled(stats_cache.factors[beta][0], scale), "default", subtract_init=sub)
        apply_s = time.perf_counter() - t0
        solve_s = stats_cache.factors[beta][1]
        info.update(statistics_seconds=stats_cache.seconds, solve_seconds=solve_s,
                    calibration_examples=len(calib), population_size=len(task.train), beta=beta, gamma=gamma,
                    subtract_init=sub)
        # the init time of a stand-alone run: statistics pass + solve (+ applying the factors)
        t0 = time.perf_counter() - stats_cache.seconds - max(solve_s, apply_s)
    info["init_seconds"] = time.perf_counter() - t0
    return pm, info


@torch.no_grad()
def adapter_delta_norms(pm, ref: Optional[Dict[str, torch.Tensor]] = None):
    """sqrt(sum_m ||s B A||_F^2) over the adapted modules; with ``ref`` (a previous {name: sBA}) the norm
    of the change instead. Also returns the current {name: sBA} when asked (ref == {})."""
    tot, out = 0.0, {}
    for n, layer in lora_layers(pm).items():
        d = layer.scaling["default"] * (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float())
        if ref is not None and n in ref:
            tot += float((d - ref[n]).pow(2).sum())
        else:
            tot += float(d.pow(2).sum())
        out[n] = d
    return math.sqrt(tot), out


@torch.no_grad()
def init_diagnostics(pm, base) -> dict:
    layers = lora_layers(pm)
    base_w = {n: m.weight for n, m in base.named_modules() if n in layers}
    a_norm = [float(l.lora_A["default"].weight.norm(dim=1).mean()) for l in layers.values()]
    b_norm = [float(l.lora_B["default"].weight.norm(dim=0).mean()) for l in layers.values()]
    delta, _ = adapter_delta_norms(pm)
    w0 = math.sqrt(sum(float(w.float().pow(2).sum()) for w in base_w.values()))
    # distance of the initial adapted model's weights W_res + s B A from W0 (0 for PiSSA/LoRA-GA/sub=1)
    off = 0.0
    for n, l in layers.items():
        eff = l.get_base_layer().weight.float() + l.scaling["default"] * (
            l.lora_B["default"].weight.float() @ l.lora_A["default"].weight.float())
        off += float((eff - base_w[n].float()).pow(2).sum())
    return {"mean_row_norm_A": sum(a_norm) / len(a_norm), "mean_col_norm_B": sum(b_norm) / len(b_norm),
            "adapter_norm": delta, "base_norm": w0, "initial_offset_norm": math.sqrt(off),
            "modules": len(layers)}


def snapshot(pm) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad or "base_layer" in n}


@torch.no_grad()
def restore(pm, snap: Dict[str, torch.Tensor]) -> None:
    params = dict(pm.named_parameters())
    for n, t in snap.items():
        params[n].copy_(t)

