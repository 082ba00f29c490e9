"""What master weights buy, and what bfloat16 state costs: a small model trained 200 steps in float32, then in
bfloat16 and float16 with and without ``master_weights``, and with ``state_dtype=torch.bfloat16``, for Lamb and Lars.
Prints a markdown table (docs/mixed-precision.md holds a run).

    .venv/bin/python benchmarks/mixed_precision.py            # about 20 s on 2 CPU cores

Each low-precision run starts from the float32 run's initial parameters (rounded) and sees the same batches.
Reported: the final training loss, its relative difference to the float32 run's, and the largest difference of any
parameter from the float32 run's parameters. float16 runs use ``torch.amp.GradScaler("cpu")`` (the loss is scaled to
keep small gradients representable), driven through the optimizer's own unscale-and-skip protocol.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import torchlamb

OPTIMIZERS = {
    "Lamb": (torchlamb.Lamb, dict(lr=2e-3, weight_decay=0.01)),
    "Lars": (torchlamb.Lars, dict(lr=0.5, weight_decay=1e-4, trust_coefficient=0.01)),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 10))


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed regression task: targets from a random teacher network plus noise."""
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(32, 10, generator=generator) / 32**0.5
    out = []
    for _ in range(steps):
        x = torch.randn(256, 32, generator=generator)
        out.append((x, torch.tanh(x @ teacher) + 0.05 * torch.randn(256, 10, generator=generator)))
    return out


def run(name: str, dtype: torch.dtype, master_weights: bool, data: list,
        state_dtype: torch.dtype | None = None) -> tuple[float, list[torch.Tensor]]:
    model = make_model().to(dtype)
    optimizer_class, options = OPTIMIZERS[name]
    optimizer = optimizer_class(torchlamb.param_groups(model, weight_decay=options["weight_decay"]),
                                **{k: v for k, v in options.items() if k != "weight_decay"},
                                master_weights=master_weights, state_dtype=state_dtype)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if dtype == torch.float16 else None
    loss = torch.tensor(0.0)
    for x, y in data:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return loss.item(), [p.detach().float() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    data = batches(args.steps)
    print(f"{args.steps} steps, batch 256, torch {torch.__version__}\n")
    print("| optimizer | parameters | master weights | state dtype | final loss | vs float32 | "
          "max parameter difference |")
    print("|---|---|---|---|---|---|---|")
    short = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
    for name in OPTIMIZERS:
        reference_loss, reference = run(name, torch.float32, False, data)
        print(f"| {name} | float32 | – | float32 | {reference_loss:.4f} | – | – |", flush=True)
        configurations = [(torch.float32, False, torch.bfloat16)]
        configurations += [(dtype, master, None) for dtype in (torch.bfloat16, torch.float16)
                           for master in (False, True)]
        configurations += [(torch.bfloat16, True, torch.bfloat16)]
        for dtype, master, state_dtype in configurations:
            loss, params = run(name, dtype, master, data, state_dtype)
            difference = max((p - q).abs().max().item() for p, q in zip(params, reference))
            relative = (loss - reference_loss) / reference_loss
            stored = state_dtype or (torch.float32 if master else dtype)
            print(f"| {name} | {short(dtype)} | {'yes' if master else 'no'} | {short(stored)} | {loss:.4f} | "
                  f"{relative:+.1%} | {difference:.2e} |", flush=True)


if __name__ == "__main__":
    main()
