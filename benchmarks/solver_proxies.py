"""CPU-measurable proxies of the batched solver's speed on a GPU (issue 17), for ``bench_solver.py
--proxies``: each measured on today's solver and on another revision of it side by side, in one run.

- **Passes per module** (:func:`passes_per_module`): operator applications each module cost, in units of
  one application of ``M'`` (two products with ``Zd^{-1}`` and two with ``G``; a product with ``Zd^{-1}`` or
  ``G`` alone counts as its share of those bytes), setup, sigma and the factors included, and their
  bytes-weighted median (weight: the module's bytes per pass).
- **Bytes per pass and fixed flops** (:func:`shape_proxies`): one operator application on every stack
  of a model shape, and the factorisations and inverses of its input groups, run on ``meta`` tensors
  (shapes only, no memory) under a dispatch mode that adds the bytes every non-view op reads and writes
  and the flops of the linear-algebra ops (``mm``-family ``2 m n k``, triangular solve ``n^2 m``,
  Cholesky ``n^3 / 3``, ``cholesky_inverse`` as CUDA computes it: a solve against the identity, ``2 n^3``).
- **Kernels and host synchronisations per iteration** (:func:`iteration_counts`): LOBPCG iterations of
  a small stack on CPU tensors, on the CUDA code path (the GPU choices forced), counted by a
  ``TorchDispatchMode``: every non-view op is a device kernel, except the ops that wait for the device
  on CUDA (``item``/``bool``, ``nonzero``, boolean indexing, ``unique``; ``eigh``, whose error check
  reads the device's info: a kernel and a sync) and, in today's solver, the Rayleigh-Ritz step after its
  Gram matrices, which runs on the host (its device-to-host copy is one sync).
- **Host time per stack-iteration** (:func:`iteration_counts`): CPU time per iteration of the same runs
  at tiny sizes (the calling thread's CPU time with one torch thread: the machine's load barely moves
  it). Here the CPU also does the device's work, which grows with the stack, so the host time is
  estimated as the time at a stack of one (Python, dispatch, almost nothing to compute) plus the time of
  the host's own linear algebra at the stack size (today's Rayleigh-Ritz on the host, measured).

Today's solver is ``lora_da_fast/solve/batched.py`` at a git revision (``load_baseline``; with that
revision's own ``factor.py``, ``operator.py`` and ``lobpcg.py`` where it has them), run against the current
statistics storage through :class:`DenseZStats`.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
import types
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness import REPO  # noqa: F401  (also makes lora_da_fast importable from a source tree)

from lora_da_fast import LoraDAConfig
from lora_da_fast.solve import batched as new_batched
from lora_da_fast.solve import factor as new_factor
from lora_da_fast.solve import lobpcg as new_lobpcg
from lora_da_fast.solve import operator as new_operator

# --------------------------------------------------------------------------------------------------
# Today's solver, from git


# the eigen-solve's modules of the solver at some revisions, in import order: one lobpcg.py (issue 17),
# later split into factor.py <- operator.py <- lobpcg.py; none before issue 17 (all in batched.py)
_SOLVER_PARTS = ("factor", "operator", "lobpcg")


def _git_show(rev: str, path: str) -> Optional[str]:
    """The file ``path`` at git revision ``rev``; ``None`` if that revision has no such file."""
    try:
        return subprocess.check_output(["git", "-C", REPO, "show", f"{rev}:{path}"], text=True,
                                       stderr=subprocess.DEVNULL)
    except subprocess.CalledProcessError:
        return None


def _exec_module(name: str, src: str, origin: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__package__ = "lora_da_fast.solve"
    mod.__file__ = origin
    sys.modules[name] = mod
    exec(compile(src, origin, "exec"), mod.__dict__)
    return mod


def load_baseline(rev: str) -> types.ModuleType:
    """``lora_da_fast/solve/batched.py`` as of git revision ``rev``, loaded as a module of the current
    ``lora_da_fast.solve`` package (its relative imports resolve to the current package), except the
    eigen-solve's modules (:data:`_SOLVER_PARTS`) that ``rev`` has: those are ``rev``'s own (a single
    ``lobpcg.py``, or the later ``factor.py``, ``operator.py`` and ``lobpcg.py``), loaded first and seen by
    its imports in place of the current ones while it loads."""
    src = subprocess.check_output(["git", "-C", REPO, "show", f"{rev}:lora_da_fast/solve/batched.py"], text=True)
    name = f"lora_da_fast.solve._baseline_{rev}"
    pkg = sys.modules["lora_da_fast.solve"]
    saved = {}  # part -> (the current module in sys.modules, the package's attribute)
    try:
        for part in _SOLVER_PARTS:
            path = f"lora_da_fast/solve/{part}.py"
            part_src = _git_show(rev, path)
            if part_src is None:
                continue
            full = f"lora_da_fast.solve.{part}"
            saved[part] = (sys.modules.get(full), getattr(pkg, part, None))
            old = _exec_module(f"{name}_{part}", part_src, f"<git {rev}:{path}>")
            sys.modules[full] = old  # (``from .lobpcg import ...``)
            setattr(pkg, part, old)  # (``from . import factor``)
        return _exec_module(name, src, f"<git {rev}:lora_da_fast/solve/batched.py>")
    finally:
        for part, (current, attr) in saved.items():
            full = f"lora_da_fast.solve.{part}"
            if current is None:
                sys.modules.pop(full, None)
            else:
                sys.modules[full] = current
            if attr is None:
                delattr(pkg, part)
            else:
                setattr(pkg, part, attr)


class DenseZStats:
    """The statistics with dense ``Z`` matrices, for a revision of the solver that reads ``stats.Z[g]`` as
    ``d_in x d_in`` (the current storage may pack them)."""

    def __init__(self, stats):
        self._stats = stats
        dense = getattr(stats, "dense_Z", None)
        self.Z = {g: (dense(g) if dense is not None else z) for g, z in stats.Z.items()}

    def __getattr__(self, name):
        return getattr(self._stats, name)


# --------------------------------------------------------------------------------------------------
# Op counting


_VIEWS = {"view", "_unsafe_view", "slice", "select", "transpose", "t", "permute", "expand", "diagonal",
          "unsqueeze", "squeeze", "as_strided", "alias", "detach", "split", "unbind", "narrow", "lift_fresh",
          "_reshape_alias", "split_with_sizes", "view_as_real", "_to_copy_noop", "numpy_T", "mT"}
# ops that wait for the device on CUDA (``eigh`` also launches work: counted in both)
_SYNC_ONLY = {"_local_scalar_dense", "item", "is_nonzero", "equal"}
_SYNC_AND_KERNEL = {"nonzero", "masked_select", "unique_consecutive", "_unique2", "unique_dim",
                    "_linalg_eigh", "linalg_eigh", "linalg_cholesky", "linalg_inv", "_linalg_check_errors"}


def _opname(func) -> str:
    return func.overloadpacket.__name__


class OpCounter(TorchDispatchMode):
    """Counts device kernels, host synchronisations and host ops (inside ``host_section``)."""

    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.syncs = 0
        self.host_ops = 0
        self.host_s = 0.0  # thread CPU time inside the host ops
        self.by_name: Counter = Counter()
        self._host = 0  # > 0 inside a host section; the first ``_host_device`` ops there are device ops
        self._host_device = 0

    @contextlib.contextmanager
    def host_section(self, device_ops: int = 0, syncs: int = 1, copies_back: int = 0):
        """Ops run on the host (today's Rayleigh-Ritz): the first ``device_ops`` are still device kernels
        (its Gram matrices), then ``syncs`` device-to-host copies, ``copies_back`` host-to-device ones."""
        self._host += 1
        self._host_device = device_ops
        self.syncs += syncs
        self.kernels += copies_back
        try:
            yield
        finally:
            self._host -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.thread_time()
        out = func(*args, **(kwargs or {}))
        spent = time.thread_time() - t0
        name = _opname(func)
        if name in _VIEWS:
            return out
        if self._host and self._host_device <= 0:
            self.host_ops += 1
            self.host_s += spent
            return out
        if self._host:
            self._host_device -= 1
        self.by_name[name] += 1
        if name in _SYNC_ONLY:
            self.syncs += 1
            return out
        if name in _SYNC_AND_KERNEL or (name == "index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))):
            self.syncs += 1
        self.kernels += 1
        return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    else:
        yield x


class BytesFlops(TorchDispatchMode):
    """Bytes read and written by every non-view op, and flops of the linear-algebra ops (meta tensors)."""

    def __init__(self, cholesky_inverse_flops: Callable[[int], float] = lambda n: 2.0 * n ** 3):
        super().__init__()
        self.bytes = 0
        self.flops = 0.0
        self._ci = cholesky_inverse_flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _opname(func)
        if name in _VIEWS:
            return out
        self.bytes += sum(_nbytes(t) for t in _flatten(args)) + sum(_nbytes(t) for t in _flatten(out))
        batch = lambda t: math.prod(t.shape[:-2])  # noqa: E731
        if name in ("mm", "bmm", "addmm", "baddbmm", "matmul"):
            a, b = (args[0], args[1]) if name in ("mm", "bmm", "matmul") else (args[1], args[2])
            self.flops += 2.0 * batch(a) * a.shape[-2] * a.shape[-1] * b.shape[-1]
        elif name == "linalg_solve_triangular":
            A, B = args[0], args[1]
            n = A.shape[-1]
            m = B.shape[-1] if kwargs.get("left", True) else B.shape[-2]
            self.flops += float(max(batch(A), batch(B))) * n * n * m
        elif name in ("linalg_cholesky_ex", "linalg_cholesky", "cholesky"):
            self.flops += batch(args[0]) * args[0].shape[-1] ** 3 / 3.0
        elif name == "cholesky_inverse":
            self.flops += batch(args[0]) * self._ci(args[0].shape[-1])
        return out


# --------------------------------------------------------------------------------------------------
# Shapes: bytes per pass, fixed flops


# per layer of a Llama shape: (d_in, d_out, modules of that shape per input group)
def llama_stacks(hidden: int, mlp: int, kv_out: int) -> List[Tuple[int, int, int]]:
    out = [(hidden, hidden, 1)]  # q (with k and v when they have q's shape), o below
    if kv_out == hidden:
        out = [(hidden, hidden, 3)]
    else:
        out += [(hidden, kv_out, 2)]
    return out + [(hidden, hidden, 1), (hidden, mlp, 2), (mlp, hidden, 1)]


SHAPES = {"llama7b": (32, 4096, 11008, 4096), "llama1b": (22, 2048, 5632, 256), "smollm2": (30, 576, 1536, 192)}


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def shape_proxies(base: types.ModuleType, shape: str = "llama7b", rank: int = 8) -> Dict[str, dict]:
    """Bytes of one operator application over every module of ``shape`` and flops of the fixed phase
    (Cholesky and inverse of every input group), for today's solver (``base``) and the current one,
    each with its GPU choices (explicit inverse, default block). Meta tensors: nothing is computed."""
    layers, hidden, mlp, kv = SHAPES[shape]
    meta = dict(device="meta", dtype=torch.float64)
    res = {}
    for label, mod in (("today", base), ("new", None)):
        bf_pass, bf_fixed = BytesFlops(), BytesFlops()
        kw_new = new_batched.BatchedOptions().block(rank)[1]
        kw_today = rank + max(rank, 8)  # today's GPU default expands every column of the block
        groups = {}
        for d_in, d_out, c in llama_stacks(hidden, mlp, kv):
            f = layers
            idx = torch.arange(f).repeat_interleave(c)
            L = torch.empty(f, d_in, d_in, **meta)
            G = torch.empty(f * c, d_out, d_in, **meta)
            u = torch.empty(f * c, d_out, **meta)
            b = torch.empty(f * c, **meta)
            groups[d_in] = groups.get(d_in, 0) + f
            if mod is None:
                with _patched(new_factor, "gpu_style", lambda t: True):
                    op = new_operator._Operator(L, idx, G, u, 1.0, b, torch.empty(f, d_in, d_in, **meta))
                    W = torch.empty(f * c, d_in, kw_new, **meta)
                    with bf_pass:
                        op.apply(W)
            else:
                op = mod._Operator(L, idx, G, u, 1.0, b, torch.empty(f, d_in, d_in, **meta))
                W = torch.empty(f * c, d_in, kw_today, **meta)
                with bf_pass:
                    op(W)
        # fixed phase: one Cholesky per input group, and the inverse
        for d_in, g in groups.items():
            L = torch.empty(g, d_in, d_in, **meta)
            with bf_fixed:
                torch.linalg.cholesky_ex(L)
                if mod is None:
                    with _patched(new_factor, "gpu_style", lambda t: True):
                        new_factor.spd_inverse(L)
                else:
                    mod._tril_inverse(L)
        # today's solver also estimates ||Zd^{-1}|| by 5 block products with L^{-1}^T L^{-1} (2 reads of
        # L^{-1} each) per group; the current one reads the diagonal of the explicit inverse
        norm_bytes = 0
        if mod is not None:
            norm_bytes = sum(5 * 2 * g * d_in * d_in * 8 for d_in, g in groups.items())
        # the current solver also runs the damping rule (steps.input_damping, issue 15) before its own
        # factorisation: one more float64 Cholesky per group, of sym(Z) + lam/2 I
        damping = sum(g * d_in ** 3 / 3.0 for d_in, g in groups.items()) if mod is None else 0.0
        res[label] = dict(pass_gb=bf_pass.bytes / 1e9, fixed_tflop=bf_fixed.flops / 1e12,
                          damping_rule_tflop=damping / 1e12, norm_gb=norm_bytes / 1e9)
    return res


# --------------------------------------------------------------------------------------------------
# Passes per module


def module_pass_bytes(stats, name: str, groups: Dict[str, List[str]]) -> float:
    """Bytes of one application of ``M'`` to a module with an explicit float64 ``Zd^{-1}`` shared by the
    ``c`` same-shape modules of its group (read twice) and a float64 ``G`` (read twice)."""
    st = stats.modules[name]
    n, d_out = st.d_in, st.d_out
    c = sum(1 for m in groups[st.group] if stats.modules[m].G.shape == st.G.shape)
    return 2 * 8 * n * n / c + 2 * 8 * n * d_out


def weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    order = np.argsort(values)
    v, w = np.asarray(values)[order], np.asarray(weights, dtype=float)[order]
    cum = np.cumsum(w)
    return float(v[np.searchsorted(cum, 0.5 * cum[-1])])


def instrument_baseline(base: types.ModuleType):
    """Counters of today's solver: operator applications per module (same units as the current solver's
    ``diagnostics``). Returns ``(passes, restore)``: ``passes`` fills during its solves."""
    passes: Dict[str, float] = {}
    tags: Dict[int, float] = {}
    counter = [0]
    Op = base._Operator
    saved = {k: getattr(Op, k) for k in ("__init__", "subset", "with_coefficients", "zinv", "__call__",
                                          "d_mul", "dt_mul", "zd_mul")}
    saved_emit = base._emit

    def weights(op):
        n, d_out = op.G.shape[-1], op.G.shape[-2]
        share = n * n / max(1, op.per_factor)
        wz = share / (2 * share + 2 * n * d_out)
        return wz, 0.5 - wz

    def add(op, w):
        for t in op._tags:
            tags[t] = tags.get(t, 0.0) + w

    def init(self, *a, **k):
        saved["__init__"](self, *a, **k)
        self._tags = list(range(counter[0], counter[0] + len(self)))
        counter[0] += len(self)

    def subset(self, idx):
        out = saved["subset"](self, idx)
        out._tags = [self._tags[i] for i in idx.tolist()]
        return out

    def with_coefficients(self, a, b):
        out = saved["with_coefficients"](self, a, b)
        out._tags = self._tags
        return out

    def zinv(self, X):
        add(self, weights(self)[0])
        return saved["zinv"](self, X)

    def call(self, X):
        add(self, 2 * weights(self)[1])
        return saved["__call__"](self, X)

    def d_mul(self, X):
        add(self, weights(self)[1])
        return saved["d_mul"](self, X)

    def dt_mul(self, X):
        add(self, weights(self)[1])
        return saved["dt_mul"](self, X)

    def zd_mul(self, X):
        add(self, 2 * weights(self)[0])
        return saved["zd_mul"](self, X)

    def emit(stats, cfg, names, mods, op, sol, lams, factors, reports):
        saved_emit(stats, cfg, names, mods, op, sol, lams, factors, reports)
        wz = weights(op)[0]
        for name, t in zip(names, op._tags):
            # + the norm estimate of Zd^{-1}: 5 products with the group's factor (its share)
            passes[name] = tags.pop(t, 0.0) + (5 * wz if cfg.beta > 0 else 0.0)

    for k, v in (("__init__", init), ("subset", subset), ("with_coefficients", with_coefficients),
                 ("zinv", zinv), ("__call__", call), ("d_mul", d_mul), ("dt_mul", dt_mul), ("zd_mul", zd_mul)):
        setattr(Op, k, v)
    base._emit = emit

    def restore():
        for k, v in saved.items():
            setattr(Op, k, v)
        base._emit = saved_emit

    return passes, restore


def passes_per_module(base: types.ModuleType, stats, cfg: LoraDAConfig, threads: int = 1
                      ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, object]]:
    """``({"today": {module: passes}, "new": {module: passes}}, {"today": result, "new": result})`` on
    ``stats``, each solver on its CUDA code path on CPU tensors (:func:`cuda_path`; explicit inverse, the
    GPU's block and stopping)."""
    passes, restore = instrument_baseline(base)
    try:
        with cuda_path(base):
            # (today's GPU choices: explicit L^{-1}, every residual column expanded)
            res_today = base.solve_batched(DenseZStats(stats), cfg, workers=threads, apply="inverse", expand_all=True)
    finally:
        restore()
    diag: Dict[str, dict] = {}
    with cuda_path(None):
        res_new = new_batched.solve_batched(stats, cfg, workers=threads, diagnostics=diag, apply="inverse")
    return ({"today": passes, "new": {m: d["passes"] for m, d in diag.items()}},
            {"today": res_today, "new": res_new})


# --------------------------------------------------------------------------------------------------
# Kernels, syncs and host time per iteration (CUDA code path on CPU tensors)


def _stack_operator(mod, b: int, c: int, n: int, d_out: int, seed: int, beta: float):
    """A stack of ``b`` modules, ``c`` per factor, with random SPD factors; ``mod``: today's module or None."""
    gen = torch.Generator().manual_seed(seed)
    f = b // c
    Q = torch.randn(f, n, n, generator=gen, dtype=torch.float64)
    Z = Q @ Q.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=torch.float64)
    L = torch.linalg.cholesky(Z)
    idx = torch.arange(f).repeat_interleave(c)
    G = torch.randn(b, d_out, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    u = torch.rand(b, d_out, generator=gen, dtype=torch.float64) + 0.5
    bb = torch.full((b,), beta, dtype=torch.float64) if beta else None
    if mod is None:
        return new_operator._Operator(L, idx, G, u, 1.0, bb, torch.cholesky_inverse(L)), gen
    return mod._Operator(L, idx, G, u, 1.0, bb, torch.linalg.inv(L)), gen


@contextlib.contextmanager
def cuda_path(base: Optional[types.ModuleType]):
    """The GPU choices on CPU tensors: today's (``base``: CholeskyQR2, per-item factorisation, plain GEMMs)
    or the current one's (``gpu_style``)."""
    with contextlib.ExitStack() as es:
        if base is None:
            es.enter_context(_patched(new_factor, "gpu_style", lambda t: True))
        else:
            es.enter_context(_patched(base, "_householder_on", lambda W: False))
            es.enter_context(_patched(base, "_per_item", lambda A: A.shape[0] > 1))
            es.enter_context(_patched(base, "_mm", lambda A, B: A @ B))
        yield


def _run_iterations(mod, op, gen, k: int, r: int, iters: int, counter: Optional[OpCounter] = None):
    """``iters`` LOBPCG iterations that never converge (today's or the current, CUDA choices)."""
    b, d_out, n = op.G.shape
    X = torch.randn(b, n, k, generator=gen, dtype=torch.float64)
    if mod is None:
        kw = kp = r  # the current GPU default: basis of k + r + r columns
        new_lobpcg.lobpcg(op, X, r, gen=gen, tol=1e-300, abs_tol=0.0, maxiter=iters, kw=kw, kp=kp)
        return
    rr = mod._rayleigh_ritz
    if counter is not None:
        def rr_counted(S, AS, kk=None):
            with counter.host_section(device_ops=2, syncs=1, copies_back=3 if kk is not None else 2):
                return rr(S, AS, kk)
        mod._rayleigh_ritz = rr_counted
    try:
        mod.lobpcg_batched(op, X, r, gen=gen, tol=1e-300, abs_tol=0.0, maxiter=iters, wcols=k)
    finally:
        mod._rayleigh_ritz = rr


def iteration_counts(base: types.ModuleType, stacks: Sequence[int] = (1, 8, 64), c_values: Sequence[int] = (1, 3),
                     n: int = 96, d_out: int = 64, r: int = 8, it: Tuple[int, int] = (5, 15),
                     repeat: int = 3) -> List[dict]:
    """Per LOBPCG iteration on stacks of ``f`` factors (``stacks``) of ``c`` modules each (``c_values``), on
    the CUDA code path on CPU tensors at tiny sizes, as the difference of runs
    of ``it[1]`` and ``it[0]`` iterations: device kernels, host syncs and host ops (dispatch-mode counts);
    the thread's CPU time (best of ``repeat``, one torch thread), all work included; the time inside the
    host's own linear algebra (today's Rayleigh-Ritz); and the host time: the CPU time at the smallest
    stack (Python, dispatch and next to nothing to compute) plus the host linear algebra at this stack."""
    k = r + max(r, 8)
    rows = []
    for label, mod in (("today", base), ("new", None)):
        for c in c_values:
            for f in stacks:
                b = f * c  # modules: f factors of c modules each
                counts, walls = [], []
                for nit in it:
                    op, gen = _stack_operator(mod, b, c, n, d_out, seed=b, beta=0.0)
                    cnt = OpCounter()
                    with cuda_path(mod), cnt:
                        _run_iterations(mod, op, gen, k, r, nit, cnt)
                    counts.append(cnt)
                    best = math.inf
                    for _ in range(repeat):
                        op, gen = _stack_operator(mod, b, c, n, d_out, seed=b, beta=0.0)
                        with cuda_path(mod):
                            t0 = time.thread_time()
                            _run_iterations(mod, op, gen, k, r, nit)
                            best = min(best, time.thread_time() - t0)
                    walls.append(best)
                d = it[1] - it[0]
                rows.append(dict(solver=label, modules_per_factor=c, factors=f, stack=b,
                                 kernels=(counts[1].kernels - counts[0].kernels) / d,
                                 syncs=(counts[1].syncs - counts[0].syncs) / d,
                                 host_ops=(counts[1].host_ops - counts[0].host_ops) / d,
                                 ms=1e3 * (walls[1] - walls[0]) / d,
                                 host_lapack_ms=1e3 * (counts[1].host_s - counts[0].host_s) / d,
                                 top_ops=dict((counts[1].by_name - counts[0].by_name).most_common(8))))
        # host time: launching (the whole iteration at a stack of one, where there is almost nothing to
        # compute) plus the host's own linear algebra at this stack size
        for row in rows:
            if row["solver"] == label:
                one = next((q for q in rows if q["solver"] == label and q["factors"] == min(stacks)
                            and q["modules_per_factor"] == row["modules_per_factor"]), row)
                row["host_ms"] = one["ms"] - one["host_lapack_ms"] + row["host_lapack_ms"]
    return rows


def env_threads() -> int:
    return int(os.environ.get("BENCH_THREADS", "0")) or torch.get_num_threads()
