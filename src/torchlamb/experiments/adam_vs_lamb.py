"""Experiment 1 (Ben Mann, 2019): Adam vs LAMB on MNIST, lr 0.01, betas (0.9, 0.99), with trust-ratio telemetry.

Ben Mann's post "An intuitive understanding of the LAMB optimizer" (2019) saw the two train "pretty similarly",
LAMB generalising a little better, and — logging ‖θ‖ (r1), ‖u‖ (r2) and r = r1/r2 for every layer, for Adam too,
where r is computed but not used — r starting well below 1, which makes a natural warmup, then growing for layers
with large weights and stable gradients.

    torchlamb run adam_vs_lamb [--full]
"""

from __future__ import annotations

import math
from pathlib import Path

from tqdm.auto import tqdm

from .common import RunConfig, count_steps, mnist_data, train
from .report import Summary, new_figure, save

# -- configuration ------------------------------------------------------------------------------------------------
LR = 0.01
BETAS = (0.9, 0.99)
BATCH_SIZE = 1024
EPOCHS = {"reduced": 4, "full": 20}
MONITOR_EVERY = 5
OPTIMIZERS = ("adam", "lamb")


def run(out: Path, full: bool = False) -> Summary:
    epochs = EPOCHS["full" if full else "reduced"]
    # As in Ben Mann's post, no weight decay and the ratio on every tensor: the two differ only in r.
    configs = [RunConfig(optimizer=name, lr=LR, betas=BETAS, batch_size=BATCH_SIZE, epochs=epochs,
                         exempt_norms=False, warmup_fraction=0.05, end_factor=1.0, monitor_every=MONITOR_EVERY)
               for name in OPTIMIZERS]
    data = mnist_data()
    with tqdm(total=sum(count_steps(c) for c in configs), desc="adam vs lamb", unit="step") as bar:
        results = [train(config, data, progress=bar, evals_per_epoch=2) for config in configs]

    figure, (loss_axis, accuracy_axis) = new_figure(columns=2)
    for result in results:
        loss_axis.plot(result.steps, result.train_loss, label=result.config.optimizer)
        accuracy_axis.plot(result.epochs, [100 * a for a in result.test_accuracy], label=result.config.optimizer)
    loss_axis.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="Training loss")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    loss_axis.legend()
    accuracy_axis.legend()
    figures = [(save(figure, out / "adam_vs_lamb_curves.png"),
                f"Adam vs LAMB, lr {LR}, betas {BETAS}, batch {BATCH_SIZE}: training loss and test accuracy")]

    rows = []
    for result in results:
        name, monitor = result.config.optimizer, result.monitor
        # The warmup's first step has lr 0, where Adam's implied ratio is undefined (NaN): use finite records.
        records = [r for r in monitor.records if math.isfinite(r["trust_ratio"])]
        ratios = [r["trust_ratio"] for r in records]
        first = [r["trust_ratio"] for r in records if r["step"] == records[0]["step"]]
        last = [r["trust_ratio"] for r in records if r["step"] == records[-1]["step"]]
        monitor.to_csv(out / f"adam_vs_lamb_{name}_telemetry.csv")
        figures.append((monitor.plot_histograms(out / f"adam_vs_lamb_{name}_histograms.png",
                                                title=f"{name}: trust ratio ‖θ‖/‖u‖ across tensors, over time"),
                        f"{name}: histogram of the per-tensor trust ratio at each recorded step (first at the top)"))
        rows.append([name, f"{100 * result.final_test_accuracy:.2f}", f"{result.train_loss[-1]:.4f}",
                     f"{min(first):.3g} – {max(first):.3g}", f"{min(last):.3g} – {max(last):.3g}",
                     f"{min(ratios):.3g} – {max(ratios):.3g}", f"{result.seconds:.1f}"])
    adam, lamb = results
    first_lamb = [r["trust_ratio"] for r in lamb.monitor.records if r["step"] == 1]
    text = (f"{epochs} epochs at batch {BATCH_SIZE}, lr {LR} after a 5% warmup, no weight decay, the ratio on every "
            "tensor (as in Ben Mann's post on LAMB, 2019). For Adam the ratio is what LAMB would have used for Adam's "
            "actual update (TrustMonitor computes it from the step taken); only LAMB applies it.\n\n"
            f"**What it shows:** final test accuracy {100 * adam.final_test_accuracy:.2f}% for Adam and "
            f"{100 * lamb.final_test_accuracy:.2f}% for LAMB (one seed: a difference of a few tenths may be noise). "
            f"LAMB's ratio starts at {max(first_lamb):.2g} or below for every tensor"
            + (" — well below 1, the natural warmup Ben Mann's post describes" if max(first_lamb) < 0.5 else "")
            + ", and grows as the weights grow.")
    headers = ["optimizer", "test accuracy (%)", "final train loss", "ratio at the first record (min – max)",
               "ratio at the last record", "ratio over all records", "seconds"]
    return Summary("1. Adam vs LAMB (Ben Mann, 2019)", text, headers, rows, figures)
