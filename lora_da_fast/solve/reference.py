"""Reference solve: one module at a time, dense float64 eigendecomposition of ``M`` (docs/algorithm.md,
"Solve"). The readable specification and the oracle of the batched solver's tests."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import LoraDAConfig
from ..errors import NumericalError
from ..fisher import FisherStatistics
from ..results import LoraDAResult, ModuleReport
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
                notes.append(damping_note(cfg.damping, lam))
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
