"""The per-module LoRA-DA solve (ALGORITHM.md, "Per-module solve"), and the public ``solve_lora_da``.

The functions below are the steps of the algorithm, written so that they also accept stacks of
same-shape problems (leading batch dimensions): the reference loop here and the batched solver share
them. The reference path solves every module alone in float64 with a dense eigendecomposition.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .config import LoraDAConfig
from .errors import ConfigError, NumericalError, TargetError
from .statistics import FisherStatistics, ModuleStatistics, check_finite, first_failing


class LoraFactors(NamedTuple):
    """PEFT layout: ``lora_A`` is ``r x d_in``, ``lora_B`` is ``d_out x r`` (fp32)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor


@dataclass
class ModuleReport:
    """What the solve found for one module (shown in the CLI table and written to the report)."""

    d_in: int
    d_out: int
    group: str
    damping: float  # damping of Z actually used (raised if a Cholesky failed)
    output_damping: float  # damping of the output factor
    sigma: float  # ||D||_2 before normalisation
    eigenvalues: List[float]  # the r + 1 smallest eigenvalues of M (when known)
    eigengap: float  # (lambda_{r+1} - lambda_r) / max|lambda|: small means an ill-defined subspace
    residual: float  # max_k ||M a_k - theta_k a_k|| / ||M||
    solver: str
    update_norm: float = 0.0  # ||lora_B @ lora_A||_F
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class LoraDAResult(dict):
    """``{module_name: LoraFactors}`` with ``.reports`` (``{module_name: ModuleReport}``)."""

    def __init__(self, factors=None, reports=None):
        super().__init__(factors or {})
        self.reports: Dict[str, ModuleReport] = reports or {}
        self.info: Dict[str, object] = {}  # run-level facts (plan, timings) when made by run_lora_da


# --------------------------------------------------------------------------------------------------
# Steps (batched over leading dimensions)


def cholesky_with_retry(Z: torch.Tensor, damping: float, max_damping: float, what: str
                        ) -> Tuple[torch.Tensor, float]:
    """Cholesky factor of ``sym(Z) + lam I``; on failure retry with ``lam`` raised tenfold up to
    ``max_damping``. Returns ``(L, lam_used)``; raises :class:`NumericalError` naming ``what``."""
    Zs = 0.5 * (Z + Z.transpose(-1, -2))
    eye = torch.eye(Z.shape[-1], dtype=Z.dtype, device=Z.device)
    lam = damping
    while True:
        L, info = torch.linalg.cholesky_ex(Zs + lam * eye)
        if not bool((info != 0).any()) and bool(torch.isfinite(L).all()):
            return L, lam
        if lam * 10 > max_damping * (1 + 1e-12):
            raise NumericalError(
                f"Cholesky factorisation of the input factor of {what} failed even with damping {lam:g} "
                f"(max_damping={max_damping:g})")
        lam *= 10


def output_damping(st: ModuleStatistics, cfg: LoraDAConfig) -> float:
    if cfg.output_damping_ratio is None:
        return cfg.damping
    med = float(st.y.double().median())
    lam = cfg.output_damping_ratio * med
    return lam if lam > 0 else cfg.damping


def output_inverse(st: ModuleStatistics, n: int, lam: float, mode: str, dtype=torch.float64) -> torch.Tensor:
    """``u`` (``d_out``): ``1/(y + lam)``, or in ``sequence_lowrank`` mode the diagonal of
    ``(S^T S + lam I)^{-1}`` with ``S = stack(s_i)/sqrt(n)`` by Woodbury."""
    if mode == "diagonal":
        return 1.0 / (st.y.to(dtype) + lam)
    S = st.seq_sums.to(dtype) / math.sqrt(n)  # [n, d_out]
    K = S @ S.T + lam * torch.eye(S.shape[0], dtype=dtype, device=S.device)
    KinvS = torch.linalg.solve(K, S)
    diag = 1.0 - (S * KinvS).sum(dim=0)  # diag(S^T K^{-1} S)
    return diag.clamp(min=0) / lam


def fisher_gradient(L: torch.Tensor, G: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``D = -Zd^{-1} G^T diag(u)`` (``d_in x d_out``) from the Cholesky factor ``L`` of ``Zd``."""
    rhs = G.transpose(-1, -2) * u.unsqueeze(-2)
    return -torch.cholesky_solve(rhs, L)


def guidance(D: torch.Tensor, Zinv: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor,
             alpha: float, beta: float, population_size: Optional[int]) -> torch.Tensor:
    """``M = -alpha D D^T + beta c Zd^{-1}``, ``c = sum(u) / (N sigma^2)``, ``D`` already normalised."""
    M = -alpha * (D @ D.transpose(-1, -2))
    if beta > 0:
        c = u.sum(-1) / (population_size * sigma ** 2)
        M = M + (beta * c)[..., None, None] * Zinv
    return 0.5 * (M + M.transpose(-1, -2))


def canonical_signs(A0: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive (a deterministic basis)."""
    idx = A0.abs().argmax(dim=-2, keepdim=True)
    s = torch.sign(torch.gather(A0, -2, idx))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return A0 * s


def to_factors(A0: torch.Tensor, D: torch.Tensor, gamma: float) -> LoraFactors:
    """``lora_A = A0^T / sqrt(gamma)``, ``lora_B = (A0^T D)^T / sqrt(gamma)``, fp32."""
    B0 = A0.transpose(-1, -2) @ D  # [r, d_out]
    scale = 1.0 / math.sqrt(gamma)
    return LoraFactors((A0.transpose(-1, -2) * scale).float().contiguous(),
                       (B0.transpose(-1, -2) * scale).float().contiguous())


def check_rank(stats: FisherStatistics, rank: int) -> None:
    for name, st in stats.modules.items():
        if rank > min(st.d_in, st.d_out):
            raise TargetError(f"rank {rank} is larger than min(d_in, d_out) = {min(st.d_in, st.d_out)} "
                              f"of module {name}")


def check_nonzero(stats: FisherStatistics) -> None:
    checks = [(name, st.G.any()) for name, st in stats.modules.items()]
    bad = first_failing(checks)
    if bad is not None:
        raise NumericalError(f"module {bad} has an all-zero gradient: it was never reached by the "
                             "loss (is it used in the forward pass?)")
    bad = first_failing([(g, Z.any()) for g, Z in stats.Z.items()])
    if bad is not None:
        raise NumericalError(f"module {bad} has all-zero input statistics: it never received an input")


# --------------------------------------------------------------------------------------------------
# Reference solve: one module at a time, dense float64


def solve_reference(stats: FisherStatistics, cfg: LoraDAConfig, progress: bool = False) -> LoraDAResult:
    """Exact LoRA-DA factors, module by module, dense float64 eigendecomposition of ``M``."""
    from tqdm.auto import tqdm

    result = LoraDAResult()
    groups = stats.groups()
    bar = tqdm(total=len(stats.modules), desc="solve (reference)", unit="module", disable=not progress)
    r = cfg.rank
    for group, names in groups.items():
        if not names:
            continue
        Z = stats.Z[group].to(torch.float64)
        L, lam = cholesky_with_retry(Z, cfg.damping, cfg.max_damping, group)
        Zinv = torch.cholesky_inverse(L) if cfg.beta > 0 else None
        for name in names:
            st = stats.modules[name]
            lam_y = output_damping(st, cfg)
            u = output_inverse(st, stats.num_examples, lam_y, stats.output_fisher)
            D = fisher_gradient(L, st.G.to(torch.float64), u)
            sigma = torch.linalg.matrix_norm(D, ord=2)
            if not bool(sigma > 0) or not bool(torch.isfinite(sigma)):
                raise NumericalError(f"the Fisher-gradient of module {name} is zero or non-finite")
            D = D / sigma
            M = guidance(D, Zinv, u, sigma, cfg.alpha, cfg.beta, cfg.population_size)
            w, V = torch.linalg.eigh(M)
            A0 = canonical_signs(V[:, :r])
            theta = w[:r]
            resid = torch.linalg.vector_norm(M @ A0 - A0 * theta, dim=0).max()
            mnorm = w.abs().max().clamp(min=torch.finfo(w.dtype).tiny)
            gap = float((w[r] - w[r - 1]) / mnorm) if w.shape[0] > r else float("inf")
            f = to_factors(A0, D, cfg.gamma)
            notes = []
            if lam != cfg.damping:
                notes.append(f"damping raised from {cfg.damping:g} to {lam:g} after a failed Cholesky")
            result[name] = f
            result.reports[name] = ModuleReport(
                d_in=st.d_in, d_out=st.d_out, group=group, damping=lam, output_damping=lam_y,
                sigma=float(sigma), eigenvalues=[float(v) for v in w[: r + 1]], eigengap=gap,
                residual=float(resid / mnorm), solver="dense-fp64",
                update_norm=float(torch.linalg.matrix_norm(f.lora_B.double() @ f.lora_A.double())),
                notes=notes)
            bar.update(1)
    bar.close()
    return LoraDAResult({n: result[n] for n in stats.modules if n in result},
                        {n: result.reports[n] for n in stats.modules if n in result.reports})


def solve_lora_da(stats: FisherStatistics, cfg: LoraDAConfig, progress: bool = False) -> LoraDAResult:
    """Solve every module of ``stats``: ``{module_name: LoraFactors(lora_A, lora_B)}`` (+ ``.reports``).

    ``cfg.solver``: ``"reference"`` (dense float64 per module), ``"batched"`` or ``"auto"`` (batched
    solver when available).
    """
    if not isinstance(cfg, LoraDAConfig):
        raise ConfigError("cfg must be a LoraDAConfig")
    if cfg.beta > 0 and cfg.population_size is None:
        raise ConfigError("population_size is required when beta > 0: give the number of examples of the "
                          "fine-tuning set (it scales the variance term)")
    if cfg.output_fisher != stats.output_fisher:
        raise ConfigError(f"the statistics were gathered for output_fisher={stats.output_fisher!r}, "
                          f"the config asks for {cfg.output_fisher!r}")
    check_rank(stats, cfg.rank)
    check_finite(stats)
    check_nonzero(stats)
    from . import distributed  # under torch.distributed, each rank solves its share of the modules
    if distributed.sharding_enabled():
        return distributed.solve_sharded(stats, cfg, progress=progress)
    if cfg.solver != "reference":
        try:
            from .batched_solver import solve_batched
        except ImportError:
            solve_batched = None
        if solve_batched is not None:
            return solve_batched(stats, cfg, progress=progress)
        if cfg.solver == "batched":
            raise ConfigError("solver='batched' is not available in this build")
    return solve_reference(stats, cfg, progress=progress)
