"""The tokens kept by a statistics pass for the exact token-space solve (docs/algorithm.md, "Two paths:
input factor or tokens"): per input group the inputs ``X`` (``T_all x d_in``, one row per non-padding
token), per module the output gradients ``Delta`` (``T_all x d_out``, ``delta_t = dL_i/dy_t``), and
which rows the token mask selects. Rows are in a canonical order (example index, then position), so the
same data gives the same matrices whatever the batch size, the number of ranks or the order of the
examples.

Which groups keep their tokens is decided by :func:`token_groups` from the final token count and the
shapes alone, identically on every rank, before the pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Set, Tuple

import torch

from .config import KEEP_TOKENS
from .errors import DataError

# "auto": a group keeps its tokens when the final token count is at most this multiple of its d_in: fewer
# tokens than, or comparable to, its inputs. There Z is singular or nearly so, the regime where the
# input-factor path is not reproducible (fp32 rounding of G outside the inputs' span is amplified by up to
# 1 / damping), and the tokens take at most about this multiple of the memory of Z and G.
TOKEN_RATIO = 2

POSITION_BITS = 32  # key = example index << 32 | position


def token_groups(mode: str, total_tokens: int, shapes: Dict[str, Tuple[int, int]]) -> Set[str]:
    """The input groups that keep their tokens: ``shapes[group] = (d_in, sum of the group's d_out)``,
    ``total_tokens`` the non-padding tokens of the whole calibration set (all ranks). ``"never"``: none;
    ``"always"``: all; ``"auto"``: those with ``total_tokens <= TOKEN_RATIO * d_in``. A pure function of
    its arguments: every rank decides the same."""
    if mode not in KEEP_TOKENS:
        raise ValueError(f"keep_tokens must be one of {KEEP_TOKENS}, got {mode!r}")
    if mode == "never":
        return set()
    if mode == "always":
        return set(shapes)
    return {g for g, (d_in, _) in shapes.items() if total_tokens <= TOKEN_RATIO * d_in}


@dataclass
class TokenStatistics:
    """Tokens of the groups on the token path. ``key``: ``[T_all]`` int64, increasing, ``example index <<
    32 | position``; ``selected``: ``[T_all]`` bool (the token mask's tokens, those of ``Z`` and ``y``), or
    ``None`` when every token is selected; ``X[group]``: ``[T_all, d_in]``; ``delta[module]``:
    ``[T_all, d_out]`` (``G = Delta^T X / n``). Stored in the dtype the model computed them in."""

    key: torch.Tensor
    selected: Optional[torch.Tensor]
    X: Dict[str, torch.Tensor]
    delta: Dict[str, torch.Tensor]

    @property
    def num_rows(self) -> int:
        return int(self.key.shape[0])

    @property
    def example(self) -> torch.Tensor:
        """``[T_all]`` example index of each row."""
        return self.key >> POSITION_BITS

    def subset(self, groups: Iterable[str], modules: Iterable[str]) -> Optional["TokenStatistics"]:
        groups = [g for g in groups if g in self.X]
        if not groups:
            return None
        return TokenStatistics(self.key, self.selected, {g: self.X[g] for g in groups},
                               {m: self.delta[m] for m in modules if m in self.delta})

    def merge(self, other: Optional["TokenStatistics"]) -> "TokenStatistics":
        if other is None:
            return self
        if not torch.equal(self.key.cpu(), other.key.cpu()):
            raise DataError("the kept tokens of two statistics slices differ (another data set?)")
        return TokenStatistics(self.key, self.selected, {**self.X, **other.X}, {**self.delta, **other.delta})

    def to(self, device) -> "TokenStatistics":
        return TokenStatistics(self.key.to(device), None if self.selected is None else self.selected.to(device),
                               {g: x.to(device) for g, x in self.X.items()},
                               {m: d.to(device) for m, d in self.delta.items()})

    def to_tensors(self, prefix: str, groups: Sequence[str], modules: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Named CPU tensors (``{prefix}key``, ``{prefix}selected``, ``{prefix}X.{i}`` with ``i`` the
        group's index in ``groups``, ``{prefix}D.{j}`` with ``j`` the module's index in ``modules``)."""
        out = {f"{prefix}key": self.key.contiguous().cpu()}
        if self.selected is not None:
            out[f"{prefix}selected"] = self.selected.contiguous().cpu()
        for i, g in enumerate(groups):
            if g in self.X:
                out[f"{prefix}X.{i}"] = self.X[g].contiguous().cpu()
        for j, m in enumerate(modules):
            if m in self.delta:
                out[f"{prefix}D.{j}"] = self.delta[m].contiguous().cpu()
        return out

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], prefix: str, groups: Sequence[str],
                     modules: Sequence[str], module_groups: Sequence[str], device=None
                     ) -> Optional["TokenStatistics"]:
        """The inverse of :meth:`to_tensors` (``None`` when no token was kept); :class:`DataError` when
        the tensors do not fit together (rows, widths, a module of a token group without its rows)."""
        key = tensors.get(f"{prefix}key")
        if key is None:
            return None
        mv = (lambda t: t.to(device)) if device is not None else (lambda t: t)  # noqa: E731
        rows = int(key.shape[0])
        if key.dim() != 1 or key.dtype != torch.int64 or (rows > 1 and not bool((key[1:] > key[:-1]).all())):
            raise DataError("token keys: not an increasing int64 vector")
        sel = tensors.get(f"{prefix}selected")
        if sel is not None and (sel.dtype != torch.bool or tuple(sel.shape) != (rows,)):
            raise DataError(f"token selection: expected bool [{rows}]")
        X = {}
        for i, g in enumerate(groups):
            x = tensors.get(f"{prefix}X.{i}")
            if x is not None:
                if x.dim() != 2 or x.shape[0] != rows:
                    raise DataError(f"tokens of group {g}: expected {rows} rows")
                X[g] = mv(x)
        delta = {}
        for j, (m, g) in enumerate(zip(modules, module_groups)):
            d = tensors.get(f"{prefix}D.{j}")
            if (d is None) != (g not in X):
                raise DataError(f"output gradients of module {m}: " + ("missing" if d is None else "not expected"))
            if d is not None:
                if d.dim() != 2 or d.shape[0] != rows:
                    raise DataError(f"output gradients of module {m}: expected {rows} rows")
                delta[m] = mv(d)
        return cls(mv(key), None if sel is None else mv(sel), X, delta)
