"""The fused kernels: ``triton_steps`` for CUDA tensors (Triton), imported only where it runs."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def triton_module() -> ModuleType | None:
    """The Triton kernels' module, or None where triton does not import (``pip install 'torchlamb[gpu]'``)."""
    try:
        from . import triton_steps as module
    except ImportError:
        return None
    return module
