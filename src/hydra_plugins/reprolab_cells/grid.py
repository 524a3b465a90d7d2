"""Paper grids: the cells of a paper table generated from one file per row and one per column.

Layout (under the primary config dir, `configs/cells/`; see `configs/cells/README.md`):

    cells/<grid>/grid.yaml        Hydra config, `# @package _global_`: what every cell of the grid
                                  shares (paper id, metric, seeds, tags, model/trainer choices)
    cells/<grid>/rows/<row>.yaml  Hydra config, `# @package _global_`: one method (`override
                                  /method: ...`) and its dataset-independent hyperparameters
    cells/<grid>/cols/<col>.yaml  column spec (read here, not by Hydra): `data` (the data group),
                                  `model` (the model group, optional),
                                  `defaults` (more group choices, e.g. `{/method/optim: bert_adamw}`),
                                  `table` (paper.table), `extends` (another column of the grid),
                                  `common` (values for every row), `rows` (values per row),
                                  `reported` (the paper's number per row)

Cell `<row>_<col>` of a grid is served as the config `experiment/<row>_<col>`:

    # @package _global_
    defaults:
      - <col.defaults ...>                   # e.g. /method/optim: bert_adamw (text columns)
      - /cells/<grid>/grid
      - /cells/<grid>/rows/<row>
      - override /data: <col.data>
      - _self_
    <col.common, then col.rows[row]>         # a column that extends another: that column's first
    paper: {row: <row>, col: <col>, table: <col.table>, reported: <col.reported[row] or null>}

A real `experiment/<name>.yaml` wins over a generated cell of the same name (the file source comes
first on Hydra's search path). `reported` is never inherited through `extends`.
"""

from __future__ import annotations

# No dataclasses here: Hydra's plugin scanner executes every module of `hydra_plugins` before it is
# in sys.modules, which @dataclass cannot handle.
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

#: Keys of a column spec.
COL_KEYS = ("data", "model", "defaults", "table", "extends", "common", "rows", "reported")
GROUP = "experiment"


class GridError(ValueError):
    """A grid's files are inconsistent (unknown key, unknown row, name clash, extends cycle)."""


class Cell(NamedTuple):
    """One generated experiment: row `row` x column `col` of grid `grid`."""

    name: str
    grid: str
    row: str
    col: str


def _close(name: str, options: list[str]) -> str:
    from reprolab.utils.naming import did_you_mean

    return did_you_mean(name, options)


class Grids:
    """Every grid under one `cells/` dir, read once (see `load`)."""

    def __init__(self, cells_dir: str | Path) -> None:
        self.cells_dir = Path(cells_dir)
        self.rows: dict[str, list[str]] = {}
        self.cols: dict[str, dict[str, dict[str, Any]]] = {}
        self.cells: dict[str, Cell] = {}
        grids = sorted(p.parent.name for p in self.cells_dir.glob("*/grid.yaml"))
        for grid in grids:
            gdir = self.cells_dir / grid
            self.rows[grid] = sorted(p.stem for p in (gdir / "rows").glob("*.yaml"))
            self.cols[grid] = {
                p.stem: self._load_col(grid, p) for p in sorted((gdir / "cols").glob("*.yaml"))
            }
            for col in self.cols[grid]:
                self._chain(grid, col)  # extends cycles and unknown parents fail here
                for row in self.rows[grid]:
                    name = f"{row}_{col}"
                    other = self.cells.get(name)
                    if other is not None:
                        raise GridError(
                            f"cell name '{name}' is generated twice: grid {other.grid} row "
                            f"{other.row} x col {other.col}, and grid {grid} row {row} x col "
                            f"{col}. Rename a row or a column (names are <row>_<col>)."
                        )
                    self.cells[name] = Cell(name, grid, row, col)

    def _load_col(self, grid: str, path: Path) -> dict[str, Any]:
        where = f"{path.relative_to(self.cells_dir.parent)}"
        spec = OmegaConf.load(path)
        if spec is None:
            spec = OmegaConf.create({})
        if not isinstance(spec, DictConfig):
            raise GridError(f"{where}: a column spec must be a mapping ({', '.join(COL_KEYS)})")
        for key in spec:
            if key not in COL_KEYS:
                raise GridError(
                    f"{where}: unknown key '{key}'; allowed: {', '.join(COL_KEYS)}"
                    f"{_close(str(key), list(COL_KEYS))}"
                )
        rows = self.rows[grid]
        for block in ("rows", "reported"):
            node = spec.get(block)
            if node is None:
                continue
            if not isinstance(node, DictConfig):
                raise GridError(f"{where}: `{block}` must map row -> values")
            for row in node:
                if row not in rows:
                    raise GridError(
                        f"{where}: {block}.{row}: unknown row '{row}' of grid {grid}; rows: "
                        f"{', '.join(rows)}{_close(str(row), rows)}"
                    )
        extra = spec.get("defaults")
        if extra is not None and not (
            OmegaConf.is_list(extra)
            and all(
                OmegaConf.is_dict(e) and len(e) == 1 and "override" not in str(next(iter(e)))
                for e in extra
            )
        ):
            raise GridError(
                f"{where}: `defaults` must list single group choices such as "
                "`- /method/optim: bert_adamw` (no `override`: data and model have their own keys)"
            )
        return {k: spec.get(k) for k in COL_KEYS}

    def _chain(self, grid: str, col: str) -> list[str]:
        """`col`, the column it extends, that one's, ... (most basic last)."""
        chain = [col]
        while (parent := self.cols[grid][chain[-1]]["extends"]) is not None:
            parent = str(parent)
            if parent not in self.cols[grid]:
                cols = sorted(self.cols[grid])
                raise GridError(
                    f"cells/{grid}/cols/{chain[-1]}.yaml: extends unknown column '{parent}'; "
                    f"columns: {', '.join(cols)}{_close(parent, cols)}"
                )
            if parent in chain:
                raise GridError(f"cells/{grid}/cols: extends cycle {' -> '.join([*chain, parent])}")
            chain.append(parent)
        return chain

    def names(self) -> list[str]:
        return sorted(self.cells)

    def experiment(self, name: str) -> DictConfig:
        """The `experiment/<name>` config of a generated cell (with its `defaults` list)."""
        cell = self.cells[name]
        chain = [self.cols[cell.grid][c] for c in reversed(self._chain(cell.grid, cell.col))]
        data = next((c["data"] for c in reversed(chain) if c["data"] is not None), None)
        model = next((c["model"] for c in reversed(chain) if c["model"] is not None), None)
        table = next((c["table"] for c in reversed(chain) if c["table"] is not None), None)
        body = OmegaConf.create({})
        for spec in chain:  # most basic column first: a 32-shot column is its 16-shot one + values
            if spec["common"] is not None:
                body = OmegaConf.merge(body, spec["common"])
            if spec["rows"] is not None and spec["rows"].get(cell.row) is not None:
                body = OmegaConf.merge(body, spec["rows"][cell.row])
        own_reported = chain[-1]["reported"]
        reported = None if own_reported is None else own_reported.get(cell.row)
        paper: dict[str, Any] = {"row": cell.row, "col": cell.col}
        if table is not None:
            paper["table"] = str(table)
        paper["reported"] = reported
        # A column's own group choices come first: Hydra wants the `override` entries last, and
        # a fragment of the method group (package `method`) still merges after the method config,
        # which the primary config composes before any experiment; grid and row values win over it.
        extra = [OmegaConf.to_container(e) for c in chain if c["defaults"] for e in c["defaults"]]
        defaults: list[Any] = [
            *extra,
            f"/cells/{cell.grid}/grid",
            f"/cells/{cell.grid}/rows/{cell.row}",
        ]
        if data is not None:
            defaults.append({"override /data": str(data)})
        if model is not None:  # a column on another backbone (a row file may override it too)
            defaults.append({"override /model": str(model)})
        defaults.append("_self_")
        out = OmegaConf.create({"defaults": defaults})
        return OmegaConf.merge(out, body, {"paper": paper})


_CACHE: dict[str, tuple[tuple, Grids]] = {}


def load(cells_dir: str | Path) -> Grids:
    """The grids under `cells_dir`, re-read only when one of its YAML files changed."""
    cells_dir = Path(cells_dir).resolve()
    key = str(cells_dir)
    from reprolab.utils.files import yaml_tree_stamp

    fp = yaml_tree_stamp(cells_dir)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == fp:
        return hit[1]
    grids = Grids(cells_dir)
    _CACHE[key] = (fp, grids)
    return grids
