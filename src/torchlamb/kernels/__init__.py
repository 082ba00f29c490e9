"""The fused kernels: ``cpu`` (C++, built at first use) for CPU tensors and ``triton_steps`` (Triton) for CUDA
tensors, the latter imported only where it runs. No kernel module imports an optimizer."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

from . import cpu


@functools.cache
def triton_module() -> ModuleType | None:
    """The Triton kernels' module, or None where triton does not import (``pip install 'torchlamb[gpu]'``)."""
    try:
        from . import triton_steps as module
    except ImportError:
        return None
    return module


def entry(module: str, name: str) -> Callable[..., Any]:
    """Kernel function ``name`` of ``module`` ("cpu" or "triton"), looked up when it is called: the Triton module
    is imported only where it runs, and a test may wrap a kernel function to count its calls."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(cpu if module == "cpu" else triton_module(), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"{module}.{name}"
    return call
