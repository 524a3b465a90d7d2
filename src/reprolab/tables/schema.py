"""Paper-table configs (`configs/table/<name>.yaml`): loading and validation.

A table file pins one table of one paper: its layout (rows × cols), the experiment config that
produces each cell, the seeds, the metric and the paper's numbers. Validation reads the YAML files
with plain OmegaConf (no Hydra runtime), so it runs from `train.py` before any job is launched,
from tests, and from `scripts/aggregate.py`.

Source of truth for the paper's numbers: the table's `reported` block. An experiment's
`paper.reported` is informational; when both are given and disagree (or only the experiment has
one) validation emits a warning and aggregation uses the table's value.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

#: Keys of the `table:` block. Required ones have no default here.
TABLE_KEYS_REQUIRED = ("name", "paper", "id", "metric", "rows", "cols", "experiments", "seeds")
TABLE_KEYS_OPTIONAL: dict[str, Any] = {
    "title": None,  # defaults to the table name
    "source": None,  # where the numbers come from, e.g. "CVPR 2023, Table 2"
    "decimals": 1,  # digits after the point in .md/.csv
    "reported": {},  # {row: {col: number | null}}
    "labels": {},  # optional display names {row_or_col_value: "Pretty name"} for .md/.png
    "notes": None,  # free text printed under the title in the .md
}
TABLE_KEYS = TABLE_KEYS_REQUIRED + tuple(TABLE_KEYS_OPTIONAL)

#: Metric keys a table may aggregate (what methods log, see docs/CONTRACTS.md), as shown to users.
METRIC_CHOICES = (
    "test/acc",
    "test/ece",
    "test/<set>/acc",
    "test/<set>/ece",
    "test/worst_group_acc",
    "test/<set>/worst_group_acc",
    "train/queries",
)
_METRIC_RE = re.compile(
    r"^(test/(acc|ece|worst_group_acc)|test/[A-Za-z0-9_.\-]+/(acc|ece|worst_group_acc)"
    r"|train/queries)$"
)

#: Sweeper parameters that define a job; any other swept key would put several jobs in one run dir.
SWEEP_KEYS = ("experiment", "seed")


class TableConfigError(ValueError):
    """A table config is inconsistent; `errors` lists every problem found (not just the first)."""

    def __init__(self, name: str, path: Path | str, errors: list[str]) -> None:
        self.name = name
        self.path = Path(path)
        self.errors = list(errors)
        bullet = "\n  - ".join(self.errors)
        super().__init__(f"Table '{name}' ({path}) is invalid:\n  - {bullet}")


@dataclass(frozen=True)
class ExperimentInfo:
    """The `paper` block of one experiment config (the cell it produces)."""

    name: str
    row: str
    col: str
    paper_id: str
    table_id: str
    metric: str | None
    reported: float | None
    seeds: list[int] | None
    path: Path


@dataclass
class TableSpec:
    """A validated table config. Row/col order is display order."""

    name: str
    paper: str
    id: str
    title: str
    source: str | None
    metric: str
    decimals: int
    rows: list[str]
    cols: list[str]
    experiments: list[str]
    seeds: list[int]
    reported: dict[tuple[str, str], float]  # (row, col) -> paper's number; absent = unknown
    cells: dict[tuple[str, str], str]  # (row, col) -> experiment producing it
    labels: dict[str, str] = field(default_factory=dict)
    notes: str | None = None
    warnings: list[str] = field(default_factory=list)
    path: Path | None = None

    def cell_id(self, row: str, col: str) -> str:
        """The run identity prefix `${paper.id}.${paper.table}.${paper.row}.${paper.col}`."""
        return f"{self.paper}.{self.id}.{row}.{col}"

    def label(self, key: str) -> str:
        return str(self.labels.get(key, key))

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    @property
    def n_jobs(self) -> int:
        return len(self.cells) * len(self.seeds)


def _choices(config_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def _unknown(kind: str, name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    avail = ", ".join(options) if options else "(none)"
    return f"Unknown {kind} '{name}'; available: {avail}{hint}"


def _resolve(node: Any, what: str, errors: list[str]) -> Any:
    """Plain Python value of an OmegaConf node; interpolations must resolve within the file."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception as exc:  # noqa: BLE001 - any resolution failure is a config error here
        errors.append(
            f"{what}: cannot resolve interpolation ({type(exc).__name__}: {exc}); table and "
            "experiment `paper` blocks must be literal values (no ${...} to other groups)."
        )
        return None


def _load_experiment(config_dir: Path, name: str, seen: tuple[str, ...] = ()) -> DictConfig:
    """Load `experiment/<name>.yaml`, merging experiment configs it pulls in via `defaults`.

    Only defaults entries that name another experiment (`/experiment/<x>` or a bare `<x>` in the
    same group) are followed; `override /group: ...` entries do not touch the `paper` block.
    The file's own keys win over its defaults (Hydra's `_self_`-last order).
    """
    path = config_dir / "experiment" / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path} is not a mapping")
    merged = OmegaConf.create()
    for entry in cfg.get("defaults") or []:
        if not isinstance(entry, str) or entry == "_self_":
            continue
        base = entry.removeprefix("/experiment/") if entry.startswith("/experiment/") else entry
        if "/" in base or base in seen:
            continue
        if (config_dir / "experiment" / f"{base}.yaml").is_file():
            merged = OmegaConf.merge(merged, _load_experiment(config_dir, base, (*seen, name)))
    own = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "defaults"])
    return OmegaConf.merge(merged, own)


def _package_header(path: Path) -> str | None:
    """The `# @package` of a config file, read as Hydra does: only from the leading `# @` lines.

    A plain comment before `# @package _global_` ends Hydra's header, so the directive is ignored
    and the file lands under its group (`table.table.*`, `experiment.paper.*`) without any error.
    """
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        m = re.match(r"^#\s*@package\s+(\S+)\s*$", line)
        if m:
            return m.group(1)
        if not re.match(r"^#\s*@", line):
            return None
    return None


def _check_global(path: Path, what: str, errors: list[str]) -> None:
    if _package_header(path) != "_global_":
        errors.append(
            f"{what}: the first line of {path.name} must be `# @package _global_` (Hydra reads the "
            "directive only before any other line, comments included)"
        )


def _as_str_list(value: Any, key: str, errors: list[str]) -> list[str]:
    if not isinstance(value, list) or not value:
        errors.append(f"table.{key} must be a non-empty list, got {value!r}")
        return []
    out = [str(v) for v in value]
    dups = sorted({v for v in out if out.count(v) > 1})
    if dups:
        errors.append(f"table.{key} lists {', '.join(dups)} more than once")
    return out


def _as_seed_list(value: Any, what: str, errors: list[str]) -> list[int]:
    if not isinstance(value, list) or not value:
        errors.append(f"{what} must be a non-empty list of integers, got {value!r}")
        return []
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        errors.append(f"{what} must hold integers; got {bad!r}")
        return []
    dups = sorted({v for v in value if value.count(v) > 1})
    if dups:
        errors.append(f"{what} lists seed(s) {dups} more than once")
    return list(value)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _GroupOptions:
    """The one ConfigLoader method Hydra's override parser needs to expand `glob(...)`."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir

    def get_group_options(self, group_name: str, results_filter: Any = None, **_: Any) -> list[str]:
        return _choices(self.config_dir, group_name)


def _expand_sweep(key: str, value: Any, config_dir: Path) -> list[str]:
    """Values a Hydra sweep override `key=value` expands to (choice lists, range(), glob())."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if isinstance(value, list):  # a YAML list is not Hydra sweep syntax, but read it kindly
        value = ",".join(str(v) for v in value)
    parser = OverridesParser.create(config_loader=_GroupOptions(config_dir))  # type: ignore[arg-type]
    (override,) = parser.parse_overrides([f"{key}={value}"])  # sets the loader glob() needs
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    return [str(override.get_value_element_as_str())]


def _check_sweeper(
    cfg: DictConfig,
    spec_exps: list[str],
    seeds: list[int],
    config_dir: Path,
    errors: list[str],
    warnings: list[str],
) -> None:
    mode = OmegaConf.select(cfg, "hydra.mode")
    if str(mode) != "MULTIRUN":
        warnings.append(
            f"hydra.mode is {mode!r}; set `hydra: {{mode: MULTIRUN}}` so `table=<name>` sweeps "
            "without -m"
        )
    params = OmegaConf.select(cfg, "hydra.sweeper.params")
    if params is None:
        errors.append(
            "hydra.sweeper.params is missing; it must sweep `experiment` (= table.experiments) "
            "and `seed` (= table.seeds)"
        )
        return
    params = _resolve(params, "hydra.sweeper.params", errors)
    if not isinstance(params, dict):
        return
    for key in SWEEP_KEYS:
        if key not in params:
            errors.append(f"hydra.sweeper.params.{key} is missing (must equal table.{key}s)")
    for key, value in params.items():
        try:
            values = _expand_sweep(str(key), value, config_dir)
        except Exception as exc:  # noqa: BLE001 - parser errors are config errors
            errors.append(f"hydra.sweeper.params.{key}={value!r} does not parse: {exc}")
            continue
        if key == "experiment":
            got, want = set(values), set(spec_exps)
            if len(values) != len(got):
                errors.append("hydra.sweeper.params.experiment lists an experiment twice")
            if got != want:
                parts = []
                if want - got:
                    parts.append(f"not swept: {', '.join(sorted(want - got))}")
                if got - want:
                    parts.append(
                        f"swept but not in table.experiments: {', '.join(sorted(got - want))}"
                    )
                errors.append(
                    "hydra.sweeper.params.experiment must equal table.experiments ("
                    + "; ".join(parts)
                    + ")"
                )
        elif key == "seed":
            try:
                got_seeds = [int(v) for v in values]
            except ValueError:
                errors.append(f"hydra.sweeper.params.seed={value!r} must be integers")
                continue
            if sorted(got_seeds) != sorted(seeds):
                errors.append(
                    f"hydra.sweeper.params.seed sweeps {sorted(got_seeds)} but table.seeds is "
                    f"{sorted(seeds)}; they must be equal"
                )
        elif len(values) > 1:
            errors.append(
                f"hydra.sweeper.params.{key} sweeps {len(values)} values, but run dirs are "
                "`<cell>/seed<seed>`: jobs would overwrite each other. Make each value its own "
                "experiment (its own table cell) instead."
            )


def _check(name: str, config_dir: Path) -> tuple[TableSpec | None, list[str], list[str], Path]:
    """Validate; returns (spec or None, errors, warnings, path)."""
    config_dir = Path(config_dir)
    path = config_dir / "table" / f"{name}.yaml"
    errors: list[str] = []
    warnings: list[str] = []
    if not path.is_file():
        return None, [_unknown("table", name, _choices(config_dir, "table"))], warnings, path
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - YAML errors
        return None, [f"cannot parse YAML: {exc}"], warnings, path
    if not isinstance(cfg, DictConfig) or not isinstance(cfg.get("table"), DictConfig):
        return None, ["no `table:` block (see configs/table/*.yaml for the shape)"], warnings, path
    t = _resolve(cfg.table, "table", errors)
    if t is None:
        return None, errors, warnings, path
    _check_global(path, f"table {name}", errors)

    for key in t:
        if key not in TABLE_KEYS:
            close = difflib.get_close_matches(str(key), TABLE_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append(f"Unknown key table.{key}; allowed: {', '.join(TABLE_KEYS)}{hint}")
    for key in TABLE_KEYS_REQUIRED:
        if t.get(key) in (None, "", []):
            errors.append(f"table.{key} is required")
    t = {**TABLE_KEYS_OPTIONAL, **t}

    if t.get("name") not in (None, name):
        errors.append(f"table.name is '{t['name']}' but the file is {name}.yaml; they must match")
    for key in ("paper", "id"):
        if t.get(key) is not None and not isinstance(t[key], str):
            errors.append(f"table.{key} must be a string, got {t[key]!r}")
    metric = str(t.get("metric"))
    if t.get("metric") is not None and not _METRIC_RE.match(metric):
        errors.append(
            f"table.metric '{metric}' is not a key methods log; valid: {', '.join(METRIC_CHOICES)}"
        )
    decimals = t.get("decimals")
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 10:
        errors.append(f"table.decimals must be an integer in 0..10, got {decimals!r}")
        decimals = 1

    rows = _as_str_list(t.get("rows"), "rows", errors) if t.get("rows") is not None else []
    cols = _as_str_list(t.get("cols"), "cols", errors) if t.get("cols") is not None else []
    exps = (
        _as_str_list(t.get("experiments"), "experiments", errors)
        if t.get("experiments") is not None
        else []
    )
    seeds = _as_seed_list(t["seeds"], "table.seeds", errors) if t.get("seeds") is not None else []

    reported: dict[tuple[str, str], float] = {}
    rep = t.get("reported") or {}
    if not isinstance(rep, dict):
        errors.append(f"table.reported must map row -> {{col: number}}, got {rep!r}")
        rep = {}
    for r, row_vals in rep.items():
        r = str(r)
        if rows and r not in rows:
            errors.append(f"table.reported: {_unknown('row', r, rows)}")
        if not isinstance(row_vals, dict):
            errors.append(f"table.reported.{r} must map col -> number, got {row_vals!r}")
            continue
        for c, v in row_vals.items():
            c = str(c)
            if cols and c not in cols:
                errors.append(f"table.reported.{r}: {_unknown('col', c, cols)}")
            if v is None:
                continue
            if not _is_number(v):
                errors.append(f"table.reported.{r}.{c} must be a number or null, got {v!r}")
                continue
            reported[(r, c)] = float(v)

    labels = t.get("labels") or {}
    if not isinstance(labels, dict):
        errors.append(f"table.labels must map row/col values to display names, got {labels!r}")
        labels = {}

    valid_exps = _choices(config_dir, "experiment")
    cells: dict[tuple[str, str], str] = {}
    for exp in exps:
        if exp not in valid_exps:
            errors.append(_unknown("experiment", exp, valid_exps))
            continue
        info = _experiment_info(config_dir, exp, errors)
        if info is None:
            continue
        where = f"experiment {exp}"
        if t.get("paper") is not None and info.paper_id != t["paper"]:
            errors.append(
                f"{where}: paper.id is '{info.paper_id}' but table.paper is '{t['paper']}' "
                "(its runs would never match this table)"
            )
        if t.get("id") is not None and info.table_id != str(t["id"]):
            errors.append(
                f"{where}: paper.table is '{info.table_id}' but table.id is '{t['id']}' "
                "(its runs would never match this table)"
            )
        if rows and info.row not in rows:
            errors.append(f"{where}: paper.row — {_unknown('row', info.row, rows)}")
        if cols and info.col not in cols:
            errors.append(f"{where}: paper.col — {_unknown('col', info.col, cols)}")
        key = (info.row, info.col)
        if key in cells:
            errors.append(
                f"cell (row={info.row}, col={info.col}) is produced by both {cells[key]} and "
                f"{exp}; each cell must come from at most one experiment"
            )
        else:
            cells[key] = exp
        if info.metric is not None and info.metric != metric:
            warnings.append(
                f"{where}: paper.metric is '{info.metric}' but the table aggregates '{metric}'"
            )
        table_rep = reported.get(key)
        if info.reported is not None and table_rep != info.reported:
            warnings.append(
                f"{where}: paper.reported={info.reported} but table.reported.{info.row}.{info.col}"
                f"={table_rep}; the table's value is used"
            )
        if info.seeds is not None and seeds and sorted(info.seeds) != sorted(seeds):
            warnings.append(f"{where}: paper.seeds={info.seeds} differs from table.seeds={seeds}")

    _check_sweeper(cfg, exps, seeds, config_dir, errors, warnings)

    if errors:
        return None, errors, warnings, path
    spec = TableSpec(
        name=name,
        paper=t["paper"],
        id=str(t["id"]),
        title=str(t.get("title") or name),
        source=None if t.get("source") is None else str(t["source"]),
        metric=metric,
        decimals=int(decimals),
        rows=rows,
        cols=cols,
        experiments=exps,
        seeds=seeds,
        reported=reported,
        cells=cells,
        labels={str(k): str(v) for k, v in labels.items()},
        notes=None if t.get("notes") is None else str(t["notes"]).strip(),
        warnings=warnings,
        path=path,
    )
    return spec, errors, warnings, path


def _experiment_info(config_dir: Path, exp: str, errors: list[str]) -> ExperimentInfo | None:
    path = config_dir / "experiment" / f"{exp}.yaml"
    _check_global(path, f"experiment {exp}", errors)
    try:
        cfg = _load_experiment(config_dir, exp)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"experiment {exp}: cannot load {path}: {exc}")
        return None
    if not isinstance(cfg.get("paper"), DictConfig):
        errors.append(
            f"experiment {exp}: no `paper:` block (id, table, row, col, metric, reported)"
        )
        return None
    paper = _resolve(cfg.paper, f"experiment {exp}: paper", errors)
    if paper is None:
        return None
    missing = [k for k in ("id", "table", "row", "col") if paper.get(k) is None]
    if missing:
        errors.append(f"experiment {exp}: paper.{', paper.'.join(missing)} missing")
        return None
    rep = paper.get("reported")
    if rep is not None and not _is_number(rep):
        errors.append(f"experiment {exp}: paper.reported must be a number or null, got {rep!r}")
        rep = None
    seeds = paper.get("seeds")
    if seeds is not None:
        seeds = _as_seed_list(seeds, f"experiment {exp}: paper.seeds", errors) or None
    return ExperimentInfo(
        name=exp,
        row=str(paper["row"]),
        col=str(paper["col"]),
        paper_id=str(paper["id"]),
        table_id=str(paper["table"]),
        metric=None if paper.get("metric") is None else str(paper["metric"]),
        reported=None if rep is None else float(rep),
        seeds=seeds,
        path=path,
    )


def table_errors(name: str, config_dir: str | Path) -> list[str]:
    """Every problem with a table config (empty when valid): `assert not table_errors(...)`."""
    _, errors, _, _ = _check(name, Path(config_dir))
    return errors


def validate_table(name: str, config_dir: str | Path) -> TableSpec:
    """Load and validate `configs/table/<name>.yaml` (and the experiments it names).

    Raises:
        TableConfigError: listing every problem, each with what was expected and a close match.
    Warnings (e.g. `reported` disagreeing with an experiment's) are logged and kept in
    `TableSpec.warnings`.
    """
    spec, errors, warnings, path = _check(name, Path(config_dir))
    if errors or spec is None:
        raise TableConfigError(name, path, errors)
    for w in warnings:
        log.warning("table %s: %s", name, w)
    return spec


def table_names(config_dir: str | Path) -> list[str]:
    return _choices(Path(config_dir), "table")


def find_table(paper: str, table_id: str, config_dir: str | Path) -> str:
    """Name of the table config whose `table.paper`/`table.id` are `paper`/`table_id`."""
    found = []
    for name in table_names(config_dir):
        cfg = OmegaConf.load(Path(config_dir) / "table" / f"{name}.yaml")
        t = cfg.get("table") if isinstance(cfg, DictConfig) else None
        if t is not None and t.get("paper") == paper and str(t.get("id")) == table_id:
            found.append(name)
    if len(found) != 1:
        have = "none" if not found else ", ".join(found)
        raise ValueError(
            f"Expected exactly one table config with paper={paper} id={table_id} under "
            f"{config_dir}/table; found {have}. Pass the table name instead."
        )
    return found[0]


def list_tables(config_dir: str | Path) -> list[tuple[str, int, int]]:
    """`(name, n_cells, n_seeds)` for every table config, validating each.

    Raises:
        TableConfigError: for the first invalid table (use `table_errors` to collect them all).
    """
    return [
        (spec.name, spec.n_cells, len(spec.seeds))
        for spec in (validate_table(n, config_dir) for n in table_names(config_dir))
    ]
