"""TrustMonitor: watch the layer-wise trust ratio of any optimizer every N steps, then export or plot it.

For every parameter tensor θ (a "layer") the monitor records, on its record steps::

    weight_norm = ‖θ‖          before the step
    update_norm = ‖u‖          the direction the step applied, θ ← θ − lr·r·u
    trust_ratio = r

For :class:`~torchlamb.Lamb` and :class:`~torchlamb.Lars` these are what the trust stage used
(``optimizer.trust_stats``). For any other ``torch.optim`` optimizer the monitor measures the update the
optimizer made, ``u = (θ_before − θ_after) / lr``, and records the ratio LAMB would have used for it,
``r = ‖θ_before‖ / ‖u‖`` (1 if either norm is 0), as Ben Mann did for Adam in "An intuitive understanding of the
LAMB optimizer" (2019). In that post's names ``weight_norm`` is r1, ``update_norm`` is r2 and ``trust_ratio`` is r.

Reading device values forces a host-device sync, so the monitor reads them only on record steps (step 1 and
every ``every``-th step) and does nothing else on the others.

This module records and writes the records as files; the two figures are drawn by ``trust_plots.py``, and what
the monitor shares with :class:`~torchlamb.noise_scale.NoiseScale` (the hooks' lifetime, CSV, TensorBoard, figures)
lives in ``records.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from . import trust_plots
from .records import Recorder, prepare_path, rows_by_step, summary_writer, write_csv
from .trust import tensor_norms

#: The per-tensor quantities a record holds (and ``plot_histograms`` can plot).
QUANTITIES = ("weight_norm", "update_norm", "trust_ratio")
#: The keys of a :class:`TrustRecord`, in the order of the CSV columns.
FIELDS = ("step", "name", "group", *QUANTITIES)


class TrustRecord(TypedDict):
    """One row of :attr:`~torchlamb.TrustMonitor.records`: one parameter tensor at one recorded step."""

    step: int
    name: str
    group: int
    weight_norm: float
    update_norm: float
    trust_ratio: float


class TrustMonitor(Recorder):
    r"""Record each parameter tensor's ‖θ‖, ‖u‖ and trust ratio every ``every`` optimizer steps.

    The monitor hooks into ``optimizer.step`` (``register_step_pre_hook`` / ``register_step_post_hook``) and
    counts the steps itself: step 1 is the first ``optimizer.step()`` after the monitor was created. It records
    at step 1 and at every step that is a multiple of ``every``; on the other steps it does nothing at all (no
    copies, no host-device syncs).

    * Optimizers with a trust stage (an attribute ``trust_stats``, as :class:`~torchlamb.Lamb` and
      :class:`~torchlamb.Lars` have) are read directly: ``weight_norm`` is ‖θ‖ before the step, ``update_norm``
      is ‖u‖ (for Lars, the ratio's denominator) and ``trust_ratio`` the r that was applied.
    * For any other optimizer (Adam, AdamW, SGD, ...) the monitor copies the parameters that have gradients
      just before a record step and, just after it, measures the update the optimizer made:

      .. math::
          u = (\theta_{\text{before}} - \theta_{\text{after}}) / \text{lr}, \quad
          w = \lVert\theta_{\text{before}}\rVert, \quad
          r = w / \lVert u\rVert \text{ if both are } > 0 \text{ else } 1

      with lr the learning rate of the tensor's group (``update_norm`` and ``trust_ratio`` are NaN when lr is
      0). For AdamW this u is exactly LAMB's direction, :math:`u = \hat m/(\sqrt{\hat v}+\epsilon) + \lambda\theta`,
      because AdamW's step is :math:`\theta \leftarrow \theta - \text{lr}\,(\hat m/(\sqrt{\hat v}+\epsilon) +
      \lambda\theta)`: r is the ratio LAMB would have applied to the same moments, and AdamW's and LAMB's ratios
      can be compared on one plot. (For Adam with L2 ``weight_decay`` the decay is inside the moments instead.)
      The copy costs one extra set of those parameters' memory during a record step.

    Norms are computed per tensor in float32 or wider, and each record step reads them back with a single
    transfer. Tensors are named by ``model.named_parameters()``; ``names`` overrides or adds names; otherwise a
    group's ``param_names`` (torch optimizers built from named parameters) or ``"param{i}"``, ``i`` the tensor's
    position in the optimizer's groups taken in order.

    Args:
        model: the model whose parameter names label the records, or None.
        optimizer: any ``torch.optim.Optimizer``.
        every: record every this many steps (and at step 1); an int ``>= 1``.
        names: extra names, either ``{name: tensor}`` (as ``dict(model.named_parameters())``) or
            ``{tensor: name}``; they take precedence over the model's names.

    Attributes:
        records: one :class:`~torchlamb.telemetry.TrustRecord` dict per tensor and recorded step: ``step``,
            ``name``, ``group`` (index in ``optimizer.param_groups``), ``weight_norm``, ``update_norm``,
            ``trust_ratio`` (Python numbers).
        step: how many optimizer steps the monitor has seen.

    Example::

        with TrustMonitor(model, optimizer, every=50) as monitor:
            train(model, optimizer)
        monitor.plot_ratios("trust_ratios.png")
        monitor.to_csv("trust.csv")
    """

    def __init__(self, model: nn.Module | None, optimizer: torch.optim.Optimizer, every: int = 10,
                 names: dict | None = None) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(every, int) or isinstance(every, bool):
            raise TypeError(f"every must be an int >= 1, got {every!r}")
        if every < 1:
            raise ValueError(f"every must be an int >= 1, got {every}")
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self._explicit_names = _names_by_id(names)
        self.records: list[TrustRecord] = []
        self.step = 0
        # Optimizers with a trust stage report their norms; for the others we measure the update ourselves.
        self._reads_trust_stats = hasattr(optimizer, "trust_stats")
        # (param, copy before the step, group index) for the step under way; filled on record steps only.
        self._snapshot: list[tuple[Tensor, Tensor, int]] = []
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    # -- hooks -------------------------------------------------------------------------------------------------
    def _is_record_step(self, step: int) -> bool:
        return step == 1 or step % self.every == 0

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The step is counted after it succeeds (in _after_step), so the one under way is self.step + 1.
        if self._reads_trust_stats or not self._is_record_step(self.step + 1):
            self._snapshot = []
            return
        with torch.no_grad():
            self._snapshot = [(param, param.detach().clone(), group_index)
                              for group_index, group in enumerate(optimizer.param_groups)
                              for param in group["params"] if param.grad is not None]

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if not self._is_record_step(self.step):
            return
        with torch.no_grad():
            if self._reads_trust_stats:
                self._record_trust_stats()
            else:
                self._record_measured_update()
        self._snapshot = []

    # -- recording ---------------------------------------------------------------------------------------------
    def _record_trust_stats(self) -> None:
        stats = self.optimizer.trust_stats
        if not stats:
            return
        params = [param for group_stats in stats for param in group_stats.params]
        device = stats[0].weight_norm.device
        columns = [torch.cat([getattr(group_stats, quantity).to(device) for group_stats in stats])
                   for quantity in QUANTITIES]
        weight_norms, update_norms, ratios = torch.stack(columns).tolist()  # the step's one host sync
        self._append(params, weight_norms, update_norms, ratios)

    def _record_measured_update(self) -> None:
        if not self._snapshot:
            return
        params = [param for param, _, _ in self._snapshot]
        device = params[0].device
        weight_norms, delta_norms = [], []
        for param, before, _ in self._snapshot:
            # At least float32: a bfloat16 difference loses most digits.
            dtype = torch.promote_types(param.dtype, torch.float32)
            delta = param.detach().to(dtype) - before.to(dtype)
            weight_norm, delta_norm = tensor_norms([before, delta]).to(device)
            weight_norms.append(weight_norm)
            delta_norms.append(delta_norm)
        weight_norms, delta_norms = torch.stack([torch.stack(weight_norms), torch.stack(delta_norms)]).tolist()
        # float() reads a tensor lr; schedulers keep it on the CPU, where reading it is no device sync.
        lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        update_norms, ratios = [], []
        for (_, _, group_index), weight_norm, delta_norm in zip(self._snapshot, weight_norms, delta_norms):
            lr = lrs[group_index]
            update_norm = delta_norm / lr if lr != 0 else math.nan  # ‖u‖ = ‖Δθ‖/lr; with lr 0 u is unknown
            update_norms.append(update_norm)
            ratios.append(_lamb_ratio(weight_norm, update_norm))
        self._append(params, weight_norms, update_norms, ratios)

    def _append(self, params: list[Tensor], weight_norms: list[float], update_norms: list[float],
                ratios: list[float]) -> None:
        # Built on each record step, not once: groups added later (add_param_group) are named as well.
        where = self._name_and_group_by_id()
        for param, weight_norm, update_norm, ratio in zip(params, weight_norms, update_norms, ratios):
            name, group_index = where[id(param)]
            self.records.append(TrustRecord(step=self.step, name=name, group=group_index, weight_norm=weight_norm,
                                            update_norm=update_norm, trust_ratio=ratio))

    def _name_and_group_by_id(self) -> dict[int, tuple[str, int]]:
        """Map each optimized tensor (by identity) to its name and the index of its group."""
        names: dict[int, str] = {}
        groups: dict[int, int] = {}
        position = 0
        for group_index, group in enumerate(self.optimizer.param_groups):
            group_names = group.get("param_names")
            for index_in_group, param in enumerate(group["params"]):
                names[id(param)] = group_names[index_in_group] if group_names else f"param{position}"
                groups[id(param)] = group_index
                position += 1
        if self.model is not None:
            names.update((id(param), name) for name, param in self.model.named_parameters())
        names.update(self._explicit_names)
        return {key: (names[key], groups[key]) for key in groups}

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The step count and the records, to resume recording where it stopped. Checkpoint between steps."""
        return {"every": self.every, "step": self.step, "records": [dict(row) for row in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("every") != self.every:
            raise ValueError(f"TrustMonitor checkpoint records every {state.get('every')!r} steps, this monitor "
                             f"every {self.every}")
        self.step = int(state["step"])
        self.records = [TrustRecord(**row) for row in state["records"]]

    # -- hooks' lifetime ---------------------------------------------------------------------------------------
    def remove(self) -> None:
        super().remove()
        self._snapshot = []  # a step that raised leaves its copies here

    # -- export ------------------------------------------------------------------------------------------------
    def to_csv(self, path: str | Path) -> Path:
        """Write :attr:`records` as CSV (a header row of :data:`~torchlamb.telemetry.FIELDS`, then one row per
        record); return the path.

        Floats are written with Python's ``repr``, so reading them back with ``float`` gives the same numbers
        (NaN is written ``nan``). Parent directories are created.
        """
        return write_csv(path, FIELDS, self.records)

    def to_jsonl(self, path: str | Path) -> Path:
        """Write :attr:`records` as JSON Lines, one object per record; return the path.

        NaN is written as ``NaN``, as Python's ``json`` module writes and reads it. Parent directories are created.
        """
        path = prepare_path(path)
        with path.open("w", encoding="utf-8") as file:
            for record in self.records:
                file.write(json.dumps(record) + "\n")
        return path

    def to_tensorboard(self, log_dir: str | Path) -> None:
        """Write the records to TensorBoard event files in ``log_dir``.

        For each recorded step: histograms ``histograms/weight_norm``, ``histograms/update_norm`` and
        ``histograms/trust_ratio`` over all tensors (the view of Ben Mann's post on LAMB), and per-tensor scalars
        ``trust_ratio/<name>``, ``weight_norm/<name>`` and ``update_norm/<name>``. Non-finite values are left out
        of the histograms. Needs the optional ``tensorboard`` package (raises ImportError without it).
        """
        writer = summary_writer(log_dir, "TrustMonitor.to_tensorboard")
        try:
            for step, rows in rows_by_step(self.records).items():
                for quantity in QUANTITIES:
                    values = [row[quantity] for row in rows if math.isfinite(row[quantity])]
                    if values:
                        writer.add_histogram(f"histograms/{quantity}", torch.tensor(values, dtype=torch.float64),
                                             global_step=step)
                    for row in rows:
                        writer.add_scalar(f"{quantity}/{row['name']}", row[quantity], global_step=step)
        finally:
            writer.close()

    # -- plots (drawn by trust_plots.py) -----------------------------------------------------------------------
    def plot_ratios(self, path: str | Path, title: str | None = None) -> Path:
        """Plot each tensor's trust ratio against the step, one line per tensor, log-scale y; save as PNG.

        A dashed line marks r = 1 (the step the optimizer would take without the ratio). Up to 12 tensors are named
        in a legend; with more, lines are coloured by the tensor's order in the model (dark: first, light: last).
        Non-positive and NaN ratios cannot sit on a log axis and are left out. Returns the path.
        """
        return trust_plots.plot_ratios(self.records, path, title)

    def plot_histograms(self, path: str | Path, title: str | None = None, quantity: str = "trust_ratio") -> Path:
        """Plot, for each recorded step, a histogram of ``quantity`` across tensors, stacked as a ridge plot.

        Ben Mann's "histogram over time" view: the first recorded step is the top ridge, later steps are offset
        downwards; x is the value (its log10 when all values are positive and span two decades or more), each
        ridge's height is its count scaled to the ridge's own maximum. All ridges share the bins. With more than
        40 recorded steps, 40 evenly spaced ones (first and last included) are drawn. ``quantity`` is
        ``"trust_ratio"``, ``"weight_norm"`` or ``"update_norm"``. Returns the path of the PNG.
        """
        return trust_plots.plot_histograms(self.records, path, title, quantity)


# ----------------------------------------------------------------------------------------------------------------


def _lamb_ratio(weight_norm: float, update_norm: float) -> float:
    """LAMB's ratio ‖θ‖/‖u‖ with its fallback (1 if either norm is 0), as torchlamb.trust.trust_ratio; NaN stays NaN."""
    if math.isnan(weight_norm) or math.isnan(update_norm):
        return math.nan
    if weight_norm > 0 and update_norm > 0:
        return weight_norm / update_norm
    return 1.0


def _names_by_id(names: dict | None) -> dict[int, str]:
    """Turn ``{name: tensor}`` or ``{tensor: name}`` into ``{id(tensor): name}``."""
    if names is None:
        return {}
    if not isinstance(names, dict):
        raise TypeError(f"names must be a dict {{name: tensor}} or {{tensor: name}}, got {type(names).__name__}")
    by_id = {}
    for key, value in names.items():
        if isinstance(key, str) and isinstance(value, Tensor):
            by_id[id(value)] = key
        elif isinstance(key, Tensor) and isinstance(value, str):
            by_id[id(key)] = value
        else:
            raise TypeError(f"names must map str to Tensor or Tensor to str, got an item "
                            f"{type(key).__name__} -> {type(value).__name__}")
    return by_id
