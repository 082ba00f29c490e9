"""The two figures of :class:`~torchlamb.TrustMonitor`'s records: trust ratio against step, and histograms over time.

:func:`plot_ratios` draws one line per tensor; :func:`plot_histograms` stacks, for each recorded step, a histogram
across tensors as a ridge plot: the "histogram over time" view of Ben Mann's "An intuitive understanding of the LAMB
optimizer" (2019). Both take the monitor's records (:class:`~torchlamb.telemetry.TrustRecord` dicts) and write a
PNG; :meth:`TrustMonitor.plot_ratios <torchlamb.TrustMonitor.plot_ratios>` and
:meth:`TrustMonitor.plot_histograms <torchlamb.TrustMonitor.plot_histograms>` call them. They need matplotlib
(and numpy), imported when a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .records import colormap, new_figure, rows_by_step, save_figure, series_by_name

#: Each quantity :func:`plot_histograms` can plot, with the label of its axis.
LABELS = {"weight_norm": "weight norm ‖θ‖", "update_norm": "update norm ‖u‖", "trust_ratio": "trust ratio r"}

# Above this many lines plot_ratios colours lines by layer order instead of naming each in a legend.
_MAX_LEGEND_ENTRIES = 12
# Above this many recorded steps plot_histograms draws this many, evenly spaced: more ridges are unreadable.
_MAX_RIDGES = 40


def plot_ratios(records: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """The figure of :meth:`TrustMonitor.plot_ratios <torchlamb.TrustMonitor.plot_ratios>` (which describes it),
    drawn from ``records`` and saved as a PNG at ``path``; returns the path."""
    _check_not_empty(records)
    figure = new_figure(figsize=(8.0, 4.5))
    axes = figure.add_subplot()
    series = series_by_name(records)
    colors = colormap("viridis")
    many = len(series) > _MAX_LEGEND_ENTRIES
    marker = "o" if len({row["step"] for row in records}) <= 30 else None
    for index, (name, points) in enumerate(series.items()):
        steps = [step for step, _ in points]
        ratios = [ratio if ratio > 0 else math.nan for _, ratio in points]  # NaN stays NaN: a gap in the line
        color = colors(index / max(len(series) - 1, 1)) if many else None
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

        mappable = ScalarMappable(norm=Normalize(0, len(series) - 1), cmap=colors)
        figure.colorbar(mappable, ax=axes, label="tensor index in the model (first → last)")
    else:
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small",
                    title="tensor")
    return save_figure(figure, path)


def plot_histograms(records: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None,
                    quantity: str = "trust_ratio") -> Path:
    """The ridge plot of :meth:`TrustMonitor.plot_histograms <torchlamb.TrustMonitor.plot_histograms>` (which
    describes it), drawn from ``records`` and saved as a PNG at ``path``; returns the path."""
    if quantity not in LABELS:
        raise ValueError(f"quantity must be one of {tuple(LABELS)}, got {quantity!r}")
    _check_not_empty(records)
    import numpy as np

    by_step = rows_by_step(records)
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
    figure = new_figure(figsize=(7.5, float(np.clip(1.5 + 0.32 * len(steps), 3.5, 14.0))))
    axes = figure.add_subplot()
    colors = colormap("viridis")
    for index, step in enumerate(steps):
        baseline = -float(index)
        counts, _ = np.histogram(values[step], bins=edges)
        tops = baseline + height * counts / max(counts.max(), 1)
        color = colors(index / max(len(steps) - 1, 1))
        # Later ridges are drawn over earlier ones: each hides the baseline region of the one above it.
        axes.stairs(tops, edges, baseline=baseline, fill=True, color=color, alpha=0.9, zorder=2 * index)
        # The outline runs along the baseline where a bin is empty, so every ridge reads as one curve.
        axes.stairs(tops, edges, baseline=baseline, fill=False, color="0.15", linewidth=0.7, zorder=2 * index + 1)
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
    axes.set_xlabel(f"log10({LABELS[quantity]})" if log else LABELS[quantity])
    axes.spines[["left", "right", "top"]].set_visible(False)
    axes.tick_params(axis="y", length=0)
    default = f"{LABELS[quantity].capitalize()} across {tensors} tensors, per recorded step"
    axes.set_title(title if title is not None else default)
    return save_figure(figure, path)


def _check_not_empty(records: Sequence[Mapping[str, Any]]) -> None:
    if not records:
        raise RuntimeError("TrustMonitor has no records to plot yet: step the optimizer first")
