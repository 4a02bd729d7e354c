"""A drop-in for the estimator of the authors' release (``lora_da.py`` of github.com/zqy0126/LoRA-DA):
the same functions, arguments, defaults and return format, with this library's statistics pass and
exact solve inside. Switching is a one-line change of the import::

    # from lora_da import estimate_lora_da_initializations
    from lora_da_fast.compat import estimate_lora_da_initializations

What is the same (docs/algorithm.md, section 6, lists every difference from the authors' release):

- targets: every ``nn.Linear`` whose last name component is in ``target_modules``, in sorted name order;
- the result: ``{"<module name>.weight": {"lora_A": [r, d_in], "lora_B": [d_out, r]}}``, float32 tensors
  on the CPU, already divided by ``sqrt(gamma)``; ``..._for_betas`` returns ``{beta: result}`` for the
  distinct betas, in the order given;
- ``named_grads`` (``{"<module>.weight": mean gradient}``) is the gradient ``G`` of the objective when
  given (a missing key, a wrong shape, a tensor that is not floating point or not finite is refused
  before the statistics pass); when ``None``, ``G`` comes from the same pass as the Fisher factors (the
  mean per-example gradient over ``dataset``);
- every formula of section 3 (damping, output damping, sequence low-rank output Fisher, the variance
  coefficient ``sum(u) / (N sigma^2)``, canonical signs), and ``normalize_delta``,
  ``delta_normalization_power``/``_reference`` and ``balance_factors``, implemented exactly.

What is faster or more exact (and so, on purpose, not bit-identical to the authors' output):

- one statistics pass at any batch size, with per-example semantics (the authors' result at
  ``batch_size=1``); ``batch_size`` and ``fisher_layers_per_pass`` change nothing but speed and
  memory here (keyword ``pass_batch_size``, default ``max(batch_size, 8)``, and ``layers_per_pass``,
  default one pass, set them);
- the eigenvectors and ``sigma = ||D||_2`` are exact (converged to the solver contract), not the
  result of ``lobpcg_niter`` LOBPCG and ``delta_svd_niter`` power iterations: those two arguments are
  accepted and validated, and a value other than the authors' default is warned about, since it has
  no effect; ``deterministic_seed`` seeds the iterative solver's start vectors (the result does not
  depend on it beyond the solver tolerance);
- all betas of ``..._for_betas`` from the one pass.

Refused with a :class:`~lora_da_fast.errors.ConfigError` (never silently ignored):
``normalize_variance_guidance=True`` with a non-zero beta, a string ``target_modules`` (the authors' code
tests substrings of it), a ``population_size`` missing when a beta is non-zero, and any value outside
the authors' choices. Not reproduced: the authors' ``model.train()`` during the passes (dropout is off
here), and their reliance on Llama module names (``model.layers.<i>.``; any model works here).

Keyword-only extras: ``loss_fn`` (a loss/forward callback, as :func:`lora_da_fast.run_lora_da` takes),
``progress``, ``pass_batch_size``, ``layers_per_pass``, ``solver``, the library's own ``keep_tokens`` and
``sensitivity`` (as :class:`~lora_da_fast.LoraDAConfig`), and ``reports`` (a dict that receives the
per-module reports).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .config import LoraDAConfig, is_integer, is_real
from .engine import execute, prepare_run, solve_lora_da
from .errors import ConfigError, DataError, NumericalError, TargetError
from .fisher import FisherStatistics, ModuleStatistics
from .results import LoraDAResult, ModuleReport
from .statistics.statistics_pass import LossFn

AUTHORS_LOBPCG_NITER = 10  # the authors' defaults of the two iteration counts we do not need
AUTHORS_DELTA_SVD_NITER = 16

Initializations = Dict[str, Dict[str, torch.Tensor]]


def _positive_int(name: str, value) -> int:
    if not is_integer(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return value


def _finite(name: str, value) -> float:
    if not is_real(value) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def authors_target_names(model: nn.Module, target_modules: Sequence[str]) -> List[str]:
    """The authors' targets: every ``nn.Linear`` whose last name component is in ``target_modules``,
    sorted by name. :class:`TargetError` if there is none."""
    if isinstance(target_modules, str):
        raise ConfigError(f"target_modules must be a list of module names such as [{target_modules!r}], got the "
                          f"string {target_modules!r} (the authors' code would test substrings of it)")
    try:
        wanted = set(target_modules)
    except TypeError:
        raise ConfigError(f"target_modules must be a list of module names, got {target_modules!r}") from None
    names = sorted(n for n, m in model.named_modules()
                   if n and isinstance(m, nn.Linear) and n.split(".")[-1] in wanted)
    if not names:
        have = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and isinstance(m, nn.Linear)})
        raise TargetError(f"target_modules {sorted(map(str, wanted))} match no nn.Linear module; the linear "
                          f"modules' last names are: {', '.join(have) or '(none)'}")
    return names


def _checked_gradients(named_grads, shapes: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    """``{module name: gradient}`` from ``named_grads`` (``{"<module>.weight": G}``), checked against the
    targets' weight shapes ``{name: (d_out, d_in)}`` before any forward: a missing key, a wrong shape, a
    tensor that is not floating point or one holding NaN/inf would otherwise surface after the whole
    statistics pass. The tensors are kept as given (converted after the pass, not held twice during it)."""
    if not hasattr(named_grads, "keys") or not hasattr(named_grads, "__getitem__"):
        raise ConfigError(f"named_grads must be a dict of parameter name -> gradient or None, got "
                          f"{type(named_grads).__name__}")
    grads = {}
    for name, shape in shapes.items():
        key = name + ".weight"
        if key not in named_grads:
            raise DataError(f"named_grads has no entry {key!r} (it needs one per target module; keys are "
                            "parameter names, as model.named_parameters() gives them)")
        g = named_grads[key]
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            what = f"dtype {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
            raise DataError(f"named_grads[{key!r}] must be a floating-point tensor, got {what}")
        if tuple(g.shape) != tuple(shape):
            raise DataError(f"named_grads[{key!r}] has shape {tuple(g.shape)}, the module's weight is {tuple(shape)}")
        if g.device.type == "meta":
            raise DataError(f"named_grads[{key!r}] is on the meta device: it holds no values")
        if not bool(torch.isfinite(g).all()):
            raise NumericalError(f"named_grads[{key!r}] holds NaN or inf")
        grads[name] = g
    return grads


def _with_gradients(stats: FisherStatistics, grads: Dict[str, torch.Tensor]) -> FisherStatistics:
    """``stats`` with each module's ``G`` replaced by its checked gradient (:func:`_checked_gradients`)."""
    modules = {name: ModuleStatistics(st.group, grads[name].detach().to(device=st.G.device, dtype=torch.float32),
                                      st.y, st.seq_sums)
               for name, st in stats.modules.items()}
    return dataclasses.replace(stats, modules=modules)


def _balance(A: torch.Tensor, B: torch.Tensor):
    """``(A', B')`` with ``B' A' = B A`` and balanced norms: ``B = U S V^T`` (thin SVD, each column of ``U``
    with its largest-magnitude entry positive), ``B' = U S^(1/2)``, ``A' = S^(1/2) V^T A``. float64."""
    U, S, Vh = torch.linalg.svd(B, full_matrices=False)
    idx = U.abs().argmax(dim=0)
    sign = torch.sign(U[idx, torch.arange(U.shape[1])])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    U, Vh = U * sign, Vh * sign[:, None]
    root = S.clamp(min=0).sqrt()
    return (root[:, None] * Vh) @ A, U * root


def _authors_format(result: LoraDAResult, names: List[str], gamma: float, normalize_delta: bool, power: float,
                    reference: float, balance: bool) -> Initializations:
    """``{"<name>.weight": {"lora_A", "lora_B"}}`` (in the order of ``names``) from our factors (``lora_B = D^T A0 / (sigma sqrt(gamma))``).

    The authors divide ``D`` by ``s = sigma^p * reference^(1 - p)`` (``p = delta_normalization_power``),
    or by nothing without ``normalize_delta``. Their guidance matrix is ours times ``sigma^2 / s^2``, a
    positive factor that leaves its eigenvectors, so ``A0`` is the same and only ``lora_B`` scales by
    ``sigma / s``."""
    out: Initializations = {}
    root_gamma = math.sqrt(gamma)
    for name in names:
        f = result[name]
        sigma = result.reports[name].sigma
        A, B = f.lora_A.double(), f.lora_B.double()
        s = (sigma ** power) * (reference ** (1.0 - power)) if normalize_delta else 1.0
        if s != sigma:
            B = B * (sigma / s)
        if balance:  # on the unscaled factors, as the authors balance before dividing by sqrt(gamma)
            A, B = _balance(A * root_gamma, B * root_gamma)
            A, B = A / root_gamma, B / root_gamma
        out[name + ".weight"] = {"lora_A": A.float().cpu().contiguous(), "lora_B": B.float().cpu().contiguous()}
    return out


def estimate_lora_da_initializations_for_betas(
    model: nn.Module,
    dataset: Iterable,
    named_grads: Optional[Dict[str, torch.Tensor]],
    target_modules: Sequence[str],
    rank: int,
    population_size: Optional[int],
    variance_betas: Sequence[float],
    batch_size: int = 1,
    bias_alpha: float = 1.0,
    damping: float = 1e-6,
    gamma: float = 32,
    lobpcg_niter: int = AUTHORS_LOBPCG_NITER,
    fisher_layers_per_pass: int = 1,
    normalize_delta: bool = True,
    delta_svd_niter: int = AUTHORS_DELTA_SVD_NITER,
    delta_normalization_power: float = 1.0,
    delta_normalization_reference: float = 1.0,
    fisher_token_mask: str = "attention",
    deterministic_seed: int = 0,
    balance_factors: bool = False,
    output_damping_ratio: Optional[float] = None,
    normalize_variance_guidance: bool = False,
    output_fisher_mode: str = "diagonal",
    *,
    loss_fn: Optional[LossFn] = None,
    progress: bool = True,
    pass_batch_size: Optional[int] = None,
    layers_per_pass: Union[int, str, None] = None,
    solver: str = "auto",
    keep_tokens: str = "auto",
    sensitivity: str = "auto",
    reports: Optional[Dict[float, Dict[str, ModuleReport]]] = None,
) -> Dict[float, Initializations]:
    """LoRA-DA initialisations for several ``variance_betas`` from one statistics pass:
    ``{beta: {"<module>.weight": {"lora_A": [r, d_in], "lora_B": [d_out, r]}}}`` (CPU, float32, divided
    by ``sqrt(gamma)``). Same arguments as the authors' function (the module's docstring says what each
    does here); ``dataset``: dicts of ``input_ids`` and optionally ``attention_mask``/``labels``, 1-D or
    padded 2-D, a ``DataLoader``, a map-style or Hugging Face dataset. The model's parameters, flags,
    modes and hooks are left as they were.

    Keyword-only: ``loss_fn(model, batch) -> per-example losses [B]`` instead of the causal-LM loss;
    ``progress`` (bars); ``pass_batch_size`` (default ``max(batch_size, 8)``); ``layers_per_pass``
    (stream the model through several passes to bound memory, as :class:`LoraDAConfig`);
    ``solver`` (``"auto"``, ``"batched"`` or ``"reference"``, dense float64); ``keep_tokens`` and
    ``sensitivity`` (as :class:`LoraDAConfig`: the exact path through the tokens; the one-ulp sensitivity,
    estimated by default, measured with ``"always"``); ``reports``: a dict that receives ``{beta: {"<module>.weight": ModuleReport}}`` (damping,
    eigenvalues, eigengap, sensitivity, notes: what this library's own doors report).
    """
    if reports is not None and not isinstance(reports, dict):
        raise ConfigError(f"reports must be a dict to fill, got {type(reports).__name__}")
    if isinstance(variance_betas, (str, bytes)) or not hasattr(variance_betas, "__iter__"):
        raise ConfigError(f"variance_betas must be a list of numbers, got {variance_betas!r}")
    betas = list(dict.fromkeys(variance_betas))
    if not betas:
        raise ConfigError("variance_betas is empty: give at least one beta")
    for b in betas:
        if not is_real(b) or not math.isfinite(b) or b < 0:
            raise ConfigError(f"every variance beta must be a finite number >= 0, got {b!r}")
    _positive_int("batch_size", batch_size)
    _positive_int("fisher_layers_per_pass", fisher_layers_per_pass)
    for name, value, default in (("lobpcg_niter", lobpcg_niter, AUTHORS_LOBPCG_NITER),
                                 ("delta_svd_niter", delta_svd_niter, AUTHORS_DELTA_SVD_NITER)):
        if _positive_int(name, value) != default:
            warnings.warn(f"{name}={value} has no effect in lora_da_fast: the eigenvectors and sigma are computed "
                          "exactly (to the solver's 1e-4 contract), not by a fixed number of iterations",
                          UserWarning, stacklevel=2)
    _flag("normalize_delta", normalize_delta)
    _flag("balance_factors", balance_factors)
    _flag("normalize_variance_guidance", normalize_variance_guidance)
    power = _finite("delta_normalization_power", delta_normalization_power)
    reference = _finite("delta_normalization_reference", delta_normalization_reference)
    if normalize_delta and power != 1.0 and reference <= 0:
        raise ConfigError(f"delta_normalization_reference must be > 0 when delta_normalization_power != 1, got "
                          f"{delta_normalization_reference!r}")
    if normalize_variance_guidance and any(b != 0 for b in betas):
        raise ConfigError("normalize_variance_guidance=True (rescaling the variance term to the bias term's "
                          "Frobenius norm) is not implemented by lora_da_fast: leave it False")
    if fisher_token_mask not in ("attention", "labels"):
        raise ConfigError(f"fisher_token_mask must be 'attention' or 'labels', got {fisher_token_mask!r}")
    if output_fisher_mode not in ("diagonal", "sequence_lowrank"):
        raise ConfigError(f"output_fisher_mode must be 'diagonal' or 'sequence_lowrank', got {output_fisher_mode!r}")
    if bias_alpha == 0 and any(b == 0 for b in betas):
        raise ConfigError("bias_alpha and a variance beta are both 0: the guidance matrix would be zero")
    if pass_batch_size is None:
        pass_batch_size = max(batch_size, 8)
    names = authors_target_names(model, target_modules)
    _positive_int("rank", rank)
    try:
        cfg = LoraDAConfig(rank=rank, population_size=population_size, beta=max(betas), alpha=bias_alpha,
                           gamma=gamma, damping=damping, output_damping_ratio=output_damping_ratio,
                           token_mask=fisher_token_mask, output_fisher=output_fisher_mode, target_modules=names,
                           batch_size=pass_batch_size, layers_per_pass=layers_per_pass, seed=deterministic_seed,
                           solver=solver, max_damping=max(1.0, damping), keep_tokens=keep_tokens,
                           sensitivity=sensitivity)
    except ConfigError as exc:  # name the authors' arguments
        msg = str(exc)
        for ours, theirs in (("alpha", "bias_alpha"), ("batch_size", "pass_batch_size"),
                             ("seed", "deterministic_seed")):
            if msg.startswith(ours + " "):
                msg = theirs + msg[len(ours):]
        raise ConfigError(msg) from None
    # the engine checks everything (population_size for the largest beta, the rank bound, the model, the
    # examples) before any forward, named_grads is checked against the targets, then the one statistics pass
    run = prepare_run(model, dataset, cfg, loss_fn=loss_fn)
    grads = None if named_grads is None else _checked_gradients(named_grads, {n: m.weight.shape
                                                                              for n, m in run.targets.items()})
    stats = execute(run, solve=False, progress=progress).statistics
    if grads is not None:
        stats = _with_gradients(stats, grads)
    out: Dict[float, Initializations] = {}
    for b in betas:
        result = solve_lora_da(stats, dataclasses.replace(cfg, beta=b), progress=progress)
        out[b] = _authors_format(result, names, gamma, normalize_delta, power, reference, balance_factors)
        if reports is not None:
            reports[b] = {n + ".weight": result.reports[n] for n in names}
    return out


def estimate_lora_da_initializations(
    model: nn.Module,
    dataset: Iterable,
    named_grads: Optional[Dict[str, torch.Tensor]],
    target_modules: Sequence[str],
    rank: int,
    population_size: Optional[int],
    batch_size: int = 1,
    bias_alpha: float = 1.0,
    variance_beta: float = 0.0,
    damping: float = 1e-6,
    gamma: float = 32,
    lobpcg_niter: int = AUTHORS_LOBPCG_NITER,
    fisher_layers_per_pass: int = 1,
    normalize_delta: bool = True,
    delta_svd_niter: int = AUTHORS_DELTA_SVD_NITER,
    delta_normalization_power: float = 1.0,
    delta_normalization_reference: float = 1.0,
    fisher_token_mask: str = "attention",
    deterministic_seed: int = 0,
    balance_factors: bool = False,
    output_damping_ratio: Optional[float] = None,
    normalize_variance_guidance: bool = False,
    output_fisher_mode: str = "diagonal",
    *,
    loss_fn: Optional[LossFn] = None,
    progress: bool = True,
    pass_batch_size: Optional[int] = None,
    layers_per_pass: Union[int, str, None] = None,
    solver: str = "auto",
    keep_tokens: str = "auto",
    sensitivity: str = "auto",
    reports: Optional[Dict[str, ModuleReport]] = None,
) -> Initializations:
    """LoRA-DA initialisations for one ``variance_beta``:
    ``{"<module>.weight": {"lora_A": [r, d_in], "lora_B": [d_out, r]}}`` (CPU, float32, divided by
    ``sqrt(gamma)``), as :func:`estimate_lora_da_initializations_for_betas` with one beta; ``reports``: a
    dict that receives ``{"<module>.weight": ModuleReport}``."""
    if not is_real(variance_beta):
        raise ConfigError(f"variance_beta must be a number, got {variance_beta!r}")
    if reports is not None and not isinstance(reports, dict):
        raise ConfigError(f"reports must be a dict to fill, got {type(reports).__name__}")
    per_beta: Dict[float, Dict[str, ModuleReport]] = {}
    out = estimate_lora_da_initializations_for_betas(
        model, dataset, named_grads, target_modules, rank, population_size, [variance_beta],
        batch_size=batch_size, bias_alpha=bias_alpha, damping=damping, gamma=gamma, lobpcg_niter=lobpcg_niter,
        fisher_layers_per_pass=fisher_layers_per_pass, normalize_delta=normalize_delta,
        delta_svd_niter=delta_svd_niter, delta_normalization_power=delta_normalization_power,
        delta_normalization_reference=delta_normalization_reference, fisher_token_mask=fisher_token_mask,
        deterministic_seed=deterministic_seed, balance_factors=balance_factors,
        output_damping_ratio=output_damping_ratio, normalize_variance_guidance=normalize_variance_guidance,
        output_fisher_mode=output_fisher_mode, loss_fn=loss_fn, progress=progress, pass_batch_size=pass_batch_size,
        layers_per_pass=layers_per_pass, solver=solver, keep_tokens=keep_tokens, sensitivity=sensitivity,
        reports=per_beta)[variance_beta]
    if reports is not None:
        reports.update(per_beta[variance_beta])
    return out
