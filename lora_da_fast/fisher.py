"""The statistics of a LoRA-DA run (docs/algorithm.md, "Statistics"): per module the mean gradient ``G``
and the output moment ``y``, per input group the input factor ``Z``, and the counts. Saved to and loaded
from one safetensors file; independent of rank, beta and gamma, so one file serves many solves."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import DataError, NumericalError
from .fileio import write_atomic

FORMAT_VERSION = 1


@dataclass
class ModuleStatistics:
    """Statistics of one target module (Linear layout: ``G`` is ``d_out x d_in``)."""

    group: str  # key of this module's input factor in FisherStatistics.Z
    G: torch.Tensor  # [d_out, d_in] fp32, mean per-example gradient (1/n) sum_i dL_i/dW
    y: torch.Tensor  # [d_out] fp32, (1/T) sum_{i, t in S_i} delta_t ** 2
    seq_sums: Optional[torch.Tensor] = None  # [n, d_out] fp32, s_i = sum_{t in S_i} delta_t

    @property
    def d_out(self) -> int:
        return int(self.G.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.G.shape[1])


@dataclass
class FisherStatistics:
    """Everything the solver needs; independent of rank, beta, gamma (rerun the solver without data)."""

    modules: Dict[str, ModuleStatistics]
    Z: Dict[str, torch.Tensor]  # group -> [d_in, d_in] fp32 symmetric, (1/T) sum x x^T
    num_examples: int  # n: examples with at least one label token
    num_tokens: int  # T: selected tokens (token_mask)
    num_skipped: int = 0  # examples without any label token
    token_mask: str = "attention"
    output_fisher: str = "diagonal"
    meta: Dict[str, object] = field(default_factory=dict)

    def groups(self) -> Dict[str, List[str]]:
        """Input group -> names of the modules sharing it, in module order."""
        out: Dict[str, List[str]] = {g: [] for g in self.Z}
        for name, st in self.modules.items():
            out[st.group].append(name)
        return out

    def subset(self, names: Sequence[str]) -> "FisherStatistics":
        """The statistics of the modules ``names`` only, with their input factors (tensors shared)."""
        if list(names) == list(self.modules):
            return self
        modules = {n: self.modules[n] for n in names}
        groups = {st.group for st in modules.values()}
        return FisherStatistics(modules, {g: z for g, z in self.Z.items() if g in groups}, self.num_examples,
                                self.num_tokens, self.num_skipped, self.token_mask, self.output_fisher,
                                dict(self.meta))

    def merge(self, other: "FisherStatistics") -> "FisherStatistics":
        """These statistics and ``other``'s (other modules of the same pass over the same data)."""
        return FisherStatistics({**self.modules, **other.modules}, {**self.Z, **other.Z}, self.num_examples,
                                self.num_tokens, self.num_skipped, self.token_mask, self.output_fisher,
                                {**other.meta, **self.meta})

    def to(self, device) -> "FisherStatistics":
        """A copy on ``device`` (e.g. the CPU, to free an accelerator between passes)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        modules = {n: ModuleStatistics(st.group, mv(st.G), mv(st.y), mv(st.seq_sums)) for n, st in self.modules.items()}
        return FisherStatistics(modules, {g: mv(z) for g, z in self.Z.items()}, self.num_examples, self.num_tokens,
                                self.num_skipped, self.token_mask, self.output_fisher, dict(self.meta))

    def to_tensors(self, prefix: str = "") -> Tuple[Dict[str, torch.Tensor], dict]:
        """``(tensors, header)``: the statistics as named CPU tensors (keys start with ``prefix``) and a
        JSON-able header that :meth:`from_tensors` reads back (used by files and checkpoints)."""
        tensors = {}
        names = list(self.modules)
        groups = list(self.Z)
        for i, g in enumerate(groups):
            tensors[f"{prefix}Z.{i}"] = self.Z[g].contiguous().cpu()
        for i, name in enumerate(names):
            st = self.modules[name]
            tensors[f"{prefix}G.{i}"] = st.G.contiguous().cpu()
            tensors[f"{prefix}y.{i}"] = st.y.contiguous().cpu()
            if st.seq_sums is not None:
                tensors[f"{prefix}s.{i}"] = st.seq_sums.contiguous().cpu()
        header = {
            "format_version": FORMAT_VERSION,
            "modules": names,
            "module_groups": [groups.index(self.modules[n].group) for n in names],
            "groups": groups,
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "num_skipped": self.num_skipped,
            "token_mask": self.token_mask,
            "output_fisher": self.output_fisher,
            "meta": self.meta,
        }
        return tensors, header

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], header: dict, prefix: str = "",
                     device: Optional[torch.device] = None) -> "FisherStatistics":
        """The inverse of :meth:`to_tensors`."""
        mv = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        groups = header["groups"]
        Z = {g: mv(tensors[f"{prefix}Z.{i}"]) for i, g in enumerate(groups)}
        modules = {}
        for i, (name, gi) in enumerate(zip(header["modules"], header["module_groups"])):
            s = tensors.get(f"{prefix}s.{i}")
            modules[name] = ModuleStatistics(groups[gi], mv(tensors[f"{prefix}G.{i}"]), mv(tensors[f"{prefix}y.{i}"]),
                                             None if s is None else mv(s))
        return cls(modules, Z, header["num_examples"], header["num_tokens"], header["num_skipped"],
                   header["token_mask"], header["output_fisher"], header.get("meta", {}))

    def save(self, path: str) -> None:
        """Write to a safetensors file, atomically (:func:`~lora_da_fast.fileio.write_atomic`)."""
        tensors, header = self.to_tensors()
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"lora_da_fast": json.dumps(header)}),
                     lambda exc: f"cannot write the statistics file {path} ({exc.strerror or exc})")

    @classmethod
    def load(cls, path: str, device: Optional[torch.device] = None) -> "FisherStatistics":
        """Read a file written by :meth:`save`; :class:`DataError` if it is not one."""
        if not os.path.isfile(path):
            raise DataError(f"statistics file not found: {path}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                header = json.loads(meta["lora_da_fast"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise DataError(f"{path} is not a lora_da_fast statistics file ({exc})") from None
        if header.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path} has statistics format {header.get('format_version')}, "
                            f"this version reads {FORMAT_VERSION}")
        return cls.from_tensors(tensors, header, device=device)


def first_failing(checks: List[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """The label of the first ``(label, flag)`` whose boolean scalar tensor is false, or ``None``. The
    flags are reduced on their devices and read with one transfer per device (not one per module: on a
    GPU each read waits for the device)."""
    by_device: Dict[torch.device, List[int]] = {}
    for i, (_, flag) in enumerate(checks):
        by_device.setdefault(flag.device, []).append(i)
    bad = len(checks)
    for idxs in by_device.values():
        values = torch.stack([checks[i][1] for i in idxs]).tolist()
        bad = min([bad] + [i for i, ok in zip(idxs, values) if not ok])
    return checks[bad][0] if bad < len(checks) else None


def check_finite(stats: FisherStatistics) -> None:
    """Raise :class:`NumericalError` naming the first module whose statistics hold NaN or inf."""
    checks = [(f"input statistics Z in module {g}", torch.isfinite(z).all()) for g, z in stats.Z.items()]
    for name, st in stats.modules.items():
        for label, t in (("gradient G", st.G), ("output moment y", st.y), ("sequence sums", st.seq_sums)):
            if t is not None:
                checks.append((f"{label} in module {name}", torch.isfinite(t).all()))
    bad = first_failing(checks)
    if bad is not None:
        raise NumericalError(f"non-finite {bad} (overflow in the model's dtype?)")
