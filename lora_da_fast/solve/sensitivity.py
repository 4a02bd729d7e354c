"""Is a module's result determined by the data at fp32 precision? (docs/algorithm.md, "Is the result
determined by the data?") The statistics are moved by one fp32 ulp, every entry up or down at random, the
same modules are solved again the same way, and the relative change of ``lora_B @ lora_A`` is reported
(:attr:`~lora_da_fast.results.ModuleReport.sensitivity`); above :data:`SENSITIVITY_FLAG` (1e-4) a note says
that the module's subspace is not determined by the data: two runs that differ only in rounding (batch
size, number of ranks, backend) can give visibly different adapters for it."""
from __future__ import annotations

import zlib
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..config import LoraDAConfig
from ..errors import LoraDAError
from ..fisher import FisherStatistics, ModuleStatistics
from ..results import LoraDAResult
from ..tokens import TokenStatistics
from .token_space import solve_token_groups

# Flag a module whose product moves by more than this for one ulp. Two runs differ by more than one ulp:
# the fp32 sums of a pass differ with the summation order by several ulps (measured on the tiny random
# Llama: o_proj's one-ulp sensitivity 4-6e-4, its batch-size-1 vs -3 difference 1.3-2.9e-3), so this
# flags the modules that can differ by ~1e-3 between runs.
SENSITIVITY_FLAG = 1e-4
ULP32 = 2.0 ** -23  # one fp32 ulp, relative (at a mantissa of 1)


def one_ulp(t: Optional[torch.Tensor], name: str, seed: int, same_rows: bool = False) -> Optional[torch.Tensor]:
    """``t`` with every entry moved by one fp32 ulp, up or down at random (the signs drawn from ``seed``
    and ``name``, so a tensor gets the same perturbation whichever modules are solved with it). fp32
    tensors move to their neighbouring fp32 numbers; others (float64 or half-precision tokens) by the
    relative amount ``2^-23``, in float64. ``same_rows``: equal rows move alike (the inputs of tokens
    with the same prefix, e.g. every example's first token, are equal in every run: independent
    perturbations would invent directions the data never has)."""
    if t is None:
        return None
    gen = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % (2 ** 63))
    if same_rows and t.dim() == 2 and t.shape[0] > 0:
        rows, inverse = torch.unique(t.cpu(), dim=0, return_inverse=True)
        up = torch.randint(0, 2, rows.shape, generator=gen, dtype=torch.bool)[inverse].to(t.device)
    else:
        up = torch.randint(0, 2, t.shape, generator=gen, dtype=torch.bool).to(t.device)
    if t.dtype == torch.float32:
        inf = torch.tensor(float("inf"), dtype=t.dtype, device=t.device)
        return torch.nextafter(t, torch.where(up, inf, -inf))
    t64 = t.to(torch.float64)
    return t64 * (1 + ULP32 * (up.to(torch.float64) * 2 - 1))


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
    """Fill ``res.reports[m].sensitivity`` (and a note above :data:`SENSITIVITY_FLAG`) for the modules
    ``cfg.sensitivity`` asks for: those of ``token_groups`` (solved through their tokens), and with
    ``"always"`` the others too, solved again with ``solve_factors(stats, cfg, start=...)`` (the
    input-factor solver, its eigensolver started from the subspaces being measured: measured on SmolLM2,
    the second solve then costs 0.76x the first instead of 0.98x; the factorisations and the modules that
    do move remain)."""
    if cfg.sensitivity == "never":
        return
    members = stats.groups()
    tok = [m for g in token_groups for m in members[g]]
    solved = set(tok)
    dense = [m for m in stats.modules if m not in solved] if cfg.sensitivity == "always" else []
    if not tok and not dense:
        return
    seed = cfg.seed + 1
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
        rep.sensitivity = sens
        if sens > SENSITIVITY_FLAG:
            why = f"a one-ulp change of the statistics moves lora_B @ lora_A by {sens:.1e}" if failed is None \
                else f"a one-ulp change of the statistics makes the solve fail ({failed})"
            rep.notes.append(f"not determined by the data at fp32 precision: {why}")
