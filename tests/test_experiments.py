"""The experiments and `torchlamb demo` end to end, at a tiny scale (real MNIST, a few hundred steps)."""

from __future__ import annotations

import json
import math
import re

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from torchlamb import cli  # noqa: E402
from torchlamb.experiments import adam_vs_lamb, batch_ramp, batch_sweep, common, critical_batch, lamb_lr  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """Real MNIST, cut to 2000/500/1000 examples, and the experiments shrunk to seconds (for this module's tests)."""
    try:
        data = common.mnist_data()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    small = common.Data(data.train_x[:2000], data.train_y[:2000], data.valid_x[:500], data.valid_y[:500],
                        data.test_x[:1000], data.test_y[:1000])
    tiny_study = critical_batch.Settings(batch_sizes=(64, 256), optimizers=("lamb", "adamw"), target=0.8,
                                         seeds=(0, 1), first_cap=200)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for module in (adam_vs_lamb, lamb_lr, batch_sweep, critical_batch, batch_ramp):
            monkeypatch.setattr(module, "mnist_data", lambda: small)
        monkeypatch.setattr(adam_vs_lamb, "EPOCHS", {"reduced": 2, "full": 2})
        monkeypatch.setattr(lamb_lr, "EPOCHS", {"reduced": 2, "full": 2})
        monkeypatch.setattr(lamb_lr, "AUTHOR_EPOCHS", {"reduced": 0.1, "full": 0.1})
        monkeypatch.setattr(batch_sweep, "BATCH_SIZES", {"reduced": [128, 512], "full": [128, 512]})
        monkeypatch.setattr(batch_sweep, "EPOCHS", {"reduced": 1, "full": 1})
        monkeypatch.setattr(critical_batch, "SETTINGS", {"reduced": tiny_study, "full": tiny_study})
        monkeypatch.setattr(batch_ramp, "OPTIMIZERS", {"reduced": ("lamb", "adamw"), "full": ("lamb", "adamw")})
        yield small


@pytest.fixture(scope="module")
def demo(tiny, tmp_path_factory):
    """The folder `torchlamb demo` wrote, at the tiny size: several tests read it, so it runs once."""
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--out", str(out)]) == 0
    return out


def test_demo_writes_a_report_whose_figures_exist(demo):
    report = (demo / "README.md").read_text()
    for title in ("1. Adam vs LAMB", "2. LAMB: lr 0.01 vs 0.1", "3. Accuracy against batch size",
                  "4. Where large batches stop paying", "5. A batch that grows with the noise scale"):
        assert title in report
    assert report.count("**What it shows:**") == 5
    figures = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(figures) >= 9
    for figure in figures:
        assert (demo / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo / "adam_vs_lamb_lamb_telemetry.csv").stat().st_size > 0


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["run", "--help"]])
def test_help_is_plain_text_for_a_terminal(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: torchlamb")
    # No RST (``literal``, :role:`target`) nor Markdown backticks: the terminal would print them as they are.
    assert "`" not in text and not re.search(r":\w+:", text)
    if argv == ["--help"]:
        assert "torchlamb demo runs the MNIST experiments" in text


def test_run_writes_one_experiment(tiny, tmp_path):
    assert cli.main(["run", "batch_sweep", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "batch_sweep.md").read_text()
    assert "| 128 |" in report and "| 512 |" in report and "Adam vs LAMB" not in report
    # The kernels are built before the runs, so the table's seconds time training, not a compiler.
    assert "fused CPU kernels were built or loaded in" in report and "exclude it" in report


def test_the_critical_batch_study_fits_and_says_what_it_found(demo):
    section = (demo / "README.md").read_text().split("## 4. Where large batches stop paying")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| batch")]
    assert [row.split(" | ")[0] for row in table] == ["| 64", "| 256"]
    # Two seeds at each best lr: a cell that reached the target shows a mean, the range over seeds and its lr.
    cells = [cell for row in table for cell in row.strip("| ").split(" | ")[1:]]
    assert all(cell == "not reached" or "[" in cell for cell in cells), cells
    assert any("–" in cell for cell in cells), cells
    assert "LAMB's B_crit" in section and "B_simple measured at batch 64" in section
    assert "(critical_batch.png)" in section and "(noise_scale_lamb.png)" in section
    saved = json.loads((demo / "critical_batch.json").read_text())
    assert set(saved["cells"]) == {"lamb", "adamw"} and len(saved["cells"]["lamb"]["64"]["seed_steps"]) == 2


def test_train_learns_and_flags_divergence(tiny):
    config = common.RunConfig(optimizer="lamb", lr=0.02, batch_size=100, epochs=2, weight_decay=0.01)
    result = common.train(config, tiny)
    assert result.final_test_accuracy > 0.8 and not result.diverged
    assert result.steps[-1] == common.count_steps(config, train_size=2000) == 40
    assert result.divergence == ""
    exploding = common.RunConfig(optimizer="adam", lr=1e4, batch_size=100, epochs=2, warmup_fraction=0.0)
    diverged = common.train(exploding, tiny)
    assert diverged.diverged
    # The words say what the flag saw: a finite loss past the threshold is not called non-finite.
    last = diverged.train_loss[-1]
    if math.isfinite(last):
        assert last > common.DIVERGED_LOSS and f"reached {last:.3g}" in diverged.divergence
    else:
        assert f"became {last}" in diverged.divergence


def test_lamb_lr_verdicts_keep_a_finite_loss_apart_from_learning():
    config = common.RunConfig(optimizer="lamb", lr=0.1, batch_size=64, epochs=1)

    def result(accuracies, loss=0.5, diverged=""):
        return common.RunResult(config, train_loss=[loss], test_accuracy=accuracies, diverged=bool(diverged),
                                divergence=diverged)

    assert lamb_lr.verdict(result([0.9, 0.97])) == "trained stably to 97.0%"
    assert lamb_lr.verdict(result([0.91, 0.6])) == "peaked at 91.0% and then fell to 60.0%"
    assert lamb_lr.verdict(result([0.91, 0.1135], loss=2.3)) == (
        "kept a finite loss (2.3) but did not learn: 11.3% final test accuracy, after peaking at 91.0%")
    assert lamb_lr.verdict(result([0.1, 0.1], loss=2.3)).endswith("did not learn: 10.0% final test accuracy")
    assert lamb_lr.verdict(result([0.5], diverged="its training loss became nan at step 3")).startswith("diverged")


def test_the_convnet_is_seed_002s_network():
    import torch

    model = common.convnet()
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(20, 1, 5, 5), (20,), (50, 20, 5, 5), (50,), (500, 800), (500,), (10, 500), (10,)]
    assert model(torch.zeros(3, 784)).shape == (3, 10)


def test_the_batch_ramp_experiment_reuses_the_fixed_batches_and_compares_both_costs(demo):
    """Experiment 5 takes experiment 4's fixed batches from its JSON (no second sweep), runs every ramp on every seed,
    and reports steps and examples with the comparison to the fixed batches; its figures exist."""
    section = (demo / "README.md").read_text().split("## 5. A batch that grows")[1]
    assert "Fixed batches: the fixed-batch runs in critical_batch.json" in section
    assert not (demo / "batch_ramp_fixed.json").exists()
    table = [line.split(" | ") for line in section.splitlines() if line.startswith("| lamb") or
             line.startswith("| adamw")]
    assert [(row[0], row[1]) for row in table] == [(f"| {name}", policy) for name in ("lamb", "adamw")
                                                   for policy in batch_ramp.POLICIES]
    saved = json.loads((demo / "batch_ramp.json").read_text())
    for name in ("lamb", "adamw"):
        for outcomes in saved["ramps"][name].values():
            assert len(outcomes) == 2  # both seeds
            for outcome in outcomes:
                if outcome["steps"] is not None:  # examples are the sum of the batches over the steps taken
                    changes = outcome["changes"]
                    steps = [c["step"] for c in changes] + [outcome["steps"]]
                    assert outcome["examples"] == sum(c["batch"] * (b - a) for c, a, b in
                                                      zip(changes, steps, steps[1:]) if b > a)
    assert (demo / "batch_ramp.png").read_bytes()[:4] == b"\x89PNG"
    assert "**What it shows:**" in section


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="optimizer"):
        common.make_optimizer(common.RunConfig(optimizer="adagrad", lr=0.1, batch_size=1, epochs=1), common.mlp())


def _split_names(optimizer: common.MuonWithAdamW) -> tuple[list[str], list[str]]:
    return ([name for group in optimizer.muon.param_groups for name in group["param_names"]],
            [name for group in optimizer.adamw.param_groups for name in group["param_names"]])


def test_muon_with_adamw_splits_the_mlp_as_documented():
    import torch

    model = common.mlp()
    optimizer = common.make_optimizer(common.RunConfig(optimizer="muon", lr=1e-3, batch_size=32, epochs=1,
                                                       weight_decay=0.01), model)
    assert isinstance(optimizer, common.MuonWithAdamW) and isinstance(optimizer.muon, torch.optim.Muon)
    muon, adamw = _split_names(optimizer)
    assert muon == ["0.weight", "2.weight"]  # the hidden Linear weights; the head (4) and the biases go to AdamW
    assert sorted(adamw) == ["0.bias", "2.bias", "4.bias", "4.weight"]
    # Every tensor exactly once, and the combined groups are the inner optimizers' very dicts.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert all(a is b for a, b in zip(optimizer.param_groups, optimizer.muon.param_groups +
                                      optimizer.adamw.param_groups, strict=True))
    decays = {name: group["weight_decay"] for group in optimizer.param_groups for name in group["param_names"]}
    assert decays == {"0.weight": 0.01, "2.weight": 0.01, "4.weight": 0.01, "0.bias": 0.0, "2.bias": 0.0,
                      "4.bias": 0.0}
    # The convnet (after an Unflatten): its only hidden Linear (800 → 500) takes Muon; the 4-D kernels stay with AdamW.
    muon, adamw = _split_names(common.MuonWithAdamW(common.convnet()))
    assert muon == ["8.weight"] and "1.weight" in adamw and "10.weight" in adamw


def test_muon_with_adamw_steps_as_muon_and_adamw_apart_and_fires_its_hooks():
    import copy

    import torch

    torch.manual_seed(0)
    model = common.mlp()
    reference = copy.deepcopy(model)
    lr, weight_decay, betas = 1e-3, 0.01, (0.9, 0.98)
    combined = common.MuonWithAdamW(model, lr=lr, weight_decay=weight_decay, betas=betas)
    hidden = [reference[0].weight, reference[2].weight]
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [reference[4].weight]},
                               {"params": [reference[0].bias, reference[2].bias, reference[4].bias],
                                "weight_decay": 0.0}], lr=lr, betas=betas, weight_decay=weight_decay)
    calls = []
    combined.register_step_pre_hook(lambda *_: calls.append("pre"))
    combined.register_step_post_hook(lambda *_: calls.append("post"))
    for step, step_lr in enumerate((lr, 3e-3, 5e-4)):
        for group in combined.param_groups:  # as a scheduler sets it
            group["lr"] = step_lr
        for group in muon.param_groups + adamw.param_groups:
            group["lr"] = step_lr
        assert combined.muon.param_groups[0]["lr"] == combined.adamw.param_groups[-1]["lr"] == step_lr
        for param, twin in zip(model.parameters(), reference.parameters(), strict=True):
            param.grad = torch.randn_like(param)
            twin.grad = param.grad.clone()
        combined.step()
        muon.step()
        adamw.step()
        assert calls == ["pre", "post"] * (step + 1)
        for param, twin in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(param, twin)
    combined.zero_grad()
    assert all(param.grad is None for param in model.parameters())


def test_muon_with_adamw_state_dict_round_trips():
    import copy

    import torch

    torch.manual_seed(0)
    model = common.mlp()
    optimizer = common.MuonWithAdamW(model, lr=1e-3, weight_decay=0.01)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    twin_model = copy.deepcopy(model)
    twin = common.MuonWithAdamW(twin_model, lr=1e-3, weight_decay=0.01)
    # A copy, as torch.save/torch.load would give: torch's load_state_dict keeps the very tensors it is handed.
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert all(a is b for a, b in zip(twin.param_groups, twin.muon.param_groups + twin.adamw.param_groups,
                                      strict=True))
    for param, twin_param in zip(model.parameters(), twin_model.parameters(), strict=True):
        twin_param.grad = param.grad.clone()
    optimizer.step()
    twin.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters(), strict=True))
    with pytest.raises(NotImplementedError, match="new group"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
