"""Test-only switches of the dispatch, as context managers (and pytest's monkeypatch where a test has it).

- :func:`triton_on_cpu`: CPU tensors take the Triton kernels, which run in Triton's interpreter
  (``TRITON_INTERPRET=1``, set by conftest.py before triton is imported); on CUDA tensors they are the default.
- :func:`skip_flag_on_device`: a skip flag (GradScaler's overflow, ``nonfinite="skip"``) stays a device tensor on the
  CPU too, as on an accelerator, so every path's step weight runs instead of the CPU's early return.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torchlamb import _dispatch, _gradients


@contextlib.contextmanager
def _setting(module, name: str, value) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def triton_on_cpu(on: bool = True) -> contextlib.AbstractContextManager[None]:
    return _setting(_dispatch, "TRITON_DEVICE_TYPES", ("cuda", "cpu") if on else ("cuda",))


def skip_flag_on_device(on: bool = True) -> contextlib.AbstractContextManager[None]:
    return _setting(_gradients, "HOST_READABLE", () if on else ("cpu",))


def set_triton_on_cpu(monkeypatch, on: bool = True) -> None:
    monkeypatch.setattr(_dispatch, "TRITON_DEVICE_TYPES", ("cuda", "cpu") if on else ("cuda",))


def set_skip_flag_on_device(monkeypatch, on: bool = True) -> None:
    monkeypatch.setattr(_gradients, "HOST_READABLE", () if on else ("cpu",))
