"""The statistics of a LoRA-DA run (docs/algorithm.md, "Statistics"): per module the mean gradient ``G``
and the output moment ``y``, per input group the input factor ``Z`` (kept as its packed upper triangle,
:mod:`lora_da_fast.triangle`: half the bytes of the square matrix; :meth:`FisherStatistics.dense_Z` expands
one group), and the counts. Saved to and loaded from one safetensors file; independent of rank, beta and
gamma, so one file serves many solves."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import DataError, NumericalError
from .fileio import unreadable, write_atomic
from .tokens import TokenStatistics
from .triangle import pack_symmetric, packed_dim, unpack_symmetric

FORMAT_VERSION = 3  # 2: content checksum and tensor shapes in the header; 3: Z packed (upper triangle)
_HEADER_KEY = "lora_da_fast"
_TOKENS = "tok."  # prefix of the kept tokens' tensors (lora_da_fast.tokens)
TOKEN_MASKS = ("attention", "labels")


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
    # group -> (1/T) sum x x^T, fp32, its upper triangle packed row by row: [d_in (d_in + 1) / 2]
    # (lora_da_fast.triangle). A square matrix given here is stored as its packed symmetric part.
    Z: Dict[str, torch.Tensor]
    num_examples: int  # n: examples with at least one label token
    num_tokens: int  # T: selected tokens (token_mask)
    num_skipped: int = 0  # examples without any label token
    token_mask: str = "attention"
    output_fisher: str = "diagonal"
    meta: Dict[str, object] = field(default_factory=dict)
    # the inputs and output gradients of every token, for the groups on the token path (lora_da_fast.tokens)
    tokens: Optional[TokenStatistics] = None

    def __post_init__(self):
        self.Z = {g: _packed(g, z) for g, z in self.Z.items()}

    def z_dim(self, group: str) -> int:
        """``d_in`` of the input group ``group``."""
        return packed_dim(self.Z[group].shape[-1])

    def dense_Z(self, group: str, dtype: Optional[torch.dtype] = None, device=None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The dense symmetric ``d_in x d_in`` input factor of ``group``, in ``dtype`` on ``device`` (those
        of the statistics by default), or written into ``out``: what the solvers factorise, one group (or
        one stack) at a time. Mirrored entries equal the stored ones bit for bit."""
        return unpack_symmetric(self.Z[group], dtype, device, out)

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
                                dict(self.meta), self.tokens and self.tokens.subset(groups, names))

    def merge(self, other: "FisherStatistics") -> "FisherStatistics":
        """These statistics and ``other``'s (other modules of the same pass over the same data)."""
        return FisherStatistics({**self.modules, **other.modules}, {**self.Z, **other.Z}, self.num_examples,
                                self.num_tokens, self.num_skipped, self.token_mask, self.output_fisher,
                                {**other.meta, **self.meta},
                                other.tokens if self.tokens is None else self.tokens.merge(other.tokens))

    def to(self, device) -> "FisherStatistics":
        """A copy on ``device`` (e.g. the CPU, to free an accelerator between passes)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        modules = {n: ModuleStatistics(st.group, mv(st.G), mv(st.y), mv(st.seq_sums)) for n, st in self.modules.items()}
        return FisherStatistics(modules, {g: mv(z) for g, z in self.Z.items()}, self.num_examples, self.num_tokens,
                                self.num_skipped, self.token_mask, self.output_fisher, dict(self.meta),
                                self.tokens and self.tokens.to(device))

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
            "shapes": {k[len(prefix):]: list(t.shape) for k, t in tensors.items()},
            "dtypes": {k[len(prefix):]: str(t.dtype).replace("torch.", "") for k, t in tensors.items()},
        }
        if self.tokens is not None:  # checked by TokenStatistics.from_tensors; in the checksum
            tensors.update(self.tokens.to_tensors(f"{prefix}{_TOKENS}", groups, names))
        header["checksum"] = content_checksum(tensors, header, prefix)
        return tensors, header

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], header: dict, prefix: str = "",
                     device: Optional[torch.device] = None) -> "FisherStatistics":
        """The inverse of :meth:`to_tensors`. The header and the tensors are checked first (content
        checksum, then names, shapes, dtypes and counters: :func:`check_tensors`); :class:`DataError`
        saying what is wrong otherwise (the caller names the file)."""
        check_tensors(tensors, header, prefix)
        mv = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        groups = header["groups"]
        Z = {g: mv(tensors[f"{prefix}Z.{i}"]) for i, g in enumerate(groups)}
        modules = {}
        for i, (name, gi) in enumerate(zip(header["modules"], header["module_groups"])):
            s = tensors.get(f"{prefix}s.{i}")
            modules[name] = ModuleStatistics(groups[gi], mv(tensors[f"{prefix}G.{i}"]), mv(tensors[f"{prefix}y.{i}"]),
                                             None if s is None else mv(s))
        tokens = TokenStatistics.from_tensors(tensors, f"{prefix}{_TOKENS}", groups, header["modules"],
                                              [groups[gi] for gi in header["module_groups"]], device)
        return cls(modules, Z, header["num_examples"], header["num_tokens"], header["num_skipped"],
                   header["token_mask"], header["output_fisher"], header.get("meta", {}), tokens)

    def save(self, path: str) -> None:
        """Write to a safetensors file, atomically (:func:`~lora_da_fast.fileio.write_atomic`), with a
        content checksum; a full disk is a :class:`~lora_da_fast.errors.ConfigError` naming ``path``."""
        tensors, header = self.to_tensors()
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={_HEADER_KEY: json.dumps(header)}),
                     "the statistics file")

    @classmethod
    def load(cls, path: str, device: Optional[torch.device] = None) -> "FisherStatistics":
        """Read a file written by :meth:`save`. :class:`DataError`: ``"... is not a lora_da_fast statistics
        file"`` when it holds something else (no advice to delete: it may be the user's), ``"... is
        damaged (...): delete ... and rerun"`` when it is one whose checksum, names, shapes or counters
        do not hold."""
        if not os.path.isfile(path):
            raise DataError(f"statistics file not found: {path}")
        why = unreadable(path)
        if why:  # not "not a statistics file": the header could not be read at all
            raise DataError(f"{path}: cannot read: {why}")
        if not is_statistics_file(path):
            raise DataError(f"{path} is not a lora_da_fast statistics file")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                header = json.loads((f.metadata() or {})[_HEADER_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except Exception as exc:  # safetensors and json raise several types for a truncated file
            raise DataError(damaged_message(path, f"unreadable: {type(exc).__name__}")) from None
        if header.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path} has statistics format {header.get('format_version')!r}, this version reads "
                            f"{FORMAT_VERSION} (written by another lora_da_fast version): delete {path} and rerun")
        try:
            return cls.from_tensors(tensors, header, device=device)
        except DataError as exc:
            raise DataError(damaged_message(path, str(exc))) from None


def damaged_message(path: str, why: str) -> str:
    """The words for a damaged statistics file or checkpoint: what is wrong and what to do."""
    return f"{path} is damaged ({why}): delete {path} and rerun"


def is_statistics_file(path: str) -> bool:
    """Whether ``path`` looks like a file :meth:`FisherStatistics.save` wrote (a safetensors header that
    mentions lora_da_fast), damaged or not; ``False`` for anything else (e.g. a JSONL file)."""
    return safetensors_header_has(path, _HEADER_KEY)


def safetensors_header_has(path: str, key: str) -> bool:
    """Whether ``path`` starts like a safetensors file whose metadata has ``key`` (read from the raw
    header, so also when the rest of the file is damaged)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (n,) = struct.unpack("<Q", head)
            if not 2 <= n <= 100 * 2**20:
                return False
            raw = f.read(n)
    except OSError:
        return False
    return raw[:1] == b"{" and b'"__metadata__"' in raw and f'"{key}"'.encode() in raw


def _canonical(header: dict) -> bytes:
    """The header without its checksum, as JSON that survives a round trip through the file unchanged."""
    body = {k: v for k, v in header.items() if k != "checksum"}
    return json.dumps(json.loads(json.dumps(body, default=str)), sort_keys=True).encode()


def _tensor_bytes(t: torch.Tensor):
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().data


def content_checksum(tensors: Dict[str, torch.Tensor], header: dict, prefix: str = "") -> str:
    """SHA-256 of the header (but its checksum) and of every tensor whose key starts with ``prefix``
    (name without the prefix, dtype, shape, bytes), in name order."""
    h = hashlib.sha256(_canonical(header))
    for key in sorted(k for k in tensors if k.startswith(prefix)):
        t = tensors[key]
        h.update(f"\0{key[len(prefix):]}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return "sha256:" + h.hexdigest()


def _z_width(shape: Sequence[int]) -> Optional[int]:
    """The width ``d_in`` of an input factor stored with ``shape``: a square ``[d, d]`` or a packed
    triangle ``[d (d + 1) / 2]``; ``None`` for a layout this check does not know (then only the header's
    shape is checked)."""
    if len(shape) == 2 and shape[0] == shape[1]:
        return int(shape[0])
    if len(shape) == 1:
        d = int(((8 * shape[0] + 1) ** 0.5 - 1) / 2 + 0.5)
        return d if d * (d + 1) // 2 == shape[0] else None
    return None


def _is_int(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def check_tensors(tensors: Dict[str, torch.Tensor], header: dict, prefix: str = "") -> None:
    """:class:`DataError` unless ``tensors`` and ``header`` are what :meth:`FisherStatistics.to_tensors`
    wrote: the content checksum holds (so no bit of the tensors or counters changed), and the names,
    shapes (against the header's record of each tensor), dtypes and counters are consistent."""
    def bad(why: str):
        raise DataError(why)

    if not isinstance(header, dict):
        bad("no statistics header")
    want = header.get("checksum")
    if not isinstance(want, str):
        bad("no content checksum")
    if content_checksum(tensors, header, prefix) != want:
        bad("content checksum mismatch: the file changed after it was written")
    modules, groups, mg = header.get("modules"), header.get("groups"), header.get("module_groups")
    if not (isinstance(modules, list) and all(isinstance(m, str) for m in modules) and len(set(modules)) == len(modules)):
        bad("module names")
    if not (isinstance(groups, list) and all(isinstance(g, str) for g in groups) and len(set(groups)) == len(groups)):
        bad("input group names")
    if not (isinstance(mg, list) and len(mg) == len(modules) and all(_is_int(i, 0) and i < len(groups) for i in mg)):
        bad("module groups")
    n, T = header.get("num_examples"), header.get("num_tokens")
    if not (_is_int(n, 1) and _is_int(T, 1) and T >= n and _is_int(header.get("num_skipped"), 0)):
        bad(f"counters: {n!r} examples, {T!r} tokens, {header.get('num_skipped')!r} skipped")
    if header.get("token_mask") not in TOKEN_MASKS or not isinstance(header.get("output_fisher"), str):
        bad("token mask or output Fisher")
    if not isinstance(header.get("meta", {}), dict):
        bad("meta")
    shapes, dtypes = header.get("shapes"), header.get("dtypes")
    if not isinstance(shapes, dict) or not isinstance(dtypes, dict):
        bad("no record of the tensor shapes")
    have = {k[len(prefix):]: t for k, t in tensors.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith(_TOKENS)}
    expected = {f"Z.{i}" for i in range(len(groups))}
    for i in range(len(modules)):
        expected |= {f"G.{i}", f"y.{i}"} | ({f"s.{i}"} if f"s.{i}" in have else set())
    if set(have) != expected or set(shapes) != expected or set(dtypes) != expected:
        missing, extra = sorted(expected - set(have)), sorted(set(have) - expected)
        bad(f"tensors {'missing: ' + ', '.join(missing[:3]) if missing else 'not expected: ' + ', '.join(extra[:3])}"
            if missing or extra else "the header's tensor record")
    for key, t in have.items():
        if list(t.shape) != shapes[key] or str(t.dtype).replace("torch.", "") != dtypes[key]:
            bad(f"tensor {key} is {str(t.dtype).replace('torch.', '')} {list(t.shape)}, the header says "
                f"{dtypes[key]} {shapes[key]}")
        if not t.dtype.is_floating_point:
            bad(f"tensor {key} is {t.dtype}, not floating point")
    width: Dict[int, int] = {}
    for i, (name, gi) in enumerate(zip(modules, mg)):
        G, y, s = have[f"G.{i}"], have[f"y.{i}"], have.get(f"s.{i}")
        if G.dim() != 2 or list(y.shape) != [G.shape[0]]:
            bad(f"module {name}: gradient {list(G.shape)} and output moment {list(y.shape)} do not fit")
        if s is not None and list(s.shape) != [n, G.shape[0]]:
            bad(f"module {name}: sequence sums {list(s.shape)}, expected [{n}, {G.shape[0]}]")
        if width.setdefault(gi, G.shape[1]) != G.shape[1]:
            bad(f"input group {groups[gi]}: modules of widths {width[gi]} and {G.shape[1]}")
    for gi, d in width.items():
        z = _z_width(shapes[f"Z.{gi}"])
        if z is not None and z != d:
            bad(f"input factor of {groups[gi]} is {shapes[f'Z.{gi}']} for modules of width {d}")


def _packed(group: str, z: torch.Tensor) -> torch.Tensor:
    """An input factor as a packed triangle: kept if it is one, packed from its symmetric part if square."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"the input factor Z of group {group} must be a tensor, got {type(z).__name__}")
    if z.dim() == 2 and z.shape[0] == z.shape[1]:
        return pack_symmetric(z)
    if z.dim() != 1:
        raise ValueError(f"the input factor Z of group {group} must be a packed triangle [d (d + 1) / 2] or a "
                         f"square matrix, got shape {tuple(z.shape)}")
    packed_dim(z.shape[0])  # ValueError if not a triangle's size
    return z


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
