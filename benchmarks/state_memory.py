"""Optimizer-state memory of Lamb on BERT-base shapes: float32, bfloat16 and 8-bit state.

    .venv/bin/python benchmarks/state_memory.py          # the table in docs/low-memory-state.md

For each state format, in a fresh process (so that its peak is its own): BERT-base's 199 float32 parameter tensors
(~110M values) with gradients, one ``Lamb(fused=True).step()``, then

- state bytes per parameter, counted from the state tensors (``step`` counters included);
- the process's peak resident memory (``ru_maxrss``) above what the parameters and gradients alone took, which
  also counts what the step allocates on the way (working copies, temporaries).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

FORMATS = {"float32": "None", "bfloat16": "torch.bfloat16", "8bit": "'8bit'"}

CHILD = """
import resource, sys, torch, torchlamb
sys.path.insert(0, {benchmarks!r})
from step_speed import bert_base_shapes
from torchlamb.kernels import cpu
cpu.load()
params = [torch.randn(shape) for shape in bert_base_shapes()]
for p in params:
    p.grad = torch.randn_like(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
optimizer = torchlamb.Lamb(params, fused=True, state_dtype={state_dtype})
optimizer.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
count = sum(p.numel() for p in params)
state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
print(count, state, (peak - before) * 1024)
"""


def measure(state_dtype: str) -> tuple[int, int, int]:
    code = CHILD.format(benchmarks=str(Path(__file__).parent), state_dtype=state_dtype)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    count, state, peak = (int(x) for x in out.split())
    return count, state, peak


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print("| state | bytes per parameter (state tensors) | state MB | peak RSS above params+grads, MB |")
    print("|---|---|---|---|")
    for name, state_dtype in FORMATS.items():
        print(f"measuring {name}", file=sys.stderr, flush=True)
        count, state, peak = measure(state_dtype)
        print(f"| {name} | {state / count:.3f} | {state / 2**20:.0f} | {peak / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
