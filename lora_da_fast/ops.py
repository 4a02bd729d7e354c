"""Triton launchers of the statistics ops, same names, signatures and semantics as :mod:`.reference`.

- :func:`sym_accumulate` ``Z += X_S^T X_S`` (only the upper triangle of ``Z``, diagonal included, is
  updated; mirror once at the end with :func:`.reference.symmetrize_upper`).
- :func:`grad_stats` ``G += (w dY)_{grad}^T X_{grad}``, ``y += sum_{stat} (w dY)^2`` and the per-example
  sums of ``sequence_lowrank``, in one launch.

Inputs may be bf16, fp16 or fp32 (fp32 products are exact fp32 unless :data:`FP32_INPUT_PRECISION` is
set to ``"tf32"``); float64 inputs take the reference path. On a machine without CUDA the kernels run
under the Triton interpreter, which must be enabled (``TRITON_INTERPRET=1``) before triton is imported;
nothing here touches CUDA at import time (triton and the kernels are imported at the first call).

Autotuning and accumulators: the kernels add into ``Z``/``G``/``y``/``seq_sums``, which already hold the
sums of earlier batches, so ``reset_to_zero`` would be wrong and letting every trial add would
multiply the batch. The autotuners are given ``restore_value`` for every accumulator: Triton snapshots
them before each trial launch and copies the snapshot back after it, so the real launch that follows
sees exactly the accumulators it was given. The snapshot costs one copy per trial, only while a new
shape is being tuned (key: the matrix dimensions and dtypes, not the token count, which changes with
every batch).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from . import reference

__all__ = ["sym_accumulate", "grad_stats", "FP32_INPUT_PRECISION"]

#: Products of fp32 inputs: ``"ieee"`` (exact fp32, the default) or ``"tf32"`` (tensor cores, about
#: 1e-3 relative error: an explicit opt-in, see ``tests/tolerances.py`` ``accumulate_tf32``).
FP32_INPUT_PRECISION = "ieee"

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Per-example sums are accumulated in registers as a [SEQ_BLOCK, BLOCK_M] tile: beyond this many
# sequences per batch the launcher falls back to torch's index_add_ for them.
_MAX_SEQ_BLOCK = 64
# Each token split should run at least this many BLOCK_K steps, so that the pipeline fills.
_MIN_K_STEPS_PER_SPLIT = 4
_MAX_SPLITS = 64
# Cost of one program's prologue/epilogue, in BLOCK_K steps (pipeline fill, tile read-add-write or
# atomics): what a split must save to be worth it.
_PROGRAM_OVERHEAD_STEPS = 4
_SPLIT_MIN_GAIN = 0.05
# Stand-in for the multiprocessor count under the CPU interpreter: small, so that tests see splits.
_INTERPRETER_SMS = 4


# --------------------------------------------------------------------------------------------------
# Launch heuristics


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def _num_splits(n_tiles: int, n_rows: int, block_k: int, num_sms: int) -> int:
    """Token splits (grid axis 1) minimising ``waves x (steps per split + overhead)``.

    Without splits, a small ``d`` gives fewer tiles than multiprocessors; splitting the tokens fills
    them, at the price of atomics and one prologue/epilogue per split. More splits must gain at least
    ``_SPLIT_MIN_GAIN`` in this model (atomics traffic is not in it). The returned count never leaves
    a split empty.
    """
    steps = -(-n_rows // block_k)
    best, best_cost = 1, None
    for s in range(1, min(_MAX_SPLITS, max(1, steps // _MIN_K_STEPS_PER_SPLIT)) + 1):
        per = -(-steps // s)
        s_eff = -(-steps // per)  # the kernel gives `per` steps to each split: drop empty ones
        waves = -(-(n_tiles * s_eff) // num_sms)
        cost = waves * (per + _PROGRAM_OVERHEAD_STEPS)
        if best_cost is None or cost < best_cost * (1.0 - _SPLIT_MIN_GAIN):
            best, best_cost = s_eff, cost
    return best


def _triangle_programs(d: int, block: int, group: int) -> int:
    """Programs of the upper-triangle tile grid of ``sym_accumulate`` (see the kernel's docstring)."""
    n = -(-d // block)
    g = min(n, group)
    ns = -(-n // g)
    return ns * (ns + 1) // 2 * g * g


def _seq_block(num_seqs: int) -> int:
    return max(16, _next_power_of_2(num_seqs))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# --------------------------------------------------------------------------------------------------
# Kernels (imported and autotuned at the first call)


def _prune_by_dtype(half_configs, fp32_configs, arg):
    def prune(configs, named_args, **kwargs):
        wanted = fp32_configs if named_args[arg].dtype == torch.float32 else half_configs
        return [c for c in configs if c in wanted]
    return prune


def _autotune() -> bool:
    """``LORA_DA_FAST_AUTOTUNE=0`` launches the first config of each list without tuning (faster
    start-up: fewer compilations, e.g. for tests); read at each call."""
    return os.environ.get("LORA_DA_FAST_AUTOTUNE", "1") != "0"


def _kernels():
    return _build_kernels(_interpreted(), _autotune())


@functools.lru_cache(maxsize=None)
def _build_kernels(interpreted: bool, autotune: bool):
    import triton

    from .kernels import grad_stats as gk
    from .kernels import sym_accumulate as sk

    def tuned(module, fn, key, restore, dtype_arg):
        if interpreted:
            return triton.autotune(configs=module.INTERPRETER_CONFIGS, key=key)(fn)
        half, fp32 = (module.HALF_CONFIGS, module.FP32_CONFIGS) if autotune else \
            (module.HALF_CONFIGS[:1], module.FP32_CONFIGS[:1])
        return triton.autotune(
            configs=half + fp32, key=key, restore_value=restore,
            prune_configs_by={"early_config_prune": _prune_by_dtype(half, fp32, dtype_arg)})(fn)

    sym = tuned(sk, sk._sym_accumulate_kernel, ["D"], ["z_ptr"], "x_ptr")
    grad = tuned(gk, gk._grad_stats_kernel, ["D_OUT", "D_IN"], ["g_ptr", "y_ptr", "seq_ptr"], "x_ptr")
    return sym, grad


# --------------------------------------------------------------------------------------------------
# Argument checks


def _check_rows(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [tokens, features], got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (t.dtype.is_floating_point and t.dtype in _KERNEL_DTYPES + (torch.float64,)):
        raise TypeError(f"{name} must be bf16, fp16, fp32 or fp64, got {t.dtype}")


def _check_accumulator(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 accumulator, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")


def _check_vector(name: str, t: Optional[torch.Tensor], n: int, device: torch.device, kind: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D tensor of {n} rows, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    if kind == "mask" and t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool mask, got {t.dtype}")
    if kind == "float" and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if kind == "index" and (t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex()):
        raise TypeError(f"{name} must hold integers, got {t.dtype}")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any strides, but read rows as contiguous vectors: only a transposed-like
    # layout (feature stride != 1) is worth a copy.
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    # The same bytes seen as uint8 (no copy): the kernels prefetch mask bytes one step ahead, which
    # Triton's pipeliner undoes for a bool (i1) pointer.
    return mask.contiguous().view(torch.uint8)


def _check_runnable(device: torch.device) -> None:
    if device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {device}); on a CPU use backend='torch', or set "
            "TRITON_INTERPRET=1 before triton is first imported to run them under the interpreter (tests)")


def _device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()


def _input_precision(dtype: torch.dtype) -> Optional[str]:
    if dtype != torch.float32:
        return None  # 16-bit products: tensor cores, exact in fp32 whatever the setting
    if FP32_INPUT_PRECISION not in ("ieee", "tf32"):
        raise ValueError(f"FP32_INPUT_PRECISION must be 'ieee' or 'tf32', got {FP32_INPUT_PRECISION!r}")
    return FP32_INPUT_PRECISION


# --------------------------------------------------------------------------------------------------
# Launchers


def sym_accumulate(Z: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
    """``Z += X_S^T X_S`` with ``X_S = x[mask]``, upper triangle only (diagonal included).

    ``Z``: fp32 ``[d_in, d_in]`` contiguous; ``x``: ``[N, d_in]`` bf16/fp16/fp32 (fp64 goes to the
    reference); ``mask``: bool ``[N]`` or ``None`` (every row). The strict lower triangle of ``Z`` outside
    the diagonal tiles is neither read nor written.
    """
    _check_rows("x", x)
    n, d = x.shape
    _check_accumulator("Z", Z, (d, d), x.device)
    _check_vector("mask", mask, n, x.device, "mask")
    if n == 0 or d == 0:
        return
    if x.dtype == torch.float64:
        reference.sym_accumulate(Z, x, mask)
        return
    _check_runnable(x.device)
    x = _row_major(x)
    kernel, _ = _kernels()
    sms = _num_sms(x.device)

    def grid(meta):
        block = meta["BLOCK"]
        n_tiles = -(-d // block)
        real_tiles = n_tiles * (n_tiles + 1) // 2
        return (_triangle_programs(d, block, meta["GROUP"]),
                _num_splits(real_tiles, n, meta["BLOCK_K"], sms))

    with _device_guard(x.device):
        kernel[grid](
            Z, Z.stride(0), Z.stride(1),
            x, x.stride(0), x.stride(1),
            _mask_bytes(mask) if mask is not None else x,  # never read without HAS_MASK
            n, d,
            HAS_MASK=mask is not None,
            INPUT_PRECISION=_input_precision(x.dtype),
        )


def grad_stats(
    G: torch.Tensor,
    y: torch.Tensor,
    dy: torch.Tensor,
    x: torch.Tensor,
    grad_mask: Optional[torch.Tensor] = None,
    stat_mask: Optional[torch.Tensor] = None,
    row_weight: Optional[torch.Tensor] = None,
    seq_sums: Optional[torch.Tensor] = None,
    seq_ids: Optional[torch.Tensor] = None,
) -> None:
    """Gradient statistics of one module for one batch, in place, in one launch.

    - ``G += (w * dy)_{grad_mask}^T x_{grad_mask}`` (fp32 ``[d_out, d_in]``);
    - ``y += sum_{t in stat_mask} (w_t * dy_t) ** 2`` (fp32 ``[d_out]``);
    - if ``seq_sums`` (fp32 ``[num_seqs, d_out]``) is given: ``seq_sums[seq_ids[t]] += w_t * dy_t`` for
      ``t`` in ``stat_mask``. ``seq_ids`` must lie in ``[0, num_seqs)`` (not checked: that would need a
      device sync; rows outside are dropped). With more than 64 sequences per batch these sums are
      taken by torch (``index_add_``) after the kernel.

    ``stat_mask`` defaults to ``grad_mask``; ``row_weight`` ``w`` (``[N]``) defaults to 1. ``dy`` and
    ``x`` of different dtypes are both promoted to their common dtype (a copy).
    """
    _check_rows("dy", dy)
    _check_rows("x", x)
    n, d_out = dy.shape
    if x.shape[0] != n:
        raise ValueError(f"dy has {n} rows but x has {x.shape[0]}")
    d_in = x.shape[1]
    dev = x.device
    if dy.device != dev:
        raise ValueError(f"dy is on {dy.device} but x is on {dev}")
    _check_accumulator("G", G, (d_out, d_in), dev)
    _check_accumulator("y", y, (d_out,), dev)
    _check_vector("grad_mask", grad_mask, n, dev, "mask")
    _check_vector("stat_mask", stat_mask, n, dev, "mask")
    _check_vector("row_weight", row_weight, n, dev, "float")
    if seq_sums is not None:
        if seq_sums.dim() != 2:
            raise ValueError(f"seq_sums must be [num_seqs, d_out], got {tuple(seq_sums.shape)}")
        _check_accumulator("seq_sums", seq_sums, (seq_sums.shape[0], d_out), dev)
        if seq_ids is None:
            raise ValueError("seq_sums needs seq_ids (the example of each row)")
        _check_vector("seq_ids", seq_ids, n, dev, "index")
    if stat_mask is None:
        stat_mask = grad_mask
    if n == 0 or d_out == 0:
        return
    if dy.dtype != x.dtype:
        common = torch.promote_types(dy.dtype, x.dtype)
        dy, x = dy.to(common), x.to(common)
    if x.dtype == torch.float64 or d_in == 0:
        reference.grad_stats(G, y, dy, x, grad_mask, stat_mask, row_weight, seq_sums, seq_ids)
        return
    _check_runnable(dev)
    dy, x = _row_major(dy), _row_major(x)
    w = None if row_weight is None else row_weight.to(torch.float32).contiguous()

    num_seqs = 0 if seq_sums is None else seq_sums.shape[0]
    in_kernel_seq = 0 < num_seqs <= _MAX_SEQ_BLOCK
    _, kernel = _kernels()
    sms = _num_sms(dev)

    def grid(meta):
        n_m = -(-d_out // meta["BLOCK_M"])
        n_n = -(-d_in // meta["BLOCK_N"])
        return (n_m + n_m * n_n, _num_splits(n_m * n_n, n, meta["BLOCK_K"], sms))

    dummy = y  # stands for absent optional tensors; never read (the matching flag is False)
    seq = seq_sums if in_kernel_seq else dummy.view(1, -1)
    with _device_guard(dev):
        kernel[grid](
            G, G.stride(0), G.stride(1),
            y, y.stride(0),
            seq, seq.stride(0), seq.stride(1),
            dy, dy.stride(0), dy.stride(1),
            x, x.stride(0), x.stride(1),
            _mask_bytes(grad_mask) if grad_mask is not None else dummy,
            _mask_bytes(stat_mask) if stat_mask is not None else dummy,
            w if w is not None else dummy,
            seq_ids if in_kernel_seq else dummy,
            n, d_out, d_in, num_seqs,
            HAS_GRAD_MASK=grad_mask is not None,
            HAS_STAT_MASK=stat_mask is not None,
            HAS_WEIGHT=w is not None,
            HAS_SEQ=in_kernel_seq,
            IS_FP32=x.dtype == torch.float32,
            INPUT_PRECISION=_input_precision(x.dtype),
            SEQ_BLOCK=_seq_block(num_seqs) if in_kernel_seq else 16,
        )
    if seq_sums is not None and not in_kernel_seq:
        # Many sequences per batch: torch's index_add_ on the fp32 rows (one extra pass over dY).
        d = dy.to(torch.float32)
        if w is not None:
            d = d * w[:, None]
        ids = seq_ids
        if stat_mask is not None:
            d, ids = d[stat_mask], ids[stat_mask]
        seq_sums.index_add_(0, ids.to(torch.long), d)
