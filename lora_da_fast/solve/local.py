"""The solve of every module of a set of statistics on this process (docs/algorithm.md, "Solve"):
checks, then the input groups whose tokens were kept through their tokens (exact, float64:
:mod:`.token_space`), the others through their input factors with the batched solver (default) or the
dense float64 reference."""
from __future__ import annotations

from ..config import LoraDAConfig
from ..errors import ConfigError
from ..fisher import FisherStatistics, check_finite
from ..results import LoraDAResult
from .batched import solve_batched
from .reference import solve_reference
from .sensitivity import measure_sensitivity
from .steps import check_nonzero
from .token_space import solve_token_groups, token_path_groups


def check_solvable(stats: FisherStatistics, cfg: LoraDAConfig) -> None:
    """:class:`ConfigError`/:class:`NumericalError`/:class:`TargetError` when ``stats`` cannot be solved
    with ``cfg`` (settings, ranks, non-finite or all-zero statistics)."""
    if not isinstance(cfg, LoraDAConfig):
        raise ConfigError("cfg must be a LoraDAConfig")
    if not isinstance(stats, FisherStatistics):
        raise ConfigError(f"stats must be a FisherStatistics, got {type(stats).__name__}")
    shapes = {n: (st.d_out, st.d_in) for n, st in stats.modules.items()}
    cfg.check_solvable(shapes, cfg.module_ranks(list(shapes)))
    if cfg.output_fisher != stats.output_fisher:
        raise ConfigError(f"the statistics were gathered for output_fisher={stats.output_fisher!r}, "
                          f"the config asks for {cfg.output_fisher!r}")
    check_finite(stats)
    check_nonzero(stats)


def solve_local(stats: FisherStatistics, cfg: LoraDAConfig, progress: bool = False) -> LoraDAResult:
    """Solve every module of ``stats`` here: ``{module_name: LoraFactors(lora_A, lora_B)}`` (+ ``.reports``).
    ``cfg.solver``: ``"reference"`` (dense float64 per module), ``"batched"`` or ``"auto"`` (batched)."""
    check_solvable(stats, cfg)
    solver = solve_reference if cfg.solver == "reference" else solve_batched
    through_tokens = token_path_groups(stats, cfg)
    if not through_tokens:
        res = solver(stats, cfg, progress=progress)
    else:
        res = solve_token_groups(stats, cfg, through_tokens, progress=progress)
        done = set(through_tokens)
        rest = [n for n, st in stats.modules.items() if st.group not in done]
        if rest:
            more = solver(stats.subset(rest), cfg, progress=progress)
            res.update(more)
            res.reports.update(more.reports)
        res = LoraDAResult({n: res[n] for n in stats.modules}, {n: res.reports[n] for n in stats.modules})
    def again(st: FisherStatistics, c: LoraDAConfig, start=None, progress: bool = False) -> LoraDAResult:
        if solver is solve_reference:
            return solver(st, c, progress=progress)
        return solver(st, c, progress=progress, start=start)

    measure_sensitivity(stats, cfg, res, through_tokens, again, progress=progress)
    return res
