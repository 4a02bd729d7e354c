"""The packed layout of the input factors (lora_da_fast.triangle) and FisherStatistics' use of it."""
import pytest
import torch

from lora_da_fast import FisherStatistics, ModuleStatistics
from lora_da_fast import triangle
from lora_da_fast.ops import reference
from lora_da_fast.triangle import (pack_symmetric, pack_upper, packed_diagonal, packed_dim, packed_size, row_offsets,
                                   unpack_symmetric)

from .helpers import rel_err
from .tolerances import TOL


@pytest.fixture(params=["indexed", "masked"])
def cpu_path(request, monkeypatch):
    """Both ways of moving entries: cached index vectors (CPU, small widths) and boolean masks (GPUs, and
    CPU widths above MAX_INDEXED_DIM)."""
    if request.param == "masked":
        monkeypatch.setattr(triangle, "MAX_INDEXED_DIM", 0)
        monkeypatch.setattr(reference, "MAX_INDEXED_DIM", 0)
    return request.param


@pytest.mark.parametrize("d", [1, 2, 5, 33, 64])
def test_layout_is_row_major_upper_triangle(d, cpu_path):
    Z = torch.randn(d, d, generator=torch.Generator().manual_seed(d))
    p = pack_upper(Z)
    assert p.shape == (packed_size(d),) and packed_dim(p.numel()) == d
    assert torch.equal(p, Z[tuple(torch.triu_indices(d, d))])  # the order of triu_indices
    i, j = torch.triu_indices(d, d)
    offsets = row_offsets(d)
    assert torch.equal(offsets[i] + (j - i), torch.arange(p.numel()))  # i d - i (i - 1) / 2 + (j - i)
    assert torch.equal(packed_diagonal(p), Z.diagonal())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unpack_is_the_exact_mirror(dtype, cpu_path):
    d = 37
    p = torch.randn(packed_size(d), generator=torch.Generator().manual_seed(1))
    S = unpack_symmetric(p, dtype)
    assert S.dtype == dtype and torch.equal(S, S.T)
    assert torch.equal(pack_upper(S), p.to(dtype))
    out = torch.full((2, d, d), float("nan"), dtype=dtype)
    unpack_symmetric(p, out=out[1])  # into one matrix of a stack
    assert torch.equal(out[1], S) and torch.isnan(out[0]).all()


def test_pack_symmetric_is_the_symmetric_part():
    Z = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(unpack_symmetric(pack_symmetric(Z)), 0.5 * (Z + Z.T))
    S = Z + Z.T
    assert torch.equal(pack_symmetric(S), pack_upper(S))  # exactly symmetric: the same bits


@pytest.mark.parametrize("d,n", [(5, 9), (150, 40), (300, 257), (129, 0)])
def test_reference_accumulation_equals_the_square_one(d, n, cpu_path):
    """The row-block accumulation into the packed triangle against a square fp32 ``addmm_`` (what it
    replaced) and a float64 product: equal to the square one within fp32 summation (bit for bit on the
    machines we tried, not asserted) and to float64 within the accumulation tolerance."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(n, d, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.8
    z0 = torch.randn(d, d, generator=gen)
    square = z0 + z0.T
    packed = pack_upper(square)
    reference.sym_accumulate(packed, x, mask)
    xs = x[mask]
    square.addmm_(xs.T, xs)
    exact = pack_upper((z0 + z0.T).double() + xs.double().T @ xs.double())
    assert rel_err(packed.double(), exact) <= TOL["accumulate_fp32"]
    assert rel_err(packed, pack_upper(square)) <= TOL["accumulate_fp32"]


def test_bad_sizes_are_refused():
    for n in (2, 4, 7):
        with pytest.raises(ValueError, match="packed upper triangle"):
            packed_dim(n)
    with pytest.raises(ValueError, match="square"):
        pack_upper(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="4x4"):
        unpack_symmetric(torch.zeros(10), out=torch.zeros(3, 3))


def test_statistics_keep_Z_packed_and_expand_one_group():
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(5, 5, generator=gen)
    dense = v @ v.T
    st = ModuleStatistics("g", torch.randn(2, 5, generator=gen), torch.rand(2, generator=gen))
    stats = FisherStatistics({"m": st}, {"g": dense}, 3, 9)  # a square matrix given: stored packed
    assert stats.Z["g"].shape == (15,) and stats.z_dim("g") == 5
    assert torch.equal(stats.dense_Z("g"), 0.5 * (dense + dense.T))
    assert stats.dense_Z("g", torch.float64).dtype == torch.float64
    again = FisherStatistics({"m": st}, {"g": stats.Z["g"]}, 3, 9)  # packed given: kept as is
    assert again.Z["g"] is stats.Z["g"]
    with pytest.raises(ValueError, match="packed triangle"):
        FisherStatistics({"m": st}, {"g": torch.zeros(2, 3)}, 3, 9)
    with pytest.raises(ValueError, match="packed upper triangle"):
        FisherStatistics({"m": st}, {"g": torch.zeros(14)}, 3, 9)
