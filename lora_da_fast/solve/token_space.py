"""The exact solve through the tokens (docs/algorithm.md, "Two paths: input factor or tokens"): when a
group's inputs are kept as a matrix ``X`` (``T_all x d_in``: one row per non-padding token) and each
module's output gradients as ``Delta`` (``T_all x d_out``, ``delta_t = dL_i/dy_t``), everything the
solve needs lives in the span of the rows of ``X``, and is computed there in float64.

With the thin QR factorisation ``X^T = V R`` (``V``: ``d_in x k``, ``k = min(T_all, d_in)``, orthonormal
columns spanning the inputs; ``X V = R^T``) and ``P`` the token mask's selection (``T`` selected tokens):

- ``Z = X^T P X / T`` and ``G^T = X^T Delta / n`` = ``V (X V)^T Delta / n``: both map into ``span(V)``,
  and ``Zd = Z + lam I`` maps ``span(V)`` to itself, so ``Zd^{-1} G^T = V Zq^{-1} Gq`` with the
  ``k x k`` matrix ``Zq = lam I + (X V)^T P (X V) / T`` and ``Gq = (X V)^T Delta / n`` (push-through).
  ``D = -Zd^{-1} G^T diag(u) = V Dq``, ``Dq = -Zq^{-1} Gq diag(u)``: ``D`` lies in the span of the
  inputs by construction, and no rounding of a separately accumulated ``G`` is amplified by
  ``1 / lam`` in the directions the inputs do not reach (docs/implementation.md, "Numerics").
- ``sigma = ||D||_2 = ||Dq||_2`` and, restricted to ``span(V)``,
  ``M = V (-alpha Dqn Dqn^T + c Zq^{-1}) V^T``. On the complement ``M = c / lam I`` (``beta > 0``) or
  ``0`` (``beta = 0``), never below the restricted spectrum (``Zq^{-1} <= I / lam``, ``-Dqn Dqn^T <= 0``):
  the ``r`` smallest eigenvectors of ``M`` are ``V`` times those of the ``k x k`` matrix, when
  ``k > r``.

Cost: one QR factorisation of ``X^T`` (``O(T_all d_in min(T_all, d_in))``) per group, per module ``(X V)^T Delta``
(``k T_all d_out``), ``Dq Dq^T`` (``k^2 d_out``), the eigenvalues of the smaller of ``Dq Dq^T`` and
``Dq^T Dq`` for ``sigma`` (no SVD of ``Dq``) and one ``k x k`` symmetric eigendecomposition. Everything
is float64.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..config import LoraDAConfig
from ..errors import NumericalError
from ..fisher import FisherStatistics, ModuleStatistics
from ..results import LoraDAResult, LoraFactors, ModuleReport
from .first_order import first_order_change, move_seed, one_ulp, ulp_step
from .steps import output_damping, output_inverse, tie_note

SOLVER_TOKENS = "tokens-fp64"


class TokenBasis:
    """A float64 orthonormal basis of one input group's tokens: ``V`` (``d_in x k``, ``k = min(T_all,
    d_in)``) from the QR factorisation ``X^T = V R``, the tokens in it ``XV = X V = R^T`` (``T_all x k``),
    the selected rows' Gram ``Zc = (XV)^T P (XV)`` (``k x k``) and the token counts. (Any orthonormal basis
    of a space holding the inputs' span will do: the QR costs a third of the SVD it replaces.)"""

    def __init__(self, X: torch.Tensor, selected: Optional[torch.Tensor], num_tokens: int):
        W = X.to(torch.float64)
        Q, R = torch.linalg.qr(W.transpose(-1, -2))  # reduced: [d_in, k], [k, T_all]
        self.d_in = int(W.shape[1])
        self.V = Q  # [d_in, k]
        self.XV = R.transpose(-1, -2)  # [T_all, k]
        Xs = self.XV if selected is None else self.XV[selected.to(R.device)]
        self.Zc = Xs.transpose(-1, -2) @ Xs  # V^T X^T P X V
        self.num_tokens = int(num_tokens)

    @property
    def k(self) -> int:
        return int(self.V.shape[1])

    def zq(self, lam: float) -> torch.Tensor:
        """``Zq = V^T Zd V = lam I + Zc / T`` (``k x k``, float64), symmetrised."""
        Zq = self.Zc / self.num_tokens
        Zq = 0.5 * (Zq + Zq.transpose(-1, -2))
        Zq.diagonal().add_(lam)
        return Zq

    def project_gradient(self, delta: torch.Tensor, num_examples: int) -> torch.Tensor:
        """``Gq = V^T G^T = (X V)^T Delta / n`` (``k x d_out``), ``G = Delta^T X / n``."""
        return (self.XV.transpose(-1, -2) @ delta.to(torch.float64)) / num_examples


def solve_module_tokens(basis: TokenBasis, Lq: torch.Tensor, Zq_inv: Optional[torch.Tensor], delta: torch.Tensor,
                        u: torch.Tensor, num_examples: int, lam: float, cfg: LoraDAConfig,
                        moves: Optional["TokenMoves"] = None, module: str = "") -> Tuple[LoraFactors, dict]:
    """One module through its group's :class:`TokenBasis`: ``Lq`` is the Cholesky factor of
    ``Zq = lam I + Zc / T``, ``Zq_inv`` its inverse (when ``beta > 0`` or with ``moves``). Returns the
    factors (fp32, PEFT layout) and the report's numbers (``sigma``, ``eigenvalues``, ``eigengap``, ``residual``,
    ``update_norm``), the same quantities :func:`~.reference.solve_reference` reports. With ``moves``
    (:class:`TokenMoves` of the group): also the first-order one-ulp sensitivity of ``module``, as
    ``"sensitivity"``."""
    r = cfg.rank
    u = u.to(torch.float64)
    Gq = basis.project_gradient(delta, num_examples)  # [k, d_out]
    Dq = -torch.cholesky_solve(Gq * u[None, :], Lq)
    DDt = Dq @ Dq.transpose(-1, -2)  # [k, k]: the bias term, and (or its smaller twin) sigma^2
    gram = Dq.transpose(-1, -2) @ Dq if Dq.shape[1] < Dq.shape[0] else 0.5 * (DDt + DDt.transpose(-1, -2))
    sigma = torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt()  # ||Dq||_2, without an SVD of Dq
    if not bool(sigma > 0) or not bool(torch.isfinite(sigma)):
        raise NumericalError("the Fisher-gradient is zero or non-finite")
    Dq = Dq / sigma
    Mq = (-cfg.alpha / float(sigma) ** 2) * DDt
    outside = 0.0  # the eigenvalue of M on the complement of span(V)
    if cfg.beta > 0:
        c = cfg.beta * float(u.sum()) / (cfg.population_size * float(sigma) ** 2)
        Mq = Mq + c * Zq_inv
        outside = c / lam
    Mq = 0.5 * (Mq + Mq.transpose(-1, -2))
    if not bool(torch.isfinite(Mq).all()):  # an overflow (beta ~ 1e308): non-finite factors, which the
        nan = torch.full((r, basis.d_in), float("nan"))  # engine reports with the likely cause
        return LoraFactors(nan, torch.full((Dq.shape[1], r), float("nan"))), {
            "sigma": float(sigma), "eigenvalues": [], "eigengap": float("nan"), "residual": float("nan"),
            "update_norm": float("nan")}
    w, Vm = torch.linalg.eigh(Mq)
    Vr = Vm[:, :r]
    A0 = basis.V @ Vr  # [d_in, r], orthonormal columns
    # canonical signs (largest-magnitude entry of each column positive), as steps.canonical_signs
    idx = A0.abs().argmax(dim=0, keepdim=True)
    s = torch.sign(torch.gather(A0, 0, idx))
    s = torch.where(s == 0, torch.ones_like(s), s)
    A0, Vr = A0 * s, Vr * s
    theta = w[:r]
    resid = torch.linalg.vector_norm(Mq @ Vr - Vr * theta, dim=0).max()
    evs = w.tolist()
    if basis.k < basis.d_in:  # the complement's eigenvalue, d_in - k times
        evs = sorted(evs + [outside] * min(r + 1, basis.d_in - basis.k))
    mnorm = max(max(abs(v) for v in evs), abs(outside) if basis.k < basis.d_in else 0.0,
                torch.finfo(torch.float64).tiny)
    w_r1 = evs[: r + 1]
    gap = (w_r1[r] - w_r1[r - 1]) / mnorm if len(w_r1) > r else float("inf")
    scale = 1.0 / math.sqrt(cfg.gamma)
    lora_A = (A0.transpose(-1, -2) * scale).float().contiguous()
    lora_B = ((Dq.transpose(-1, -2) @ Vr) * scale).float().contiguous()  # (A0^T Dn)^T = Dqn^T Vr
    upd = float(torch.linalg.matrix_norm(lora_B.double() @ lora_A.double()))
    out = {"sigma": float(sigma), "eigenvalues": w_r1, "eigengap": gap, "residual": float(resid) / mnorm,
           "update_norm": upd}
    if moves is not None:
        out["sensitivity"] = _first_order_tokens(basis, Zq_inv, Gq, delta, u, num_examples, lam, float(sigma), w, Vm,
                                                 cfg, moves, module)
        out["sensitivity_by"] = "first-order"
    return LoraFactors(lora_A, lora_B), out


class TokenMoves:
    """The one-ulp moves of a group's tokens (what ``sensitivity="always"`` applies before its second
    solve): ``dX`` (float64, equal rows moved alike), and per module the move of ``Delta``."""

    def __init__(self, group: str, X: torch.Tensor, selected: Optional[torch.Tensor], seed: int):
        self.group, self.seed = group, seed
        self.dX = one_ulp(X, f"X.{group}", seed, same_rows=True).to(torch.float64) - X.to(torch.float64)
        self.sel = None if selected is None else selected.to(X.device)[:, None].to(torch.float64)

    def delta_move(self, module: str, delta: torch.Tensor) -> torch.Tensor:
        return ulp_step(delta, f"D.{module}", self.seed)


def _first_order_tokens(basis: TokenBasis, Zq_inv: torch.Tensor, Gq: torch.Tensor, delta: torch.Tensor, u: torch.Tensor,
                        num_examples: int, lam: float, sigma: float, w: torch.Tensor, Vm: torch.Tensor,
                        cfg: LoraDAConfig, moves: TokenMoves, module: str) -> float:
    """The first-order one-ulp sensitivity of one module solved through its tokens (:mod:`.first_order`),
    for the moves of its tokens ``X`` and ``Delta``. In ``d_in`` space: ``Z`` and ``G`` move with the
    tokens (``dZ = (dX^T P X + X^T P dX) / T``, ``dG^T = (dX^T Delta + X^T dDelta) / n``), which also
    tilts the inputs' span; ``M'`` has the eigenvectors ``V Vm`` in the span and one eigenvalue (``b /
    lam``, or 0) on its complement, so the sum over every eigenvector is exact. Every product has ``r``
    columns: ``O(T (d_in + d_out) r)``."""
    r = cfg.rank
    V, US, T, n = basis.V, basis.XV, basis.num_tokens, num_examples
    dX, sel = moves.dX, moves.sel
    Dl = delta.to(torch.float64)
    dDl = moves.delta_move(module, delta)

    def X_mul(x):  # X x = (X V) V^T x
        return US @ (V.transpose(-1, -2) @ x)

    def Xt_mul(y):  # X^T y = V (X V)^T y
        return V @ (US.transpose(-1, -2) @ y)

    def P(y):
        return y if sel is None else y * sel

    def zinv(x):  # Zd^{-1} = V Zq^{-1} V^T + (I - V V^T) / lam
        c = V.transpose(-1, -2) @ x
        return V @ (Zq_inv @ c - c / lam) + x / lam

    def dz_mul(x):
        return (dX.transpose(-1, -2) @ P(X_mul(x)) + Xt_mul(P(dX @ x))) / T

    def dgu_mul(y):  # dG^T diag(u) y
        uy = u[:, None] * y
        return (dX.transpose(-1, -2) @ (Dl @ uy) + Xt_mul(dDl @ uy)) / n

    def dgu_t_mul(x):  # diag(u) dG x
        return u[:, None] * ((Dl.transpose(-1, -2) @ (dX @ x) + dDl.transpose(-1, -2) @ X_mul(x)) / n)

    def one(f):  # the [1, ...] stack of first_order_change
        return lambda X: f(X[0])[None]

    b, outside = None, torch.zeros(1, dtype=torch.float64)
    if cfg.beta > 0:
        bval = cfg.beta * float(u.sum()) / cfg.population_size
        b, outside = torch.tensor([bval], dtype=torch.float64), torch.tensor([bval / lam], dtype=torch.float64)
    s2 = sigma * sigma
    Wv = V @ Vm
    got = first_order_change(
        zinv=one(zinv), gtu_mul=one(lambda y: V @ (Gq @ (u[:, None] * y))),
        ug_mul=one(lambda x: u[:, None] * (Gq.transpose(-1, -2) @ (V.transpose(-1, -2) @ x))), dz_mul=one(dz_mul),
        dgu_mul=one(dgu_mul), dgu_t_mul=one(dgu_t_mul), a=cfg.alpha, b=b,
        Vr=Wv[None, :, :r], theta_r=(w[None, :r] * s2), W=Wv[None, :, r:], theta_w=(w[None, r:] * s2),
        rest_value=outside if basis.k < basis.d_in else None)
    return float(got[0])


def token_output_moments(delta: torch.Tensor, selected: Optional[torch.Tensor], example: torch.Tensor,
                         num_tokens: int, sequence_sums: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The output statistics from the tokens, in float64 (so that they too do not depend on the
    summation order of a pass): ``y = sum_{t in S} delta_t ** 2 / T`` and, if ``sequence_sums``, the
    per-example sums ``s_i = sum_{t in S_i} delta_t`` (``[n, d_out]``, examples in increasing
    ``example`` index; ``u`` does not depend on their order)."""
    d = delta.to(torch.float64)
    if selected is not None:
        sel = selected.to(d.device)
        d, example = d[sel], example.to(d.device)[sel]
    y = (d * d).sum(dim=0) / num_tokens
    if not sequence_sums:
        return y, None
    ids, inverse = torch.unique(example.to(d.device), sorted=True, return_inverse=True)
    seq = torch.zeros(ids.shape[0], d.shape[1], dtype=torch.float64, device=d.device).index_add_(0, inverse, d)
    return y, seq


def usable(num_tokens_all: int, d_in: int, rank: int) -> bool:
    """Whether a group's tokens give the ``r`` smallest eigenvectors: its span must have more than
    ``rank`` dimensions (``min(T_all, d_in) > rank``); otherwise the input-factor path is used."""
    return min(num_tokens_all, d_in) > rank


def solve_group_tokens(group: str, X: torch.Tensor, selected: Optional[torch.Tensor], deltas: Dict[str, torch.Tensor],
                       us: Dict[str, torch.Tensor], lam_ys: Dict[str, float], num_examples: int, num_tokens: int,
                       cfg: LoraDAConfig, lam: Optional[float] = None, notes: Optional[List[str]] = None
                       ) -> Tuple[Dict[str, LoraFactors], Dict[str, ModuleReport]]:
    """Every module of one input group through its tokens, in float64 (see the module docstring).

    ``X``: ``[T_all, d_in]`` inputs of every non-padding token; ``selected``: ``[T_all]`` bool, the
    tokens of ``Z`` and ``y`` (``None``: all); ``deltas[name]``: ``[T_all, d_out]`` output gradients
    (``G = Delta^T X / n``); ``us[name]``: the output inverse ``u``; ``lam_ys``: its damping (for the
    report). ``lam``: the input damping (``cfg.damping`` if ``None``): ``Zq`` is positive definite for
    any ``lam > 0``, so no retry is needed. The factors are placed on ``X``'s device."""
    lam = cfg.damping if lam is None else lam
    basis = TokenBasis(X, selected, num_tokens)
    Zq = basis.zq(lam)
    Lq, info = torch.linalg.cholesky_ex(Zq)
    if int(info) != 0:  # lam I + a Gram matrix: only a float64 overflow or NaN gets here
        raise NumericalError(f"the float64 Cholesky factorisation of the token-space input factor of {group} "
                             f"failed (damping {lam:g}): the inputs are not finite or too large")
    moves = TokenMoves(group, X, selected, move_seed(cfg)) if cfg.sensitivity == "auto" else None
    # (the estimate needs Zq^{-1} whatever beta: once per group)
    Zq_inv = torch.cholesky_inverse(Lq) if cfg.beta > 0 or moves is not None else None
    factors: Dict[str, LoraFactors] = {}
    reports: Dict[str, ModuleReport] = {}
    for name, delta in deltas.items():
        try:
            f, rep = solve_module_tokens(basis, Lq, Zq_inv, delta, us[name], num_examples, lam, cfg, moves, name)
        except NumericalError as exc:
            raise NumericalError(f"module {name}: {exc}") from None
        factors[name] = f
        why = list(notes or [])
        tie = tie_note(rep["eigenvalues"], cfg.rank)  # as the batched solver says it
        if tie:
            why.append(tie)
        reports[name] = ModuleReport(d_in=int(X.shape[1]), d_out=int(delta.shape[1]), group=group, damping=lam,
                                     output_damping=lam_ys[name], solver=SOLVER_TOKENS, notes=why, **rep)
    return factors, reports


def token_path_groups(stats: FisherStatistics, cfg: LoraDAConfig) -> List[str]:
    """The input groups of ``stats`` solved through their tokens: those whose tokens were kept
    (``stats.tokens``) and whose span has more than ``rank`` dimensions (:func:`usable`)."""
    tokens = getattr(stats, "tokens", None)
    if tokens is None:
        return []
    groups = stats.groups()
    return [g for g, x in tokens.X.items()
            if groups.get(g) and usable(tokens.num_rows, int(x.shape[1]), cfg.rank)]


def solve_token_groups(stats: FisherStatistics, cfg: LoraDAConfig, groups: Sequence[str], progress: bool = False,
                       desc: str = "solve (tokens)") -> LoraDAResult:
    """The modules of ``groups`` (all with kept tokens) through their tokens, in float64. The output
    statistics ``y`` (or the per-example sums) are recomputed from the tokens in float64 too
    (:func:`token_output_moments`), so that nothing of the result depends on the pass's summation order.

    On a CPU the groups are solved by parallel worker threads (torch's thread count), one intra-op thread
    each: the products are small, and several threads on one of them mostly wait on each other. Each
    group's result does not depend on which worker solved it."""
    tokens = stats.tokens
    members = stats.groups()
    mode = stats.output_fisher

    def solve(g: str) -> Tuple[Dict[str, LoraFactors], Dict[str, ModuleReport]]:
        names = members[g]
        us, lam_ys, deltas = {}, {}, {}
        for m in names:
            delta = tokens.delta[m]
            y, seq = token_output_moments(delta, tokens.selected, tokens.example, stats.num_tokens,
                                          mode == "sequence_lowrank")
            st = ModuleStatistics(g, stats.modules[m].G, y, seq)
            lam_ys[m] = output_damping(st, cfg)
            us[m] = output_inverse(st, stats.num_examples, lam_ys[m], mode)
            deltas[m] = delta
        return solve_group_tokens(g, tokens.X[g], tokens.selected, deltas, us, lam_ys, stats.num_examples,
                                  stats.num_tokens, cfg)

    threads = torch.get_num_threads()
    on_cpu = all(tokens.X[g].device.type == "cpu" for g in groups)
    workers = max(1, min(threads, len(groups))) if on_cpu else 1
    done: Dict[str, Tuple[Dict[str, LoraFactors], Dict[str, ModuleReport]]] = {}
    bar = tqdm(total=sum(len(members[g]) for g in groups), desc=desc, unit="module", disable=not progress,
               dynamic_ncols=True)
    try:
        if workers > 1:
            torch.set_num_threads(1)
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-da-tokens") as pool:
                for g, out in zip(groups, pool.map(solve, groups)):
                    done[g] = out
                    bar.update(len(members[g]))
        else:
            for g in groups:
                done[g] = solve(g)
                bar.update(len(members[g]))
    finally:
        torch.set_num_threads(threads)
        bar.close()
    factors: Dict[str, LoraFactors] = {}
    reports: Dict[str, ModuleReport] = {}
    for g in groups:
        f, r = done[g]
        for m in members[g]:  # the factors live where the statistics do
            out = stats.modules[m].G.device
            factors[m] = LoraFactors(f[m].lora_A.to(out), f[m].lora_B.to(out))
            reports[m] = r[m]
    return LoraDAResult(factors, reports)
