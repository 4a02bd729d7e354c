"""The engine: one LoRA-DA run, used by every entry point (the Python API, ``initialize_lora_da``, the
CLI and the benchmarks), so that an option honoured by one is honoured by all.

    plan slices from memory -> for each slice: statistics pass -> reduce over ranks -> solve
                               (checkpointed and resumable; optional statistics file)

- :func:`run_lora_da` runs it and returns the factors (a :class:`~lora_da_fast.results.LoraDAResult`
  with ``.reports``, ``.info`` and, when kept, ``.statistics``).
- :func:`collect_statistics` is the same run without the solve; :func:`solve_lora_da` the solve alone
  (spread over the ranks of a process group, local otherwise).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from . import checkpoint as ckpt
from . import comm
from .config import LoraDAConfig
from .data import Example, prepare_examples
from .errors import ConfigError, DataError, TargetError
from .fisher import FisherStatistics
from .plan import PeakMemory, plan_slices
from .results import LoraDAResult, check_factors
from .solve import solve_local, solve_sharded
from .statistics import StatisticsPass, reduce_over_ranks, run_pass
from .statistics.statistics_pass import LossFn
from .targets import find_target_modules, linear_shape
from .validate import check_examples_fit, check_model_loaded, example_ids


def solve_lora_da(stats: FisherStatistics, cfg: LoraDAConfig, progress: bool = False) -> LoraDAResult:
    """Solve every module of ``stats``: ``{module_name: LoraFactors(lora_A, lora_B)}`` (+ ``.reports``).

    ``cfg.solver``: ``"reference"`` (dense float64 per module), ``"batched"`` or ``"auto"`` (batched).
    Under an initialised ``torch.distributed`` process group of several ranks, every rank must call it
    with the same statistics; the modules are spread over the ranks and every rank gets every factor.
    Non-finite or zero factors are a :class:`~lora_da_fast.errors.NumericalError` naming the module and
    the setting that likely caused them (:func:`~lora_da_fast.results.check_factors`).
    """
    solve = solve_sharded if comm.is_active() else solve_local
    result = solve(stats, cfg, progress=progress)
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


def _check_num_examples(num_examples) -> None:
    if num_examples is not None and (isinstance(num_examples, bool) or not isinstance(num_examples, int)
                                     or num_examples < 1):
        raise ConfigError(f"num_examples must be a positive integer or None, got {num_examples!r}")


def fingerprint(model: nn.Module, examples: Iterable, cfg: LoraDAConfig,
                num_examples: Optional[int] = None, loss_fn: Optional[LossFn] = None) -> Dict[str, str]:
    """The fingerprint parts (:func:`lora_da_fast.checkpoint.fingerprint_parts`) of the statistics pass
    that :func:`run_lora_da` would make: for a caller that checks a statistics file against it first
    and then passes it to the run (``fingerprint=``), so the weights are checksummed once."""
    _check_num_examples(num_examples)
    targets = find_target_modules(model, cfg.target_modules)
    exs, _, slices, _ = _prepare(model, examples, cfg, num_examples, targets)
    return ckpt.fingerprint_parts(model, cfg, targets, exs, slices, loss_fn=loss_fn)


def _prepare(model: nn.Module, examples: Iterable, cfg: LoraDAConfig, num_examples: Optional[int],
             targets: Dict[str, nn.Module]) -> Tuple[List[Example], int, List[List[str]], dict]:
    """The examples of a pass (``prepare_examples``), checked against the model (token ids and positions it
    has: before any forward, the plan's probe included), and the memory plan: ``(examples, skipped,
    slices, plan)``."""
    exs, skipped = prepare_examples(examples, cfg.sort_by_length, num_examples)
    check_model_loaded(model)
    check_examples_fit(model, example_ids(exs))
    slices, plan = plan_slices(targets, cfg, model, exs)
    return exs, skipped, slices, plan


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_lora_da(model: nn.Module, examples: Iterable, cfg: LoraDAConfig, *, progress: bool = True,
                log=None, stats: Optional[FisherStatistics] = None, solve: bool = True,
                num_examples: Optional[int] = None, checkpoint: Optional[str] = None, checkpoint_every: int = 64,
                fingerprint: Optional[Dict[str, str]] = None, statistics_file: Optional[str] = None,
                statistics_meta: Optional[dict] = None, keep_statistics: bool = False, status: Optional[dict] = None,
                loss_fn: Optional[LossFn] = None) -> LoraDAResult:
    """One LoRA-DA run: statistics pass(es) and solve. Returns ``{module_name: LoraFactors}`` with
    ``.reports``, ``.info`` (the memory plan, the time of each phase, example and token counts) and
    ``.statistics`` (the statistics, when ``keep_statistics``, ``statistics_file``, ``stats`` or
    ``solve=False``; else ``None``).

    Args:
        model: a Hugging Face model (or any module whose forward takes ``input_ids``, ``attention_mask``
            and returns logits); its parameters, flags and modes are restored on exit.
        examples: dicts with ``input_ids`` (and optionally ``attention_mask``, ``labels``), 1-D or 2-D,
            or a ``DataLoader`` of either. Ignored when ``stats`` is given.
        cfg: the :class:`LoraDAConfig`; ``cfg.target_modules`` selects the modules and
            ``cfg.layers_per_pass`` streams the model through several passes when set.
        progress: progress bars (rank 0 only); ``log``: a function receiving one-line messages.
        stats: precomputed statistics: the pass is skipped.
        solve: ``False`` stops after the statistics (``.statistics`` holds them).
        num_examples: use only the first ``num_examples`` examples (rows of 2-D batches count one each).
        checkpoint: a file (``FILE.rankR`` under torch.distributed) receiving the pass's state every
            ``checkpoint_every`` examples; if it exists at the start the run resumes from it
            (bit-identical) or refuses a mismatch naming what differs. Removed once the run is done.
        fingerprint: the parts from :func:`fingerprint`, if already computed.
        statistics_file: where to save the statistics (rank 0, atomically) once the passes are done,
            before the (last) solve: a failed solve can be rerun from it; ``statistics_meta`` is added
            to the file's ``meta``.
        loss_fn: ``(model, batch) -> per-example losses [B]`` replacing the causal-LM mean token loss
            (any head, any objective; :class:`~lora_da_fast.statistics.StatisticsPass`). ``batch`` is a
            dict of tensors on the model's device: ``input_ids``, ``attention_mask`` (right padding),
            ``labels`` and the examples' other fields (:meth:`lora_da_fast.data.Batch.inputs`).
        status: a dict the run fills as it goes (``checkpoint``: this rank's checkpoint file,
            ``examples``: this rank's examples, ``phase``: "statistics" or "solve"), for a caller that
            explains a failure.
    """
    if not isinstance(cfg, LoraDAConfig):
        raise ConfigError("cfg must be a LoraDAConfig")
    _check_num_examples(num_examples)
    status = status if status is not None else {}
    say = log if (log is not None and progress and comm.is_main()) else None
    t_start = time.perf_counter()
    info: Dict[str, object] = {"statistics_s": 0.0, "solve_s": 0.0, "fingerprint_s": 0.0}
    targets = find_target_modules(model, cfg.target_modules)
    result = LoraDAResult()
    if stats is not None:
        stats = select_statistics(stats, list(targets), model, cfg.token_mask)
        if solve:
            t0 = time.perf_counter()
            status["phase"] = "solve"
            result = solve_lora_da(stats, cfg, progress=progress)
            info["solve_s"] = time.perf_counter() - t0
        result.statistics = stats
        info.update(examples=stats.num_examples, tokens=stats.num_tokens, skipped=stats.num_skipped, plan=None,
                    total_s=time.perf_counter() - t_start)
        result.info = info
        return result

    exs, skipped, slices, plan = _prepare(model, examples, cfg, num_examples, targets)
    total_tokens = sum(map(len, exs))  # the whole set's (every rank's): which groups keep their tokens
    info["plan"] = plan
    peak = PeakMemory(next(iter(targets.values())).weight.device)
    if say and plan["passes"] > 1:
        say(f"plan: {len(targets)} target modules in {plan['layers']} layers, statistics "
            f"{plan['statistics_gb']:.2f} GB fp32; {plan['passes']} passes of {plan['layers_per_pass']} layers")
    mine: List[Example] = list(comm.shard(exs)) if comm.is_active() else exs
    status["examples"] = len(mine)

    path, parts, resumed = None, None, None
    if checkpoint is not None:
        t0 = time.perf_counter()
        path = f"{checkpoint}.rank{comm.rank()}" if comm.is_active() else checkpoint
        status["checkpoint"] = path
        parts = (dict(fingerprint) if fingerprint is not None
                 else ckpt.fingerprint_parts(model, cfg, targets, exs, slices, loss_fn=loss_fn))
        if comm.is_active():  # each rank checkpoints its own shard: resuming needs the same number of ranks
            parts["data"] = ckpt.data_digest(mine)
        info["fingerprint_s"] = time.perf_counter() - t0
        try:
            resumed = ckpt.check(path, parts)
        except DataError as exc:
            hint = (" (under torchrun each rank checkpoints its own shard of the examples: resume with the "
                    "same number of ranks)" if comm.is_active() else "")
            raise DataError(f"{exc}{hint}") from None
        if say:
            if resumed is not None:
                say(f"resuming the statistics pass from {path}: {resumed['done']} of {len(mine)} examples already "
                    f"done" + (f" in pass {resumed['slice'] + 1} of {len(slices)}" if len(slices) > 1 else ""))
            else:
                say(f"statistics pass checkpointed every {checkpoint_every} examples in {path} "
                    "(after Ctrl-C or a crash, rerun the same command to resume)")
    info["resumed_from_examples"] = resumed["done"] if resumed is not None else 0

    keep = keep_statistics or statistics_file is not None or not solve or path is not None
    kept: Optional[FisherStatistics] = ckpt.load_finished(path) if resumed is not None else None
    start_slice = resumed["slice"] if resumed is not None else 0
    show = progress and comm.is_main()
    final: Optional[FisherStatistics] = None
    for i, names in enumerate(slices):
        last = i == len(slices) - 1
        sub = {n: targets[n] for n in names}
        if i < start_slice:  # finished before the checkpoint: its statistics are in `kept`
            part = kept.subset(names).to(next(iter(sub.values())).weight.device)
        else:
            t0 = time.perf_counter()
            status["phase"] = "statistics"
            with comm.guard("the statistics pass"), StatisticsPass(model, cfg, targets=sub, loss_fn=loss_fn,
                                                                       probe=exs[0] if exs else None,
                                                                       total_tokens=total_tokens) as sp:
                done = 0
                if resumed is not None and i == start_slice and resumed["done"] > 0:
                    done = ckpt.resume(sp, path)
                on_batch = ckpt.saver(sp, path, parts, checkpoint_every, i, kept) if path else None
                desc = "statistics" if len(slices) == 1 else f"statistics {i + 1}/{len(slices)}"
                run_pass(sp, mine, show, desc=desc, done=done, on_batch=on_batch)
            reduce_over_ranks(sp)
            part = sp.finalize(skipped)
            del sp
            _sync()
            info["statistics_s"] += time.perf_counter() - t0
            if keep:
                # statistics of a slice wait on the host while the next slice's pass runs on the device
                held = part if len(slices) == 1 else part.to("cpu")
                kept = held if kept is None else kept.merge(held)
                if path is not None and not last:  # the next slice starts from this point after a crash
                    ckpt.write(path, None, parts, i + 1, 0, kept)
        if last:
            final = kept if keep else part
            if statistics_file is not None:
                final.meta = {**final.meta, **(statistics_meta or {})}
                with comm.step("writing the statistics file"):
                    if comm.is_main():
                        final.save(statistics_file)
                if path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
        if solve:
            t0 = time.perf_counter()
            status["phase"] = "solve"
            got = solve_lora_da(part, cfg, progress=progress)
            result.update(got)
            result.reports.update(got.reports)
            info["solve_s"] += time.perf_counter() - t0
        del part
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    # the factors in module order whatever the slices
    result = LoraDAResult({n: result[n] for n in targets if n in result},
                          {n: result.reports[n] for n in targets if n in result.reports})
    result.statistics = final if keep else None
    info.update(examples=final.num_examples, tokens=final.num_tokens, skipped=final.num_skipped,
                total_s=time.perf_counter() - t_start, memory=peak.report(plan))
    result.info = info
    return result


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
    return run_lora_da(model, examples, cfg, progress=progress, solve=False, num_examples=num_examples,
                       checkpoint=checkpoint, checkpoint_every=checkpoint_every, loss_fn=loss_fn).statistics
