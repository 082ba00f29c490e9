"""Train a small transformer with FSDP2 + torchlamb.Lamb + warmup_poly, on the CPU with gloo (or on GPUs with NCCL).

    .venv/bin/torchrun --nproc-per-node 2 examples/fsdp_train.py            # 2 processes on the CPU, ~1 minute
    .venv/bin/torchrun --nproc-per-node 2 examples/fsdp_train.py --steps 50 --batch 64
    .venv/bin/torchrun --nproc-per-node 2 --max-restarts 3 examples/fsdp_train.py --checkpoint-dir ckpt --save-every 20

The task needs no download: sort sequences of random tokens (the model sees the sequence and predicts, at each
position, the token that belongs there once sorted), which a 2-layer encoder learns in a few hundred steps.

Each parameter is a DTensor sharded on dim 0 across the processes (``fully_shard``); Lamb computes every tensor's
whole ‖θ‖ and ‖u‖ from the shards with one all-reduce per step (see torchlamb.distributed), so the run gives the
same parameters as one process with the whole batch would.

With ``--checkpoint-dir`` the run saves every ``--save-every`` steps (torchlamb.Checkpointer: model and optimizer
shards, scheduler, step, random state) and, started again, resumes from the newest complete checkpoint there: kill
any process at any moment, and ``torchrun --max-restarts`` restarts the group, which goes on from the last
checkpoint. The last line printed is ``final parameters sha256 <hex>``, a hash of the whole parameters (gathered
from the shards, the same on every process): a run killed and resumed prints the same hash as a run never killed.

Teardown: the model, optimizer and scheduler live in ``train``, which returns before the process group is destroyed
(see ``torchlamb.distributed.process_group``, which also keeps torchrun's restarts from meeting the dead processes'
addresses): a gloo group that outlives ``destroy_process_group`` can abort a process after a successful run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard  # imported before the process group exists: see process_group

import torchlamb
from torchlamb.distributed import process_group


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


STATE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "8bit": "8bit"}


def batch(step: int, size: int, vocab: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch on every process for a step (each process then takes its share)."""
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(vocab, (size, length), generator=generator)
    return tokens, tokens.sort(dim=1).values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128, help="global batch (split among the processes)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--checkpoint-dir", help="save checkpoints here, and resume from the newest one found there")
    parser.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--keep", type=int, default=3, help="how many checkpoints to keep")
    parser.add_argument("--parameters-out", help="also write the final whole parameters here (torch.save)")
    parser.add_argument("--state-dtype", choices=sorted(STATE_DTYPES), default="float32",
                        help="how Lamb stores its moments (8bit: tensors of 4096 values or more)")
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
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives (the checkpoints' agreement) use the current device
    share = args.batch // world

    torch.manual_seed(0)  # the same initial parameters on every process
    model = SortingTransformer(args.vocab, args.length).to(device)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)

    # Biases, LayerNorms and the position table get no weight decay and no trust ratio.
    optimizer = torchlamb.Lamb(torchlamb.param_groups(model, weight_decay=0.01, exclude=["position"]), lr=args.lr,
                               max_grad_norm=1.0, state_dtype=STATE_DTYPES[args.state_dtype])
    scheduler = torchlamb.warmup_poly(optimizer, warmup_steps=args.steps // 10, total_steps=args.steps)

    checkpoints = None
    first_step = 0
    if args.checkpoint_dir:
        checkpoints = torchlamb.Checkpointer(args.checkpoint_dir, model, optimizer, every=args.save_every,
                                             keep=args.keep, scheduler=scheduler)
        first_step = checkpoints.resume()
        if rank == 0 and checkpoints.resumed_from:
            print(f"resumed from {checkpoints.resumed_from} at step {first_step}", flush=True)

    start = time.perf_counter()
    for step in range(first_step, args.steps):
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
        if checkpoints is not None:
            checkpoints.after_step(step + 1)

    whole = {name: (p.full_tensor() if torchlamb.distributed.is_sharded(p) else p).detach().cpu()
             for name, p in model.named_parameters()}
    digest = parameters_sha256(whole)
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the processes hold different parameters: {digests}")
    if rank == 0:
        if args.parameters_out:
            torch.save(whole, args.parameters_out)
        print(f"final parameters sha256 {digest}", flush=True)


def parameters_sha256(parameters: dict[str, torch.Tensor]) -> str:
    """A hash of names, shapes, dtypes and bytes: equal exactly when the parameters are bitwise equal."""
    digest = hashlib.sha256()
    for name, tensor in parameters.items():
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    main()
