"""The MLM comparison at five times its budget (120,320 sequences), with the gradient noise scale of each run.

    .venv/bin/python -m torchlamb.experiments.mlm_long --out report-mlm-long      # ~8 min a run on 2 cores

Runs :data:`RUNS` one after another (``--only NAME`` for one; two processes with ``--only`` can share the work),
keeps each result as ``NAME.json`` in ``--out`` (a run whose file exists is not run again), then writes
``mlm_long.png`` (validation loss against sequences and against steps; B_simple, and a ramped run's batch, against
sequences seen) and prints a markdown table. Two runs grow the batch from 64 toward 512 with a measured
:class:`~torchlamb.BatchRamp`; ``lamb-64`` is their LAMB baseline at the ramp's starting lr.

B_simple comes from :class:`~torchlamb.NoiseScale` with the two batch sizes each run already has: the micro-batch
(64 sequences; 32 for the batch-64 run, which accumulates two) against the optimizer's batch. It is McCandlish et
al.'s prediction of the critical batch size at that point of training: a batch well above it spends sequences
that a smaller batch would have turned into more steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .mlm import (
    LARGE_BATCH,
    SEQUENCES,
    SMALL_BATCH,
    SQRT_LR,
    MLMConfig,
    MLMResult,
    comparison_configs,
    mlm_data,
    train_mlm,
    unigram_loss,
)

LAMB_LR = 0.04  # LAMB's best lr at this budget (docs/experiments.md §5)
#: name: (label, the run's settings). The batch-64 baseline accumulates two micro-batches of 32 (the same mean
#: gradient as one of 64) so that its noise scale can be measured.
RUNS: dict[str, tuple[str, dict]] = {
    "adamw-64": (f"AdamW, batch {SMALL_BATCH}, lr 0.001",
                 dict(optimizer="adamw", lr=1e-3, batch_size=SMALL_BATCH, micro_batch=SMALL_BATCH // 2)),
    "adamw-512": (f"AdamW, batch {LARGE_BATCH}, lr {SQRT_LR:.2g}",
                  dict(optimizer="adamw", lr=SQRT_LR, batch_size=LARGE_BATCH)),
    "lamb-512": (f"LAMB, batch {LARGE_BATCH}, lr {LAMB_LR:g}",
                 dict(optimizer="lamb", lr=LAMB_LR, batch_size=LARGE_BATCH)),
    "lamb-512-lr0.08": (f"LAMB, batch {LARGE_BATCH}, lr 0.08", dict(optimizer="lamb", lr=0.08, batch_size=LARGE_BATCH)),
    "lamb-512-embedding-exempt": (
        f"LAMB, batch {LARGE_BATCH}, lr {LAMB_LR:g}; embedding exempt (Adam, lr {SQRT_LR:.2g})",
        dict(optimizer="lamb", lr=LAMB_LR, batch_size=LARGE_BATCH, adapt_embedding=False, embedding_lr=SQRT_LR)),
    # LAMB's fixed batch-64 baseline for its ramp: the ramp's starting lr, 0.04 / √8 (the sqrt rule from batch 512).
    "lamb-64": (f"LAMB, batch {SMALL_BATCH}, lr {LAMB_LR * (SMALL_BATCH / LARGE_BATCH) ** 0.5:.2g}",
                dict(optimizer="lamb", lr=LAMB_LR * (SMALL_BATCH / LARGE_BATCH) ** 0.5, batch_size=SMALL_BATCH,
                     micro_batch=SMALL_BATCH // 2)),
    # Measured BatchRamps from 64 (two micro-batches of 32) toward 512, lr × √(B/64): at 512 the lrs of the fixed
    # batch-512 runs above (AdamW 0.001·√8 = 0.0028, LAMB 0.04).
    "adamw-ramp": (f"AdamW, batch {SMALL_BATCH} → ≤ {LARGE_BATCH} (measured ramp), lr 0.001·√(B/64)",
                   dict(optimizer="adamw", lr=1e-3, batch_size=SMALL_BATCH, micro_batch=SMALL_BATCH // 2,
                        ramp_to=LARGE_BATCH)),
    "lamb-ramp": (f"LAMB, batch {SMALL_BATCH} → ≤ {LARGE_BATCH} (measured ramp), lr {LAMB_LR:g}·√(B/512)",
                  dict(optimizer="lamb", lr=LAMB_LR * (SMALL_BATCH / LARGE_BATCH) ** 0.5, batch_size=SMALL_BATCH,
                       micro_batch=SMALL_BATCH // 2, ramp_to=LARGE_BATCH)),
}


def config(name: str, size: str = "full") -> MLMConfig:
    """The run ``name`` at a budget of :data:`~torchlamb.experiments.mlm.SEQUENCES` [``size``] ("tiny": the tests'
    shape too)."""
    base = comparison_configs(size)[f"AdamW, batch {SMALL_BATCH}"][0]  # the budget and the model's shape
    settings = dict(RUNS[name][1])
    if size == "tiny":
        settings["micro_batch"] = min(settings.get("micro_batch", 32), 32)
    return dataclasses.replace(base, evals=base.evals if size == "tiny" else 20, **settings)


def save_result(result: MLMResult, path: Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(result)), encoding="utf-8")


def load_result(path: Path) -> MLMResult:
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["config"] = MLMConfig(**raw["config"])
    raw["noise_scale"] = [tuple(point) for point in raw["noise_scale"]]
    return MLMResult(**raw)


def mean_b_simple(result: MLMResult, first: int, last: int) -> float:
    """B_simple averaged over the recorded points of steps in [first, last] (NaN if none)."""
    values = [value for step, value in result.noise_scale if first <= step <= last]
    return sum(values) / len(values) if values else float("nan")


def plot(results: dict[str, MLMResult], plateau: float, path: Path) -> Path:
    """Validation loss and B_simple of every run against sequences seen; a ramped run's batch dashed beside its
    B_simple."""
    from .report import new_figure, save

    figure, (by_sequences, by_steps, noise) = new_figure(columns=3, width=5.5)
    for name, result in results.items():
        label = RUNS[name][0]
        line, = by_sequences.plot(result.sequences_seen, result.validation_loss, marker="o", markersize=3,
                                  label=label)
        by_steps.plot(result.steps, result.validation_loss, marker="o", markersize=3, color=line.get_color())
        points = [(result.sequences_at(step), value) for step, value in result.noise_scale if value > 0]
        noise.plot([s for s, _ in points], [v for _, v in points], color=line.get_color(), label=label)
        if result.batch_changes:
            changes = result.batch_changes
            noise.step([max(row["examples"], 1) for row in changes] + [result.sequences_seen[-1]],
                       [row["batch"] for row in changes] + [changes[-1]["batch"]], where="post",
                       color=line.get_color(), linestyle="--", linewidth=1.5)
    for axis in (by_sequences, by_steps):
        axis.axhline(plateau, color="grey", linestyle="--", linewidth=1,
                     label=f"word frequencies only ({plateau:.2f})")
    by_sequences.set(xlabel="sequences seen", ylabel="validation MLM loss (nats)",
                     title="Validation loss against sequences")
    by_steps.set(xscale="log", xlabel="optimizer steps (log scale)", title="Against optimizer steps")
    for batch in (SMALL_BATCH, LARGE_BATCH):
        noise.axhline(batch, color="grey", linestyle=":", linewidth=1)
        noise.annotate(f"batch {batch}", (0.01, batch), xycoords=("axes fraction", "data"), fontsize="small")
    noise.set(xlabel="sequences seen", ylabel="B_simple (sequences, log scale)", yscale="log",
              title="B_simple = tr(Σ)/|G|² (EMA); dashed: a ramp's batch")
    by_sequences.legend(fontsize="x-small")
    return save(figure, path)


def table(results: dict[str, MLMResult]) -> str:
    """Markdown: steps, validation loss at 1/5, 1/2 and all of the budget, B_simple over the same thirds."""
    lines = ["| run | steps | validation loss at 1/5 / 1/2 / all of the sequences | B_simple, mean over steps in "
             "the first / middle / last third | minutes |", "|---|---|---|---|---|"]
    for name, result in results.items():
        total = result.steps[-1] if result.steps else 0
        losses = []
        for fraction in (0.2, 0.5, 1.0):  # of the sequences (a ramped run's steps are not proportional to them)
            at = min(range(len(result.steps)),
                     key=lambda i: abs(result.sequences_seen[i] - fraction * result.sequences_seen[-1]))
            losses.append(f"{result.validation_loss[at]:.3f}")
        thirds = [mean_b_simple(result, total * i // 3 + 1, total * (i + 1) // 3) for i in range(3)]
        noise = " / ".join(f"{value:.0f}" for value in thirds) if result.noise_scale else "-"
        lines.append(f"| {RUNS[name][0]} | {total} | {' / '.join(losses)} | {noise} | {result.seconds / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, MLMResult]:
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(prog="python -m torchlamb.experiments.mlm_long", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("report-mlm-long"))
    parser.add_argument("--only", choices=list(RUNS), nargs="+", help="run these (default: all); plot what exists")
    parser.add_argument("--size", choices=list(SEQUENCES), default="full", help="the budget (tests: tiny)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = mlm_data(config(next(iter(RUNS)), args.size).length)
    if args.size == "tiny":
        data = dataclasses.replace(data, validation=data.validation[:128])
    for name in args.only or list(RUNS):
        path = args.out / f"{name}.json"
        if path.exists():
            continue
        run = config(name, args.size)
        with tqdm(total=run.sequences // run.batch_size * run.batch_size, desc=name, unit="seq",
                  unit_scale=True) as bar:
            save_result(train_mlm(run, data, bar), path)
    results = {name: load_result(args.out / f"{name}.json") for name in RUNS if (args.out / f"{name}.json").exists()}
    plot(results, unigram_loss(data), args.out / "mlm_long.png")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
