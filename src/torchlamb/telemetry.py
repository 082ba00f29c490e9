"""TrustMonitor: watch the layer-wise trust ratio of any optimizer every N steps, then export or plot it.

For every parameter tensor θ (a "layer") the monitor records, on its record steps::

    weight_norm = ‖θ‖          before the step
    update_norm = ‖u‖          the direction the step applied, θ ← θ − lr·r·u
    trust_ratio = r

For :class:`~torchlamb.Lamb` and :class:`~torchlamb.Lars` these are what the trust stage used
(``optimizer.trust_stats``). For any other ``torch.optim`` optimizer the monitor measures the update the
optimizer made, ``u = (θ_before − θ_after) / lr``, and records the ratio LAMB would have used for it,
``r = ‖θ_before‖ / ‖u‖`` (1 if either norm is 0), as seed 002 did for Adam. In seed 002's names ``weight_norm``
is r1, ``update_norm`` is r2 and ``trust_ratio`` is r.

Reading device values forces a host-device sync, so the monitor reads them only on record steps (step 1 and
every ``every``-th step) and does nothing else on the others.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from .trust import tensor_norms

#: The per-tensor quantities a record holds (and ``plot_histograms`` can plot).
QUANTITIES = ("weight_norm", "update_norm", "trust_ratio")
#: The keys of a :class:`TrustRecord`, in the order of the CSV columns.
FIELDS = ("step", "name", "group", *QUANTITIES)

# Labels for the plots' axes.
_LABELS = {"weight_norm": "weight norm ‖θ‖", "update_norm": "update norm ‖u‖", "trust_ratio": "trust ratio r"}

# Above this many lines plot_ratios colours lines by layer order instead of naming each in a legend.
_MAX_LEGEND_ENTRIES = 12
# Above this many recorded steps plot_histograms draws this many, evenly spaced: more ridges are unreadable.
_MAX_RIDGES = 40


class TrustRecord(TypedDict):
    """One row of :attr:`~torchlamb.TrustMonitor.records`: one parameter tensor at one recorded step."""

    step: int
    name: str
    group: int
    weight_norm: float
    update_norm: float
    trust_ratio: float


class TrustMonitor:
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

    # -- hooks' lifetime ---------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove the hooks: the monitor stops recording and keeps its records. Calling it again does nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._snapshot = []

    def __enter__(self) -> TrustMonitor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    # -- export ------------------------------------------------------------------------------------------------
    def to_csv(self, path: str | Path) -> Path:
        """Write :attr:`records` as CSV (a header row of :data:`~torchlamb.telemetry.FIELDS`, then one row per
        record); return the path.

        Floats are written with Python's ``repr``, so reading them back with ``float`` gives the same numbers
        (NaN is written ``nan``). Parent directories are created.
        """
        path = _prepare(path)
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.records)
        return path

    def to_jsonl(self, path: str | Path) -> Path:
        """Write :attr:`records` as JSON Lines, one object per record; return the path.

        NaN is written as ``NaN``, as Python's ``json`` module writes and reads it. Parent directories are created.
        """
        path = _prepare(path)
        with path.open("w", encoding="utf-8") as file:
            for record in self.records:
                file.write(json.dumps(record) + "\n")
        return path

    def to_tensorboard(self, log_dir: str | Path) -> None:
        """Write the records to TensorBoard event files in ``log_dir``.

        For each recorded step: histograms ``histograms/weight_norm``, ``histograms/update_norm`` and
        ``histograms/trust_ratio`` over all tensors (the view of seed 002), and per-tensor scalars
        ``trust_ratio/<name>``, ``weight_norm/<name>`` and ``update_norm/<name>``. Non-finite values are left out
        of the histograms. Needs the optional ``tensorboard`` package (raises ImportError without it).
        """
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError("TrustMonitor.to_tensorboard needs the tensorboard package: pip install tensorboard"
                              ) from error
        writer = SummaryWriter(log_dir=str(log_dir))
        try:
            for step, rows in _rows_by_step(self.records).items():
                for quantity in QUANTITIES:
                    values = [row[quantity] for row in rows if math.isfinite(row[quantity])]
                    if values:
                        writer.add_histogram(f"histograms/{quantity}", torch.tensor(values, dtype=torch.float64),
                                             global_step=step)
                    for row in rows:
                        writer.add_scalar(f"{quantity}/{row['name']}", row[quantity], global_step=step)
        finally:
            writer.close()

    # -- plots -------------------------------------------------------------------------------------------------
    def plot_ratios(self, path: str | Path, title: str | None = None) -> Path:
        """Plot each tensor's trust ratio against the step, one line per tensor, log-scale y; save as PNG.

        A dashed line marks r = 1 (the step the optimizer would take without the ratio). Up to 12 tensors are named
        in a legend; with more, lines are coloured by the tensor's order in the model (dark: first, light: last).
        Non-positive and NaN ratios cannot sit on a log axis and are left out. Returns the path.
        """
        if not self.records:
            raise RuntimeError("TrustMonitor has no records to plot yet: step the optimizer first")
        figure = _new_figure(figsize=(8.0, 4.5))
        axes = figure.add_subplot()
        series = _series_by_name(self.records)
        colormap = _colormap("viridis")
        many = len(series) > _MAX_LEGEND_ENTRIES
        marker = "o" if len({row["step"] for row in self.records}) <= 30 else None
        for index, (name, points) in enumerate(series.items()):
            steps = [step for step, _ in points]
            ratios = [ratio if ratio > 0 else math.nan for _, ratio in points]  # NaN stays NaN: a gap in the line
            color = colormap(index / max(len(series) - 1, 1)) if many else None
            axes.plot(steps, ratios, label=name, color=color, marker=marker, markersize=3, linewidth=1.2)
        axes.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
        axes.set_yscale("log")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("trust ratio r = ‖θ‖ / ‖u‖ (log scale)")
        axes.set_title(title if title is not None else "Trust ratio per tensor")
        axes.grid(True, which="major", alpha=0.3)
        if many:
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            mappable = ScalarMappable(norm=Normalize(0, len(series) - 1), cmap=colormap)
            figure.colorbar(mappable, ax=axes, label="tensor index in the model (first → last)")
        else:
            axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small",
                        title="tensor")
        return _save(figure, path)

    def plot_histograms(self, path: str | Path, title: str | None = None, quantity: str = "trust_ratio") -> Path:
        """Plot, for each recorded step, a histogram of ``quantity`` across tensors, stacked as a ridge plot.

        Seed 002's "histogram over time" view: the first recorded step is the top ridge, later steps are offset
        downwards; x is the value (its log10 when all values are positive and span two decades or more), each
        ridge's height is its count scaled to the ridge's own maximum. All ridges share the bins. With more than
        40 recorded steps, 40 evenly spaced ones (first and last included) are drawn. ``quantity`` is
        ``"trust_ratio"``, ``"weight_norm"`` or ``"update_norm"``. Returns the path of the PNG.
        """
        if quantity not in QUANTITIES:
            raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
        if not self.records:
            raise RuntimeError("TrustMonitor has no records to plot yet: step the optimizer first")
        import numpy as np

        by_step = _rows_by_step(self.records)
        steps = list(by_step)
        if len(steps) > _MAX_RIDGES:
            keep = np.unique(np.linspace(0, len(steps) - 1, _MAX_RIDGES).round().astype(int))
            steps = [steps[i] for i in keep]
        values = {step: np.array([row[quantity] for row in by_step[step]], dtype=float) for step in steps}
        values = {step: v[np.isfinite(v)] for step, v in values.items()}
        everything = np.concatenate(list(values.values()))
        log = everything.size > 0 and everything.min() > 0 and everything.max() / everything.min() >= 100
        if log:
            values = {step: np.log10(v) for step, v in values.items()}
            everything = np.log10(everything)
        low, high = (everything.min(), everything.max()) if everything.size else (0.0, 1.0)
        if high - low < 1e-12:  # one value everywhere: give the bins some width
            low, high = low - 0.5, high + 0.5
        tensors = max(len(v) for v in values.values())
        edges = np.linspace(low, high, int(np.clip(4 * math.sqrt(max(tensors, 1)), 10, 40)) + 1)

        height = 1.6  # a ridge's peak, in units of the spacing between ridges: neighbours overlap a little
        figure = _new_figure(figsize=(7.5, float(np.clip(1.5 + 0.32 * len(steps), 3.5, 14.0))))
        axes = figure.add_subplot()
        colormap = _colormap("viridis")
        for index, step in enumerate(steps):
            baseline = -float(index)
            counts, _ = np.histogram(values[step], bins=edges)
            tops = baseline + height * counts / max(counts.max(), 1)
            color = colormap(index / max(len(steps) - 1, 1))
            # Later ridges are drawn over earlier ones: each hides the baseline region of the one above it.
            axes.stairs(tops, edges, baseline=baseline, fill=True, color=color, alpha=0.9, zorder=2 * index)
            # The outline runs along the baseline where a bin is empty, so every ridge reads as one curve.
            axes.stairs(tops, edges, baseline=baseline, fill=False, color="0.15", linewidth=0.7,
                        zorder=2 * index + 1)
        if quantity == "trust_ratio":
            one = 0.0 if log else 1.0
            if low <= one <= high:
                axes.axvline(one, color="0.3", linestyle="--", linewidth=0.8, zorder=10 * len(steps))
        label_every = max(1, math.ceil(len(steps) / 20))
        axes.set_yticks([-float(i) for i in range(0, len(steps), label_every)])
        axes.set_yticklabels([str(steps[i]) for i in range(0, len(steps), label_every)])
        axes.set_ylim(-len(steps) + 0.5, height + 0.3)
        axes.set_xlim(edges[0], edges[-1])
        axes.set_ylabel("step (first at top)")
        axes.set_xlabel(f"log10({_LABELS[quantity]})" if log else _LABELS[quantity])
        axes.spines[["left", "right", "top"]].set_visible(False)
        axes.tick_params(axis="y", length=0)
        default = f"{_LABELS[quantity].capitalize()} across {tensors} tensors, per recorded step"
        axes.set_title(title if title is not None else default)
        return _save(figure, path)


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


def _rows_by_step(records: list[TrustRecord]) -> dict[int, list[TrustRecord]]:
    by_step: dict[int, list[TrustRecord]] = {}
    for row in records:
        by_step.setdefault(row["step"], []).append(row)
    return by_step


def _series_by_name(records: list[TrustRecord]) -> dict[str, list[tuple[int, float]]]:
    """Each tensor's (step, trust ratio) points, tensors in the order they first appear (the model's order)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in records:
        series.setdefault(row["name"], []).append((row["step"], row["trust_ratio"]))
    return series


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _new_figure(figsize: tuple[float, float]) -> Any:
    """A figure with its own Agg canvas: no pyplot, so no global state, no GUI backend and nothing to close."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("TrustMonitor's plots need the matplotlib package: pip install matplotlib") from error
    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    return figure


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def _save(figure: Any, path: str | Path) -> Path:
    path = _prepare(path)
    figure.savefig(path, format="png", dpi=120)
    figure.clear()  # drop the artists now rather than when the garbage collector finds the figure
    return path
