"""Train a small transformer with FSDP2 + torchlamb.Lamb + warmup_poly, on the CPU with gloo (or on GPUs with NCCL).

    .venv/bin/torchrun --nproc-per-node 2 examples/fsdp_train.py            # 2 processes on the CPU, ~1 minute
    .venv/bin/torchrun --nproc-per-node 2 examples/fsdp_train.py --steps 50 --batch 64

The task needs no download: sort sequences of random tokens (the model sees the sequence and predicts, at each
position, the token that belongs there once sorted), which a 2-layer encoder learns in a few hundred steps.

Each parameter is a DTensor sharded on dim 0 across the processes (``fully_shard``); Lamb computes every tensor's
whole ‖θ‖ and ‖u‖ from the shards with one all-reduce per step (see torchlamb.distributed), so the run gives the
same parameters as one process with the whole batch would.

Teardown: the model, optimizer and scheduler live in ``train``, which returns before the process group is destroyed
(see ``process_group``): a gloo group that outlives ``destroy_process_group`` can abort a process after a successful
run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard  # imported before the process group exists: see process_group

import torchlamb
from torchlamb.distributed import clear_dtensor_caches


class SortingTransformer(nn.Module):
    def __init__(self, vocab: int, length: int, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch·length, vocab): flat, so that the output is not a view (FSDP2 warns on views)."""
        x = self.embed(tokens) + self.position
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).flatten(0, 1))


def batch(step: int, size: int, vocab: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch on every process for a step (each process then takes its share)."""
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(vocab, (size, length), generator=generator)
    return tokens, tokens.sort(dim=1).values


@contextlib.contextmanager
def process_group(backend: str) -> Iterator[None]:
    """The default process group for the ``with`` block, really destroyed at its end.

    Why: ``destroy_process_group`` frees the group only if nothing else holds it. Otherwise gloo's group and threads
    are torn down during interpreter shutdown, and a process can die with SIGABRT ("terminate called without an
    active exception") after training finished. Holders: the FSDP2 modules (reference cycles), DTensor parameters
    and optimizer state through their DeviceMesh, DTensor's caches of sharding specs (which hold DeviceMeshes), and
    torch._dynamo if first imported while the group exists (hence fully_shard imported at the top). So the objects
    live in ``train``, which returns inside the block; the block then empties the caches, collects the cycles, waits
    for every process and destroys the group, which joins gloo's threads.
    """
    dist.init_process_group(backend)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other processes may be stuck in a collective
        raise
    clear_dtensor_caches()
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128, help="global batch (split among the processes)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--length", type=int, default=12)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch % world:
        parser.error(f"--batch {args.batch} must divide among {world} processes")

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    with process_group(backend):
        train(args, backend)


def train(args: argparse.Namespace, backend: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    share = args.batch // world

    torch.manual_seed(0)  # the same initial parameters on every process
    model = SortingTransformer(args.vocab, args.length).to(device)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)

    # Biases, LayerNorms and the position table get no weight decay and no trust ratio.
    optimizer = torchlamb.Lamb(torchlamb.param_groups(model, weight_decay=0.01, exclude=["position"]), lr=args.lr,
                               max_grad_norm=1.0)
    scheduler = torchlamb.warmup_poly(optimizer, warmup_steps=args.steps // 10, total_steps=args.steps)

    start = time.perf_counter()
    for step in range(args.steps):
        tokens, targets = batch(step, args.batch, args.vocab, args.length)
        tokens, targets = tokens[rank * share:(rank + 1) * share].to(device), targets[rank * share:(rank + 1) * share]
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits, targets.to(device).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 20 == 0 or step == args.steps - 1:
            accuracy = (logits.argmax(-1).cpu() == targets.flatten()).float().mean()
            summary = torch.stack([loss.detach().cpu(), accuracy])
            dist.all_reduce(summary)  # averaged over processes, for the log only
            summary /= world
            ratios = torch.cat([s.trust_ratio.cpu() for s in optimizer.trust_stats])
            if rank == 0:
                print(f"step {step:4d}  loss {summary[0]:.3f}  token accuracy {summary[1]:.3f}  "
                      f"lr {scheduler.get_last_lr()[0]:.4f}  trust ratios {ratios.min():.3f}..{ratios.max():.3f}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
