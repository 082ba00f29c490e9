"""What 8-bit state costs in quality: LAMB with float32 and with 8-bit moments, same runs, 3 seeds each.

    .venv/bin/python benchmarks/state_quality.py          # the table in docs/low-memory-state.md (~15 min, 2 cores)

- MNIST, the batch sweep's LAMB point at batch 4096 (docs/experiments.md §3, full settings: the MLP, 6 epochs,
  lr 0.0679 = the best of its grid there, weight decay 0.01, warmup then linear decay): test accuracy.
- MLM, the comparison's LAMB run (§5: batch 512, lr 0.04, 24,064 sequences): final validation loss; and the same
  budget at batch 64 (lr 0.01), where LAMB learns past word frequencies.

Each seed runs both formats from the same initialisation and data order; the table gives each format's mean and
range and the mean of the per-seed differences (8-bit minus float32).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

from tqdm import tqdm

from torchlamb.experiments import common, mlm

SEEDS = (0, 1, 2)
FORMATS = (None, "8bit")
MNIST = common.RunConfig(optimizer="lamb", lr=0.0679, batch_size=4096, epochs=6, weight_decay=0.01,
                         warmup_fraction=0.1)
MLM = mlm.MLMConfig(optimizer="lamb", lr=0.04, batch_size=512, micro_batch=64, sequences=mlm.SEQUENCES["reduced"])
# The same budget at batch 64 (376 steps, lr 0.01): LAMB leaves the word-frequency plateau there, which batch 512
# does not at either budget, so this run checks 8-bit state on a model that learns.
MLM_SMALL_BATCH = replace(MLM, lr=0.01, batch_size=64)


def row(name: str, unit: str, by_format: dict[str | None, list[float]]) -> str:
    cells = []
    for state_dtype in FORMATS:
        values = by_format[state_dtype]
        cells.append(f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})")
    differences = [b - a for a, b in zip(by_format[None], by_format["8bit"])]
    return f"| {name} | {unit} | {' | '.join(cells)} | {statistics.mean(differences):+.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["mnist", "mlm", "mlm-small-batch"], default=None)
    args = parser.parse_args()
    lines = ["| run | measure | float32 state: mean (range) | 8-bit state: mean (range) | 8-bit − float32 |",
             "|---|---|---|---|---|"]
    if args.only in (None, "mnist"):
        data = common.mnist_data()
        runs = [replace(MNIST, seed=seed, state_dtype=f) for seed in SEEDS for f in FORMATS]
        accuracy: dict[str | None, list[float]] = {f: [] for f in FORMATS}
        with tqdm(total=sum(common.count_steps(c) for c in runs), desc="MNIST, batch 4096", unit="step") as bar:
            for config in runs:
                accuracy[config.state_dtype].append(100 * common.train(config, data, progress=bar).final_test_accuracy)
        lines.append(row("MNIST MLP, LAMB, batch 4096, 6 epochs", "test accuracy, %", accuracy))
    for name, base in (("mlm", MLM), ("mlm-small-batch", MLM_SMALL_BATCH)):
        if args.only not in (None, name):
            continue
        data = mlm.mlm_data(base.length)
        loss: dict[str | None, list[float]] = {f: [] for f in FORMATS}
        runs = [replace(base, seed=seed, state_dtype=f) for seed in SEEDS for f in FORMATS]
        label = f"MLM (King James Bible), LAMB, batch {base.batch_size}"
        with tqdm(total=len(runs) * base.sequences, desc=label, unit="seq", unit_scale=True) as bar:
            for config in runs:
                loss[config.state_dtype].append(mlm.train_mlm(config, data, bar).final_validation_loss)
        lines.append(row(label, "validation loss, nats", loss))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
