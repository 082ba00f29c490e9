"""The building blocks of the MLM experiment (:mod:`torchlamb.experiments.mlm`): data, model, one training run.

A small encoder (``nn.TransformerEncoderLayer``) learns to fill in masked WordPiece tokens of the King James Bible
(:mod:`torchlamb.data.text`). Large batches come from gradient accumulation (:class:`torchlamb.GradientAccumulation`),
with warmup + polynomial decay. :func:`train_mlm` runs one configuration and records the validation MLM loss against
sequences seen and against optimizer steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import torchlamb
from torchlamb.batch_ramp import examples_at

from ..data.text import load_kjv, load_tokenizer

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
    # A measured torchlamb.BatchRamp from batch_size up to ramp_to (None: a fixed batch): double the batch when
    # ramp_factor × B_simple reaches twice it, lr × √(batch/batch_size); warmup and decay then count sequences.
    ramp_to: int | None = None
    ramp_factor: float = 1.0


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
    batch_changes: list[dict] = field(default_factory=list)  # a ramped run's BatchRamp records (step, examples, ...)

    def sequences_at(self, step: int) -> int:
        """Sequences seen after ``step`` optimizer steps."""
        if not self.batch_changes:
            return step * self.config.batch_size
        return examples_at(self.batch_changes, step)

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
    total_steps = max(1, config.sequences // config.batch_size)  # at the starting batch, when ramped
    micro_batches = config.batch_size // config.micro_batch
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches,
                                                  max_grad_norm=1.0 if config.optimizer == "adamw" else None)
    # The gradient noise scale from the two batch sizes training already has (micro-batch and optimizer batch).
    noise = torchlamb.NoiseScale(model, optimizer, batch_size=config.micro_batch, micro_batches=micro_batches,
                                 every=max(1, total_steps // 100)) if micro_batches > 1 else None
    ramp = None
    if config.ramp_to is not None:
        ramp = torchlamb.BatchRamp(accumulation, noise, max_batch=config.ramp_to, lr_rule="sqrt",
                                   factor=config.ramp_factor, interval=20)
        accumulation.scheduler = torchlamb.warmup_poly(optimizer, int(config.warmup_fraction * config.sequences),
                                                       config.sequences, progress=ramp.examples_seen)
    else:
        accumulation.scheduler = torchlamb.warmup_poly(optimizer, warmup_steps=warmup_steps(config),
                                                       total_steps=total_steps)

    def seen() -> int:
        return ramp.examples if ramp is not None else accumulation.steps * config.batch_size
    # The trust-ratio telemetry: only tensors the trust stage adapts (param_groups exempts biases and norms).
    adapted = {id(p) for group in optimizer.param_groups if group.get("adapt", True) for p in group["params"]}
    result = MLMResult(config)
    start = time.perf_counter()
    # Evaluations at equal shares of the budget; a ramped run takes a step's worth more at most.
    evals = [round(total_steps * (i + 1) / config.evals) * config.batch_size for i in range(config.evals)]
    short_steps = round(config.short_fraction * total_steps) if config.short_length else 0
    train, order, position = None, torch.empty(0, dtype=torch.long), 0
    while seen() < total_steps * config.batch_size:
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
        before = seen()
        if accumulation.backward(loss):
            if progress is not None:
                progress.update(seen() - before)  # sequences: a large-batch step costs as many as it holds
            if evals and seen() >= evals[0]:
                evals = [at for at in evals if at > seen()]
                result.steps.append(accumulation.steps)
                result.sequences_seen.append(seen())
                result.validation_loss.append(validation_loss(model, data))
                stats = getattr(optimizer, "trust_stats", [])
                result.trust_ratios.append([r for s in stats for p, r in zip(s.params, s.trust_ratio.tolist())
                                            if id(p) in adapted])
    result.seconds = time.perf_counter() - start
    if noise is not None:
        noise.remove()
        result.noise_scale = noise.series()
    if ramp is not None:
        result.batch_changes = [dict(row) for row in ramp.records]
    return result
