"""The eigen-solve of the batched solver (docs/algorithm.md, "Solve"): a block LOBPCG whose iterations stay
on the stack's device, for the smallest eigenpairs of the operator ``M' = -alpha D D^T + beta' Zd^{-1}``
(:class:`.operator._Operator`, on the factors of :mod:`.factor`); ``sigma = ||D||_2`` from its last
basis with a Kato-Temple check (:func:`sigma_from_basis`); the setup's orthonormalisation and the
estimate of ``||Zd^{-1}||``; and the dense float64 solve of a stack (:func:`solve_dense`).

On a stack of ``s`` same-shape modules (``n = d_in``):

- **LOBPCG.** Basis ``[X, P, W]`` (``k``, ``kp`` and ``kw`` columns; ``[X, P, W, Zd W]`` when the variance
  term dominates), ``W`` the normalised residuals projected out of ``[X, P]`` once. Rayleigh-Ritz on the
  pencil ``(S^T M' S, S^T S)`` through a shifted Cholesky of the Gram matrix and one batched ``eigh`` on
  the device (one call for the whole stack while ``k + kp + kw <= 32``: cuSOLVER's batched Jacobi;
  torch loops over the stack above that size). ``P``, the part of the new Ritz vectors outside the old
  ``X``, is built and orthonormalised in coefficient space (Hetmaniuk-Lehoucq), so the basis stays
  well conditioned without a QR of the tall blocks.
- **One host synchronisation per iteration.** The residual norms and Ritz values are copied to the host
  without waiting (pinned memory on a GPU) before the ``eigh``, whose error check waits for the device:
  after it the host holds them and decides which modules have converged. A converged module is
  recorded, keeps iterating while other modules share its factor, and leaves the stack (with its
  factor) when the active factors are few enough to be worth a copy.

Stopping rule, per module: the Davis-Kahan bound ``||R_r||_F / (theta_{r+1} - theta_r - ||r_{r+1}||)`` on
the sine of the subspace angle below ``tol``, or the residual at rounding level.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from . import factor
from .operator import _mm, _Operator


# relative accuracy of sigma^2 = ||D||_2^2 (Kato-Temple bound): lora_B is divided by sigma, so half of
# this is the relative error it adds to lora_B @ lora_A (the contract allows 1e-4: 200x margin)
SIGMA2_TOL = 1e-6

# the Rayleigh-Ritz basis that torch's CUDA eigh solves for a whole stack in one call (batched Jacobi)
RR_BATCHED_MAX = 32

# Relative Cholesky shift of the Gram matrices of the Rayleigh-Ritz step, per working dtype: directions of
# the basis independent of the others by less than sqrt(shift) (relative) are damped instead of
# amplifying the rounding noise of the blocks; the Ritz pairs move by about the shift (relative), far
# below the stopping rule in float64, at the rounding level in float32.
GRAM_SHIFT = {torch.float64: 1e-14, torch.float32: 1e-6}


def _tiny(dtype: torch.dtype) -> float:
    return 1e-200 if dtype == torch.float64 else 1e-30


# --------------------------------------------------------------------------------------------------
# Small helpers of the setup (not of the iterations: these may wait for the device)


def _project_out(W: torch.Tensor, bases: Sequence[torch.Tensor], passes: int = 1) -> torch.Tensor:
    for _ in range(passes):
        for B in bases:
            W = W - _mm(B, B.transpose(-1, -2) @ W)
    return W


def orthonormalize(W: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``W`` (``[b, n, m]``, full column rank). CPU: Householder QR.
    GPU: CholeskyQR2 with a float64 Gram matrix (two GEMMs and an ``m x m`` factorisation: batched
    Householder QR of tall thin blocks is a loop of latency-bound calls there), Householder QR if the
    Gram matrix is not numerically definite."""
    if not factor.gpu_style(W):
        return torch.linalg.qr(W)[0]
    for _ in range(2):
        Gm = W.transpose(-1, -2).double() @ W.double()
        R, info = torch.linalg.cholesky_ex(Gm, upper=True)
        if bool((info != 0).any()):
            return torch.linalg.qr(W)[0]
        W = torch.linalg.solve_triangular(R.to(W.dtype), W, upper=True, left=False)
    return W


def orth_against(W: torch.Tensor, bases: Sequence[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Orthonormal columns spanning ``W`` projected out of the orthonormal ``bases``. Columns that vanish
    (an exact eigenvector's residual, a rank-deficient start) are replaced by random directions, so that
    the block keeps its shape and the Rayleigh-Ritz basis stays well conditioned."""
    W = _project_out(W, bases, passes=1)
    norms = torch.linalg.vector_norm(W, dim=-2)
    bad = ~(norms > _tiny(W.dtype)) | ~torch.isfinite(norms)
    if bool(bad.any()):
        rnd = torch.randn(W.shape, generator=gen, dtype=W.dtype, device=W.device)
        W = torch.where(bad[:, None, :], _project_out(rnd, bases, passes=2), torch.nan_to_num(W))
    W = W / torch.linalg.vector_norm(W, dim=-2, keepdim=True)
    Q = orthonormalize(W)
    if bases:  # "twice is enough" (Kahan-Parlett): a second projection after the normalisation
        Q = orthonormalize(_project_out(Q, bases, passes=1))
    return Q


def rayleigh_ritz_small(S: torch.Tensor, AS: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ritz values (ascending, float64) and coefficients of an orthonormal ``S`` (setup use)."""
    H = S.transpose(-1, -2).double() @ AS.double()
    theta, V = torch.linalg.eigh(0.5 * (H + H.transpose(-1, -2)))
    return theta, V.to(S.dtype)


def zinv_norm(L: torch.Tensor, Zinv: Optional[torch.Tensor], gen: torch.Generator, iters: int = 4) -> torch.Tensor:
    """Estimate of ``||Zd^{-1}||`` per factor: with the explicit inverse its largest diagonal entry (a
    lower bound within a factor ``n``, free); else a block power iteration with a Rayleigh-Ritz step on
    the triangular factors ``L`` (a lower bound within a few percent). It only scales the stopping rule,
    the preconditioning decision and the reports."""
    if Zinv is not None:
        return Zinv.diagonal(dim1=-2, dim2=-1).amax(-1).double()

    def zi(X):
        Y = torch.linalg.solve_triangular(L, X, upper=False)
        return torch.linalg.solve_triangular(L.transpose(-1, -2), Y, upper=True)

    X = torch.randn(L.shape[0], L.shape[-1], 2, generator=gen, dtype=L.dtype, device=L.device)
    for _ in range(iters):
        X = orthonormalize(zi(X))
    theta, _ = rayleigh_ritz_small(X, zi(X))
    return theta[:, -1].clamp(min=0)


# --------------------------------------------------------------------------------------------------
# Batched LOBPCG


def _eigh_small(At: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of a stack of small symmetric matrices (lower triangles), waiting for the device once.

    Up to ``RR_BATCHED_MAX`` columns, or off a GPU: ``torch.linalg.eigh`` where the matrices are (one
    batched cuSOLVER call on a GPU; its error check is the wait). Wider on a GPU, where torch would loop
    over the stack with one cuSOLVER call per matrix: on the host, the stack split over torch's CPU
    threads (one copy each way; host time grows with the stack over the cores)."""
    m = At.shape[-1]
    if not factor.gpu_style(At) or m <= RR_BATCHED_MAX:
        return torch.linalg.eigh(At)
    host = At.cpu()
    parts = min(host.shape[0], max(1, torch.get_num_threads()))
    if parts <= 1:
        theta, V = torch.linalg.eigh(host)
    else:
        chunks = torch.tensor_split(host, parts)
        with ThreadPoolExecutor(max_workers=parts) as pool:
            out = list(pool.map(torch.linalg.eigh, chunks))
        theta, V = torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    return theta.to(At.device, non_blocking=True), V.to(At.device, non_blocking=True)


def _rayleigh_ritz(GA: torch.Tensor, GB: torch.Tensor, k: int, kp: int, dt: torch.dtype
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz on the pencil ``(GA, GB)`` (``[b, m, m]`` Gram matrices of a basis ``S = [X, ...]``
    with unit columns, the first ``k`` of them the current ``X``), in float64 on the device.

    Returns the Ritz values (``[b, m]``, ascending) and the coefficients ``[Cx, Cp]`` (``[b, m, k + kp]``,
    in ``dt``): ``S Cx`` are the ``k`` lowest Ritz vectors (orthonormal) and ``S Cp`` the next LOBPCG
    direction ``P``: the part of the first ``kp`` Ritz vectors outside the old ``X``, orthogonal to
    ``S Cx``. In the whitened frame ``Q = S Lb^{-T}`` (``GB = Lb Lb^T``) the old ``X`` spans
    the first ``k`` coordinates (``Lb`` is triangular), so that part is the Ritz vectors' other rows.
    The shifts of the Gram matrices' diagonals are relative, so that nothing depends on the scale of the
    columns (Cholesky factorisations and the products ``S C`` are insensitive to it): the residual
    columns need no normalisation. A column exactly zero (an exact eigenvector's residual) breaks the
    factorisation: NaN for that item, which the host then finds broken and has solved densely."""
    GA, GB = GA.double(), GB.double()
    GB.diagonal(dim1=-2, dim2=-1).mul_(1 + GRAM_SHIFT[dt])
    Lb, _ = torch.linalg.cholesky_ex(GB)
    At = torch.linalg.solve_triangular(Lb, GA, upper=False)
    At = torch.linalg.solve_triangular(Lb, At.transpose(-1, -2), upper=False)  # Lb^-1 GA Lb^-T
    # (a broken item's NaN must not fail the whole stack's eigh: it is caught on the host, solved densely)
    theta, V = _eigh_small(At.nan_to_num_())  # (lower triangle; waits for the device: the one sync)
    Cw = V[..., :k]
    if kp:
        # P: the rows of the first kp Ritz vectors outside the old X, projected out of the new X (onto the
        # other Ritz vectors V_r): V_r T with T = V_r^T [0; V[k:, :kp]], orthonormalised (Cholesky QR of T,
        # shifted: a rank-deficient T gives short columns, not a breakdown). Unit, orthogonal P columns
        # keep the next Gram matrix well conditioned (without it the iteration diverges once the
        # residuals reach rounding level).
        Vr = V[..., k:]
        T = Vr[..., k:, :].transpose(-1, -2) @ V[..., k:, :kp]  # [m - k, kp]
        TT = T.transpose(-1, -2) @ T
        TT.diagonal(dim1=-2, dim2=-1).mul_(1 + GRAM_SHIFT[dt])  # (relative: short columns stay independent)
        Rt, _ = torch.linalg.cholesky_ex(TT, upper=True)
        Cw = torch.cat([Cw, Vr @ torch.linalg.solve_triangular(Rt, T, upper=True, left=False)], dim=-1)
    C = torch.linalg.solve_triangular(Lb.transpose(-1, -2), Cw, upper=True)
    return theta, C.to(dt)


@dataclass
class EigResult:
    theta: torch.Tensor  # [b, k] float64 (host), ascending Ritz values
    X: torch.Tensor  # [b, n, k] Ritz vectors (working dtype, device)
    S: Optional[torch.Tensor]  # [b, n, k + kp] the basis [X, P] when the item stopped (when track=True)
    AS: Optional[torch.Tensor]  # [b, n, k + kp] op(S)
    YS: Optional[torch.Tensor]  # [b, n, k + kp] Zd^{-1} S
    ncols: Optional[torch.Tensor]  # [b] columns of S that are set (k when the item stopped at once)
    res: torch.Tensor  # [b, k] float64 (host) residual norms
    anorm: torch.Tensor  # [b] float64 (host) estimate of ||A||
    iters: torch.Tensor  # [b] int64 (host)
    converged: torch.Tensor  # [b] bool (host)


def _criterion(th: np.ndarray, rn: np.ndarray, anorm: np.ndarray, nwant: int, tol: Optional[float],
               abs_tol: float, value_tol: Optional[float]) -> np.ndarray:
    """The stopping rule (host, on the copied Ritz values and residual norms)."""
    k = th.shape[1]
    rw = np.sqrt((rn[:, :nwant] ** 2).sum(-1))
    small = rw <= abs_tol * anorm
    if tol is None:
        ok = np.ones_like(small)
    elif k > nwant:
        gap = th[:, nwant] - th[:, nwant - 1] - rn[:, nwant]
        ok = ((rw <= tol * gap) & (gap > 0)) | small
    else:
        ok = small
    if value_tol is not None:
        # |theta_0 - lambda| <= min(||r_0||, ||r_0||^2 / gap) (Kato-Temple, gap to the next Ritz value)
        r0 = rn[:, 0]
        if k > 1:
            gap0 = th[:, 1] - th[:, 0] - rn[:, 1]
            with np.errstate(over="ignore"):
                err0 = np.where(gap0 > 0, np.minimum(r0, r0 ** 2 / np.maximum(gap0, 1e-300)), r0)
        else:
            err0 = r0
        ok &= (err0 <= value_tol * np.abs(th[:, 0])) | (r0 <= abs_tol * anorm)
    return ok


def lobpcg(op: _Operator, X: torch.Tensor, nwant: int, *, gen: torch.Generator, tol: Optional[float],
           abs_tol: float, maxiter: int, kw: Optional[int] = None, kp: Optional[int] = None,
           value_tol: Optional[float] = None, anorm_floor: Optional[torch.Tensor] = None,
           precond_floor: Optional[torch.Tensor] = None, track: bool = False,
           compact: float = 0.5) -> EigResult:
    """Smallest eigenpairs of the symmetric operator ``op`` on a stack (``X``: ``[b, n, k]`` start block).

    ``kw`` residual columns are expanded per iteration (default ``k``) and ``kp`` LOBPCG directions kept
    (default ``k``). An item stops when ``||R_{:nwant}||_F <= tol * (theta_{nwant} - theta_{nwant-1} -
    ||r_{nwant}||)`` (Davis-Kahan bound on the subspace sine) or ``||R_{:nwant}||_F <= abs_tol * ||A||``
    with ``||A||`` estimated as ``max(|Ritz values|, anorm_floor)`` (``tol=None``: no condition on the
    vectors); with ``value_tol`` also ``min(||r_0||, ||r_0||^2 / gap_0) <= value_tol * |theta_0|``.
    ``precond_floor``: when it exceeds a tenth of ``|theta_0|`` of the start for some item (the variance
    term dominates), ``Zd R`` is added to the search space. ``track``: also return ``A X`` and
    ``Zd^{-1} X``. When the factors with an active module are at most ``compact`` of the operator's, the
    others leave it (a copy of the active factors).
    """
    b, n, k = X.shape
    dt, dev = X.dtype, X.device
    kw = k if kw is None else min(kw, k)
    kp = min(k if kp is None else kp, kw)  # (the first iteration's P comes from the kw residual columns)
    tiny = _tiny(dt)
    floor_h = (anorm_floor.double().cpu().numpy() if anorm_floor is not None else np.zeros(b))

    # setup: orthonormal start, its Ritz vectors
    X = orth_against(X, [], gen)
    AX, YX = op.apply(X)
    theta, V = rayleigh_ritz_small(X, AX)
    X, AX, YX = _mm(X, V), _mm(AX, V), _mm(YX, V)
    zd = False
    if precond_floor is not None:
        zd = bool((precond_floor.double().to(dev) > 0.1 * theta[:, 0].abs()).any())
    nz = 2 if zd else 1
    M = k + kp + nz * kw  # basis [X, P, W (, Zd W)]
    M0 = k + nz * kw  # the first iteration has no P

    def buffers(nb, m):  # [S, A S] side by side (one Gram product), and Zd^{-1} S
        return (torch.empty(nb, n, 2 * m, dtype=dt, device=dev),
                torch.empty(nb, n, m, dtype=dt, device=dev) if track else None)

    B, Y = buffers(b, M0)
    B[..., :k] = X
    B[..., M0:M0 + k] = AX
    if track:
        Y[..., :k] = YX
    del X, AX, YX, V
    nxt = [buffers(b, M), buffers(b, M)]
    theta = theta[:, :k]
    thmax = theta[:, -1:]  # largest Ritz value of the last Rayleigh-Ritz basis (for ||A||)
    host = torch.empty(b, 2 * k + 1, dtype=torch.float64, pin_memory=dev.type == "cuda")

    out_theta = np.zeros((b, k))
    out_res = np.zeros((b, k))
    out_anorm = np.zeros(b)
    iters = np.zeros(b, dtype=np.int64)
    conv = np.zeros(b, dtype=bool)
    out_X = torch.empty(b, n, k, dtype=dt, device=dev)
    if track:  # the basis [X, P] and its images, for sigma
        out_S = torch.empty(b, n, k + kp, dtype=dt, device=dev)
        out_AS, out_YS = torch.empty_like(out_S), torch.empty_like(out_S)
        out_nc = np.full(b, k)
    gid = np.arange(b)  # global index of each item of the current operator and buffers
    active = np.ones(b, dtype=bool)  # over the current items
    kpc, Mc = 0, M0  # P columns and basis width of the current buffer
    # On a GPU the host learns which modules have converged after the Rayleigh-Ritz step's eigh (its one
    # wait for the device): a module is found converged one iteration late. Where waiting is free (CPU)
    # it is decided as soon as the residuals are known, before the operator is applied again.
    early = not factor.gpu_style(B)

    def record(it: int, Bc: torch.Tensor, Yc: Optional[torch.Tensor]) -> bool:
        """Record the modules that have converged (or run out of iterations); whether any is left."""
        if copied is not None:
            copied.synchronize()
        hvals = hv.numpy()
        th_h, rn_h = hvals[:, :k], hvals[:, k:2 * k]
        an_h = np.maximum(np.maximum(np.abs(th_h[:, 0]), np.abs(hvals[:, 2 * k])), floor_h[gid])
        ok = _criterion(th_h, rn_h, an_h, nwant, tol, abs_tol, value_tol)
        broken = ~(np.isfinite(th_h).all(-1) & np.isfinite(rn_h).all(-1))  # (solved densely by the caller)
        ok &= ~broken
        done = (ok | broken | (it == maxiter)) & active
        if done.any():
            pos = np.nonzero(done)[0]
            g = gid[pos]
            out_theta[g], out_res[g], out_anorm[g] = th_h[pos], rn_h[pos], an_h[pos]
            iters[g] = it
            conv[g] = ok[pos]
            tpos = torch.as_tensor(pos, device=dev)
            tg = torch.as_tensor(g, device=dev)
            out_X[tg] = Bc[tpos, :, :k]
            if track:
                kx = k + kpc
                out_S[tg, :, :kx] = Bc[tpos, :, :kx]
                out_AS[tg, :, :kx] = Bc[tpos, :, Mc:Mc + kx]
                out_YS[tg, :, :kx] = Yc[tpos, :, :kx]
                out_nc[g] = kx
            active[pos] = False
        return bool(active.any())

    def compaction() -> Optional[torch.Tensor]:
        """The positions of the items to keep when the factors whose modules have all converged should
        leave the operator (few enough factors remain active), else None; updates the bookkeeping."""
        nonlocal gid, active
        c = op.per_factor
        if not c or active.all():
            return None
        fact = active.reshape(-1, c).any(-1)
        if fact.sum() > compact * fact.size:
            return None
        kpos = np.nonzero(np.repeat(fact, c))[0]
        gid, active = gid[kpos], active[kpos]
        return torch.as_tensor(kpos, device=dev)

    for it in range(maxiter + 1):
        X = B[..., :k]
        AX = B[..., Mc:Mc + k]
        R = torch.addcmul(AX, X, theta.to(dt)[:, None, :], value=-1)
        rn = torch.linalg.vector_norm(R, dim=-2)
        hv = host[: X.shape[0]]
        hv.copy_(torch.cat([theta, rn.double(), thmax], dim=-1), non_blocking=True)
        copied = None
        if dev.type == "cuda":  # (the eigh below waits for the device anyway: this wait is then free)
            copied = torch.cuda.Event()
            copied.record()
        if early:  # (CPU: waiting is free; converged modules leave before the next application)
            if not record(it, B, Y):
                break
            keep = compaction()
            if keep is not None:
                op = op.compact(keep, with_L=zd)
                B, Y, R = B[keep], (Y[keep] if track else None), R[keep]
                nxt = [buffers(keep.numel(), M), buffers(keep.numel(), M)]
                theta, thmax = theta[keep], thmax[keep]
                X, AX = B[..., :k], B[..., Mc:Mc + k]
        # W: the residuals (their scale does not matter: see _rayleigh_ritz), then Zd W (normalised);
        # projected out of [X, P]
        W = B[..., k + kpc:k + kpc + kw]
        W.copy_(R[..., :kw])
        del R
        if zd:
            ZW = op.zd_mul(W)
            torch.div(ZW, torch.linalg.vector_norm(ZW, dim=-2, keepdim=True).clamp(min=tiny),
                      out=B[..., k + kpc + kw:Mc])
            del ZW
        Wall = B[..., k + kpc:Mc]
        XP = B[..., :k + kpc]
        Wall.baddbmm_(XP, XP.transpose(-1, -2) @ Wall, alpha=-1)
        op.apply(Wall, out=B[..., Mc + k + kpc:], yout=Y[..., k + kpc:] if track else None)
        S, AS = B[..., :Mc], B[..., Mc:]
        if dt != torch.float64:  # Gram matrices of float32 blocks, in float64
            Sd = S.double()
            GB, GA = Sd.transpose(-1, -2) @ Sd, Sd.transpose(-1, -2) @ AS.double()
            del Sd
        elif kpc:
            G2 = S.transpose(-1, -2) @ B
            GB, GA = G2[..., :Mc], G2[..., Mc:]
        else:  # (S and A S are not adjacent in the first buffer)
            GB, GA = S.transpose(-1, -2) @ S, S.transpose(-1, -2) @ AS
        th_all, C = _rayleigh_ritz(GA, GB, k, kp, dt)
        # (the eigh has waited for the device: the copied Ritz values and residual norms are on the host)
        if not early and not record(it, B, Y):
            break
        # the next X and P, and their images
        (Bn, Yn), nxt = nxt[0], nxt[::-1]
        kx = k + kp
        torch.matmul(S, C, out=Bn[..., :kx])
        torch.matmul(AS, C, out=Bn[..., M:M + kx])
        if track:
            torch.matmul(Y, C, out=Yn[..., :kx])
        B, Y = Bn, Yn
        theta, thmax = th_all[:, :k], th_all[:, -1:]
        kpc, Mc = kp, M
        if not early:
            keep = compaction()
            if keep is not None:
                op = op.compact(keep, with_L=zd)
                B, Y = B[keep], (Y[keep] if track else None)
                nxt = [buffers(keep.numel(), M), buffers(keep.numel(), M)]
                theta, thmax = theta[keep], thmax[keep]
    if not track:
        out_S = out_AS = out_YS = out_nc = None
    return EigResult(torch.from_numpy(out_theta), out_X, out_S, out_AS, out_YS,
                     None if out_nc is None else torch.from_numpy(out_nc), torch.from_numpy(out_res),
                     torch.from_numpy(out_anorm), torch.from_numpy(iters), torch.from_numpy(conv))


def sigma_from_basis(S: torch.Tensor, AS: torch.Tensor, YS: torch.Tensor, bprime: torch.Tensor, alpha: float
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sigma^2, ok)``: the top Ritz value of ``D D^T = (b' Zd^{-1} - M') / alpha`` on the span of ``S``
    (the last LOBPCG basis ``[X, P]``, nearly orthonormal; from ``M' S`` and ``Zd^{-1} S``, no operator
    pass), and whether its Kato-Temple bound ``min(||r||, ||r||^2 / gap)`` (gap to the next Ritz value
    less its residual) is within ``SIGMA2_TOL`` of it. Host tensors."""
    dt = S.dtype
    DS = (YS * bprime.to(dt)[:, None, None] - AS) / alpha
    GB = (S.transpose(-1, -2) @ S).double()
    GB.diagonal(dim1=-2, dim2=-1).mul_(1 + GRAM_SHIFT[dt])
    Lb, _ = torch.linalg.cholesky_ex(GB)
    H = (S.transpose(-1, -2) @ DS).double()
    Ht = torch.linalg.solve_triangular(Lb, H, upper=False)
    Ht = torch.linalg.solve_triangular(Lb, Ht.transpose(-1, -2), upper=False)
    rho, Z = torch.linalg.eigh(Ht.nan_to_num_())  # (broken items: solved densely later)
    C2 = torch.linalg.solve_triangular(Lb.transpose(-1, -2), Z[..., -2:], upper=True).to(dt)
    Rz = _mm(DS, C2) - _mm(S, C2) * rho[:, None, -2:].to(dt)
    rn = torch.linalg.vector_norm(Rz.double(), dim=-2).cpu()
    rho = rho.cpu()
    top, r1 = rho[:, -1], rn[:, -1]
    gap = top - rho[:, -2] - rn[:, -2] if rho.shape[-1] > 1 else torch.zeros_like(top)
    err = torch.where(gap > 0, torch.minimum(r1, r1 ** 2 / gap.clamp(min=1e-300)), r1)
    ok = (err <= SIGMA2_TOL * top.abs()) & (top > 0)
    return top, ok


def solve_dense(op: _Operator, alpha: float, bprime: Optional[torch.Tensor], r: int, k: int,
                L: Optional[torch.Tensor] = None, full: Optional[list] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense float64 solve of a stack: ``(A, theta[:k], res, anorm, sigma2)``; ``L``: float64 factors
    (default: the operator's, upcast); ``full``: a list that receives every eigenvalue and eigenvector
    (``w``, ``V``)."""
    L = op.L.double() if L is None else L
    D = -torch.cholesky_solve(op.G.double().transpose(-1, -2) * op.u.double()[:, None, :], L)
    DDt = D @ D.transpose(-1, -2)
    if D.shape[-1] < D.shape[-2]:
        sigma2 = torch.linalg.eigvalsh(D.transpose(-1, -2) @ D)[:, -1]
    else:
        sigma2 = torch.linalg.eigvalsh(0.5 * (DDt + DDt.transpose(-1, -2)))[:, -1]
    M = -alpha * DDt
    if bprime is not None:
        M = M + bprime.double()[:, None, None] * torch.cholesky_inverse(L)
    M = 0.5 * (M + M.transpose(-1, -2))
    w, V = torch.linalg.eigh(M)
    if full is not None:
        full.extend([w, V])
    A = V[..., :r]
    res = torch.linalg.vector_norm(M @ A - A * w[:, None, :r], dim=-2).amax(-1)
    anorm = w.abs().amax(-1)
    kk = min(k, w.shape[-1])
    return A, w[:, :kk], res, anorm, sigma2


def flops_per_iteration(n: int, d_out: int, k: int, cols: int) -> float:
    """Floating-point operations of one LOBPCG iteration on one module (``cols`` columns applied)."""
    return cols * (4 * n * n + 4 * n * d_out) + 8 * n * (k + 2 * cols) ** 2


__all__ = ["EigResult", "SIGMA2_TOL", "lobpcg", "orth_against", "orthonormalize", "sigma_from_basis",
           "solve_dense", "zinv_norm"]
