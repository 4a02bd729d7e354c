"""The batched solver against the dense float64 reference (``solver.solve_reference``): the accuracy
contract ``||lora_B @ lora_A - exact|| / ||exact|| <= TOL["solver_contract"]`` for every module, on
synthetic statistics with realistic spectra and on statistics gathered from a tiny Llama; reports,
eigen-gaps, seed invariance, damping retries, streaming and fallbacks."""
import math

import pytest
import torch

from lora_da_fast import FisherStatistics, LoraDAConfig, ModuleStatistics, collect_statistics, solve_lora_da
from lora_da_fast.solve.batched import (SOLVER_DENSE, SOLVER_FALLBACK, SOLVER_ITERATIVE, BatchedOptions,
                                         _plan_chunks, cholesky_stack, solve_batched)
from lora_da_fast.errors import ConfigError, NumericalError
from lora_da_fast.solve import solve_reference
from lora_da_fast.triangle import pack_upper

from .helpers import random_examples, rel_err, tiny_llama
from .tolerances import TOL

# Spectra of Z seen on SmolLM2 (ALGORITHM.md): first-layer attention input, late MLP input; a
# well-conditioned one; "singular": fewer tokens than d_in (only the damping makes Zd definite).
SPECTRA = {"well": (1e-2, 1.0), "early": (4e-9, 0.6), "late": (1e-3, 4e4), "singular": None}


def _spd(d, spectrum, gen):
    """``(Z, Q, s)`` in float64 with ``Z = Q diag(s) Q^T``."""
    if spectrum is None:
        X = torch.randn(d // 2, d, generator=gen, dtype=torch.float64) * torch.logspace(-2, 1, d, dtype=torch.float64)
        Z = X.T @ X / X.shape[0]
        s, Q = torch.linalg.eigh(Z)
        return Z, Q, s.clamp(min=0)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    s = torch.logspace(math.log10(spectrum[0]), math.log10(spectrum[1]), d, dtype=torch.float64)
    return (Q * s) @ Q.T, Q, s


def synthetic(seed, spectrum="late", layout=((160, (160, 64, 64)), (160, (160,)), (192, (96,))),
              seq_n=None, ylevel=1e-5):
    """Statistics of a few input groups (``layout``: ``(d_in, d_outs)`` per group, modules of one group
    share its ``Z``). ``G^T`` lies in the range of ``Z`` with the scale of a real mean gradient."""
    gen = torch.Generator().manual_seed(seed)
    Zs, mods = {}, {}
    for gi, (d_in, d_outs) in enumerate(layout):
        Z, Q, s = _spd(d_in, SPECTRA[spectrum], gen)
        Zs[f"g{gi}"] = Z.float()
        for mi, d_out in enumerate(d_outs):
            W = (torch.randn(d_in, 8, generator=gen, dtype=torch.float64)
                 @ torch.randn(8, d_out, generator=gen, dtype=torch.float64) / 3
                 + 0.3 * torch.randn(d_in, d_out, generator=gen, dtype=torch.float64))
            Gt = (Q * s.sqrt()) @ (Q.T @ W)
            Gt *= 2 * math.sqrt(ylevel) * float(s.mean().sqrt()) / float(Gt.pow(2).mean().sqrt())
            y = ylevel * torch.exp(torch.empty(d_out, dtype=torch.float64).uniform_(-2.3, 2.3, generator=gen))
            seq = None
            if seq_n:
                seq = (torch.randn(seq_n, d_out, generator=gen, dtype=torch.float64) * y.sqrt() * 4).float()
            mods[f"g{gi}.m{mi}"] = ModuleStatistics(f"g{gi}", Gt.T.float().contiguous(), y.float(), seq)
    return FisherStatistics(mods, Zs, seq_n or 32, 4096, output_fisher="sequence_lowrank" if seq_n else "diagonal")


def product(f):
    return f.lora_B.double() @ f.lora_A.double()


def contract_errors(got, ref):
    return {name: rel_err(product(got[name]), product(f)) for name, f in ref.items()}


def check_against_reference(stats, cfg, report_rtol=1e-7, **options):
    ref = solve_reference(stats, cfg)
    got = solve_batched(stats, cfg, **options)
    assert list(got) == list(ref)
    errs = contract_errors(got, ref)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL["solver_contract"], (worst, errs[worst], got.reports[worst])
    for name, rep in got.reports.items():
        want = ref.reports[name]
        f = got[name]
        assert f.lora_A.dtype == torch.float32 and f.lora_A.shape == ref[name].lora_A.shape
        assert f.lora_B.shape == ref[name].lora_B.shape
        assert rep.sigma == pytest.approx(want.sigma, rel=report_rtol)
        assert rep.damping == want.damping and rep.output_damping == pytest.approx(want.output_damping)
        assert rep.group == want.group and (rep.d_in, rep.d_out) == (want.d_in, want.d_out)
        w = want.eigenvalues
        mnorm = (w[-1] - w[-2]) / want.eigengap if 0 < want.eigengap < math.inf else max(map(abs, w))
        for a, b in zip(rep.eigenvalues[: cfg.rank], want.eigenvalues[: cfg.rank]):
            assert abs(a - b) <= 10 * report_rtol * max(mnorm, abs(b)), (name, rep.eigenvalues, want.eigenvalues)
        assert rep.update_norm == pytest.approx(want.update_norm, rel=1e-4)
    return got, ref, errs


# --------------------------------------------------------------------------------------------------
# Accuracy contract


@pytest.mark.parametrize("spectrum", ["well", "early", "late", "singular"])
@pytest.mark.parametrize("beta,N", [(0.0, None), (0.03, 100_000), (5.0, 1000)])
def test_contract_diagonal(spectrum, beta, N):
    stats = synthetic(1 + len(spectrum), spectrum)
    cfg = LoraDAConfig(rank=8, beta=beta, population_size=N)
    got, _, errs = check_against_reference(stats, cfg)
    assert {r.solver for r in got.reports.values()} <= {SOLVER_ITERATIVE, SOLVER_FALLBACK}
    print(f"{spectrum} beta={beta}: max rel err {max(errs.values()):.1e}")


@pytest.mark.parametrize("spectrum", ["early", "late"])
@pytest.mark.parametrize("beta", [0.0, 0.03])
def test_contract_sequence_lowrank(spectrum, beta):
    stats = synthetic(20 + len(spectrum), spectrum, seq_n=24)
    cfg = LoraDAConfig(rank=8, beta=beta, population_size=100_000, output_fisher="sequence_lowrank")
    check_against_reference(stats, cfg)


@pytest.mark.parametrize("spectrum", ["early", "singular"])
def test_contract_relative_output_damping(spectrum):
    stats = synthetic(30, spectrum, ylevel=1e-7)
    cfg = LoraDAConfig(rank=4, population_size=100_000, output_damping_ratio=0.1)
    got, _, _ = check_against_reference(stats, cfg)
    for name, st in stats.modules.items():
        assert got.reports[name].output_damping == pytest.approx(0.1 * float(st.y.double().median()))


@pytest.mark.parametrize("apply", ["solve", "inverse"])
def test_contract_variance_dominated(apply):
    """beta huge, N = 1: M is nearly beta c Zd^{-1}, whose spectrum spreads over 1e8: the residuals are
    preconditioned by Zd (the top eigenvectors of Z are the answer). Both ways of applying Zd^{-1}."""
    stats = synthetic(31, "early")
    check_against_reference(stats, LoraDAConfig(rank=8, beta=1e6, population_size=1), apply=apply)


@pytest.mark.parametrize("extra", [2, 24])
def test_contract_with_other_blocks(extra):
    """Narrow and wide blocks, every residual column expanded (the GPU's way) or not: same contract."""
    stats = synthetic(33, "late", layout=((200, (200, 64)), (200, (96,))))
    for expand_all in (False, True):
        check_against_reference(stats, LoraDAConfig(rank=8, population_size=100_000), dense_below=0, extra=extra,
                                expand_all=expand_all)


def test_contract_float32_working_dtype():
    """Float32 factorisation and iterations with float64 Rayleigh-Ritz: enough on well-conditioned
    statistics (cond(Zd) * eps32 small), which is what the option is for."""
    stats = synthetic(32, "well")
    for beta, N in ((0.0, None), (0.03, 100_000)):
        got, _, errs = check_against_reference(stats, LoraDAConfig(rank=8, beta=beta, population_size=N),
                                               report_rtol=1e-5, dtype=torch.float32)
        assert not any(n for r in got.reports.values() for n in r.notes)  # float32 throughout
        print(f"float32 beta={beta}: max rel err {max(errs.values()):.1e}")


@pytest.mark.parametrize("spectrum", ["late", "singular"])
def test_float32_promotes_ill_conditioned_statistics(spectrum):
    """Asked for float32 on statistics whose cond(Zd) * eps32 is large (or whose float32 Cholesky
    fails), the solver works in float64 for those groups and says so, rather than miss the contract."""
    stats = synthetic(35, spectrum)
    got, _, _ = check_against_reference(stats, LoraDAConfig(rank=8, population_size=100_000), dtype=torch.float32)
    assert all(any("solved in float64" in n for n in r.notes) for r in got.reports.values())


def test_float32_fallback_uses_float64_factors():
    stats = synthetic(36, "well", layout=((160, (96,)),))
    got, _, _ = check_against_reference(stats, LoraDAConfig(rank=4, population_size=100_000), report_rtol=1e-5,
                                        dtype=torch.float32, maxiter=1)
    assert got.reports["g0.m0"].solver == SOLVER_FALLBACK


@pytest.mark.parametrize("dense_below,rank,apply", [(128, 4, "auto"), (0, 2, "auto"), (0, 4, "inverse")])
def test_contract_tiny_llama(dense_below, rank, apply):
    """Statistics gathered by the library's own pass on a tiny random Llama (hidden 64: fewer tokens
    than some input dimensions, so some Z are singular); dense_below=0 forces the iterative path."""
    model = tiny_llama(seed=3, hidden=64)
    stats = collect_statistics(model, random_examples(6, seed=4), LoraDAConfig(batch_size=4, backend="torch"),
                               progress=False)
    cfg = LoraDAConfig(rank=rank, population_size=1000)
    got, _, errs = check_against_reference(stats, cfg, dense_below=dense_below, apply=apply)
    want = SOLVER_DENSE if dense_below else SOLVER_ITERATIVE
    assert {r.solver for r in got.reports.values()} <= {want, SOLVER_FALLBACK}
    print(f"tiny llama rank {rank} dense_below {dense_below}: max rel err {max(errs.values()):.1e}")


def test_solve_lora_da_uses_the_batched_solver():
    stats = synthetic(33, "late", layout=((160, (160, 64)),))
    res = solve_lora_da(stats, LoraDAConfig(rank=4, population_size=1000))
    assert {r.solver for r in res.reports.values()} == {SOLVER_ITERATIVE}


# --------------------------------------------------------------------------------------------------
# Reports, determinism, robustness


def test_eigengap_reported_for_a_near_degenerate_subspace():
    """beta = 0, Z = I: the subspace is that of the top-r singular vectors of G^T diag(u); with
    sigma_r = sigma_{r+1} it is not unique. The solver must say so, and still return a subspace of the
    degenerate cluster."""
    gen = torch.Generator().manual_seed(5)
    d_in, d_out, r = 160, 120, 4
    U, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64))
    sv = torch.linspace(1.0, 0.01, d_out, dtype=torch.float64)
    sv[: r + 2] = torch.tensor([4.0, 3.5, 3.0, 2.0, 2.0, 1.5], dtype=torch.float64)  # sigma_4 = sigma_5
    Gt = (U[:, :d_out] * sv) @ V.T
    y = torch.full((d_out,), 1.0 - 1e-6, dtype=torch.float64)  # u = 1
    stats = FisherStatistics({"m": ModuleStatistics("g", Gt.T.float().contiguous(), y.float())},
                             {"g": torch.eye(d_in)}, 32, 4096)
    res = solve_batched(stats, LoraDAConfig(rank=r, beta=0.0), dense_below=0)
    rep = res.reports["m"]
    assert rep.eigengap < 1e-6
    assert any("ill-defined subspace" in n for n in rep.notes), rep.notes
    A = res["m"].lora_A.double().T * math.sqrt(1024.0)  # d_in x r, orthonormal
    inside = U[:, : r + 1]  # the top-3 vectors and the degenerate pair
    assert float(torch.linalg.norm(A - inside @ (inside.T @ A))) < 1e-6
    top = U[:, :3]
    assert float(torch.linalg.norm(top - A @ (A.T @ top))) < 1e-6
    # a well-separated case reports a clear gap and no such note
    ok = synthetic(6, "well", layout=((160, (96,)),))
    rep = solve_batched(ok, LoraDAConfig(rank=4, beta=0.0)).reports["g0.m0"]
    assert rep.eigengap > 1e-3 and not any("ill-defined" in n for n in rep.notes)


def test_seed_invariance_and_determinism():
    stats = synthetic(7, "early")
    cfg = LoraDAConfig(rank=8, population_size=100_000)
    a = solve_batched(stats, cfg)
    b = solve_batched(stats, LoraDAConfig(rank=8, population_size=100_000, seed=1234))
    c = solve_batched(stats, cfg)
    for name in a:
        assert rel_err(product(a[name]), product(b[name])) <= TOL["solver_contract"]
        assert torch.equal(a[name].lora_A, c[name].lora_A) and torch.equal(a[name].lora_B, c[name].lora_B)
        A = a[name].lora_A
        idx = A.abs().argmax(dim=1)
        assert bool((A[torch.arange(A.shape[0]), idx] > 0).all())  # canonical signs


def test_streaming_under_a_memory_budget_gives_the_same_result():
    stats = synthetic(8, "late")
    cfg = LoraDAConfig(rank=4, population_size=100_000)
    groups = stats.groups()
    assert len(_plan_chunks(stats, groups, 1, 12, 8, False)) == len(stats.Z)  # one group per chunk
    assert len(_plan_chunks(stats, groups, 1 << 40, 12, 8, False)) == 2  # one chunk per d_in
    a = solve_batched(stats, cfg, max_batch_bytes=1)
    b = solve_batched(stats, cfg)
    # other chunks, other random starts: both runs stop once the Davis-Kahan bound on the subspace sine
    # is below tol, so they agree to about tol (measured: 5e-7 at the default 1e-5)
    for name in a:
        assert rel_err(product(a[name]), product(b[name])) <= BatchedOptions().tol


def test_parallel_workers_give_the_same_bits():
    """Chunks solved by several CPU threads at once (one intra-op thread each): bit for bit the result
    of one worker, whatever order the chunks finish in (one random stream per chunk)."""
    stats = synthetic(10, "late")
    cfg = LoraDAConfig(rank=4, population_size=100_000)
    threads = torch.get_num_threads()
    one = solve_batched(stats, cfg, max_batch_bytes=1, workers=1, num_threads=1)
    three = solve_batched(stats, cfg, max_batch_bytes=1, workers=3)
    assert torch.get_num_threads() == threads  # restored
    for name in one:
        assert torch.equal(one[name].lora_A, three[name].lora_A) and torch.equal(one[name].lora_B, three[name].lora_B)
        assert one.reports[name].solver == three.reports[name].solver
    with pytest.raises(ConfigError, match="workers"):
        BatchedOptions(workers=0)


def test_cholesky_stack_retries_per_item():
    gen = torch.Generator().manual_seed(9)
    v = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    bad = v @ v.T - 1e-3 * torch.eye(8, dtype=torch.float64)  # indefinite: fails at 1e-6, 1e-5, 1e-4, 1e-3
    good = v @ v.T + torch.eye(8, dtype=torch.float64)
    L, lams = cholesky_stack(torch.stack([good, bad]), 1e-6, 1.0, ["good", "bad"])
    assert lams == [1e-6, pytest.approx(1e-2)]
    assert torch.allclose(L[0] @ L[0].T, good + 1e-6 * torch.eye(8, dtype=torch.float64))
    assert torch.allclose(L[1] @ L[1].T, bad + 1e-2 * torch.eye(8, dtype=torch.float64))
    with pytest.raises(NumericalError, match="Cholesky.*bad"):
        cholesky_stack(torch.stack([good, bad]), 1e-6, 1e-4, ["good", "bad"])


def test_damping_retry_through_the_solver_matches_the_reference():
    stats = synthetic(10, "well", layout=((160, (96,)), (160, (96,))))
    gen = torch.Generator().manual_seed(10)
    v = torch.randn(160, 4, generator=gen)
    stats.Z["g1"] = pack_upper(v @ v.T - 1e-3 * torch.eye(160))  # indefinite: damping raised to 1e-2
    cfg = LoraDAConfig(rank=4, population_size=1000)
    got, ref, _ = check_against_reference(stats, cfg)
    rep = got.reports["g1.m0"]
    assert rep.damping == pytest.approx(1e-2) and any("damping raised" in n for n in rep.notes)
    assert got.reports["g0.m0"].damping == cfg.damping
    with pytest.raises(NumericalError, match="Cholesky.*g1"):
        solve_batched(stats, LoraDAConfig(rank=4, population_size=1000, max_damping=1e-4))


def test_non_convergence_falls_back_to_dense_and_says_so():
    stats = synthetic(11, "late", layout=((160, (96,)),))
    cfg = LoraDAConfig(rank=4, population_size=100_000)
    got, _, _ = check_against_reference(stats, cfg, maxiter=1)
    rep = got.reports["g0.m0"]
    assert rep.solver == SOLVER_FALLBACK and any("did not converge" in n for n in rep.notes)


def test_residuals_and_gaps_are_reported():
    stats = synthetic(12, "early")
    got = solve_batched(stats, LoraDAConfig(rank=8, population_size=100_000))
    for rep in got.reports.values():
        assert rep.solver == SOLVER_ITERATIVE
        assert len(rep.eigenvalues) == 9 and rep.eigenvalues == sorted(rep.eigenvalues)
        assert 0 <= rep.residual < 1e-6 and rep.eigengap > 0
        assert rep.update_norm > 0


def test_num_threads_is_restored():
    stats = synthetic(14, "well", layout=((160, (96,)),))
    before = torch.get_num_threads()
    solve_batched(stats, LoraDAConfig(rank=4, population_size=1000), num_threads=1)
    assert torch.get_num_threads() == before


def test_options_are_validated():
    with pytest.raises(ConfigError):
        BatchedOptions(apply="magic")
    with pytest.raises(ConfigError):
        BatchedOptions(dtype=torch.float16)
    with pytest.raises(ConfigError):
        BatchedOptions(tol=2.0)
    with pytest.raises(ConfigError):
        BatchedOptions(num_threads=0)


def test_gpu_code_paths_on_cpu(monkeypatch):
    """The choices made for a GPU, exercised on the CPU: the explicit Zd^{-1} from the blocked inverse
    (GEMMs instead of triangular solves), CholeskyQR2 instead of Householder QR, factorisations one matrix
    at a time, plain GEMMs; wide blocks as well as the default ones."""
    import lora_da_fast.solve.factor as fa

    monkeypatch.setattr(fa, "gpu_style", lambda t: True)
    monkeypatch.setattr(fa, "_INVERSE_LEAF", 32)  # the recursion of the blocked inverse, at these sizes
    for beta, N, spectrum in ((0.0, None, "late"), (0.03, 100_000, "singular"), (1e6, 1, "early")):
        stats = synthetic(34, spectrum)
        check_against_reference(stats, LoraDAConfig(rank=8, beta=beta, population_size=N), apply="inverse")
    stats = synthetic(35, "late")
    check_against_reference(stats, LoraDAConfig(rank=8, population_size=100_000), apply="inverse", extra=24,
                            expand_all=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_contract_on_gpu(dtype):
    stats = synthetic(13, "well" if dtype == torch.float32 else "late")
    cfg = LoraDAConfig(rank=8, population_size=100_000)
    ref = solve_reference(stats, cfg)
    got = solve_batched(stats, cfg, device=torch.device("cuda"), dtype=dtype)
    errs = contract_errors(got, ref)
    assert max(errs.values()) <= TOL["solver_contract"], errs


@pytest.mark.parametrize("explicit_inverse", [False, True])
@pytest.mark.parametrize("idx,per_factor", [([0, 0, 1, 1, 2, 2], 2), ([1, 1, 2, 2], 2), ([0, 0, 2, 2], 2),
                                            ([0, 2], 1), ([2], 1), ([0, 1, 1], 0), ([1, 0], 0)])
def test_operator_applies_each_modules_own_factor(idx, per_factor, explicit_inverse):
    """``Zd^{-1}`` applied to a stack, whether the modules' factors are a slice of the chunk's (side by
    side), a gather of distinct ones, or an irregular pattern, equals the per-module float64 solve."""
    from lora_da_fast.solve.factor import spd_inverse
    from lora_da_fast.solve.operator import _factor_runs, _Operator

    gen = torch.Generator().manual_seed(7)
    n, d_out, m = 24, 10, 3
    Z = torch.stack([_spd(n, SPECTRA["well"], gen)[0] for _ in range(3)])
    L = torch.linalg.cholesky(Z)
    idx_t = torch.tensor(idx)
    s = len(idx)
    G = torch.randn(s, d_out, n, generator=gen, dtype=torch.float64)
    u = torch.rand(s, d_out, generator=gen, dtype=torch.float64) + 0.5
    op = _Operator(L, idx_t, G, u, 1.0, torch.full((s,), 0.3, dtype=torch.float64),
                   spd_inverse(L) if explicit_inverse else None)
    assert _factor_runs(idx_t)[0] == op.per_factor == per_factor
    X = torch.randn(s, n, m, generator=gen, dtype=torch.float64)
    want = torch.stack([torch.cholesky_solve(X[i], L[j]) for i, j in enumerate(idx)])
    assert rel_err(op.zinv(X), want) < TOL["solver_fp64"]
    Mwant = torch.stack([
        torch.cholesky_solve(-(G[i].T @ ((u[i] ** 2)[:, None] * (G[i] @ want[i]))) + 0.3 * X[i], L[j])
        for i, j in enumerate(idx)])
    assert rel_err(op(X), Mwant) < TOL["solver_fp64"]
    sub = op.subset(torch.tensor([s - 1]))
    assert rel_err(sub.zinv(X[-1:]), want[-1:]) < TOL["solver_fp64"]


@pytest.mark.parametrize("n", [100, 300])
def test_blocked_inverse_matches_float64(monkeypatch, n):
    """``Zd^{-1}`` by the GPU's blocked recursion (triangular inverse, then ``L^{-T} L^{-1}``: ``2 n^3 / 3``
    flops where CUDA's ``cholesky_inverse`` takes ``2 n^3``), on the CPU with small leaves so that every
    level of the recursion and odd splits are exercised: symmetric and equal to LAPACK's ``potri`` to
    rounding."""
    import lora_da_fast.solve.factor as fa

    monkeypatch.setattr(fa, "gpu_style", lambda t: True)
    monkeypatch.setattr(fa, "_INVERSE_LEAF", 16)
    gen = torch.Generator().manual_seed(n)
    Z = torch.stack([_spd(n, SPECTRA["well"], gen)[0] for _ in range(3)])
    L = torch.linalg.cholesky(Z)
    got = fa.spd_inverse(L)
    assert rel_err(got, got.transpose(-1, -2)) < TOL["solver_fp64"]
    assert rel_err(got, torch.cholesky_inverse(L)) < TOL["solver_fp64"]
    assert rel_err(got @ Z, torch.eye(n, dtype=torch.float64).expand_as(Z)) < TOL["solver_fp64"]


def test_converged_modules_leave_the_stack():
    """Modules of one stack converge after different numbers of iterations; once the factors with an
    active module are few, the others leave the operator: they stop costing passes (diagnostics), and
    the result still meets the contract."""
    stats = synthetic(41, "late", layout=((160, (96,)),) * 6)
    diag = {}
    got, _, _ = check_against_reference(stats, LoraDAConfig(rank=4, population_size=100_000), dense_below=0,
                                        diagnostics=diag)
    its = [d["iterations"] for d in diag.values()]
    passes = [d["passes"] for d in diag.values()]
    assert len(set(its)) > 1, its
    fastest, slowest = its.index(min(its)), its.index(max(its))
    assert passes[fastest] < passes[slowest], (its, passes)


def test_sigma_from_the_converged_block_or_refined(monkeypatch):
    """With ``beta > 0``, ``sigma = ||D||_2`` is the top Ritz value of ``D D^T`` on the converged block when
    its Kato-Temple bound allows (no operator pass), else a short second LOBPCG: both meet the contract."""
    import lora_da_fast.solve.lobpcg as lb

    stats = synthetic(42, "late")
    cfg = LoraDAConfig(rank=8, population_size=100_000)
    diag = {}
    check_against_reference(stats, cfg, diagnostics=diag)
    assert {d["sigma"] for d in diag.values()} <= {"ritz", "refined"}
    assert "ritz" in {d["sigma"] for d in diag.values()}
    monkeypatch.setattr(lb, "SIGMA2_TOL", 1e-300)  # no Ritz value is accurate enough: every one refined
    diag = {}
    check_against_reference(stats, cfg, diagnostics=diag)
    assert {d["sigma"] for d in diag.values()} == {"refined"}


def test_warm_start_meets_the_contract_in_fewer_iterations():
    """``start=`` (the sensitivity measurement's second solve starts from the subspaces it measures): the
    same subspace to the contract, in fewer iterations; a start of the wrong subspace (random) still
    converges to the right one."""
    stats = synthetic(43, "late", layout=((160, (96, 64)),) * 3)
    cfg = LoraDAConfig(rank=4, population_size=100_000)
    cold_diag, warm_diag = {}, {}
    cold, _, _ = check_against_reference(stats, cfg, dense_below=0, diagnostics=cold_diag)
    start = {m: f.lora_A.transpose(0, 1).double() for m, f in cold.items()}
    check_against_reference(stats, cfg, dense_below=0, diagnostics=warm_diag, start=start)
    assert all(warm_diag[m]["iterations"] < cold_diag[m]["iterations"] for m in cold), (warm_diag, cold_diag)
    gen = torch.Generator().manual_seed(5)
    wrong = {m: torch.randn(s.shape, generator=gen, dtype=torch.float64) for m, s in start.items()}
    check_against_reference(stats, cfg, dense_below=0, start=wrong)
