"""The engine: one LoRA-DA run, used by every entry point (the Python API, the PEFT doors, the compat
drop-in, the CLI and the benchmarks), so that an option honoured by one is honoured by all.

    prepare (every check, the examples, the memory plan: before any forward)
    -> for each slice of the plan: statistics pass -> reduce over ranks -> solve
       (checkpointed and resumable; optional statistics file)

- :func:`run_lora_da` runs it and returns the factors (a :class:`~lora_da_fast.results.LoraDAResult`
  with ``.reports``, ``.info`` and, when kept, ``.statistics``).
- :func:`prepare_run` and :func:`execute` are its two halves, for a caller that needs the prepared run
  in between (the CLI checks a statistics file against the run's fingerprint; compat solves several
  betas): the examples are sorted, checked and planned once.
- :func:`collect_statistics` is the run without the solve; :func:`solve_lora_da` the solve alone
  (spread over the ranks of a process group, local otherwise).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from . import checkpoint as ckpt
from . import comm
from .config import LoraDAConfig, is_integer
from .data import IGNORE_INDEX, Example, prepare_examples
from .errors import ConfigError, TargetError
from .fisher import FisherStatistics
from .plan import PeakMemory, plan_slices
from .results import LoraDAResult, check_factors
from .solve import solve_local, solve_sharded
from .statistics import StatisticsPass, reduce_over_ranks, run_pass
from .statistics.statistics_pass import LossFn
from .targets import find_target_modules, linear_shape
from .validate import check_examples_fit, check_model_loaded, check_not_compiled


# --------------------------------------------------------------------------------------------------
# Solve


def solve_lora_da(stats: FisherStatistics, cfg: LoraDAConfig, progress: bool = False,
                  ranks: Optional[Mapping[str, int]] = None) -> LoraDAResult:
    """Solve every module of ``stats``: ``{module_name: LoraFactors(lora_A, lora_B)}`` (+ ``.reports``).

    ``cfg.solver``: ``"reference"`` (dense float64 per module), ``"batched"`` or ``"auto"`` (batched).
    ``ranks``: ``{module name: rank}`` for modules whose rank is not ``cfg.rank`` (PEFT's
    ``rank_pattern``); the modules of each rank are solved together. Under an initialised
    ``torch.distributed`` process group of several ranks, every rank must call it with the same
    statistics; the modules are spread over the ranks and every rank gets every factor. Non-finite or
    zero factors are a :class:`~lora_da_fast.errors.NumericalError` naming the module and the setting
    that likely caused them (:func:`~lora_da_fast.results.check_factors`).
    """
    if not isinstance(cfg, LoraDAConfig):
        raise ConfigError("cfg must be a LoraDAConfig")
    if not isinstance(stats, FisherStatistics):
        raise ConfigError(f"stats must be a FisherStatistics, got {type(stats).__name__}")
    names = list(stats.modules)
    per_module = cfg.module_ranks(names, ranks)
    cfg.check_solvable({n: (st.d_out, st.d_in) for n, st in stats.modules.items()}, per_module)
    solve = solve_sharded if comm.is_active() else solve_local
    by_rank: Dict[int, List[str]] = {}
    for n in names:
        by_rank.setdefault(per_module[n], []).append(n)
    if list(by_rank) == [cfg.rank]:
        result = solve(stats, cfg, progress=progress)
    else:
        result = LoraDAResult()
        for r, group in by_rank.items():
            got = solve(stats.subset(group), dataclasses.replace(cfg, rank=r), progress=progress)
            result.update(got)
            result.reports.update(got.reports)
        result = LoraDAResult({n: result[n] for n in names}, {n: result.reports[n] for n in names})
    check_factors(result, beta=cfg.beta, gamma=cfg.gamma)  # never hand out NaN or all-zero factors
    return result


def select_statistics(stats: FisherStatistics, names: List[str], model: Optional[nn.Module] = None,
                      token_mask: Optional[str] = None) -> FisherStatistics:
    """Restrict ``stats`` to ``names`` (checking that each is there, with the module's shape)."""
    if not isinstance(stats, FisherStatistics):
        raise ConfigError(f"stats must be a FisherStatistics, got {type(stats).__name__}")
    missing = [n for n in names if n not in stats.modules]
    if missing:
        raise TargetError(f"the statistics have no entry for {len(missing)} target module(s), e.g. {missing[0]}: "
                          "they were gathered for other target modules (or another model)")
    if token_mask is not None and stats.token_mask != token_mask:
        raise ConfigError(f"the statistics were gathered with token_mask={stats.token_mask!r}, the config asks "
                          f"for {token_mask!r}")
    if model is not None:
        modules = dict(model.named_modules())
        for n in names:
            st = stats.modules[n]
            shape = tuple(linear_shape(modules[n]))
            if (st.d_out, st.d_in) != shape:
                raise TargetError(f"statistics of {n} are {st.d_out}x{st.d_in} but the module is {shape[0]}x{shape[1]}")
    return stats.subset(names)


# --------------------------------------------------------------------------------------------------
# Prepare: every check of a run, before any forward


@dataclass
class RunOptions:
    """What a driver such as the CLI adds to a run (the Python API needs none of it).

    Attributes:
        checkpoint: a file (``FILE.rankR`` under torch.distributed) receiving the pass's state every
            ``checkpoint_every`` examples; if it exists at the start the run resumes from it
            (bit-identical) or refuses a mismatch naming what differs. Removed once the run is done.
        statistics_file: where to save the statistics (rank 0, atomically) once the passes are done,
            before the (last) solve: a failed solve can be rerun from it; ``statistics_meta`` is added
            to the file's ``meta``.
        log: a function receiving one-line messages (rank 0, with ``progress``).
        status: filled as the run goes (``checkpoint``: this rank's checkpoint file, ``examples``: this
            rank's examples, ``phase``: "statistics" or "solve"), for a caller that explains a failure.
        describe: ``describe(i)`` names the user's example ``i`` in messages (default "example i"; the
            CLI names ``--data`` lines).
    """

    checkpoint: Optional[str] = None
    checkpoint_every: int = 64
    statistics_file: Optional[str] = None
    statistics_meta: Optional[dict] = None
    log: Optional[Callable[[str], None]] = None
    status: dict = field(default_factory=dict)
    describe: Optional[Callable[[int], str]] = None


@dataclass
class PreparedRun:
    """A run checked and planned (:func:`prepare_run`), before any forward: what :func:`execute` runs."""

    model: nn.Module
    cfg: LoraDAConfig
    targets: Dict[str, nn.Module]
    ranks: Dict[str, int]
    examples: List[Example]
    skipped: int
    slices: List[List[str]]
    plan: dict
    loss_fn: Optional[LossFn] = None
    _parts: Optional[Dict[str, str]] = field(default=None, repr=False)

    @functools.cached_property
    def total_tokens(self) -> int:
        """Tokens of the whole set (every rank's): which input groups keep their tokens."""
        return sum(map(len, self.examples))

    def fingerprint(self) -> Dict[str, str]:
        """The fingerprint parts of the run's statistics (:func:`lora_da_fast.checkpoint.fingerprint_parts`),
        computed once (a checksum of every weight)."""
        if self._parts is None:
            self._parts = ckpt.fingerprint_parts(self.model, self.cfg, self.targets, self.examples, self.slices,
                                                 loss_fn=self.loss_fn)
        return dict(self._parts)


def _check_num_examples(num_examples) -> Optional[int]:
    """``num_examples`` as a Python int (any integer type, numpy's too), or ``None``."""
    if num_examples is None:
        return None
    if not is_integer(num_examples) or num_examples < 1:
        raise ConfigError(f"num_examples must be a positive integer or None, got {num_examples!r}")
    return int(num_examples)


def _check_settings(model: nn.Module, cfg: LoraDAConfig, ranks: Optional[Mapping[str, int]],
                    solve: bool) -> Tuple[Dict[str, nn.Module], Dict[str, int]]:
    """The targets and their ranks, and the settings of the solve checked against the modules' shapes."""
    if not isinstance(cfg, LoraDAConfig):
        raise ConfigError("cfg must be a LoraDAConfig")
    check_not_compiled(model)  # before its names (`_orig_mod.` ...) are matched
    targets = find_target_modules(model, cfg.target_modules)
    per_module = cfg.module_ranks(list(targets), ranks)
    if solve:
        cfg.check_solvable({n: tuple(linear_shape(m)) for n, m in targets.items()}, per_module)
    return targets, per_module


def prepare_run(model: nn.Module, examples: Iterable, cfg: LoraDAConfig, *, num_examples: Optional[int] = None,
                ranks: Optional[Mapping[str, int]] = None, loss_fn: Optional[LossFn] = None, solve: bool = True,
                describe: Optional[Callable[[int], str]] = None) -> PreparedRun:
    """Every check of a run, before any forward: the settings (targets, ``ranks``, and with ``solve`` the
    rank bound and ``population_size``), the model (not compiled, weights loaded) and the examples (token
    ids inside the embedding, lengths within learned positions, and without ``loss_fn`` per-token labels
    inside the vocabulary or -100; ``describe(i)`` names example ``i``), then the examples sorted and
    batched and the memory plan. Arguments as :func:`run_lora_da`."""
    num_examples = _check_num_examples(num_examples)
    targets, per_module = _check_settings(model, cfg, ranks, solve)
    exs, skipped = prepare_examples(examples, cfg.sort_by_length, num_examples)
    check_model_loaded(model)
    name = describe or (lambda i: f"example {i}")
    order = sorted(range(len(exs)), key=lambda k: exs[k].index)  # the first bad example in the user's order
    # labels are checked for the built-in causal-LM loss only: a loss_fn gives them its own meaning
    labels = [exs[k].labels for k in order] if loss_fn is None else None
    check_examples_fit(model, [exs[k].input_ids for k in order], where=lambda j: name(exs[order[j]].index),
                       labels=labels, ignore_index=IGNORE_INDEX)
    slices, plan = plan_slices(targets, cfg, model, exs)
    return PreparedRun(model, cfg, targets, per_module, exs, skipped, slices, plan, loss_fn)


def fingerprint(model: nn.Module, examples: Iterable, cfg: LoraDAConfig,
                num_examples: Optional[int] = None, loss_fn: Optional[LossFn] = None) -> Dict[str, str]:
    """The fingerprint parts of the statistics pass that :func:`run_lora_da` would make
    (:meth:`PreparedRun.fingerprint` of a statistics-only run)."""
    return prepare_run(model, examples, cfg, num_examples=num_examples, loss_fn=loss_fn, solve=False).fingerprint()


# --------------------------------------------------------------------------------------------------
# Execute


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _open_checkpoint(run: PreparedRun, mine: List[Example], opts: RunOptions, info: dict,
                     say) -> Optional[ckpt.PassCheckpoint]:
    if opts.checkpoint is None:
        return None
    t0 = time.perf_counter()
    ck = ckpt.PassCheckpoint.open(opts.checkpoint, run.fingerprint(), mine, opts.checkpoint_every)
    opts.status["checkpoint"] = ck.path
    info["fingerprint_s"] = time.perf_counter() - t0
    info["resumed_from_examples"] = ck.done
    if say:
        if ck.resumed is not None:
            say(f"resuming the statistics pass from {ck.path}: {ck.done} of {len(mine)} examples already done"
                + (f" in pass {ck.start_slice + 1} of {len(run.slices)}" if len(run.slices) > 1 else ""))
        else:
            say(f"statistics pass checkpointed every {opts.checkpoint_every} examples in {ck.path} "
                "(after Ctrl-C or a crash, rerun the same command to resume)")
    return ck


def _statistics_pass(run: PreparedRun, i: int, mine: List[Example], ck: Optional[ckpt.PassCheckpoint],
                     kept: Optional[FisherStatistics], show: bool) -> FisherStatistics:
    """The pass of slice ``i`` (resumed from ``ck`` where it stopped), reduced over the ranks."""
    sub = {n: run.targets[n] for n in run.slices[i]}
    with comm.guard("the statistics pass"), StatisticsPass(run.model, run.cfg, targets=sub, loss_fn=run.loss_fn,
                                                           probe=run.examples[0] if run.examples else None,
                                                           total_tokens=run.total_tokens) as sp:
        done = ck.resume_into(sp, i) if ck is not None else 0
        on_batch = ck.on_batch(sp, i, kept) if ck is not None else None
        desc = "statistics" if len(run.slices) == 1 else f"statistics {i + 1}/{len(run.slices)}"
        run_pass(sp, mine, show, desc=desc, done=done, on_batch=on_batch)
    reduce_over_ranks(sp)
    part = sp.finalize(run.skipped)
    del sp
    _sync()
    return part


def _save_statistics(final: FisherStatistics, opts: RunOptions) -> None:
    final.meta = {**final.meta, **(opts.statistics_meta or {})}
    with comm.step("writing the statistics file"):
        if comm.is_main():
            final.save(opts.statistics_file)


def execute(run: PreparedRun, *, solve: bool = True, progress: bool = True, keep_statistics: bool = False,
            options: Optional[RunOptions] = None) -> LoraDAResult:
    """Run a prepared run: for each slice of its plan, the statistics pass, the reduction over ranks and
    (with ``solve``) the solve of its modules. Returns what :func:`run_lora_da` returns."""
    opts = options if options is not None else RunOptions()
    t_start = time.perf_counter()
    say = opts.log if (opts.log is not None and progress and comm.is_main()) else None
    info: Dict[str, object] = {"statistics_s": 0.0, "solve_s": 0.0, "fingerprint_s": 0.0, "plan": run.plan,
                               "resumed_from_examples": 0}
    peak = PeakMemory(next(iter(run.targets.values())).weight.device)
    if say and run.plan["passes"] > 1:
        say(f"plan: {len(run.targets)} target modules in {run.plan['layers']} layers, statistics "
            f"{run.plan['statistics_gb']:.2f} GB fp32; {run.plan['passes']} passes of {run.plan['layers_per_pass']} "
            "layers")
    mine = list(comm.shard(run.examples)) if comm.is_active() else run.examples
    opts.status["examples"] = len(mine)
    ck = _open_checkpoint(run, mine, opts, info, say)
    keep = keep_statistics or opts.statistics_file is not None or not solve or ck is not None
    kept = ck.finished() if ck is not None else None
    result, final = LoraDAResult(), None
    for i, names in enumerate(run.slices):
        last = i == len(run.slices) - 1
        if ck is not None and i < ck.start_slice:  # finished before the checkpoint: its statistics are kept
            part = kept.subset(names).to(next(iter(run.targets.values())).weight.device)
        else:
            t0 = time.perf_counter()
            opts.status["phase"] = "statistics"
            part = _statistics_pass(run, i, mine, ck, kept, progress and comm.is_main())
            info["statistics_s"] += time.perf_counter() - t0
            if keep:  # a slice's statistics wait on the host while the next slice's pass runs on the device
                held = part if len(run.slices) == 1 else part.to("cpu")
                kept = held if kept is None else kept.merge(held)
                if ck is not None and not last:
                    ck.slice_done(i + 1, kept)
        if last:
            final = kept if keep else part
            if opts.statistics_file is not None:
                _save_statistics(final, opts)
                if ck is not None:
                    ck.remove()
        if solve:
            t0 = time.perf_counter()
            opts.status["phase"] = "solve"
            got = solve_lora_da(part, run.cfg, progress=progress, ranks={n: run.ranks[n] for n in names})
            result.update(got)
            result.reports.update(got.reports)
            info["solve_s"] += time.perf_counter() - t0
        del part
    if ck is not None:
        ck.remove()
    # the factors in module order whatever the slices
    result = LoraDAResult({n: result[n] for n in run.targets if n in result},
                          {n: result.reports[n] for n in run.targets if n in result.reports})
    result.statistics = final if keep else None
    info.update(examples=final.num_examples, tokens=final.num_tokens, skipped=final.num_skipped,
                total_s=time.perf_counter() - t_start, memory=peak.report(run.plan))
    result.info = info
    return result


def _solve_given(model: nn.Module, stats: FisherStatistics, cfg: LoraDAConfig, ranks, solve: bool,
                 progress: bool, opts: RunOptions) -> LoraDAResult:
    """A run on precomputed statistics: the same checks, no pass."""
    t_start = time.perf_counter()
    targets, per_module = _check_settings(model, cfg, ranks, solve)
    stats = select_statistics(stats, list(targets), model, cfg.token_mask)
    info: Dict[str, object] = {"statistics_s": 0.0, "solve_s": 0.0, "fingerprint_s": 0.0, "plan": None}
    result = LoraDAResult()
    if solve:
        t0 = time.perf_counter()
        opts.status["phase"] = "solve"
        result = solve_lora_da(stats, cfg, progress=progress, ranks=per_module)
        info["solve_s"] = time.perf_counter() - t0
    result.statistics = stats
    info.update(examples=stats.num_examples, tokens=stats.num_tokens, skipped=stats.num_skipped,
                total_s=time.perf_counter() - t_start)
    result.info = info
    return result


def run_lora_da(model: nn.Module, examples: Optional[Iterable], cfg: LoraDAConfig, *, progress: bool = True,
                stats: Optional[FisherStatistics] = None, solve: bool = True, num_examples: Optional[int] = None,
                ranks: Optional[Mapping[str, int]] = None, keep_statistics: bool = False,
                loss_fn: Optional[LossFn] = None, options: Optional[RunOptions] = None) -> LoraDAResult:
    """One LoRA-DA run: statistics pass(es) and solve. Returns ``{module_name: LoraFactors}`` with
    ``.reports``, ``.info`` (the memory plan, the time of each phase, example and token counts) and
    ``.statistics`` (the statistics, when ``keep_statistics``, ``stats``, a statistics file or
    ``solve=False``; else ``None``).

    Every check (settings, ranks, ``population_size``, the model, the examples) is made before any
    forward (:func:`prepare_run`).

    Args:
        model: a Hugging Face model (or any module whose forward takes ``input_ids``, ``attention_mask``
            and returns logits), not compiled by ``torch.compile``; its parameters, flags and modes are
            restored on exit.
        examples: dicts with ``input_ids`` (and optionally ``attention_mask``, ``labels``), 1-D or 2-D,
            or a ``DataLoader`` of either. Ignored when ``stats`` is given.
        cfg: the :class:`LoraDAConfig`; ``cfg.target_modules`` selects the modules and
            ``cfg.layers_per_pass`` streams the model through several passes when set.
        progress: progress bars (rank 0 only).
        stats: precomputed statistics: the pass is skipped.
        solve: ``False`` stops after the statistics (``.statistics`` holds them; rank and
            ``population_size`` are then not needed).
        num_examples: use only the first ``num_examples`` examples (rows of 2-D batches count one each).
        ranks: ``{module name: rank}`` for modules whose rank is not ``cfg.rank`` (PEFT's ``rank_pattern``).
        keep_statistics: return the statistics with the factors.
        loss_fn: ``(model, batch) -> per-example losses [B]`` replacing the causal-LM mean token loss
            (any head, any objective; :class:`~lora_da_fast.statistics.StatisticsPass`). ``batch`` is a
            dict of tensors on the model's device: ``input_ids``, ``attention_mask`` (right padding),
            ``labels`` and the examples' other fields (:meth:`lora_da_fast.data.Batch.inputs`).
        options: :class:`RunOptions` (checkpoint and resume, a statistics file, log lines, status).
    """
    opts = options if options is not None else RunOptions()
    if stats is not None:
        return _solve_given(model, stats, cfg, ranks, solve, progress, opts)
    run = prepare_run(model, examples, cfg, num_examples=num_examples, ranks=ranks, loss_fn=loss_fn, solve=solve,
                      describe=opts.describe)
    return execute(run, solve=solve, progress=progress, keep_statistics=keep_statistics, options=opts)


def collect_statistics(model: nn.Module, examples: Iterable, cfg: LoraDAConfig,
                       progress: bool = True, num_examples: Optional[int] = None,
                       checkpoint: Optional[str] = None, checkpoint_every: int = 64,
                       loss_fn: Optional[LossFn] = None) -> FisherStatistics:
    """One forward+backward pass over ``examples`` (one per slice with ``cfg.layers_per_pass``);
    returns the :class:`FisherStatistics` (on the CPU when there were several slices).

    ``examples``: dicts with ``input_ids`` (and optionally ``attention_mask``, ``labels``), 1-D examples
    or 2-D padded batches, or a ``DataLoader`` of either. Examples without a label token are skipped and
    counted. The model's parameters, ``requires_grad`` flags and train/eval modes are restored on exit.
    Under an initialised ``torch.distributed`` process group, each rank takes its shard of the examples
    and the sums are all-reduced. ``num_examples``: use only the first ``num_examples`` examples (rows of
    2-D batches count one each), e.g. of an endless iterator; ``None``: all of them.

    ``checkpoint``: a file (``FILE.rankR`` under torch.distributed) that receives the pass's state every
    ``checkpoint_every`` examples (atomic writes, with a fingerprint of model, data, config and code
    version); if it exists when the pass starts, the pass resumes from it (bit-identical to an
    uninterrupted run) or refuses a mismatch. It is deleted once the pass completes.

    ``loss_fn``: ``(model, batch) -> per-example losses [B]`` instead of the causal-LM loss (see
    :func:`run_lora_da`).
    """
    opts = RunOptions(checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    return run_lora_da(model, examples, cfg, progress=progress, solve=False, num_examples=num_examples,
                       loss_fn=loss_fn, options=opts).statistics
