r"""BatchRamp: grow the batch while training, when the gradient noise scale says so or by a schedule of examples.

Large batches pay only up to the critical batch size, and that size grows during training: the gradient noise scale
:math:`B_\text{simple} = \operatorname{tr}(\Sigma)/\lvert G\rvert^2` (McCandlish et al. 2018) is small while the true
gradient is large and grows as it shrinks. A batch far above it wastes examples; far below, steps. So start small and
grow (Smith et al. 2017, "Don't decay the learning rate, increase the batch size"; the OLMo team's "Critical batch
size revisited", 2025). Large runs grow it by a fixed schedule of data seen (GPT-3; Megatron's
``--rampup-batch-size``); :class:`BatchRamp` does that, or grows it from the measurement.

The batch grows by accumulating more micro-batches (:class:`~torchlamb.GradientAccumulation`): the micro-batch, what
one backward pass on one process takes, stays as it is, so memory does not grow.

**Measured policy** (``noise=``, no ``schedule``): every ``interval`` steps after the last change, with B the batch and
:math:`\hat B_\text{simple}` the :class:`~torchlamb.noise_scale.NoiseScale`'s smoothed estimate (its moving averages),

.. math::
    B \leftarrow g \cdot B \quad\text{if}\quad c \cdot \hat B_\text{simple} \ge g \cdot B
    \text{ and } g \cdot B \le B_\text{max}

with :math:`g` = ``growth`` and :math:`c` = ``factor``. The batch only grows, by one factor :math:`g` at a time, so
it settles at the largest :math:`B_0 g^k \le \min(c\,B_\text{simple}, B_\text{max})` and one high estimate costs at most
one step of growth per ``interval``. ``interval`` also lets the moving averages take in the new batch's estimates
before the next decision.

**Scheduled policy** (``schedule=``): from each ``(examples, batch)`` entry's examples seen on, the batch is that
batch; :func:`~torchlamb.linear_schedule` builds GPT-3's and Megatron's linear ramp, in whole factors of ``growth``.

**The learning rate** is multiplied during each optimizer step by the rule's factor of the batch over the starting
batch (``"sqrt"``: :math:`\sqrt{B/B_0}`, LAMB's rule; ``"linear"``: :math:`B/B_0`, Goyal et al.'s for SGD and LARS;
``"none"``). The factor is applied around the step and taken off after it, so the scheduler never sees it: it can
neither overwrite it nor apply it twice, and whatever schedule runs composes with it. Once the batch changes, a
schedule in steps no longer follows the data; build it in examples:
``warmup_poly(optimizer, warmup, total, progress=ramp.examples_seen)``.

Example::

    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=2)
    noise = torchlamb.NoiseScale(model, optimizer, batch_size=16, micro_batches=2)
    ramp = torchlamb.BatchRamp(accumulation, noise, max_batch=4096, lr_rule="sqrt")
    accumulation.scheduler = torchlamb.warmup_poly(optimizer, 10_000, 2_000_000, progress=ramp.examples_seen)
    for inputs, targets in loader:                          # micro-batches of 16 examples
        accumulation.backward(loss_fn(model(inputs), targets))
    ramp.to_csv("ramp.csv"); ramp.plot("ramp.png", noise)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
import torch.distributed as dist

from ._validation import check_count, check_number
from .accumulate import GradientAccumulation
from .noise_scale import ALL, NoiseScale
from .records import new_figure, save_figure, write_csv

#: The learning-rate rules: the lr's factor as a function of the batch over the starting batch.
LR_RULES = {"sqrt": math.sqrt, "linear": float, "none": lambda ratio: 1.0}


class ChangeRecord(TypedDict):
    """One row of ``BatchRamp.records``: a change of the batch (the first row: the start)."""

    step: int  # optimizer steps taken when the change took effect; the next step runs at the new batch
    examples: int  # examples seen by then
    batch: int  # examples per optimizer step from then on, over all processes
    micro_batches: int  # backward passes per step on each process
    lr_factor: float  # the lr's factor from then on
    b_simple: float  # the smoothed B_simple when the change was taken (NaN where none was measured)


FIELDS = tuple(ChangeRecord.__annotations__)


def _whole_power(ratio: float, growth: int) -> int | None:
    """k with ratio = growth**k, or None."""
    k = 0
    while ratio > 1 and ratio % growth == 0:
        ratio //= growth
        k += 1
    return k if ratio == 1 else None


class BatchRamp:
    """Grow the batch of a :class:`~torchlamb.GradientAccumulation` during training: measured (from a
    :class:`~torchlamb.noise_scale.NoiseScale`) or scheduled (by examples seen); see the module docstring for the rules.

    The ramp attaches itself to the accumulation, which calls it after each optimizer step (a step a GradScaler
    skips included: its examples were seen) and asks it for the lr factor around each step.

    Args:
        accumulation: the accumulation whose micro-batch count grows.
        noise: the NoiseScale measuring this optimizer and accumulation; required for the measured policy, kept in
            step with the micro-batch count (and read for the records) when a schedule decides.
        max_batch: the largest batch, in examples over all processes: the starting batch times a power of
            ``growth``.
        lr_rule: ``"sqrt"``, ``"linear"`` or ``"none"``.
        factor: c, the target batch over the measured B_simple.
        growth: g, the whole factor by which the batch grows at once.
        interval: optimizer steps between decisions of the measured policy (counted from the last change).
        schedule: ``(examples, batch)`` pairs: the scheduled policy.
        micro_batch_size: examples per backward pass on one process; taken from ``noise`` when given.
        group: the data-parallel process group (the NoiseScale's when given; default the world group when
            torch.distributed is initialized).

    Attributes:
        start_batch: the batch at the start, in examples per optimizer step over all processes.
        steps: optimizer steps seen. examples: examples seen.
        records: :class:`~torchlamb.batch_ramp.ChangeRecord` rows: the start, then one per change.
    """

    def __init__(self, accumulation: GradientAccumulation, noise: NoiseScale | None = None, *, max_batch: int,
                 lr_rule: Literal["sqrt", "linear", "none"] = "sqrt", factor: float = 1.0, growth: int = 2,
                 interval: int = 20, schedule: Sequence[tuple[int, int]] | None = None,
                 micro_batch_size: int | None = None, group: Any = None) -> None:
        if not isinstance(accumulation, GradientAccumulation):
            raise TypeError(f"accumulation must be a torchlamb.GradientAccumulation, got {type(accumulation).__name__}")
        if accumulation.ramp is not None:
            raise ValueError("accumulation already has a BatchRamp")
        if accumulation.count:
            raise ValueError("accumulation is in the middle of a step: create the BatchRamp between steps")
        if noise is not None:
            if not isinstance(noise, NoiseScale):
                raise TypeError(f"noise must be a torchlamb.NoiseScale, got {type(noise).__name__}")
            if noise.optimizer is not accumulation.optimizer:
                raise ValueError("noise is attached to another optimizer than the accumulation's")
            if noise.micro_batches != accumulation.micro_batches:
                raise ValueError(f"noise measures {noise.micro_batches} micro-batches per step, the accumulation "
                                 f"takes {accumulation.micro_batches}: they belong to different accumulations")
            if micro_batch_size is not None and micro_batch_size != noise.small_batch:
                raise ValueError(f"micro_batch_size {micro_batch_size} differs from the noise's batch_size "
                                 f"{noise.small_batch}")
            micro_batch_size, group = noise.small_batch, noise.group
        elif schedule is None:
            raise ValueError("noise is required unless a schedule is given: the measured policy reads its B_simple")
        check_count("micro_batch_size", micro_batch_size, hint="examples per backward pass on one process")
        if lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule must be one of {tuple(LR_RULES)}, got {lr_rule!r}")
        if isinstance(growth, bool) or not isinstance(growth, int) or growth < 2:
            raise ValueError(f"growth must be a whole factor >= 2 (the micro-batch count must stay whole), "
                             f"got {growth!r}")
        check_number("factor", factor, low=0.0, low_open=True)
        check_count("interval", interval)
        self.world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        self.accumulation, self.noise, self.group = accumulation, noise, group
        self.micro_batch_size, self.lr_rule, self.factor = micro_batch_size, lr_rule, float(factor)
        self.growth, self.interval = growth, interval
        self.start_batch = self.batch_size
        if isinstance(max_batch, bool) or not isinstance(max_batch, int):
            raise TypeError(f"max_batch must be an int, got {type(max_batch).__name__}")
        if max_batch < self.start_batch:
            raise ValueError(f"max_batch {max_batch} is below the current batch {self.start_batch} "
                             f"({micro_batch_size} × {accumulation.micro_batches} micro-batches × {self.world} "
                             "process(es)): the ramp only grows")
        if max_batch % self.start_batch or _whole_power(max_batch // self.start_batch, growth) is None:
            raise ValueError(f"max_batch {max_batch} must be the starting batch {self.start_batch} times a power of "
                             f"growth {growth}: the micro-batch count must stay whole at every step of the ramp")
        self.max_batch = max_batch
        self.schedule = self._check_schedule(schedule) if schedule is not None else None
        self.steps = 0
        self.examples = 0
        self._last_change = 0
        self.records: list[ChangeRecord] = [self._record(math.nan)]
        accumulation.ramp = self

    def _check_schedule(self, schedule: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        entries = [tuple(entry) for entry in schedule]
        for index, entry in enumerate(entries):
            if len(entry) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry):
                raise ValueError(f"schedule[{index}] must be a pair of ints (examples, batch), got {entry!r}")
            examples, batch = entry
            if examples < 0:
                raise ValueError(f"schedule[{index}]: examples must be >= 0, got {examples}")
            if not self.start_batch <= batch <= self.max_batch or batch % self.start_batch or _whole_power(
                    batch // self.start_batch, self.growth) is None:
                raise ValueError(f"schedule[{index}]: batch {batch} must be the starting batch {self.start_batch} "
                                 f"times a power of growth {self.growth}, at most max_batch {self.max_batch}")
            if index and (examples <= entries[index - 1][0] or batch < entries[index - 1][1]):
                raise ValueError(f"schedule[{index}] {entry}: examples must increase and the batch must not shrink")
        return entries  # type: ignore[return-value]

    # -- where the ramp stands -------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Examples per optimizer step now, over all processes."""
        return self.micro_batch_size * self.accumulation.micro_batches * self.world

    @property
    def lr_factor(self) -> float:
        """The lr's factor during each step, the rule's function of ``batch_size / start_batch``."""
        return LR_RULES[self.lr_rule](self.batch_size / self.start_batch)

    def examples_seen(self) -> int:
        """Examples seen so far over all processes: the progress for ``warmup_poly(..., progress=)``."""
        return self.examples

    def examples_at(self, step: int) -> int:
        """Examples seen after ``step`` optimizer steps (a step already taken), from the records of the changes."""
        return examples_at(self.records, step)

    # -- called by GradientAccumulation ----------------------------------------------------------------------------
    def scale_lr(self) -> list[Any]:
        """Multiply each param group's lr by :attr:`lr_factor` for the step about to run; returns the lrs to put back
        with :meth:`restore_lr` after it. (GradientAccumulation calls both around ``optimizer.step``.)"""
        groups = self.accumulation.optimizer.param_groups
        saved = [group["lr"] for group in groups]
        factor = self.lr_factor
        if factor != 1.0:
            for group in groups:
                group["lr"] = group["lr"] * factor
        return saved

    def restore_lr(self, saved: list[Any]) -> None:
        for group, lr in zip(self.accumulation.optimizer.param_groups, saved):
            group["lr"] = lr

    def after_step(self) -> None:
        """Count the step's examples and take the decision; called by the accumulation after each optimizer step,
        before its scheduler steps (so that a schedule in examples sees this step's)."""
        self.steps += 1
        self.examples += self.batch_size
        if self.schedule is not None:
            due = [batch for examples, batch in self.schedule if examples <= self.examples]
            target = max(due, default=self.batch_size)
            if target > self.batch_size:
                b_simple = self.noise.b_simple if self.noise is not None else math.nan
                self._change(target // (self.micro_batch_size * self.world), b_simple)
            return
        if self.steps - self._last_change < self.interval or self.batch_size * self.growth > self.max_batch:
            return
        b_simple = self.noise.b_simple  # the moving averages' ratio: one read from the device per decision
        grow = math.isfinite(b_simple) and self.factor * b_simple >= self.batch_size * self.growth
        if self.world > 1:  # every process takes rank 0's decision, whatever its own rounding said
            decision = torch.tensor([float(grow), b_simple], dtype=torch.float64, device=self.noise.params[0].device)
            dist.broadcast(decision, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                           group=self.group)
            grow, b_simple = bool(decision[0].item()), decision[1].item()
        if grow:
            self._change(self.accumulation.micro_batches * self.growth, b_simple)

    def _change(self, micro_batches: int, b_simple: float) -> None:
        self.accumulation.set_micro_batches(micro_batches)
        if self.noise is not None:
            self.noise.set_micro_batches(micro_batches)
        self._last_change = self.steps
        self.records.append(self._record(b_simple))

    def _record(self, b_simple: float) -> ChangeRecord:
        return ChangeRecord(step=self.steps, examples=self.examples, batch=self.batch_size,
                            micro_batches=self.accumulation.micro_batches, lr_factor=self.lr_factor,
                            b_simple=float(b_simple))

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the ramp stands (and the settings a resumed run must share). Checkpoint between steps; load it
        before the accumulation's and the NoiseScale's state: it restores their micro-batch count."""
        return {"start_batch": self.start_batch, "max_batch": self.max_batch, "growth": self.growth,
                "micro_batch_size": self.micro_batch_size, "micro_batches": self.accumulation.micro_batches,
                "steps": self.steps, "examples": self.examples, "last_change": self._last_change,
                "records": [dict(row) for row in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("start_batch", "max_batch", "growth", "micro_batch_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"BatchRamp checkpoint does not match: its {key} is {state.get(key)!r}, this "
                                 f"ramp's {getattr(self, key)!r}")
        self.accumulation.set_micro_batches(int(state["micro_batches"]))
        if self.noise is not None:
            self.noise.set_micro_batches(int(state["micro_batches"]))
        self.steps, self.examples, self._last_change = int(state["steps"]), int(state["examples"]), int(
            state["last_change"])
        self.records = [ChangeRecord(**row) for row in state["records"]]

    # -- export ----------------------------------------------------------------------------------------------------
    def to_csv(self, path: str | Path) -> Path:
        """Write the changes as CSV: ``step, examples, batch, micro_batches, lr_factor, b_simple``."""
        return write_csv(path, FIELDS, self.records)

    def plot(self, path: str | Path, noise: NoiseScale | None = None, title: str | None = None) -> Path:
        """The batch against examples seen (left) and against optimizer steps (right), log scales, with the
        measured ``factor × B_simple`` (all tensors) from ``noise``'s records and ``max_batch``. Returns the path."""
        figure = new_figure(figsize=(12.0, 4.5))
        by_examples, by_steps = figure.subplots(1, 2)
        last = max(self.steps, self.records[-1]["step"] + 1)
        steps = [row["step"] for row in self.records] + [last]
        batches = [row["batch"] for row in self.records] + [self.records[-1]["batch"]]
        for axis, xs in ((by_examples, [max(self.examples_at(s), 1) for s in steps]), (by_steps, steps)):
            axis.step(xs, batches, where="post", color="black", linewidth=2.0, label="batch")
            if noise is not None:
                points = [(s, v) for s, v in noise.series(ALL) if 0 < s <= last and v > 0 and math.isfinite(v)]
                xs_noise = [max(self.examples_at(s), 1) if axis is by_examples else s for s, _ in points]
                axis.plot(xs_noise, [self.factor * v for _, v in points], color="C0", linewidth=1.0,
                          label=f"{self.factor:g} × B_simple (measured)")
            axis.axhline(self.max_batch, color="0.4", linestyle="--", linewidth=0.8, label="max_batch")
            axis.set(yscale="log", ylabel="examples per optimizer step (log)")
            axis.grid(True, which="major", alpha=0.3)
        by_examples.set(xscale="log", xlabel="examples seen (log)",
                        title=title if title is not None else "Batch size over training")
        by_steps.set(xlabel="optimizer step", title="Against optimizer steps")
        by_examples.legend(loc="best", fontsize="small")
        return save_figure(figure, path)


def examples_at(records: Sequence[Mapping[str, Any]], step: int) -> int:
    """Examples seen after ``step`` optimizer steps, from a ramp's change records (the start first): those of the
    last change at or before ``step``, plus its batch for every step since."""
    change = [row for row in records if row["step"] <= step][-1]
    return change["examples"] + (step - change["step"]) * change["batch"]


def linear_schedule(start_batch: int, max_batch: int, ramp_examples: int, growth: int = 2) -> list[tuple[int, int]]:
    """GPT-3's and Megatron's batch ramp: the batch grows linearly in examples seen from ``start_batch`` to
    ``max_batch`` over ``ramp_examples``, taken in whole factors of ``growth``: ``start·g^k`` from the examples
    where the line reaches it, ``ramp_examples · (start·g^k − start) / (max − start)`` (rounded up)."""
    for name, value in (("start_batch", start_batch), ("max_batch", max_batch), ("ramp_examples", ramp_examples)):
        check_count(name, value)
    if max_batch <= start_batch:
        raise ValueError(f"max_batch {max_batch} must exceed start_batch {start_batch}")
    entries, batch = [], start_batch * growth
    while batch <= max_batch:
        entries.append((math.ceil(ramp_examples * (batch - start_batch) / (max_batch - start_batch)), batch))
        batch *= growth
    return entries
