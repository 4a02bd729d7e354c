"""How far one fp32 ulp of the statistics moves ``lora_B @ lora_A``, to first order, from what a solve
already has (docs/algorithm.md, "Is the result determined by the data?").

Every entry of ``Z`` and ``G`` moves by one fp32 ulp, up or down at random (:func:`one_ulp`, the
perturbation that ``sensitivity="always"`` applies before solving a second time). With
``M' = -a D D^T + b Zd^{-1}`` (``D = -Zd^{-1} G^T diag(u)``; ``M'`` is ``sigma^2 M``, same eigenvectors),
``Y = Zd^{-1} V_r``:

    dD        = -Zd^{-1} (dZ D + dG^T diag(u))
    dM' V_r   = -a (dD (D^T V_r) + D (dD^T V_r)) - b Zd^{-1} dZ Y
    dV_r      = sum_{k > r} v_k (v_k^T dM' v_j) / (lambda_j - lambda_k)           (column j)
    dP / |P|  = || (dD^T V_r + D^T dV_r) V_r^T + (D^T V_r) dV_r^T ||_F / ||D^T V_r||_F

(``P = D^T V_r V_r^T / sigma``; the one-ulp change of ``sigma`` and of ``u`` only rescales by about one
ulp and is left out). Every product has ``r`` columns: ``O(d_in^2 r + d_in d_out r)`` per module, next to
the ``O(d_in^3)`` of the eigendecomposition or the many ``r + extra``-column products of the iterations.

With every eigenvector at hand (dense solves, the token path) the sum is exact to first order: measured
against a second solve on the same move, 0.95-1.11x on the tiny random Llama and SmolLM2-135M
(benchmarks/RESULTS.md). The token path moves the tokens ``X`` and ``Delta`` instead (what its second
solve moves), which also tilts their span; the complement of the span is one eigenspace of ``M'``. An
iterative solve has the ``r`` wanted Ritz vectors and a few guard Ritz vectors: the sum runs over the
guards, and the rest of ``dM' v_j`` is solved in a two-dimensional Krylov space (:func:`_galerkin2`):
0.85-6x the measured change on SmolLM2-135M (5342 tokens), no flag missed.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Optional

import torch

from ..triangle import unpack_symmetric

ULP32 = 2.0 ** -23  # one fp32 ulp, relative (at a mantissa of 1)

Apply = Callable[[torch.Tensor], torch.Tensor]


def one_ulp(t: Optional[torch.Tensor], name: str, seed: int, same_rows: bool = False) -> Optional[torch.Tensor]:
    """``t`` with every entry moved by one fp32 ulp, up or down at random (the signs drawn from ``seed``
    and ``name``, so a tensor gets the same perturbation whichever modules are solved with it). fp32
    tensors move to their neighbouring fp32 numbers; others (float64 or half-precision tokens) by the
    relative amount ``2^-23``, in float64. ``same_rows``: equal rows move alike (the inputs of tokens
    with the same prefix, e.g. every example's first token, are equal in every run: independent
    perturbations would invent directions the data never has)."""
    if t is None:
        return None
    gen = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % (2 ** 63))
    if same_rows and t.dim() == 2 and t.shape[0] > 0:
        rows, inverse = torch.unique(t.cpu(), dim=0, return_inverse=True)
        up = _random_bits(rows.shape, gen)[inverse].to(t.device)
    else:
        up = _random_bits(t.shape, gen).to(t.device)
    sign = up.to(torch.float32 if t.dtype == torch.float32 else torch.float64).mul_(2).sub_(1)  # +-1 (where and
    if t.dtype == torch.float32:  # masked_fill with a bool mask are several times slower on a CPU)
        return torch.nextafter(t, sign.mul_(float("inf")))
    t64 = t.to(torch.float64)
    return t64 * sign.mul_(ULP32).add_(1)


def _random_bits(shape, gen: torch.Generator) -> torch.Tensor:
    """Independent fair random booleans of ``shape`` (CPU): eight from each random byte (drawing one
    boolean per entry costs ~8x more)."""
    n = math.prod(shape)
    byte = torch.randint(0, 256, ((n + 7) // 8,), generator=gen, dtype=torch.uint8)
    bits = (byte[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:n].bool().reshape(shape)


def ulp_step(t: torch.Tensor, name: str, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``one_ulp(t) - t`` in ``dtype``: the perturbation itself (the difference of neighbouring floats is
    exact in their own dtype)."""
    moved = one_ulp(t, name, seed)
    return (moved - t.to(moved.dtype)).to(dtype)


def move_seed(cfg) -> int:
    """The seed of the one-ulp moves (``LoraDAConfig.seed + 1``): the estimate and ``sensitivity="always"``
    draw the same moves."""
    return cfg.seed + 1


def z_step(stats, group: str, seed: int, dtype: torch.dtype = torch.float64, device=None,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense one-ulp move of ``group``'s input factor: its stored packed triangle moved (as
    ``sensitivity="always"`` moves it, name ``Z.<group>``), the difference mirrored."""
    z = stats.Z[group]
    moved = one_ulp(z, f"Z.{group}", seed)
    return unpack_symmetric(moved - z.to(moved.dtype), dtype, device, out)


def g_step(stats, name: str, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The one-ulp move of module ``name``'s ``G`` (name ``G.<module>``, as ``sensitivity="always"``)."""
    return ulp_step(stats.modules[name].G, f"G.{name}", seed, dtype)


def first_order_change(*, zinv: Apply, gtu_mul: Apply, ug_mul: Apply, dz_mul: Apply, dgu_mul: Apply,
                       dgu_t_mul: Apply, a: float, b: Optional[torch.Tensor], Vr: torch.Tensor,
                       theta_r: torch.Tensor, W: torch.Tensor, theta_w: torch.Tensor, galerkin: bool = False,
                       rest_value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first-order relative change of ``P`` (see the module docstring) for a stack of modules.

    Shapes: ``Vr`` ``[s, n, r]`` the wanted eigenvectors of ``M'`` with eigenvalues ``theta_r``
    ``[s, r]``; ``W`` ``[s, n, m]`` orthonormal vectors beyond them (every other eigenvector, or the guard
    Ritz vectors of an iterative solve) with values ``theta_w`` ``[s, m]``. The products: ``zinv`` =
    ``Zd^{-1} X``, ``gtu_mul`` = ``G^T diag(u) X`` (``X``: ``[s, d_out, c]``), ``ug_mul`` = ``diag(u) G X``
    (so ``D X = -Zd^{-1} G^T diag(u) X`` and ``D^T X = -diag(u) G Zd^{-1} X``), ``dz_mul`` = ``dZ X``,
    ``dgu_mul`` = ``dG^T diag(u) X``, ``dgu_t_mul`` = its transpose. ``b``: ``[s]`` or ``None``
    (``beta = 0``). Five products with ``Zd^{-1}`` (two of them of ``2 r`` columns) and two passes over
    ``G`` and its move; with ``galerkin`` two more of each.

    The part of ``dM' V_r`` outside ``V_r`` and ``W`` (``rest``), when ``W`` is not every other
    eigenvector: ``rest_value`` (``[s]``): it lies in an eigenspace of ``M'`` with this one eigenvalue
    (the complement of the inputs' span on the token path) and is taken exactly; ``galerkin``: each
    column's correction ``-(M' - lambda_j)^{-1} rest_j`` is approximated in a two-dimensional Krylov space
    (:func:`_galerkin2`).
    Returns ``[s]`` float64.
    """
    r = Vr.shape[-1]
    Y = zinv(Vr)
    Z2 = zinv(dz_mul(Y))  # Zd^{-1} dZ Zd^{-1} V_r
    UG = ug_mul(torch.cat([Y, Z2], dim=-1))  # one pass over G for both
    T1 = -UG[..., :r]  # D^T V_r
    dDtV = UG[..., r:] - dgu_t_mul(Y)  # dD^T V_r = -(D^T dZ Zd^{-1} V_r + diag(u) dG Zd^{-1} V_r)
    A2 = zinv(gtu_mul(torch.cat([T1, dDtV], dim=-1)))  # -(D D^T V_r, D dD^T V_r)
    B = zinv(dz_mul(-A2[..., :r]) + dgu_mul(T1))  # -dD D^T V_r
    # dM' V_r = -a (dD D^T V_r + D dD^T V_r) - b Zd^{-1} dZ Zd^{-1} V_r
    dMV = a * (B + A2[..., r:])
    if b is not None:
        dMV = dMV - b.to(dMV.dtype)[:, None, None] * Z2
    C = W.transpose(-1, -2) @ dMV  # [s, m, r]
    denom = theta_r.to(C.dtype)[:, None, :] - theta_w.to(C.dtype)[:, :, None]
    X = C / torch.where(denom == 0, torch.full_like(denom, -torch.finfo(C.dtype).tiny), denom)
    dV = W @ X
    if rest_value is not None or galerkin:
        rest = dMV - Vr @ (Vr.transpose(-1, -2) @ dMV) - W @ C
        if rest_value is not None:
            dV = dV + rest / (theta_r.to(C.dtype) - rest_value.to(C.dtype)[:, None])[:, None, :]
        else:
            def m_mul(Xm: torch.Tensor) -> torch.Tensor:  # M' X = -a Zd^{-1} G^T u^2 G Zd^{-1} X + b Zd^{-1} X
                Ym = zinv(Xm)
                out = -a * zinv(gtu_mul(ug_mul(Ym)))
                return out if b is None else out + b.to(Xm.dtype)[:, None, None] * Ym

            dV = dV - _galerkin2(m_mul, torch.cat([Vr, W], dim=-1), rest, theta_r.to(C.dtype))
    term1 = dDtV - ug_mul(zinv(dV))  # dD^T V_r + D^T dV
    # the two parts of dP are orthogonal (rows in span V_r and orthogonal to it): add their squares
    t1 = torch.linalg.matrix_norm(term1.double()) ** 2
    t2 = torch.linalg.matrix_norm((T1 @ dV.transpose(-1, -2)).double()) ** 2
    pnorm = torch.linalg.matrix_norm(T1.double()).clamp(min=torch.finfo(torch.float64).tiny)
    change = (t1 + t2).sqrt() / pnorm
    return torch.nan_to_num(change.double(), nan=float("inf"))


def _galerkin2(m_mul: Apply, Q: torch.Tensor, rest: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``(M' - theta_j)^{-1} rest_j`` for each column ``j``, approximated in ``span{rest_j, M' rest_j}``
    made orthogonal to ``Q`` (the wanted and guard vectors): a 2 x 2 projected system per column (two
    products with ``M'``). Measured with exact guard vectors on SmolLM2-135M (210 modules): 0.99-1.0x the
    exact first-order sum; along ``rest_j`` alone (one product): 0.93-1.0x, but 0.3-5.9x with the
    eigensolver's guard Ritz vectors against 0.9-3.7x."""
    tiny = torch.finfo(rest.dtype).tiny

    def unit(x):
        nrm = torch.linalg.vector_norm(x, dim=-2, keepdim=True)
        return x / nrm.clamp(min=tiny), nrm

    def dot(x, y):
        return (x * y).sum(dim=-2)  # [s, r]

    K1, b1 = unit(rest)
    AK1 = m_mul(K1)
    x = AK1
    for _ in range(2):  # twice is enough
        x = x - Q @ (Q.transpose(-1, -2) @ x)
        x = x - K1 * dot(K1, x)[:, None, :]
    K2, nx = unit(x)
    AK2 = m_mul(K2)
    h11, h22 = dot(K1, AK1) - theta, dot(K2, AK2) - theta
    h12 = 0.5 * (dot(K1, AK2) + dot(K2, AK1))  # symmetric in exact arithmetic
    b1, nx = b1[:, 0, :], nx[:, 0, :]
    two = nx > 1e-12 * b1.clamp(min=tiny)
    det = h11 * h22 - h12 * h12
    ok = two & (det != 0)
    y1 = torch.where(ok, h22 * b1 / torch.where(ok, det, torch.ones_like(det)), b1 / h11)
    y2 = torch.where(ok, -h12 * b1 / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(b1))
    out = K1 * y1[:, None, :] + K2 * y2[:, None, :]
    return torch.where(b1[:, None, :] > 0, out, torch.zeros_like(out))
