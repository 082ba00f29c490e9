"""torchlamb inside PyTorch Lightning: a LightningModule whose configure_optimizers returns Lamb and warmup_poly
(stepped per optimizer step), trained with gradient accumulation and with clipping left to Lamb's max_grad_norm,
lands on the same parameters as a hand-written loop. Skips where pytorch-lightning is not installed."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import torchlamb

pl = pytest.importorskip("pytorch_lightning")

MICRO_BATCHES = 3  # accumulate_grad_batches
OPTIMIZER_STEPS = 12
BATCH = 8
LR = 0.1
WARMUP_STEPS = 3
MAX_GRAD_NORM = 0.5  # small enough that Lamb clips in the early steps


def regression_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of a noisy linear regression, as OPTIMIZER_STEPS × MICRO_BATCHES fixed batches."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(OPTIMIZER_STEPS * MICRO_BATCHES * BATCH, 8, generator=generator)
    targets = inputs @ torch.randn(8, 1, generator=generator) + 0.01 * torch.randn(len(inputs), 1, generator=generator)
    return list(zip(inputs.split(BATCH), targets.split(BATCH)))


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def make_optimizer(model: torch.nn.Module) -> tuple[torchlamb.Lamb, torchlamb.WarmupPolyLR]:
    optimizer = torchlamb.Lamb(torchlamb.param_groups(model, weight_decay=0.01), lr=LR, max_grad_norm=MAX_GRAD_NORM)
    return optimizer, torchlamb.warmup_poly(optimizer, warmup_steps=WARMUP_STEPS, total_steps=OPTIMIZER_STEPS)


class Regression(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training_steps = 0  # micro-batches seen
        self.lrs: list[float] = []  # the lr of each optimizer step
        self.grad_norms: list[float] = []  # the unclipped global gradient norm each step saw

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        self.training_steps += 1
        return torch.nn.functional.mse_loss(self.model(inputs), targets)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        gradients = [p.grad for p in self.parameters() if p.grad is not None]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients])).item())

    def configure_optimizers(self):
        optimizer, scheduler = make_optimizer(self)  # param_groups over the LightningModule, as in the README
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def data_loss(model: torch.nn.Module, batches: list) -> float:
    with torch.no_grad():
        return sum(torch.nn.functional.mse_loss(model(inputs), targets).item() for inputs, targets in batches)


def reference_run(model: torch.nn.Module, batches: list) -> torchlamb.Lamb:
    """The same training by hand: Lightning divides each micro-batch's loss by accumulate_grad_batches."""
    optimizer, scheduler = make_optimizer(model)
    for start in range(0, len(batches), MICRO_BATCHES):
        optimizer.zero_grad()
        for inputs, targets in batches[start:start + MICRO_BATCHES]:
            (torch.nn.functional.mse_loss(model(inputs), targets) / MICRO_BATCHES).backward()
        optimizer.step()
        scheduler.step()
    return optimizer


@pytest.fixture
def torch_flags():
    """Trainer(deterministic=True) sets process-wide flags: give the other tests theirs back."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def test_lightning_trains_lamb_with_accumulation_like_a_plain_loop(tmp_path, torch_flags):
    batches = regression_batches()
    module = Regression(make_model())
    reference_model = copy.deepcopy(module.model)
    initial_loss = data_loss(module.model, batches)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=OPTIMIZER_STEPS, max_epochs=1,
                         accumulate_grad_batches=MICRO_BATCHES, deterministic=True, default_root_dir=tmp_path,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # no gradient_clip_val: Lamb clips (max_grad_norm)
    with warnings.catch_warnings():
        # 36 ready-made batches in one process: no workers needed, and no logger to log to.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        # pytorch-lightning 2.6 against torch 2.13's pytree: Lightning's to fix, not ours.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))

    optimizer = trainer.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(optimizer, torchlamb.Lamb) and trainer.gradient_clip_val is None
    # One optimizer step per MICRO_BATCHES batches, and the scheduler stepped after each optimizer step.
    assert module.training_steps == OPTIMIZER_STEPS * MICRO_BATCHES
    assert trainer.global_step == OPTIMIZER_STEPS
    assert all(optimizer.state[p]["step"].item() == OPTIMIZER_STEPS for p in module.parameters())
    assert module.lrs == pytest.approx([LR * scheduler.factor(step) for step in range(OPTIMIZER_STEPS)])
    assert module.lrs[0] == 0.0 and max(module.lrs) == LR and scheduler.get_last_lr()[0] == 0.0
    # Lamb's clip was active (p.grad itself is left unclipped), and the model learnt.
    assert max(module.grad_norms) > MAX_GRAD_NORM
    assert data_loss(module.model, batches) < 0.5 * initial_loss

    reference = reference_run(reference_model, batches)
    for (name, trained), expected in zip(module.model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(trained, expected, msg=lambda text, name=name: f"{name}: {text}")
    torch.testing.assert_close(optimizer.grad_norm, reference.grad_norm)
