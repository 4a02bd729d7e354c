"""Launch helpers shared by the Triton launchers: grid heuristics (token splits, triangle tiles, block
sizes) and argument checks. Small named functions, no magic numbers at call sites; nothing here
imports triton or touches CUDA at import time."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Per-example sums are accumulated in registers as a [SEQ_BLOCK, BLOCK_M] tile: beyond this many
# sequences per batch the launcher falls back to torch's index_add_ for them.
MAX_SEQ_BLOCK = 64
# Each token split should run at least this many BLOCK_K steps, so that the pipeline fills.
MIN_K_STEPS_PER_SPLIT = 4
MAX_SPLITS = 64
# Cost of one program's prologue/epilogue, in BLOCK_K steps (pipeline fill, tile read-add-write or
# atomics): what a split must save to be worth it.
PROGRAM_OVERHEAD_STEPS = 4
SPLIT_MIN_GAIN = 0.05
# Stand-in for the multiprocessor count under the CPU interpreter: small, so that tests see splits.
INTERPRETER_SMS = 4


# --------------------------------------------------------------------------------------------------
# Launch heuristics


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def num_splits(n_tiles: int, n_rows: int, block_k: int, num_sms: int) -> int:
    """Token splits (grid axis 1) minimising ``waves x (steps per split + overhead)``.

    Without splits, a small ``d`` gives fewer tiles than multiprocessors; splitting the tokens fills
    them, at the price of atomics and one prologue/epilogue per split. More splits must gain at least
    ``SPLIT_MIN_GAIN`` in this model (atomics traffic is not in it). The returned count never leaves
    a split empty.
    """
    steps = -(-n_rows // block_k)
    best, best_cost = 1, None
    for s in range(1, min(MAX_SPLITS, max(1, steps // MIN_K_STEPS_PER_SPLIT)) + 1):
        per = -(-steps // s)
        s_eff = -(-steps // per)  # the kernel gives `per` steps to each split: drop empty ones
        waves = -(-(n_tiles * s_eff) // num_sms)
        cost = waves * (per + PROGRAM_OVERHEAD_STEPS)
        if best_cost is None or cost < best_cost * (1.0 - SPLIT_MIN_GAIN):
            best, best_cost = s_eff, cost
    return best


def triangle_programs(d: int, block: int, group: int) -> int:
    """Programs of the upper-triangle tile grid of ``sym_accumulate`` (see the kernel's docstring)."""
    n = -(-d // block)
    g = min(n, group)
    ns = -(-n // g)
    return ns * (ns + 1) // 2 * g * g


def seq_block(num_seqs: int) -> int:
    return max(16, next_power_of_2(num_seqs))


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# --------------------------------------------------------------------------------------------------
# Argument checks


def check_rows(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [tokens, features], got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (t.dtype.is_floating_point and t.dtype in KERNEL_DTYPES + (torch.float64,)):
        raise TypeError(f"{name} must be bf16, fp16, fp32 or fp64, got {t.dtype}")


def check_accumulator(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
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


def check_vector(name: str, t: Optional[torch.Tensor], n: int, device: torch.device, kind: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D tensor of {n} rows, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    if kind == "mask" and t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool mask, got {t.dtype}")
    if kind == "index" and (t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex()):
        raise TypeError(f"{name} must hold integers, got {t.dtype}")


def row_major(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any strides, but read rows as contiguous vectors: only a transposed-like
    # layout (feature stride != 1) is worth a copy.
    return t if t.stride(-1) == 1 else t.contiguous()


def mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    # The same bytes seen as uint8 (no copy): the kernels prefetch mask bytes one step ahead, which
    # Triton's pipeliner undoes for a bool (i1) pointer.
    return mask.contiguous().view(torch.uint8)


def check_runnable(device: torch.device) -> None:
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {device}); on a CPU use backend='torch', or set "
            "TRITON_INTERPRET=1 before triton is first imported to run them under the interpreter (tests)")


def device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()



