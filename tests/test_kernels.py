"""Triton kernels (lora_da_fast.ops.triton_ops) against the torch reference and a float64 computation.

Three-way check: each op's error against float64 (computed from the same, already rounded inputs) must
be within ``kernel_vs_torch_factor`` of the torch reference's own error, plus the fp32 accumulation
floor. Accumulators start from random values (the ops add into them) so that an element the kernel
fails to write shows up as an O(1) error; ``Z`` is the packed upper triangle (lora_da_fast.triangle), so
an entry written at the wrong place shows up the same way, and every accumulator sits between NaN guard
bands that must stay untouched.

Without CUDA the kernels run under the Triton interpreter (tests/conftest.py): fp32 and fp16, small
shapes. bf16, large shapes and autotuning are GPU-marked.
"""
from __future__ import annotations

import pytest
import torch

from lora_da_fast import LoraDAConfig, collect_statistics
from lora_da_fast.ops import reference, triton_ops
from lora_da_fast.triangle import pack_upper, packed_size
from tests.helpers import random_examples, rel_err, tiny_llama
from tests.tolerances import TOL

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
CPU_DTYPES = [torch.float32, torch.float16]
GUARD = 37


def _interpreter_problem():
    """Why the Triton interpreter cannot run this module's kernels here (``None``: it can). Named, not
    hidden: triton 3.6's interpreter turns a program id used as a loop bound into a Python int with
    ``int()`` of a one-element array, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted
    to Python scalars"); triton 3.9 (the tested set) and numpy < 2.4 both work."""
    if HAS_CUDA:
        return None
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, n):
        for k in range(tl.program_id(0), n, 1):
            tl.store(x_ptr + k, 1.0)

    x = torch.zeros(4)
    try:
        _probe[(1,)](x, 4)
    except Exception as exc:  # noqa: BLE001 - any failure of the interpreter itself
        return (f"the Triton interpreter of triton {triton.__version__} fails with numpy {numpy.__version__} "
                f"({type(exc).__name__}: {str(exc)[:80]}); install numpy<2.4 or a newer triton to run these cases")
    return None


_PROBLEM = _interpreter_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


@pytest.fixture(autouse=True, scope="module")
def _one_config_per_kernel():
    """One config per kernel (no autotuning) in this module: on a GPU, each flag combination is then
    compiled once instead of once per config. test_autotuning_keeps_earlier_sums turns tuning on."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_DA_FAST_AUTOTUNE", "0")
        yield


def guarded(shape, fill, device=DEVICE):
    """A contiguous fp32 tensor holding ``fill``, between NaN guard bands of the same buffer."""
    numel = 1
    for s in shape:
        numel *= s
    buf = torch.full((numel + 2 * GUARD,), float("nan"), dtype=torch.float32, device=device)
    t = buf[GUARD:GUARD + numel].view(*shape)
    t.copy_(fill)
    return t, buf


def assert_guards(buf):
    assert torch.isnan(buf[:GUARD]).all() and torch.isnan(buf[-GUARD:]).all(), "write outside the accumulator"


def assert_three_way(out, torch_out, exact, what):
    e_kernel, e_torch = rel_err(out, exact), rel_err(torch_out, exact)
    bound = TOL["kernel_vs_torch_factor"] * e_torch + TOL["accumulate_fp32"]
    assert e_kernel <= bound, f"{what}: kernel error {e_kernel:.3g} > {bound:.3g} (torch: {e_torch:.3g})"
    return e_kernel


def random_mask(n, p, gen, device=DEVICE):
    if p is None:
        return None
    return (torch.rand(n, generator=gen) < p).to(device)


# --------------------------------------------------------------------------------------------------
# sym_accumulate


def run_sym(n, d, dtype, mask_p, seed=0, x_view=False):
    gen = torch.Generator().manual_seed(seed)
    if x_view:  # a strided view (row stride > d): no copy may be needed, strides must be honoured
        x = torch.randn(n, d + 5, generator=gen).to(dtype)[:, 2:2 + d]
    else:
        x = torch.randn(n, d, generator=gen).to(dtype)
    mask = random_mask(n, mask_p, gen, device="cpu")
    z0 = torch.randn(packed_size(d), generator=gen)  # packed upper triangle

    xs = x.double() if mask is None else x.double()[mask]
    exact = z0.double() + pack_upper(xs.T @ xs)
    z_torch = z0.clone()
    reference.sym_accumulate(z_torch, x, mask)

    Z, buf = guarded((packed_size(d),), z0)
    triton_ops.sym_accumulate(Z, x.to(DEVICE), None if mask is None else mask.to(DEVICE))
    assert_guards(buf)
    return Z.cpu(), z_torch, exact, (z0, mask)


SYM_CASES = [
    # (tokens, d_in, mask probability)   awkward on purpose
    (100, 40, 0.7),   # d not a multiple of 16; several tiles and token splits
    (5, 70, 0.6),     # fewer tokens than a block
    (1, 3, None),     # one token, d < 16
    (300, 33, None),  # no mask, many splits
    (64, 17, 0.0),    # every token masked out
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("n,d,p", SYM_CASES)
def test_sym_accumulate_three_way(n, d, p, dtype):
    out, torch_out, exact, (z0, mask) = run_sym(n, d, dtype, p)
    if p == 0.0:  # nothing selected: the accumulator is unchanged
        assert torch.equal(out, z0) and torch.equal(torch_out, z0)
        return
    assert_three_way(out, torch_out, exact, f"Z {dtype} n={n} d={d}")


def test_sym_accumulate_strided_input():
    out, torch_out, exact, _ = run_sym(50, 24, torch.float32, 0.5, x_view=True)
    assert_three_way(out, torch_out, exact, "Z strided x")


def force_splits(monkeypatch, splits):
    """Make every launch use ``splits`` token splits; returns the list of the counts handed out (so a
    test can check the launcher really asked). ``triton_ops`` imported ``num_splits`` by name from
    ``.launch``: its own binding is the one looked up when the grid is computed."""
    calls = []

    def fixed(*args, **kwargs):
        calls.append(splits)
        return splits

    monkeypatch.setattr(triton_ops, "num_splits", fixed)
    return calls


@pytest.mark.parametrize("splits", [1, 3])
def test_sym_accumulate_split_paths(monkeypatch, splits):
    """One split (plain read-add-write) and several (atomics) give the same sums."""
    calls = force_splits(monkeypatch, splits)
    out, torch_out, exact, _ = run_sym(120, 45, torch.float32, 0.8, seed=3)
    assert calls, "the launcher did not take its split count from triton_ops.num_splits"
    assert_three_way(out, torch_out, exact, f"Z splits={splits}")


# --------------------------------------------------------------------------------------------------
# grad_stats


def run_grad(n, d_out, d_in, dtype, grad_p, stat_p, num_seqs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen).to(dtype)
    dy = torch.randn(n, d_out, generator=gen).to(dtype)
    grad_mask = random_mask(n, grad_p, gen, device="cpu")
    stat_mask = None if stat_p is None else random_mask(n, stat_p, gen, device="cpu")
    if stat_mask is not None and grad_mask is not None:
        stat_mask &= grad_mask
    ids = torch.randint(0, max(num_seqs, 1), (n,), generator=gen) if num_seqs else None
    g0 = torch.randn(d_out, d_in, generator=gen)
    y0 = torch.rand(d_out, generator=gen)
    s0 = torch.randn(num_seqs, d_out, generator=gen) if num_seqs else None

    # float64 from the same inputs
    d = dy.double()
    gsel = torch.ones(n, dtype=torch.bool) if grad_mask is None else grad_mask
    ssel = gsel if stat_mask is None else stat_mask
    exact = {"G": g0.double() + d[gsel].T @ x.double()[gsel],
             "y": y0.double() + (d[ssel] ** 2).sum(0)}
    if num_seqs:
        exact["s"] = s0.double().index_add(0, ids[ssel], d[ssel])

    t = {"G": g0.clone(), "y": y0.clone(), "s": None if s0 is None else s0.clone()}
    reference.grad_stats(t["G"], t["y"], dy, x, grad_mask, stat_mask, t["s"], ids)

    to = (lambda v: None if v is None else v.to(DEVICE))
    G, gbuf = guarded((d_out, d_in), g0)
    y, ybuf = guarded((d_out,), y0)
    s, sbuf = guarded((num_seqs, d_out), s0) if num_seqs else (None, None)
    triton_ops.grad_stats(G, y, to(dy), to(x), to(grad_mask), to(stat_mask), s, to(ids))
    out = {"G": G.cpu(), "y": y.cpu(), "s": None if s is None else s.cpu()}
    for buf in (gbuf, ybuf, sbuf):
        if buf is not None:
            assert_guards(buf)
    return out, t, exact, (g0, y0, s0)


GRAD_CASES = [
    # (tokens, d_out, d_in, grad mask p, stat mask p, sequences)
    (100, 40, 50, 0.8, 0.6, 3),
    (5, 70, 20, 0.6, None, 2),       # fewer tokens than a block, stat mask = grad mask
    (1, 3, 5, None, None, 1),        # one token, tiny dims
    (300, 33, 17, None, 0.5, 0),     # no grad mask, no sequence sums, many splits
    (200, 24, 18, 0.9, 0.9, 70),     # more sequences than the kernel holds: torch fallback
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "n{}-{}x{}-s{}".format(c[0], c[1], c[2], c[5]))
def test_grad_stats_three_way(case, dtype):
    n, d_out, d_in, gp, sp, seqs = case
    out, t, exact, _ = run_grad(n, d_out, d_in, dtype, gp, sp, seqs)
    for key in ("G", "y", "s"):
        if key in exact:
            assert torch.isfinite(out[key]).all(), f"{key} not fully written"
            assert_three_way(out[key], t[key], exact[key], f"{key} {dtype} {case}")


def test_grad_stats_all_masked():
    out, t, exact, (g0, y0, s0) = run_grad(64, 20, 19, torch.float16, 0.0, 0.0, 4)
    assert torch.equal(out["G"], g0) and torch.equal(out["y"], y0) and torch.equal(out["s"], s0)


@pytest.mark.parametrize("splits", [1, 4])
def test_grad_stats_split_paths(monkeypatch, splits):
    calls = force_splits(monkeypatch, splits)
    out, t, exact, _ = run_grad(150, 36, 40, torch.float32, 0.9, 0.7, 5, seed=4)
    assert calls, "the launcher did not take its split count from triton_ops.num_splits"
    for key in ("G", "y", "s"):
        assert_three_way(out[key], t[key], exact[key], f"{key} splits={splits}")


def test_grad_stats_mixed_dtypes_promote():
    """x and dy of different dtypes (autocast) are promoted, as the reference's fp32 math implies."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 20, generator=gen)
    dy = torch.randn(30, 18, generator=gen).half()
    G, y = torch.zeros(18, 20, device=DEVICE), torch.zeros(18, device=DEVICE)
    Gt, yt = torch.zeros(18, 20), torch.zeros(18)
    triton_ops.grad_stats(G, y, dy.to(DEVICE), x.to(DEVICE))
    reference.grad_stats(Gt, yt, dy, x)
    assert rel_err(G.cpu(), Gt) <= TOL["accumulate_fp32"] and rel_err(y.cpu(), yt) <= TOL["accumulate_fp32"]


# --------------------------------------------------------------------------------------------------
# Argument checks (no kernel runs)


def test_argument_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="shape"):
        triton_ops.sym_accumulate(torch.zeros(3, 3), x)  # a square accumulator: packed only
    with pytest.raises(ValueError, match="packed"):
        reference.sym_accumulate(torch.zeros(3, 3), x)
    with pytest.raises(TypeError, match="float32"):
        triton_ops.sym_accumulate(torch.zeros(6, dtype=torch.float64), x)
    with pytest.raises(TypeError, match="bool"):
        triton_ops.sym_accumulate(torch.zeros(6), x, torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="rows"):
        triton_ops.sym_accumulate(torch.zeros(6), x, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="contiguous"):
        triton_ops.sym_accumulate(torch.zeros(12)[::2], x)
    with pytest.raises(TypeError, match="bf16"):
        triton_ops.sym_accumulate(torch.zeros(6), x.long())
    G, y = torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="rows"):
        triton_ops.grad_stats(G, y, torch.randn(5, 2), x)
    with pytest.raises(ValueError, match="seq_ids"):
        triton_ops.grad_stats(G, y, torch.randn(4, 2), x, seq_sums=torch.zeros(2, 2))


def test_empty_inputs_are_no_ops():
    Z = torch.ones(6)
    triton_ops.sym_accumulate(Z, torch.zeros(0, 3))
    G, y = torch.ones(2, 3), torch.ones(2)
    triton_ops.grad_stats(G, y, torch.zeros(0, 2), torch.zeros(0, 3))
    assert torch.equal(Z, torch.ones(6)) and torch.equal(G, torch.ones(2, 3)) and torch.equal(y, torch.ones(2))


def test_float64_inputs_take_the_reference_path():
    x = torch.randn(7, 5, dtype=torch.float64)
    Z, Zr = torch.zeros(15), torch.zeros(15)
    triton_ops.sym_accumulate(Z, x)
    reference.sym_accumulate(Zr, x)
    assert torch.equal(Z, Zr)


# --------------------------------------------------------------------------------------------------
# End to end: a statistics pass with the Triton backend equals the torch backend


@pytest.mark.parametrize("token_mask,output_fisher", [("attention", "diagonal"), ("labels", "sequence_lowrank")])
def test_collect_statistics_triton_equals_torch(token_mask, output_fisher):
    model = tiny_llama(seed=1, hidden=32, layers=1)
    if HAS_CUDA:
        model = model.cuda()
    examples = random_examples(5, seed=2, prompt_frac=0.3)
    stats = {}
    for backend in ("torch", "triton"):
        cfg = LoraDAConfig(backend=backend, token_mask=token_mask, output_fisher=output_fisher, batch_size=3)
        stats[backend] = collect_statistics(model, examples, cfg, progress=False)
    ref, got = stats["torch"], stats["triton"]
    assert (got.num_examples, got.num_tokens) == (ref.num_examples, ref.num_tokens)
    tol = TOL["accumulate_fp32"]  # same model pass; only the accumulation order differs
    for g in ref.Z:
        assert rel_err(got.Z[g], ref.Z[g]) <= tol, g
    for name, st in ref.modules.items():
        assert rel_err(got.modules[name].G, st.G) <= tol, name
        assert rel_err(got.modules[name].y, st.y) <= tol, name
        if output_fisher == "sequence_lowrank":
            assert rel_err(got.modules[name].seq_sums, st.seq_sums) <= tol, name


# --------------------------------------------------------------------------------------------------
# GPU: bf16, large shapes, autotuning, tf32 option


# fp16 runs on the GPU through the small cases above; here bf16 (the interpreter cannot multiply bf16)
# and fp32 at sizes with many tiles and splits. Few flag combinations: each one is a compilation.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("n,d,p", [(5000, 576, 0.9), (3001, 1000, 0.5), (40, 2048, None)])
def test_sym_accumulate_gpu(n, d, p, dtype):
    out, torch_out, exact, _ = run_sym(n, d, dtype, p, seed=7)
    assert_three_way(out, torch_out, exact, f"Z {dtype} n={n} d={d}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,seqs", [
    (torch.bfloat16, 0), (torch.bfloat16, 8), (torch.bfloat16, 100), (torch.float32, 8), (torch.float32, 0)],
    ids=str)
def test_grad_stats_gpu(dtype, seqs):
    out, t, exact, _ = run_grad(3001, 1000, 1536, dtype, 0.9, 0.7, seqs, seed=8)
    for key in ("G", "y", "s"):
        if key in exact:
            assert_three_way(out[key], t[key], exact[key], f"{key} {dtype}")


@pytest.mark.gpu
def test_autotuning_keeps_earlier_sums(monkeypatch):
    """A first call on a new shape autotunes (several trial launches): the accumulators must end as
    ``before + one batch``, not ``before + trials x batch`` nor ``0 + batch``."""
    monkeypatch.setenv("LORA_DA_FAST_AUTOTUNE", "1")
    d, d_out = 848, 720  # shapes no other test uses: forces a fresh tuning run
    out, torch_out, exact, _ = run_sym(2048, d, torch.bfloat16, 0.8, seed=9)
    assert_three_way(out, torch_out, exact, "Z while autotuning")
    out, t, exact, _ = run_grad(2048, d_out, d, torch.bfloat16, 0.8, 0.8, 4, seed=9)
    for key in ("G", "y", "s"):
        assert_three_way(out[key], t[key], exact[key], f"{key} while autotuning")


@pytest.mark.gpu
def test_tf32_is_an_explicit_option(monkeypatch):
    monkeypatch.setattr(triton_ops, "FP32_INPUT_PRECISION", "tf32")
    out, _, exact, _ = run_sym(4096, 512, torch.float32, None, seed=10)
    assert rel_err(out, exact) <= TOL["accumulate_tf32"]
