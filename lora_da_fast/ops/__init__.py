"""The accumulation ops of the statistics pass, one module per backend with the same names and signatures:

- :mod:`.reference`: pure PyTorch, the readable specification, CPU fallback and oracle of the tests;
- :mod:`.triton_ops`: launchers of the Triton kernels in ``lora_da_fast.kernels`` (CUDA, or the Triton
  interpreter in tests), sharing the grid heuristics and argument checks of :mod:`.launch`.

Each backend provides ``sym_accumulate(Z, x, mask)`` and ``grad_stats(G, y, dy, x, grad_mask, stat_mask,
seq_sums=None, seq_ids=None)``; :func:`get_ops` picks one for a device.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from . import reference


def get_ops(backend: str, device: torch.device):
    """The module implementing ``sym_accumulate``/``grad_stats`` for ``backend`` on ``device``:
    ``"torch"`` the reference, ``"triton"`` the kernels, ``"auto"`` the kernels on CUDA when triton is
    installed and the reference elsewhere."""
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return reference
    try:  # triton is optional (not on every platform); importing it here does not touch CUDA
        from . import triton_ops
    except ImportError as exc:
        if backend == "auto":
            return reference
        raise ConfigError(f"backend='triton' needs triton ({exc})") from None
    return triton_ops
