"""Experiment 2 (seed 002): LAMB at lr 0.01 and 0.1, and at 0.1 with weight decay 0.01.

Seed 002: at lr 0.1 LAMB "converges almost instantly during the warmup, but then a few layer weights start to
explode" and training diverges; weight decay 0.01 keeps it stable, with the trust ratio held below 1, where at
lr 0.01 it rose as high as 4.5.

    torchlamb run lamb_lr [--full]
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from .common import RunConfig, count_steps, mnist_data, train
from .report import Summary, new_figure, save

# -- configuration ------------------------------------------------------------------------------------------------
RUNS = {"lr 0.01": dict(lr=0.01, weight_decay=0.0), "lr 0.1": dict(lr=0.1, weight_decay=0.0),
        "lr 0.1, wd 0.01": dict(lr=0.1, weight_decay=0.01)}
BETAS = (0.9, 0.99)
BATCH_SIZE = 1024
EPOCHS = {"reduced": 6, "full": 30}
MONITOR_EVERY = 5


def run(out: Path, full: bool = False) -> Summary:
    epochs = EPOCHS["full" if full else "reduced"]
    # Seed 002's setting: decay and the ratio on every tensor, a warmup, then a constant lr.
    configs = {label: RunConfig(optimizer="lamb", betas=BETAS, batch_size=BATCH_SIZE, epochs=epochs,
                                exempt_norms=False, warmup_fraction=0.05, end_factor=1.0,
                                monitor_every=MONITOR_EVERY, **options)
               for label, options in RUNS.items()}
    data = mnist_data()
    with tqdm(total=sum(count_steps(c) for c in configs.values()), desc="lamb lr", unit="step") as bar:
        results = {label: train(config, data, progress=bar, evals_per_epoch=2) for label, config in configs.items()}

    figure, axes = new_figure(columns=len(results) + 1, width=4.5)
    for label, result in results.items():
        axes[0].plot(result.epochs, [100 * a for a in result.test_accuracy], label=label)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    axes[0].legend()
    for axis, (label, result) in zip(axes[1:], results.items()):
        norms = defaultdict(list)
        for record in result.monitor.records:
            norms[record["name"]].append((record["step"], record["weight_norm"]))
        for name, points in norms.items():
            axis.plot(*zip(*points), label=name)
        axis.set(xlabel="optimizer step", ylabel="‖θ‖", yscale="log", title=f"{label}: weight norm per tensor")
    axes[-1].legend(fontsize="small")
    figures = [(save(figure, out / "lamb_lr_curves.png"),
                "LAMB at lr 0.01, 0.1, and 0.1 with weight decay 0.01: test accuracy and each tensor's ‖θ‖")]

    rows = []
    for label, result in results.items():
        slug = label.replace(" ", "").replace(",", "_").replace(".", "p")
        records = result.monitor.records
        figures.append((result.monitor.plot_histograms(out / f"lamb_lr_{slug}_histograms.png",
                                                       title=f"LAMB {label}: trust ratio across tensors, over time"),
                        f"LAMB {label}: histogram of the per-tensor trust ratio at each recorded step"))
        rows.append([label, f"{100 * max(result.test_accuracy):.2f}", f"{100 * result.final_test_accuracy:.2f}",
                     f"{result.train_loss[-1]:.3g}", f"{max(r['weight_norm'] for r in records):.3g}",
                     f"{max(r['trust_ratio'] for r in records):.3g}"])

    def verdict(result) -> str:
        best, final = max(result.test_accuracy), result.final_test_accuracy
        if result.diverged:
            return f"diverged: {result.divergence}"
        if final < best - 0.2:
            return f"peaked at {100 * best:.1f}% and then collapsed to {100 * final:.1f}%"
        return f"trained stably to {100 * final:.1f}%"

    text = (f"{epochs} epochs at batch {BATCH_SIZE}, betas {BETAS}, a 5% warmup then a constant lr, decay and the "
            "ratio on every tensor, as in seed 002.\n\n**What it shows:** "
            + "; ".join(f"{label} {verdict(result)}" for label, result in results.items()) + ". "
            "Seed 002 reports that lr 0.1 diverges after a fast start and that weight decay 0.01 keeps it stable; "
            "compare the rows above with that claim.")
    headers = ["run", "best test accuracy (%)", "final test accuracy (%)", "final train loss", "largest ‖θ‖",
               "largest trust ratio"]
    return Summary("2. LAMB: lr 0.01 vs 0.1, and weight decay (seed 002)", text, headers, rows, figures)
