"""The memory plan (lora_da_fast.plan): statistics bytes against what the pass allocates, the activation
estimate against what autograd keeps, slices that fit a given free memory, planned vs seen in the run."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora_da_fast import LoraDAConfig
from lora_da_fast.data import Example, iter_batches
from lora_da_fast.engine import run_lora_da
from lora_da_fast.plan import activation_bytes, plan_slices, solve_bytes, statistics_bytes
from lora_da_fast.statistics import StatisticsPass
from lora_da_fast.targets import find_target_modules
from lora_da_fast.triangle import packed_size

from .helpers import random_examples, tiny_llama


def _llama(hidden=128, layers=2, dtype=torch.float32, device=None):
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM(cfg).to(dtype)
    return LlamaForCausalLM(cfg).to(dtype)


def test_statistics_bytes_are_what_the_pass_allocates():
    model = tiny_llama()
    with StatisticsPass(model, LoraDAConfig()) as sp:
        acc, leaders = sp.acc, sp.acc.leaders
        allocated = sum(t.numel() * t.element_size() for tab in (acc.G, acc.y, acc.Z) for t in tab.values())
        assert all(z.shape == (packed_size(int(acc.G[g].shape[1])),) for g, z in acc.Z.items())
        targets = sp.targets
    assert sum(statistics_bytes(targets, leaders).values()) == allocated
    assert sum(statistics_bytes(targets).values()) > allocated  # one Z per module: an upper bound
    # deciding the slices from a free memory, the plan probes the groups itself
    _, info = plan_slices(targets, LoraDAConfig(layers_per_pass="auto"), model, free_bytes=10**12)
    assert info["input_groups"] == "probe" and info["statistics_gb"] == allocated / 1e9
    _, info = plan_slices(targets, LoraDAConfig(), model)  # nothing to decide: no extra forward
    assert info["input_groups"] == "one per module (upper bound)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_activation_estimate_covers_what_autograd_keeps(dtype):
    """The estimate is at least the bytes kept for the backward (saved tensors and the inputs the hooks
    hold, by storage, weights excluded) and not far above them."""
    model = _llama(dtype=dtype)
    B, L = 3, 40
    gen = torch.Generator().manual_seed(1)
    ex = [Example(torch.randint(0, 256, (L,), generator=gen), torch.randint(0, 256, (L,), generator=gen), i)
          for i in range(B)]
    weights = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    held = {}

    def keep(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            held[s.data_ptr()] = s.nbytes()
        return t

    with StatisticsPass(model, LoraDAConfig(batch_size=B, backend="torch")) as sp:
        def hold(module, inputs, output):  # the input the statistics hooks keep until the backward
            keep(inputs[0])

        hooks = [m.register_forward_hook(hold) for m in sp.targets.values()]
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            sp.step(next(iter(iter_batches(ex, B, 0))))
        for h in hooks:
            h.remove()
        estimate = activation_bytes(sp.targets, B * L, vocab=256)
    kept = sum(held.values())
    assert kept <= estimate <= 1.6 * kept, (kept, estimate)


def test_auto_slices_fit_the_free_memory():
    model = _llama(layers=6)
    targets = find_target_modules(model, "all-linear")
    ex = [Example(torch.zeros(50, dtype=torch.long), torch.zeros(50, dtype=torch.long), 0)]
    cfg = LoraDAConfig(layers_per_pass="auto", batch_size=4)
    slices, info = plan_slices(targets, cfg, model, ex, free_bytes=10**12)
    assert info["passes"] == 1 and info["fits"] and info["tokens_per_batch"] == 200
    need = statistics_bytes(targets)  # the plan probed the groups: its own sizes are smaller
    leaders_total = info["statistics_gb"] * 1e9
    assert leaders_total < sum(need.values())
    work = max(info["activations_gb"], info["solve_gb"]) * 1e9
    free = int((work + leaders_total / 2.5) / 0.9)  # room for about 40% of the statistics
    slices, info = plan_slices(targets, cfg, model, ex, free_bytes=free)
    assert 2 <= info["passes"] <= 6 and sum(map(len, slices)) == len(targets)
    assert info["largest_slice_gb"] * 1e9 <= info["budget_gb"] * 1e9 + 1
    assert info["planned_peak_gb"] == pytest.approx(info["weights_gb"] + info["largest_slice_gb"] + work / 1e9)
    # fixed layers per pass: kept as given, whatever the memory
    slices, info = plan_slices(targets, LoraDAConfig(layers_per_pass=4), model, ex, free_bytes=free)
    assert [len(s) for s in slices] == [28, 14] and info["passes"] == 2


def test_plan_on_the_meta_device_counts_without_memory():
    """A model on the meta device (shapes only) is planned from shapes: no probe (one Z per module) unless
    the groups are given, e.g. probed on a small model of the same architecture."""
    meta = _llama(hidden=256, layers=3, device="meta")
    twin = _llama(hidden=32, layers=3)
    targets = find_target_modules(meta, "all-linear")
    _, blind = plan_slices(targets, LoraDAConfig(), meta)
    assert blind["input_groups"] == "one per module (upper bound)"
    with StatisticsPass(twin, LoraDAConfig()) as sp:
        leaders = sp.acc.leaders
    _, info = plan_slices(targets, LoraDAConfig(), meta, leaders=leaders)
    assert info["statistics_gb"] == sum(statistics_bytes(targets, leaders).values()) / 1e9 < blind["statistics_gb"]
    assert info["weights_gb"] == sum(p.numel() * p.element_size() for p in meta.parameters()) / 1e9  # counted
    assert solve_bytes(targets, leaders, 8) > 8 * 3 * (256 * 8 // 3) ** 2  # down_proj's group: d_in = 682


def test_run_reports_planned_and_seen_peak():
    res = run_lora_da(tiny_llama(), random_examples(5, seed=1), LoraDAConfig(population_size=100, batch_size=2),
                      progress=False)
    mem, plan = res.info["memory"], res.info["plan"]
    assert mem["planned_peak_gb"] == plan["planned_peak_gb"] > 0
    assert mem["seen_peak_gb"] > 0 and mem["seen"] == "CPU peak RSS of the process"
    assert plan["tokens_per_batch"] == 2 * max(len(e["input_ids"]) for e in random_examples(5, seed=1))
