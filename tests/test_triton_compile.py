"""Every Triton kernel the optimizers launch compiles, through ptxas, for the GPUs large-batch training runs on
(A100: compute capability 8.0; H100/H200: 9.0), checked on this CPU-only machine by tests/triton_compile_worker.py
over every parameter dtype, state format, master weights and compile-time option."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torchlamb import kernels

TARGETS = (80, 90)
WORKER = Path(__file__).with_name("triton_compile_worker.py")
STEPS = Path(kernels.__file__).with_name("triton_kernels.py")


def _ptxas() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.exists() else None


pytestmark = pytest.mark.skipif(_ptxas() is None, reason="triton with its NVIDIA back end (ptxas) is not installed")


def test_every_kernel_compiles_for_a100_and_h100(tmp_path):
    launched = set(re.findall(r"^def (_la[mr][bs]8?_pass\d)\(", STEPS.read_text(), re.MULTILINE))
    assert len(launched) == 7  # the float and 8-bit kernels of both optimizers (LARS's 8-bit pass 1 is the float one)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")  # a fresh cache: every kernel compiles
    out = tmp_path / "compiled.json"
    done = subprocess.run([sys.executable, str(WORKER), str(out), *map(str, TARGETS)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    records = json.loads(out.read_text())
    for target in TARGETS:
        ours = [r for r in records if r["target"] == target]
        assert {r["kernel"] for r in ours} == launched
        assert all(r["arch"] == target and r["cubin_bytes"] > 0 for r in ours)
        # The configurations reach every value of the compile-time constants that select code paths.
        seen = {(name, value) for r in ours for name, value in r["constexprs"].items()}
        for dtype in ("fp32", "bf16", "fp16"):
            assert ("PARAM", dtype) in seen and ("GRAD", dtype) in seen
        assert {("STATE", "fp32"), ("STATE", "bf16"), ("HAS_COPY", "True"), ("HAS_COPY", "False"),
                ("DECAY_OUTSIDE", "True"), ("NESTEROV", "True"), ("COPY", "bf16"), ("COPY", "fp16")} <= seen
