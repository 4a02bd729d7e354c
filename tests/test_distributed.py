"""torch.distributed on CPU: 2 processes with the gloo backend against a single process.

One spawn (module fixture) runs every multi-process scenario in order and saves what each rank saw;
the tests below compare it with single-process runs made here. Scenarios: data-parallel statistics
(even and uneven shards, a rank with no example, tiny buckets so that every tensor spans several), the
sharded solve (gather to all ranks and to rank 0), and a rank failing mid-pass (with the failure
reported through ``distributed.guard``, and inside ``collect_statistics``). The process group and the
join have timeouts, so a hang fails the test instead of blocking the suite.
"""
from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lora_da_fast import LoraDAConfig, collect_statistics, solve_lora_da
from lora_da_fast import comm
from lora_da_fast import distributed as D
from lora_da_fast.solve.steps import output_inverse
from lora_da_fast.data import prepare_examples
from lora_da_fast.fisher import FisherStatistics, ModuleStatistics
from lora_da_fast.statistics import StatisticsPass, run_pass
from lora_da_fast.triangle import pack_upper, packed_size

from .helpers import random_examples, rel_err, tiny_llama
from .tolerances import TOL

WORLD = 2
PG_TIMEOUT_S = 30  # a collective waiting longer than this for a vanished rank raises
JOIN_TIMEOUT_S = 240  # the whole spawn; generous for 2 slow shared cores
BUCKET_BYTES = 1024  # 256 floats: Z (32 x 32) spans several buckets, so does every G

# Scenario -> (examples, config): 7 examples on 2 ranks (4 + 3); 5 usable + 1 skipped (3 + 2, labels
# token mask); 1 example (rank 1 has none).
SCENARIOS = {
    "even": (lambda: random_examples(7, seed=1),
             dict(output_fisher="sequence_lowrank", batch_size=2)),
    "uneven": (lambda: _with_unlabelled(random_examples(5, seed=2, prompt_frac=0.4)),
               dict(output_fisher="sequence_lowrank", token_mask="labels", batch_size=2)),
    "single": (lambda: random_examples(1, seed=3),
               dict(output_fisher="diagonal", batch_size=2)),
}
SOLVE_CFG = dict(output_fisher="sequence_lowrank", batch_size=2, population_size=1000, solver="reference")


def _with_unlabelled(examples):
    ids = torch.arange(6)
    return examples[:2] + [{"input_ids": ids, "labels": torch.full_like(ids, -100)}] + examples[2:]


def _cfg(**kw) -> LoraDAConfig:
    return LoraDAConfig(backend="torch", **kw)


def _model(state_path: str):
    model = tiny_llama()
    model.load_state_dict(torch.load(state_path))
    return model


def _stats_dict(st: FisherStatistics) -> dict:
    return {"n": st.num_examples, "T": st.num_tokens, "skipped": st.num_skipped, "Z": st.Z,
            "G": {k: m.G for k, m in st.modules.items()}, "y": {k: m.y for k, m in st.modules.items()},
            "seq": {k: m.seq_sums for k, m in st.modules.items()}}


class _FailOnRank:
    """Forward hook raising on ``rank`` at its ``at``-th forward with grad enabled (the group probe
    runs without grad and does not count): a failure in the middle of the pass."""

    def __init__(self, rank: int, at: int = 2):
        self.rank, self.at, self.calls = rank, at, 0

    def __call__(self, module, inputs, output):
        if torch.is_grad_enabled():
            self.calls += 1
            if dist.get_rank() == self.rank and self.calls >= self.at:
                raise RuntimeError(f"simulated failure on rank {self.rank}")


def _error(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc), "distributed": isinstance(exc, D.DistributedError)}


def _fake_cli(run, out_dir: str) -> dict:
    """What the CLI does: every rank computes, rank 0 alone writes, and only after success."""
    try:
        result = run()
    except Exception as exc:
        return _error(exc)
    if D.is_main():
        torch.save(result, os.path.join(out_dir, "adapter.pt"))
    return {"ok": True}


def _worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    comm.BUCKET_BYTES = BUCKET_BYTES
    out: dict = {}
    path = os.path.join(tmp, f"rank{rank}.pt")
    try:
        model = _model(os.path.join(tmp, "model.pt"))
        for name, (make, kw) in SCENARIOS.items():
            st = collect_statistics(model, make(), _cfg(**kw), progress=False)
            out[name] = _stats_dict(st)

        out["min_over_ranks"] = D.min_over_ranks(10 + rank)
        out["broadcast"] = D.broadcast_from_main({"from": rank})

        # The sharded solve, on the single-process statistics (so it must equal that solve exactly)
        # and on this run's data-parallel statistics.
        ref = FisherStatistics.load(os.path.join(tmp, "even_stats.safetensors"))
        cfg = _cfg(**SOLVE_CFG)
        res = solve_lora_da(ref, cfg)  # dispatches to distributed.solve_sharded
        out["solve_all"] = {"factors": dict(res), "reports": {k: r.to_dict() for k, r in res.reports.items()}}
        res = D.solve_sharded(ref, cfg, gather="main")
        out["solve_main"] = {"factors": dict(res), "reports": sorted(res.reports)}
        out["plan"] = D.assign_groups(ref, cfg, WORLD)
        dp = collect_statistics(model, SCENARIOS["even"][0](), cfg, progress=False)
        out["solve_dp"] = dict(solve_lora_da(dp, cfg))

        # A rank whose share of the solve fails (a negative definite Z in one of its groups: finite, so
        # it passes the up-front checks on every rank, but no damping up to max_damping=1 factorises it).
        bad = FisherStatistics.load(os.path.join(tmp, "even_stats.safetensors"))
        bad.tokens = None  # solved through the input factors (with its tokens Z would not be factorised)
        g = out["plan"][1][0]
        bad.Z[g] = pack_upper(-10.0 * torch.eye(bad.z_dim(g)))
        out["fail_solve"] = _fake_cli(lambda: dict(solve_lora_da(bad, cfg)), tmp)

        # A rank failing mid-pass, reported through distributed.guard: every rank raises, nothing is
        # written, and the process group is still usable afterwards.
        fail_dir = os.path.join(tmp, "out_guard")
        os.makedirs(fail_dir, exist_ok=True)
        handle = model.model.layers[0].mlp.register_forward_hook(_FailOnRank(1))

        def guarded():
            with StatisticsPass(model, cfg) as sp:
                exs, skipped = prepare_examples(SCENARIOS["even"][0]())
                with D.guard():
                    run_pass(sp, list(D.shard(exs)), progress=False)
            D.reduce_over_ranks(sp)
            return dict(solve_lora_da(sp.finalize(skipped), cfg))

        out["fail_guard"] = _fake_cli(guarded, fail_dir)
        handle.remove()
        check = torch.ones(1)
        dist.all_reduce(check)
        out["after_failure_sum"] = float(check)

        # The same failure inside collect_statistics (last: if the failing rank does not report, the
        # healthy one sees the connection close when it exits, and the group is unusable after that).
        fail_dir = os.path.join(tmp, "out_collect")
        os.makedirs(fail_dir, exist_ok=True)
        handle = model.model.layers[0].mlp.register_forward_hook(_FailOnRank(1))
        out["fail_collect"] = _fake_cli(
            lambda: dict(solve_lora_da(collect_statistics(model, SCENARIOS["even"][0](), cfg, progress=False), cfg)),
            fail_dir)
        handle.remove()
    except Exception as exc:  # a bug in a scenario: report it to the test instead of a bare exit code
        import traceback

        out["worker_error"] = traceback.format_exc()
        out.setdefault("fail_collect", _error(exc))
    finally:
        torch.save(out, path)
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Spawn the 2 ranks once; returns ``(tmp_dir, [rank0_results, rank1_results], seconds)``."""
    tmp = str(tmp_path_factory.mktemp("dist"))
    torch.save(tiny_llama().state_dict(), os.path.join(tmp, "model.pt"))
    ref = collect_statistics(_model(os.path.join(tmp, "model.pt")), SCENARIOS["even"][0](), _cfg(**SOLVE_CFG),
                             progress=False)
    ref.save(os.path.join(tmp, "even_stats.safetensors"))
    start = time.perf_counter()
    ctx = mp.start_processes(_worker, args=(_free_port(), tmp), nprocs=WORLD, join=False, start_method="spawn")
    deadline = start + JOIN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.perf_counter() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {JOIN_TIMEOUT_S} s (a hang)")
    seconds = time.perf_counter() - start
    results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "worker_error" not in res, f"rank {r}:\n{res['worker_error']}"
    print(f"\n{WORLD} gloo ranks: {seconds:.1f} s")
    return tmp, results, seconds


def _single(tmp: str, scenario: str) -> FisherStatistics:
    make, kw = SCENARIOS[scenario]
    return collect_statistics(_model(os.path.join(tmp, "model.pt")), make(), _cfg(**kw), progress=False)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_data_parallel_statistics_equal_single_process(run, scenario):
    tmp, results, _ = run
    ref = _single(tmp, scenario)
    tol = TOL["stats_invariance_fp32"]
    for rank, res in enumerate(results):
        got = res[scenario]
        assert (got["n"], got["T"], got["skipped"]) == (ref.num_examples, ref.num_tokens, ref.num_skipped), rank
        for g, z in ref.Z.items():
            assert rel_err(got["Z"][g], z) < tol, (rank, g)
            assert got["Z"][g].dim() == 1 and got["Z"][g].shape == z.shape, (rank, g)  # reduced as packed
        for name, st in ref.modules.items():
            assert rel_err(got["G"][name], st.G) < tol, (rank, name)
            assert rel_err(got["y"][name], st.y) < tol, (rank, name)
            if st.seq_sums is None:
                assert got["seq"][name] is None
                continue
            # Same rows in the same (single-process) order, not only the same set of rows.
            assert got["seq"][name].shape == st.seq_sums.shape
            for i in range(st.seq_sums.shape[0]):
                assert rel_err(got["seq"][name][i], st.seq_sums[i]) < tol, (rank, name, i)
    # Every rank ends with bitwise the same statistics.
    a, b = results[0][scenario], results[1][scenario]
    for key in ("Z", "G", "y"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_uneven_scenarios_are_uneven(run):
    # 5 usable (+1 skipped) examples give shards of 3 and 2; 1 example leaves rank 1 without any.
    tmp, results, _ = run
    assert results[0]["uneven"]["n"] == 5 and results[0]["uneven"]["skipped"] == 1
    assert results[0]["single"]["n"] == 1


def test_small_helpers(run):
    _, results, _ = run
    assert [r["min_over_ranks"] for r in results] == [10, 10]
    assert [r["broadcast"] for r in results] == [{"from": 0}, {"from": 0}]


def test_sharded_solve_equals_single_process(run):
    tmp, results, _ = run
    ref = FisherStatistics.load(os.path.join(tmp, "even_stats.safetensors"))
    cfg = _cfg(**SOLVE_CFG)
    want = solve_lora_da(ref, cfg)
    plan = results[0]["plan"]
    assert plan == results[1]["plan"] and all(plan), plan  # the same plan everywhere, work on both ranks
    assert sorted(g for p in plan for g in p) == sorted(ref.Z)
    for rank, res in enumerate(results):
        got = res["solve_all"]
        assert list(got["factors"]) == list(want)  # every module, in module order
        for name, f in want.items():
            g = got["factors"][name]
            assert rel_err(g.lora_B.double() @ g.lora_A.double(), f.lora_B.double() @ f.lora_A.double()) < 1e-6
            assert got["reports"][name]["group"] == want.reports[name].group
            assert got["reports"][name]["sigma"] == pytest.approx(want.reports[name].sigma, rel=1e-6)
    # gather="main": rank 0 has everything, rank 1 only the modules it solved.
    assert list(results[0]["solve_main"]["factors"]) == list(want)
    assert sorted(results[0]["solve_main"]["reports"]) == sorted(want)
    mine = [n for n, st in ref.modules.items() if st.group in plan[1]]
    assert list(results[1]["solve_main"]["factors"]) == mine


def test_data_parallel_end_to_end_close_to_single_process(run):
    # Statistics agree to fp32 rounding (~1e-7); the subspaces amplify that by 1 / eigengap, and this
    # random tiny model has eigengaps down to ~3e-4: 1e-2 bounds the product with a margin.
    tmp, results, _ = run
    ref = FisherStatistics.load(os.path.join(tmp, "even_stats.safetensors"))
    want = solve_lora_da(ref, _cfg(**SOLVE_CFG))
    for res in results:
        for name, f in want.items():
            g = res["solve_dp"][name]
            assert rel_err(g.lora_B @ g.lora_A, f.lora_B @ f.lora_A) < 1e-2, name


def test_failing_solve_on_one_rank_fails_every_rank(run):
    tmp, results, _ = run
    own, peer = results[1]["fail_solve"], results[0]["fail_solve"]
    assert own["type"] == "NumericalError" and "Cholesky" in own["message"], own
    assert peer["distributed"] and "rank 1 failed in the sharded solve: NumericalError" in peer["message"], peer
    assert not os.path.exists(os.path.join(tmp, "adapter.pt"))


def test_failing_rank_fails_every_rank_via_guard(run):
    tmp, results, _ = run
    own, peer = results[1]["fail_guard"], results[0]["fail_guard"]
    assert own["type"] == "RuntimeError" and "simulated failure on rank 1" in own["message"]
    assert peer["distributed"], peer
    assert "rank 1 failed in the statistics pass: RuntimeError: simulated failure on rank 1" in peer["message"]
    assert not os.listdir(os.path.join(tmp, "out_guard"))  # no partial adapter
    assert results[0]["after_failure_sum"] == results[1]["after_failure_sum"] == WORLD


def test_failing_rank_inside_collect_statistics_fails_every_rank(run):
    tmp, results, seconds = run
    own, peer = results[1]["fail_collect"], results[0]["fail_collect"]
    assert own["type"] == "RuntimeError" and "simulated failure on rank 1" in own["message"]
    # Rank 0 raises DistributedError naming rank 1 (collect_statistics runs under distributed.guard).
    assert peer["distributed"], peer
    assert "rank 1 failed in the statistics pass" in peer["message"], peer
    assert not os.listdir(os.path.join(tmp, "out_collect"))
    assert seconds < JOIN_TIMEOUT_S


# --------------------------------------------------------------------------------------------------
# Single-process pieces


def test_buckets_respect_the_cap():
    pieces = comm.flat_pieces(torch.zeros(10, 10), 30) + comm.flat_pieces(torch.zeros(7), 30)
    sizes = [sum(p.numel for p in b) for b in comm.buckets(pieces, 30)]
    assert sizes == [30, 30, 30, 17] and sum(sizes) == 107


def _meta_stats(layers: int, hidden: int, mlp: int, kv: int) -> FisherStatistics:
    """Statistics of a Llama-shaped model on the meta device (shapes only, no memory)."""
    modules, Z = {}, {}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
                  "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
                  "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp)}
        lead = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
                "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
                "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}
        for k, (d_out, d_in) in shapes.items():
            g = f"{p}.{lead[k]}"
            Z.setdefault(g, torch.empty(packed_size(d_in), device="meta"))
            modules[f"{p}.{k}"] = ModuleStatistics(g, torch.empty(d_out, d_in, device="meta"),
                                                   torch.empty(d_out, device="meta"))
    return FisherStatistics(modules, Z, 256, 256 * 1024)


@pytest.mark.parametrize("world", [2, 3, 8, 16])
def test_cost_balanced_plan_for_a_70b_shape(world):
    stats = _meta_stats(80, 8192, 28672, 1024)
    cfg = LoraDAConfig(population_size=100_000)
    plan = D.assign_groups(stats, cfg, world)
    assert plan == D.assign_groups(stats, cfg, world)  # deterministic
    assert sorted(g for p in plan for g in p) == sorted(stats.Z)  # every group exactly once
    groups = stats.groups()
    load = [sum(D.estimate_cost(stats, g, groups[g], cfg) for g in p) for p in plan]
    assert max(load) / (sum(load) / world) < 1.05, load


def test_more_ranks_than_groups_leaves_some_idle():
    stats = _meta_stats(1, 64, 96, 16)
    plan = D.assign_groups(stats, LoraDAConfig(population_size=10), 6)
    assert sum(1 for p in plan if p) == 4 and sorted(g for p in plan for g in p) == sorted(stats.Z)


def test_woodbury_diagonal_does_not_depend_on_example_order():
    # Sequence sums come back in the single-process order, but the solver must not depend on it anyway.
    torch.manual_seed(0)
    st = ModuleStatistics("g", torch.randn(12, 5), torch.rand(12), torch.randn(9, 12))
    perm = torch.randperm(9)
    st2 = ModuleStatistics("g", st.G, st.y, st.seq_sums[perm])
    a = output_inverse(st, 9, 1e-3, "sequence_lowrank")
    b = output_inverse(st2, 9, 1e-3, "sequence_lowrank")
    assert rel_err(a, b) < 1e-12


def test_helpers_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not D.is_active() and D.is_main() and D.rank() == 0 and D.world_size() == 1
    assert D.init_from_env() is False and not dist.is_initialized()
    assert D.min_over_ranks(7) == 7 and D.broadcast_from_main("x") == "x"
    D.barrier()  # no-op
    D.report_failure(RuntimeError("x"))  # no-op
    with pytest.raises(ValueError):
        with D.guard():
            raise ValueError("propagates unchanged")
    model = tiny_llama()
    cfg = _cfg(**SOLVE_CFG)
    stats = collect_statistics(model, random_examples(3), cfg, progress=False)
    a, b = D.solve_sharded(stats, cfg), solve_lora_da(stats, cfg)
    for name in b:
        assert torch.equal(a[name].lora_A, b[name].lora_A)


def test_model_dispatched_by_accelerate_gives_the_same_statistics():
    # device_map dispatch adds accelerate hooks that move inputs to each block's device; on one
    # machine without GPUs every block is on "cpu", which still runs the hooked forward path.
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama()
    examples = random_examples(4, seed=5)
    cfg = _cfg(output_fisher="sequence_lowrank", batch_size=3)
    want = collect_statistics(model, examples, cfg, progress=False)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    hooked = accelerate.dispatch_model(tiny_llama(), device_map=device_map, force_hooks=True)
    assert hasattr(hooked.model.layers[0], "_hf_hook")
    got = collect_statistics(hooked, examples, cfg, progress=False)
    for name, st in want.modules.items():
        assert rel_err(got.modules[name].G, st.G) < TOL["stats_invariance_fp32"]
        assert rel_err(got.modules[name].seq_sums, st.seq_sums) < TOL["stats_invariance_fp32"]
    for g, z in want.Z.items():
        assert rel_err(got.Z[g], z) < TOL["stats_invariance_fp32"]


# --------------------------------------------------------------------------------------------------
# On a CUDA machine: the same with the model on the GPU (Triton accumulators: packed triangles of Z,
# which the all-reduce sends as they are), with a model split between the GPU and the CPU by
# accelerate, and the sharded solve with statistics on the GPU.

GPU_DATA = dict(n=9, seed=7)
GPU_STATS_CFG = dict(output_fisher="sequence_lowrank", batch_size=2)
GPU_SOLVE_CFG = dict(output_fisher="sequence_lowrank", batch_size=2, population_size=1000, solver="auto")
SPLIT_MAP = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
             "model.norm": "cpu", "lm_head": "cpu"}


def _split_model(state_path: str):
    import accelerate

    # main_device="cpu": the CPU blocks run on the CPU (with a GPU main device accelerate would offload
    # them: weights on the meta device, streamed in at each forward; not supported by the pass).
    return accelerate.dispatch_model(_model(state_path), device_map=SPLIT_MAP, main_device="cpu")


def _cpu_stats(st: FisherStatistics) -> dict:
    d = _stats_dict(st)
    move = (lambda t: None if t is None else t.cpu())
    d.update({k: {n: move(t) for n, t in d[k].items()} for k in ("Z", "G", "y", "seq")})
    d["devices"] = {n: str(m.G.device) for n, m in st.modules.items()}
    return d


def _gpu_worker(rank: int, port: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S * 4))
    comm.BUCKET_BYTES = 64 * 1024
    out: dict = {}
    try:
        state = os.path.join(tmp, "model.pt")
        examples = random_examples(GPU_DATA["n"], seed=GPU_DATA["seed"])
        model = _model(state).cuda()
        for backend in ("torch", "auto"):
            st = collect_statistics(model, examples, LoraDAConfig(backend=backend, **GPU_STATS_CFG), progress=False)
            out[backend] = _cpu_stats(st)
        st = collect_statistics(_split_model(state), examples, _cfg(**GPU_STATS_CFG), progress=False)
        out["split"] = _cpu_stats(st)
        ref = FisherStatistics.load(os.path.join(tmp, "gpu_stats.safetensors"), device=torch.device("cuda"))
        res = solve_lora_da(ref, LoraDAConfig(**GPU_SOLVE_CFG))
        out["solve"] = {n: (f.lora_A.cpu(), f.lora_B.cpu(), str(f.lora_A.device)) for n, f in res.items()}
    except Exception:
        import traceback

        out["worker_error"] = traceback.format_exc()
    finally:
        torch.save(out, os.path.join(tmp, f"gpu_rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.mark.gpu
def test_gpu_data_parallel_statistics_split_model_and_sharded_solve(tmp_path):
    tmp = str(tmp_path)
    state = os.path.join(tmp, "model.pt")
    torch.save(tiny_llama().state_dict(), state)
    examples = random_examples(GPU_DATA["n"], seed=GPU_DATA["seed"])
    model = _model(state).cuda()
    want = {b: collect_statistics(model, examples, LoraDAConfig(backend=b, **GPU_STATS_CFG), progress=False)
            for b in ("torch", "auto")}
    want["split"] = collect_statistics(_split_model(state), examples, _cfg(**GPU_STATS_CFG), progress=False)
    solve_stats = collect_statistics(model, examples, LoraDAConfig(**GPU_SOLVE_CFG), progress=False)
    solve_stats.save(os.path.join(tmp, "gpu_stats.safetensors"))
    want_solve = solve_lora_da(solve_stats, LoraDAConfig(**GPU_SOLVE_CFG))

    start = time.perf_counter()
    ctx = mp.start_processes(_gpu_worker, args=(_free_port(), tmp), nprocs=WORLD, join=False, start_method="spawn")
    while not ctx.join(timeout=5):
        if time.perf_counter() - start > JOIN_TIMEOUT_S * 2:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the GPU ranks hung")
    results = [torch.load(os.path.join(tmp, f"gpu_rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    print(f"\n{WORLD} gloo ranks on one GPU: {time.perf_counter() - start:.1f} s")
    for r, res in enumerate(results):
        assert "worker_error" not in res, f"rank {r}:\n{res['worker_error']}"
    tol = TOL["stats_invariance_fp32"]
    for key, ref in want.items():
        for rank, res in enumerate(results):
            got = res[key]
            assert (got["n"], got["T"]) == (ref.num_examples, ref.num_tokens)
            worst = 0.0
            for g, z in ref.Z.items():
                worst = max(worst, rel_err(got["Z"][g], z.cpu()))
            for name, st in ref.modules.items():
                assert got["devices"][name] == str(st.G.device)  # statistics stay on the module's device
                for a, b in ((got["G"][name], st.G), (got["y"][name], st.y), (got["seq"][name], st.seq_sums)):
                    worst = max(worst, rel_err(a, b.cpu()))
            print(f"{key} rank {rank}: worst relative error vs one process {worst:.1e}")
            assert worst < tol, (key, rank, worst)
    assert {d for d in results[0]["split"]["devices"].values()} == {"cuda:0", "cpu"}
    for rank, res in enumerate(results):
        worst = 0.0
        for name, f in want_solve.items():
            a_, b_, dev = res["solve"][name]
            assert dev.startswith("cuda")
            worst = max(worst, rel_err(b_.double() @ a_.double(), (f.lora_B @ f.lora_A).double().cpu()))
        print(f"sharded solve rank {rank}: worst relative error vs one process {worst:.1e}")
        assert worst < TOL["solver_contract"]
