"""What the two telemetry recorders share: the lifetime of their hooks, and how their records are written out.

:class:`~torchlamb.TrustMonitor` (``telemetry.py``) and :class:`~torchlamb.noise_scale.NoiseScale`
(``noise_scale.py``) both hook into an optimizer, append one flat dict per tensor and record step to ``records``, and
write those records to files. Here are the pieces they have in common:

* :class:`Recorder`, the base of both: ``remove()`` and the ``with`` block that calls it;
* grouping records by step (:func:`rows_by_step`) or by tensor name (:func:`series_by_name`);
* files: :func:`prepare_path`, :func:`write_csv`, :func:`summary_writer` (TensorBoard, an optional dependency);
* figures: :func:`new_figure`, :func:`colormap` and :func:`save_figure`, matplotlib without pyplot.

matplotlib and tensorboard are imported only when a figure or an event file is written: training needs neither.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from torch.utils.hooks import RemovableHandle

_Self = TypeVar("_Self", bound="Recorder")


class Recorder:
    """The base of :class:`~torchlamb.TrustMonitor` and :class:`~torchlamb.noise_scale.NoiseScale`: the hooks' lifetime.

    A subclass registers its hooks and keeps their handles in ``_handles``; :meth:`remove`, or leaving a ``with``
    block, takes them all off.
    """

    _handles: list[RemovableHandle]

    def remove(self) -> None:
        """Remove the hooks: recording stops and the records stay. Calling it again does nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()


# -- records ---------------------------------------------------------------------------------------------------------
def rows_by_step(records: Iterable[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    """The records grouped by their ``step``, steps in the order they were recorded."""
    by_step: dict[int, list[Mapping[str, Any]]] = {}
    for row in records:
        by_step.setdefault(row["step"], []).append(row)
    return by_step


def series_by_name(records: Iterable[Mapping[str, Any]], quantity: str = "trust_ratio"
                   ) -> dict[str, list[tuple[int, float]]]:
    """Each tensor's (step, ``quantity``) points, tensors in the order they first appear (the model's order)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in records:
        series.setdefault(row["name"], []).append((row["step"], row[quantity]))
    return series


# -- files -----------------------------------------------------------------------------------------------------------
def prepare_path(path: str | Path) -> Path:
    """``path`` as a Path, its parent directories created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(path: str | Path, fields: Sequence[str], records: Iterable[Mapping[str, Any]]) -> Path:
    """Write a header row of ``fields``, then one row per record; return the path (parent directories created).

    Floats are written with Python's ``repr``, so reading them back with ``float`` gives the same numbers (NaN is
    written ``nan``).
    """
    path = prepare_path(path)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(records)
    return path


def summary_writer(log_dir: str | Path, caller: str) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing to ``log_dir``; ``caller`` names the method in the
    ImportError raised when the optional ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(f"{caller} needs the tensorboard package: pip install tensorboard") from error
    return SummaryWriter(log_dir=str(log_dir))


# -- figures ---------------------------------------------------------------------------------------------------------
def new_figure(figsize: tuple[float, float]) -> Any:
    """A figure with its own Agg canvas: no pyplot, so no global state, no GUI backend and nothing to close."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("torchlamb's plots need the matplotlib package: pip install matplotlib") from error
    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    return figure


def colormap(name: str) -> Any:
    """The matplotlib colormap called ``name``."""
    import matplotlib

    return matplotlib.colormaps[name]


def save_figure(figure: Any, path: str | Path) -> Path:
    """Save ``figure`` as a PNG at ``path`` (parent directories created) and return the path."""
    path = prepare_path(path)
    figure.savefig(path, format="png", dpi=120)
    figure.clear()  # drop the artists now rather than when the garbage collector finds the figure
    return path
