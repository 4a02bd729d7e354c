"""The rows a statistics pass keeps for the token-space solve (:mod:`lora_da_fast.tokens`): for each input
group on the token path the inputs of every non-padding token, for each of its modules the output
gradients, with each row's key (example index, position) and whether the token mask selects it. After
the pass (and the gather over ranks) the rows are put in key order, so the result does not depend on
the batch size, the order of the examples or the number of ranks."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Set

import torch
import torch.distributed as dist

from .. import comm
from ..data import Batch
from ..errors import DistributedError
from ..targets import linear_shape
from ..tokens import POSITION_BITS, TokenStatistics, token_groups


class TokenStore:
    """Rows of one pass, batch by batch. ``groups``: the input groups (keyed by their first module) that
    keep their tokens; ``leaders``: module -> its group."""

    def __init__(self, groups: Set[str], leaders: Dict[str, str]):
        self.groups = set(groups)
        self.leaders = {m: g for m, g in leaders.items() if g in self.groups}
        self.keys: List[torch.Tensor] = []  # per batch, CPU int64, rows of the grad mask
        self.sel: List[torch.Tensor] = []  # per batch, CPU bool
        self.X: Dict[str, Dict[int, torch.Tensor]] = {g: {} for g in self.groups}
        self.D: Dict[str, Dict[int, torch.Tensor]] = {m: {} for m in self.leaders}
        self.dtypes: Dict[str, torch.dtype] = {}  # "X.<group>" / "D.<module>" -> the dtype seen
        # False once rows are missing (a pass resumed from a checkpoint, which does not hold them): the
        # groups are then solved through their input factors, on every rank (reduce_over_ranks agrees)
        self.complete = True

    @classmethod
    def for_pass(cls, mode: str, total_tokens: Optional[int], targets: Dict[str, object],
                 leaders: Dict[str, str]) -> Optional["TokenStore"]:
        """The store of a pass over ``targets`` (``None`` when no group keeps its tokens), the groups
        chosen by :func:`lora_da_fast.tokens.token_groups` from ``total_tokens``, the non-padding tokens
        of the whole calibration set (all ranks); ``None`` there means unknown: only ``"always"`` keeps
        tokens then."""
        if mode == "never" or (mode == "auto" and total_tokens is None):
            return None
        shapes: Dict[str, tuple] = {}
        for name, lead in leaders.items():
            d_out, d_in = linear_shape(targets[name])
            shapes[lead] = (d_in, shapes.get(lead, (d_in, 0))[1] + d_out)
        groups = token_groups(mode, total_tokens or 0, shapes)
        return cls(groups, leaders) if groups else None

    def set_batch(self, batch: Batch, grad_mask: torch.Tensor, stat_mask: torch.Tensor) -> None:
        b, t = batch.attention_mask.shape
        idx = torch.tensor([int(i) for i in batch.indices] if batch.indices else range(b), dtype=torch.int64)
        key = (idx.repeat_interleave(t) << POSITION_BITS) | torch.arange(t, dtype=torch.int64).repeat(b)
        g = grad_mask.cpu()
        self.keys.append(key[g])
        self.sel.append(stat_mask.cpu()[g])

    def add(self, name: str, x2: torch.Tensor, g2: torch.Tensor, grad_mask: torch.Tensor) -> None:
        """The backward hook's rows of module ``name`` for the current batch (a no-op for a module off
        the token path). A module the loss does not reach in a batch leaves zero rows there (no
        gradient, as in ``G``); the group's inputs come from whichever of its modules is reached first."""
        group = self.leaders.get(name)
        if group is None:
            return
        b = len(self.keys) - 1
        if b not in self.X[group]:
            self.X[group][b] = x2[grad_mask].detach()
            self.dtypes[f"X.{group}"] = x2.dtype
        self.D[name][b] = g2[grad_mask].detach()
        self.dtypes[f"D.{name}"] = g2.dtype

    def load_rows(self, rows: Optional[Dict[str, torch.Tensor]]) -> None:
        """Start from the rows of a checkpoint (:meth:`local_rows` of the interrupted pass); ``None``: it
        holds none, and this pass's groups fall back to their input factors (``complete`` is false)."""
        if not rows:
            self.complete = False
            return
        self.keys, self.sel = [rows["key"].cpu()], [rows["selected"].cpu()]
        self.X = {g: {0: rows[f"X.{g}"]} for g in self.groups}
        self.D = {m: {0: rows[f"D.{m}"]} for m in self.leaders}
        self.dtypes = {k: t.dtype for k, t in rows.items() if k[:2] in ("X.", "D.")}

    def _rows(self, parts: Dict[int, torch.Tensor], width: int, dtype, device) -> torch.Tensor:
        out = []
        for b, k in enumerate(self.keys):
            t = parts.get(b)
            # (rows of a checkpoint come from the CPU)
            out.append(t.to(device) if t is not None else torch.zeros(k.shape[0], width, dtype=dtype, device=device))
        return torch.cat(out) if out else torch.zeros(0, width, dtype=dtype, device=device)

    def local_rows(self, targets: Dict[str, object]) -> Dict[str, torch.Tensor]:
        """This process's rows, unsorted: ``key``, ``selected``, ``X.<group>`` and ``D.<module>``
        (``targets``: the pass's modules, for the width and device of a batch that left no rows)."""
        spec = {}
        for name, lead in self.leaders.items():
            d_out, d_in = linear_shape(targets[name])
            dev = targets[name].weight.device
            spec[f"D.{name}"] = (d_out, dev)
            if name == lead:
                spec[f"X.{lead}"] = (d_in, dev)
        out = {"key": torch.cat(self.keys) if self.keys else torch.zeros(0, dtype=torch.int64),
               "selected": torch.cat(self.sel) if self.sel else torch.zeros(0, dtype=torch.bool)}
        for kind, table in (("X", self.X), ("D", self.D)):
            for k, parts in table.items():
                width, dev = spec[f"{kind}.{k}"]
                out[f"{kind}.{k}"] = self._rows(parts, width, self.dtypes.get(f"{kind}.{k}", torch.float32), dev)
        return out


def gather_rows(rows: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every rank's rows, concatenated on every rank (a no-op without an active process group). The
    order does not matter: :func:`finish` sorts by key."""
    if not comm.is_active():
        return rows
    world = dist.get_world_size()
    dev = comm.comm_device()
    n = torch.zeros(world, dtype=torch.int64, device=dev)
    n[dist.get_rank()] = rows["key"].shape[0]
    dist.all_reduce(n)
    counts = [int(c) for c in n.tolist()]
    h = max(counts)
    out = {}
    for name in sorted(rows):  # the same order on every rank
        t = rows[name]
        flat = t.reshape(t.shape[0], math.prod(t.shape[1:]))  # (a rank may have no row)
        # bool and int64 travel as they are; floating rows in their own dtype (gloo and NCCL carry them)
        pad = torch.zeros((h,) + tuple(flat.shape[1:]), dtype=flat.dtype, device=dev)
        pad[: flat.shape[0]] = flat.to(dev)
        if pad.dtype == torch.bool:
            pad = pad.to(torch.uint8)
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad)
        full = torch.cat([p[:c] for p, c in zip(parts, counts)])
        if t.dtype == torch.bool:
            full = full.to(torch.bool)
        out[name] = full.reshape((full.shape[0],) + tuple(t.shape[1:])).to(t.device)
    return out


def finish(rows: Dict[str, torch.Tensor], groups: Set[str], modules: List[str]) -> Optional[TokenStatistics]:
    """The rows in key order as :class:`~lora_da_fast.tokens.TokenStatistics` (``None`` without groups);
    :class:`DistributedError` if two rows share a key (an example counted twice)."""
    if not groups:
        return None
    key = rows["key"]
    order = torch.argsort(key)
    key = key[order]
    if key.shape[0] > 1 and not bool((key[1:] > key[:-1]).all()):
        raise DistributedError("two token rows of the statistics pass have the same example and position: an "
                               "example was given to two ranks (or twice)")
    sel = rows["selected"][order]
    ordered = list(dict.fromkeys(g for g in modules if g in groups)) + sorted(set(groups) - set(modules))
    X = {g: rows[f"X.{g}"][order.to(rows[f"X.{g}"].device)] for g in ordered}
    D = {m: rows[f"D.{m}"][order.to(rows[f"D.{m}"].device)] for m in modules}
    return TokenStatistics(key, None if bool(sel.all()) else sel, X, D)


def gather_over_ranks(sp) -> None:
    """Under an active process group, every rank's rows for a pass ``sp`` (a
    :class:`~.statistics_pass.StatisticsPass`), left in ``sp.token_rows`` for its ``finalize``. Every rank
    keeps the same groups (the decision does not depend on the rank); if one rank lacks rows (a resumed
    pass) all of them drop their tokens."""
    store = sp.acc.tokens
    if store is None or not comm.is_active():
        return
    flag = torch.tensor([int(store.complete)], dtype=torch.int64, device=comm.comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if int(flag.item()) == 0:
        store.complete = False
        return
    sp.token_rows = gather_rows(store.local_rows(sp.targets))
