"""Gradient statistics of one module in one launch: ``G += dY_{grad}^T X_{grad}``,
``y += sum_{stat} dY^2`` and, for ``sequence_lowrank``, ``seq_sums[seq_id] += dY_{stat}``.

Launcher, autotuning and the reset-between-trials strategy: :func:`lora_da_fast.ops.triton_ops.grad_stats`.

Work decomposition (grid axis 0; axis 1 splits the tokens as in ``sym_accumulate``):
- programs ``0 .. n_m - 1`` are *moment* programs: each owns a ``BLOCK_M`` slice of ``d_out`` and streams
  its chunk of ``dY`` rows once, summing the squares (``y``) and the per-example sums (as a one-hot
  ``[SEQ_BLOCK, BLOCK_K] x [BLOCK_K, BLOCK_M]`` product). They come first so that they start at once and
  overlap with the matmul instead of forming a tail; their work is pure bandwidth (one read of ``dY``).
- programs ``n_m ..`` are the tiles of ``G`` (``BLOCK_M x BLOCK_N``, grouped by ``GROUP_M`` rows of
  tiles for L2 reuse), a plain ``dY^T X`` matmul over the selected rows.
- With one split every output element has one owner (load/add/store, deterministic); with several,
  partial results are added with fp32 atomics (no ``splits x d_out x d_in`` partial buffer).
- Masks predicate the row loads (no gathered copy).
"""
import triton
import triton.language as tl


@triton.jit
def _output_moments(
    y_ptr, stride_y,
    seq_ptr, stride_sr, stride_sc,
    dy_ptr, stride_dn, stride_dd,
    stat_mask_ptr, seq_ids_ptr,
    pid_m, k_start, k_end, D_OUT, NUM_SEQS, num_splits,
    HAS_STAT_MASK: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    IS_FP32: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_s = tl.arange(0, SEQ_BLOCK)
    col = offs_m < D_OUT
    y_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_acc = tl.zeros((SEQ_BLOCK, BLOCK_M), dtype=tl.float32)
    if HAS_STAT_MASK:
        selected = tl.load(stat_mask_ptr + k_start + offs_k, mask=k_start + offs_k < k_end, other=0)
    for k in range(k_start, k_end, BLOCK_K):
        rows = k + offs_k  # int64
        take = rows < k_end
        if HAS_STAT_MASK:
            # Mask bytes fetched one step ahead: the row loads depend on them.
            take = take & (selected != 0)
            selected = tl.load(stat_mask_ptr + rows + BLOCK_K, mask=rows + BLOCK_K < k_end, other=0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dn + offs_m[None, :] * stride_dd,
                     mask=take[:, None] & col[None, :], other=0.0)
        # Upcast: squares in fp32, as the reference computes them; a 16-bit square would lose half
        # its bits and the sum would overflow fp16.
        d = dy.to(tl.float32)
        y_acc += tl.sum(d * d, axis=0)
        if HAS_SEQ:
            ids = tl.load(seq_ids_ptr + rows, mask=take, other=-1)
            onehot = (ids[None, :] == offs_s[:, None]) & take[None, :]
            if IS_FP32:
                # fp32 rows: exact fp32 products with a 0/1 matrix.
                s_acc = tl.dot(onehot.to(tl.float32), d, s_acc, input_precision="ieee")
            else:
                # 0/1 and 16-bit values: exact products on the tensor cores, fp32 sums.
                s_acc = tl.dot(onehot.to(dy.dtype), dy, s_acc)

    y_ptrs = y_ptr + offs_m * stride_y
    s_ptrs = seq_ptr + offs_s[:, None] * stride_sr + offs_m[None, :] * stride_sc
    s_mask = (offs_s < NUM_SEQS)[:, None] & col[None, :]
    if num_splits == 1:
        tl.store(y_ptrs, tl.load(y_ptrs, mask=col, other=0.0) + y_acc, mask=col)
        if HAS_SEQ:
            tl.store(s_ptrs, tl.load(s_ptrs, mask=s_mask, other=0.0) + s_acc, mask=s_mask)
    else:
        tl.atomic_add(y_ptrs, y_acc, mask=col, sem="relaxed")
        if HAS_SEQ:
            tl.atomic_add(s_ptrs, s_acc, mask=s_mask, sem="relaxed")


@triton.jit
def _weight_gradient(
    g_ptr, stride_gr, stride_gc,
    dy_ptr, stride_dn, stride_dd,
    x_ptr, stride_xn, stride_xd,
    grad_mask_ptr,
    tile, k_start, k_end, D_OUT, D_IN, num_splits,
    HAS_GRAD_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M rows of tiles are swept together so that their dY/X panels stay in L2.
    n_m = tl.cdiv(D_OUT, BLOCK_M)
    n_n = tl.cdiv(D_IN, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_m
    pid_n = (tile % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    col_m = offs_m < D_OUT
    col_n = offs_n < D_IN

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_GRAD_MASK:
        selected = tl.load(grad_mask_ptr + k_start + offs_k, mask=k_start + offs_k < k_end, other=0)
    for k in range(k_start, k_end, BLOCK_K):
        rows = k + offs_k  # int64
        take = rows < k_end
        if HAS_GRAD_MASK:
            # The row loads depend on the mask: it is fetched one step ahead (as bytes: a bool
            # pointer defeats this prefetch in the pipeliner) so its latency hides behind a step.
            take = take & (selected != 0)
            selected = tl.load(grad_mask_ptr + rows + BLOCK_K, mask=rows + BLOCK_K < k_end, other=0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dn + offs_m[None, :] * stride_dd,
                     mask=take[:, None] & col_m[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + offs_n[None, :] * stride_xd,
                    mask=take[:, None] & col_n[None, :], other=0.0)
        # No upcast: 16-bit products are exact in the fp32 accumulator; fp32 inputs use
        # INPUT_PRECISION="ieee" unless tf32 was explicitly asked for.
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)

    g_ptrs = g_ptr + offs_m[:, None] * stride_gr + offs_n[None, :] * stride_gc
    g_mask = col_m[:, None] & col_n[None, :]
    if num_splits == 1:
        tl.store(g_ptrs, tl.load(g_ptrs, mask=g_mask, other=0.0) + acc, mask=g_mask)
    else:
        tl.atomic_add(g_ptrs, acc, mask=g_mask, sem="relaxed")


@triton.jit
def _grad_stats_kernel(
    g_ptr, stride_gr, stride_gc,
    y_ptr, stride_y,
    seq_ptr, stride_sr, stride_sc,
    dy_ptr, stride_dn, stride_dd,
    x_ptr, stride_xn, stride_xd,
    grad_mask_ptr, stat_mask_ptr, seq_ids_ptr,
    N, D_OUT, D_IN, NUM_SEQS,
    HAS_GRAD_MASK: tl.constexpr,
    HAS_STAT_MASK: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    IS_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # int64 program ids: token x dim products overflow 32 bits on large models.
    pid = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    num_splits = tl.num_programs(1)
    # This program's chunk of tokens (a whole number of BLOCK_K rows).
    k_per_split = tl.cdiv(tl.cdiv(N, BLOCK_K), num_splits) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, N)
    n_m = tl.cdiv(D_OUT, BLOCK_M)
    if pid < n_m:
        _output_moments(
            y_ptr, stride_y, seq_ptr, stride_sr, stride_sc, dy_ptr, stride_dn, stride_dd,
            stat_mask_ptr, seq_ids_ptr, pid, k_start, k_end, D_OUT, NUM_SEQS, num_splits,
            HAS_STAT_MASK, HAS_SEQ, IS_FP32, SEQ_BLOCK, BLOCK_M, BLOCK_K)
    else:
        _weight_gradient(
            g_ptr, stride_gr, stride_gc, dy_ptr, stride_dn, stride_dd, x_ptr, stride_xn, stride_xd,
            grad_mask_ptr, pid - n_m, k_start, k_end, D_OUT, D_IN, num_splits,
            HAS_GRAD_MASK, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def _config(block_m, block_n, block_k, num_warps, num_stages, group_m=8):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
                         num_warps=num_warps, num_stages=num_stages)


# bf16/fp16 inputs: tensor-core tiles of a Hopper-class GPU. Checked offline for sm_90 (triton 3.9):
# wgmma from shared memory, no register spills (128x256 tiles and 128x128 with 4 warps spill: left out).
HALF_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 128, 8, 3),
    _config(64, 128, 64, 4, 4),
]
# fp32 inputs, exact (FMA) products: smaller K steps keep the fp32 tiles in shared memory.
FP32_CONFIGS = [
    _config(64, 64, 32, 4, 3),
    _config(128, 128, 32, 8, 2),
]
# Under the CPU interpreter: one small config (no autotuning; several tiles even on tiny test shapes).
INTERPRETER_CONFIGS = [_config(32, 32, 16, 4, 1, group_m=2)]
