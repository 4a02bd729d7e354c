"""Shared test helpers: tiny random models, random calibration data, and the float64 brute force."""
from __future__ import annotations

import copy
from typing import Dict, List

import torch

from lora_da_fast.data import IGNORE_INDEX
from lora_da_fast.targets import find_target_modules, is_conv1d

VOCAB = 64


def tiny_llama(seed: int = 0, dtype=torch.float32, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden + hidden // 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_gpt2(seed: int = 0, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)  # dropout on: the pass must disable it
    return GPT2LMHeadModel(cfg).to(dtype)


def random_examples(n: int, seed: int = 0, min_len: int = 3, max_len: int = 14, prompt_frac: float = 0.0
                    ) -> List[Dict[str, torch.Tensor]]:
    """1-D examples of random lengths; with ``prompt_frac`` a prefix gets label -100 (prompt tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        k = int(prompt_frac * length)
        labels[:k] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def pad_batch(examples, side: str = "right", pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """One 2-D padded batch, as a user's collator would make it."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, sl] = e["input_ids"]
        mask[i, sl] = 1
        labels[i, sl] = e["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def brute_force_statistics(model, examples, target_modules="all-linear", token_mask="attention", loss_fn=None):
    """Float64 statistics, one example at a time, with plain autograd (no code of the library's pass).

    ``G`` comes from ``weight.grad`` of Hugging Face's own loss (``model(..., labels=...).loss``, the
    mean over the example's label tokens), or of ``loss_fn(model, batch_of_one)[0]`` when given (the
    batch holds the example's fields with a batch dimension, floats in float64; a scalar ``labels`` is
    a per-example label, and the token labels are then the input ids); ``Z``, ``y`` and the sequence
    sums from per-token inputs and output gradients captured with ``retain_grad``.
    """
    model = copy.deepcopy(model).double().eval()
    targets = find_target_modules(model, target_modules)
    G = {n: 0.0 for n in targets}
    Zs = {n: 0.0 for n in targets}
    ys = {n: 0.0 for n in targets}
    seq = {n: [] for n in targets}
    T = 0
    n_used = 0
    for e in examples:
        ids = torch.as_tensor(e["input_ids"])[None]
        seq_label = "labels" in e and torch.as_tensor(e["labels"]).dim() == 0
        labels = ids.clone() if seq_label or "labels" not in e else torch.as_tensor(e["labels"])[None]
        if not seq_label and int((labels[0, 1:] != IGNORE_INDEX).sum()) == 0:
            continue
        n_used += 1
        cap = {}

        def hook(name):
            def fn(m, i, o):
                o.retain_grad()
                cap[name] = (i[0].detach()[0], o)
            return fn

        hs = [m.register_forward_hook(hook(nm)) for nm, m in targets.items()]
        model.zero_grad(set_to_none=True)
        if loss_fn is None:
            loss = model(input_ids=ids, labels=labels).loss
        else:
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
            for k, v in e.items():
                if k not in ("input_ids", "attention_mask") and (k != "labels" or seq_label) and not isinstance(v, str):
                    v = torch.as_tensor(v)
                    batch[k] = (v.double() if v.is_floating_point() else v)[None]
            loss = loss_fn(model, batch)[0]
        loss.backward()
        for h in hs:
            h.remove()
        if token_mask == "attention":
            sel = torch.ones(ids.shape[1], dtype=torch.bool)
        else:
            sel = torch.zeros(ids.shape[1], dtype=torch.bool)
            sel[:-1] = labels[0, 1:] != IGNORE_INDEX
        T += int(sel.sum())
        for name, m in targets.items():
            x, o = cap[name]
            delta = o.grad[0]
            w = m.weight.grad
            G[name] = G[name] + (w.T if is_conv1d(m) else w)
            xs, ds = x[sel], delta[sel]
            Zs[name] = Zs[name] + xs.T @ xs
            ys[name] = ys[name] + (ds * ds).sum(0)
            seq[name].append(ds.sum(0))
    return {
        "G": {k: v / n_used for k, v in G.items()},
        "Z": {k: v / T for k, v in Zs.items()},
        "y": {k: v / T for k, v in ys.items()},
        "seq": {k: torch.stack(v) for k, v in seq.items()},
        "n": n_used,
        "T": T,
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp(min=1e-300))


def interrupt_after(monkeypatch, done: int, slice_index=None) -> None:
    """Make the next checkpointed statistics pass stop (``KeyboardInterrupt``) once ``done`` examples of
    the pass (of slice ``slice_index`` when given) are counted, right after its checkpoint is written:
    a run killed mid-pass, for resume tests. ``monkeypatch.undo()`` restores the saver."""
    from lora_da_fast import checkpoint as ckpt

    real_saver = ckpt.saver

    def saver(sp, path, parts, every, slice_i, finished):
        save = real_saver(sp, path, parts, every, slice_i, finished)

        def on_batch(n):
            save(n)
            if n >= done and (slice_index is None or slice_i == slice_index):
                raise KeyboardInterrupt
        return on_batch

    monkeypatch.setattr(ckpt, "saver", saver)


def dense_product_np(Zinv, G, u, cfg):
    """docs/algorithm.md steps 3-8 in float64 numpy from an explicit ``Zd^{-1}``, the gradient ``G`` and the
    output weights ``u``: ``(lora_B @ lora_A, eigenvalues of M)`` (an oracle for the exact solvers)."""
    import numpy as np

    D = -Zinv @ G.T @ np.diag(u)
    sigma = np.linalg.svd(D, compute_uv=False)[0]
    D = D / sigma
    M = -cfg.alpha * D @ D.T + cfg.beta * (u.sum() / (cfg.population_size * sigma ** 2)) * Zinv
    w, V = np.linalg.eigh((M + M.T) / 2)
    A0 = V[:, :cfg.rank]
    return torch.from_numpy((A0 @ A0.T @ D).T / cfg.gamma), w
