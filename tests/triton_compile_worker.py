"""Compiles every Triton kernel of torchlamb/kernels/triton_kernels.py for real NVIDIA GPUs, on a machine without one.

Run by tests/test_triton_compile.py in a process of its own: Triton's interpreter (TRITON_INTERPRET=1, which the rest
of the suite sets) would run the kernels instead of compiling them. A stand-in for the CUDA driver names the target
(compute capability 8.0 is an A100, 9.0 an H100/H200); each launch then goes through Triton's whole compiler —
Python to Triton IR, GPU IR, LLVM IR, PTX and, by the ptxas that ships in the triton wheel, a cubin — and is not run.
The interpreter shares the compiler's front end (types, shapes, constexprs); what only this reaches is the back end
for each architecture: the lowering to LLVM and PTX, and ptxas. Whether the kernels compute the right numbers is
tests/test_triton.py's job, in the interpreter here and compiled on a GPU (benchmarks/gpu_check.sh).

It reaches into Triton's runtime (the active driver, JITFunction.run, the compiled kernel's asm and metadata) as
triton 3.6.0 has them, the version `make test` pins and the GPU machine has.

Usage: python tests/triton_compile_worker.py OUT.json CAPABILITY [CAPABILITY ...]
Writes one record per launch (each compiled, or taken from Triton's cache of this process): target, kernel, its
constexpr arguments, cubin bytes.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver, jit  # noqa: E402

# One optimizer step per configuration: every dtype of parameter the kernels take, each state format, master weights,
# and the options that are compile-time constants in the kernels (decay outside the ratio, Nesterov).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (None, torch.bfloat16, "8bit")


class CompileOnly:
    """The part of Triton's active driver that compiling needs: a device, a stream and the target to build for. The
    device is numbered by the target, since Triton keeps its compiled kernels per device."""

    def __init__(self, capability: int) -> None:
        self.capability = capability
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self) -> int:
        return self.capability

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def is_active(self) -> bool:
        return True


def configurations() -> list[tuple[type, torch.dtype, dict]]:
    from torchlamb import Lamb, Lars

    configs = []
    for dtype in PARAM_DTYPES:
        for state in STATE_DTYPES:
            for master in (False, True) if dtype != torch.float32 else (False,):
                options = dict(master_weights=master, **({} if state is None else {"state_dtype": state}))
                configs.append((Lamb, dtype, options))
                configs.append((Lars, dtype, dict(momentum=0.9, **options)))
    for state in STATE_DTYPES:
        extra = {} if state is None else {"state_dtype": state}
        configs.append((Lamb, torch.float32, dict(decay_outside_ratio=True, **extra)))
        configs.append((Lars, torch.float32, dict(momentum=0.9, nesterov=True, **extra)))
    return configs


def main(out: str, capabilities: list[int]) -> None:
    from torchlamb import _dispatch, quantized

    _dispatch.TRITON_DEVICE_TYPES = ("cuda", "cpu")  # CPU tensors take the Triton path (compiled, never run)
    records = []
    target = {}
    launch = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        constants = {k: str(v) for k, v in kwargs.items() if k.isupper()}
        records.append(dict(target=target["capability"], arch=kernel.metadata.target.arch, kernel=self.fn.__name__,
                            constexprs=constants, cubin_bytes=len(kernel.asm.get("cubin", b""))))
        return kernel

    jit.JITFunction.run = compile_only
    generator = torch.Generator().manual_seed(0)
    for capability in capabilities:
        target["capability"] = capability
        driver.set_active(CompileOnly(capability))
        for optimizer_class, dtype, options in configurations():
            # A matrix with 8-bit state (at least quantized.MIN_NUMEL elements) and a bias (float state).
            params = [torch.nn.Parameter(torch.randn(16, 300, generator=generator).to(dtype)),
                      torch.nn.Parameter(torch.randn(300, generator=generator).to(dtype))]
            assert quantized.quantizes(params[0]) and not quantized.quantizes(params[1])
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(dtype)
            optimizer_class(params, lr=0.01, weight_decay=0.01, fused=True, **options).step()
    with open(out, "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main(sys.argv[1], [int(c) for c in sys.argv[2:]])
