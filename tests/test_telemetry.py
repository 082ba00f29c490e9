"""TrustMonitor records the trust stage's numbers every N steps, costs nothing in between, and exports them."""

from __future__ import annotations

import csv
import json
import math
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchlamb import Lamb, Lars, param_groups
from torchlamb.telemetry import FIELDS, TrustMonitor

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def backward(model: torch.nn.Module, seed: int) -> None:
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()


def train(model, optimizer, steps: int, on_step=None) -> None:
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
        if on_step is not None:
            on_step(step)


def rows_at(monitor: TrustMonitor, step: int) -> list[dict]:
    return [row for row in monitor.records if row["step"] == step]


def same_number(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


class _OpRecorder(TorchDispatchMode):
    """Records every aten op that runs; ``syncs`` are those that copy a device value to the host."""

    def __init__(self):
        super().__init__()
        self.ops = []

    @property
    def syncs(self):
        return [op for op in self.ops if op in ("aten._local_scalar_dense.default", "aten.is_nonzero.default")]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# -- torchlamb optimizers: read trust_stats -------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_records_trust_stats_on_step_one_and_every_nth_step(optimizer_class):
    model = make_model()
    optimizer = optimizer_class(param_groups(model), lr=1e-2)
    monitor = TrustMonitor(model, optimizer, every=3)
    name_of = {id(p): name for name, p in model.named_parameters()}
    group_of = {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
    expected = []

    def read_trust_stats(step):
        if step in (1, 3, 6, 9):
            for stats in optimizer.trust_stats:
                for i, param in enumerate(stats.params):
                    expected.append(dict(step=step, name=name_of[id(param)], group=group_of[id(param)],
                                         weight_norm=stats.weight_norm[i].item(),
                                         update_norm=stats.update_norm[i].item(),
                                         trust_ratio=stats.trust_ratio[i].item()))

    train(model, optimizer, 10, read_trust_stats)
    assert sorted({row["step"] for row in monitor.records}) == [1, 3, 6, 9]
    assert monitor.records == expected
    assert {row["name"] for row in monitor.records} == set(name_of.values())
    assert {row["group"] for row in monitor.records} == {0, 1}  # param_groups: adapted, then exempt
    assert monitor.step == 10


def test_non_record_steps_do_no_host_sync_and_no_extra_work(monkeypatch):
    # Tensor.tolist copies to the host without passing the dispatcher, so it is counted separately.
    tolist_calls = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: tolist_calls.append(1) or tolist(self))
    monitored, twin = make_model(), make_model()
    optimizer, twin_optimizer = Lamb(monitored.parameters(), lr=1e-2), Lamb(twin.parameters(), lr=1e-2)
    monitor = TrustMonitor(monitored, optimizer, every=10)
    train(monitored, optimizer, 1)
    train(twin, twin_optimizer, 1)
    backward(monitored, 2)
    backward(twin, 2)
    tolist_calls.clear()
    with _OpRecorder() as watched:
        optimizer.step()  # step 2: not a record step
    with _OpRecorder() as unwatched:
        twin_optimizer.step()
    assert watched.syncs == [] and tolist_calls == []
    assert watched.ops == unwatched.ops  # the hooks ran no tensor op at all
    assert monitor.step == 2 and {row["step"] for row in monitor.records} == {1}

    train(monitored, optimizer, 7)
    backward(monitored, 10)
    with _OpRecorder() as recording:
        optimizer.step()  # step 10: recorded with one transfer
    assert recording.syncs == [] and tolist_calls == [1]
    assert {row["step"] for row in monitor.records} == {1, 10}


def test_non_record_steps_of_other_optimizers_add_no_work():
    monitored, twin = make_model(), make_model()
    optimizer = torch.optim.AdamW(monitored.parameters(), lr=1e-2)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    TrustMonitor(monitored, optimizer, every=10)
    train(monitored, optimizer, 1)
    train(twin, twin_optimizer, 1)
    backward(monitored, 2)
    backward(twin, 2)
    with _OpRecorder() as watched:
        optimizer.step()
    with _OpRecorder() as unwatched:
        twin_optimizer.step()
    assert watched.ops == unwatched.ops  # no snapshot, no norms


def test_a_failed_step_is_not_counted():
    model = make_model()
    optimizer = Lamb(model.parameters(), lr=1e-2)
    monitor = TrustMonitor(model, optimizer, every=2)
    train(model, optimizer, 1)
    model[0].weight.grad = torch.zeros_like(model[0].weight).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        optimizer.step()
    assert monitor.step == 1
    train(model, optimizer, 1)
    assert monitor.step == 2 and {row["step"] for row in monitor.records} == {1, 2}


# -- other optimizers: the ratio LAMB would have used for the update they made --------------------------------------


def test_adamw_update_norm_is_lambs_direction():
    model = make_model()
    lr, weight_decay, eps = 1e-2, 0.1, 1e-8
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=eps)
    monitor = TrustMonitor(model, optimizer, every=4)
    train(model, optimizer, 3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, optimizer, 1)  # step 4: recorded

    beta1, beta2 = optimizer.param_groups[0]["betas"]
    rows = {row["name"]: row for row in rows_at(monitor, 4)}
    assert set(rows) == set(before)
    for name, param in model.named_parameters():
        state = optimizer.state[param]
        t = state["step"].item()
        m_hat = state["exp_avg"].double() / (1 - beta1**t)
        v_hat = state["exp_avg_sq"].double() / (1 - beta2**t)
        theta = before[name].double()
        update = m_hat / (v_hat.sqrt() + eps) + weight_decay * theta  # LAMB's u, from AdamW's own state
        row = rows[name]
        assert row["update_norm"] == pytest.approx(update.norm().item(), rel=1e-5)
        assert row["weight_norm"] == pytest.approx(theta.norm().item(), rel=1e-6)
        assert row["trust_ratio"] == pytest.approx(row["weight_norm"] / row["update_norm"], rel=1e-12)


def test_sgd_update_norm_is_gradient_plus_decay_and_unnamed_tensors_are_numbered():
    model = make_model()
    model[1].requires_grad_(False)  # frozen LayerNorm: no grad, not updated, not recorded
    lr, weight_decay = 0.1, 0.01
    optimizer = torch.optim.SGD(model.parameters(), lr=torch.tensor(lr), weight_decay=weight_decay)
    monitor = TrustMonitor(None, optimizer, every=5)
    optimizer.zero_grad()
    backward(model, 1)
    expected = {f"param{i}": ((p.grad + weight_decay * p).norm().item(), p.norm().item())
                for i, p in enumerate(model.parameters()) if p.grad is not None}
    optimizer.step()
    assert [row["name"] for row in monitor.records] == ["param0", "param1", "param4", "param5"]
    for row in monitor.records:
        update_norm, weight_norm = expected[row["name"]]
        assert row["update_norm"] == pytest.approx(update_norm, rel=1e-5)
        assert row["weight_norm"] == weight_norm
        assert row["trust_ratio"] == pytest.approx(weight_norm / update_norm, rel=1e-5)


def test_zero_lr_records_nan_and_zero_weight_falls_back_to_one():
    model = make_model()
    torch.nn.init.zeros_(model[3].bias)
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                                 {"params": model[3].parameters()}], lr=0.1)
    monitor = TrustMonitor(model, optimizer)
    train(model, optimizer, 1)
    rows = {row["name"]: row for row in monitor.records}
    assert set(rows) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert math.isnan(rows["0.weight"]["update_norm"]) and math.isnan(rows["0.weight"]["trust_ratio"])
    assert rows["3.bias"]["weight_norm"] == 0.0 and rows["3.bias"]["trust_ratio"] == 1.0  # LAMB's fallback
    assert rows["3.weight"]["group"] == 1


def test_names_from_groups_and_from_the_names_argument():
    model = make_model()
    optimizer = torch.optim.SGD(model.named_parameters(), lr=0.1)  # groups carry param_names
    monitor = TrustMonitor(None, optimizer, names={model[3].weight: "head"})
    train(model, optimizer, 1)
    assert [row["name"] for row in monitor.records] == ["0.weight", "0.bias", "1.weight", "1.bias", "head", "3.bias"]
    # {name: tensor}, as dict(model.named_parameters()) gives, works too.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = TrustMonitor(None, optimizer, names=dict(model.named_parameters()))
    train(model, optimizer, 1)
    assert [row["name"] for row in monitor.records][:2] == ["0.weight", "0.bias"]


def test_groups_added_later_are_named_too():
    model = make_model()
    optimizer = Lamb(model[0].parameters(), lr=1e-2)
    monitor = TrustMonitor(model, optimizer, every=1)
    optimizer.add_param_group({"params": model[3].parameters()})
    train(model, optimizer, 1)
    assert [(row["name"], row["group"]) for row in monitor.records] == [("0.weight", 0), ("0.bias", 0),
                                                                        ("3.weight", 1), ("3.bias", 1)]


# -- export ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def monitor_with_nan():
    model = make_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                                 {"params": list(model[1].parameters()) + list(model[3].parameters())}], lr=0.1)
    monitor = TrustMonitor(model, optimizer, every=2)
    train(model, optimizer, 4)
    return monitor


def test_csv_and_jsonl_round_trip(monitor_with_nan, tmp_path):
    records = monitor_with_nan.records
    assert any(math.isnan(row["update_norm"]) for row in records)

    path = monitor_with_nan.to_csv(tmp_path / "out" / "trust.csv")
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames) == FIELDS
        from_csv = [dict(step=int(r["step"]), name=r["name"], group=int(r["group"]),
                         **{q: float(r[q]) for q in ("weight_norm", "update_norm", "trust_ratio")}) for r in reader]

    path = monitor_with_nan.to_jsonl(tmp_path / "out" / "trust.jsonl")
    from_jsonl = [json.loads(line) for line in path.read_text().splitlines()]

    for read_back in (from_csv, from_jsonl):
        assert len(read_back) == len(records)
        for row, original in zip(read_back, records):
            assert row.keys() == original.keys()
            assert all(same_number(row[k], original[k]) if isinstance(original[k], float) else row[k] == original[k]
                       for k in original)


def test_plots_write_pngs(monitor_with_nan, tmp_path):
    pytest.importorskip("matplotlib")
    paths = [monitor_with_nan.plot_ratios(tmp_path / "plots" / "ratios.png", title="SGD"),
             monitor_with_nan.plot_histograms(tmp_path / "plots" / "hist.png"),
             monitor_with_nan.plot_histograms(tmp_path / "plots" / "weights.png", quantity="weight_norm")]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="quantity"):
        monitor_with_nan.plot_histograms(tmp_path / "bad.png", quantity="ratio")


def test_plots_of_many_tensors_and_many_steps(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)])  # 16 tensors: no legend
    optimizer = Lamb(model.parameters(), lr=1e-2)
    monitor = TrustMonitor(model, optimizer, every=1)
    x = torch.randn(8, 4)
    for _ in range(45):  # more recorded steps than ridges drawn
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    assert monitor.plot_ratios(tmp_path / "ratios.png").read_bytes()[:8] == PNG_MAGIC
    assert monitor.plot_histograms(tmp_path / "hist.png").read_bytes()[:8] == PNG_MAGIC


def test_plotting_without_records_says_so(tmp_path):
    model = make_model()
    monitor = TrustMonitor(model, Lamb(model.parameters()))
    with pytest.raises(RuntimeError, match="no records"):
        monitor.plot_ratios(tmp_path / "ratios.png")


def test_to_tensorboard_without_tensorboard_raises_a_clear_import_error(monitor_with_nan, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install tensorboard"):
        monitor_with_nan.to_tensorboard(tmp_path / "tb")


def test_to_tensorboard_writes_histograms_and_scalars(monitor_with_nan, tmp_path, monkeypatch):
    calls = []

    class FakeWriter:  # stands in for SummaryWriter, which needs the tensorboard package
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_histogram(self, tag, values, global_step):
            assert torch.isfinite(values).all()
            calls.append(("histogram", tag, global_step))

        def add_scalar(self, tag, value, global_step):
            calls.append(("scalar", tag, global_step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    monitor_with_nan.to_tensorboard(tmp_path / "tb")
    assert calls[0] == ("init", str(tmp_path / "tb")) and calls[-1] == ("close",)
    assert ("histogram", "histograms/trust_ratio", 2) in calls
    assert ("scalar", "trust_ratio/3.weight", 4) in calls
    assert ("scalar", "weight_norm/0.bias", 1) in calls


def test_to_tensorboard_writes_event_files(monitor_with_nan, tmp_path):
    pytest.importorskip("tensorboard")
    monitor_with_nan.to_tensorboard(tmp_path / "tb")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# -- lifetime and bad input -----------------------------------------------------------------------------------------


def test_remove_and_context_manager_stop_recording():
    model = make_model()
    optimizer = Lamb(model.parameters(), lr=1e-2)
    monitor = TrustMonitor(model, optimizer, every=1)
    train(model, optimizer, 2)
    monitor.remove()
    monitor.remove()  # twice is fine
    train(model, optimizer, 2)
    assert {row["step"] for row in monitor.records} == {1, 2} and monitor.step == 2

    with TrustMonitor(model, optimizer, every=1) as scoped:
        train(model, optimizer, 1)
    train(model, optimizer, 1)
    assert {row["step"] for row in scoped.records} == {1}


@pytest.mark.parametrize(("every", "error"), [(0, ValueError), (-3, ValueError), (2.5, TypeError),
                                              (True, TypeError), ("10", TypeError)])
def test_bad_every_is_rejected(every, error):
    model = make_model()
    with pytest.raises(error, match="every"):
        TrustMonitor(model, Lamb(model.parameters()), every=every)


def test_bad_arguments_are_rejected_by_name():
    model = make_model()
    with pytest.raises(TypeError, match="optimizer"):
        TrustMonitor(model, object())
    with pytest.raises(TypeError, match="model"):
        TrustMonitor("model", Lamb(model.parameters()))
    with pytest.raises(TypeError, match="names"):
        TrustMonitor(model, Lamb(model.parameters()), names={"a": "b"})
