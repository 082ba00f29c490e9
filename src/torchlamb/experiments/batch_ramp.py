"""Experiment 5: the batch that grows when the noise scale says so — a ramp against every fixed batch, on both costs.

Training to a target costs optimizer steps (time, on a machine wide enough for any batch) and examples (compute).
Each fixed batch size is one point on the (examples, steps) plane; the critical-batch study's sweep (experiment 4:
every batch size 32…8192, the lr retuned at each, several seeds) draws each optimizer's frontier. A
:class:`~torchlamb.BatchRamp` starts at batch 32 and grows: **measured** (double whenever c × the NoiseScale's
smoothed B_simple reaches twice the batch, c = 1 and 4, at most every ``INTERVAL`` steps) or **scheduled** (GPT-3's
and Megatron's linear ramp in examples, in doublings). The question: does a ramp reach the target in fewer steps
than every fixed batch that uses no more examples?

The ramps start from the lr the sweep found best at batch 32 and scale it by √(B/32) as the batch grows: the sweep's
best lrs grew by × 1.4 to × 2.8 per doubling for every optimizer, √2 being the lower end. The warmup is the sweep's,
25 steps at batch 32, counted in examples (800). Every run is split into micro-batches of 16 examples (NoiseScale's
two batch sizes: 16 and the batch), which does not change the gradient.

    torchlamb run batch_ramp [--full]      # reuses critical_batch.json in --out when its settings match
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
from ..batch_ramp import BatchRamp, linear_schedule
from ..noise_scale import NoiseScale
from ..schedules import warmup_poly
from . import critical_batch
from .common import Data, RunConfig, accuracy, make_optimizer, mlp, mnist_data
from .critical_batch import Cell, check_steps
from .report import Summary, new_figure, save

# -- configuration ------------------------------------------------------------------------------------------------
# The optimizers ramped: all four in the full study; the demo's reduced version ramps LAMB only (about 2 minutes).
OPTIMIZERS = {"full": ("lamb", "adamw", "sgd", "muon"), "reduced": ("lamb",)}
MICRO_BATCH = 16  # examples per backward pass; the ramps start at 2 of them (the sweep's smallest batch, 32)
INTERVAL = 20  # steps between the measured ramp's decisions (NoiseScale's moving average spans ~20 steps)
LR_RULE = "sqrt"
SCHEDULE_FRACTION = 0.5  # the scheduled ramp reaches the largest batch after half the examples batch 32 needs
# The ramps: measured with target batch c × B_simple — c = 1 (McCandlish et al.: B_crit ≈ B_simple) and c = 4
# (experiment 4 measured B_crit at 1.3–5.6 × the run-averaged B_simple) — and scheduled.
POLICIES = {"measured c=1": 1.0, "measured c=4": 4.0, "scheduled": None}


@dataclass
class RampOutcome:
    steps: int | None  # optimizer steps to the target; None if not reached within the limit
    examples: int | None  # examples seen by then
    stopped: str  # "target", "limit" or "diverged"
    final_batch: int = 0
    changes: list[dict] = field(default_factory=list)  # the ramp's ChangeRecords


def ramp_to_target(name: str, lr: float, seed: int, data: Data, target: float, limit: int, limit_examples: int,
                   start: int, max_batch: int, factor: float = 1.0, schedule: list[tuple[int, int]] | None = None,
                   plot: Path | None = None) -> RampOutcome:
    """Train the MLP with a BatchRamp from batch ``start`` until the validation accuracy reaches ``target`` (checked
    on the critical-batch study's step grid), at most ``limit`` steps and ``limit_examples`` examples; measured
    (target batch ``factor`` × B_simple) unless ``schedule``. ``plot``: draw the batch and the measured noise scale
    there."""
    torch.manual_seed(seed)
    model = mlp()
    optimizer = make_optimizer(RunConfig(optimizer=name, lr=lr, batch_size=start, epochs=0,
                                         weight_decay=critical_batch.OPTIMIZERS[name]["weight_decay"]), model)
    accumulation = GradientAccumulation(optimizer, start // MICRO_BATCH)
    noise = NoiseScale(model, optimizer, batch_size=MICRO_BATCH, micro_batches=start // MICRO_BATCH, every=5)
    ramp = BatchRamp(accumulation, noise, max_batch=max_batch, lr_rule=LR_RULE, factor=factor, interval=INTERVAL,
                     schedule=schedule)
    warmup = critical_batch.WARMUP_STEPS * start
    accumulation.scheduler = warmup_poly(optimizer, warmup, warmup, end_factor=1.0, progress=ramp.examples_seen)
    checks = set(check_steps(limit))
    generator = torch.Generator().manual_seed(seed)
    order, position, outcome = torch.randperm(len(data.train_x), generator=generator), 0, None
    while outcome is None:
        if position + MICRO_BATCH > len(order):  # a new epoch; whole micro-batches only
            order, position = torch.randperm(len(data.train_x), generator=generator), 0
        micro = order[position:position + MICRO_BATCH]
        position += MICRO_BATCH
        loss = nn.functional.cross_entropy(model(data.train_x[micro]), data.train_y[micro])
        if not accumulation.backward(loss):
            continue
        step = accumulation.steps
        if not math.isfinite(loss.item()):
            outcome = RampOutcome(None, None, "diverged")
        elif step in checks and accuracy(model, data.valid_x, data.valid_y) >= target:
            outcome = RampOutcome(step, ramp.examples, "target")
        elif step >= limit or ramp.examples >= limit_examples:
            outcome = RampOutcome(None, None, "limit")
    noise.remove()
    outcome.final_batch, outcome.changes = ramp.batch_size, [dict(row) for row in ramp.records]
    if plot is not None:
        ramp.plot(plot, noise, title=f"{name}, measured ramp (c = {factor:g}) from batch {start}, seed {seed}")
        ramp.to_csv(plot.with_suffix(".csv"))
    return outcome


def fixed_cells(out: Path, settings: critical_batch.Settings, names: tuple[str, ...],
                data: Data) -> tuple[dict[str, dict[int, Cell]], str]:
    """The fixed-batch cells of the optimizers ``names``: read from ``out/critical_batch.json`` when experiment 4
    wrote it with these settings and optimizers, else swept here and saved as ``out/batch_ramp_fixed.json``.
    Returns the cells and where they came from, in words."""
    wanted = critical_batch.Settings(**{**asdict(settings), "optimizers": names})
    for path in (out / "critical_batch.json", out / "batch_ramp_fixed.json"):
        if path.exists():
            saved, cells, _ = critical_batch.load_cells(path)
            same = {**saved, "optimizers": None} == json.loads(json.dumps({**asdict(settings), "optimizers": None}))
            if same and all(name in cells for name in names):
                return cells, f"the fixed-batch runs in {path.name}"
    with tqdm(total=len(names) * len(settings.batch_sizes), desc="fixed batches", unit="batch size") as bar:
        cells, noise = critical_batch.sweep(wanted, data, out, bar)
    out.mkdir(parents=True, exist_ok=True)
    critical_batch.save_cells(out / "batch_ramp_fixed.json", wanted, cells, noise)
    return cells, "a sweep of the fixed batches run here (experiment 4's machinery; batch_ramp_fixed.json)"


def run(out: Path, full: bool = False) -> Summary:
    mode = "full" if full else "reduced"
    settings = critical_batch.SETTINGS[mode]
    names = OPTIMIZERS[mode]
    data = mnist_data()
    cells, source = fixed_cells(out, settings, names, data)
    start, max_batch = settings.batch_sizes[0], settings.batch_sizes[-1]
    ramps: dict[str, dict[str, list[RampOutcome]]] = {name: {policy: [] for policy in POLICIES} for name in names}
    schedules: dict[str, list[tuple[int, int]]] = {}
    with tqdm(total=len(names) * len(POLICIES) * len(settings.seeds), desc="batch ramps", unit="run") as bar:
        for name in names:
            first = cells[name][start]
            if first.best_lr is None:
                bar.update(len(POLICIES) * len(settings.seeds))
                continue
            fixed_steps = statistics.mean(first.reached)
            # A run stops as "limit" past twice the steps of batch 32 or twice the examples of the costliest batch.
            limits = (2 * max(first.reached),
                      2 * max(max(cell.reached) * batch for batch, cell in cells[name].items() if cell.reached))
            schedules[name] = linear_schedule(start, max_batch, round(SCHEDULE_FRACTION * fixed_steps * start))
            for policy, factor in POLICIES.items():
                for seed in settings.seeds:
                    bar.set_postfix_str(f"{name} {policy} seed {seed}")
                    plot = out / "batch_ramp_lamb.png" if (name, policy, seed) == ("lamb", "measured c=4", 0) else None
                    ramps[name][policy].append(ramp_to_target(
                        name, first.best_lr, seed, data, settings.target, *limits, start, max_batch,
                        factor=factor or 1.0, schedule=schedules[name] if factor is None else None, plot=plot))
                    bar.update(1)

    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_ramp.json").write_text(json.dumps(
        {"settings": asdict(settings), "fixed_from": source, "schedules": schedules,
         "ramps": {name: {policy: [asdict(o) for o in outcomes] for policy, outcomes in by_policy.items()}
                   for name, by_policy in ramps.items()}}, indent=1))
    comparisons = {name: {policy: compare(cells[name], ramps[name][policy]) for policy in POLICIES}
                   for name in names}
    figures = [(_plot(cells, ramps, settings, out / "batch_ramp.png"),
                f"Steps against examples to {settings.target:.1%} validation accuracy (log-log): each fixed batch "
                "(mean over seeds, labelled with its size) and the ramps from batch 32 (one marker per seed)")]
    if (out / "batch_ramp_lamb.png").exists():
        figures.append((out / "batch_ramp_lamb.png", "LAMB's measured ramp (c = 4, seed 0): the batch and 4 × the "
                        "measured noise scale against examples seen and against steps (the changes: "
                        "batch_ramp_lamb.csv)"))
    headers = ["optimizer", "ramp", "steps to target", "examples to target", "final batch",
               "best fixed batch with ≤ the ramp's examples: batch, steps", "ramp − that fixed batch, steps (95%)"]
    rows = []
    for name in names:
        for policy in POLICIES:
            reached = [o for o in ramps[name][policy] if o.steps is not None]
            if not reached:  # say why: the step or example limit, or divergence, per seed
                why = ", ".join(sorted({o.stopped for o in ramps[name][policy]}))
                rows.append([name, policy, f"not reached ({why})", "", "", "", ""])
                continue
            result = comparisons[name][policy]
            rows.append([name, policy, _spread([o.steps for o in reached], len(ramps[name][policy])),
                         _spread([o.examples for o in reached], len(ramps[name][policy])),
                         "/".join(str(o.final_batch) for o in reached), result["fixed"], result["difference"]])
    text = (f"Fixed batches: {source}, target {settings.target:.1%}, {len(settings.seeds)} seed(s). Ramps: from "
            f"batch {start} (micro-batches of {MICRO_BATCH}) to at most {max_batch}; measured: double when "
            f"c × B_simple ≥ 2 × batch (c = 1 and 4), decided every {INTERVAL} steps; scheduled: linear in examples to "
            f"{max_batch} over {SCHEDULE_FRACTION:g} × the examples batch {start} needs, in doublings; lr: the best "
            f"fixed lr at batch {start} × √(B/{start}); warmup {critical_batch.WARMUP_STEPS * start} examples. Muon: "
            "torch.optim.Muon on the hidden weight matrices, AdamW on the output layer and the biases. The last "
            "column compares with the fixed batch that needs the fewest steps among those using no more examples "
            "than the ramp (means; interval: bootstrap over seeds of both).\n\n**What it shows:** "
            + _findings(comparisons))
    return Summary("5. A batch that grows with the noise scale: ramps against fixed batches, steps and examples",
                   text, headers, rows, figures)


def compare(by_batch: dict[int, Cell], outcomes: list[RampOutcome], resamples: int = 1000, seed: int = 0) -> dict:
    """The ramp against the fixed batches that use no more examples (means over seeds): the best of those (fewest
    steps), and the ramp's steps minus its steps with a bootstrap interval (seeds of both resampled; in each resample
    the qualifying fixed batches are chosen anew). ``verdict``: "fewer", "more" or "undecided" (interval includes 0),
    "one seed" (no interval), or "fewest examples" when no fixed batch uses as few examples as the ramp."""
    reached = [o for o in outcomes if o.steps is not None]
    fixed = {batch: cell.reached for batch, cell in by_batch.items() if cell.reached}
    if not reached or not fixed:
        return {"fixed": "", "difference": "", "verdict": "none"}

    def best_fixed(examples: float, draw: dict[int, list[int]]) -> tuple[int, float] | None:
        means = {batch: float(np.mean(steps)) for batch, steps in draw.items()}
        qualifying = [(steps, batch) for batch, steps in means.items() if steps * batch <= examples]
        return (min(qualifying)[1], min(qualifying)[0]) if qualifying else None

    steps, examples = float(np.mean([o.steps for o in reached])), float(np.mean([o.examples for o in reached]))
    best = best_fixed(examples, fixed)
    if best is None:
        cheapest = min(fixed, key=lambda b: float(np.mean(fixed[b])) * b)
        return {"fixed": f"none (batch {cheapest} uses the fewest: {np.mean(fixed[cheapest]) * cheapest:.0f})",
                "difference": "", "verdict": "fewest examples"}
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(resamples):
        draw = {batch: list(rng.choice(values, size=len(values))) for batch, values in fixed.items()}
        picked = rng.choice(len(reached), size=len(reached))
        s = float(np.mean([reached[i].steps for i in picked]))
        e = float(np.mean([reached[i].examples for i in picked]))
        candidate = best_fixed(e, draw)
        if candidate is not None:
            differences.append(s - candidate[1])
    low, high = np.percentile(differences, [2.5, 97.5]) if differences else (math.nan, math.nan)
    if len(reached) < 2:  # one seed of the ramp: no interval, so no verdict
        verdict, interval = "one seed", ""
    else:
        verdict = "fewer" if high < 0 else "more" if low > 0 else "undecided"
        interval = f" ({low:+.0f} to {high:+.0f})"
    return {"fixed": f"{best[0]}, {best[1]:.0f}", "difference": f"{steps - best[1]:+.0f}{interval}",
            "verdict": verdict, "best_batch": best[0], "low": low, "high": high}


def _spread(values: list[int], runs: int) -> str:
    text = f"{statistics.mean(values):.0f}"
    if len(values) > 1:
        text += f" ({min(values)}–{max(values)})"
    if len(values) < runs:
        text += f", {runs - len(values)} not reached"
    return text


def _findings(comparisons: dict[str, dict[str, dict]]) -> str:
    words = {"fewer": "takes fewer steps than", "more": "takes more steps than", "undecided": "takes as many steps, "
             "within the interval, as", "one seed": "is compared on one seed only (no interval, no claim) with",
             "fewest examples": "uses fewer examples than every fixed batch, so none is compared with it on steps",
             "none": "did not reach the target, or has nothing to be compared with"}
    parts = []
    for name, by_policy in comparisons.items():
        said = []
        for policy, result in by_policy.items():
            target = f" batch {result['best_batch']}" if "best_batch" in result else ""
            said.append(f"the {policy} ramp {words[result['verdict']]}{target}"
                        + (f" ({result['difference']} steps)" if result.get("difference") else ""))
        parts.append(f"{name}: " + "; ".join(said) + ".")
    verdicts = [result["verdict"] for by_policy in comparisons.values() for result in by_policy.values()]
    wins = [f"{name} {policy}" for name, by_policy in comparisons.items() for policy, result in by_policy.items()
            if result["verdict"] == "fewer"]
    if wins:
        summary = f"**Ramps that beat every fixed batch of no more examples on steps: {', '.join(wins)}.**"
    elif "one seed" in verdicts:
        summary = "One seed gives no interval: run --full (3 seeds) for a verdict."
    else:
        summary = "**No ramp reached the target in fewer steps than the best fixed batch that uses no more examples.**"
    return " ".join(parts) + " " + summary


def _plot(cells: dict[str, dict[int, Cell]], ramps: dict[str, dict[str, list[RampOutcome]]],
          settings: critical_batch.Settings, path: Path) -> Path:
    figure, axes = new_figure(columns=len(ramps), width=4.2, height=4.2)
    markers = {"measured c=1": ("o", "C3"), "measured c=4": ("^", "C1"), "scheduled": ("s", "C2")}
    for axis, name in zip(axes, ramps):
        batches = [b for b, cell in cells[name].items() if cell.reached]
        steps = [statistics.mean(cells[name][b].reached) for b in batches]
        axis.plot([s * b for s, b in zip(steps, batches)], steps, color="0.3", marker="o", markersize=4,
                  label="fixed batches")
        for s, b in zip(steps, batches):
            axis.annotate(str(b), (s * b, s), textcoords="offset points", xytext=(4, 3), fontsize="x-small")
        for policy, (marker, color) in markers.items():
            reached = [o for o in ramps[name][policy] if o.steps is not None]
            if reached:
                axis.scatter([o.examples for o in reached], [o.steps for o in reached], marker=marker, color=color,
                             zorder=3, label=f"{policy} ramp")
        axis.set(xscale="log", yscale="log", xlabel="examples to target", title=name)
        axis.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(f"optimizer steps to {settings.target:.1%}")
    axes[0].legend(fontsize="small")
    return save(figure, path)
