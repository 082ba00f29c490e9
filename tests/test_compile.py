"""torch.compile: a compiled ``optimizer.step`` and a compiled training step match eager, without graph breaks
(``fullgraph=True``) and without recompiling when a scheduler changes the learning rate.

Most tests compile with a backend that records each graph and runs it as traced (it tests what torch.compile
changes: tracing, graph breaks, guards, recompilation) in seconds; one test runs inductor's generated code.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchlamb

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is not available")

STEPS = 6
OPTIONS = {
    "defaults": {},
    "foreach": {"foreach": True},
    "clipped": {"max_grad_norm": 0.5},
    "skip": {"nonfinite": "skip"},
    "bias_correction_off": {"bias_correction": False},
    # Compiled, the step runs foreach: bfloat16 moments written back from float32 working copies. Eager foreach does
    # the same (the fused kernels compute u from the rounded moments instead: one bfloat16 rounding apart).
    "bf16_state": {"state_dtype": torch.bfloat16, "foreach": True},
}


class GraphRecorder:
    """A torch.compile backend that counts the graphs it is given and runs each as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return graph.forward


def model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))
    return model, torch.randn(32, 8), torch.randn(32, 4)


def make_optimizer(name: str, model: nn.Module, options: dict) -> torch.optim.Optimizer:
    groups = torchlamb.param_groups(model, weight_decay=0.01)
    if name == "lamb":
        return torchlamb.Lamb(groups, lr=torch.tensor(0.01), **options)
    options = {key: value for key, value in options.items() if key != "bias_correction"}
    return torchlamb.Lars(groups, lr=torch.tensor(0.1), momentum=0.9, **options)


def lr_at(step: int) -> float:
    """A schedule that changes the lr at every step (warmup then decay)."""
    return min(1.0, (step + 1) / 3) * (1 - step / (2 * STEPS))


def train(model, optimizer, x, y, step_function, base_lr: float) -> None:
    for step in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        step_function()
        for group in optimizer.param_groups:
            group["lr"].fill_(base_lr * lr_at(step))  # in place: a tensor lr is an input of the graph


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_compiled_step_is_one_graph_and_matches_eager(name, option):
    model, x, y = model_and_data()
    eager_model = copy.deepcopy(model)
    optimizer = make_optimizer(name, model, OPTIONS[option])
    eager = make_optimizer(name, eager_model, OPTIONS[option])
    base_lr = float(optimizer.param_groups[0]["lr"])
    recorder = GraphRecorder()
    step = torch.compile(optimizer.step, fullgraph=True, backend=recorder)  # a graph break would raise

    train(eager_model, eager, x, y, eager.step, base_lr)
    train(model, optimizer, x, y, step, base_lr)

    # Two graphs: the first step creates the state, later ones find it. The changing lr compiles nothing new.
    assert recorder.graphs == 2
    for compiled_param, eager_param in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(compiled_param, eager_param, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(model.parameters()), next(model_and_data()[0].parameters()))
    assert len(optimizer.trust_stats) == len(eager.trust_stats)


def test_a_compiled_step_skips_a_nonfinite_gradient_without_leaving_the_graph():
    model, x, y = model_and_data()
    optimizer = make_optimizer("lamb", model, {"nonfinite": "skip"})
    recorder = GraphRecorder()
    step = torch.compile(optimizer.step, fullgraph=True, backend=recorder)
    train(model, optimizer, x, y, step, 0.01)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = optimizer.state_dict()
    for key, values in state["state"].items():
        for name, value in values.items():
            assert torch.equal(after["state"][key][name], value), (key, name)
    assert recorder.graphs == 2


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_compiled_training_step_with_a_scheduler_does_not_recompile(name):
    model, x, y = model_and_data()
    eager_model = copy.deepcopy(model)
    optimizer, eager = make_optimizer(name, model, {}), make_optimizer(name, eager_model, {})
    schedulers = [torchlamb.warmup_poly(o, warmup_steps=2, total_steps=2 * STEPS) for o in (optimizer, eager)]
    recorder = GraphRecorder()

    def training_step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    # Not fullgraph: backward() and the scheduler's wrapper around step() (torch's own, as for AdamW) break the graph.
    compiled = torch.compile(training_step, backend=recorder)
    graphs = []
    for _ in range(STEPS):
        compiled(model, optimizer, x, y)
        training_step(eager_model, eager, x, y)
        for scheduler in schedulers:
            scheduler.step()
        graphs.append(recorder.graphs)
    assert graphs[-1] == graphs[2], graphs  # the lr changed at every step; nothing compiled after the second
    torch.testing.assert_close(optimizer.param_groups[0]["lr"], eager.param_groups[0]["lr"])
    for compiled_param, eager_param in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(compiled_param, eager_param, rtol=1e-5, atol=1e-6)


def test_inductor_code_matches_eager():
    # The code inductor generates (C++ on the CPU), not only the traced graph; slow to compile, so one case.
    model, x, y = model_and_data()
    eager_model = copy.deepcopy(model)
    optimizer = make_optimizer("lamb", model, {"max_grad_norm": 0.5})
    eager = make_optimizer("lamb", eager_model, {"max_grad_norm": 0.5})
    step = torch.compile(optimizer.step, fullgraph=True)
    train(eager_model, eager, x, y, eager.step, 0.01)
    train(model, optimizer, x, y, step, 0.01)
    for compiled_param, eager_param in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(compiled_param, eager_param, rtol=1e-5, atol=1e-6)
