"""Ours vs paper, per column: grouped bars (error bars = sample std over seeds).

Drawn with the Agg canvas directly (no pyplot state, no display) and saved without the
`Software` PNG text chunk, so the same results give the same bytes on the same matplotlib.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reprolab.tables.aggregate import TableResult


def plot_table(result: TableResult, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    spec = result.spec
    cells = {(c.row, c.col): c for c in result.cells}
    n_rows, n_cols = len(spec.rows), len(spec.cols)
    width = 0.8 / max(n_rows, 1)
    # Constrained layout makes room for the wrapped title, the tick labels and the outside legend,
    # so none of them is clipped or overlaps its neighbour.
    fig_w = max(5.0, 1.2 + n_cols * max(0.35 * n_rows + 0.4, 1.3))
    fig = Figure(figsize=(fig_w, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    palette = [f"C{i % 10}" for i in range(n_rows)]
    for i, r in enumerate(spec.rows):
        for j, c in enumerate(spec.cols):
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
        [textwrap.fill(spec.label(c), 16) for c in spec.cols],
        rotation=30 if n_cols > 4 else 0,
        ha="right" if n_cols > 4 else "center",
    )
    ax.set_xlim(-0.6, n_cols - 0.4)
    ax.set_ylabel(spec.metric)
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
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path
