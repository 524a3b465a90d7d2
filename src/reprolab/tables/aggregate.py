"""Finished runs -> paper tables: `results/<paper>/<id>.{md,csv,png}`.

Runs come from `metrics.json` / `failed.json` files under a log root (`collect_files`) or from the
W&B API (`collect_wandb`). They are matched to a validated `TableSpec` by cell identity
(`paper.id`, `paper.table`, `paper.row`, `paper.col`) and seed; only the table's seeds count.
Per cell: mean ± sample std (ddof=1; blank for one seed) of `table.metric`, the number of seeds,
the paper's number (from the table config) and the difference. Nothing is hidden: missing
cells/seeds, failed runs, mixed commits, dirty trees and ignored records get their own sections.

Optional cost columns (`table.extra_columns`, e.g. `[params/trainable,
throughput/train_samples_per_s]`): per cell, the mean over its finished seeds of each key of the
records' `metrics`; one csv column per key, and a "Cost" section in the .md (one rows × cols grid
per key). A record without the key shows "—" (blank in the csv) and still counts for the metric.
The costs are the run's: in a metric-column table every cell of a row holds the mean over the
row's finished runs, and the "Cost" section is one rows × keys grid (one value per row and key).
Values print as integers when whole (parameter counts), else with one decimal (three significant
digits below 1); the .md adds "(k/n)" where only k of the n finished seeds' records have the key.

Metric-column tables (`table.col_metrics`, see `reprolab.tables.schema`): a run is identified by
its row (and the row's `paper.col`), one record per seed is chosen per row, and that record fills
every column of the row, column `c` with key `col_metrics[c]` (times `col_scale[c]`). A finished
record without some column's key counts as failed for that column only (a record with none of
them is a failed run). The .md then counts, lists missing and failed runs, and checks configs per
row (`TableResult.runs`), and prints each column's key; the csv keeps one line per (row, col) with
that column's key in `metric`.

Model selection (a table that sweeps `trial`, `TableSpec.select`; see `reprolab.search`): a cell's
runs are `<cell>/trial<k>/seed<n>`. Per cell and seed, the trial with the best selection metric
(`select.metric`, a validation key; `max` or `min`; ties: the lowest trial) among its finished
trials is the seed's run, and its record gives the table's metric. A finished trial without the
selection metric is a failed trial (the error names its run dir); a seed with no finished trial is
a failed seed. A seed chosen while some of its trials are failed or missing is flagged (`*` in
the grid, `partial` in the csv, "incomplete" in the .md's "Model selection" section, which lists
per cell and seed the chosen trial, its selection value and values, and trials finished/expected).
Records with a trial in a cell without selection, or without one in a cell with it, are ignored
(listed). The csv gains `trials`, `chosen_trials` (`seed:trial;...`) and `incomplete_seeds`.

Average column (`table.average`, see `reprolab.tables.schema`): one more cell per row after the
table's columns (`AverageCell`): rule `mean`, the mean over the row's columns of the cell means;
rule `base_new_hm` (CoCoOp's "Average over 11 datasets"), 2·B̄·N̄/(B̄ + N̄) with B̄ the mean over
the row's columns of the seed-mean `test/base_acc` of the cells' counted records and N̄ likewise of
`test/new_acc` (each times the column's `col_scale`), never the mean of the per-dataset HMs. It is
blank unless every column of the row is complete (status ok); the .md's "Average" section says why,
and gives B̄ and N̄. The csv adds one line per row (after the row's columns) with `col` = the
average column, `metric` = `<rule>:<keys>`, status `ok` or `incomplete`; the plot adds its bars.

Outputs are deterministic: sorted in the table's row/col order, fixed float formatting, no
timestamps or absolute paths, so rebuilding from the same runs gives byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprolab.errors import single_line
from reprolab.search import format_overrides, format_value
from reprolab.tables.schema import BASE_NEW_KEYS, TableSpec
from reprolab.utils.run_record import FAILED_FILE, METRICS_FILE

#: Directories under a log root that never hold run records (skipped for speed).
SKIP_DIRS = {"checkpoints", "wandb", "csv", "tensorboard", "__pycache__"}
#: Run dirs set aside by `on_config_change=replace` (`seed1.replaced-<fingerprint>`): runs of a
#: config the cell no longer has, kept for reference and never counted.
REPLACED_MARK = ".replaced-"

CSV_COLUMNS = (
    "paper",
    "table",
    "row",
    "col",
    "experiment",
    "metric",
    "status",
    "n_seeds",
    "mean",
    "std",
    "reported",
    "delta",
    "seeds",
    "missing_seeds",
    "failed_seeds",
    "dirty_seeds",
    "commits",
)
#: Appended to CSV_COLUMNS for a table that selects over trials.
SELECTION_COLUMNS = ("trials", "chosen_trials", "incomplete_seeds")
SHORT_SHA = 7

#: Display names of the cost keys train.py records, used where `table.labels` has none.
EXTRA_LABELS = {
    "params/trainable": "Trainable parameters",
    "params/total": "Total parameters",
    "throughput/train_samples_per_s": "Train samples/s",
    "throughput/test_samples_per_s": "Test samples/s",
    "throughput/queried_images_per_s": "Queried images/s",
    "throughput/train_tokens_per_s": "Train tokens/s",
    "throughput/test_tokens_per_s": "Test tokens/s",
}
MISSING = "—"  # an extra key no counted record of the cell has
NOT_A_CELL = "not a cell of this table (no experiment for it in the table)"


class WandbUnavailableError(RuntimeError):
    """The W&B API cannot be reached (offline mode, no login, no network)."""


@dataclass
class RunRecord:
    """One run's record, whatever its source. `status` is `finished` or `failed`."""

    cell: str | None
    seed: int | None
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] | None = None
    sha: str | None = None
    dirty: bool | None = None
    error: str | None = None
    finished_at: str | None = None
    source: str = ""  # where it came from: path relative to the log root, or W&B run path
    fingerprint: str | None = None  # of the run's resolved config (None: a record from before)
    trial: int | None = None  # its trial of a hyperparameter search (None: a plain run)
    overrides: dict[str, Any] | None = None  # the values of that trial (`trial_overrides`)

    @property
    def commit(self) -> str:
        return self.sha[:SHORT_SHA] if self.sha else "unknown"


@dataclass
class CellResult:
    row: str
    col: str
    cell: str
    experiment: str | None
    reported: float | None
    values: dict[int, float] = field(default_factory=dict)  # seed -> metric
    failed: dict[int, RunRecord] = field(default_factory=dict)  # seed -> failed record
    missing: list[int] = field(default_factory=list)
    records: dict[int, RunRecord] = field(default_factory=dict)  # seed -> finished record
    extras: dict[str, dict[int, float]] = field(default_factory=dict)  # extra key -> seed -> value
    incomplete: list[int] = field(default_factory=list)  # seeds chosen among unfinished trials

    @property
    def n(self) -> int:
        return len(self.values)

    def extra_mean(self, key: str) -> float | None:
        """Mean over the finished seeds whose record has `key` (None when none has it)."""
        vals = self.extras.get(key) or {}
        return statistics.fmean(vals[s] for s in sorted(vals)) if vals else None

    @property
    def mean(self) -> float | None:
        return (
            statistics.fmean(self.values[s] for s in sorted(self.values)) if self.values else None
        )

    @property
    def std(self) -> float | None:
        vals = [self.values[s] for s in sorted(self.values)]
        return statistics.stdev(vals) if len(vals) >= 2 else None

    @property
    def delta(self) -> float | None:
        m = self.mean
        return None if m is None or self.reported is None else m - self.reported

    @property
    def status(self) -> str:
        if self.experiment is None:
            return "no_experiment"
        if self.values:
            complete = not self.missing and not self.failed and not self.incomplete
            return "ok" if complete else "partial"
        return "failed" if self.failed else "missing"

    @property
    def commits(self) -> list[str]:
        return sorted({r.commit for r in self.records.values()})

    @property
    def fingerprints(self) -> dict[str, list[int]]:
        """Config fingerprint -> the finished seeds that ran it (records without one left out)."""
        return _fingerprints(self.records)

    @property
    def dirty_seeds(self) -> list[int]:
        return sorted(s for s, r in self.records.items() if r.dirty)


def _fingerprints(records: dict[int, RunRecord]) -> dict[str, list[int]]:
    """Config fingerprint -> the seeds whose record ran it (records without one left out)."""
    out: dict[str, list[int]] = {}
    for seed in sorted(records):
        fp = records[seed].fingerprint
        if fp is not None:
            out.setdefault(fp, []).append(seed)
    return out


@dataclass
class RunCell:
    """The runs of one experiment of a table: the record chosen per seed (finished or failed).

    In a single-metric table it backs one CellResult; in a metric-column table, a whole row.
    """

    row: str
    col: str  # the runs' paper.col
    cell: str
    experiment: str
    records: dict[int, RunRecord] = field(default_factory=dict)  # seed -> chosen record
    missing: list[int] = field(default_factory=list)

    @property
    def finished(self) -> dict[int, RunRecord]:
        return {s: r for s, r in sorted(self.records.items()) if r.status == "finished"}

    @property
    def failed(self) -> dict[int, RunRecord]:
        return {s: r for s, r in sorted(self.records.items()) if r.status != "finished"}

    @property
    def fingerprints(self) -> dict[str, list[int]]:
        return _fingerprints(self.finished)


@dataclass
class SeedSelection:
    """The trials of one cell and seed of a table that selects over trials, and the one chosen."""

    cell: str
    experiment: str
    seed: int
    metric: str  # select.metric
    mode: str  # max | min
    expected: list[int]  # the table's trials
    values: dict[int, float] = field(default_factory=dict)  # finished trial -> selection value
    records: dict[int, RunRecord] = field(default_factory=dict)  # finished trial -> record
    failed: dict[int, RunRecord] = field(default_factory=dict)  # trial -> failed record
    chosen: int | None = None

    @property
    def missing(self) -> list[int]:
        return [t for t in self.expected if t not in self.values and t not in self.failed]

    @property
    def complete(self) -> bool:
        return len(self.values) == len(self.expected)

    def choose(self) -> int | None:
        """The best trial by the selection metric; ties go to the lowest trial."""
        if not self.values:
            return None
        sign = -1.0 if self.mode == "max" else 1.0
        return min(self.values, key=lambda t: (sign * self.values[t], t))


@dataclass
class AverageCell:
    """A row's average column (`table.average`); `mean` is None unless the row is complete."""

    row: str
    col: str  # the average column's name
    rule: str  # mean | base_new_hm
    reported: float | None
    mean: float | None = None
    base: float | None = None  # base_new_hm: B̄, the mean over columns of the seed-mean base acc
    new: float | None = None  # base_new_hm: N̄
    why: list[str] = field(default_factory=list)  # why the cell is blank (incomplete columns)
    n: int = 0  # seeds per column when complete; else the fewest any column has
    seeds: list[int] = field(default_factory=list)
    commits: list[str] = field(default_factory=list)
    std: None = None  # a mean of seed means: no spread over seeds (plot and grid read `std`)

    @property
    def delta(self) -> float | None:
        return None if self.mean is None or self.reported is None else self.mean - self.reported

    @property
    def status(self) -> str:
        return "ok" if self.mean is not None else "incomplete"


@dataclass
class TableResult:
    spec: TableSpec
    cells: list[CellResult]  # rows × cols, in display order
    ignored: list[tuple[RunRecord, str]]  # (record, why) for records of this table not counted
    source: str  # "metrics.json files" or "W&B runs (entity/project)"
    extra_columns: list[str] = field(default_factory=list)  # `table.extra_columns`, in order
    runs: list[RunCell] = field(default_factory=list)  # one per experiment, in display order
    selections: list[SeedSelection] = field(default_factory=list)  # per cell and seed, in order
    averages: list[AverageCell] = field(default_factory=list)  # per row (`table.average`)

    @property
    def finished(self) -> list[RunRecord]:
        """Every counted finished record once (a metric-column row's record backs all its cells)."""
        seen: set[int] = set()
        out = []
        for c in self.cells:
            for _, r in sorted(c.records.items()):
                if id(r) not in seen:
                    seen.add(id(r))
                    out.append(r)
        return out


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable {path.name}: {type(exc).__name__}: {exc}"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


def _seed_from_dir(name: str) -> int | None:
    if name.startswith("seed") and name[4:].lstrip("-").isdigit():
        return int(name[4:])
    return None


def _trial_from_dir(name: str) -> int | None:
    return int(name[5:]) if re.fullmatch(r"trial\d+", name) else None


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        return None


def _record_from_json(
    data: dict[str, Any] | None, err: str | None, path: Path, rel: str
) -> RunRecord:
    """A RunRecord from a metrics.json/failed.json; falls back to the run dir for cell/seed."""
    run_dir = path.parent
    data = data or {}
    git = data.get("git") if isinstance(data.get("git"), dict) else {}
    seed = data.get("seed", _seed_from_dir(run_dir.name))
    try:
        seed = None if seed is None else int(seed)
    except (TypeError, ValueError):
        seed = None
    dir_trial = _trial_from_dir(run_dir.parent.name)  # <cell>/trial<k>/seed<n>
    cell_dir = run_dir.parent.parent if dir_trial is not None else run_dir.parent
    overrides = data.get("trial_overrides")
    failed = (
        path.name == FAILED_FILE or err is not None or data.get("status", "finished") != "finished"
    )
    error = err
    if failed and error is None:
        error = data.get("error") or f"status={data.get('status')!r}"
    return RunRecord(
        cell=str(data.get("cell") or cell_dir.name),
        seed=seed,
        status="failed" if failed else "finished",
        metrics=dict(data.get("metrics") or {}),
        paper=data.get("paper") if isinstance(data.get("paper"), dict) else None,
        sha=git.get("sha"),
        dirty=git.get("dirty"),
        error=None if error is None else str(error),
        finished_at=data.get("finished_at") or data.get("failed_at"),
        source=rel,
        fingerprint=None if data.get("fingerprint") is None else str(data["fingerprint"]),
        trial=_int_or_none(data.get("trial", dir_trial)),
        overrides=overrides if isinstance(overrides, dict) else None,
    )


def collect_files(root: str | Path) -> list[RunRecord]:
    """Every `metrics.json` and `failed.json` under `root` (hidden dirs such as .submitit skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Log root {root} does not exist. Pass --from <dir with <cell>/seed<n>/metrics.json> "
            "or set LOG_ROOT."
        )
    records: list[RunRecord] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and d not in SKIP_DIRS and REPLACED_MARK not in d
        )
        for fname in (METRICS_FILE, FAILED_FILE):
            if fname in filenames:
                path = Path(dirpath) / fname
                data, err = _read_json(path)
                records.append(
                    _record_from_json(data, err, path, path.relative_to(root).as_posix())
                )
    return records


def collect_wandb(
    spec: TableSpec, entity: str | None = None, project: str | None = None
) -> list[RunRecord]:
    """Runs of `spec`'s paper table from the W&B API.

    Server-side filter: runs tagged with the paper id or whose `config.paper.id` matches; then
    filtered here on the run's `config.paper` block (id, table), or, for runs whose config lacks
    it, on the W&B group (`${cell}`) and name (`${cell}.s${seed}`). Grouping is by cell, never by
    tag. Metrics come from the run summary. Finished runs count; crashed/failed runs are reported
    as failed.

    Raises:
        WandbUnavailableError: offline mode, missing login or no network.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in {"offline", "disabled", "dryrun"}:
        raise WandbUnavailableError(
            f"WANDB_MODE={mode}: the W&B API needs network access and a login. Aggregate from "
            "files instead (`--source files --from logs/`), or unset WANDB_MODE and "
            "`wandb login` (runs logged offline need `wandb sync` first)."
        )
    try:
        import wandb

        api = wandb.Api(timeout=60)
        entity = entity or os.environ.get("WANDB_ENTITY") or api.default_entity
        project = project or os.environ.get("WANDB_PROJECT") or "reprolab"
        filters = {
            "$or": [{"config.paper.id": spec.paper}, {"tags": spec.paper}],
            "state": {"$in": ["finished", "crashed", "failed"]},
        }
        runs = list(api.runs(f"{entity}/{project}", filters=filters, per_page=500))
    except WandbUnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001 - auth, network and API errors all mean "unavailable"
        raise WandbUnavailableError(
            f"W&B API unavailable ({type(exc).__name__}: {exc}). Check `wandb login`, network "
            "access and --entity/--project, or aggregate from files with `--from logs/`."
        ) from exc

    records: list[RunRecord] = []
    prefix = f"{spec.paper}.{spec.id}."
    for run in runs:
        config = dict(run.config or {})
        paper = config.get("paper") if isinstance(config.get("paper"), dict) else None
        # The W&B logger sets group=${cell} and name=${cell}.s${seed}: identity even without config.
        cell = config.get("cell") or getattr(run, "group", None)
        if paper is not None:
            if paper.get("id") != spec.paper or str(paper.get("table")) != spec.id:
                continue
            cell = cell or f"{paper['id']}.{paper['table']}.{paper.get('row')}.{paper.get('col')}"
        elif not str(cell or "").startswith(prefix):
            continue
        seed = config.get("seed")
        if seed is None:
            m = re.fullmatch(r".*\.s(-?\d+)", str(getattr(run, "name", "") or ""))
            seed = m.group(1) if m else None
        summary = {k: v for k, v in dict(run.summary or {}).items() if not k.startswith("_")}
        git = config.get("git") if isinstance(config.get("git"), dict) else {}
        sha = git.get("sha") or getattr(run, "commit", None)
        if not sha:
            sha = ((getattr(run, "metadata", None) or {}).get("git") or {}).get("commit")
        finished = run.state == "finished"
        trial = _int_or_none(config.get("trial"))
        records.append(
            RunRecord(
                cell=str(cell),
                seed=None if seed is None else int(seed),
                status="finished" if finished else "failed",
                metrics=summary,
                paper=paper,
                sha=sha,
                dirty=git.get("dirty"),
                error=None if finished else f"W&B state={run.state}",
                finished_at=str(getattr(run, "heartbeat_at", "") or "") or None,
                source="/".join(run.path),
                trial=trial,
                overrides=_wandb_overrides(config, trial),
            )
        )
    return records


def _wandb_overrides(config: dict[str, Any], trial: int | None) -> dict[str, Any] | None:
    """A W&B run's trial values, from the search block of its logged config."""
    if trial is None or not isinstance(config.get("search"), dict):
        return None
    from reprolab.search import trial_overrides

    try:
        return trial_overrides(config["search"], trial)
    except Exception:  # noqa: BLE001 - a search the current code cannot read: values unknown
        return None


def _matches_table(rec: RunRecord, spec: TableSpec) -> bool:
    if rec.paper is not None:
        return rec.paper.get("id") == spec.paper and str(rec.paper.get("table")) == spec.id
    return bool(rec.cell) and rec.cell.startswith(f"{spec.paper}.{spec.id}.")


def _run_key(rec: RunRecord, by_cell_id: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(paper.row, paper.col) of a record: from its paper block, else from its cell id."""
    if rec.paper is not None and rec.paper.get("row") is not None:
        return (str(rec.paper.get("row")), str(rec.paper.get("col")))
    return by_cell_id.get(rec.cell or "")


def _metric_value(
    rec: RunRecord, metric: str, have: bool = True
) -> tuple[float | None, str | None]:
    """`(value, None)`, or `(None, why)`; `have`: the why lists the keys the record has."""
    if metric not in rec.metrics:
        if not have:
            return None, f"metric {metric!r} not in the record"
        keys = ", ".join(sorted(rec.metrics)) or "none"
        return None, f"metric {metric!r} not in the record (has: {keys})"
    value = rec.metrics[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, f"metric {metric!r} is {value!r}, not a finite number"
    return float(value), None


def _preference(rec: RunRecord) -> tuple[bool, str]:
    # Finished beats failed, then the latest record; on a tie the first path in sorted order stays.
    return (rec.status == "finished", rec.finished_at or "")


def _as_failed(rec: RunRecord, error: str) -> RunRecord:
    return RunRecord(**{**rec.__dict__, "status": "failed", "error": error})


def aggregate(
    spec: TableSpec, records: list[RunRecord], source: str = "metrics.json files"
) -> TableResult:
    """Match records to `spec`'s runs and seeds; one CellResult per (row, col)."""
    cells = {
        (r, c): CellResult(
            row=r,
            col=c,
            cell=spec.cell_id(r, c),
            experiment=spec.cells.get((r, c)),
            reported=spec.reported.get((r, c)),
        )
        for r in spec.rows
        for c in spec.cols
    }
    # Each run (row, paper.col) fills its cells, each with the key that cell reads: one cell in a
    # single-metric table, the whole row in a metric-column one.
    targets: dict[tuple[str, str], list[tuple[tuple[str, str], str]]] = {}
    runs: dict[tuple[str, str], RunCell] = {}
    for r in spec.rows:
        for c in spec.cols:
            exp = spec.cells.get((r, c))
            if exp is None:
                continue
            key = (r, spec.run_col(r, c))
            targets.setdefault(key, []).append(((r, c), spec.metric_of(c)))
            if key not in runs:
                runs[key] = RunCell(row=key[0], col=key[1], cell=spec.cell_id(r, c), experiment=exp)
    by_cell_id = {run.cell: key for key, run in runs.items()}

    ignored: list[tuple[RunRecord, str]] = []
    chosen: dict[tuple[tuple[str, str], int], RunRecord] = {}
    trial_runs: dict[tuple[tuple[str, str], int, int], RunRecord] = {}  # (key, seed, trial)

    def keep(slots: dict[Any, RunRecord], slot: Any, rec: RunRecord) -> None:
        other = slots.get(slot)
        if other is None:
            slots[slot] = rec
            return
        win, drop = (rec, other) if _preference(rec) > _preference(other) else (other, rec)
        slots[slot] = win
        ignored.append((drop, f"superseded by {win.source} ({win.status})"))

    for rec in sorted(records, key=lambda x: x.source):
        if not _matches_table(rec, spec):
            continue
        key = _run_key(rec, by_cell_id)
        if key is None or key not in targets:
            ignored.append((rec, NOT_A_CELL))
            continue
        if rec.seed is None or rec.seed not in spec.seeds:
            ignored.append((rec, f"seed {rec.seed} is not in table.seeds {spec.seeds}"))
            continue
        trials = _compact(spec.trials)
        if runs[key].experiment in spec.select:
            if rec.trial is None:
                ignored.append((rec, f"no trial; this cell selects over trials {trials}"))
            elif rec.trial not in spec.trials:
                ignored.append((rec, f"trial {rec.trial} is not in the table's trials {trials}"))
            else:
                keep(trial_runs, (key, rec.seed, rec.trial), rec)
            continue
        if rec.trial is not None:
            why = f"trial {rec.trial} of a search, but the table does not sweep trials of this cell"
            ignored.append((rec, why))
            continue
        keep(chosen, (key, rec.seed), _checked(rec, targets[key]))

    selections = _select(spec, runs, trial_runs)
    for sel in selections:
        key = by_cell_id[sel.cell]
        if sel.chosen is not None:
            chosen[(key, sel.seed)] = _checked(sel.records[sel.chosen], targets[key])
        elif sel.failed:
            first = sel.failed[min(sel.failed)]
            chosen[(key, sel.seed)] = _as_failed(
                first,
                f"no trial finished with {sel.metric} ({len(sel.failed)} failed, "
                f"{len(sel.missing)} missing of {len(sel.expected)}; see Model selection)",
            )

    for (key, seed), rec in chosen.items():
        runs[key].records[seed] = rec
        for cell_key, metric in targets[key]:
            cell = cells[cell_key]
            if rec.status != "finished":
                cell.failed[seed] = rec
                continue
            value, err = _metric_value(rec, metric)
            if err is not None:  # a metric-column run without this column's key
                cell.failed[seed] = _as_failed(rec, err)
                continue
            cell.values[seed] = value * spec.scale_of(cell.col)  # type: ignore[operator]
            cell.records[seed] = rec
    for sel in selections:
        if sel.chosen is not None and not sel.complete:
            for cell_key, _ in targets[by_cell_id[sel.cell]]:
                cells[cell_key].incomplete.append(sel.seed)
    for cell in cells.values():
        if cell.experiment is not None:
            cell.missing = [s for s in spec.seeds if s not in cell.values and s not in cell.failed]
    for key, run in runs.items():
        run.missing = [s for s in spec.seeds if s not in run.records]
        # Cost keys are the run's: each cell it backs gets them from every finished record of the
        # run (in a single-metric table, exactly the cell's counted seeds).
        extras = _extras(run.finished, spec.extra_columns)
        for cell_key, _ in targets[key]:
            cells[cell_key].extras = {k: dict(v) for k, v in extras.items()}
    ordered = [cells[(r, c)] for r in spec.rows for c in spec.cols]
    ignored.sort(key=lambda x: (x[0].source, x[1]))
    return TableResult(
        spec=spec,
        cells=ordered,
        ignored=ignored,
        source=source,
        extra_columns=list(spec.extra_columns),
        runs=list(runs.values()),
        selections=selections,
        averages=_averages(spec, cells),
    )


def _incomplete(spec: TableSpec, c: CellResult) -> str | None:
    """Why a cell keeps its row's average blank (None: complete)."""
    if c.status == "ok":
        return None
    where = spec.label(c.col)
    if c.experiment is None:
        return f"{where}: no experiment"
    parts = []
    if c.missing:
        parts.append(f"missing {_seed_list(c.missing)}")
    if c.failed:
        parts.append(f"failed {_seed_list(sorted(c.failed))}")
    if c.incomplete:
        parts.append(f"{_seed_list(sorted(c.incomplete))} chosen among unfinished trials")
    return f"{where}: {'; '.join(parts)}"


def _averages(spec: TableSpec, cells: dict[tuple[str, str], CellResult]) -> list[AverageCell]:
    """One AverageCell per row of a table with `table.average` (empty list otherwise)."""
    avg = spec.average
    if avg is None:
        return []
    out = []
    for r in spec.rows:
        row = [cells[(r, c)] for c in avg.cols]
        cell = AverageCell(
            row=r, col=avg.col, rule=avg.rule, reported=spec.reported.get((r, avg.col))
        )
        cell.n = min(c.n for c in row)
        cell.why = [w for c in row if (w := _incomplete(spec, c)) is not None]
        if not cell.why and avg.rule == "base_new_hm":
            means: dict[str, list[float]] = {k: [] for k in BASE_NEW_KEYS}
            for c in row:
                for key in BASE_NEW_KEYS:
                    vals = []
                    for seed in sorted(c.values):
                        value, err = _metric_value(c.records[seed], key, have=False)
                        if err is not None:
                            cell.why.append(f"{spec.label(c.col)} seed {seed}: {err}")
                        else:
                            vals.append(value * spec.scale_of(c.col))  # type: ignore[operator]
                    if vals:
                        means[key].append(statistics.fmean(vals))
            if not cell.why:
                b, n = (statistics.fmean(means[k]) for k in BASE_NEW_KEYS)
                cell.base, cell.new = b, n
                cell.mean = 0.0 if b + n == 0 else 2.0 * b * n / (b + n)
        elif not cell.why:
            cell.mean = statistics.fmean(c.mean for c in row)  # type: ignore[misc]
        if cell.mean is not None:
            cell.seeds = sorted(set.intersection(*(set(c.values) for c in row)))
        cell.commits = sorted({sha for c in row for sha in c.commits})
        out.append(cell)
    return out


def _checked(rec: RunRecord, targets: list[tuple[tuple[str, str], str]]) -> RunRecord:
    """A finished record without the key of its only cell (or of any of its row's cells in a
    metric-column table) counts as failed."""
    if rec.status != "finished":
        return rec
    errs = [e for _, m in targets if (e := _metric_value(rec, m)[1]) is not None]
    if len(errs) == 1 == len(targets):
        return _as_failed(rec, errs[0])
    if errs and len(errs) == len(targets):
        have = ", ".join(sorted(rec.metrics)) or "none"
        return _as_failed(rec, f"no key of table.col_metrics in the record (has: {have})")
    return rec


def _run_dir_of(rec: RunRecord) -> str:
    """The run dir a record names (its source's parent; a W&B run path as it is)."""
    return rec.source.rpartition("/")[0] if rec.source.endswith(".json") else rec.source


def _select(
    spec: TableSpec,
    runs: dict[tuple[str, str], RunCell],
    trial_runs: dict[tuple[tuple[str, str], int, int], RunRecord],
) -> list[SeedSelection]:
    """Per cell that selects over trials and per seed: its trials and the chosen one.

    A finished trial without the selection metric is a failed trial whose error names its run
    dir; test metrics are never read here.
    """
    out = []
    for key, run in runs.items():
        rule = spec.select.get(run.experiment)
        if rule is None:
            continue
        for seed in spec.seeds:
            sel = SeedSelection(
                cell=run.cell,
                experiment=run.experiment,
                seed=seed,
                metric=rule["metric"],
                mode=rule["mode"],
                expected=list(spec.trials),
            )
            for trial in spec.trials:
                rec = trial_runs.get((key, seed, trial))
                if rec is None:
                    continue
                if rec.status != "finished":
                    sel.failed[trial] = rec
                    continue
                value, err = _metric_value(rec, sel.metric, have=False)
                if err is not None:
                    sel.failed[trial] = _as_failed(rec, f"selection {err}: {_run_dir_of(rec)}")
                    continue
                sel.values[trial] = value  # type: ignore[assignment]
                sel.records[trial] = rec
            sel.chosen = sel.choose()
            out.append(sel)
    return out


def _compact(ints: list[int]) -> str:
    """`0-3, 7, 9-10` for [0, 1, 2, 3, 7, 9, 10]."""
    parts: list[tuple[int, int]] = []
    for i in sorted(set(ints)):
        if parts and parts[-1][1] == i - 1:
            parts[-1] = (parts[-1][0], i)
        else:
            parts.append((i, i))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def _extras(records: dict[int, RunRecord], keys: list[str]) -> dict[str, dict[int, float]]:
    """Extra key -> seed -> value over `records`; a record without the key (or with a value that
    is not a finite number) is left out of that key only."""
    out: dict[str, dict[int, float]] = {}
    for key in keys:
        for seed, rec in sorted(records.items()):
            value, err = _metric_value(rec, key, have=False)
            if err is None:
                out.setdefault(key, {})[seed] = value  # type: ignore[assignment]
    return out


def fmt(x: float | None, decimals: int) -> str:
    """Fixed-point text; '' for None; never '-0.0'."""
    if x is None:
        return ""
    s = f"{x:.{decimals}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def fmt_extra(x: float | None) -> str:
    """A cost value: a whole number as an integer (parameter counts), else one decimal, or three
    significant digits below 1; '' for None."""
    if x is None:
        return ""
    if x == int(x):
        return fmt(x, 0)
    if abs(x) >= 1:
        return fmt(x, 1)
    return fmt(x, min(10, 2 - math.floor(math.log10(abs(x)))))


def _seeds(seeds: list[int] | Any) -> str:
    return ";".join(str(s) for s in sorted(seeds))


def to_csv(result: TableResult) -> str:
    """Long format: one line per (row, col) in display order; columns `CSV_COLUMNS` (`metric`:
    the key that cell reads), then one per `table.extra_columns` key (blank: no counted record of
    the cell has it)."""
    spec = result.spec
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    selecting = bool(spec.select)
    w.writerow([*CSV_COLUMNS, *result.extra_columns, *(SELECTION_COLUMNS if selecting else ())])
    chosen: dict[str, dict[int, int]] = {}
    for sel in result.selections:
        if sel.chosen is not None:
            chosen.setdefault(sel.cell, {})[sel.seed] = sel.chosen
    averages = {a.row: a for a in result.averages}
    last_col = spec.cols[-1]
    for c in result.cells:
        d = spec.decimals_of(c.col)
        selection = []
        if selecting:
            trials = chosen.get(c.cell, {})
            selection = [
                len(spec.trials) if c.experiment in spec.select else "",
                ";".join(f"{s}:{trials[s]}" for s in sorted(trials) if s in c.values),
                _seeds(c.incomplete),
            ]
        w.writerow(
            [
                spec.paper,
                spec.id,
                c.row,
                c.col,
                c.experiment or "",
                spec.metric_of(c.col),
                c.status,
                c.n,
                fmt(c.mean, d),
                fmt(c.std, d),
                fmt(c.reported, d),
                fmt(c.delta, d),
                _seeds(c.values),
                _seeds(c.missing),
                _seeds(c.failed),
                _seeds(c.dirty_seeds),
                ";".join(c.commits),
                *(fmt_extra(c.extra_mean(k)) for k in result.extra_columns),
                *selection,
            ]
        )
        if c.col == last_col and c.row in averages:
            w.writerow(_average_csv_row(spec, averages[c.row], result, selecting))
    return buf.getvalue()


def _average_metric(spec: TableSpec) -> str:
    """The csv's `metric` of an average line: `<rule>:<the keys it reads>`."""
    assert spec.average is not None
    keys = ";".join(BASE_NEW_KEYS) if spec.average.rule == "base_new_hm" else str(spec.metric)
    return f"{spec.average.rule}:{keys}"


def _average_csv_row(
    spec: TableSpec, a: AverageCell, result: TableResult, selecting: bool
) -> list[Any]:
    d = spec.decimals
    return [
        spec.paper,
        spec.id,
        a.row,
        a.col,
        "",
        _average_metric(spec),
        a.status,
        a.n,
        fmt(a.mean, d),
        "",
        fmt(a.reported, d),
        fmt(a.delta, d),
        _seeds(a.seeds),
        "",
        "",
        "",
        ";".join(a.commits),
        *("" for _ in result.extra_columns),
        *(("", "", "") if selecting else ()),
    ]


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _signed(x: float | None, d: int) -> str:
    s = fmt(x, d)
    return s if not s or s.startswith("-") or float(s) == 0 else f"+{s}"


def _cell_text(c: CellResult, d: int) -> str:
    if c.experiment is None:
        ours = "·"
    elif c.n == 0:
        ours = f"{c.status} (0)"
    elif c.std is None:
        ours = f"{fmt(c.mean, d)} ({c.n})"
    else:
        ours = f"{fmt(c.mean, d)} ± {fmt(c.std, d)} ({c.n})"
    if c.incomplete and c.n:
        ours += "*"  # a seed chosen among unfinished trials (Model selection)
    if c.reported is not None:
        ours += f" [{fmt(c.reported, d)}]"
    return ours


def _seed_list(seeds: list[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)


def _grid(
    spec: TableSpec,
    cells: dict[tuple[str, str], CellResult],
    text: Any,
    averages: dict[str, str] | None = None,
) -> list[str]:
    """A rows × cols markdown grid; `text(cell, decimals)` renders one cell; `averages` (row ->
    text) adds the average column (`table.average`) after the last."""
    extra = averages is not None and spec.average is not None
    header = [""] + [spec.label(c) for c in spec.cols]
    header += [spec.label(spec.average.col)] if extra else []  # type: ignore[union-attr]
    out = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    out.append("|:--" + "|--:" * (len(spec.cols) + extra) + "|")
    for r in spec.rows:
        row = [spec.label(r)] + [text(cells[(r, c)], spec.decimals_of(c)) for c in spec.cols]
        row += [averages.get(r, "")] if extra else []  # type: ignore[union-attr]
        out.append("| " + " | ".join(_md_escape(x) for x in row) + " |")
    return out


def _average_text(a: AverageCell, d: int) -> str:
    """The average cell: the value (blank when incomplete), the paper's in brackets."""
    parts = [fmt(a.mean, d)] if a.mean is not None else []
    if a.reported is not None:
        parts.append(f"[{fmt(a.reported, d)}]")
    return " ".join(parts)


def _md_average(result: TableResult) -> list[str]:
    """The "Average" section: the rule, then per row its value (B̄, N̄) or why it is blank."""
    spec = result.spec
    if spec.average is None:
        return []
    avg, d = spec.average, spec.decimals
    n = f"{len(avg.cols)} column{'s' if len(avg.cols) != 1 else ''}"
    if len(avg.cols) < len(spec.cols):
        n += f" {', '.join(spec.label(c) for c in avg.cols)}"
    if avg.rule == "base_new_hm":
        b, nk = BASE_NEW_KEYS
        rule = (
            f"2·B̄·N̄/(B̄ + N̄), with B̄ the mean over the {n} of each cell's seed-mean "
            f"`{b}` and N̄ likewise of `{nk}` (CoCoOp's average row: the HM of the averages, "
            "not the mean of the per-column HMs)"
        )
    else:
        rule = f"the mean over the {n} of the cells' seed means of `{spec.metric}`"
    out = [
        "",
        "## Average",
        "",
        f"Column {spec.label(avg.col)} (`table.average`, rule `{avg.rule}`): {rule}. Blank unless "
        "every averaged column of the row has all its seeds finished.",
        "",
    ]
    for a in result.averages:
        if a.mean is None:
            out.append(f"- {spec.label(a.row)}: blank: {'; '.join(a.why)}")
        elif a.base is not None and a.new is not None:
            out.append(
                f"- {spec.label(a.row)}: {fmt(a.mean, d)} (B̄ {fmt(a.base, d)}, N̄ {fmt(a.new, d)})"
            )
        else:
            out.append(f"- {spec.label(a.row)}: {fmt(a.mean, d)}")
    return out


def _column_keys(spec: TableSpec) -> str:
    """`Label` = `key` (×scale) per column of a metric-column table, as one line."""
    parts = []
    for c in spec.cols:
        scale = spec.scale_of(c)
        times = "" if scale == 1.0 else f" ×{scale:g}"
        parts.append(f"{spec.label(c)} = `{spec.metric_of(c)}`{times}")
    return "Column keys (`table.col_metrics`): " + ", ".join(parts) + "."


def _extra_label(spec: TableSpec, key: str) -> str:
    return str(spec.labels.get(key) or EXTRA_LABELS.get(key, key))


def _extra_text(c: CellResult, key: str, n: int) -> str:
    """A cell's cost: the mean, "(k/n)" when only k of its n finished seeds have the key."""
    if c.experiment is None:
        return "·"
    vals = c.extras.get(key) or {}
    if not vals:
        return MISSING
    text = fmt_extra(c.extra_mean(key))
    return text if len(vals) >= n else f"{text} ({len(vals)}/{n})"


def _md_cost(result: TableResult) -> list[str]:
    """The "Cost" section (`table.extra_columns`): one rows × cols grid per key, or in a
    metric-column table one rows × keys grid (the costs of the run behind each row)."""
    spec, keys = result.spec, result.extra_columns
    if not keys:
        return []
    cells = {(c.row, c.col): c for c in result.cells}
    out = ["", "## Cost", ""]
    if spec.metric_columns:
        out.append(
            "Per row, the mean over its finished runs of each key of the run records "
            f"(`table.extra_columns`). `{MISSING}` = no finished run of the row has the key; "
            "(k/n) = only k of its n finished runs have it. `·` = no experiment for this row."
        )
        out += [""]
        header = [""] + [f"{_extra_label(spec, k)} (`{k}`)" for k in keys]
        out.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
        out.append("|:--" + "|--:" * len(keys) + "|")
        runs = {run.row: run for run in result.runs}
        for r in spec.rows:
            run = runs.get(r)
            first = cells[(r, spec.cols[0])]  # every cell of a row holds its run's costs
            n = len(run.finished) if run is not None else 0
            row = [spec.label(r)] + [_extra_text(first, k, n) for k in keys]
            out.append("| " + " | ".join(_md_escape(x) for x in row) + " |")
        return out
    out.append(
        "Per cell, the mean over its finished seeds of each key of the run records "
        f"(`table.extra_columns`). `{MISSING}` = no finished seed of the cell has the key; (k/n) = "
        "only k of its n finished seeds have it. `·` = no experiment for this cell."
    )
    for k in keys:
        out += ["", f"{_extra_label(spec, k)} (`{k}`):", ""]
        out += _grid(spec, cells, lambda c, _d, k=k: _extra_text(c, k, c.n))
    return out


def _md_selection(result: TableResult) -> list[str]:
    """The "Model selection" section of a table that selects over trials: per cell and seed the
    chosen trial, its selection value and values, trials finished/expected; then failed trials."""
    spec = result.spec
    if not spec.select:
        return []
    sels = result.selections
    n_exp = sum(len(s.expected) for s in sels)
    n_fin = sum(len(s.values) for s in sels)
    n_fail = sum(len(s.failed) for s in sels)
    n_inc = sum(1 for s in sels if s.chosen is not None and not s.complete)
    out = [
        "",
        "## Model selection",
        "",
        f"Trials {_compact(spec.trials)} of each cell's search (`hydra.sweeper.params.trial`). Per "
        "cell and seed, the reported run is the trial with the best selection metric among its "
        "finished trials (ties: the lowest trial); test metrics are never used to select. "
        f"{len(sels)} cell-seeds x {len(spec.trials)} trials = {n_exp} trial runs: {n_fin} "
        f"finished, {n_fail} failed, {n_exp - n_fin - n_fail} missing. "
        + (
            f"**{n_inc} seed{'s' if n_inc != 1 else ''} chosen among incomplete trials** "
            "(`*` in the table)."
            if n_inc
            else "Every chosen seed had all its trials finished."
        ),
        "",
        "| cell | seed | selected by | trial | value | values of the trial | finished | note |",
        "|:--|--:|:--|--:|--:|:--|--:|:--|",
    ]
    for sel in sels:
        by = f"`{sel.metric}` ({sel.mode})"
        done = f"{len(sel.values)}/{len(sel.expected)}"
        problems = []
        if sel.failed:
            problems.append(f"failed trials {_compact(list(sel.failed))}")
        if sel.missing:
            problems.append(f"missing trials {_compact(sel.missing)}")
        if sel.chosen is None:
            note = "no finished trial" + (f": {'; '.join(problems)}" if problems else "")
            row = [f"`{sel.cell}`", str(sel.seed), by, MISSING, MISSING, MISSING, done, note]
        else:
            rec = sel.records[sel.chosen]
            note = f"**incomplete**: {'; '.join(problems)}" if problems else ""
            row = [
                f"`{sel.cell}`",
                str(sel.seed),
                by,
                str(sel.chosen),
                format_value(sel.values[sel.chosen]),
                format_overrides(rec.overrides) or MISSING,
                done,
                note,
            ]
        out.append("| " + " | ".join(_md_escape(x) for x in row) + " |")
    failed = [(sel, t, rec) for sel in sels for t, rec in sorted(sel.failed.items())]
    if failed:
        out += ["", "Failed trials:", ""]
        out += [
            f"- `{sel.cell}` seed {sel.seed} trial {t}: {single_line(rec.error, 200)} "
            f"(`{rec.source}`)"
            for sel, t, rec in failed
        ]
    return out


def _md_cell_runs(result: TableResult) -> list[str]:
    """Status, missing and failed runs of a single-metric table (one run cell per table cell)."""
    spec = result.spec
    run_cells = [c for c in result.cells if c.experiment is not None]
    n_exp = len(run_cells) * len(spec.seeds)
    n_fin = sum(c.n for c in run_cells)
    n_fail = sum(len(c.failed) for c in run_cells)
    n_miss = sum(len(c.missing) for c in run_cells)
    out = [
        "",
        "## Status",
        "",
        f"{len(run_cells)} cells × {len(spec.seeds)} seeds = {n_exp} runs: {n_fin} finished, "
        f"{n_fail} failed, {n_miss} missing.",
    ]

    out += ["", "## Missing runs", ""]
    missing = [c for c in run_cells if c.missing]
    if missing:
        for c in missing:
            whole = " (whole cell: no finished seed)" if c.n == 0 and not c.failed else ""
            out.append(f"- `{c.cell}` ({c.experiment}): {_seed_list(c.missing)}{whole}")
    else:
        out.append("None.")

    out += ["", "## Failed runs", ""]
    failed = [(c, s, rec) for c in run_cells for s, rec in sorted(c.failed.items())]
    if failed:
        out += ["| cell | seed | error | record |", "|:--|--:|:--|:--|"]
        for c, s, rec in failed:
            out.append(
                f"| `{c.cell}` | {s} | {_md_escape(single_line(rec.error, 200))} | `{_md_escape(rec.source)}` |"
            )
    else:
        out.append("None.")
    return out


def _md_row_runs(result: TableResult) -> list[str]:
    """Status, missing and failed runs of a metric-column table: one run per row and seed."""
    spec = result.spec
    cells = {(c.row, c.col): c for c in result.cells}
    runs = result.runs
    n_fin = sum(len(run.finished) for run in runs)
    n_fail = sum(len(run.failed) for run in runs)
    n_miss = sum(len(run.missing) for run in runs)
    # Finished runs without the key of some column: failed for those columns only.
    partial: list[tuple[RunCell, int, RunRecord, list[str]]] = []
    for run in runs:
        for seed, rec in run.finished.items():
            cols = [c for c in spec.cols if seed in cells[(run.row, c)].failed]
            if cols:
                partial.append((run, seed, rec, cols))
    status = (
        f"{len(runs)} rows × {len(spec.seeds)} seeds = {len(runs) * len(spec.seeds)} runs: "
        f"{n_fin} finished, {n_fail} failed, {n_miss} missing."
    )
    if partial:
        status += (
            f" {len(partial)} finished run{'s lack' if len(partial) != 1 else ' lacks'} the value "
            "of some column (under Failed runs)."
        )
    out = ["", "## Status", "", status]

    out += ["", "## Missing runs", ""]
    missing = [run for run in runs if run.missing]
    if missing:
        for run in missing:
            whole = " (whole row: no finished seed)" if not run.records else ""
            out.append(f"- `{run.cell}` ({run.experiment}): {_seed_list(run.missing)}{whole}")
    else:
        out.append("None.")

    out += ["", "## Failed runs", ""]
    lines: list[tuple[RunCell, int, str, str, RunRecord]] = []
    for run in runs:
        for seed, rec in run.failed.items():
            lines.append((run, seed, "all", single_line(rec.error, 200), rec))
    for run, seed, rec, cols in partial:
        whys = [_metric_value(rec, spec.metric_of(c), have=False)[1] or "" for c in cols]
        lines.append(
            (run, seed, ", ".join(cols), single_line("; ".join(dict.fromkeys(whys)), 400), rec)
        )
    if lines:
        out += ["| run | seed | columns | error | record |", "|:--|--:|:--|:--|:--|"]
        for run, seed, cols_text, error, rec in sorted(
            lines, key=lambda x: (runs.index(x[0]), x[1])
        ):
            out.append(
                f"| `{run.cell}` | {seed} | {_md_escape(cols_text)} | {_md_escape(error)} | "
                f"`{_md_escape(rec.source)}` |"
            )
    else:
        out.append("None.")
    return out


def to_markdown(result: TableResult, command: str | None = None) -> str:
    """Readable rows × cols table plus the sections that say what is missing or suspect."""
    spec = result.spec
    cells = {(c.row, c.col): c for c in result.cells}
    out: list[str] = [f"# {spec.title}", ""]
    src = f" Source: {spec.source}." if spec.source else ""
    out.append(
        f"Paper `{spec.paper}`, table `{spec.id}` (config `configs/table/{spec.name}.yaml`).{src}"
    )
    out.append("")
    seeds = ", ".join(str(s) for s in spec.seeds)
    if spec.metric_columns:
        out.append(
            "Each row is one experiment; its columns are metrics of the same runs: mean ± sample "
            f"std over seeds {{{seeds}}}, number of finished seeds in parentheses, the paper's "
            "number in brackets. `·` = no experiment for this row."
        )
        out += ["", _column_keys(spec)]
    else:
        out.append(
            f"Metric `{spec.metric}`: mean ± sample std over seeds {{{seeds}}}, number of finished "
            "seeds in parentheses, the paper's number in brackets. `·` = no experiment for this cell."
        )
    if spec.notes:
        out += ["", spec.notes]
    cmd = command or f"python scripts/aggregate.py {spec.name}"
    out += ["", f"Generated from {result.source} by `{cmd}`; do not edit by hand.", ""]

    avg_d = spec.decimals
    averages = {a.row: _average_text(a, avg_d) for a in result.averages} if spec.average else None
    out += _grid(spec, cells, _cell_text, averages)
    if any(c.incomplete for c in result.cells):
        out += [
            "",
            "`*` = some seed's trial was chosen among unfinished trials (see Model selection).",
        ]
    deltas = [c.delta for c in result.cells] + [a.delta for a in result.averages]
    if any(x is not None for x in deltas):
        avg_deltas = (
            {a.row: _signed(a.delta, avg_d) for a in result.averages} if spec.average else None
        )
        out += ["", "Δ = ours − paper:", ""]
        out += _grid(spec, cells, lambda c, d: _signed(c.delta, d), avg_deltas)
    out += _md_average(result)
    out += _md_cost(result)
    out += _md_selection(result)

    out += _md_row_runs(result) if spec.metric_columns else _md_cell_runs(result)

    out += ["", "## Commits", ""]
    finished = result.finished
    by_commit: dict[str, list[RunRecord]] = {}
    for rec in finished:
        by_commit.setdefault(rec.commit, []).append(rec)
    if not finished:
        out.append("No finished runs.")
    elif len(by_commit) == 1:
        (sha,) = by_commit
        out.append(f"All {len(finished)} finished runs at `{sha}`.")
    else:
        out.append(f"**Mixed commits**: finished runs come from {len(by_commit)} commits.")
        out.append("")
        for sha in sorted(by_commit, key=lambda k: (-len(by_commit[k]), k)):
            recs = by_commit[sha]
            if len(recs) <= 5:
                which = ": " + ", ".join(f"`{r.cell}` s{r.seed}" for r in recs)
            else:
                which = ""
            out.append(f"- `{sha}`: {len(recs)} run{'s' if len(recs) != 1 else ''}{which}")

    out += ["", "## Configs", ""]
    what = "rows" if spec.metric_columns else "cells"
    units = result.runs if spec.metric_columns else result.cells
    # The seeds of a cell that selects over trials may choose different trials (configs): there,
    # the seeds of each trial must share one config.
    mixed = [
        (f"`{u.cell}`", u.fingerprints)
        for u in units
        if len(u.fingerprints) > 1 and u.experiment not in spec.select
    ]
    mixed += _mixed_trials(result.selections)
    if mixed:
        out.append(
            f"**Mixed configs**: the seeds of these {what} (trials) ran different resolved configs "
            "(fingerprint: seeds); their mean and std mix settings:"
        )
        out.append("")
        for name, fingerprints in mixed:
            fps = "; ".join(f"`{fp}`: {_seed_list(s)}" for fp, s in sorted(fingerprints.items()))
            out.append(f"- {name}: {fps}")
    else:
        one = "row" if spec.metric_columns else "cell"
        out.append(f"Every {one}'s finished seeds share one config fingerprint (or predate them).")

    out += ["", "## Dirty trees", ""]
    dirty = [r for r in finished if r.dirty]
    unknown = [r for r in finished if r.dirty is None]
    if dirty:
        out.append("Finished runs whose code had uncommitted changes:")
        out.append("")
        out += [f"- `{r.cell}` seed {r.seed} at `{r.commit}` (`{r.source}`)" for r in dirty]
    else:
        out.append("None.")
    if unknown:
        out += ["", f"Git state unknown for {len(unknown)} finished run(s):", ""]
        out += [f"- `{r.cell}` seed {r.seed} (`{r.source}`)" for r in unknown]

    out += ["", "## Ignored records", ""]
    ignored = result.ignored
    shared: list[RunRecord] = []
    if spec.output is not None:  # its paper.table is shared: other tables' cells are expected
        shared = [rec for rec, why in ignored if why == NOT_A_CELL]
        ignored = [(rec, why) for rec, why in ignored if why != NOT_A_CELL]
    if ignored:
        out.append("Records of this paper table that were not counted:")
        out.append("")
        for rec, why in ignored:
            out.append(f"- `{rec.source}` ({rec.status}, seed {rec.seed}): {why}")
    else:
        out.append("None.")
    if shared:
        cells = sorted({rec.cell or "" for rec in shared})
        out += [
            "",
            f"Not listed: {len(shared)} record{'s' if len(shared) != 1 else ''} of {len(cells)} "
            f"cell{'s' if len(cells) != 1 else ''} of paper.table `{spec.id}` that this table does "
            "not show (other tables read them: `table.output`).",
        ]

    if spec.warnings:
        out += ["", "## Config warnings", ""]
        out += [f"- {w}" for w in spec.warnings]
    return "\n".join(out) + "\n"


def _mixed_trials(selections: list[SeedSelection]) -> list[tuple[str, dict[str, list[int]]]]:
    """`(cell trial k, {fingerprint: seeds})` for each trial whose finished seeds ran different
    configs."""
    by_trial: dict[tuple[str, int], dict[int, RunRecord]] = {}
    for sel in selections:
        for trial, rec in sel.records.items():
            by_trial.setdefault((sel.cell, trial), {})[sel.seed] = rec
    out = []
    for (cell, trial), records in sorted(by_trial.items()):
        fps = _fingerprints(records)
        if len(fps) > 1:
            out.append((f"`{cell}` trial {trial}", fps))
    return out


def output_paths(spec: TableSpec, out_dir: str | Path) -> dict[str, Path]:
    base = Path(out_dir) / spec.paper / (spec.output or spec.id)  # `table.output`: same runs
    return {ext: base.with_suffix(f".{ext}") for ext in ("md", "csv", "png")}


def write_outputs(
    result: TableResult, out_dir: str | Path, plot: bool = True, command: str | None = None
) -> dict[str, Path]:
    """Write `<out>/<paper>/<id>.{md,csv[,png]}`; returns the paths written."""
    paths = output_paths(result.spec, out_dir)
    paths["md"].parent.mkdir(parents=True, exist_ok=True)
    paths["csv"].write_text(to_csv(result), encoding="utf-8", newline="")
    paths["md"].write_text(to_markdown(result, command), encoding="utf-8", newline="")
    if plot:
        from reprolab.tables.plot import plot_table

        plot_table(result, paths["png"])
    else:
        paths.pop("png")
    return paths


def aggregate_table(
    spec: TableSpec,
    log_root: str | Path | None = None,
    source: str = "files",
    out_dir: str | Path = "results",
    plot: bool = True,
    entity: str | None = None,
    project: str | None = None,
    command: str | None = None,
) -> tuple[TableResult, dict[str, Path]]:
    """Collect, aggregate and write one table (what `scripts/aggregate.py` runs)."""
    if source == "files":
        root = log_root if log_root is not None else os.environ.get("LOG_ROOT", "logs")
        records = collect_files(root)
        label = "metrics.json files"
    elif source == "wandb":
        records = collect_wandb(spec, entity=entity, project=project)
        label = "W&B runs"
    else:
        raise ValueError(f"Unknown source '{source}'; available: files, wandb")
    result = aggregate(spec, records, source=label)
    return result, write_outputs(result, out_dir, plot=plot, command=command)
