"""Paper-table configs (`configs/table/<name>.yaml`): loading and validation.

A table file pins one table of one paper: its layout (rows × cols), the experiment config that
produces each cell, the seeds, the metric and the paper's numbers. Validation runs from `train.py`
before any job is launched, from tests, and from `scripts/aggregate.py`.

Experiments are resolved the way `python train.py experiment=<name>` resolves them: each one is
composed with Hydra's config loader from the primary config (`<config_dir>/train.yaml`), so the
cells that paper grids generate (`configs/cells/`, served by `hydra_plugins.reprolab_cells`) are
experiments like the files in `configs/experiment/`. A config dir without `train.yaml` (a bare
test tree of `experiment/` and `table/` files) is read file by file instead.

The table's metric must be a key that the method of every experiment of the table declares it
logs (`Method.metric_keys()`, read with `reprolab.utils.config.metric_is_logged`).

Two kinds of table:

- Single-metric (`table.metric`): a cell (row, col) is one experiment, matched by its `paper.row`
  and `paper.col`; every cell reads the same key.
- Metric columns (`table.col_metrics: {<col>: <metric key>}`, instead of `table.metric`): the
  columns are different metrics of the SAME run (test sets, accuracy and ECE side by side). Each
  row is one experiment, matched by its `paper.row`; its `paper.col` is the run's own column of
  its grid (by convention the dataset it runs on, e.g. `imagenet`), not a table column, so the run
  dir stays `${paper.id}.${paper.table}.${paper.row}.${paper.col}/seed<n>`. Column `c` of a row
  reads key `col_metrics[c]` from that run's record. Every key must be logged by the method of
  every experiment of the table.

Either kind may set `col_decimals: {<col>: digits}` (default `decimals`) and `col_scale: {<col>:
factor}` (the runs' values are multiplied by it before mean, std and Δ; `reported` is written in
the table's printed units).

A single-metric table whose columns are datasets may add an average column (`table.average:
{col: average, label: "Average", rule: mean | base_new_hm, cols: [...]}`), shown after the last
column; `cols` (default: all) are the columns it averages, e.g. the target datasets of a transfer
table without its source:

- `mean`: per row, the mean over those columns of the cells' seed means.
- `base_new_hm`: CoCoOp's "Average over 11 datasets" (robustness_ood_prompting.md §0.1): per row,
  B̄ = the mean over those columns of the seed-mean `test/base_acc`, N̄ likewise of `test/new_acc`,
  and the average cell is 2·B̄·N̄/(B̄ + N̄), never the mean of the per-dataset HMs. The table's
  metric must be `test/hm`, and every method must log both keys.

The cell is blank unless every averaged column of the row is complete (every seed finished, no
failed or missing seed); the aggregated .md says why. `reported` may carry the paper's average
under the average column's name (`reported: {row: {average: 71.7}}`).

Several tables may read the same runs with different metrics (a base-to-new table's Base, New and
HM are the same runs, `paper.table` alike): each then sets `output: <stem>`, the file name of its
aggregated results `results/<paper>/<stem>.{md,csv,png}` (default: `id`), so they do not overwrite
each other.

Either kind may set `extra_columns: [<metric key>, ...]` (e.g. `[params/trainable,
throughput/train_samples_per_s]`): cost keys of the run records that the aggregated table reports
beside the metric (`reprolab.tables.aggregate`). Each must be a key that the method of at least one
experiment of the table declares it logs; a record without it shows "—".

Hyperparameter search and model selection (`reprolab.search`): a table whose experiments declare
a `search:` (and a `select:` rule) sweeps `trial` beside `experiment` and `seed`
(`hydra.sweeper.params.trial: range(0,16)`). The swept trials must be exactly 0..N-1, N the number
of trials of the search of every experiment of the table (a grid's size or a random search's
`n`); every experiment must declare a search and a `select` whose metric its method logs (never a
`test/` key). The aggregator then reports, per cell and seed, the test metric of the trial with
the best selection metric (`reprolab.tables.aggregate`). A table that does not sweep `trial`
aggregates plain runs (trial null) even of experiments that declare a search.

Source of truth for the paper's numbers: the table's `reported` block (`{row: {col: number}}`,
columns of the table in both kinds). An experiment's `paper.reported` is informational (a number;
in a metric-column table a mapping `{col: number}`); when both are given and disagree (or only the
experiment has one) validation emits a warning and aggregation uses the table's value.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from reprolab.errors import ReprolabError
from reprolab.utils.files import yaml_tree_stamp
from reprolab.utils.naming import did_you_mean, unknown_name

log = logging.getLogger(__name__)

#: Keys of the `table:` block. Required ones have no default here.
TABLE_KEYS_REQUIRED = ("name", "paper", "id", "metric", "rows", "cols", "experiments", "seeds")
TABLE_KEYS_OPTIONAL: dict[str, Any] = {
    "title": None,  # defaults to the table name
    "source": None,  # where the numbers come from, e.g. "CVPR 2023, Table 2"
    "decimals": 1,  # digits after the point in .md/.csv
    "reported": {},  # {row: {col: number | null} | null}
    "labels": {},  # optional display names {row_or_col_value: "Pretty name"} for .md/.png
    "notes": None,  # free text printed under the title in the .md
    "col_metrics": {},  # {col: metric key}: the columns are metrics of one run per row
    "col_decimals": {},  # {col: digits}, overriding `decimals` for that column
    "col_scale": {},  # {col: factor} applied to the runs' values (e.g. 100: fraction -> percent)
    "extra_columns": [],  # [metric key]: cost keys of the records (csv columns, a .md "Cost" section)
    "average": None,  # {col, label, rule: mean | base_new_hm, cols}: an average column
    "output": None,  # results/<paper>/<output>.{md,csv,png}; default: id
}
TABLE_KEYS = TABLE_KEYS_REQUIRED + tuple(TABLE_KEYS_OPTIONAL)

#: Rules of `table.average`; `base_new_hm` reads these keys of the records (B and N) and needs the
#: table's metric to be their harmonic mean.
AVERAGE_RULES = ("mean", "base_new_hm")
AVERAGE_KEYS = ("col", "label", "rule", "cols")
BASE_NEW_KEYS = ("test/base_acc", "test/new_acc")
HM_METRIC = "test/hm"

#: Sweeper parameters that define a job (its run dir `<cell>[/trial<k>]/seed<n>`); any other swept
#: key would put several jobs in one run dir. `trial` is optional (a hyperparameter search).
SWEEP_KEYS = ("experiment", "seed", "trial")
REQUIRED_SWEEP_KEYS = ("experiment", "seed")


class TableConfigError(ReprolabError, ValueError):
    """A table config is inconsistent; `errors` lists every problem found (not just the first)."""

    def __init__(self, name: str, path: Path | str, errors: list[str]) -> None:
        self.name = name
        self.path = Path(path)
        self.errors = list(errors)
        if len(self.errors) == 1:  # one problem, one line
            super().__init__(f"Table '{name}' ({path}) is invalid: {self.errors[0]}")
            return
        bullet = "\n  - ".join(self.errors)
        super().__init__(f"Table '{name}' ({path}) is invalid:\n  - {bullet}")


@dataclass(frozen=True)
class ExperimentInfo:
    """The `paper` block of one composed experiment (the cell it produces) and its method."""

    name: str
    row: str
    col: str
    paper_id: str
    table_id: str
    metric: str | None
    reported: float | dict[str, float] | None  # a mapping {col: number}: a metric-column row
    seeds: list[int] | None
    path: Path | None  # configs/experiment/<name>.yaml; None for a cell a paper grid generates
    method: str | None = None  # method.name
    method_target: str | None = None  # method._target_; None when it cannot be known (bare tree)
    num_trials: int | None = None  # trials of its `search:` (None: it declares none)
    select: dict[str, str] | None = None  # its `select:` rule {metric, mode} (None: none)


@dataclass(frozen=True)
class AverageSpec:
    """`table.average`: an extra column, after the table's columns, averaging each row."""

    col: str  # its name in `reported` and in the csv's `col`
    label: str  # its header in the .md and the plot
    rule: str  # one of AVERAGE_RULES
    cols: tuple[str, ...] = ()  # the table columns it averages, in table order


@dataclass
class TableSpec:
    """A validated table config. Row/col order is display order.

    In a metric-column table (`col_metrics` non-empty) `metric` is None, every (row, col) of a row
    with an experiment is in `cells` (all pointing at that one experiment) and `row_cols` holds the
    `paper.col` of each row's runs.
    """

    name: str
    paper: str
    id: str
    title: str
    source: str | None
    metric: str | None
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
    col_metrics: dict[str, str] = field(default_factory=dict)  # col -> metric key of the row's run
    row_cols: dict[str, str] = field(default_factory=dict)  # row -> paper.col of its runs
    col_decimals: dict[str, int] = field(default_factory=dict)
    col_scale: dict[str, float] = field(default_factory=dict)
    extra_columns: list[str] = field(default_factory=list)  # cost keys of the records, in order
    trials: list[int] = field(default_factory=list)  # swept `trial` values (empty: no search)
    select: dict[str, dict[str, str]] = field(default_factory=dict)  # experiment -> {metric, mode}
    average: AverageSpec | None = None  # `table.average` (reported numbers: reported[(row, col)])
    output: str | None = None  # file stem of the aggregated results (None: `id`)

    @property
    def metric_columns(self) -> bool:
        """Whether the columns are metrics of one run per row (`table.col_metrics`)."""
        return bool(self.col_metrics)

    def run_col(self, row: str, col: str | None = None) -> str:
        """The `paper.col` of the runs behind (row, col): the row's own in a metric-column table."""
        if self.metric_columns:
            return self.row_cols.get(row, "" if col is None else col)
        if col is None:
            raise ValueError(f"table {self.name}: a single-metric cell needs its column")
        return col

    def cell_id(self, row: str, col: str | None = None) -> str:
        """The run identity prefix `${paper.id}.${paper.table}.${paper.row}.${paper.col}`."""
        return f"{self.paper}.{self.id}.{row}.{self.run_col(row, col)}"

    def metric_of(self, col: str) -> str:
        """The metric key column `col` reads from a run record."""
        return self.col_metrics[col] if self.metric_columns else str(self.metric)

    def decimals_of(self, col: str) -> int:
        return self.col_decimals.get(col, self.decimals)

    def scale_of(self, col: str) -> float:
        return self.col_scale.get(col, 1.0)

    def label(self, key: str) -> str:
        if key not in self.labels and self.average is not None and key == self.average.col:
            return self.average.label
        return str(self.labels.get(key, key))

    @property
    def n_cells(self) -> int:
        """Run cells: experiments with a place in the table (one per row with metric columns)."""
        return len(set(self.cells.values()))

    @property
    def n_jobs(self) -> int:
        return self.n_cells * len(self.seeds) * max(1, len(self.trials))


def _choices(config_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def _resolve(node: Any, what: str, errors: list[str]) -> Any:
    """Plain Python value of an OmegaConf node (a bare tree's interpolations resolve in-file)."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception as exc:  # noqa: BLE001 - any resolution failure is a config error here
        errors.append(
            f"{what}: cannot resolve interpolation ({type(exc).__name__}: {exc}); a table block "
            "(and, in a config dir without train.yaml, an experiment's `paper` block) must "
            "resolve within its own file."
        )
        return None


def _load_experiment(
    config_dir: Path, name: str, seen: tuple[str, ...] = ()
) -> tuple[DictConfig, str | None]:
    """Bare trees only: `experiment/<name>.yaml` merged with the experiments its `defaults` pull in,
    and its method choice (`override /method: <x>`; the last one wins, as in Hydra).

    Only defaults entries that name another experiment (`/experiment/<x>` or a bare `<x>` in the
    same group) are followed. The file's own keys win over its defaults (`_self_` last).
    """
    path = config_dir / "experiment" / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path} is not a mapping")
    merged = OmegaConf.create()
    method = None
    for entry in cfg.get("defaults") or []:
        if isinstance(entry, DictConfig):
            for key, value in entry.items():
                if str(key).split()[-1].strip("/") == "method":
                    method = None if value is None else str(value)
            continue
        if not isinstance(entry, str) or entry == "_self_":
            continue
        base = entry.removeprefix("/experiment/") if entry.startswith("/experiment/") else entry
        if "/" in base or base in seen:
            continue
        if (config_dir / "experiment" / f"{base}.yaml").is_file():
            inner, inner_method = _load_experiment(config_dir, base, (*seen, name))
            merged = OmegaConf.merge(merged, inner)
            method = inner_method or method
    own = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "defaults"])
    return OmegaConf.merge(merged, own), method


class _Experiments:
    """The experiments of one config dir, resolved as `python train.py experiment=<name>` does.

    With a primary config (`train.yaml`) each experiment is composed by Hydra's config loader, so
    the cells that paper grids generate count like files, and `glob(...)` sees them. A bare tree
    (tests) is read file by file. Results are kept per process until a YAML file changes.
    """

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.composed = (config_dir / "train.yaml").is_file()
        self._loader: Any = None
        self._infos: dict[str, tuple[ExperimentInfo | None, list[str]]] = {}

    @property
    def loader(self) -> Any:
        if self._loader is None:
            from hydra._internal.config_loader_impl import ConfigLoaderImpl
            from hydra._internal.utils import create_config_search_path

            # A loader of our own, not `hydra.compose`: this also runs inside a Hydra app (the
            # launch callback, `validate_config` in a job), where GlobalHydra is taken.
            search_path = create_config_search_path(str(self.config_dir.resolve()))
            self._loader = ConfigLoaderImpl(config_search_path=search_path)
        return self._loader

    def get_group_options(self, group_name: str, results_filter: Any = None, **_: Any) -> list[str]:
        """What Hydra's override parser needs to expand `glob(...)`."""
        if self.composed:
            return list(self.loader.get_group_options(group_name))
        return _choices(self.config_dir, group_name)

    def names(self) -> list[str]:
        return self.get_group_options("experiment")

    def info(self, name: str) -> tuple[ExperimentInfo | None, list[str]]:
        """`(info or None, errors)` of one experiment."""
        if name not in self._infos:
            errors: list[str] = []
            info = self._compose(name, errors) if self.composed else self._read(name, errors)
            self._infos[name] = (info, errors)
        info, errors = self._infos[name]
        return info, list(errors)

    def _compose(self, exp: str, errors: list[str]) -> ExperimentInfo | None:
        from hydra.types import RunMode

        path = self.config_dir / "experiment" / f"{exp}.yaml"
        if path.is_file():
            _check_global(path, f"experiment {exp}", errors)
        try:
            cfg = self.loader.load_configuration(
                config_name="train", overrides=[f"experiment={exp}"], run_mode=RunMode.RUN
            )
        except Exception as exc:  # noqa: BLE001 - any composition failure is a config error
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(f"experiment {exp}: does not compose: {first}")
            return None
        method = cfg.get("method")
        target = None if not isinstance(method, DictConfig) else method.get("_target_")
        name = None if not isinstance(method, DictConfig) else method.get("name")
        info = _paper_info(
            exp,
            cfg.get("paper"),
            path if path.is_file() else None,
            None if name is None else str(name),
            None if target is None else str(target),
            errors,
        )
        return _with_search(exp, info, cfg, errors, composed=True)

    def _read(self, exp: str, errors: list[str]) -> ExperimentInfo | None:
        path = self.config_dir / "experiment" / f"{exp}.yaml"
        _check_global(path, f"experiment {exp}", errors)
        try:
            cfg, method = _load_experiment(self.config_dir, exp)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"experiment {exp}: cannot load {path}: {exc}")
            return None
        target = None
        method_file = self.config_dir / "method" / f"{method}.yaml"
        if method is not None and method_file.is_file():
            target = OmegaConf.load(method_file).get("_target_")
        info = _paper_info(
            exp, cfg.get("paper"), path, method, None if target is None else str(target), errors
        )
        return _with_search(exp, info, cfg, errors, composed=False)


def _with_search(
    exp: str, info: ExperimentInfo | None, cfg: DictConfig, errors: list[str], composed: bool
) -> ExperimentInfo | None:
    """`info` with the trial count of the experiment's `search:` and its `select:` rule; a
    malformed block is an error of the experiment (a composed one: its keys checked too)."""
    from dataclasses import replace

    from reprolab.search import check_search, num_trials, read_search, read_select

    if info is None:
        return None
    search, select = cfg.get("search"), cfg.get("select")
    try:
        if composed:
            check_search(cfg)
        elif search is not None:
            read_search(search)
        rule = None if select is None else read_select(select)
        n = None if search is None else num_trials(search)
    except ReprolabError as exc:
        errors.append(f"experiment {exp}: {exc}")
        return info
    return replace(info, num_trials=n, select=rule)


_EXPERIMENTS: dict[str, tuple[tuple, _Experiments]] = {}


def _experiments(config_dir: Path) -> _Experiments:
    key = str(Path(config_dir).resolve())
    fp = yaml_tree_stamp(Path(config_dir))
    hit = _EXPERIMENTS.get(key)
    if hit is None or hit[0] != fp:
        hit = (fp, _Experiments(Path(config_dir)))
        _EXPERIMENTS[key] = hit
    return hit[1]


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


def _expand_sweep(key: str, value: Any, experiments: _Experiments) -> list[str]:
    """Values a Hydra sweep override `key=value` expands to (choice lists, range(), glob())."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if isinstance(value, list):  # a YAML list is not Hydra sweep syntax, but read it kindly
        value = ",".join(str(v) for v in value)
    parser = OverridesParser.create(config_loader=experiments)  # type: ignore[arg-type]
    (override,) = parser.parse_overrides([f"{key}={value}"])  # sets the loader glob() needs
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    return [str(override.get_value_element_as_str())]


def _check_sweeper(
    cfg: DictConfig,
    spec_exps: list[str],
    seeds: list[int],
    experiments: _Experiments,
    errors: list[str],
    warnings: list[str],
) -> list[int]:
    """Check `hydra.sweeper.params`; returns the swept `trial` values (empty when not swept)."""
    trials: list[int] = []
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
        return trials
    params = _resolve(params, "hydra.sweeper.params", errors)
    if not isinstance(params, dict):
        return trials
    for key in REQUIRED_SWEEP_KEYS:
        if key not in params:
            errors.append(f"hydra.sweeper.params.{key} is missing (must equal table.{key}s)")
    for key, value in params.items():
        try:
            values = _expand_sweep(str(key), value, experiments)
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
        elif key == "trial":
            try:
                trials = [int(v) for v in values]
            except ValueError:
                errors.append(f"hydra.sweeper.params.trial={value!r} must be integers")
                continue
            if trials != list(range(len(trials))):
                errors.append(
                    f"hydra.sweeper.params.trial sweeps {trials}; it must be the trials "
                    f"0..N-1 of the experiments' search in order, e.g. range(0,{len(trials)})"
                )
                trials = []
        elif len(values) > 1:
            errors.append(
                f"hydra.sweeper.params.{key} sweeps {len(values)} values, but run dirs are "
                "`<cell>/seed<seed>`: jobs would overwrite each other. Make each value its own "
                "experiment (its own table cell) instead, or declare a hyperparameter search "
                "(`search:` in the experiment) and sweep `trial`."
            )
    return trials


def _check_trials(
    trials: list[int],
    infos: list[ExperimentInfo],
    config_dir: Path,
    errors: list[str],
    warnings: list[str],
) -> dict[str, dict[str, str]]:
    """A table that sweeps `trial`: every experiment declares a search of exactly that many
    trials and a `select` rule whose metric its method logs. Returns experiment -> rule."""
    from reprolab.utils.config import method_metric_keys, metric_is_logged

    if not trials:
        searching = [i.name for i in infos if i.num_trials is not None]
        if searching:
            warnings.append(
                f"{', '.join(searching)} declare a hyperparameter search, but the table does not "
                "sweep `trial`: their plain runs (trial=null) are aggregated"
            )
        return {}
    n = len(trials)
    rules: dict[str, dict[str, str]] = {}
    for info in infos:
        where = f"experiment {info.name}"
        if info.num_trials is None:
            errors.append(
                f"{where} declares no `search:` but the table sweeps trial 0..{n - 1}; give it a "
                "search of that many trials, or put it in a table that does not sweep trial"
            )
            continue
        if info.num_trials != n:
            errors.append(
                f"{where}: its search has {info.num_trials} trials but the table sweeps "
                f"{n} (hydra.sweeper.params.trial: range(0,{info.num_trials}) would match)"
            )
        if info.select is None:
            errors.append(
                f"{where} declares a search but no `select:` rule ({{metric: val/<key>, mode: max "
                "| min}}): the aggregator cannot pick a trial"
            )
            continue
        rules[info.name] = info.select
        metric = info.select["metric"]
        if info.method_target is None:
            warnings.append(
                f"{where}: select.metric '{metric}' not checked: its method config is not under "
                f"{config_dir}/method"
            )
            continue
        try:
            logged = metric_is_logged(info.method_target, metric)
        except Exception:  # noqa: BLE001 - an unreadable class: reported by the metric check
            continue
        if not logged:
            errors.append(
                f"{where}: select.metric '{metric}' is not a key method={info.method} logs; it "
                f"logs {', '.join(method_metric_keys(info.method_target))}"
            )
    return rules


def _check(name: str, config_dir: Path) -> tuple[TableSpec | None, list[str], list[str], Path]:
    """Validate; returns (spec or None, errors, warnings, path)."""
    config_dir = Path(config_dir)
    path = config_dir / "table" / f"{name}.yaml"
    errors: list[str] = []
    warnings: list[str] = []
    if not path.is_file():
        return None, [unknown_name("table", name, _choices(config_dir, "table"))], warnings, path
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
            errors.append(
                f"Unknown key table.{key}; allowed: {', '.join(TABLE_KEYS)}"
                f"{did_you_mean(str(key), TABLE_KEYS)}"
            )
    metric_columns = t.get("col_metrics") not in (None, {})
    for key in TABLE_KEYS_REQUIRED:
        if key == "metric" and metric_columns:
            if t.get("metric") is not None:
                errors.append(
                    "table.metric and table.col_metrics exclude each other: the columns of a "
                    "metric-column table read their keys from col_metrics; drop table.metric"
                )
            continue
        if t.get(key) in (None, "", []):
            hint = " (or table.col_metrics: {col: metric key})" if key == "metric" else ""
            errors.append(f"table.{key} is required{hint}")
    t = {**TABLE_KEYS_OPTIONAL, **t}

    if t.get("name") not in (None, name):
        errors.append(f"table.name is '{t['name']}' but the file is {name}.yaml; they must match")
    for key in ("paper", "id"):
        if t.get(key) is not None and not isinstance(t[key], str):
            errors.append(f"table.{key} must be a string, got {t[key]!r}")
    metric = None if metric_columns else str(t.get("metric"))
    decimals = t.get("decimals")
    if not _is_decimals(decimals):
        errors.append(f"table.decimals must be an integer in 0..10, got {decimals!r}")
        decimals = 1

    rows = _as_str_list(t.get("rows"), "rows", errors) if t.get("rows") is not None else []
    cols = _as_str_list(t.get("cols"), "cols", errors) if t.get("cols") is not None else []
    col_metrics = _col_map(t, "col_metrics", cols, _metric_key_error, errors)
    if col_metrics and cols:
        unread = [c for c in cols if c not in col_metrics]
        if unread:
            errors.append(
                f"table.col_metrics has no metric key for col {', '.join(unread)}; every column "
                "of a metric-column table reads one key of its row's run"
            )
    col_decimals = _col_map(t, "col_decimals", cols, _decimals_error, errors)
    col_scale = _col_map(t, "col_scale", cols, _scale_error, errors)
    extra_columns = _key_list(t, "extra_columns", errors)
    exps = (
        _as_str_list(t.get("experiments"), "experiments", errors)
        if t.get("experiments") is not None
        else []
    )
    seeds = _as_seed_list(t["seeds"], "table.seeds", errors) if t.get("seeds") is not None else []
    average = _average(t, cols, metric_columns, t.get("metric") and metric, errors)
    output = t.get("output")
    if output is not None and (
        not isinstance(output, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", output)
    ):
        errors.append(
            f"table.output must be a file stem such as tab1_hm (letters, digits, _ . -), got "
            f"{output!r}"
        )
    # An invalid average block still names its column: its reported numbers are not errors too.
    raw = t.get("average")
    raw_col = raw.get("col", "average") if isinstance(raw, dict) else None
    rep_cols = cols + ([str(raw_col)] if isinstance(raw_col, str) and raw_col not in cols else [])

    reported: dict[tuple[str, str], float] = {}
    rep = t.get("reported") or {}
    if not isinstance(rep, dict):
        errors.append(f"table.reported must map row -> {{col: number}}, got {rep!r}")
        rep = {}
    for r, row_vals in rep.items():
        r = str(r)
        if rows and r not in rows:
            errors.append(f"table.reported: {unknown_name('row', r, rows)}")
        if row_vals is None:  # the paper (or the spec) has no number for this row
            continue
        if not isinstance(row_vals, dict):
            errors.append(f"table.reported.{r} must map col -> number, got {row_vals!r}")
            continue
        for c, v in row_vals.items():
            c = str(c)
            if cols and c not in rep_cols:
                errors.append(f"table.reported.{r}: {unknown_name('col', c, rep_cols)}")
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

    experiments = _experiments(config_dir)
    valid_exps = experiments.names()
    cells: dict[tuple[str, str], str] = {}
    row_cols: dict[str, str] = {}  # metric columns: row -> paper.col of its experiment
    row_exps: dict[str, str] = {}
    infos: list[ExperimentInfo] = []
    for exp in exps:
        if exp not in valid_exps:
            errors.append(unknown_name("experiment", exp, valid_exps))
            continue
        info, exp_errors = experiments.info(exp)
        errors += exp_errors
        if info is None:
            continue
        infos.append(info)
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
            errors.append(f"{where}: paper.row — {unknown_name('row', info.row, rows)}")
        seeds_differ = info.seeds is not None and seeds and sorted(info.seeds) != sorted(seeds)
        seeds_warning = f"{where}: paper.seeds={info.seeds} differs from table.seeds={seeds}"
        if metric_columns:
            # The row's run fills every column; its paper.col is the run's own (its dataset).
            if info.row in row_exps:
                errors.append(
                    f"row {info.row} is produced by both {row_exps[info.row]} and {exp}; a "
                    "metric-column table takes one experiment per row (its columns are metrics "
                    "of that one run)"
                )
                continue
            row_exps[info.row] = exp
            row_cols[info.row] = info.col
            cells.update({(info.row, c): exp for c in cols})
            _check_row_reported(where, info, cols, reported, errors, warnings)
            if seeds_differ:
                warnings.append(seeds_warning)
            continue
        if cols and info.col not in cols:
            errors.append(f"{where}: paper.col — {unknown_name('col', info.col, cols)}")
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
        if isinstance(info.reported, dict):
            errors.append(
                f"{where}: paper.reported is a mapping {{col: number}}, which only a "
                "metric-column table (table.col_metrics) reads; give one number or null"
            )
        elif info.reported is not None and table_rep != info.reported:
            warnings.append(
                f"{where}: paper.reported={info.reported} but table.reported.{info.row}.{info.col}"
                f"={table_rep}; the table's value is used"
            )
        if seeds_differ:
            warnings.append(seeds_warning)

    if metric_columns:
        if col_metrics:
            _check_col_metrics(name, col_metrics, infos, config_dir, errors, warnings)
    elif t.get("metric") is not None:
        _check_metric(name, str(metric), infos, config_dir, errors, warnings)
    if extra_columns:
        _check_extra_columns(name, extra_columns, infos, config_dir, errors, warnings)
    if average is not None and average.rule == "base_new_hm":
        _check_base_new_keys(name, infos, config_dir, errors, warnings)
    trials = _check_sweeper(cfg, exps, seeds, experiments, errors, warnings)
    select = _check_trials(trials, infos, config_dir, errors, warnings)

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
        col_metrics=col_metrics,
        row_cols=row_cols,
        col_decimals={c: int(v) for c, v in col_decimals.items()},
        col_scale={c: float(v) for c, v in col_scale.items()},
        extra_columns=extra_columns,
        trials=trials,
        select=select,
        average=average,
        output=output,
    )
    return spec, errors, warnings, path


def _average(
    t: dict[str, Any], cols: list[str], metric_columns: bool, metric: str | None, errors: list[str]
) -> AverageSpec | None:
    """`table.average` checked: a mapping {col, label, rule, cols} on a single-metric table."""
    node = t.get("average")
    if node is None:
        return None
    example = '{col: average, label: "Average", rule: mean | base_new_hm, cols: [...]}'
    if not isinstance(node, dict):
        errors.append(f"table.average must be a mapping {example}, got {node!r}")
        return None
    n_errors = len(errors)
    for key in node:
        if key not in AVERAGE_KEYS:
            errors.append(
                f"Unknown key table.average.{key}; allowed: {', '.join(AVERAGE_KEYS)}"
                f"{did_you_mean(str(key), AVERAGE_KEYS)}"
            )
    col, label, rule = node.get("col", "average"), node.get("label", "Average"), node.get("rule")
    if not isinstance(col, str) or not col.strip():
        errors.append(f"table.average.col must be a column name such as 'average', got {col!r}")
    elif col in cols:
        errors.append(
            f"table.average.col '{col}' is also in table.cols; the average column is added after "
            "the table's columns: give it a name of its own"
        )
    if not isinstance(label, str):
        errors.append(f"table.average.label must be a string, got {label!r}")
    if rule not in AVERAGE_RULES:
        errors.append(
            f"table.average.rule must be one of {', '.join(AVERAGE_RULES)}, got {rule!r}"
            f"{did_you_mean(str(rule), AVERAGE_RULES)}"
        )
    if metric_columns:
        errors.append(
            "table.average averages the dataset columns of a single-metric table; the columns of "
            "a metric-column table (table.col_metrics) are different metrics: drop table.average"
        )
    elif rule == "base_new_hm" and metric is not None and metric != HM_METRIC:
        errors.append(
            f"table.average.rule base_new_hm averages {' and '.join(BASE_NEW_KEYS)} and prints "
            f"their harmonic mean, so table.metric must be {HM_METRIC} (got {metric}); use rule "
            "mean for the Base and New tables"
        )
    over = node.get("cols")
    if over is None:
        over = list(cols)
    elif not isinstance(over, list) or not over:
        errors.append(f"table.average.cols must be a non-empty list of table columns, got {over!r}")
        over = []
    else:
        over = [str(c) for c in over]
        for c in over:
            if cols and c not in cols:
                errors.append(f"table.average.cols: {unknown_name('col', c, cols)}")
        dups = sorted({c for c in over if over.count(c) > 1})
        if dups:
            errors.append(f"table.average.cols lists {', '.join(dups)} more than once")
    if len(errors) > n_errors:
        return None
    return AverageSpec(col=col, label=label, rule=rule, cols=tuple(c for c in cols if c in over))


def _check_base_new_keys(
    table: str,
    infos: list[ExperimentInfo],
    config_dir: Path,
    errors: list[str],
    warnings: list[str],
) -> None:
    """Rule base_new_hm reads B and N from the records: every method must log both keys."""
    from reprolab.utils.config import method_metric_keys, metric_is_logged

    by_method, unchecked = _by_method(infos)
    missing = []
    for (method, target), exps in by_method.items():
        try:
            lacking = [k for k in BASE_NEW_KEYS if not metric_is_logged(target, k)]
        except Exception:  # noqa: BLE001 - reported once, by the metric check of the same class
            continue
        if lacking:
            missing.append(
                f"method={method} ({', '.join(exps)}) does not log {', '.join(lacking)}; it logs "
                f"{', '.join(method_metric_keys(target))}"
            )
    if missing:
        errors.append(
            f"table {table}: table.average.rule base_new_hm reads {' and '.join(BASE_NEW_KEYS)} "
            "of every run; " + "; ".join(missing)
        )
    if unchecked:
        warnings.append(
            f"table.average (base_new_hm) keys not checked for {', '.join(unchecked)}: their "
            f"method configs are not under {config_dir}/method"
        )


def _is_decimals(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 10


def _metric_key_error(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a metric key (a string such as test/test/acc)"
    if any(ch in value for ch in "*?["):
        return "must be one metric key of the run record, not a pattern"
    return None


def _decimals_error(value: Any) -> str | None:
    return None if _is_decimals(value) else "must be an integer in 0..10"


def _scale_error(value: Any) -> str | None:
    return None if _is_number(value) and value != 0 else "must be a non-zero number"


def _key_list(t: dict[str, Any], key: str, errors: list[str]) -> list[str]:
    """`table.<key>` as a list of distinct metric keys (absent or null: empty). Bad entries are
    reported and left out; a duplicate is reported once and kept once."""
    node = t.get(key)
    if node is None:
        return []
    if not isinstance(node, list):
        errors.append(
            f"table.{key} must be a list of metric keys (e.g. [params/trainable, "
            f"throughput/train_samples_per_s]), got {node!r}"
        )
        return []
    out: list[str] = []
    for i, v in enumerate(node):
        problem = _metric_key_error(v)
        if problem is not None:
            errors.append(f"table.{key}[{i}] {problem}, got {v!r}")
        elif v not in out:
            out.append(v)
    dups = [v for v in out if sum(1 for x in node if x == v) > 1]
    if dups:
        errors.append(f"table.{key} lists {', '.join(dups)} more than once")
    return out


def _col_map(
    t: dict[str, Any],
    key: str,
    cols: list[str],
    value_error: Callable[[Any], str | None],
    errors: list[str],
) -> dict[str, Any]:
    """`table.<key>` as {col: value}: a mapping over the table's columns, each value checked by
    `value_error(value) -> message or None`. Bad entries are reported and left out."""
    node = t.get(key)
    if node is None:
        return {}
    if not isinstance(node, dict):
        errors.append(f"table.{key} must map col -> value, got {node!r}")
        return {}
    out: dict[str, Any] = {}
    for c, v in node.items():
        c = str(c)
        if cols and c not in cols:
            errors.append(f"table.{key}: {unknown_name('col', c, cols)}")
            continue
        problem = value_error(v)
        if problem is not None:
            errors.append(f"table.{key}.{c} {problem}, got {v!r}")
            continue
        out[c] = v
    return out


def _check_row_reported(
    where: str,
    info: ExperimentInfo,
    cols: list[str],
    reported: dict[tuple[str, str], float],
    errors: list[str],
    warnings: list[str],
) -> None:
    """A metric-column row's `paper.reported` against the table's numbers for that row."""
    if info.reported is None:
        return
    if not isinstance(info.reported, dict):
        warnings.append(
            f"{where}: paper.reported={info.reported} is not used: the columns of this table are "
            f"metrics (col_metrics); the paper's numbers are table.reported.{info.row}.<col>"
        )
        return
    for c, v in info.reported.items():
        if cols and c not in cols:
            errors.append(f"{where}: paper.reported — {unknown_name('col', c, cols)}")
            continue
        table_rep = reported.get((info.row, c))
        if table_rep != v:
            warnings.append(
                f"{where}: paper.reported.{c}={v} but table.reported.{info.row}.{c}={table_rep}; "
                "the table's value is used"
            )


def _paper_info(
    exp: str,
    paper: Any,
    path: Path | None,
    method: str | None,
    target: str | None,
    errors: list[str],
) -> ExperimentInfo | None:
    """The cell an experiment produces, from its (composed or merged) `paper` block."""
    if not isinstance(paper, DictConfig):
        errors.append(
            f"experiment {exp}: no `paper:` block (id, table, row, col, metric, reported)"
        )
        return None
    paper = _resolve(paper, f"experiment {exp}: paper", errors)
    if paper is None:
        return None
    missing = [k for k in ("id", "table", "row", "col") if paper.get(k) is None]
    if missing:
        errors.append(f"experiment {exp}: paper.{', paper.'.join(missing)} missing")
        return None
    rep = paper.get("reported")
    if isinstance(rep, dict):  # a metric-column row: {col: number | null}
        bad = {c: v for c, v in rep.items() if v is not None and not _is_number(v)}
        if bad:
            errors.append(
                f"experiment {exp}: paper.reported.{next(iter(bad))} must be a number or null, "
                f"got {next(iter(bad.values()))!r}"
            )
        rep = {str(c): float(v) for c, v in rep.items() if c not in bad and v is not None}
    elif rep is not None and not _is_number(rep):
        errors.append(
            f"experiment {exp}: paper.reported must be a number, a mapping {{col: number}} (a row "
            f"of a metric-column table) or null, got {rep!r}"
        )
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
        reported=rep if rep is None or isinstance(rep, dict) else float(rep),
        seeds=seeds,
        path=path,
        method=method,
        method_target=target,
    )


def _by_method(
    infos: list[ExperimentInfo],
) -> tuple[dict[tuple[str, str], list[str]], list[str]]:
    """Experiments grouped by (method name, method class); those whose class is unknown apart."""
    by_method: dict[tuple[str, str], list[str]] = {}
    unchecked: list[str] = []
    for info in infos:
        if info.method_target is None:
            unchecked.append(info.name)
        else:
            by_method.setdefault((str(info.method), info.method_target), []).append(info.name)
    return by_method, unchecked


def _unreadable(method: str, exps: list[str], target: str, exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (
        f"method={method} of {', '.join(exps)}: cannot read the metric keys {target} "
        f"declares ({type(exc).__name__}: {' '.join(lines[:2])})"
    )


def _check_metric(
    table: str,
    metric: str,
    infos: list[ExperimentInfo],
    config_dir: Path,
    errors: list[str],
    warnings: list[str],
) -> None:
    """The table's metric must be a key the method of every experiment declares it logs.

    One error line for the table: the metric, then per method that does not log it its
    experiments and the keys it does log.
    """
    from reprolab.utils.config import method_metric_keys, metric_is_logged

    by_method, unchecked = _by_method(infos)
    missing = []
    for (method, target), exps in by_method.items():
        try:
            if metric_is_logged(target, metric):
                continue
            missing.append(
                f"method={method} ({', '.join(exps)}) logs {', '.join(method_metric_keys(target))}"
            )
        except Exception as exc:  # noqa: BLE001 - an unimportable or foreign class is a config error
            errors.append(_unreadable(method, exps, target, exc))
    if missing:
        errors.append(
            f"table {table}: metric '{metric}' is not a key every method of the table logs; "
            + "; ".join(missing)
        )
    if unchecked:
        warnings.append(
            f"table.metric '{metric}' not checked for {', '.join(unchecked)}: their method "
            f"configs are not under {config_dir}/method"
        )


def _check_col_metrics(
    table: str,
    col_metrics: dict[str, str],
    infos: list[ExperimentInfo],
    config_dir: Path,
    errors: list[str],
    warnings: list[str],
) -> None:
    """Every column's key must be one the method of every experiment declares it logs.

    One error line for the table: per method that misses keys, its experiments, the columns
    (with their keys) it does not log, and the keys it does log.
    """
    from reprolab.utils.config import method_metric_keys, metric_is_logged

    by_method, unchecked = _by_method(infos)
    missing = []
    for (method, target), exps in by_method.items():
        try:
            lacking = [
                f"{col} ({key})"
                for col, key in col_metrics.items()
                if not metric_is_logged(target, key)
            ]
            if not lacking:
                continue
            missing.append(
                f"method={method} ({', '.join(exps)}) does not log col {', '.join(lacking)}; "
                f"it logs {', '.join(method_metric_keys(target))}"
            )
        except Exception as exc:  # noqa: BLE001 - an unimportable or foreign class is a config error
            errors.append(_unreadable(method, exps, target, exc))
    if missing:
        errors.append(
            f"table {table}: a col_metrics key is not logged by every method of the table; "
            + "; ".join(missing)
        )
    if unchecked:
        warnings.append(
            f"table.col_metrics not checked for {', '.join(unchecked)}: their method configs are "
            f"not under {config_dir}/method"
        )


def _check_extra_columns(
    table: str,
    keys: list[str],
    infos: list[ExperimentInfo],
    config_dir: Path,
    errors: list[str],
    warnings: list[str],
) -> None:
    """Every extra key must be one that the method of at least one experiment declares it logs
    (the records of the others show "—"): one error line for the table, naming the methods' keys.
    """
    from reprolab.utils.config import method_metric_keys, metric_is_logged

    by_method, unchecked = _by_method(infos)
    logged = {k: False for k in keys}
    declared: list[str] = []
    unreadable = False
    for method, target in by_method:
        try:
            for k in keys:
                logged[k] = logged[k] or metric_is_logged(target, k)
            declared.append(f"method={method} logs {', '.join(method_metric_keys(target))}")
        except Exception:  # noqa: BLE001 - reported once, by the metric check of the same class
            unreadable = True
    unlogged = [k for k in keys if not logged[k]]
    if unlogged and by_method and not unchecked and not unreadable:
        errors.append(
            f"table {table}: table.extra_columns {', '.join(repr(k) for k in unlogged)} "
            f"{'is not a key' if len(unlogged) == 1 else 'are not keys'} any method of the table "
            "logs; " + "; ".join(declared)
        )
    elif unchecked:
        warnings.append(
            f"table.extra_columns not checked for {', '.join(unchecked)}: their method configs "
            f"are not under {config_dir}/method"
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


def experiment_names(config_dir: str | Path) -> list[str]:
    """Every name `experiment=<name>` accepts: the files of `experiment/` and, in a config dir
    with `train.yaml`, the cells its paper grids generate (`configs/cells/`)."""
    return _experiments(Path(config_dir)).names()


def table_names(config_dir: str | Path) -> list[str]:
    return _choices(Path(config_dir), "table")


def find_table(paper: str, table_id: str, config_dir: str | Path) -> str:
    """Name of the table config whose `table.paper`/`table.id` are `paper`/`table_id`."""
    found = []
    for name in table_names(config_dir):
        cfg = OmegaConf.load(Path(config_dir) / "table" / f"{name}.yaml")
        t = cfg.get("table") if isinstance(cfg, DictConfig) else None
        if (
            t is not None
            and t.get("paper") == paper
            and table_id
            in (
                str(t.get("output") or t.get("id")),
                str(t.get("id")) if t.get("output") is None else None,
            )
        ):
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
