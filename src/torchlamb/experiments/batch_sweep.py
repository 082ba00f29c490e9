"""Experiment 3: the paper's thesis at small scale — accuracy against batch size at a fixed epoch budget.

LAMB's claim (You et al. 2019) is that with the trust ratio, a warmup and the sqrt lr rule, growing the batch costs
little accuracy at a fixed number of epochs. Nado et al. (2021) found a *tuned* Adam can match LAMB, so every
optimizer here gets a small lr grid around its sqrt-scaled lr at each batch size; the lr is picked on a held-out
validation split (10k of the training set) and the test accuracy at that lr is reported, mean and range over seeds.

    torchlamb run batch_sweep [--full]
"""

from __future__ import annotations

import statistics
from pathlib import Path

from tqdm.auto import tqdm

from ..schedules import scale_lr
from .common import RunConfig, count_steps, mnist_data, train
from .report import Summary, new_figure, save

# -- configuration ------------------------------------------------------------------------------------------------
BATCH_SIZES = {"reduced": [128, 512, 2048, 8192, 16384], "full": [128, 256, 512, 1024, 2048, 4096, 8192, 16384]}
EPOCHS = {"reduced": 3, "full": 6}
SEEDS = {"reduced": [0], "full": [0, 1, 2]}
BASE_BATCH = 128
# lr at batch 128 (scaled by √(batch/128) for larger batches) and weight decay. The base lrs were centred by hand
# on validation accuracy after 1 epoch at batch 128, so that each grid brackets its optimizer's best lr there.
OPTIMIZERS = {"lamb": dict(lr=1.2e-2, weight_decay=0.01), "adamw": dict(lr=5e-3, weight_decay=0.01),
              "lars": dict(lr=6.0, weight_decay=1e-4)}
# Multipliers of the sqrt-scaled lr. The full grid reaches lower: at large batches the reduced run found AdamW's
# and LARS's best lr at its lower edge.
LR_GRID = {"reduced": [1 / 3, 1.0, 3.0], "full": [1 / 9, 1 / 3, 1.0, 3.0]}
WARMUP_FRACTION = 0.1  # then linear decay to 0


def configs(full: bool) -> list[RunConfig]:
    mode = "full" if full else "reduced"
    return [RunConfig(optimizer=name, lr=scale_lr(options["lr"], BASE_BATCH, batch) * factor, batch_size=batch,
                      epochs=EPOCHS[mode], weight_decay=options["weight_decay"], warmup_fraction=WARMUP_FRACTION,
                      seed=seed)
            for name, options in OPTIMIZERS.items() for batch in BATCH_SIZES[mode]
            for factor in LR_GRID[mode] for seed in SEEDS[mode]]


def run(out: Path, full: bool = False) -> Summary:
    runs = configs(full)
    data = mnist_data()
    with tqdm(total=sum(count_steps(c) for c in runs), desc="batch sweep", unit="step") as bar:
        results = [train(config, data, progress=bar) for config in runs]

    # Per optimizer and batch: the lr with the best mean validation accuracy, and the test accuracy there.
    best: dict[tuple[str, int], tuple[float, list[float]]] = {}
    at_edge: list[str] = []  # where the best lr is the grid's smallest or largest: tuning may be incomplete
    for name in OPTIMIZERS:
        for batch in sorted({c.batch_size for c in runs}):
            by_lr: dict[float, list] = {}
            for result in results:
                c = result.config
                if c.optimizer == name and c.batch_size == batch:
                    by_lr.setdefault(c.lr, []).append(result)
            lr, chosen = max(by_lr.items(), key=lambda item: statistics.mean(r.final_valid_accuracy for r in item[1]))
            best[name, batch] = (lr, [100 * r.final_test_accuracy for r in chosen])
            if lr in (min(by_lr), max(by_lr)):
                at_edge.append(f"{name} at batch {batch} ({'lowest' if lr == min(by_lr) else 'highest'})")

    figure, (axis,) = new_figure(width=7)
    for name in OPTIMIZERS:
        batches = sorted(b for n, b in best if n == name)
        means = [statistics.mean(best[name, b][1]) for b in batches]
        low = [m - min(best[name, b][1]) for m, b in zip(means, batches)]
        high = [max(best[name, b][1]) - m for m, b in zip(means, batches)]
        axis.errorbar(batches, means, yerr=[low, high], marker="o", capsize=3, label=name)
    axis.set(xscale="log", xlabel="batch size", ylabel="test accuracy (%) at the best lr",
             title=f"MNIST, {runs[0].epochs:g} epochs at every batch size")
    axis.set_xticks(sorted({b for _, b in best}), labels=[str(b) for b in sorted({b for _, b in best})])
    axis.legend()
    figure_path = save(figure, out / "batch_sweep.png")

    batches = sorted({b for _, b in best})
    headers = ["batch"] + [f"{name} test acc. (%) [lr]" for name in OPTIMIZERS]
    rows = []
    for batch in batches:
        row: list[object] = [batch]
        for name in OPTIMIZERS:
            lr, accuracies = best[name, batch]
            spread = f" ({min(accuracies):.2f}–{max(accuracies):.2f})" if len(accuracies) > 1 else ""
            row.append(f"{statistics.mean(accuracies):.2f}{spread} [{lr:.3g}]")
        rows.append(row)
    mode = "full" if full else "reduced"
    text = (f"{EPOCHS[mode]} epochs at every batch size, {len(SEEDS[mode])} seed(s), warmup {WARMUP_FRACTION:.0%} "
            f"then linear decay, lr = base·√(batch/{BASE_BATCH}) × "
            f"{{{', '.join(f'{f:.3g}' for f in LR_GRID[mode])}}}, the best multiplier chosen on "
            "validation accuracy; the table shows mean test accuracy (range over seeds) [chosen lr]. Biases are "
            "exempt from decay and the ratio (param_groups).\n\n**What it shows:** "
            + _findings(best, batches) + (" The best lr lay at the edge of the grid for " + ", ".join(at_edge)
                                          + ": a wider grid might do better there." if at_edge else ""))
    return Summary("3. Accuracy against batch size at a fixed epoch budget", text, headers, rows,
                   [(figure_path, "Test accuracy at each optimizer's best lr against batch size")])


def _findings(best: dict[tuple[str, int], tuple[float, list[float]]], batches: list[int]) -> str:
    """Accuracy lost from the smallest to the largest batch per optimizer, and the ranking at the largest."""
    small, large = batches[0], batches[-1]
    mean = {key: statistics.mean(accuracies) for key, (_, accuracies) in best.items()}
    drops = ", ".join(f"{name} {mean[name, small]:.2f}% → {mean[name, large]:.2f}%" for name in OPTIMIZERS)
    ranking = sorted(OPTIMIZERS, key=lambda name: -mean[name, large])
    leader, runner_up = ranking[0], ranking[1]
    return (f"from batch {small} to {large}: {drops}. At batch {large} {leader} leads {runner_up} by "
            f"{mean[leader, large] - mean[runner_up, large]:.2f} points.")
