"""Batched LoRA-DA solver: every module's subspace computed in stacks of same-shape problems.

Same result as :func:`lora_da_fast.solve.reference.solve_reference` (docs/algorithm.md, "Solve") up to the
accuracy contract, much faster. This module plans and drives the work; the factorisations, the operator
and the eigensolver are in :mod:`lora_da_fast.solve.factor`, :mod:`lora_da_fast.solve.operator` and
:mod:`lora_da_fast.solve.lobpcg`.

1. **Stream.** Input groups are taken in chunks (same ``d_in``) whose working memory stays under
   ``max_batch_bytes``; everything a chunk allocates is freed before the next. On a GPU a chunk is a large
   share of the free memory: few, large stacks.
2. **Factorise.** One Cholesky per input group, ``Zd = sym(Z) + lam I = L L^T``, stacked over groups of
   the same ``d_in``, with a per-item damping retry (x10 up to ``max_damping``, noted). On a GPU also the
   explicit ``Zd^{-1}`` (a blocked inverse of ``2 n^3 / 3`` flops); on a CPU the iterations use two
   triangular solves with ``L`` instead.
3. **Never form ``D``.** ``D = -Zd^{-1} G^T diag(u)`` (``d_in x d_out``) is only applied:
   ``D x = -Zd^{-1} G^T (u x)``, ``D^T x = -u (G Zd^{-1} x)``. Stacks hold the modules of one shape whose
   groups have the same number of them (q/k/v of a 7B model, gate/up, ...): the modules of one factor
   are applied side by side, each factor read once per product.
4. **Eigen-solve.** ``sigma^2 M = M' = -alpha D D^T + beta (sum(u)/N) Zd^{-1}`` has the eigenvectors of
   ``M`` and does not need ``sigma``. Its ``r`` smallest eigenvectors come from a batched LOBPCG
   (:func:`lora_da_fast.solve.lobpcg.lobpcg`: block ``k = r + extra``, basis ``[X, P, W]``, Rayleigh-Ritz
   in float64 on the device, one host synchronisation per iteration) started from ``D Omega``, on the
   stack of same-shape modules. Stopping rule, per module: the Davis-Kahan bound
   ``||R_r||_F / (theta_{r+1} - theta_r - ||r_{r+1}||)`` on the subspace angle below ``tol``, or the
   residual at rounding level. When the variance term dominates ``M'``'s spectrum the residuals are
   also preconditioned by ``Zd`` (``[X, P, R, Zd R]``). Converged modules leave the stack with their
   factors. Modules that do not converge within ``maxiter`` are solved densely (reported).
5. **Normalise.** ``sigma = ||D||_2``: with ``beta = 0`` it is the top Ritz value of the same solve
   (``M' = -alpha D D^T``: the truncated SVD of ``D``); otherwise the top Ritz value of
   ``D D^T = (beta' Zd^{-1} - M') / alpha`` on the last basis ``[X, P]`` (no operator pass: ``Zd^{-1} S``
   is kept from the iterations), accepted when its Kato-Temple bound is within ``SIGMA2_TOL``; a module
   where it is not gets a short second LOBPCG on ``-D D^T``.
6. **Factors.** ``A0`` = canonical signs of the ``r`` Ritz vectors, ``B0^T = D^T A0 / sigma`` (``r``
   columns through ``Zd^{-1}``), PEFT layout as :func:`lora_da_fast.solve.steps.to_factors`.

Small problems (``d_in`` at most ``dense_below``) are solved densely, in stacks, in float64.

Precision: the working dtype defaults to float64 on CPU and on GPUs with full-rate float64 (P100, V100,
A100, H100/H200, B200: float64 GEMMs there run at the float32 rate, so float64 costs nothing but
memory); float32 elsewhere. In float32 the Rayleigh-Ritz step, the convergence tests, ``sigma`` and the
reports are float64, but the factorisation and the products are float32, whose error grows like
``cond(Zd) * eps32``: a chunk of groups is solved in float32 only when a float32 Cholesky succeeds and
every estimated ``cond(Zd) * eps32 <= 1e-4``, else in float64 (noted in the reports), and a float32
module that does not converge is solved densely from float64 factors. Real statistics (``Z`` singular,
damping ``1e-6``) are far from that bound: float64 is the default wherever it is fast.

The result does not depend on ``cfg.seed`` beyond the stopping tolerance, and is bit-identical for the
same seed, options and machine.
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..config import LoraDAConfig
from ..errors import ConfigError, NumericalError
from ..fisher import FisherStatistics
from ..results import LoraDAResult, LoraFactors, ModuleReport
from .factor import cholesky_ex, spd_inverse
from .first_order import first_order_change, g_step, move_seed, z_step
from .lobpcg import (SIGMA2_TOL, flops_per_iteration, lobpcg, orthonormalize, rayleigh_ritz_small, sigma_from_basis,
                     solve_dense, zinv_norm)
from .operator import _mm, _Operator
from .steps import canonical_signs, damping_note, input_damping, output_damping, output_inverse, tie_note

__all__ = ["BatchedOptions", "solve_batched"]

log = logging.getLogger(__name__)


SOLVER_ITERATIVE = "lobpcg-batched"
SOLVER_DENSE = "dense-batched"
SOLVER_FALLBACK = "dense-fallback"


@contextmanager
def _phase(name: str, device: torch.device, acc: Dict[str, float]):
    """Wall time of a phase, added to ``acc`` (only with DEBUG logging: it synchronises the GPU)."""
    if not log.isEnabledFor(logging.DEBUG):
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class BatchedOptions:
    """Options of :func:`solve_batched` (none changes the result beyond the stopping tolerance).

    Args:
        dtype: working dtype of the factorisations and iterations; ``None``: float64 on CPU and on GPUs
            with full-rate float64, float32 elsewhere.
        device: where to solve; ``None``: the device of the statistics.
        max_batch_bytes: bound on the working memory of one chunk of input groups (at least one group
            is always taken); ``None``: 32 MiB on CPU (cache-sized stacks are faster), 40% of the free
            memory on a GPU.
        dense_below: modules with ``d_in`` at most this are solved by a dense eigendecomposition.
        extra: block size of the eigensolver is ``rank + extra`` (``None``: ``max(rank, 8)``).
        tol: bound on the sine of the angle between the computed and the exact ``r``-dimensional
            subspace (Davis-Kahan estimate from the residuals and the Ritz gap). The estimate is
            conservative: measured errors of ``lora_B @ lora_A`` are ~100x under it on SmolLM2 and
            random-weight statistics (see benchmarks/RESULTS.md), far under the 1e-4 contract; each
            further decade costs ~2 iterations on SmolLM2 statistics, ~4 on the flatter spectra of a
            random-weight model.
        maxiter: iterations before a module falls back to the dense solve; ``None``: 500 on GPU, 150 on
            CPU, where fewer are allowed when a dense solve would cost less than the iterations.
        apply: ``"solve"`` (two triangular solves with ``L`` per product with ``Zd^{-1}``), ``"inverse"``
            (the explicit ``Zd^{-1}``, one GEMM) or ``"auto"`` (``"inverse"`` on GPU, ``"solve"`` on CPU).
        num_threads: on CPU, torch's intra-op threads during the solve, per worker (restored
            afterwards); ``None``: 1 with several workers, else the setting is left alone.
        workers: on CPU, chunks of groups solved at the same time by this many threads, each with one
            torch intra-op thread (``num_threads`` if given); ``None``: torch's current number of
            threads. The result does not depend on it. On GPU chunks are solved one after the other.
        expand_all: expand every residual column of the block in each iteration rather than the
            ``rank`` wanted ones (fewer iterations, a wider Rayleigh-Ritz basis); ``None``: no.
        directions: LOBPCG directions ``P`` kept per iteration (at most the expanded residual columns);
            ``None``: as many as the expanded residual columns. With the defaults the Rayleigh-Ritz basis
            of a rank-8 solve has ``16 + 8 + 8 = 32`` columns: what a GPU's batched ``eigh`` takes in one
            call for a whole stack.
        diagnostics: a dict that receives, per module name, ``{"iterations", "passes", "sigma"}`` (passes:
            operator applications, in units of one application of ``M'``, setup and factors included;
            sigma: ``"ritz"``, ``"refined"``, ``"dense"`` or ``"exact"`` when ``beta = 0``).
        start: per module name, a ``d_in x r`` basis to start the eigensolver from (the subspace of nearby
            statistics, e.g. the solve being measured by :mod:`.sensitivity`): the first ``r`` columns of
            the block, the others random as usual. Fewer iterations when it is close; the result does not
            depend on it beyond the stopping tolerance. A stack starts from it only if all its modules
            have one.
    """

    dtype: Optional[torch.dtype] = None
    device: Optional[torch.device] = None
    max_batch_bytes: Optional[int] = None
    dense_below: int = 128
    extra: Optional[int] = None
    tol: float = 1e-5
    maxiter: Optional[int] = None
    apply: str = "auto"
    num_threads: Optional[int] = None
    expand_all: Optional[bool] = None
    workers: Optional[int] = None
    directions: Optional[int] = None
    diagnostics: Optional[dict] = None
    start: Optional[Dict[str, torch.Tensor]] = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {self.dtype!r}")
        if self.apply not in ("auto", "solve", "inverse"):
            raise ConfigError(f"apply must be 'auto', 'solve' or 'inverse', got {self.apply!r}")
        if self.max_batch_bytes is not None and self.max_batch_bytes <= 0:
            raise ConfigError("max_batch_bytes must be positive")
        if not (0 < self.tol < 1):
            raise ConfigError("tol must be in (0, 1)")
        if self.maxiter is not None and self.maxiter < 1:
            raise ConfigError("maxiter must be a positive integer")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("num_threads must be a positive integer")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("workers must be a positive integer")
        if self.extra is not None and self.extra < 1:
            raise ConfigError("extra must be a positive integer")
        if self.directions is not None and self.directions < 0:
            raise ConfigError("directions must be a non-negative integer")

    def block(self, r: int) -> Tuple[int, int, int]:
        """``(k, kw, kp)``: block size, residual columns expanded and LOBPCG directions kept."""
        k = r + (self.extra if self.extra is not None else max(r, 8))
        kw = k if self.expand_all else r
        kp = kw if self.directions is None else min(self.directions, kw)
        return k, kw, kp


# --------------------------------------------------------------------------------------------------
# Device and dtype choices


def _fast_fp64(device: torch.device) -> bool:
    """GPUs whose float64 GEMM runs at half or more of the float32 rate (the xx.0 data-centre parts)."""
    if device.type != "cuda":
        return device.type == "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return minor == 0 and major >= 6


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.4 * free)
    # CPU: the iterations are bound by memory traffic over L and G; stacks that stay in the caches are
    # faster (30 SmolLM2 layers, one thread: 7.4 s with 16-32 MiB chunks, 10.7 s with 1 GiB)
    return 32 << 20


# --------------------------------------------------------------------------------------------------
# Factorisation


def cholesky_stack(Z: torch.Tensor, damping: float, max_damping: float, names: Sequence[str]
                   ) -> Tuple[torch.Tensor, List[float]]:
    """Cholesky factors of ``Z_i + lam_i I`` for a stack ``Z`` (``[g, d, d]``, already symmetrised,
    overwritten); items whose factorisation fails (or is not finite) are retried with ``lam_i`` raised
    tenfold, as :func:`lora_da_fast.solve.steps.cholesky_with_retry` does for one matrix."""
    lams = [float(damping)] * Z.shape[0]
    diag = Z.diagonal(dim1=-2, dim2=-1)
    diag.add_(damping)
    L, info = cholesky_ex(Z)
    # a NaN anywhere in Z reaches the diagonal of L at or after its row: checking the diagonal is enough
    bad = (info != 0) | ~torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all(dim=-1)
    while bool(bad.any()):
        for i in torch.nonzero(bad).flatten().tolist():
            lam = lams[i]
            if lam * 10 > max_damping * (1 + 1e-12):
                raise NumericalError(
                    f"Cholesky factorisation of the input factor of {names[i]} failed even with damping "
                    f"{lam:g} (max_damping={max_damping:g})")
            diag[i].add_(9 * lam)
            lams[i] = 10 * lam
        idx = torch.nonzero(bad).flatten()
        Li, info_i = cholesky_ex(Z[idx])
        L[idx] = Li
        bad_i = (info_i != 0) | ~torch.isfinite(Li.diagonal(dim1=-2, dim2=-1)).all(dim=-1)
        bad = torch.zeros_like(bad)
        bad[idx] = bad_i
    return L, lams


# --------------------------------------------------------------------------------------------------
# Driver


@dataclass
class _Module:
    name: str
    group: str
    lam_y: float
    u: torch.Tensor  # [d_out] float64 on the solve device


def _group_bytes(stats: FisherStatistics, names: Sequence[str], d_in: int, k: int, itemsize: int,
                 explicit_inverse: bool) -> int:
    """Working memory of one group: its symmetrised ``Z`` (factorised in place) and, with the explicit
    inverse, ``Zd^{-1}`` and the blocked inverse's ``L^{-1}``; per module ``G`` in the working dtype and
    the iteration blocks (three bases ``[S, A S]`` and ``Zd^{-1} S`` of at most ``3 k`` columns)."""
    per_group = (4 if explicit_inverse else 2) * d_in * d_in  # (+ the one-ulp move of Z, for the sensitivity)
    per_mod = sum(2 * stats.modules[m].d_out * d_in + 30 * k * d_in + 4 * k * stats.modules[m].d_out
                  for m in names)  # (G, and its one-ulp move while the sensitivity is estimated)
    return itemsize * (per_group + per_mod)


def _plan_chunks(stats: FisherStatistics, groups: Dict[str, List[str]], budget: int, k: int, itemsize: int,
                 explicit_inverse: bool) -> List[List[str]]:
    """Chunks of groups (same ``d_in`` first, in statistics order) whose working memory fits ``budget``."""
    order: Dict[int, List[str]] = {}
    for g, names in groups.items():
        if names:
            order.setdefault(stats.z_dim(g), []).append(g)
    chunks: List[List[str]] = []
    for d_in, gs in order.items():
        cur, used = [], 0
        for g in gs:
            nb = _group_bytes(stats, groups[g], d_in, k, itemsize, explicit_inverse)
            if cur and used + nb > budget:
                chunks.append(cur)
                cur, used = [], 0
            cur.append(g)
            used += nb
        if cur:
            chunks.append(cur)
    return chunks


def solve_batched(stats: FisherStatistics, cfg: LoraDAConfig, progress: bool = False,
                  options: Optional[BatchedOptions] = None, **kwargs) -> LoraDAResult:
    """LoRA-DA factors of every module of ``stats`` (same result as ``solve_reference`` to the accuracy
    contract), solved in stacks. ``options`` or keyword arguments: see :class:`BatchedOptions`."""
    opt = options if options is not None else BatchedOptions(**kwargs)
    if options is not None and kwargs:
        opt = replace(options, **kwargs)
    groups = stats.groups()
    first = next(iter(stats.Z.values()))
    device = torch.device(opt.device) if opt.device is not None else first.device
    dt = opt.dtype or (torch.float64 if _fast_fp64(device) else torch.float32)
    explicit_inverse = opt.apply == "inverse" or (opt.apply == "auto" and device.type == "cuda")
    budget = opt.max_batch_bytes or _default_budget(device)
    r = cfg.rank
    k = opt.block(r)[0]
    itemsize = torch.finfo(dt).bits // 8
    chunks = _plan_chunks(stats, groups, budget, k, itemsize, explicit_inverse)
    # one random stream per chunk, drawn from the seed: the result does not depend on which worker
    # solves which chunk, or when
    seeds = torch.randint(0, 2 ** 62, (len(chunks),), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    threads = torch.get_num_threads()
    workers = 1
    if device.type == "cpu":
        workers = max(1, min(opt.workers if opt.workers is not None else threads, len(chunks)))

    factors: Dict[str, LoraFactors] = {}
    reports: Dict[str, ModuleReport] = {}

    def solve(i: int) -> int:
        gen = torch.Generator(device=device)
        gen.manual_seed(seeds[i])
        _solve_chunk(stats, cfg, groups, chunks[i], device, dt, explicit_inverse, opt, gen, factors, reports)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return sum(len(groups[g]) for g in chunks[i])

    if device.type == "cpu" and (opt.num_threads is not None or workers > 1):
        # several workers: one intra-op thread each (narrow products gain little from more threads,
        # independent chunks gain all of them), unless num_threads says otherwise
        torch.set_num_threads(opt.num_threads or 1)
    bar = tqdm(total=len(stats.modules), desc="solve (batched)", unit="module", disable=not progress)
    try:
        if workers == 1:
            for i in range(len(chunks)):
                bar.update(solve(i))
        else:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-da-solve")
            try:
                for fut in as_completed([pool.submit(solve, i) for i in range(len(chunks))]):
                    bar.update(fut.result())
            finally:  # on an error or Ctrl-C: no new chunk starts, the running ones finish
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return LoraDAResult({n: factors[n] for n in stats.modules}, {n: reports[n] for n in stats.modules})


def _sym_stack(stats: FisherStatistics, chunk: List[str], dt: torch.dtype, device: torch.device) -> torch.Tensor:
    """The dense symmetric ``Z_g`` of the groups of ``chunk``, stacked: each expanded from its packed
    triangle straight into the stack (``FisherStatistics.dense_Z``; exact in float64 from float32)."""
    d = stats.z_dim(chunk[0])
    Zs = torch.empty((len(chunk), d, d), dtype=dt, device=device)
    for i, g in enumerate(chunk):
        stats.dense_Z(g, out=Zs[i])
    return Zs


def _ulp_stack(stats: FisherStatistics, chunk: List[str], dt: torch.dtype, device: torch.device, seed: int
               ) -> torch.Tensor:
    """The one-ulp moves of the input factors of the groups of ``chunk`` (:func:`.first_order.z_step`), stacked."""
    d = stats.z_dim(chunk[0])
    out = torch.empty((len(chunk), d, d), dtype=dt, device=device)
    for i, g in enumerate(chunk):
        z_step(stats, g, seed, dt, device, out=out[i])
    return out


def _estimator(stats: FisherStatistics, names: List[str], op: _Operator, bprime: Optional[torch.Tensor],
               dZs: torch.Tensor, cfg: LoraDAConfig, dt: torch.dtype):
    """The ``estimate`` of :func:`_solve_stack` for the stack ``names``, all its items at once (the
    products with ``Zd^{-1}`` side by side, as the eigensolver's): the one-ulp moves of ``Z`` (``dZs``, per
    factor of the chunk) and of each ``G`` (drawn as ``sensitivity="always"`` draws them; one ``G``-sized
    stack while the stack is estimated)."""
    seed = move_seed(cfg)

    def estimate(pos: torch.Tensor, Vr, theta_r, W, theta_w, galerkin: bool = False) -> torch.Tensor:
        o = op if pos.numel() == len(op) else op.subset(pos)
        G, u = o.G, o.u
        dGu = torch.stack([g_step(stats, names[p], seed, dt) for p in pos.tolist()])
        dGu = dGu.to(G.device).mul_(u[..., None])  # diag(u) dG
        fidx = o.idx.tolist()
        b = None if bprime is None else bprime[pos]
        return first_order_change(
            zinv=lambda X: o.zinv(X, count=False),
            gtu_mul=lambda Y: _mm(G.transpose(-1, -2), u[..., None] * Y),
            ug_mul=lambda X: u[..., None] * _mm(G, X),
            dz_mul=lambda X: torch.stack([dZs[f] @ X[j] for j, f in enumerate(fidx)]),
            dgu_mul=lambda Y: _mm(dGu.transpose(-1, -2), Y), dgu_t_mul=lambda X: _mm(dGu, X),
            a=cfg.alpha, b=b, Vr=Vr.to(dt), theta_r=theta_r, W=W.to(dt), theta_w=theta_w,
            galerkin=galerkin).cpu()

    return estimate


# float32 is used for a chunk only when every cond(Zd) * eps32 is at most this
FLOAT32_COND_EPS = 1e-4


def _precision_for(stats: FisherStatistics, chunk: List[str], cfg: LoraDAConfig, device: torch.device,
                   gen: torch.Generator) -> Tuple[torch.dtype, Optional[str]]:
    """Float32 when it is accurate enough for the chunk, else float64 with the reason. The error of a
    float32 solve grows like ``cond(Zd) * eps32`` (and a float32 Cholesky of a singular ``Z`` with the
    default damping fails, where float64 would not: raising the damping would change the answer)."""
    Zs = _sym_stack(stats, chunk, torch.float32, device)
    Zs.diagonal(dim1=-2, dim2=-1).add_(cfg.damping)
    L, info = cholesky_ex(Zs)
    if bool((info != 0).any()) or not bool(torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all()):
        return torch.float64, "solved in float64: the float32 Cholesky factorisation of Zd failed"
    X = torch.randn(L.shape[0], L.shape[-1], 2, generator=gen, dtype=L.dtype, device=device)
    for _ in range(4):
        X = orthonormalize(_mm(Zs, X))
    zmax = rayleigh_ritz_small(X, _mm(Zs, X))[0][:, -1]
    cond = float((zmax * zinv_norm(L, None, gen)).max())
    if cond * torch.finfo(torch.float32).eps > FLOAT32_COND_EPS:
        return torch.float64, f"solved in float64: cond(Zd) ~ {cond:.1e} is too large for float32"
    return torch.float32, None


def _solve_chunk(stats: FisherStatistics, cfg: LoraDAConfig, groups: Dict[str, List[str]], chunk: List[str],
                 device: torch.device, dt: torch.dtype, explicit_inverse: bool, opt: BatchedOptions,
                 gen: torch.Generator, factors: Dict[str, LoraFactors], reports: Dict[str, ModuleReport]) -> None:
    r = cfg.rank
    t: Dict[str, float] = {}
    chunk_notes: List[str] = []

    def shape(m: str) -> Tuple[int, int]:
        return stats.modules[m].d_in, stats.modules[m].d_out

    def key(m: str, g: str) -> Tuple[int, int, int]:  # a module's stack: its shape and how many share it
        return shape(m) + (sum(shape(x) == shape(m) for x in groups[g]),)

    # groups with the same modules next to each other (q/k/v groups, then o groups, ...): a stack's
    # factors are then a contiguous slice of the chunk's (see _Operator)
    chunk = sorted(chunk, key=lambda g: sorted(key(m, g) for m in groups[g]))
    # one Cholesky per group, stacked (every group of a chunk has the same d_in)
    with _phase("cholesky", device, t):
        if dt == torch.float32:
            dt, note = _precision_for(stats, chunk, cfg, device, gen)
            chunk_notes += [note] if note else []
        # the damping rule (steps.input_damping, float64, from the statistics alone), then the factors
        Zs = _sym_stack(stats, chunk, dt, device)
        # the one-ulp moves of the groups' Z, for the first-order sensitivity (what "always" applies)
        dZs = _ulp_stack(stats, chunk, dt, device, move_seed(cfg)) if cfg.sensitivity == "auto" else None
        chosen = input_damping(Zs, cfg.damping, cfg.max_damping, chunk, symmetric=True)
        Zs.diagonal(dim1=-2, dim2=-1).add_(torch.tensor(chosen, dtype=dt, device=device)[:, None] - cfg.damping)
        L, more = cholesky_stack(Zs, cfg.damping, cfg.max_damping, chunk)
        lams = [c - cfg.damping + m for c, m in zip(chosen, more)]
    Zinv = None
    with _phase("inverse", device, t):
        if explicit_inverse:
            Zinv = spd_inverse(L)
        znorm = zinv_norm(L, Zinv, gen) if cfg.beta > 0 else None
    mods: Dict[str, _Module] = {}
    with _phase("output factors", device, t):
        for g in chunk:
            for m in groups[g]:
                st = stats.modules[m]
                lam_y = output_damping(st, cfg)
                u = output_inverse(st, stats.num_examples, lam_y, stats.output_fisher).to(device)
                mods[m] = _Module(m, g, lam_y, u)
    # stacks of same-shape modules, split by how many modules of that shape their group has, so that
    # every factor of a stack serves the same number of its modules (q/k/v of a 7B model: one stack of
    # three per group, o_proj: one of one)
    gidx = {g: i for i, g in enumerate(chunk)}
    stacks: Dict[Tuple[int, int, int], List[str]] = {}
    for g in chunk:
        for m in groups[g]:
            stacks.setdefault(key(m, g), []).append(m)
    for names in stacks.values():
        with _phase("stacks", device, t):
            idx = torch.tensor([gidx[mods[m].group] for m in names], device=device)
            G = torch.empty((len(names),) + tuple(stats.modules[names[0]].G.shape), dtype=dt, device=device)
            for i, m in enumerate(names):
                G[i].copy_(stats.modules[m].G)
            u = torch.stack([mods[m].u for m in names]).to(dt)
            op = _Operator(L, idx, G, u, cfg.alpha, None, Zinv)
            bprime = None
            if cfg.beta > 0:
                bprime = torch.stack([cfg.beta * mods[m].u.sum() / cfg.population_size for m in names])
        with _phase("eigensolver", device, t):
            def exact_factors(pos, idx=idx):
                gs = [chunk[i] for i in idx[pos].tolist()]
                Z64 = _sym_stack(stats, gs, torch.float64, device)
                Z64.diagonal(dim1=-2, dim2=-1).add_(torch.tensor([lams[gidx[g]] for g in gs], dtype=torch.float64,
                                                                 device=device)[:, None])
                return cholesky_ex(Z64)[0]

            start = None
            if opt.start is not None and all(m in opt.start for m in names):
                start = torch.stack([opt.start[m].to(device=device, dtype=dt) for m in names])
            estimate = None
            if dZs is not None:
                estimate = _estimator(stats, names, op, bprime, dZs, cfg, dt)
            sol = _solve_stack(op, cfg.alpha, bprime, r, opt, gen, None if znorm is None else znorm[idx],
                               exact_factors, start, estimate)
        with _phase("factors", device, t):
            for n in sol.notes:
                n.extend(chunk_notes)
            _emit(stats, cfg, names, mods, op, sol, {g: lams[i] for g, i in gidx.items()}, factors, reports)
        if opt.diagnostics is not None:
            # (+ the norm estimate of Zd^{-1} by block power iteration on the triangular factors: five
            # products with the group's factor, this module's share)
            znorm_passes = 5 * op._w_zinv if znorm is not None and Zinv is None else 0.0
            for i, m in enumerate(names):
                opt.diagnostics[m] = {"iterations": int(sol.iters[i]), "passes": float(op.passes[i]) + znorm_passes,
                                      "sigma": sol.sigma_by[i]}
        del op, G, u, sol
    if t:
        log.debug("chunk of %d groups (d_in %d): %s", len(chunk), L.shape[-1],
                  ", ".join(f"{k} {v:.3f} s" for k, v in t.items()))


# --------------------------------------------------------------------------------------------------
# One stack of same-shape modules


@dataclass
class _StackSolution:
    A: torch.Tensor  # [b, d_in, r] orthonormal Ritz vectors (device)
    theta: torch.Tensor  # [b, >= r+1] float64 smallest eigenvalues of M' (ascending, host)
    res: torch.Tensor  # [b] float64 max_k<r ||M' a_k - theta_k a_k|| (host)
    anorm: torch.Tensor  # [b] float64 estimate of ||M'|| (host)
    sigma2: torch.Tensor  # [b] float64 ||D||_2^2 (host)
    solver: List[str]
    notes: List[List[str]]
    iters: List[int]
    sigma_by: List[str]
    sensitivity: Optional[torch.Tensor] = None  # [b] float64 first-order one-ulp sensitivity (host)
    sensitivity_by: Optional[List[str]] = None


def _solve_stack(op: _Operator, alpha: float, bprime: Optional[torch.Tensor], r: int,
                 opt: BatchedOptions, gen: torch.Generator, zinv_norm: Optional[torch.Tensor] = None,
                 exact_factors=None, start: Optional[torch.Tensor] = None, estimate=None) -> _StackSolution:
    """Ritz vectors, eigenvalues, residuals and ``sigma^2`` of a stack; ``exact_factors(positions)``
    gives float64 Cholesky factors for the dense fallback when the working dtype is float32; ``start``
    (``[b, d_in, r]``) the first ``r`` columns of the eigensolver's starting block; ``estimate(pos, Vr,
    theta_r, W, theta_w, galerkin)``: the first-order one-ulp sensitivities of the stack's items ``pos``
    (:mod:`.first_order`), from every eigenvector (dense) or from the guard Ritz vectors and a Krylov
    correction for the rest (``galerkin``)."""
    b, d_out, n = op.G.shape
    k, kw, kp = opt.block(r)
    dt = op.G.dtype
    notes: List[List[str]] = [[] for _ in range(b)]
    if n <= opt.dense_below or n < 5 * k:
        full: list = []
        A, theta, res, anorm, sigma2 = solve_dense(op, alpha, bprime, r, r + 1, full=full)
        sens, sens_by = None, None
        if estimate is not None:
            w, V = full
            sens = estimate(torch.arange(b, device=op.G.device), V[..., :r], w[:, :r], V[..., r:], w[:, r:])
            sens_by = ["first-order"] * b
        return _StackSolution(A.to(dt), theta.cpu(), res.cpu(), anorm.cpu(), sigma2.cpu(), [SOLVER_DENSE] * b,
                              notes, [0] * b, ["dense"] * b, sens, sens_by)

    eps = torch.finfo(dt).eps
    abs_tol = 1e3 * eps if dt == torch.float64 else 20 * eps
    # ||M'|| <= alpha sigma^2 + beta' ||Zd^{-1}||: when the variance term dominates the spectrum, the
    # plain residual is a poor search direction and Zd R is added (lobpcg's precond_floor)
    floor = bprime.double() * zinv_norm if bprime is not None else None
    Mop = op.with_coefficients(alpha, bprime)
    kr = k if start is None else k - start.shape[-1]  # the subspace of nearby statistics in front, if given
    Omega = torch.randn(b, d_out, kr, generator=gen, dtype=dt, device=op.G.device)
    X0 = op.d_mul(Omega)
    del Omega
    if start is not None:
        X0 = torch.cat([start, X0], dim=-1)
    value_tol = SIGMA2_TOL if bprime is None else None  # beta = 0: theta_0 = -alpha sigma^2 is needed exactly
    # Past the flops of a dense solve (forming M' ~ 2 n^2 d_out, eigh ~ 10 n^3) iterating is a loss:
    # such hard cases (wanted eigenvalues inside a spectrum spread by the variance term) go dense.
    # (on a GPU an iteration is cheap next to a large dense eigh: iterate longer there)
    on_gpu = op.G.device.type == "cuda"
    cap = opt.maxiter if opt.maxiter is not None else (500 if on_gpu else 150)
    per_iter = flops_per_iteration(n, d_out, k, kw)
    maxiter = cap if on_gpu else int(min(cap, max(30, (2 * n * n * d_out + 10 * n ** 3) / per_iter)))
    eig = lobpcg(Mop, X0, r, gen=gen, tol=opt.tol, abs_tol=abs_tol, maxiter=maxiter, kw=kw, kp=kp,
                 value_tol=value_tol, anorm_floor=floor, precond_floor=floor, track=bprime is not None)
    del X0
    iters = eig.iters.tolist()
    if log.isEnabledFor(logging.DEBUG):
        log.debug("stack %s x %s x %s: M' solve %s iterations", b, n, d_out, iters)
    theta, anorm = eig.theta, eig.anorm
    A = eig.X[..., :r]
    res = eig.res[:, :r].amax(-1)
    conv = eig.converged.clone()
    solver = [SOLVER_ITERATIVE] * b
    if bprime is None:
        sigma2 = -theta[:, 0] / alpha
        sigma_by = ["exact"] * b
    else:
        sigma2, ok = torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.bool)
        for nc in eig.ncols.unique().tolist():  # (the basis of a module stopped at once is X alone)
            sel = torch.nonzero(eig.ncols == nc).flatten()
            dsel = sel.to(op.G.device)
            sigma2[sel], ok[sel] = sigma_from_basis(eig.S[dsel, :, :nc], eig.AS[dsel, :, :nc], eig.YS[dsel, :, :nc],
                                                    bprime[dsel], alpha)
        sigma_by = ["ritz" if o else "refined" for o in ok.tolist()]
        redo = torch.nonzero(~ok & conv).flatten()
        if redo.numel():
            # sigma^2 = largest eigenvalue of D D^T: a second LOBPCG on -D D^T from the converged block,
            # stopped when its top Ritz value is exact to SIGMA2_TOL (the vector is not used)
            dpos = redo.to(op.G.device)
            sop = op.with_coefficients(1.0, None).subset(dpos)
            kk = min(k, 4)
            ev = lobpcg(sop, eig.X[dpos][..., :kk], 1, gen=gen, tol=None, abs_tol=abs_tol, maxiter=cap,
                        kw=2, kp=2, value_tol=SIGMA2_TOL)
            sigma2 = sigma2.clone()
            sigma2[redo] = -ev.theta[:, 0]
            conv[redo] &= ev.converged
            if log.isEnabledFor(logging.DEBUG):
                log.debug("stack %s x %s x %s: sigma refined for %d modules, %s iterations", b, n, d_out,
                          redo.numel(), ev.iters.tolist())
    sens, sens_by = None, None
    if estimate is not None:  # the guard Ritz vectors X[:, :, r:k], and a Krylov correction for the rest
        th = eig.theta.to(op.G.device, torch.float64)
        sens = estimate(torch.arange(b, device=op.G.device), A, th[:, :r], eig.X[..., r:k], th[:, r:k], True)
        sens_by = ["first-order (guard vectors)"] * b
    bad = torch.nonzero(~conv).flatten()
    if bad.numel():
        dpos = bad.to(op.G.device)
        sub = op.subset(dpos)
        L64 = exact_factors(dpos) if exact_factors is not None and dt != torch.float64 else None
        full = []
        Ad, thd, resd, anormd, s2d = solve_dense(sub, alpha, None if bprime is None else bprime[dpos], r, k, L64,
                                                 full=full)
        if estimate is not None:
            w, V = full
            sens = sens.clone()
            sens[bad] = estimate(dpos, V[..., :r].to(dt), w[:, :r], V[..., r:].to(dt), w[:, r:])
            for i in bad.tolist():
                sens_by[i] = "first-order"
        A = A.clone()
        A[dpos] = Ad.to(dt)
        kk = thd.shape[-1]
        theta, res, anorm, sigma2 = theta.clone(), res.clone(), anorm.clone(), sigma2.clone()
        theta[bad, :kk] = thd.cpu()
        res[bad], anorm[bad], sigma2[bad] = resd.cpu(), anormd.cpu(), s2d.cpu()
        for i in bad.tolist():
            solver[i] = SOLVER_FALLBACK
            sigma_by[i] = "dense"
            notes[i].append(f"LOBPCG did not converge in {iters[i]} iterations: dense float64 eigendecomposition")
    return _StackSolution(A, theta, res, anorm, sigma2, solver, notes, iters, sigma_by, sens, sens_by)


def _emit(stats: FisherStatistics, cfg: LoraDAConfig, names: List[str], mods: Dict[str, _Module], op: _Operator,
          sol: _StackSolution, lams: Dict[str, float], factors: Dict[str, LoraFactors],
          reports: Dict[str, ModuleReport]) -> None:
    """Factors ``lora_A = A0^T / sqrt(gamma)``, ``lora_B = D^T A0 / (sigma sqrt(gamma))`` and reports."""
    r = cfg.rank
    A0 = canonical_signs(sol.A)
    sigma = sol.sigma2.clamp(min=0).sqrt()
    if not bool(torch.isfinite(sigma).all()) or not bool((sigma > 0).all()):
        bad = names[int(torch.nonzero(~(torch.isfinite(sigma) & (sigma > 0)))[0])]
        raise NumericalError(f"the Fisher-gradient of module {bad} is zero or non-finite")
    scale = 1.0 / math.sqrt(cfg.gamma)
    B = op.dt_mul(A0).double() / sigma.to(A0.device)[:, None, None]  # [b, d_out, r] = B0^T
    lora_A = (A0.transpose(-1, -2).double() * scale).float()
    lora_B = (B * scale).float()
    # ||lora_B lora_A||_F^2 = tr((B^T B)(A A^T)) with r x r matrices
    Ad, Bd = lora_A.double(), lora_B.double()
    upd = torch.einsum("bij,bji->b", Bd.transpose(-1, -2) @ Bd, Ad @ Ad.transpose(-1, -2)).clamp(min=0).sqrt()
    s2 = sol.sigma2
    mnorm = (sol.anorm / s2).tolist()
    ev = (sol.theta / s2[:, None]).tolist()
    resid = (sol.res / sol.anorm.clamp(min=torch.finfo(torch.float64).tiny)).tolist()
    upd = upd.tolist()
    sig = sigma.tolist()
    for i, m in enumerate(names):
        st = stats.modules[m]
        w = ev[i][: r + 1]
        gap = (w[r] - w[r - 1]) / mnorm[i] if len(w) > r and mnorm[i] > 0 else float("inf")
        notes = list(sol.notes[i])
        lam = lams[mods[m].group]
        if lam != cfg.damping:
            notes.append(damping_note(cfg.damping, lam))
        tie = tie_note(w, r)
        if tie:
            notes.append(tie)
        out = st.G.device  # the factors live where the statistics do, whatever device solved them
        factors[m] = LoraFactors(lora_A[i].contiguous().to(out), lora_B[i].contiguous().to(out))
        reports[m] = ModuleReport(
            d_in=st.d_in, d_out=st.d_out, group=mods[m].group, damping=lam, output_damping=mods[m].lam_y,
            sigma=sig[i], eigenvalues=w, eigengap=gap, residual=resid[i], solver=sol.solver[i],
            update_norm=upd[i], notes=notes,
            sensitivity=None if sol.sensitivity is None else float(sol.sensitivity[i]),
            sensitivity_by=None if sol.sensitivity_by is None else sol.sensitivity_by[i])

