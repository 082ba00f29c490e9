"""Figures and the Markdown report the experiments write (``report/README.md`` and its PNGs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def new_figure(columns: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib Figure with ``columns`` axes, drawn off-screen (no global pyplot state, works headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Summary:
    """What one experiment reports: what it shows (text), a results table, and its figures (path, caption)."""

    title: str
    text: str
    headers: list[str]
    rows: list[list[object]]
    figures: list[tuple[Path, str]] = field(default_factory=list)


def write_report(out: Path, title: str, intro: str, summaries: Sequence[Summary]) -> Path:
    """Write ``out/README.md``: the intro, then per experiment its text, table and figures (relative links)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n", intro + "\n"]
    for summary in summaries:
        parts.append(f"## {summary.title}\n\n{summary.text}\n")
        parts.append(markdown_table(summary.headers, summary.rows) + "\n")
        for path, caption in summary.figures:
            relative = Path(path).resolve().relative_to(out.resolve()).as_posix()
            parts.append(f"![{caption}]({relative})\n\n*{caption}*\n")
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path
