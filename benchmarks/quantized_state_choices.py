"""How the choices of 8-bit state (code map, block size, storing √v, the positive floor) change LAMB's trust ratio.

    .venv/bin/python benchmarks/quantized_state_choices.py            # the table in docs/low-memory-state.md

One 512×512 tensor, 300 LAMB steps on a synthetic gradient stream (it does not depend on θ, so every variant
sees the same gradients), three kinds of gradient:

- dense: Gaussian, each row with its own scale (log-uniform over two decades);
- sparse rows: as dense, but on each step 90% of the rows (drawn anew) get no gradient, like an embedding;
- wide: each element with its own fixed scale, log-uniform over four decades.

Each variant stores m and v (or √v) quantized after every update and computes u from the stored values, as the
optimizer does; the reference keeps them in float64. Printed: the largest relative error of the trust ratio over
the steps, and the relative error of θ − θ₀ after the last step (both against the float64 reference).
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from torchlamb import quantized

SHAPE = (512, 512)
BETA1, BETA2, EPS, WEIGHT_DECAY, LR = 0.9, 0.999, 1e-6, 0.01, 1e-3


def gradient_stream(kind: str, steps: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows, columns = SHAPE
    row_scale = 10 ** (-2 * torch.rand(rows, 1, generator=generator, dtype=torch.float64))
    element_scale = 10 ** (-4 * torch.rand(SHAPE, generator=generator, dtype=torch.float64))
    for _ in range(steps):
        g = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
        if kind == "wide":
            yield g * element_scale
            continue
        g = g * row_scale
        if kind == "sparse rows":
            g = g * (torch.rand(rows, 1, generator=generator) >= 0.9)
        yield g


def run(kind: str, steps: int, store=None) -> tuple[list[float], torch.Tensor]:
    """Trust ratios per step and θ − θ₀ at the end; ``store(m, v) -> (m, v)`` rounds the moments as stored."""
    theta0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.02
    theta, m, v = theta0.clone(), torch.zeros(SHAPE, dtype=torch.float64), torch.zeros(SHAPE, dtype=torch.float64)
    ratios = []
    for t, g in enumerate(gradient_stream(kind, steps), start=1):
        m = BETA1 * m + (1 - BETA1) * g
        v = BETA2 * v + (1 - BETA2) * g * g
        if store is not None:
            m, v = store(m, v)
        u = (m / (1 - BETA1**t)) / ((v / (1 - BETA2**t)).sqrt() + EPS) + WEIGHT_DECAY * theta
        ratio = float(theta.norm() / u.norm())
        ratios.append(ratio)
        theta = theta - LR * ratio * u
    return ratios, theta - theta0


def storage(kind: str, block: int, sqrt: bool, floor: bool):
    signed, unsigned = quantized.code_map(True, kind), quantized.code_map(False, kind)

    def round_trip(x: torch.Tensor, code, floor: bool) -> torch.Tensor:
        # Flattened: one row, so that blocks larger than the tensor's rows (2048 > 512) mean what they say.
        codes, absmax = quantized.quantize(x.float().reshape(-1), code, floor=floor, block=block)
        return quantized.dequantize(codes, absmax, code, block=block).double().view_as(x)

    def store(m: torch.Tensor, v: torch.Tensor):
        m = round_trip(m, signed, False)
        v = round_trip(v.sqrt(), unsigned, floor).square() if sqrt else round_trip(v, unsigned, floor)
        return m, v

    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    variants = [("dynamic", 256, False, False), ("dynamic", 256, True, False), ("dynamic", 256, True, True),
                ("log", 256, True, True), ("dynamic", 64, True, True), ("dynamic", 2048, True, True)]
    kinds = ["dense", "sparse rows", "wide"]
    references = {kind: run(kind, args.steps) for kind in tqdm(kinds, desc="float64 references")}
    header = "| map | block | stores | floor | " + " | ".join(f"{k}: ratio / θ" for k in kinds) + " |"
    lines = [header, "|" + "---|" * (4 + len(kinds))]
    for map_kind, block, sqrt, floor in tqdm(variants, desc="variants"):
        cells = []
        for kind in kinds:
            ratios, moved = run(kind, args.steps, storage(map_kind, block, sqrt, floor))
            ref_ratios, ref_moved = references[kind]
            ratio_error = max(abs(a / b - 1) for a, b in zip(ratios, ref_ratios))
            theta_error = float((moved - ref_moved).norm() / ref_moved.norm())
            cells.append(f"{100 * ratio_error:.2g}% / {100 * theta_error:.2g}%")
        lines.append(f"| {map_kind} | {block} | {'√v' if sqrt else 'v'} | {'yes' if floor else 'no'} | "
                     + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
