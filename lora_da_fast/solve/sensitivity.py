"""Is a module's result determined by the data at fp32 precision? (docs/algorithm.md, "Is the result
determined by the data?") How far ``lora_B @ lora_A`` moves when every entry of the statistics moves by
one fp32 ulp (:attr:`~lora_da_fast.results.ModuleReport.sensitivity`): estimated to first order by the
solvers (default, :mod:`.first_order`) or measured by a second solve (``sensitivity="always"``). Above
:data:`SENSITIVITY_FLAG` (1e-4) a note says that the module's subspace is not determined by the data: two
runs that differ only in rounding (batch size, number of ranks, backend) can give visibly different
adapters for it."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..config import LoraDAConfig
from ..errors import LoraDAError
from ..fisher import FisherStatistics, ModuleStatistics
from ..results import LoraDAResult
from ..tokens import TokenStatistics
from .first_order import move_seed, one_ulp
from .token_space import solve_token_groups

# Flag a module whose product moves by more than this for one ulp. Two runs differ by more than one ulp:
# the fp32 sums of a pass differ with the summation order by several ulps (measured on the tiny random
# Llama: o_proj's one-ulp sensitivity 4-6e-4, its batch-size-1 vs -3 difference 1.3-2.9e-3), so this
# flags the modules that can differ by ~1e-3 between runs.
SENSITIVITY_FLAG = 1e-4
def perturbed(stats: FisherStatistics, names: Sequence[str], token_groups: Sequence[str], seed: int
              ) -> FisherStatistics:
    """The statistics of the modules ``names``, every entry moved by one fp32 ulp (:func:`one_ulp`): ``Z``,
    ``G``, ``y`` and the sequence sums, and the kept tokens of ``token_groups``."""
    wanted = set(names)
    modules = {m: ModuleStatistics(st.group, one_ulp(st.G, f"G.{m}", seed), one_ulp(st.y, f"y.{m}", seed),
                                   one_ulp(st.seq_sums, f"s.{m}", seed))
               for m, st in stats.modules.items() if m in wanted}
    groups = {st.group for st in modules.values()}
    Z = {g: one_ulp(z, f"Z.{g}", seed) for g, z in stats.Z.items() if g in groups}
    tokens = None
    if token_groups:
        t = stats.tokens
        tokens = TokenStatistics(t.key, t.selected, {g: one_ulp(t.X[g], f"X.{g}", seed, True) for g in token_groups},
                                 {m: one_ulp(t.delta[m], f"D.{m}", seed) for m in names if m in t.delta})
    return FisherStatistics(modules, Z, stats.num_examples, stats.num_tokens, stats.num_skipped, stats.token_mask,
                            stats.output_fisher, dict(stats.meta), tokens)


def measure_sensitivity(stats: FisherStatistics, cfg: LoraDAConfig, res: LoraDAResult, token_groups: List[str],
                        solve_factors: Callable[..., LoraDAResult], progress: bool = False) -> None:
    """Notes on the modules that the data do not determine at fp32 precision (sensitivity above
    :data:`SENSITIVITY_FLAG`), per ``cfg.sensitivity``:

    - ``"auto"``: the solvers have estimated every module's sensitivity to first order
      (:mod:`.first_order`, ``report.sensitivity_by``): exact to first order where every eigenvector was
      at hand (the token path, dense solves); from the guard vectors of an iterative solve and a
      two-dimensional Krylov correction for the rest. Nothing is solved again.
    - ``"always"``: every module is solved again on statistics moved by one ulp (:func:`perturbed`): the
      token groups through their tokens, the others with ``solve_factors(stats, cfg, start=...)`` (the
      input-factor solver, started from the subspaces being measured: 0.76x the first solve on SmolLM2
      instead of 0.98x), and the change measured.
    """
    if cfg.sensitivity == "never":
        return
    if cfg.sensitivity == "auto":
        for rep in res.reports.values():
            sens = rep.sensitivity
            if sens is None or not sens > SENSITIVITY_FLAG:
                continue
            rep.notes.append(f"not determined by the data at fp32 precision: a one-ulp change of the statistics "
                             f"moves lora_B @ lora_A by {sens:.1e} (first-order estimate)")
        return
    members = stats.groups()
    tok = [m for g in token_groups for m in members[g]]
    solved = set(tok)
    dense = [m for m in stats.modules if m not in solved]
    if not tok and not dense:
        return
    seed = move_seed(cfg)
    again: Dict[str, object] = {}
    failed: Optional[str] = None
    try:
        if tok:
            again.update(solve_token_groups(perturbed(stats, tok, token_groups, seed), cfg, token_groups,
                                            progress=progress, desc="sensitivity (tokens)"))
        if dense:
            start = {m: res[m].lora_A.transpose(0, 1).double() for m in dense}  # A0 up to 1/sqrt(gamma)
            again.update(solve_factors(perturbed(stats, dense, [], seed), cfg, start=start, progress=progress))
    except LoraDAError as exc:  # a one-ulp change that makes the solve fail: as undetermined as it gets
        failed = str(exc)
    for m in tok + dense:
        rep = res.reports.get(m)
        if rep is None:
            continue
        f0 = res[m]
        P0 = f0.lora_B.double() @ f0.lora_A.double()
        if m in again:
            f1 = again[m]
            P1 = f1.lora_B.double().to(P0.device) @ f1.lora_A.double().to(P0.device)
            sens = float(torch.linalg.matrix_norm(P1 - P0) / torch.linalg.matrix_norm(P0).clamp(min=1e-300))
            if not sens == sens:  # NaN: non-finite factors of the perturbed solve
                sens = float("inf")
        else:
            sens = float("inf")
        rep.sensitivity, rep.sensitivity_by = sens, "second solve"
        if sens > SENSITIVITY_FLAG:
            why = f"a one-ulp change of the statistics moves lora_B @ lora_A by {sens:.1e}" if failed is None \
                else f"a one-ulp change of the statistics makes the solve fail ({failed})"
            rep.notes.append(f"not determined by the data at fp32 precision: {why}")
