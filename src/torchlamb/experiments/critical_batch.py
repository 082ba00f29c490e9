"""Experiment 4: where large batches stop paying — steps to a target accuracy against batch size, per optimizer.

Shallue et al. (2018) and McCandlish et al. (2018): the steps S to reach a target fall as 1/B up to a *critical batch
size* and flatten beyond it, S(B) ≈ S_min·(1 + B_crit/B). A fixed epoch budget (experiment 3) only probes the
perfect-scaling region; here every run trains until it reaches the target. At every batch size each optimizer's lr
is retuned on a factor-2 grid (widened until the best lr is inside it), constant after a short warmup; a run stops
once it reaches the target or passes the fewest steps found so far at that batch size; the best lr is rerun on more
seeds. The fit gives each optimizer's B_crit with a bootstrap interval over seeds, and the gradient noise scale
B_simple (McCandlish et al.'s prediction of B_crit, measured with :class:`~torchlamb.NoiseScale` during a run at the
smallest batch) is drawn beside it. The optimizers: LAMB, AdamW, LARS, momentum SGD and Muon (``torch.optim.Muon`` on
the hidden weight matrices, AdamW on the output layer and the biases, one lr for both:
:class:`~torchlamb.experiments.common.MuonWithAdamW`).

    torchlamb run critical_batch [--full]
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..accumulate import GradientAccumulation
from ..noise_scale import ALL, NoiseScale
from ..telemetry import TrustMonitor
from .common import Data, RunConfig, accuracy, make_optimizer, mlp, mnist_data
from .report import Summary, new_figure, save


# -- configuration ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    batch_sizes: tuple[int, ...]
    optimizers: tuple[str, ...]
    target: float  # validation accuracy
    seeds: tuple[int, ...]
    first_cap: int  # steps allowed to a run at the smallest batch size (later sizes: twice the previous best)


SETTINGS = {
    "full": Settings(batch_sizes=tuple(32 * 2**i for i in range(9)),
                     optimizers=("lamb", "adamw", "lars", "sgd", "muon"), target=0.96, seeds=(0, 1, 2), first_cap=6000),
    # The demo's reduced version leaves Muon out: a training step with its Newton-Schulz iterations took ~7× AdamW's
    # on one CPU thread (8.5 against 1.2 ms at batch 32), and its row added ~4 minutes.
    "reduced": Settings(batch_sizes=(32, 256, 2048), optimizers=("lamb", "adamw", "lars", "sgd"),
                        target=0.95, seeds=(0,), first_cap=4000),
}
# lr at the smallest batch (the first grid's centre; near the best of a first full run) and weight decay (AdamW,
# LAMB and Muon decoupled, LARS and SGD coupled). When the batch doubles the centre moves to the last best lr × √2: the
# best lrs of a first run grew by × 1.4 to × 2.8 per doubling for the first four optimizers (SGD too, below linear
# scaling). Muon's centre is the best of steps_to_target at batch 32, seed 0, target 96%, at most 3000 steps: lr
# 2.5e-4 → 1218 steps, 5e-4 → 609, 1e-3 → 558, 1.4e-3 → 512, 2e-3 → 558, 2.8e-3 → 1218, 4e-3 → not reached; its
# decay is AdamW's, since match_rms_adamw lets Muon take AdamW's lr and decay.
OPTIMIZERS = {"lamb": dict(lr=4e-3, weight_decay=0.01), "adamw": dict(lr=1e-3, weight_decay=0.01),
              "lars": dict(lr=2.0, weight_decay=1e-4), "sgd": dict(lr=0.025, weight_decay=1e-4),
              "muon": dict(lr=1.4e-3, weight_decay=0.01)}
CENTRE_GROWTH = math.sqrt(2)
LR_FACTOR = 2.0  # the grid's spacing
MAX_WIDENINGS = 4  # lrs added beyond the first three when the best is at an edge
WARMUP_STEPS = 25  # linear warmup, then the lr stays constant
CHECKS_PER_DOUBLING = 8  # validation accuracy is checked at steps ≈ 2^(k/8): each check 9% after the previous
FIRST_CHECK = 8
NOISE_MICRO_BATCHES = 4  # the noise-scale run splits each batch into this many micro-batches (b = B/4)


@dataclass(frozen=True)
class Trial:
    optimizer: str
    batch_size: int
    lr: float
    seed: int = 0


@dataclass
class Outcome:
    steps: int | None  # steps to reach the target; None if it did not within its limit
    stopped: str  # "target", "limit" or "diverged"
    b_simple: float | None = None  # the run's mean gradient noise scale, when measured


@dataclass
class Cell:
    """One optimizer at one batch size: every lr tried, the best, and the best lr's steps on every seed."""

    tried: dict[float, Outcome] = field(default_factory=dict)
    best_lr: float | None = None
    at_edge: bool = False  # the best lr is the grid's smallest or largest after all widenings
    seed_steps: list[int | None] = field(default_factory=list)

    @property
    def reached(self) -> list[int]:
        return [s for s in self.seed_steps if s is not None]


def check_steps(limit: int) -> list[int]:
    """The steps at which a run checks its validation accuracy: a geometric grid up to ``limit`` (included)."""
    exponents = range(CHECKS_PER_DOUBLING * math.ceil(math.log2(limit + 1)))
    steps = {round(2 ** (k / CHECKS_PER_DOUBLING)) for k in exponents}
    return sorted({s for s in steps if FIRST_CHECK <= s < limit} | {limit})


def steps_to_target(trial: Trial, data: Data, target: float, limit: int, *, measure_noise: bool = False,
                    monitor_path: Path | None = None) -> Outcome:
    """Train :func:`~torchlamb.experiments.common.mlp` until its validation accuracy reaches ``target`` (checked on
    :func:`check_steps`), at most ``limit`` steps. With ``measure_noise`` each batch is split into micro-batches
    (the same gradient) and a :class:`~torchlamb.NoiseScale` measures B_simple; with ``monitor_path`` too, a
    :class:`~torchlamb.TrustMonitor` watches the trust ratios and the two are plotted side by side there."""
    torch.manual_seed(trial.seed)
    model = mlp()
    options = OPTIMIZERS[trial.optimizer]
    optimizer = make_optimizer(RunConfig(optimizer=trial.optimizer, lr=trial.lr, batch_size=trial.batch_size,
                                         epochs=0, weight_decay=options["weight_decay"]), model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    micro_batches = NOISE_MICRO_BATCHES if measure_noise else 1
    accumulation = GradientAccumulation(optimizer, micro_batches, scheduler=scheduler)
    noise = monitor = None
    if measure_noise:
        noise = NoiseScale(model, optimizer, batch_size=trial.batch_size // micro_batches,
                           micro_batches=micro_batches, every=10)
        if monitor_path is not None:
            monitor = TrustMonitor(model, optimizer, every=10)
    checks = set(check_steps(limit))
    generator = torch.Generator().manual_seed(trial.seed)
    step, outcome = 0, None
    while outcome is None:
        order = torch.randperm(len(data.train_x), generator=generator)
        for begin in range(0, len(order) - trial.batch_size + 1, trial.batch_size):  # whole batches only
            for micro in order[begin:begin + trial.batch_size].chunk(micro_batches):
                loss = nn.functional.cross_entropy(model(data.train_x[micro]), data.train_y[micro])
                accumulation.backward(loss)
            step += 1
            if not math.isfinite(loss.item()):
                outcome = Outcome(None, "diverged")
            elif step in checks and accuracy(model, data.valid_x, data.valid_y) >= target:
                outcome = Outcome(step, "target")
            elif step >= limit:
                outcome = Outcome(None, "limit")
            if outcome is not None:
                break
    if noise is not None:
        noise.remove()
        # Over the run after its first tenth: the mean tr(Σ) over the mean |G|² (a mean of the ratios would let the
        # steps where |G|² is small and poorly estimated dominate).
        traces = [v for s, v in noise.series(ALL, "trace") if s >= step / 10 and math.isfinite(v)]
        grad_sqs = [v for s, v in noise.series(ALL, "grad_sq") if s >= step / 10 and math.isfinite(v)]
        if traces and grad_sqs and statistics.mean(grad_sqs) > 0:
            outcome.b_simple = statistics.mean(traces) / statistics.mean(grad_sqs)
        if monitor is not None:
            monitor.remove()
            noise.plot(monitor_path, monitor=monitor,
                       title=f"{trial.optimizer}, batch {trial.batch_size}: gradient noise scale (thin: per tensor)")
    return outcome


def tune(name: str, batch: int, centre: float, cap: int, data: Data, target: float, bar: tqdm) -> Cell:
    """The lr with the fewest steps to the target at this batch size, on seed 0: a factor-2 grid around ``centre``,
    widened while the best lr is at its edge (or none reached the target), each run stopped once it passes the fewest
    steps so far (at most ``cap``)."""
    cell = Cell()

    def run(lr: float) -> None:
        best = cell.tried[cell.best_lr].steps if cell.best_lr is not None else None
        bar.set_postfix_str(f"{name} batch {batch} lr {lr:.3g}")
        outcome = steps_to_target(Trial(name, batch, lr), data, target, best if best is not None else cap)
        cell.tried[lr] = outcome
        if outcome.steps is not None and (best is None or outcome.steps < best):
            cell.best_lr = lr

    for lr in (centre, centre * LR_FACTOR, centre / LR_FACTOR):
        run(lr)
    for widening in range(MAX_WIDENINGS):
        low, high = min(cell.tried), max(cell.tried)
        if cell.best_lr is None:  # nothing reached the target: look further out, alternately below and above
            run(low / LR_FACTOR if widening % 2 == 0 else high * LR_FACTOR)
        elif cell.best_lr in (low, high):
            run(low / LR_FACTOR if cell.best_lr == low else high * LR_FACTOR)
        else:
            break
    cell.at_edge = cell.best_lr in (min(cell.tried), max(cell.tried))
    return cell


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(S_min, B_crit) of S(B) = S_min·(1 + B_crit/B), i.e. S linear in 1/B, by least squares on relative errors
    (each residual divided by its S); None with fewer than 2 batch sizes or a fit without meaning (S_min ≤ 0, or
    B_crit < 0: steps that grow with the batch)."""
    if len({b for b, _ in points}) < 2:
        return None
    batches, steps = np.array([b for b, _ in points], dtype=float), np.array([s for _, s in points], dtype=float)
    design = np.stack([np.ones_like(batches), 1.0 / batches], axis=1) / steps[:, None]
    (s_min, slope), *_ = np.linalg.lstsq(design, np.ones_like(steps), rcond=None)
    if s_min <= 0 or slope < 0:
        return None
    return float(s_min), float(slope / s_min)


def bootstrap(cells: dict[int, Cell], resamples: int = 1000, seed: int = 0) -> list[float]:
    """B_crit of fits to resampled seeds: at every batch size, the mean steps of seeds drawn with replacement."""
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(resamples):
        points = [(batch, float(np.mean(rng.choice(cell.reached, size=len(cell.reached)))))
                  for batch, cell in cells.items() if cell.reached]
        fitted = fit(points)
        if fitted is not None:
            estimates.append(fitted[1])
    return estimates


def sweep(settings: Settings, data: Data, out: Path, bar: tqdm) -> tuple[dict[str, dict[int, Cell]],
                                                                        dict[str, float | None]]:
    """Every optimizer's :func:`tune` at every batch size, smallest first (each size's grid centred on the previous
    best × √2), its best lr rerun on the other seeds, then B_simple measured in a rerun of the best lr at the smallest
    batch. Returns the cells by optimizer and batch size, and B_simple by optimizer (None where not measured). The
    LAMB rerun plots its noise scale beside its trust ratios in ``out``; ``bar`` advances once per cell."""
    cells: dict[str, dict[int, Cell]] = {name: {} for name in settings.optimizers}
    noise: dict[str, float | None] = {}
    smallest = settings.batch_sizes[0]
    for name in settings.optimizers:
        centre, cap = OPTIMIZERS[name]["lr"], settings.first_cap
        for batch in settings.batch_sizes:
            cell = tune(name, batch, centre, cap, data, settings.target, bar)
            cells[name][batch] = cell
            if cell.best_lr is not None:
                best = cell.tried[cell.best_lr].steps
                cell.seed_steps = [best] + [
                    steps_to_target(Trial(name, batch, cell.best_lr, seed), data, settings.target, 3 * best).steps
                    for seed in settings.seeds[1:]]
                centre, cap = cell.best_lr * CENTRE_GROWTH, 2 * best
            else:  # nothing reached the target: move the centre as usual, allow twice the last cap
                centre, cap = centre * CENTRE_GROWTH, 2 * cap
            bar.update(1)
        # B_simple at the smallest batch, on this optimizer's best lr there (with the trust ratios for LAMB).
        first = cells[name][smallest]
        if first.best_lr is not None:
            bar.set_postfix_str(f"{name} noise scale at batch {smallest}")
            outcome = steps_to_target(Trial(name, smallest, first.best_lr), data, settings.target,
                                      2 * first.tried[first.best_lr].steps, measure_noise=True,
                                      monitor_path=out / "noise_scale_lamb.png" if name == "lamb" else None)
            noise[name] = outcome.b_simple
    return cells, noise


def save_cells(path: Path, settings: Settings, cells: dict[str, dict[int, Cell]],
               noise: dict[str, float | None]) -> None:
    """Every run's outcome as JSON, for anyone who wants to refit or plot differently (:func:`load_cells`)."""
    saved = {name: {batch: asdict(cell) for batch, cell in by_batch.items()} for name, by_batch in cells.items()}
    path.write_text(json.dumps({"settings": asdict(settings), "noise_scale": noise, "cells": saved}, indent=1))


def load_cells(path: Path) -> tuple[dict, dict[str, dict[int, Cell]], dict[str, float | None]]:
    """What :func:`save_cells` wrote: the settings (as a dict), the cells and B_simple. JSON keys are strings: the
    batch sizes come back as ints, the lrs as floats (JSON writes a float's repr, so the round trip is exact)."""
    saved = json.loads(path.read_text())
    cells = {name: {int(batch): Cell(tried={float(lr): Outcome(**outcome) for lr, outcome in cell["tried"].items()},
                                     best_lr=cell["best_lr"], at_edge=cell["at_edge"],
                                     seed_steps=cell["seed_steps"])
                    for batch, cell in by_batch.items()}
             for name, by_batch in saved["cells"].items()}
    return saved["settings"], cells, saved["noise_scale"]


def run(out: Path, full: bool = False, settings: Settings | None = None) -> Summary:
    mode = "full" if full else "reduced"
    settings = settings or SETTINGS[mode]
    data = mnist_data()
    smallest = settings.batch_sizes[0]
    with tqdm(total=len(settings.optimizers) * len(settings.batch_sizes), desc="critical batch",
              unit="batch size") as bar:
        cells, noise = sweep(settings, data, out, bar)

    out.mkdir(parents=True, exist_ok=True)
    save_cells(out / "critical_batch.json", settings, cells, noise)
    fits = {name: fit([(b, s) for b, cell in by_batch.items() for s in cell.reached])
            for name, by_batch in cells.items()}
    # Each optimizer's resampling draws from its own generator, so the LAMB − AdamW differences pair independent draws.
    intervals = ({name: bootstrap(by_batch, seed=index) for index, (name, by_batch) in enumerate(cells.items())}
                 if len(settings.seeds) > 1 else {})
    figures = [(_plot(cells, fits, noise, settings, out / "critical_batch.png"),
                f"Steps to {settings.target:.1%} validation accuracy against batch size (log-log): the best lr's "
                "mean over seeds (bars: range), fits S_min(1 + B_crit/B), perfect scaling (dotted), and B_simple "
                f"measured at batch {smallest} (dashed verticals)")]
    if (out / "noise_scale_lamb.png").exists():
        figures.append((out / "noise_scale_lamb.png", f"LAMB at batch {smallest}: the gradient noise scale during "
                        "training beside the trust ratios"))

    headers = ["batch"] + [f"{name} steps [lr]" for name in settings.optimizers]
    rows = []
    for batch in settings.batch_sizes:
        row: list[object] = [batch]
        for name in settings.optimizers:
            cell = cells[name][batch]
            if not cell.reached:
                row.append("not reached")
                continue
            spread = f" ({min(cell.reached)}–{max(cell.reached)})" if len(cell.reached) > 1 else ""
            missing = f", {len(cell.seed_steps) - len(cell.reached)} seed(s) not reached" if len(
                cell.reached) < len(cell.seed_steps) else ""
            edge = " (edge)" if cell.at_edge else ""
            row.append(f"{statistics.mean(cell.reached):.0f}{spread}{missing} [{cell.best_lr:.3g}{edge}]")
        rows.append(row)
    text = (f"Target: {settings.target:.1%} validation accuracy (10k held out of the training set), checked at steps "
            f"≈ 2^(k/{CHECKS_PER_DOUBLING}). lr: a ×{LR_FACTOR:g} grid at every batch size, centred on the previous "
            f"size's best × √2, widened up to {MAX_WIDENINGS} times while the best was at an edge; "
            f"linear warmup over {WARMUP_STEPS} steps, then constant. {_muon_text(settings)}"
            f"{len(settings.seeds)} seed(s) at the best lr. "
            f"B_simple: a NoiseScale during a rerun of the best lr at batch {smallest}, each batch split into "
            f"{NOISE_MICRO_BATCHES} micro-batches (b = B/{NOISE_MICRO_BATCHES}); the mean tr(Σ) over the mean |G|² "
            "after the run's first tenth. "
            "The table shows mean steps to the target (range over seeds) [best lr; \"edge\": still at the grid's "
            "edge after widening].\n\n**What it shows:** " + _findings(cells, fits, intervals, noise, settings))
    return Summary("4. Where large batches stop paying: steps to a target against batch size", text, headers, rows,
                   figures)


def _muon_text(settings: Settings) -> str:
    """How Muon was run, when it is in the study (an empty string otherwise)."""
    if "muon" not in settings.optimizers:
        return ""
    return ("Muon: torch.optim.Muon (momentum 0.95, Nesterov, adjust_lr_fn=\"match_rms_adamw\") on the two hidden "
            "weight matrices and AdamW on the output layer and the biases, one lr and one decoupled weight decay "
            f"({OPTIMIZERS['muon']['weight_decay']:g}, biases not decayed) for both. ")


def _findings(cells: dict[str, dict[int, Cell]], fits: dict, intervals: dict[str, list[float]],
              noise: dict[str, float | None], settings: Settings) -> str:
    parts = []
    for name in settings.optimizers:
        if fits[name] is None:
            parts.append(f"{name}: too few batch sizes reached the target for a fit.")
            continue
        s_min, b_crit = fits[name]
        interval = ""
        if intervals.get(name):
            low, high = np.percentile(intervals[name], [2.5, 97.5])
            interval = f" (95% bootstrap interval over seeds {low:.0f}–{high:.0f})"
        measured = f"; B_simple measured at batch {settings.batch_sizes[0]}: {noise[name]:.0f}" if noise.get(
            name) else ""
        parts.append(f"{name}: S_min {s_min:.0f} steps, B_crit {b_crit:.0f}{interval}{measured}.")
    text = " ".join(parts)
    if fits.get("lamb") and fits.get("adamw"):
        lamb, adamw = fits["lamb"][1], fits["adamw"][1]
        if intervals.get("lamb") and intervals.get("adamw"):
            count = min(len(intervals["lamb"]), len(intervals["adamw"]))
            differences = np.array(intervals["lamb"][:count]) - np.array(intervals["adamw"][:count])
            low, high = np.percentile(differences, [2.5, 97.5])
            verdict = ("LAMB's B_crit exceeds tuned AdamW's, with an interval of the difference that excludes 0"
                       if low > 0 else "LAMB's B_crit is below tuned AdamW's, with an interval that excludes 0"
                       if high < 0 else "LAMB's B_crit does not differ from tuned AdamW's: the interval of the "
                       "difference includes 0")
            text += f" **{verdict}** ({lamb:.0f} vs {adamw:.0f}; difference 95% interval {low:.0f} to {high:.0f})."
        else:
            text += (f" LAMB's B_crit {lamb:.0f} vs AdamW's {adamw:.0f}: one seed gives no interval, so no claim "
                     "that they differ.")
    return text


def _plot(cells: dict[str, dict[int, Cell]], fits: dict, noise: dict[str, float | None], settings: Settings,
          path: Path) -> Path:
    figure, (axis,) = new_figure(width=7.5, height=5)
    colors = {name: f"C{i}" for i, name in enumerate(settings.optimizers)}
    curve = np.geomspace(settings.batch_sizes[0], settings.batch_sizes[-1], 100)
    for name in settings.optimizers:
        batches = [b for b, cell in cells[name].items() if cell.reached]
        means = [statistics.mean(cells[name][b].reached) for b in batches]
        low = [m - min(cells[name][b].reached) for m, b in zip(means, batches)]
        high = [max(cells[name][b].reached) - m for m, b in zip(means, batches)]
        axis.errorbar(batches, means, yerr=[low, high], marker="o", capsize=3, linestyle="none", color=colors[name],
                      label=name)
        if fits[name] is not None:
            s_min, b_crit = fits[name]
            axis.plot(curve, s_min * (1 + b_crit / curve), color=colors[name], linewidth=1)
        if noise.get(name):
            axis.axvline(noise[name], color=colors[name], linestyle="--", linewidth=0.9)
    starts = [statistics.mean(by_batch[settings.batch_sizes[0]].reached) for by_batch in cells.values()
              if by_batch[settings.batch_sizes[0]].reached]
    if starts:
        first = min(starts)
        axis.plot(curve, first * settings.batch_sizes[0] / curve, color="0.5", linestyle=":", label="perfect scaling")
    axis.set(xscale="log", yscale="log", xlabel="batch size B", ylabel=f"steps to {settings.target:.1%} validation "
             "accuracy", title="Steps to target against batch size (dashed: measured B_simple)")
    axis.set_xticks(list(settings.batch_sizes), labels=[str(b) for b in settings.batch_sizes])
    axis.legend()
    return save(figure, path)
