"""Masked symmetric accumulation ``Z += X_S^T X_S`` into the packed upper triangle of ``Z``: only the
upper-triangle tiles are computed, and only the upper-triangle entries are stored.

Launcher, autotuning and the reset-between-trials strategy: :func:`lora_da_fast.ops.sym_accumulate`.

Work decomposition:
- ``Z`` (``D x D``) is cut into square ``BLOCK x BLOCK`` tiles; only tiles ``(ti, tj)`` with ``ti <= tj``
  are computed (the diagonal tiles in full, their strict lower part masked at the store).
- ``Z`` is stored packed (``lora_da_fast.triangle``): ``D (D + 1) / 2`` fp32 entries, row ``i`` holding
  ``Z[i, i:]``, entry ``(i, j)`` at ``i D - i (i - 1) / 2 + j - i``. A tile's row segment is contiguous
  there, so the tile's loads, stores and atomics stay coalesced along ``j``; nothing of the strict lower
  triangle exists in memory (half the bytes of a square accumulator).
- For L2 reuse the tiles are visited in super-tiles of ``group x group`` tiles (``group = min(GROUP,
  tiles per side)``); the super-tiles of the upper super-triangle are numbered column by column, and
  within a super-tile the programs go row by row. Programs that land below the diagonal of a diagonal
  super-tile (or past the edge) exit at once: cheaper than a prefix-sum table, and few.
- Axis 1 of the grid splits the tokens (split-K): program ``k`` sums a contiguous chunk of rows. With one
  split a program owns its tile and updates it with a plain load/add/store (deterministic); with several,
  partial tiles are added with fp32 atomics (a partial buffer per split would cost ``splits x D^2`` fp32,
  485 MB per split at ``D = 11008``, and a second reduction pass). The launcher picks the split count.
- The token mask is applied by predicating the row loads: unselected rows are never read and count as
  zero rows, so there is no gathered copy and no upcast copy of ``X``.
"""
import triton
import triton.language as tl


@triton.jit
def _sym_accumulate_kernel(
    z_ptr,
    x_ptr, stride_xn, stride_xd,
    mask_ptr,
    N, D,
    HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    # int64 program ids: token x dim products overflow 32 bits on large models.
    pid = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    num_splits = tl.num_programs(1)

    # Tile (ti, tj) of the upper triangle handled by this program.
    n_tiles = tl.cdiv(D, BLOCK)
    group = tl.minimum(n_tiles, GROUP).to(tl.int64)
    s = pid // (group * group)  # super-tile number: s = sj * (sj + 1) / 2 + si, si <= sj
    r = pid % (group * group)
    sj = ((tl.sqrt(8.0 * s.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int64)
    # fp32 sqrt may land one off for large s: correct with exact integer tests.
    sj += ((sj + 1) * (sj + 2) // 2 <= s).to(tl.int64)
    sj -= (sj * (sj + 1) // 2 > s).to(tl.int64)
    si = s - sj * (sj + 1) // 2
    ti = si * group + r // group
    tj = sj * group + r % group
    if (ti > tj) | (tj >= n_tiles):
        return

    # This program's chunk of tokens (a whole number of BLOCK_K rows).
    k_per_split = tl.cdiv(tl.cdiv(N, BLOCK_K), num_splits) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, N)

    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    col_i = offs_i < D
    col_j = offs_j < D

    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    if HAS_MASK:
        selected = tl.load(mask_ptr + k_start + offs_k, mask=k_start + offs_k < k_end, other=0)
    for k in range(k_start, k_end, BLOCK_K):
        rows = k + offs_k  # int64
        take = rows < k_end
        if HAS_MASK:
            # The row loads depend on the mask: it is fetched one step ahead (as bytes: a bool
            # pointer defeats this prefetch in the pipeliner) so its latency hides behind a step.
            take = take & (selected != 0)
            selected = tl.load(mask_ptr + rows + BLOCK_K, mask=rows + BLOCK_K < k_end, other=0)
        a = tl.load(x_ptr + rows[:, None] * stride_xn + offs_i[None, :] * stride_xd,
                    mask=take[:, None] & col_i[None, :], other=0.0)
        b = tl.load(x_ptr + rows[:, None] * stride_xn + offs_j[None, :] * stride_xd,
                    mask=take[:, None] & col_j[None, :], other=0.0)
        # No upcast: bf16/fp16 products are exact in the fp32 accumulator (tensor cores); fp32 inputs
        # use INPUT_PRECISION="ieee" (exact fp32 FMA) unless the caller explicitly asked for tf32.
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)

    # packed upper triangle: row i starts at i D - i (i - 1) / 2 (int64: D^2 / 2 overflows 32 bits at D > 65k)
    row_start = offs_i * D - offs_i * (offs_i - 1) // 2
    z_ptrs = z_ptr + row_start[:, None] + (offs_j[None, :] - offs_i[:, None])
    z_mask = col_i[:, None] & col_j[None, :] & (offs_j[None, :] >= offs_i[:, None])
    if num_splits == 1:
        tl.store(z_ptrs, tl.load(z_ptrs, mask=z_mask, other=0.0) + acc, mask=z_mask)
    else:
        tl.atomic_add(z_ptrs, acc, mask=z_mask, sem="relaxed")


def _config(block, block_k, group, num_warps, num_stages):
    return triton.Config({"BLOCK": block, "BLOCK_K": block_k, "GROUP": group},
                         num_warps=num_warps, num_stages=num_stages)


# bf16/fp16 inputs: tensor-core tiles. Square tiles (the triangle scheme needs them); 128 is the
# Hopper sweet spot, 64 keeps small d_in busy. Checked offline for sm_90 (triton 3.9): wgmma from
# shared memory, 16-byte async copies, no register spills (128 with 4 warps spills: left out).
HALF_CONFIGS = [
    _config(128, 64, 8, 8, 3),
    _config(128, 64, 8, 8, 4),
    _config(128, 128, 8, 8, 3),
    _config(64, 64, 8, 4, 4),
]
# fp32 inputs, exact (FMA) products: smaller K steps keep the fp32 tiles in shared memory.
FP32_CONFIGS = [
    _config(64, 32, 8, 4, 3),
    _config(128, 32, 8, 8, 2),
]
# Under the CPU interpreter: one small config (no autotuning; several tiles even on tiny test shapes).
INTERPRETER_CONFIGS = [_config(32, 16, 2, 4, 1)]
