"""Ours vs paper, per column: grouped bars (error bars = sample std over seeds).

A metric-column table (`table.col_metrics`) gets one panel per kind of metric, the last path
segment of the key (`acc`, `ece`, ...), in the order the columns first use it, so percentages and
fractions never share an axis. Panels are stacked and share the column spacing of the widest.
A table with an average column (`table.average`) draws it after the last column (no error bar).

Drawn with the Agg canvas directly (no pyplot state, no display) and saved without the
`Software` PNG text chunk, so the same results give the same bytes on the same matplotlib.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reprolab.tables.aggregate import TableResult
    from reprolab.tables.schema import TableSpec


def _panels(spec: TableSpec) -> list[tuple[str, list[str]]]:
    """(y label, columns) per panel: one for a single-metric table, one per kind of metric else."""
    if not spec.metric_columns:
        average = [spec.average.col] if spec.average is not None else []
        return [(str(spec.metric), list(spec.cols) + average)]
    panels: dict[str, list[str]] = {}
    for c in spec.cols:
        kind = spec.metric_of(c).rsplit("/", 1)[-1]
        scale = spec.scale_of(c)
        panels.setdefault(kind if scale == 1.0 else f"{kind} ×{scale:g}", []).append(c)
    return list(panels.items())


def _draw(ax: Any, result: TableResult, cols: list[str], palette: list[str], slots: int) -> None:
    """Grouped bars of `cols` (one bar per row) with the paper's numbers as black ticks, on an
    x axis of `slots` column places."""
    spec = result.spec
    cells: dict[tuple[str, str], Any] = {(c.row, c.col): c for c in result.cells}
    cells.update({(a.row, a.col): a for a in result.averages})  # `table.average`, if any
    n_rows, n_cols = len(spec.rows), len(cols)
    width = 0.8 / max(n_rows, 1)
    for i, r in enumerate(spec.rows):
        for j, c in enumerate(cols):
            cell = cells[(r, c)]
            x = j - 0.4 + width * (i + 0.5)
            if cell.mean is not None:
                ax.bar(
                    x,
                    cell.mean,
                    width=width * 0.9,
                    color=palette[i],
                    yerr=cell.std,  # None (no bar) for a single seed
                    capsize=2,
                    error_kw={"elinewidth": 0.8},
                )
            if cell.reported is not None:
                ax.plot([x], [cell.reported], marker="_", markersize=12, mew=2, color="black")
    ax.set_xticks(list(range(n_cols)))
    ax.set_xticklabels(
        [textwrap.fill(spec.label(c), 16) for c in cols],
        rotation=30 if n_cols > 4 else 0,
        ha="right" if n_cols > 4 else "center",
    )
    ax.set_xlim(-0.6, slots - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_table(result: TableResult, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    spec = result.spec
    panels = _panels(spec)
    n_rows = len(spec.rows)
    slots = max(len(cols) for _, cols in panels)
    # Constrained layout makes room for the wrapped title, the tick labels and the outside legend,
    # so none of them is clipped or overlaps its neighbour.
    fig_w = max(5.0, 1.2 + slots * max(0.35 * n_rows + 0.4, 1.3))
    fig_h = 4.4 if len(panels) == 1 else 0.8 + 3.4 * len(panels)
    fig = Figure(figsize=(fig_w, fig_h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    palette = [f"C{i % 10}" for i in range(n_rows)]
    axes = [fig.add_subplot(len(panels), 1, i + 1) for i in range(len(panels))]
    for ax, (ylabel, cols) in zip(axes, panels, strict=True):
        _draw(ax, result, cols, palette, slots)
        ax.set_ylabel(ylabel)
    fig.suptitle(textwrap.fill(spec.title, max(30, int(fig_w * 12))), fontsize=9)
    handles = [Patch(color=palette[i], label=spec.label(r)) for i, r in enumerate(spec.rows)]
    if spec.reported:
        handles.append(
            Line2D([], [], color="black", marker="_", markersize=12, mew=2, ls="", label="paper")
        )
    fig.legend(
        handles=handles,
        fontsize=7,
        loc="outside lower center",  # below the axes: never under the title or the labels
        ncols=min(len(handles), max(2, int(fig_w // 1.6))),
        frameon=False,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path
