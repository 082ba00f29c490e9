"""Experiment 2 (Ben Mann, 2019): LAMB at lr 0.01 and 0.1, and at 0.1 with weight decay 0.01.

Ben Mann's post "An intuitive understanding of the LAMB optimizer" (2019): at lr 0.1 LAMB "converges almost
instantly during the warmup, but then a few layer weights start to explode" and training diverges; weight decay 0.01
keeps it stable ("Training didn't diverge!"), with the trust ratio held below 1, where at lr 0.01 it rose as high as
4.5. The same three runs are made twice: with the experiments' MLP (batch 1024, a warmup), and as the post's author
ran them — the public code his experiments came from trained the PyTorch-examples ConvNet at batch 64 with no lr
schedule, and a LAMB without bias correction or any clamp.

    torchlamb run lamb_lr [--full]
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from .common import RunConfig, RunResult, count_steps, mnist_data, train
from .report import Summary, new_figure, save

# -- configuration ------------------------------------------------------------------------------------------------
RUNS = {"lr 0.01": dict(lr=0.01, weight_decay=0.0), "lr 0.1": dict(lr=0.1, weight_decay=0.0),
        "lr 0.1, wd 0.01": dict(lr=0.1, weight_decay=0.01)}
BETAS = (0.9, 0.99)
BATCH_SIZE = 1024
EPOCHS = {"reduced": 6, "full": 30}
MONITOR_EVERY = 5
# As Ben Mann ran his experiments: the ConvNet at batch 64, a constant lr from the first step, no bias correction.
AUTHOR_BATCH_SIZE = 64
AUTHOR_EPOCHS = {"reduced": 0.25, "full": 3}
# A run whose final test accuracy is below this did not learn, whatever its loss did (chance is 10%; a network that
# always answers the most common test digit gets 11.35%).
LEARNED = 0.5


def verdict(result: RunResult) -> str:
    """What a run did, in words that keep "the loss stayed finite" apart from "it learned"."""
    best, final = max(result.test_accuracy), result.final_test_accuracy
    if result.diverged:
        return f"diverged: {result.divergence}"
    if final < LEARNED:
        peak = f", after peaking at {100 * best:.1f}%" if best >= LEARNED else ""
        return (f"kept a finite loss ({result.train_loss[-1]:.3g}) but did not learn: {100 * final:.1f}% final test "
                f"accuracy{peak}")
    if final < best - 0.2:
        return f"peaked at {100 * best:.1f}% and then fell to {100 * final:.1f}%"
    return f"trained stably to {100 * final:.1f}%"


def run(out: Path, full: bool = False) -> Summary:
    mode = "full" if full else "reduced"
    epochs = EPOCHS[mode]
    # The setting of Ben Mann's post: decay and the ratio on every tensor, a warmup, then a constant lr.
    configs = {label: RunConfig(optimizer="lamb", betas=BETAS, batch_size=BATCH_SIZE, epochs=epochs,
                                exempt_norms=False, warmup_fraction=0.05, end_factor=1.0,
                                monitor_every=MONITOR_EVERY, **options)
               for label, options in RUNS.items()}
    author = {f"ConvNet, {label}": RunConfig(optimizer="lamb", betas=BETAS, batch_size=AUTHOR_BATCH_SIZE,
                                             epochs=AUTHOR_EPOCHS[mode], exempt_norms=False, warmup_fraction=0.0,
                                             end_factor=1.0, bias_correction=False, monitor_every=MONITOR_EVERY,
                                             model="convnet", **options)
              for label, options in RUNS.items()}
    data = mnist_data()
    total = sum(count_steps(c) for c in [*configs.values(), *author.values()])
    with tqdm(total=total, desc="lamb lr", unit="step") as bar:
        results = {label: train(config, data, progress=bar, evals_per_epoch=2) for label, config in configs.items()}
        author_results = {label: train(config, data, progress=bar, evals_per_epoch=16)
                          for label, config in author.items()}

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
    figure, (axis,) = new_figure(width=6)
    for label, result in author_results.items():
        axis.plot(result.epochs, [100 * a for a in result.test_accuracy], marker=".", label=label)
    axis.set(xlabel="epoch", ylabel="test accuracy (%)",
             title=f"As Ben Mann ran it: ConvNet, batch {AUTHOR_BATCH_SIZE}, no schedule")
    axis.legend()
    figures.append((save(figure, out / "lamb_lr_convnet.png"), "Ben Mann's own setting: the ConvNet at batch "
                    f"{AUTHOR_BATCH_SIZE}, constant lr, no bias correction: test accuracy"))

    rows = []
    for label, result in {**results, **author_results}.items():
        records = result.monitor.records
        if label in results:  # the histograms of the MLP runs; the ConvNet's rows say the same in numbers
            slug = label.replace(" ", "").replace(",", "_").replace(".", "p")
            title = f"LAMB {label}: trust ratio across tensors, over time"
            figures.append((result.monitor.plot_histograms(out / f"lamb_lr_{slug}_histograms.png", title=title),
                            f"LAMB {label}: histogram of the per-tensor trust ratio at each recorded step"))
        rows.append([label, f"{100 * max(result.test_accuracy):.2f}", f"{100 * result.final_test_accuracy:.2f}",
                     f"{result.train_loss[-1]:.3g}", f"{max(r['weight_norm'] for r in records):.3g}",
                     f"{max(r['trust_ratio'] for r in records):.3g}"])

    text = (f"MLP: {epochs} epochs at batch {BATCH_SIZE}, betas {BETAS}, a 5% warmup then a constant lr, decay and "
            f"the ratio on every tensor, as in Ben Mann's post on LAMB (2019). ConvNet (its author's code): "
            f"{AUTHOR_EPOCHS[mode]:g} epochs at batch {AUTHOR_BATCH_SIZE}, the same betas, a constant lr from the "
            "first step, no bias correction, no clamp.\n\n**What it shows:** "
            + "; ".join(f"{label} {verdict(result)}" for label, result in {**results, **author_results}.items())
            + ". Ben Mann's post reports that lr 0.1 diverges after a fast start and that weight decay 0.01 keeps it "
            "stable (\"Training didn't diverge!\"); a loss that stays finite is not yet a network that learned, so the "
            "verdicts above say which of the two each run did.")
    headers = ["run", "best test accuracy (%)", "final test accuracy (%)", "final train loss", "largest ‖θ‖",
               "largest trust ratio"]
    return Summary("2. LAMB: lr 0.01 vs 0.1, and weight decay (Ben Mann, 2019)", text, headers, rows, figures)
