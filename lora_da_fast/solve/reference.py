"""Reference solve: one module at a time, dense float64 eigendecomposition of ``M`` (docs/algorithm.md,
"Solve"). The readable specification and the oracle of the batched solver's tests."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import LoraDAConfig
from ..errors import NumericalError
from ..fisher import FisherStatistics
from ..results import LoraDAResult, ModuleReport
from .first_order import first_order_change, g_step, move_seed, z_step
from .steps import (canonical_signs, cholesky_with_retry, damping_note, fisher_gradient, guidance, output_damping,
                    output_inverse, to_factors)


def solve_reference(stats: FisherStatistics, cfg: LoraDAConfig, progress: bool = False) -> LoraDAResult:
    """Exact LoRA-DA factors, module by module, dense float64 eigendecomposition of ``M``."""
    result = LoraDAResult()
    groups = stats.groups()
    bar = tqdm(total=len(stats.modules), desc="solve (reference)", unit="module", disable=not progress)
    r = cfg.rank
    for group, names in groups.items():
        if not names:
            continue
        Z = stats.dense_Z(group, torch.float64)
        L, lam = cholesky_with_retry(Z, cfg.damping, cfg.max_damping, group)
        Zinv = torch.cholesky_inverse(L) if cfg.beta > 0 or cfg.sensitivity == "auto" else None
        dZ = z_step(stats, group, move_seed(cfg))[None] if cfg.sensitivity == "auto" else None
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
            sens = None if dZ is None else _first_order(stats, name, Zinv, dZ, u, w * sigma ** 2, V, cfg)
            A0 = canonical_signs(V[:, :r])
            theta = w[:r]
            resid = torch.linalg.vector_norm(M @ A0 - A0 * theta, dim=0).max()
            mnorm = w.abs().max().clamp(min=torch.finfo(w.dtype).tiny)
            gap = float((w[r] - w[r - 1]) / mnorm) if w.shape[0] > r else float("inf")
            f = to_factors(A0, D, cfg.gamma)
            notes = []
            if lam != cfg.damping:
                notes.append(damping_note(cfg.damping, lam))
            result[name] = f
            result.reports[name] = ModuleReport(
                d_in=st.d_in, d_out=st.d_out, group=group, damping=lam, output_damping=lam_y,
                sigma=float(sigma), eigenvalues=[float(v) for v in w[: r + 1]], eigengap=gap,
                residual=float(resid / mnorm), solver="dense-fp64",
                update_norm=float(torch.linalg.matrix_norm(f.lora_B.double() @ f.lora_A.double())),
                notes=notes, sensitivity=sens, sensitivity_by=None if sens is None else "first-order")
            bar.update(1)
    bar.close()
    return LoraDAResult({n: result[n] for n in stats.modules if n in result},
                        {n: result.reports[n] for n in stats.modules if n in result.reports})


def _first_order(stats: FisherStatistics, name: str, Zinv: torch.Tensor, dZ: torch.Tensor, u: torch.Tensor,
                 w: torch.Tensor, V: torch.Tensor, cfg: LoraDAConfig) -> float:
    """The first-order one-ulp sensitivity of one module (:mod:`.first_order`) from every eigenvector of
    ``M' = sigma^2 M`` (``w``, ``V``); ``dZ``: its group's move (``[1, d_in, d_in]``)."""
    r = cfg.rank
    G = stats.modules[name].G.double()[None]
    u = u.double()[None]
    dGu = g_step(stats, name, move_seed(cfg))[None] * u[..., None]  # diag(u) dG
    b = None
    if cfg.beta > 0:
        b = torch.tensor([cfg.beta * float(u.sum()) / cfg.population_size], dtype=torch.float64)
    Zi = Zinv[None]
    got = first_order_change(
        zinv=lambda X: Zi @ X, gtu_mul=lambda Y: G.transpose(-1, -2) @ (u[..., None] * Y),
        ug_mul=lambda X: u[..., None] * (G @ X), dz_mul=lambda X: dZ @ X,
        dgu_mul=lambda Y: dGu.transpose(-1, -2) @ Y, dgu_t_mul=lambda X: dGu @ X,
        a=cfg.alpha, b=b, Vr=V[None, :, :r], theta_r=w[None, :r], W=V[None, :, r:], theta_w=w[None, r:])
    return float(got[0])
