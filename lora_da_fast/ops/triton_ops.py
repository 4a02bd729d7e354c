"""Triton launchers of the statistics ops, same names, signatures and semantics as :mod:`.reference`.

- :func:`sym_accumulate` ``Z += X_S^T X_S`` into the packed upper triangle of ``Z`` (diagonal included;
  layout: :mod:`lora_da_fast.triangle`).
- :func:`grad_stats` ``G += dY_{grad}^T X_{grad}``, ``y += sum_{stat} dY^2`` and the per-example
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

from ..triangle import packed_size
from . import reference
from .launch import (KERNEL_DTYPES, MAX_SEQ_BLOCK, check_accumulator, check_rows, check_runnable, check_vector,
                     device_guard, interpreted, mask_bytes, next_power_of_2, num_sms, num_splits, row_major,
                     seq_block, triangle_programs)

__all__ = ["sym_accumulate", "grad_stats", "FP32_INPUT_PRECISION"]

#: Products of fp32 inputs: ``"ieee"`` (exact fp32, the default) or ``"tf32"`` (tensor cores, about
#: 1e-3 relative error: an explicit opt-in, see ``tests/tolerances.py`` ``accumulate_tf32``).
FP32_INPUT_PRECISION = "ieee"

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
    return _build_kernels(interpreted(), _autotune())


@functools.lru_cache(maxsize=None)
def _build_kernels(interpreted: bool, autotune: bool):
    import triton

    from ..kernels import grad_stats as gk
    from ..kernels import sym_accumulate as sk

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



def _input_precision(dtype: torch.dtype) -> Optional[str]:
    if dtype != torch.float32:
        return None  # 16-bit products: tensor cores, exact in fp32 whatever the setting
    if FP32_INPUT_PRECISION not in ("ieee", "tf32"):
        raise ValueError(f"FP32_INPUT_PRECISION must be 'ieee' or 'tf32', got {FP32_INPUT_PRECISION!r}")
    return FP32_INPUT_PRECISION


# --------------------------------------------------------------------------------------------------
# Launchers


def sym_accumulate(Z: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
    """``Z += X_S^T X_S`` with ``X_S = x[mask]``, ``Z`` the packed upper triangle (diagonal included).

    ``Z``: fp32 ``[d_in (d_in + 1) / 2]`` contiguous (:mod:`lora_da_fast.triangle`); ``x``: ``[N, d_in]``
    bf16/fp16/fp32 (fp64 goes to the reference); ``mask``: bool ``[N]`` or ``None`` (every row). Only the
    tiles of the upper triangle are computed and only its entries are read and written.
    """
    check_rows("x", x)
    n, d = x.shape
    check_accumulator("Z", Z, (packed_size(d),), x.device)
    check_vector("mask", mask, n, x.device, "mask")
    if n == 0 or d == 0:
        return
    if x.dtype == torch.float64:
        reference.sym_accumulate(Z, x, mask)
        return
    check_runnable(x.device)
    x = row_major(x)
    kernel, _ = _kernels()
    sms = num_sms(x.device)

    def grid(meta):
        block = meta["BLOCK"]
        n_tiles = -(-d // block)
        real_tiles = n_tiles * (n_tiles + 1) // 2
        return (triangle_programs(d, block, meta["GROUP"]),
                num_splits(real_tiles, n, meta["BLOCK_K"], sms))

    with device_guard(x.device):
        kernel[grid](
            Z,
            x, x.stride(0), x.stride(1),
            mask_bytes(mask) if mask is not None else x,  # never read without HAS_MASK
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
    seq_sums: Optional[torch.Tensor] = None,
    seq_ids: Optional[torch.Tensor] = None,
) -> None:
    """Gradient statistics of one module for one batch, in place, in one launch.

    - ``G += dy_{grad_mask}^T x_{grad_mask}`` (fp32 ``[d_out, d_in]``);
    - ``y += sum_{t in stat_mask} dy_t ** 2`` (fp32 ``[d_out]``);
    - if ``seq_sums`` (fp32 ``[num_seqs, d_out]``) is given: ``seq_sums[seq_ids[t]] += dy_t`` for
      ``t`` in ``stat_mask``. ``seq_ids`` must lie in ``[0, num_seqs)`` (not checked: that would need a
      device sync; rows outside are dropped). With more than 64 sequences per batch these sums are
      taken by torch (``index_add_``) after the kernel.

    ``stat_mask`` defaults to ``grad_mask``. ``dy`` and ``x`` of different dtypes are both promoted to
    their common dtype (a copy).
    """
    check_rows("dy", dy)
    check_rows("x", x)
    n, d_out = dy.shape
    if x.shape[0] != n:
        raise ValueError(f"dy has {n} rows but x has {x.shape[0]}")
    d_in = x.shape[1]
    dev = x.device
    if dy.device != dev:
        raise ValueError(f"dy is on {dy.device} but x is on {dev}")
    check_accumulator("G", G, (d_out, d_in), dev)
    check_accumulator("y", y, (d_out,), dev)
    check_vector("grad_mask", grad_mask, n, dev, "mask")
    check_vector("stat_mask", stat_mask, n, dev, "mask")
    if seq_sums is not None:
        if seq_sums.dim() != 2:
            raise ValueError(f"seq_sums must be [num_seqs, d_out], got {tuple(seq_sums.shape)}")
        check_accumulator("seq_sums", seq_sums, (seq_sums.shape[0], d_out), dev)
        if seq_ids is None:
            raise ValueError("seq_sums needs seq_ids (the example of each row)")
        check_vector("seq_ids", seq_ids, n, dev, "index")
    if stat_mask is None:
        stat_mask = grad_mask
    if n == 0 or d_out == 0:
        return
    if dy.dtype != x.dtype:
        common = torch.promote_types(dy.dtype, x.dtype)
        dy, x = dy.to(common), x.to(common)
    if x.dtype == torch.float64 or d_in == 0:
        reference.grad_stats(G, y, dy, x, grad_mask, stat_mask, seq_sums, seq_ids)
        return
    check_runnable(dev)
    dy, x = row_major(dy), row_major(x)

    num_seqs = 0 if seq_sums is None else seq_sums.shape[0]
    in_kernel_seq = 0 < num_seqs <= MAX_SEQ_BLOCK
    _, kernel = _kernels()
    sms = num_sms(dev)

    def grid(meta):
        n_m = -(-d_out // meta["BLOCK_M"])
        n_n = -(-d_in // meta["BLOCK_N"])
        return (n_m + n_m * n_n, num_splits(n_m * n_n, n, meta["BLOCK_K"], sms))

    dummy = y  # stands for absent optional tensors; never read (the matching flag is False)
    seq = seq_sums if in_kernel_seq else dummy.view(1, -1)
    with device_guard(dev):
        kernel[grid](
            G, G.stride(0), G.stride(1),
            y, y.stride(0),
            seq, seq.stride(0), seq.stride(1),
            dy, dy.stride(0), dy.stride(1),
            x, x.stride(0), x.stride(1),
            mask_bytes(grad_mask) if grad_mask is not None else dummy,
            mask_bytes(stat_mask) if stat_mask is not None else dummy,
            seq_ids if in_kernel_seq else dummy,
            n, d_out, d_in, num_seqs,
            HAS_GRAD_MASK=grad_mask is not None,
            HAS_STAT_MASK=stat_mask is not None,
            HAS_SEQ=in_kernel_seq,
            IS_FP32=x.dtype == torch.float32,
            INPUT_PRECISION=_input_precision(x.dtype),
            SEQ_BLOCK=seq_block(num_seqs) if in_kernel_seq else 16,
        )
    if seq_sums is not None and not in_kernel_seq:
        # Many sequences per batch: torch's index_add_ on the fp32 rows (one extra pass over dY).
        d = dy.to(torch.float32)
        ids = seq_ids
        if stat_mask is not None:
            d, ids = d[stat_mask], ids[stat_mask]
        seq_sums.index_add_(0, ids.to(torch.long), d)
