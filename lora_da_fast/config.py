"""Configuration of a LoRA-DA initialisation (the hyper-parameters of docs/algorithm.md)."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Tuple, Union

from .errors import ConfigError, TargetError

TOKEN_MASKS = ("attention", "labels")
OUTPUT_FISHERS = ("diagonal", "sequence_lowrank")
BACKENDS = ("auto", "torch", "triton")
SOLVERS = ("auto", "batched", "reference")
KEEP_TOKENS = ("auto", "always", "never")
SENSITIVITY = ("auto", "always", "never")


def is_integer(value) -> bool:
    """An integer of any kind (Python, numpy: ``numbers.Integral``), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number of any kind (Python, numpy: ``numbers.Real``), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_python_number(value):
    """``value`` as a Python ``int`` (an integer) or ``float`` (another real), so that ``to_dict``, JSON
    and fingerprints read the same whether the user gave ``8`` or ``np.int64(8)``."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _positive_number(name: str, value, allow_zero: bool = False) -> None:
    if not is_real(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")


def _positive_integer(value) -> bool:
    return is_integer(value) and value >= 1


@dataclass
class LoraDAConfig:
    """Hyper-parameters of LoRA-DA. Defaults are those of the authors' released code. Numbers may be
    Python or numpy numbers (``numbers.Integral`` where an integer is meant, ``numbers.Real`` where a real
    is), stored as Python ``int``/``float``; a bool is not a number here.

    Args:
        rank: LoRA rank ``r``.
        population_size: ``N``, the number of examples of the fine-tuning set; it scales the variance
            term (``beta * sum(u) / (N sigma^2) * Zd^{-1}``). Required when ``beta > 0``.
        beta: weight of the variance term; ``0`` gives the truncated SVD of the Fisher-gradient.
        alpha: weight of the bias term.
        gamma: the factors are divided by ``sqrt(gamma)``.
        damping: absolute damping ``lam`` added to both Kronecker factors.
        output_damping_ratio: if set, the output factor is damped by ``ratio * median(y)`` instead.
        token_mask: ``"attention"`` (every non-padding token) or ``"labels"`` (tokens whose next label
            is not ``-100``) selects the tokens of ``Z`` and ``y``.
        output_fisher: ``"diagonal"`` or ``"sequence_lowrank"`` (per-example summed gradients, Woodbury).
        target_modules: ``"all-linear"``, a regex (full match on the module name), or a list of names
            (a full name, or a suffix after a dot), as PEFT matches them.
        batch_size: examples per forward/backward pass; the result does not depend on it.
        sort_by_length: batch examples of similar length together (less padding); the result does not
            depend on it.
        layers_per_pass: ``None`` gathers every target module's statistics in one pass; an integer
            ``k`` streams the model through passes of ``k`` layers each (statistics of a slice are solved
            and freed before the next pass: bounded memory, one data pass per slice); ``"auto"`` plans
            ``k`` from free device memory (one pass when everything fits).
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
        solver: ``"auto"`` (batched), ``"batched"`` or ``"reference"`` (per-module dense float64).
        max_damping: bound for the damping retries when a Cholesky factorisation fails.
        seed: seed of the random start vectors of iterative solvers; the result does not depend on it.
        keep_tokens: ``"auto"`` keeps the inputs and output gradients of every token for the input
            groups with few tokens (at most twice ``d_in``) and solves them exactly in token space, in
            float64 (docs/algorithm.md, "Two paths"); ``"always"`` for every group, ``"never"`` for none
            (the input-factor path only). Decided from the final token count, the same on every rank.
        sensitivity: how much ``lora_B @ lora_A`` moves when every entry of the statistics moves by one
            fp32 ulp, reported per module and flagged above 1e-4 (docs/algorithm.md, "Is the result
            determined by the data?"). ``"auto"``: estimated to first order for every module by the solve
            itself (no second solve); ``"always"``: measured, every module solved a second time on the
            moved statistics; ``"never"``.
    """

    rank: int = 8
    population_size: Optional[int] = None
    beta: float = 0.03
    alpha: float = 1.0
    gamma: float = 1024.0
    damping: float = 1e-6
    output_damping_ratio: Optional[float] = None
    token_mask: str = "attention"
    output_fisher: str = "diagonal"
    target_modules: Union[str, List[str]] = "all-linear"
    batch_size: int = 8
    sort_by_length: bool = True
    layers_per_pass: Union[int, str, None] = None
    backend: str = "auto"
    solver: str = "auto"
    max_damping: float = 1.0
    seed: int = 0
    keep_tokens: str = "auto"
    sensitivity: str = "auto"

    def __post_init__(self) -> None:
        if not _positive_integer(self.rank):
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.population_size is not None:
            if not _positive_integer(self.population_size):
                raise ConfigError(
                    f"population_size must be a positive integer (the number of fine-tuning examples), "
                    f"got {self.population_size!r}")
        _positive_number("beta", self.beta, allow_zero=True)
        _positive_number("alpha", self.alpha, allow_zero=True)
        if self.alpha == 0 and self.beta == 0:
            raise ConfigError("alpha and beta cannot both be 0: the guidance matrix would be zero")
        _positive_number("gamma", self.gamma)
        _positive_number("damping", self.damping)
        _positive_number("max_damping", self.max_damping)
        if self.max_damping < self.damping:
            raise ConfigError(f"max_damping ({self.max_damping}) must be >= damping ({self.damping})")
        if self.output_damping_ratio is not None:
            _positive_number("output_damping_ratio", self.output_damping_ratio)
        if self.token_mask not in TOKEN_MASKS:
            raise ConfigError(f"token_mask must be one of {TOKEN_MASKS}, got {self.token_mask!r}")
        if self.output_fisher not in OUTPUT_FISHERS:
            raise ConfigError(f"output_fisher must be one of {OUTPUT_FISHERS}, got {self.output_fisher!r}")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ConfigError("target_modules must not be empty")
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as exc:
                    raise ConfigError(f"target_modules is not a valid regex: {exc}") from None
        elif isinstance(self.target_modules, (list, tuple, set)):
            names = list(self.target_modules)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ConfigError("target_modules must be a non-empty list of non-empty names")
            self.target_modules = names
        else:
            raise ConfigError(
                f"target_modules must be 'all-linear', a regex or a list of names, got {self.target_modules!r}")
        if not _positive_integer(self.batch_size):
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.sort_by_length, bool):
            raise ConfigError(f"sort_by_length must be True or False, got {self.sort_by_length!r}")
        lpp = self.layers_per_pass
        if not (lpp is None or (isinstance(lpp, str) and lpp == "auto") or _positive_integer(lpp)):
            raise ConfigError(f"layers_per_pass must be None, 'auto' or a positive integer, got {lpp!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not is_integer(self.seed) or not 0 <= self.seed < 2 ** 64:
            raise ConfigError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if self.keep_tokens not in KEEP_TOKENS:
            raise ConfigError(f"keep_tokens must be one of {KEEP_TOKENS}, got {self.keep_tokens!r}")
        if self.sensitivity not in SENSITIVITY:
            raise ConfigError(f"sensitivity must be one of {SENSITIVITY}, got {self.sensitivity!r}")
        self._store_python_numbers()

    def _store_python_numbers(self) -> None:
        """numpy numbers (accepted wherever a number is meant) stored as Python ``int``/``float``."""
        for name in ("rank", "population_size", "beta", "alpha", "gamma", "damping", "output_damping_ratio",
                     "batch_size", "layers_per_pass", "max_damping", "seed"):
            value = getattr(self, name)
            if is_real(value):
                setattr(self, name, as_python_number(value))

    def to_dict(self) -> dict:
        return asdict(self)

    def module_ranks(self, names: List[str], ranks: Optional[Mapping[str, int]] = None) -> Dict[str, int]:
        """The rank of each module of ``names``: ``ranks[name]`` where given (e.g. from PEFT's
        ``rank_pattern``), else ``self.rank``. :class:`ConfigError` for a rank that is not a positive
        integer or a name that is not one of ``names``."""
        ranks = dict(ranks or {})
        unknown = sorted(set(ranks) - set(names))
        if unknown:
            raise ConfigError(f"ranks given for {len(unknown)} module(s) that are not targets, e.g. {unknown[0]}")
        for name, r in ranks.items():
            if not _positive_integer(r):
                raise ConfigError(f"the rank of {name} must be a positive integer, got {r!r}")
        return {n: int(ranks.get(n, self.rank)) for n in names}

    def check_solvable(self, shapes: Mapping[str, Tuple[int, int]], ranks: Mapping[str, int]) -> None:
        """The one check of the settings of a solve, made before any data pass (by the engine, from the
        model's modules) and again before a solve of given statistics: ``population_size`` when
        ``beta > 0``, and every module's rank at most ``min(d_in, d_out)``. ``shapes``:
        ``{name: (d_out, d_in)}``; ``ranks``: ``{name: rank}`` (:meth:`module_ranks`)."""
        if self.beta > 0 and self.population_size is None:
            raise ConfigError("population_size is required when beta > 0: give the number of examples of the "
                              "fine-tuning set (it scales the variance term), e.g. "
                              "LoraDAConfig(population_size=len(train_dataset))")
        bad = sorted((min(d_out, d_in), n, d_out, d_in) for n, (d_out, d_in) in shapes.items()
                     if ranks[n] > min(d_out, d_in))
        if bad:
            bound, n, d_out, d_in = bad[0]
            others = f" and {len(bad) - 1} other target(s)" if len(bad) > 1 else ""
            raise TargetError(f"rank {ranks[n]} is larger than min(d_in, d_out) = {bound} of module {n} "
                              f"({d_out}x{d_in}){others}; use a rank <= {bound} or leave such modules out of "
                              "the targets")
