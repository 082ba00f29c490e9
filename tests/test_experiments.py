"""The experiments and `torchlamb demo` end to end, at a tiny scale (real MNIST, a few hundred steps)."""

from __future__ import annotations

import json
import math
import re

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from torchlamb import cli  # noqa: E402
from torchlamb.experiments import adam_vs_lamb, batch_sweep, common, critical_batch, lamb_lr  # noqa: E402


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
        for module in (adam_vs_lamb, lamb_lr, batch_sweep, critical_batch):
            monkeypatch.setattr(module, "mnist_data", lambda: small)
        monkeypatch.setattr(adam_vs_lamb, "EPOCHS", {"reduced": 2, "full": 2})
        monkeypatch.setattr(lamb_lr, "EPOCHS", {"reduced": 2, "full": 2})
        monkeypatch.setattr(lamb_lr, "AUTHOR_EPOCHS", {"reduced": 0.1, "full": 0.1})
        monkeypatch.setattr(batch_sweep, "BATCH_SIZES", {"reduced": [128, 512], "full": [128, 512]})
        monkeypatch.setattr(batch_sweep, "EPOCHS", {"reduced": 1, "full": 1})
        monkeypatch.setattr(critical_batch, "SETTINGS", {"reduced": tiny_study, "full": tiny_study})
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
                  "4. Where large batches stop paying"):
        assert title in report
    assert report.count("**What it shows:**") == 4
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
    section = (demo / "README.md").read_text().split("## 4. Where large batches stop paying")[1]
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


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="optimizer"):
        common.make_optimizer(common.RunConfig(optimizer="adagrad", lr=0.1, batch_size=1, epochs=1), common.mlp())
