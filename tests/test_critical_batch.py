"""The critical-batch study's parts: the fit S(B) = S_min(1 + B_crit/B), the bootstrap, the lr search and its stopping
rule (with a stand-in for training), and the accuracy checks' step grid. The whole study at a tiny size runs in
tests/test_experiments.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from torchlamb.experiments import critical_batch  # noqa: E402
from torchlamb.experiments.critical_batch import Cell, Outcome  # noqa: E402


def test_fit_recovers_a_known_curve_and_refuses_a_meaningless_one():
    s_min, b_crit = 120.0, 700.0
    points = [(b, s_min * (1 + b_crit / b)) for b in (32, 128, 512, 2048, 8192)]
    assert critical_batch.fit(points) == (pytest.approx(s_min, rel=1e-9), pytest.approx(b_crit, rel=1e-9))
    assert critical_batch.fit(points[:1]) is None  # one batch size fixes nothing
    # Steps that grow with the batch: S_min would be negative.
    assert critical_batch.fit([(32, 10.0), (64, 30.0), (128, 90.0)]) is None


def test_bootstrap_is_exact_without_seed_spread_and_spreads_with_it():
    exact = {b: Cell(seed_steps=[round(100 * (1 + 400 / b))] * 3) for b in (32, 128, 512, 2048)}
    estimates = critical_batch.bootstrap(exact, resamples=50)
    assert len(estimates) == 50 and max(estimates) - min(estimates) < 2
    noisy = {b: Cell(seed_steps=[round(100 * (1 + 400 / b) * f) for f in (0.8, 1.0, 1.25)]) for b in exact}
    spread = critical_batch.bootstrap(noisy, resamples=200)
    assert max(spread) - min(spread) > 50


def test_check_steps_are_geometric_and_end_at_the_limit():
    steps = critical_batch.check_steps(1000)
    assert steps[0] == critical_batch.FIRST_CHECK and steps[-1] == 1000
    ratios = [b / a for a, b in zip(steps[10:], steps[11:-1])]
    assert all(1.05 < r < 1.14 for r in ratios), ratios
    assert critical_batch.check_steps(5) == [5]


@pytest.fixture
def fake_training(monkeypatch):
    """Steps to the target as a function of lr alone: fewest at ``fake.best`` (set by the test), 20% more per factor 2
    away; ``fake.limits`` records the limit of every run the search started."""
    fake = SimpleNamespace(best=None, limits=[])

    def steps_to_target(trial, data, target, limit, **_):
        fake.limits.append(limit)
        steps = round(100 * 1.2 ** abs(math.log2(trial.lr / fake.best)))
        return Outcome(steps, "target") if steps <= limit else Outcome(None, "limit")

    monkeypatch.setattr(critical_batch, "steps_to_target", steps_to_target)
    return fake


class _Bar:
    def set_postfix_str(self, text: str) -> None:
        pass


def test_tune_widens_until_the_best_lr_is_inside_and_stops_runs_at_the_best_so_far(fake_training):
    fake_training.best = 0.08  # centre 0.01: three widenings upwards
    cell = critical_batch.tune("lamb", 64, 0.01, 5000, None, 0.9, _Bar())
    assert cell.best_lr == pytest.approx(0.08) and not cell.at_edge
    assert sorted(cell.tried) == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.08, 0.16])
    # The first run may use the whole cap; later ones stop at the fewest steps found so far.
    assert fake_training.limits[0] == 5000 and fake_training.limits[1] == cell.tried[0.01].steps
    assert fake_training.limits[-1] == 100
    assert cell.tried[0.005].steps is None  # it would have needed more than the best so far


def test_tune_says_when_the_best_lr_is_still_at_the_edge(fake_training):
    fake_training.best = 10.0  # far above what the widenings reach from 0.01
    cell = critical_batch.tune("lamb", 64, 0.01, 5000, None, 0.9, _Bar())
    assert cell.at_edge and cell.best_lr == max(cell.tried)
    assert len(cell.tried) == 3 + critical_batch.MAX_WIDENINGS


def test_load_cells_reads_back_what_save_cells_wrote(tmp_path):
    settings = critical_batch.Settings(batch_sizes=(32, 256), optimizers=("lamb", "muon"), target=0.9, seeds=(0, 1),
                                       first_cap=100)
    lr = 0.1 * 3  # 0.30000000000000004: the lr keys must come back exactly
    cells = {"lamb": {32: Cell(tried={lr: Outcome(40, "target", b_simple=812.5), lr * 2: Outcome(None, "limit")},
                               best_lr=lr, seed_steps=[40, None]),
                      256: Cell(tried={lr / 2: Outcome(None, "diverged")})},
             "muon": {32: Cell(tried={1e-3: Outcome(30, "target")}, best_lr=1e-3, at_edge=True, seed_steps=[30, 31]),
                      256: Cell()}}
    noise = {"lamb": 812.5, "muon": None}
    path = tmp_path / "critical_batch.json"
    critical_batch.save_cells(path, settings, cells, noise)
    saved_settings, loaded, loaded_noise = critical_batch.load_cells(path)
    assert loaded == cells and loaded_noise == noise
    assert all(isinstance(batch, int) for by_batch in loaded.values() for batch in by_batch)
    assert saved_settings["batch_sizes"] == [32, 256] and saved_settings["optimizers"] == ["lamb", "muon"]
