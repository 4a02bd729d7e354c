"""``lora-da-fast init``: load a model and calibration data, run the engine, write a PEFT adapter."""
from __future__ import annotations

import os
import random
import sys
import warnings
from typing import List, Optional

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from .. import comm
from ..config import LoraDAConfig
from ..data import IGNORE_INDEX
from ..engine import RunOptions, execute, prepare_run, run_lora_da, select_statistics
from ..errors import ConfigError, DataError, LoraDAError, TargetError
from ..peft_integration import apply_lora_da, resolve_lora_da_config
from ..targets import lora_target_names, parse_target_modules
from ..version import __version__
from .args import PROG
from .builtins import check_model_folder, load_model, load_records, records_to_examples
from .output import check_out, other_entries, remove_stale_temporaries, write_adapter
from .report import Clock, lora_scaling, peak_memory, scaling
from .stats_cache import (CACHE_PARTS, PARTIAL_SUFFIX, check_stats_cache, load_stats_cache,
                          remove_stale_checkpoints, resolve_stats_cache)


class RunState:
    """What ``main`` needs to explain a failure of :func:`run_init` (filled in as the run goes)."""

    def __init__(self):
        self.clock: Optional[Clock] = None
        self.status: dict = {}  # the engine's: "checkpoint" (this rank's file), "examples" (this rank's)
        self.data_lines: Optional[List[int]] = None  # --data line of each calibration example
        self.report: Optional[dict] = None  # the report, once complete
        self.adapter: Optional[str] = None  # --out, once the complete adapter is there (set with interrupts held)


def subsample_indices(total: int, n: int, seed: int = 0) -> List[int]:
    """Indices of a fixed random subset of ``n`` of ``total`` items, in order (all if ``n >= total``)."""
    if n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))


def where(indices: List[int], lines: Optional[List[int]]) -> str:
    """Where calibration examples come from: ``--data`` lines when known."""
    shown = indices[:5]
    more = " ..." if len(indices) > 5 else ""
    if lines is not None:
        return "--data line " + ", ".join(str(lines[i]) for i in shown) + more
    return "calibration example " + ", ".join(map(str, shown)) + more


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _check_out_everywhere(out: str, overwrite: bool, inputs: dict) -> None:
    """Rank 0 checks ``--out``; every rank gets the verdict."""
    problem = None
    if comm.is_main():
        try:
            check_out(out, overwrite, inputs)
        except LoraDAError as exc:
            problem = str(exc)
    problem = comm.broadcast_from_main(problem)
    if problem:
        raise ConfigError(problem)


def _lora_da_config(args, population) -> LoraDAConfig:
    try:
        return LoraDAConfig(rank=args.rank, population_size=population, beta=args.beta, gamma=args.gamma,
                            damping=args.damping, max_damping=args.max_damping, seed=args.seed,
                            token_mask=args.token_mask, batch_size=args.batch_size,
                            layers_per_pass=args.layers_per_pass, keep_tokens=args.keep_tokens,
                            sensitivity=args.sensitivity)
    except ConfigError as exc:
        raise ConfigError(f"invalid LoRA-DA settings: {exc}") from None


def _inputs(args, stats_cache: Optional[str]) -> dict:
    """The run's own input paths (``{option: path}``), which ``--out`` must not hold."""
    out = {}
    if os.path.exists(args.data):
        out["--data"] = args.data
    if os.path.isdir(args.model):
        out["--model"] = args.model
    if stats_cache:
        out["--stats-cache"] = stats_cache
        out["--stats-cache checkpoint"] = stats_cache + PARTIAL_SUFFIX
    return out


def _check_scaling(args) -> None:
    """PEFT multiplies the adapter's output by its scaling in the adapter's dtype (float32): beyond float32's
    range every forward is inf, below its smallest normal number the adapter does nothing."""
    s = lora_scaling(args.lora_alpha, args.rank, args.rslora)
    f32 = torch.finfo(torch.float32)
    if not f32.tiny <= s <= f32.max:
        rule = "lora_alpha / sqrt(r)" if args.rslora else "lora_alpha / r"
        raise ConfigError(f"--lora-alpha {args.lora_alpha:g} gives a LoRA scaling of {s:.3g} ({rule}), outside "
                          f"float32's range ({f32.tiny:.3g} to {f32.max:.3g}): the adapter's output would be "
                          f"{'inf' if s > f32.max else 'zero'}; use a --lora-alpha of the order of --rank")


def _note_kept(out: str, say) -> None:
    """With ``--overwrite``: name what ``--out`` holds besides an adapter (kept as it is)."""
    try:
        kept = other_entries(out) if os.path.isdir(out) else []
    except OSError:
        return
    if kept:
        say(f"note: --out {out} also holds {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}: kept as "
            "they are (only the adapter's files are replaced)")


def _check_device(device: str) -> None:
    """``--device meta`` (or another device that holds no data) is refused before any work."""
    kind = str(device).split(":")[0].strip().lower()
    if kind == "meta":
        raise ConfigError("--device meta holds no data (the model could not run): use auto, cpu, cuda or cuda:N")


def run_init(args, state: Optional[RunState] = None) -> dict:
    """The ``init`` command; returns the report (written once, with the adapter, to ``DIR/lora_da_report.json``)."""
    state = state if state is not None else RunState()
    clock = state.clock = Clock()
    show = not args.quiet and comm.is_main()  # under torchrun, rank 0 alone talks and writes
    if args.quiet:
        _quiet_libraries()
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if show else None

    # Everything cheap is checked before loading data or a model.
    out = os.path.abspath(args.out)
    stats_cache = resolve_stats_cache(os.path.abspath(args.stats_cache)) if args.stats_cache else None
    _check_device(args.device)
    _check_out_everywhere(out, args.overwrite, _inputs(args, stats_cache))
    if say and args.overwrite:
        _note_kept(out, say)
    targets = parse_target_modules(args.target_modules)
    if args.max_length < 2:
        raise ConfigError("--max-length must be at least 2 (one token has no next-token target)")
    if stats_cache:
        check_stats_cache(stats_cache, args.data)
    if comm.is_main():
        remove_stale_temporaries(out, stats_cache, say)
    _lora_da_config(args, args.population_size)
    _check_scaling(args)
    check_model_folder(args.model, args.trust_remote_code)

    with clock.phase("load_data"):
        records, lines = load_records(args.data, limit_mb=args.max_data_mb)
        keep = subsample_indices(len(records), args.num_samples)
        chosen = [records[i] for i in keep]
        state.data_lines = [lines[i] for i in keep] if lines is not None else None
    cfg = _lora_da_config(args, args.population_size or len(records))
    try:
        lora_config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora,
                                 target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid LoRA settings: {exc}") from None

    with clock.phase("load_model"):
        if say:
            say(f"loading {args.model} ...")
        model, tokenizer, model_folder = load_model(args.model, args.dtype, args.device, log=say,
                                                    device_map=args.device_map,
                                                    trust_remote_code=args.trust_remote_code)
    device = next(model.parameters()).device
    try:
        names = lora_target_names(model, lora_config)
    except TargetError as exc:
        text = str(exc)
        if "matches no module" in text and "name(s)" not in text:  # PEFT's names are not what the user typed
            text = f"--target-modules {args.target_modules!r} matches no module; " + text.split("; ", 1)[-1]
        raise TargetError(text) from None
    cfg = resolve_lora_da_config(lora_config, cfg, names)

    with clock.phase("tokenize"):
        examples = records_to_examples(tokenizer, tqdm(chosen, desc="tokenize", unit="ex", disable=not show,
                                                       dynamic_ncols=True), args.max_length,
                                       chat_template=args.chat_template)
    empty = [i for i, e in enumerate(examples) if not bool((e["labels"][1:] != IGNORE_INDEX).any())]
    if len(empty) == len(examples):
        raise DataError(f"none of the {len(examples)} calibration examples has a label token (empty texts, or "
                        f"prompts that fill --max-length {args.max_length}): nothing to gather statistics from")
    if empty and say:
        say(f"{len(empty)} of {len(examples)} examples have no label token (empty, or the prompt fills "
            f"--max-length): skipped ({where(empty, state.data_lines)})")
    # One prepared run: every check of the settings, the model and the examples, before any forward.
    opts = RunOptions(log=say, status=state.status, describe=lambda i: where([i], state.data_lines))
    run = prepare_run(model, examples, cfg, describe=opts.describe)

    stats, verified = None, None
    if stats_cache:
        with clock.phase("fingerprint"):  # checksums of the weights and the data: once, for both uses
            parts = run.fingerprint()
        want = {k: parts[k] for k in CACHE_PARTS}
        # rank 0 decides (every rank must take the same branch); each rank then reads the file itself
        if comm.broadcast_from_main(os.path.isfile(stats_cache)):
            with clock.phase("load_statistics"), comm.step("loading --stats-cache"):
                if not os.path.isfile(stats_cache):
                    raise ConfigError(f"--stats-cache {stats_cache}: rank 0 sees this file, rank "
                                      f"{comm.rank()} does not (the ranks need a shared filesystem)")
                stats, verified = load_stats_cache(stats_cache, want, say)
                try:
                    stats = select_statistics(stats, names, model, cfg.token_mask)
                except (TargetError, ConfigError) as exc:
                    raise type(exc)(f"--stats-cache {stats_cache}: {exc}; delete it or give another file") from None
            if say:
                say(f"statistics loaded from {stats_cache}")
            if comm.is_main():  # a run stopped between saving FILE and removing its checkpoint left one
                remove_stale_checkpoints(stats_cache)
        else:
            opts.checkpoint = stats_cache + PARTIAL_SUFFIX
            opts.checkpoint_every = args.checkpoint_every
            opts.statistics_file = stats_cache
            opts.statistics_meta = {
                "fingerprint": {"parts": want},
                "cli": {"model": args.model, "data": args.data, "num_samples": args.num_samples,
                        "max_length": args.max_length, "token_mask": args.token_mask, "dtype": args.dtype}}

    clock.current = "the statistics pass and the solve"
    if stats is not None:
        result = run_lora_da(model, None, cfg, progress=show, stats=stats, options=opts)
    else:
        result = execute(run, progress=show, options=opts)
    info = result.info
    for phase in ("fingerprint", "statistics", "solve"):
        if info.get(f"{phase}_s"):
            clock.wall[phase] = clock.wall.get(phase, 0.0) + info[f"{phase}_s"]
    if opts.statistics_file is not None and comm.is_main():
        if say:
            say(f"statistics saved to {stats_cache}")
        remove_stale_checkpoints(stats_cache)
    if not comm.is_main():
        return {}  # rank 0 alone builds and writes the adapter

    with clock.phase("adapter"):
        peft_model = get_peft_model(model, lora_config)
        apply_lora_da(peft_model, result)
    report = {
        "lora_da_fast_version": __version__,
        "command": [PROG] + list(getattr(args, "argv", []) or []),
        "model": args.model,
        "model_folder": model_folder,
        "model_class": type(model).__name__,
        "data": args.data,
        "num_records": len(records),
        "num_samples": len(chosen),
        "num_examples": info["examples"],
        "num_skipped": info["skipped"],
        "num_tokens": info["tokens"],
        "max_length": args.max_length,
        "statistics_cache": {"path": stats_cache, "loaded": stats is not None, "fingerprint_checked": verified,
                             "resumed_from_examples": info.get("resumed_from_examples", 0),
                             "checkpoint_every": args.checkpoint_every} if stats_cache else None,
        "lora_config": {"r": lora_config.r, "lora_alpha": lora_config.lora_alpha, "use_rslora": lora_config.use_rslora,
                        "target_modules": targets, "scaling": scaling(lora_config)},
        "lora_da_config": cfg.to_dict(),
        "plan": info.get("plan"),
        "device": str(device),
        "world_size": comm.world_size(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "adapter": out,
        "timings_s": clock.wall,
        "cpu_time_s": clock.cpu,
        "peak_memory": peak_memory(device),
        "wall_time_s": clock.total(),
        "modules": {name: dict(rep.to_dict(), rank=int(result[name].lora_A.shape[0]))
                    for name, rep in result.reports.items()},
    }
    stop_save = clock.begin("save")

    def saved() -> None:  # the weights are written: the report, written next, closes with the save's time
        stop_save()
        report["wall_time_s"] = clock.total()
        state.report = report

    def claimed() -> None:  # with interrupts held: main's message after an interrupt tells the truth
        state.adapter = out

    write_adapter(peft_model, report, out, overwrite=args.overwrite, on_saved=saved, on_claimed=claimed)
    return report

