"""BERT-style masked-language modelling at large batch, small enough for a CPU: the building blocks.

A small encoder (``nn.TransformerEncoderLayer``) learns to fill in masked WordPiece tokens of the King James Bible
(:mod:`torchlamb.data.text`). Large batches come from gradient accumulation (:class:`torchlamb.GradientAccumulation`),
with warmup + polynomial decay. :func:`train_mlm` runs one configuration and records the validation MLM loss against
sequences seen and against optimizer steps.

``torchlamb run mlm [--full]`` (:func:`run`) compares, at a fixed budget of sequences, small-batch AdamW with
large-batch LAMB, AdamW and LARS over lr grids, and writes report/mlm.md with its figures; tests/test_mlm.py runs the
comparison at a tiny size. ``python -m torchlamb.experiments.mlm --optimizer lamb --lr 0.04 --batch-size 512
--sequences 120320`` trains one configuration (any :class:`MLMConfig` field is a flag) and prints its validation loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import torchlamb

from ..data.text import load_kjv, load_tokenizer

if TYPE_CHECKING:
    from .report import Summary

PAD, UNK, CLS, SEP, MASK = range(5)  # the special tokens' ids in the repository's tokenizer


def pack(texts: list[str], tokenizer: Any, length: int) -> torch.Tensor:
    """All texts as one token stream (each followed by [SEP]), cut into rows of ``length`` tokens that each start
    with [CLS]: a LongTensor [rows, length]. The last partial row is dropped."""
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream += encoding.ids + [SEP]
    body = length - 1
    rows = len(stream) // body
    ids = torch.tensor(stream[:rows * body], dtype=torch.long).view(rows, body)
    return torch.cat([torch.full((rows, 1), CLS), ids], dim=1)


def mask_tokens(ids: torch.Tensor, vocab_size: int, generator: torch.Generator,
                rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: ``rate`` of the non-special positions are chosen; of those 80% become [MASK], 10% a random
    token and 10% stay. Returns (inputs, labels), labels -100 where nothing is predicted."""
    chosen = (torch.rand(ids.shape, generator=generator) < rate) & (ids > MASK)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    draw = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(chosen & (draw < 0.8), torch.full_like(ids, MASK), ids)
    random_tokens = torch.randint(MASK + 1, vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_tokens, inputs)
    return inputs, labels


class MaskedLM(nn.Module):
    """Token and position embeddings, pre-norm Transformer encoder layers, and an output layer tied to the token
    embedding (as BERT's)."""

    def __init__(self, vocab_size: int, length: int, width: int = 256, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.embed.weight, std=0.02)  # BERT's: N(0, 1) would start the tied output at huge logits
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True),
            layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, ids: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, length, vocab]; with a boolean ``where`` of ids' shape, only at those positions
        ([selected, vocab]): the output layer over the whole vocabulary is most of the cost, and the loss needs
        only the masked positions."""
        x = self.embed(ids) + self.position[: ids.shape[1]]
        x = self.norm(self.encoder(x))
        if where is not None:
            x = x[where]
        return x @ self.embed.weight.T + self.bias


def mlm_loss(model: MaskedLM, inputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy at the masked positions (labels != -100)."""
    where = labels != -100
    return nn.functional.cross_entropy(model(inputs, where), labels[where], reduction=reduction)


@dataclass
class MLMConfig:
    optimizer: str = "lamb"  # "lamb", "adamw" or "lars"
    lr: float = 2e-3
    batch_size: int = 256  # sequences per optimizer step
    micro_batch: int = 64  # sequences per forward/backward (gradient accumulation makes up the rest)
    sequences: int = 50_000  # training budget: sequences seen
    length: int = 64
    # Two-phase sequence length, as BERT (128 then 512 tokens): the first ``short_fraction`` of the steps train on
    # sequences of ``short_length`` tokens (cheaper: attention and the masked positions shrink), the rest on
    # ``length``. One warmup + decay schedule spans both phases. None: one phase.
    short_length: int | None = None
    short_fraction: float = 0.9
    width: int = 128
    layers: int = 2
    heads: int = 4
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    evals: int = 10  # validation evaluations over the run
    seed: int = 0
    state_dtype: str | None = None  # Lamb's and Lars's state: None (float32) or "8bit"
    # False exempts the tied token embedding (the input and the output layer, most of the parameters) from Lamb's
    # and Lars's trust ratio: it then steps as plain Adam (or momentum SGD) at the group's lr, keeping its decay.
    adapt_embedding: bool = True
    embedding_lr: float | None = None  # the exempt embedding's lr (None: ``lr``); an Adam step wants a smaller one


@dataclass
class MLMResult:
    config: MLMConfig
    sequences_seen: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    trust_ratios: list[list[float]] = field(default_factory=list)  # per evaluation, Lamb/Lars only
    # (step, B_simple in sequences) from :class:`~torchlamb.NoiseScale`, micro-batch against optimizer batch: only
    # when the batch is accumulated from more than one micro-batch.
    noise_scale: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the run, evaluations included

    @property
    def final_validation_loss(self) -> float:
        return self.validation_loss[-1]


@dataclass
class MLMData:
    train: torch.Tensor
    validation: torch.Tensor
    vocab_size: int
    short_train: torch.Tensor | None = None  # the training text in shorter rows, for a two-phase run


def mlm_data(length: int = 64, short_length: int | None = None) -> MLMData:
    """The KJV packed in rows of ``length`` tokens (and of ``short_length`` for a two-phase run's first phase)."""
    tokenizer = load_tokenizer()
    train_texts, validation_texts = load_kjv()
    short = pack(train_texts, tokenizer, short_length) if short_length else None
    return MLMData(pack(train_texts, tokenizer, length), pack(validation_texts, tokenizer, length),
                   tokenizer.get_vocab_size(), short)


def make_optimizer(config: MLMConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = torchlamb.param_groups(model, weight_decay=config.weight_decay, exclude=["position"])
    if not config.adapt_embedding:  # the tied embedding into a group of its own: decayed, not adapted
        embedding = model.get_parameter("embed.weight")
        for group in groups:
            keep = [i for i, p in enumerate(group["params"]) if p is not embedding]
            group["params"] = [group["params"][i] for i in keep]
            group["param_names"] = [group["param_names"][i] for i in keep]
        groups.append({"params": [embedding], "param_names": ["embed.weight"], "weight_decay": config.weight_decay,
                       "adapt": False, "lr": config.lr if config.embedding_lr is None else config.embedding_lr})
    if config.optimizer == "lamb":
        return torchlamb.Lamb(groups, lr=config.lr, max_grad_norm=1.0, state_dtype=config.state_dtype)
    if config.optimizer == "lars":
        return torchlamb.Lars(groups, lr=config.lr, momentum=0.9, trust_coefficient=0.02, max_grad_norm=1.0,
                              state_dtype=config.state_dtype)
    if config.optimizer == "adamw":
        # AdamW has no adapt option: strip it from param_groups' groups. Lamb's eps (BERT's); train_mlm clips
        # AdamW's gradient at 1.0 as Lamb and Lars clip theirs.
        return torch.optim.AdamW([{k: v for k, v in g.items() if k != "adapt"} for g in groups], lr=config.lr,
                                 eps=1e-6)
    raise ValueError(f"unknown optimizer {config.optimizer!r}: choose lamb, adamw or lars")


@torch.no_grad()
def validation_batches(data: MLMData, batch: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation rows as (inputs, labels) batches with a fixed masking: the same for every run and for
    :func:`unigram_loss`."""
    generator = torch.Generator().manual_seed(1234)
    for start in range(0, len(data.validation), batch):
        yield mask_tokens(data.validation[start:start + batch], data.vocab_size, generator)


def validation_loss(model: nn.Module, data: MLMData) -> float:
    """Mean MLM loss over the validation rows (:func:`validation_batches`)."""
    total, count = 0.0, 0
    for inputs, labels in validation_batches(data):
        total += mlm_loss(model, inputs, labels, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


def warmup_steps(config: MLMConfig) -> int:
    """The schedule's linear warmup: ``warmup_fraction`` of the run's optimizer steps, at least one."""
    return max(1, int(config.warmup_fraction * max(1, config.sequences // config.batch_size)))


@torch.no_grad()
def unigram_loss(data: MLMData) -> float:
    """The validation loss of a model that ignores context and predicts each masked token with its frequency in the
    training rows (add-one smoothed), on :func:`validation_batches`: the plateau a model reaches by learning word
    frequencies only."""
    counts = torch.bincount(data.train.flatten(), minlength=data.vocab_size).double() + 1
    counts[:MASK + 1] = 0  # special tokens are never predicted
    log_p = (counts / counts.sum()).log()
    total, count = 0.0, 0
    for _, labels in validation_batches(data):
        total -= log_p[labels[labels != -100]].sum().item()
        count += int((labels != -100).sum())
    return total / count


def train_mlm(config: MLMConfig, data: MLMData, progress: Any = None) -> MLMResult:
    """Train one configuration for ``config.sequences`` sequences; evaluate ``config.evals`` times."""
    if config.batch_size % config.micro_batch:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of micro_batch {config.micro_batch}")
    if config.short_length is not None and not (0 < config.short_length < config.length
                                                 and 0 < config.short_fraction < 1):
        raise ValueError(f"a two-phase run needs 0 < short_length < length ({config.length}) and 0 < short_fraction "
                         f"< 1, got {config.short_length} and {config.short_fraction}")
    if config.short_length and (data.short_train is None or data.short_train.shape[1] != config.short_length):
        raise ValueError(f"a two-phase run needs the training text in rows of {config.short_length} tokens: "
                         f"mlm_data(length, short_length={config.short_length})")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = MaskedLM(data.vocab_size, config.length, config.width, config.layers, config.heads)
    optimizer = make_optimizer(config, model)
    total_steps = max(1, config.sequences // config.batch_size)
    scheduler = torchlamb.warmup_poly(optimizer, warmup_steps=warmup_steps(config), total_steps=total_steps)
    micro_batches = config.batch_size // config.micro_batch
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches,
                                                  scheduler=scheduler,
                                                  max_grad_norm=1.0 if config.optimizer == "adamw" else None)
    # The gradient noise scale from the two batch sizes training already has (micro-batch and optimizer batch).
    noise = torchlamb.NoiseScale(model, optimizer, batch_size=config.micro_batch, micro_batches=micro_batches,
                                 every=max(1, total_steps // 100)) if micro_batches > 1 else None
    # The trust-ratio telemetry: only tensors the trust stage adapts (param_groups exempts biases and norms).
    adapted = {id(p) for group in optimizer.param_groups if group.get("adapt", True) for p in group["params"]}
    result = MLMResult(config)
    start = time.perf_counter()
    eval_steps = {max(1, round(total_steps * (i + 1) / config.evals)) for i in range(config.evals)}
    short_steps = round(config.short_fraction * total_steps) if config.short_length else 0
    train, order, position = None, torch.empty(0, dtype=torch.long), 0
    while accumulation.steps < total_steps:
        # Phases switch at an optimizer step's boundary: accumulation.steps counts completed steps.
        phase = data.short_train if accumulation.steps < short_steps else data.train
        if phase is not train:
            train, order, position = phase, torch.randperm(len(phase), generator=generator), 0
        if position + config.micro_batch > len(order):  # a new epoch
            order, position = torch.randperm(len(train), generator=generator), 0
        rows = train[order[position:position + config.micro_batch]]
        position += config.micro_batch
        inputs, labels = mask_tokens(rows, data.vocab_size, generator)
        loss = mlm_loss(model, inputs, labels)
        if not math.isfinite(loss.item()):
            break
        if accumulation.backward(loss):
            if progress is not None:
                progress.update(config.batch_size)  # sequences: a large-batch step costs as many as it holds
            if accumulation.steps in eval_steps:
                result.steps.append(accumulation.steps)
                result.sequences_seen.append(accumulation.steps * config.batch_size)
                result.validation_loss.append(validation_loss(model, data))
                stats = getattr(optimizer, "trust_stats", [])
                result.trust_ratios.append([r for s in stats for p, r in zip(s.params, s.trust_ratio.tolist())
                                            if id(p) in adapted])
    result.seconds = time.perf_counter() - start
    if noise is not None:
        noise.remove()
        result.noise_scale = noise.series()
    return result


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

