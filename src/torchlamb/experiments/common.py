"""What the MNIST experiments share: the data, the model, one training run, and the optimizers compared.

Each experiment script (``adam_vs_lamb.py``, ``lamb_lr.py``, ``batch_sweep.py``) reads top to bottom: its
configuration, then calls :func:`train` for each run, then writes figures and a results table.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..data import MNIST_MEAN, MNIST_STD, load_mnist
from ..groups import param_groups
from ..kernels import cpu
from ..lamb import Lamb
from ..lars import Lars
from ..schedules import warmup_poly
from ..telemetry import TrustMonitor

OPTIMIZERS = ("adam", "adamw", "lamb", "lars", "muon", "sgd")


def mlp() -> nn.Module:
    """The small network of the MNIST experiments (Ben Mann's post on LAMB does not give its own): 784 → 256 → 128 →
    10, ReLU."""
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def convnet() -> nn.Module:
    """The PyTorch-examples MNIST ConvNet that Ben Mann's public code for his LAMB post trained: conv 1→20 5×5,
    max-pool, conv 20→50 5×5, max-pool, fc 800→500, fc 500→10, ReLU."""
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


MODELS = {"mlp": mlp, "convnet": convnet}


@dataclass(frozen=True)
class Data:
    """MNIST normalised with the usual mean and std: train/validation (50k/10k of the training set) and test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def mnist_data() -> Data:
    x, y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    x = (x - MNIST_MEAN) / MNIST_STD
    test_x = (test_x - MNIST_MEAN) / MNIST_STD
    return Data(x[:50000], y[:50000], x[50000:], y[50000:], test_x, test_y)


@dataclass(frozen=True)
class RunConfig:
    """One training run. ``exempt_norms``: put biases in an un-decayed, un-adapted group (param_groups);
    False applies decay and the ratio to every tensor, as the experiments of Ben Mann's post on LAMB did. ``model``:
    a key of ``MODELS``; ``bias_correction`` is Lamb's."""

    optimizer: str
    lr: float
    batch_size: int
    epochs: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.1
    end_factor: float = 0.0  # 1.0: warmup, then constant
    exempt_norms: bool = True
    seed: int = 0
    monitor_every: int | None = None
    model: str = "mlp"
    bias_correction: bool = True
    state_dtype: str | None = None  # Lamb's and Lars's: None (float32) or "8bit"


# A training loss above this (an untrained 10-class MLP starts near ln 10 = 2.3) stops a run as diverged.
DIVERGED_LOSS = 1e3


@dataclass
class RunResult:
    config: RunConfig
    steps: list[int] = field(default_factory=list)  # optimizer steps at which train_loss was logged
    train_loss: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)  # when the accuracies below were measured
    valid_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    diverged: bool = False
    divergence: str = ""  # why the run was stopped as diverged, in words; empty if it was not
    seconds: float = 0.0
    monitor: TrustMonitor | None = None

    @property
    def final_valid_accuracy(self) -> float:
        return self.valid_accuracy[-1] if self.valid_accuracy else 0.0

    @property
    def final_test_accuracy(self) -> float:
        return self.test_accuracy[-1] if self.test_accuracy else 0.0


def load_fused_kernels() -> str:
    """Builds (first use) or loads the fused CPU kernels that Lamb and Lars run on the CPU, before any run is timed,
    so that the runs' seconds compare training and not a compiler; returns what happened, for the report."""
    start = time.perf_counter()
    module = cpu.load()
    seconds = time.perf_counter() - start
    if module is None:
        return "The fused CPU kernels could not be built: Lamb and Lars ran their foreach paths."
    return (f"The fused CPU kernels were built or loaded in {seconds:.1f} s before the runs; the runs' times "
            "exclude it.")


def hidden_weights(model: nn.Module) -> list[Tensor]:
    """The weights Muon takes: every ``nn.Linear``'s weight except the last module with parameters (the head), and
    except a weight the head shares (tied). Convolution kernels are left out: ``torch.optim.Muon`` takes 2-D tensors
    only."""
    with_params = [module for module in model.modules() if next(module.parameters(recurse=False), None) is not None]
    head = {id(param) for param in with_params[-1].parameters()} if with_params else set()
    weights: dict[int, Tensor] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in head:
            weights.setdefault(id(module.weight), module.weight)
    return list(weights.values())


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon in its usual hybrid form: ``torch.optim.Muon`` on the hidden weight matrices, ``torch.optim.AdamW`` on
    every other tensor, stepped as one optimizer.

    Which tensor takes which (Keller Jordan, "Muon: an optimizer for hidden layers in neural networks", 2024): Muon
    orthogonalises a matrix's update, which suits the hidden layers' weights, which map one hidden space to another
    (:func:`hidden_weights`: every Linear's weight but the head's). The output layer's weight, the biases and gains
    (1-D) and any other tensor (convolution kernels: torch's Muon takes 2-D only) go to AdamW. In the MNIST MLP
    784 → 256 → 128 → 10: Muon on the first two Linear weights, AdamW on the last Linear's weight and all biases.

    One ``lr`` and one ``weight_decay`` serve both: Muon runs with ``adjust_lr_fn="match_rms_adamw"``, which scales
    its lr by 0.2·√max(A, B) for an A×B matrix so that its update's RMS matches AdamW's (Liu et al. 2025, "Muon is
    Scalable for LLM Training", Moonshot AI), so AdamW's lr and decoupled decay carry over. With ``exempt_norms``
    the biases (and norm layers' tensors) are not decayed, as :func:`~torchlamb.param_groups` decides.

    ``param_groups`` are the two inner optimizers' own group dicts (Muon's first), so a scheduler that sets
    ``group["lr"]`` here sets it for the optimizer that uses it. Step hooks registered here fire once per
    :meth:`step`; global hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook``) fire for the inner
    optimizers' steps too. The state lives in ``.muon.state`` and ``.adamw.state``; :meth:`state_dict` holds both.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.95, exempt_norms: bool = True
                 ) -> None:
        hidden = {id(weight) for weight in hidden_weights(model)}
        if not hidden:
            raise ValueError("MuonWithAdamW found no hidden Linear weight for Muon (the model's last Linear is the "
                             "head, which AdamW takes)")
        named = list(model.named_parameters())  # each shared tensor once
        groups = (param_groups(model, weight_decay=weight_decay) if exempt_norms
                  else [{"params": [p for _, p in named], "param_names": [n for n, _ in named],
                         "weight_decay": weight_decay}])
        muon_group: dict[str, Any] = {"params": [], "param_names": []}
        adamw_groups = []
        for group in groups:
            rest = {**group, "params": [], "param_names": []}
            for name, param in zip(group["param_names"], group["params"]):
                target = muon_group if id(param) in hidden else rest
                target["params"].append(param)
                target["param_names"].append(name)
            if rest["params"]:
                adamw_groups.append(rest)
        # Every group carries param_names: torch refuses to mix groups with and without them.
        self.muon = torch.optim.Muon([muon_group], lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, weight_decay=weight_decay)
        # The very same dicts: add_param_group keeps each dict (it only fills in missing defaults, none here).
        super().__init__(self.muon.param_groups + self.adamw.param_groups,
                         dict(lr=lr, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # A group that neither inner optimizer holds would never be stepped.
        if not any(param_group is group for group in self.muon.param_groups + self.adamw.param_groups):
            raise NotImplementedError("MuonWithAdamW splits the model's tensors itself and cannot take a new group: "
                                      "build a new MuonWithAdamW")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # Loading replaces the inner optimizers' group dicts: share the new ones again.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    def __getstate__(self) -> dict[str, Any]:  # pickle and deepcopy: the base keeps only defaults, state, groups
        return {**super().__getstate__(), "muon": self.muon, "adamw": self.adamw}


def make_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizers compared. Lamb/Lars get torchlamb's param_groups (biases exempt) unless exempt_norms=False;
    AdamW's decay skips the same tensors, so the comparison differs only in the optimizer; so does the AdamW half of
    Muon (:class:`MuonWithAdamW`)."""
    params: Any = (param_groups(model, weight_decay=config.weight_decay) if config.exempt_norms
                   else [{"params": list(model.parameters()), "weight_decay": config.weight_decay}])
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas)
    if config.optimizer == "lamb":
        return Lamb(params, lr=config.lr, betas=config.betas, bias_correction=config.bias_correction,
                    state_dtype=config.state_dtype)
    if config.optimizer == "lars":
        return Lars(params, lr=config.lr, momentum=0.9, state_dtype=config.state_dtype)
    if config.optimizer == "muon":
        return MuonWithAdamW(model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas,
                             exempt_norms=config.exempt_norms)
    if config.optimizer == "sgd":  # the control: momentum SGD without a trust ratio (Nesterov)
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return sum((model(x[i:i + 5000]).argmax(1) == y[i:i + 5000]).sum().item() for i in range(0, len(x), 5000)) / len(x)


def train(config: RunConfig, data: Data, progress: Any = None, evals_per_epoch: int = 1) -> RunResult:
    """Train ``config.model`` on ``data`` as ``config`` says; stop early if the training loss becomes non-finite or
    exceeds ``DIVERGED_LOSS`` (divergence, explained in ``RunResult.divergence``).

    The lr follows a linear warmup over ``warmup_fraction`` of the steps, then linear decay to ``end_factor``.
    ``progress`` is a tqdm bar (or None) advanced once per optimizer step.
    """
    torch.manual_seed(config.seed)
    model = MODELS[config.model]()
    optimizer = make_optimizer(config, model)
    steps_per_epoch = math.ceil(len(data.train_x) / config.batch_size)
    total_steps = count_steps(config, len(data.train_x))
    scheduler = warmup_poly(optimizer, round(config.warmup_fraction * total_steps), total_steps,
                            end_factor=config.end_factor)
    monitor = TrustMonitor(model, optimizer, every=config.monitor_every) if config.monitor_every else None
    generator = torch.Generator().manual_seed(config.seed)
    eval_every = max(1, steps_per_epoch // evals_per_epoch)
    log_every = max(1, total_steps // 200)
    result = RunResult(config, monitor=monitor)
    start = time.perf_counter()
    step = 0
    while step < total_steps and not result.diverged:
        order = torch.randperm(len(data.train_x), generator=generator)
        for begin in range(0, len(order), config.batch_size):
            batch = order[begin:begin + config.batch_size]
            loss = nn.functional.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if progress is not None:
                progress.update(1)
            if step % log_every == 0 or step == total_steps:
                value = loss.item()
                result.steps.append(step)
                result.train_loss.append(value)
                if not math.isfinite(value) or value > DIVERGED_LOSS:
                    result.diverged = True
                    result.divergence = (f"its training loss became {value} at step {step}" if not math.isfinite(value)
                                         else f"its training loss reached {value:.3g} at step {step}, past the "
                                              f"{DIVERGED_LOSS:g} taken as divergence")
            if result.diverged or step % eval_every == 0 or step == total_steps:
                result.epochs.append(step / steps_per_epoch)
                result.valid_accuracy.append(accuracy(model, data.valid_x, data.valid_y))
                result.test_accuracy.append(accuracy(model, data.test_x, data.test_y))
            if result.diverged or step == total_steps:
                break
    if progress is not None and step < total_steps:
        progress.update(total_steps - step)  # a diverged run skips its remaining steps
    if monitor is not None:
        monitor.remove()
    result.seconds = time.perf_counter() - start
    return result


def count_steps(config: RunConfig, train_size: int = 50000) -> int:
    """Optimizer steps ``config`` takes: for sizing progress bars before the runs start."""
    return max(1, round(config.epochs * math.ceil(train_size / config.batch_size)))
