"""BERT-style masked-language modelling at large batch, small enough for a CPU: the comparison.

The data, the model and one training run (:func:`train_mlm`) are in :mod:`torchlamb.experiments.mlm_model`; their
names are importable from here too.

``torchlamb run mlm [--full]`` (:func:`run`) compares, at a fixed budget of sequences, small-batch AdamW with
large-batch LAMB, AdamW and LARS over lr grids, and writes report/mlm.md with its figures; tests/test_mlm.py runs the
comparison at a tiny size. ``python -m torchlamb.experiments.mlm --optimizer lamb --lr 0.04 --batch-size 512
--sequences 120320`` trains one configuration (any :class:`MLMConfig` field is a flag) and prints its validation loss.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torchlamb

from .mlm_model import (  # noqa: F401 - the building blocks are importable from here too
    CLS,
    MASK,
    PAD,
    SEP,
    UNK,
    MaskedLM,
    MLMConfig,
    MLMData,
    MLMResult,
    make_optimizer,
    mask_tokens,
    mlm_data,
    mlm_loss,
    pack,
    train_mlm,
    unigram_loss,
    validation_loss,
    warmup_steps,
)

if TYPE_CHECKING:
    from .report import Summary


# -- the comparison ------------------------------------------------------------------------------------------------
# At a fixed budget of sequences: small-batch AdamW (the baseline) against large-batch LAMB, AdamW and LARS, each
# large-batch optimizer over a small lr grid on seed 0; the best (lowest final validation loss) of each is then run
# again on the other seeds. Sizes from throughput measured on 2 CPU cores: width 128, 2 layers, length 64 train at
# ~220 sequences/s.
SMALL_BATCH, LARGE_BATCH = 64, 512
BASELINE_LR = 1e-3
SEEDS = (0, 1)
TWO_PHASE = 0.9  # BERT's share of steps at the short length (128 of 512 tokens)
# Large-batch AdamW: the sqrt rule from the baseline (1e-3 * sqrt(8) = 2.8e-3), times 1/2, 1 and 2. LAMB and LARS
# have no small-batch run to scale from: their grids bracket the optimum earlier runs found. LAMB's first two grids
# (5e-3..2e-2, then 1e-2..4e-2) both ended at their top edge; a third, 2e-2..0.16, found 0.04 with 0.08 and 0.16
# within 0.01 nats of it (docs/experiments.md), so 0.16 was dropped to keep the run under 30 minutes.
SQRT_LR = torchlamb.scale_lr(BASELINE_LR, SMALL_BATCH, LARGE_BATCH, rule="sqrt")
GRIDS = {"lamb": [2e-2, 4e-2, 8e-2], "adamw": [SQRT_LR / 2, SQRT_LR, SQRT_LR * 2], "lars": [0.5, 1.0, 2.0]}
# Multiples of LARGE_BATCH, so that every run sees exactly this many sequences.
SEQUENCES = {"tiny": 1_024, "reduced": 24_064, "full": 120_320}


def comparison_configs(size: str) -> dict[str, list[MLMConfig]]:
    """{label: configs of its lr grid, on seed 0}; the baseline's grid is its one lr."""
    sequences = SEQUENCES[size]
    shape = dict(width=32, layers=1, heads=2, length=32, evals=2) if size == "tiny" else {}
    micro = 32 if size == "tiny" else 64
    configs = {f"AdamW, batch {SMALL_BATCH}": [MLMConfig(optimizer="adamw", lr=BASELINE_LR, batch_size=SMALL_BATCH,
                                                         micro_batch=min(micro, SMALL_BATCH), sequences=sequences,
                                                         **shape)]}
    for name, grid in GRIDS.items():
        label = {"lamb": "LAMB", "adamw": "AdamW", "lars": "LARS"}[name] + f", batch {LARGE_BATCH}"
        configs[label] = [MLMConfig(optimizer=name, lr=lr, batch_size=LARGE_BATCH, micro_batch=micro,
                                    sequences=sequences, **shape) for lr in grid]
    return configs


def compare(size: str, data: MLMData | None = None, progress: Any = None,
            seeds: tuple[int, ...] = SEEDS) -> tuple[dict[str, list[MLMResult]], dict[str, list[MLMResult]]]:
    """Train every configuration of :func:`comparison_configs` on ``seeds[0]``, then each label's best lr again on
    the other ``seeds``, then LAMB's best lr with a two-phase sequence length on every seed. Returns ({label: results
    over its lr grid}, {label: the best lr's results, one per seed}). The first seed chose the lr, so its result is
    biased low (most for the largest grid); the others are not.

    ``data`` must hold the training text at half length too (:func:`mlm_data`'s ``short_length``)."""
    configs = comparison_configs(size)
    if data is None:
        length = configs[next(iter(configs))][0].length
        data = mlm_data(length, length // 2)
    grids = {label: [train_mlm(replace(config, seed=seeds[0]), data, progress) for config in grid]
             for label, grid in configs.items()}
    repeats = {}
    for label, grid in grids.items():
        chosen = best(grid)
        repeats[label] = [chosen] + [train_mlm(replace(chosen.config, seed=seed), data, progress)
                                     for seed in seeds[1:]]
    # BERT's two-phase sequence length at LAMB's chosen lr: 90% of the steps on half-length rows, then full length.
    lamb = repeats[f"LAMB, batch {LARGE_BATCH}"][0].config
    label = f"LAMB, batch {LARGE_BATCH}, two-phase ({lamb.length // 2} then {lamb.length} tokens)"
    repeats[label] = [train_mlm(replace(lamb, short_length=lamb.length // 2, short_fraction=TWO_PHASE, seed=seed),
                                data, progress) for seed in seeds]
    grids[label] = repeats[label][:1]
    return grids, repeats


def mean_curve(results: list[MLMResult]) -> list[float]:
    """The validation loss averaged over runs (seeds) at each evaluation all of them reached."""
    evaluations = min(len(r.validation_loss) for r in results)
    return [sum(r.validation_loss[i] for r in results) / len(results) for i in range(evaluations)]


def best(results: list[MLMResult]) -> MLMResult:
    """The run of an lr grid with the lowest final validation loss (non-finite runs last)."""
    return min(results, key=lambda r: r.final_validation_loss if r.validation_loss and
               math.isfinite(r.final_validation_loss) else math.inf)


def run(out: Path, full: bool = False, size: str | None = None) -> Summary:
    """``torchlamb run mlm [--full]``: the comparison, its figures and its table. ``size`` ("tiny", "reduced",
    "full") overrides ``full`` (the tests use "tiny")."""
    from tqdm.auto import tqdm

    from .report import Summary, new_figure, save

    size = size or ("full" if full else "reduced")
    configs = comparison_configs(size)
    length = configs[next(iter(configs))][0].length
    data = mlm_data(length, length // 2)
    if size == "tiny":  # a slice of the validation rows keeps the evaluations short
        data = replace(data, validation=data.validation[:128])
    # Progress in sequences: every grid point on seed 0, each label's best lr on the other seeds, the two-phase runs.
    total = (sum(len(grid) + len(SEEDS) - 1 for grid in configs.values()) + len(SEEDS)) * SEQUENCES[size]
    with tqdm(total=total, desc="mlm", unit="seq", unit_scale=True) as bar:
        results, repeats = compare(size, data, bar)
    chosen = {label: seeds[0] for label, seeds in repeats.items()}

    figure, axes = new_figure(columns=2, width=5.5)
    for label, seeds in repeats.items():
        first, curve = seeds[0], mean_curve(seeds)
        low = [min(r.validation_loss[i] for r in seeds) for i in range(len(curve))]
        high = [max(r.validation_loss[i] for r in seeds) for i in range(len(curve))]
        name = f"{label} (lr {first.config.lr:g})"
        for ax, x in ((axes[0], first.sequences_seen[:len(curve)]), (axes[1], first.steps[:len(curve)])):
            line, = ax.plot(x, curve, marker="o", label=name)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    plateau = unigram_loss(data)
    for ax in axes:
        ax.axhline(plateau, color="grey", linestyle="--", linewidth=1,
                   label=f"word frequencies only ({plateau:.2f})")
    axes[0].set(xlabel="sequences seen", ylabel="validation MLM loss (nats)", title="Against data")
    axes[1].set(xlabel="optimizer steps", ylabel="validation MLM loss (nats)", title="Against steps", xscale="log")
    axes[0].legend(fontsize="small")
    figures = [(save(figure, out / "mlm_curves.png"),
                f"Validation MLM loss of each optimizer at its best lr, mean of {len(SEEDS)} seeds (band: their "
                "range), against sequences seen and against steps")]

    figure, axes = new_figure(columns=1, width=6.0)
    lamb = chosen[next(label for label in chosen if label.startswith("LAMB"))]
    for evaluation, ratios in zip(lamb.steps, lamb.trust_ratios):
        axes[0].plot(sorted(ratios), [i / max(1, len(ratios) - 1) for i in range(len(ratios))],
                     label=f"step {evaluation}")
    axes[0].set(xlabel="trust ratio", ylabel="fraction of tensors below", xscale="log",
                title=f"LAMB (lr {lamb.config.lr:g}): distribution of the per-tensor trust ratio")
    axes[0].legend(fontsize="small")
    figures.append((save(figure, out / "mlm_trust_ratios.png"),
                    "LAMB's per-tensor trust ratios (adapted tensors) at each evaluation"))

    # The gradient noise scale of the accumulated (large-batch) runs: micro-batch against optimizer batch.
    figure, axes = new_figure(columns=1, width=6.0)
    for label, run in chosen.items():
        points = [(step * run.config.batch_size, value) for step, value in run.noise_scale if value > 0]
        if points:
            axes[0].plot([s for s, _ in points], [v for _, v in points], label=f"{label} (lr {run.config.lr:g})")
    for batch in (SMALL_BATCH, LARGE_BATCH):
        axes[0].axhline(batch, color="grey", linestyle=":", linewidth=1)
    axes[0].set(xlabel="sequences seen", ylabel="B_simple (sequences, log scale)", yscale="log",
                title="Gradient noise scale B_simple = tr(Σ)/|G|² (dotted: batches 64 and 512)")
    axes[0].legend(fontsize="small")
    figures.append((save(figure, out / "mlm_noise_scale.png"),
                    "The gradient noise scale of the large-batch runs (seed 0, best lr): a batch well above it spends "
                    "data a smaller batch would turn into more steps"))

    rows = []
    for label, grid in results.items():
        seeds = repeats[label]
        per_seed = ", ".join(f"{r.final_validation_loss:.3f}" if r.validation_loss else "diverged" for r in seeds)
        mean = mean_curve(seeds)
        complete = mean and all(len(r.validation_loss) == len(seeds[0].validation_loss) for r in seeds)
        grid_losses = ", ".join(f"{r.config.lr:g}: {r.final_validation_loss:.3f}" if r.validation_loss else
                                f"{r.config.lr:g}: diverged" for r in grid)
        minutes = sum(r.seconds for r in seeds) / len(seeds) / 60
        rows.append([label, f"{seeds[0].config.lr:g}", seeds[0].steps[-1] if seeds[0].steps else 0, per_seed,
                     f"{mean[-1]:.3f}" if complete else "-", f"{minutes:.2f}", grid_losses])
    baseline = chosen[next(iter(chosen))]
    micro = lamb.config.micro_batch
    warmup = [warmup_steps(c) for c in (baseline.config, lamb.config)]
    text = (f"A {baseline.config.layers}-layer encoder (width {baseline.config.width}, {baseline.config.heads} heads, "
            f"sequences of {baseline.config.length} WordPiece tokens) trained by masked-language modelling on the King "
            f"James Bible, {SEQUENCES[size]:,} sequences for every run: AdamW at batch {SMALL_BATCH} against LAMB, "
            f"AdamW and LARS at batch {LARGE_BATCH} (gradient accumulation of {LARGE_BATCH // micro} micro-batches), "
            f"each large-batch optimizer over an lr grid on seed {SEEDS[0]}, the best (lowest final validation loss) "
            f"run again on seeds {', '.join(map(str, SEEDS[1:]))}; LAMB's best lr also with BERT's two-phase sequence "
            f"length ({TWO_PHASE:.0%} of the steps on half-length sequences). Large-batch AdamW's grid is the sqrt "
            f"rule's lr ({SQRT_LR:.2g}) times 1/2, 1 and 2. Seed {SEEDS[0]} chose each lr, so its loss is biased low; "
            f"the other seeds' are not. Warmup over {warmup[0]} (batch {SMALL_BATCH}) and {warmup[1]} (batch "
            f"{LARGE_BATCH}) steps, then linear decay to 0 (one schedule over both phases); gradients clipped at "
            "global norm 1 for every optimizer (eps 1e-6 for LAMB and AdamW); weight decay 0.01 except on biases, "
            "LayerNorms and the position table. Validation: every 20th verse, full length, with a fixed masking. "
            f"Predicting each masked token by its training frequency alone scores {plateau:.3f} nats (the dashed "
            "line): runs above it have learnt no more than word frequencies.")
    headers = ["run", "best lr", "optimizer steps", "final loss per seed", "mean", "minutes per run",
               f"seed {SEEDS[0]}: final loss per lr"]
    return Summary("MLM pre-training at large batch (King James Bible)", text, headers, rows, figures)


def _flag(text: str) -> bool:
    """A boolean option's value: true/false (also 1/0, yes/no)."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise ValueError(f"expected true or false, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> list[MLMResult]:
    """One configuration from the command line: every :class:`MLMConfig` field is a flag (``--batch-size 512``);
    ``--seeds 0 1`` trains one run per seed. Prints the validation loss at each evaluation."""
    import argparse
    import dataclasses

    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(prog="python -m torchlamb.experiments.mlm", description=main.__doc__)
    for option in dataclasses.fields(MLMConfig):
        if option.name != "seed":
            default = option.default
            kind = {"short_length": int, "state_dtype": str, "embedding_lr": float}.get(option.name, type(default))
            kind = _flag if kind is bool else kind
            parser.add_argument("--" + option.name.replace("_", "-"), type=kind, default=default)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = vars(parser.parse_args(argv))
    seeds = args.pop("seeds")
    config = MLMConfig(**args)
    data = mlm_data(config.length, config.short_length)
    print(f"word frequencies only: {unigram_loss(data):.3f} nats")
    results = []
    total = max(1, config.sequences // config.batch_size) * config.batch_size
    for seed in seeds:
        with tqdm(total=total, desc=f"seed {seed}", unit="seq", unit_scale=True) as bar:
            result = train_mlm(replace(config, seed=seed), data, bar)
        for steps, seen, loss in zip(result.steps, result.sequences_seen, result.validation_loss):
            print(f"seed {seed}  step {steps:5d}  sequences {seen:7d}  validation loss {loss:.3f}")
        print(f"seed {seed}: final validation loss {result.final_validation_loss:.3f} in {result.seconds / 60:.1f} min")
        results.append(result)
    return results


if __name__ == "__main__":
    main()

