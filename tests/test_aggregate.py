"""Aggregation of metrics.json trees into paper tables, against a hand-computed expected CSV.

The fixture tree (tests/fixtures/runs/) has, for the fixture table fixpaper_tab1 (3 rows x 3 cols,
seeds 1-3): complete cells, a missing seed (bar.dsa s3), a wholly missing cell (ours.dsb), failed
runs (failed.json; a metrics.json without the table's metric), a stale failed.json next to a
finished run, a dirty tree and a second commit (ours.dsa s3), a seed outside the table (s4), a
column outside the table (dsz) and another paper's run. tests/fixtures/expected/fixpaper/tab1.csv
was written by hand from those values (e.g. ours.dsa: 90, 91, 95 -> mean 92.0, sd sqrt(7) = 2.6).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from reprolab.tables.aggregate import (
    CSV_COLUMNS,
    WandbUnavailableError,
    aggregate,
    aggregate_table,
    collect_files,
    collect_wandb,
    fmt,
    to_csv,
)
from reprolab.tables.schema import validate_table

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = FIXTURES / "configs"
RUNS = FIXTURES / "runs"
EXPECTED = FIXTURES / "expected" / "fixpaper" / "tab1.csv"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spec():
    return validate_table("fixpaper_tab1", CONFIGS)


def test_csv_matches_hand_computed_expected(spec, tmp_path: Path) -> None:
    _, paths = aggregate_table(spec, log_root=RUNS, out_dir=tmp_path, plot=False)
    assert paths["csv"] == tmp_path / "fixpaper" / "tab1.csv"
    assert paths["csv"].read_bytes() == EXPECTED.read_bytes()


def test_outputs_are_byte_identical_across_runs(spec, tmp_path: Path) -> None:
    _, first = aggregate_table(spec, log_root=RUNS, out_dir=tmp_path / "a")
    _, second = aggregate_table(spec, log_root=RUNS, out_dir=tmp_path / "b")
    _, again = aggregate_table(spec, log_root=RUNS, out_dir=tmp_path / "a")  # overwrite in place
    for ext in ("md", "csv", "png"):
        assert first[ext].read_bytes() == second[ext].read_bytes() == again[ext].read_bytes(), ext
    assert first["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_never_hides_problems(spec) -> None:
    from reprolab.tables.aggregate import to_markdown

    md = to_markdown(aggregate(spec, collect_files(RUNS)))
    assert "| Ours | 92.0 ± 2.6 (3) [93.7] | missing (0) [88.0] | · [50.0] |" in md
    assert "| bar | 60.5 ± 0.7 (2) [59.0] | 55.0 (1) | failed (0) |" in md
    assert "12 finished, 3 failed, 6 missing" in md
    assert "- `fixpaper.tab1.bar.dsa` (bar_dsa): seed 3\n" in md
    assert "(ours_dsb): seeds 1, 2, 3 (whole cell: no finished seed)" in md
    assert "ValueError: loss is NaN at step 12" in md
    assert "under /data \\| run prepare_data.py" in md  # pipes escaped inside table cells
    assert "metric 'test/acc' not in the record (has: test/ece)" in md
    assert "**Mixed commits**" in md and "`bbbbbbb`: 1 run: `fixpaper.tab1.ours.dsa` s3" in md
    assert "- `fixpaper.tab1.ours.dsa` seed 3 at `bbbbbbb`" in md
    assert "seed 4 is not in table.seeds" in md
    assert "ours.dsz/seed1/metrics.json" in md
    assert "zeroshot.dsb/seed2/failed.json` (failed, seed 2): superseded by" in md
    assert "otherpaper" not in md
    assert str(RUNS) not in md  # paths are relative to the log root: no machine-specific bytes


def test_csv_shape(spec) -> None:
    lines = to_csv(aggregate(spec, collect_files(RUNS))).splitlines()
    assert tuple(lines[0].split(",")) == CSV_COLUMNS
    assert len(lines) == 1 + len(spec.rows) * len(spec.cols)


def test_duplicate_records_latest_finished_wins(spec, tmp_path: Path) -> None:
    root = tmp_path / "logs"
    shutil.copytree(RUNS, root / "cluster1")
    copy = root / "cluster2" / "fixpaper.tab1.ours.dsa" / "seed3"
    copy.mkdir(parents=True)
    rec = json.loads((RUNS / "fixpaper.tab1.ours.dsa" / "seed3" / "metrics.json").read_text())
    rec.update(metrics={"test/acc": 92.0}, finished_at="2026-11-21T00:00:00+00:00")
    rec["git"] = {"sha": "a" * 40, "dirty": False}
    (copy / "metrics.json").write_text(json.dumps(rec))
    result = aggregate(spec, collect_files(root))
    cell = next(c for c in result.cells if (c.row, c.col) == ("ours", "dsa"))
    assert cell.values == {1: 90.0, 2: 91.0, 3: 92.0} and cell.commits == ["aaaaaaa"]
    assert any(
        r.source == "cluster1/fixpaper.tab1.ours.dsa/seed3/metrics.json" for r, _ in result.ignored
    )


def test_fmt_is_fixed_and_never_negative_zero() -> None:
    assert fmt(None, 1) == ""
    assert fmt(-0.04, 1) == "0.0"
    assert fmt(92.0 - 93.7, 1) == "-1.7"
    assert fmt(0.05, 3) == "0.050"


def test_missing_log_root_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="LOG_ROOT"):
        collect_files(tmp_path / "nope")


def test_wandb_source_refuses_offline(spec, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(WandbUnavailableError, match="--source files --from logs/"):
        collect_wandb(spec)


def _script(name: str):
    path = ROOT / "scripts" / f"{name}.py"
    mod_spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def test_aggregate_cli(tmp_path: Path, capsys) -> None:
    main = _script("aggregate").main
    args = ["--config-dir", str(CONFIGS), "--from", str(RUNS), "--out", str(tmp_path), "--no-plot"]
    assert main(["table=fixpaper_tab1", *args]) == 0
    assert (tmp_path / "fixpaper" / "tab1.csv").read_bytes() == EXPECTED.read_bytes()
    assert main(["--paper", "fixpaper", "--table", "tab1", *args]) == 0
    assert main(["fixpaper_tab1", "--strict", *args]) == 1  # missing and failed seeds
    assert main(["fixpaper_tab", *args]) == 2
    assert "did you mean 'fixpaper_tab1'" in capsys.readouterr().err


def test_list_tables_cli(capsys) -> None:
    assert _script("list_tables").main(["--config-dir", str(CONFIGS)]) == 0
    out = capsys.readouterr().out
    assert "fixpaper_tab1" in out and "fixpaper/tab1" in out
    line = next(x for x in out.splitlines() if x.startswith("fixpaper_tab1"))
    assert line.split()[2:5] == ["7", "3", "21"]


class _FakeRun:
    def __init__(self, cell: str, s: int, acc: float | None, state: str = "finished", **cfg):
        self.group, self.name, self.state = cell, f"{cell}.s{s}", state
        self.config = cfg
        self.summary = {"_step": 3, **({} if acc is None else {"test/acc": acc})}
        self.path = ["me", "reprolab", f"id{s}{cell[-3:]}"]
        self.commit = "c" * 40
        self.heartbeat_at = "2026-11-20T10:00:00"


def test_wandb_runs_are_grouped_by_cell(spec, monkeypatch) -> None:
    """The W&B path with a stand-in `wandb` module (the real API needs network and a login)."""
    import sys
    import types

    paper = {"id": "fixpaper", "table": "tab1", "row": "ours", "col": "dsa"}
    runs = [
        _FakeRun("fixpaper.tab1.ours.dsa", 1, 90.0, paper=paper, seed=1),
        _FakeRun("fixpaper.tab1.ours.dsa", 2, 94.0),  # identity from group/name only
        _FakeRun("fixpaper.tab1.ours.dsa", 3, None, state="crashed"),
        _FakeRun("fixpaper.tab2.ours.dsa", 1, 10.0, paper={**paper, "table": "tab2"}, seed=1),
    ]
    calls = {}

    class Api:
        default_entity = "me"

        def __init__(self, timeout: int = 0) -> None:
            pass

        def runs(self, path, filters=None, per_page=50):
            calls.update(path=path, filters=filters)
            return runs

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = aggregate(spec, collect_wandb(spec, project="reprolab"), source="W&B runs")
    assert calls["path"] == "me/reprolab"
    cell = next(c for c in result.cells if (c.row, c.col) == ("ours", "dsa"))
    assert cell.values == {1: 90.0, 2: 94.0} and list(cell.failed) == [3]
    assert cell.commits == ["ccccccc"] and cell.mean == 92.0


def test_mixed_config_fingerprints_within_a_cell_are_reported(spec, tmp_path: Path) -> None:
    """Seeds of one cell that ran different resolved configs are named, never silently averaged."""
    from reprolab.tables.aggregate import to_markdown

    shutil.copytree(RUNS, tmp_path / "runs")
    md = to_markdown(aggregate(spec, collect_files(tmp_path / "runs")))
    assert "Every cell's finished seeds share one config fingerprint" in md
    base = tmp_path / "runs" / "fixpaper.tab1.zeroshot.dsa"
    for seed, fp in ((1, "aaaa11112222"), (2, "aaaa11112222"), (3, "bbbb33334444")):
        path = base / f"seed{seed}" / "metrics.json"
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "fingerprint": fp}))
    md = to_markdown(aggregate(spec, collect_files(tmp_path / "runs")))
    assert "**Mixed configs**" in md
    assert (
        "- `fixpaper.tab1.zeroshot.dsa`: `aaaa11112222`: seeds 1, 2; `bbbb33334444`: seed 3" in md
    )


# -- metric-column tables: one run per row fills every column ------------------------------------

#: Synthetic records of fixpaper_tab2 (tests/test_table_schema.py builds its configs): per row and
#: seed the run's metrics; None = no record. ours is complete; bar s2 lacks one key, bar s3 failed;
#: zeroshot has seed 1 only.
METRIC_RUNS = {
    ("ours", 1): {"test/test/acc": 80.0, "test/dsb/acc": 60.0, "test/avg_shift/acc": 70.0,
                  "test/test/ece": 0.050, "test/avg_shift/ece": 0.10},
    ("ours", 2): {"test/test/acc": 82.0, "test/dsb/acc": 61.0, "test/avg_shift/acc": 71.0,
                  "test/test/ece": 0.040, "test/avg_shift/ece": 0.12},
    ("ours", 3): {"test/test/acc": 84.0, "test/dsb/acc": 65.0, "test/avg_shift/acc": 72.0,
                  "test/test/ece": 0.060, "test/avg_shift/ece": 0.14},
    ("bar", 1): {"test/test/acc": 60.0, "test/dsb/acc": 50.0, "test/avg_shift/acc": 55.0,
                 "test/test/ece": 0.200, "test/avg_shift/ece": 0.30},
    ("bar", 2): {"test/test/acc": 62.0, "test/dsb/acc": 52.0, "test/avg_shift/acc": 57.0,
                 "test/test/ece": 0.100},
    ("zeroshot", 1): {"test/test/acc": 68.3, "test/dsb/acc": 61.9, "test/avg_shift/acc": 58.4,
                      "test/test/ece": 0.057, "test/avg_shift/ece": 0.074},
}  # fmt: skip


def _metric_runs(root: Path) -> Path:
    """A log root of metrics.json / failed.json files for fixpaper_tab2 (METRIC_RUNS)."""
    for (row, seed), metrics in METRIC_RUNS.items():
        run_dir = root / f"fixpaper.tab2.{row}.dsa" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        paper = {"id": "fixpaper", "table": "tab2", "row": row, "col": "dsa"}
        record = {
            "cell": f"fixpaper.tab2.{row}.dsa", "seed": seed, "paper": paper, "metrics": metrics,
            "status": "finished", "git": {"sha": "a" * 40, "dirty": False},
            "finished_at": f"2026-12-01T00:00:0{seed}+00:00", "fingerprint": f"fp{row}",
        }  # fmt: skip
        (run_dir / "metrics.json").write_text(json.dumps(record))
    failed = root / "fixpaper.tab2.bar.dsa" / "seed3"
    failed.mkdir(parents=True)
    (failed / "failed.json").write_text(
        json.dumps({"cell": "fixpaper.tab2.bar.dsa", "seed": 3, "status": "failed",
                    "error": "RuntimeError: CUDA out of memory", "git": {"sha": "a" * 40}})
    )  # fmt: skip
    # A run of row ours on another dataset is no run of this table's row ours (its col is dsa).
    other = root / "fixpaper.tab2.ours.dsb" / "seed1"
    other.mkdir(parents=True)
    paper = {"id": "fixpaper", "table": "tab2", "row": "ours", "col": "dsb"}
    (other / "metrics.json").write_text(
        json.dumps({"seed": 1, "paper": paper, "metrics": METRIC_RUNS[("ours", 1)]})
    )
    return root


@pytest.fixture
def metric_result(tmp_path: Path):
    from test_table_schema import METRIC_TABLE, metric_table_configs

    spec = validate_table(METRIC_TABLE, metric_table_configs(tmp_path))
    return aggregate(spec, collect_files(_metric_runs(tmp_path / "logs")))


def test_metric_columns_mean_std_reported_delta_per_column(metric_result) -> None:
    cells = {(c.row, c.col): c for c in metric_result.cells}
    ours = {col: cells[("ours", col)] for col in metric_result.spec.cols}
    assert ours["a_acc"].values == {1: 80.0, 2: 82.0, 3: 84.0}
    assert ours["a_acc"].mean == 82.0 and ours["a_acc"].std == 2.0
    assert ours["a_acc"].reported == 83.0 and ours["a_acc"].delta == -1.0
    assert ours["b_acc"].mean == 62.0 and ours["b_acc"].std == pytest.approx(7**0.5)
    assert ours["avg_acc"].mean == 71.0 and ours["b_acc"].reported is None
    assert ours["a_ece"].mean == pytest.approx(0.05) and ours["a_ece"].std == pytest.approx(0.01)
    assert ours["a_ece"].delta == pytest.approx(0.003)
    assert ours["avg_ece"].mean == pytest.approx(0.12)
    # col_scale: the same key in percent; the paper's number is in the printed unit
    pct = ours["a_ece_pct"]
    assert pct.mean == pytest.approx(5.0) and pct.std == pytest.approx(1.0)
    assert pct.delta == pytest.approx(0.3)
    assert all(c.status == "ok" and c.experiment == "ours_sets" for c in ours.values())
    assert all(c.cell == "fixpaper.tab2.ours.dsa" for c in ours.values())

    bar = {col: cells[("bar", col)] for col in metric_result.spec.cols}
    assert bar["a_acc"].values == {1: 60.0, 2: 62.0} and list(bar["a_acc"].failed) == [3]
    # seed 2 finished without test/avg_shift/ece: failed for that column only
    assert bar["avg_ece"].values == {1: 0.30} and sorted(bar["avg_ece"].failed) == [2, 3]
    assert "test/avg_shift/ece' not in the record" in bar["avg_ece"].failed[2].error

    zs = cells[("zeroshot", "a_acc")]
    assert zs.values == {1: 68.3} and zs.missing == [2, 3] and zs.status == "partial"
    assert zs.std is None and zs.delta == pytest.approx(-1.7)
    assert [r for r, why in metric_result.ignored if "not a cell of this table" in why]


def test_metric_columns_csv_and_markdown(metric_result) -> None:
    from reprolab.tables.aggregate import to_markdown

    lines = to_csv(metric_result).splitlines()
    assert tuple(lines[0].split(",")) == CSV_COLUMNS
    assert len(lines) == 1 + 3 * 6
    assert (
        "fixpaper,tab2,ours,a_ece,ours_sets,test/test/ece,ok,3,0.050,0.010,0.047,0.003,1;2;3,,,,"
        "aaaaaaa" in lines
    )
    pct = "fixpaper,tab2,ours,a_ece_pct,ours_sets,test/test/ece,ok,3,5.0,1.0,4.7,0.3,1;2;3,,,,"
    assert pct + "aaaaaaa" in lines
    partial = "fixpaper,tab2,bar,avg_ece,bar_sets,test/avg_shift/ece,partial,1,0.300,,,,1,,2;3,,"
    assert partial + "aaaaaaa" in lines
    md = to_markdown(metric_result)
    assert "Column keys (`table.col_metrics`): A = `test/test/acc`, b_acc = `test/dsb/acc`" in md
    assert "ECE A (%) = `test/test/ece` ×100." in md
    assert (
        "| Ours | 82.0 ± 2.0 (3) [83.0] | 62.0 ± 2.6 (3) | 71.0 ± 1.0 (3) | 0.050 ± 0.010 (3) "
        "[0.047] | 0.120 ± 0.020 (3) | 5.0 ± 1.0 (3) [4.7] |" in md
    )
    assert (
        "| bar | 61.0 ± 1.4 (2) | 51.0 ± 1.4 (2) | 56.0 ± 1.4 (2) | 0.150 ± 0.071 (2) | 0.300 (1) "
        "| 15.0 ± 7.1 (2) |" in md
    )
    assert "| Ours | -1.0 |  |  | +0.003 |  | +0.3 |" in md
    assert "3 rows × 3 seeds = 9 runs: 6 finished, 1 failed, 2 missing." in md
    assert "1 finished run lacks the value of some column" in md
    assert "- `fixpaper.tab2.zeroshot.dsa` (zs_sets): seeds 2, 3\n" in md
    bar = "| `fixpaper.tab2.bar.dsa` |"
    assert f"{bar} 2 | avg_ece | metric 'test/avg_shift/ece' not in the record |" in md
    assert f"{bar} 3 | all | RuntimeError: CUDA out of memory |" in md
    assert "All 6 finished runs at `aaaaaaa`." in md  # each run once, not once per column
    assert "Every row's finished seeds share one config fingerprint" in md


def test_metric_columns_outputs_are_byte_identical_across_runs(tmp_path: Path) -> None:
    from test_table_schema import METRIC_TABLE, metric_table_configs

    spec = validate_table(METRIC_TABLE, metric_table_configs(tmp_path))
    logs = _metric_runs(tmp_path / "logs")
    _, first = aggregate_table(spec, log_root=logs, out_dir=tmp_path / "a")
    _, second = aggregate_table(spec, log_root=logs, out_dir=tmp_path / "b")
    _, again = aggregate_table(spec, log_root=logs, out_dir=tmp_path / "a")
    for ext in ("md", "csv", "png"):
        assert first[ext].read_bytes() == second[ext].read_bytes() == again[ext].read_bytes(), ext
    assert first["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first["csv"] == tmp_path / "a" / "fixpaper" / "tab2.csv"


# -- cost columns (table.extra_columns): per cell, the mean over its counted finished seeds --------

EXTRA_KEYS = ["params/trainable", "throughput/train_samples_per_s"]
#: Cost keys added to copies of fixture records, by (run dir, seed). ours.dsa s3 lacks throughput;
#: bar.dsc s2 has no test/acc (a failed run: its cost never counts); zeroshot.dsa s4 is outside
#: table.seeds; bar.dsa has no throughput at all.
EXTRA_VALUES = {
    ("fixpaper.tab1.ours.dsa", 1): {"params/trainable": 1000.0, "throughput/train_samples_per_s": 10.0},
    ("fixpaper.tab1.ours.dsa", 2): {"params/trainable": 1000.0, "throughput/train_samples_per_s": 20.0},
    ("fixpaper.tab1.ours.dsa", 3): {"params/trainable": 1000.0},
    ("fixpaper.tab1.bar.dsa", 1): {"params/trainable": 500.0},
    ("fixpaper.tab1.bar.dsa", 2): {"params/trainable": 501.0},
    ("fixpaper.tab1.bar.dsc", 2): {"params/trainable": 7.0, "throughput/train_samples_per_s": 1.0},
    ("fixpaper.tab1.zeroshot.dsa", 1): {"params/trainable": 0.0, "throughput/train_samples_per_s": 0.25},
    ("fixpaper.tab1.zeroshot.dsa", 2): {"params/trainable": 0.0, "throughput/train_samples_per_s": 0.5},
    ("fixpaper.tab1.zeroshot.dsa", 3): {"params/trainable": 0.0, "throughput/train_samples_per_s": 0.75},
    ("fixpaper.tab1.zeroshot.dsa", 4): {"params/trainable": 999.0, "throughput/train_samples_per_s": 9.0},
}  # fmt: skip


def _extra_runs(root: Path) -> Path:
    """A copy of the fixture runs whose records carry the cost keys of EXTRA_VALUES."""
    shutil.copytree(RUNS, root)
    for (cell, seed), extra in EXTRA_VALUES.items():
        path = root / cell / f"seed{seed}" / "metrics.json"
        record = json.loads(path.read_text())
        record["metrics"] = {**record["metrics"], **extra}
        path.write_text(json.dumps(record))
    return root


@pytest.fixture
def extra_spec(tmp_path: Path):
    from test_table_schema import edited

    def extra(d: dict) -> None:
        d["table"]["extra_columns"] = list(EXTRA_KEYS)

    return validate_table("fixpaper_tab1", edited(tmp_path, extra))


def test_extra_columns_mean_per_cell(extra_spec, tmp_path: Path) -> None:
    result = aggregate(extra_spec, collect_files(_extra_runs(tmp_path / "runs")))
    assert result.extra_columns == EXTRA_KEYS
    cells = {(c.row, c.col): c for c in result.cells}
    ours = cells[("ours", "dsa")]
    assert ours.extras == {
        "params/trainable": {1: 1000.0, 2: 1000.0, 3: 1000.0},
        "throughput/train_samples_per_s": {1: 10.0, 2: 20.0},
    }
    assert ours.n == 3 and ours.extra_mean("throughput/train_samples_per_s") == 15.0
    assert cells[("bar", "dsa")].extra_mean("params/trainable") == 500.5
    assert cells[("bar", "dsa")].extra_mean("throughput/train_samples_per_s") is None
    assert cells[("bar", "dsc")].extras == {}  # its only finished record lacks test/acc: failed
    zs = cells[("zeroshot", "dsa")]
    assert zs.extra_mean("params/trainable") == 0.0  # seed 4 (not in table.seeds) left out
    assert zs.extra_mean("throughput/train_samples_per_s") == 0.5

    lines = to_csv(result).splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS) + ",params/trainable,throughput/train_samples_per_s"
    # The existing columns are what they are without extra_columns; the costs come after them.
    expected = EXPECTED.read_text().splitlines()
    assert [ln.rsplit(",", 2)[0] for ln in lines[1:]] == expected[1:]
    costs = {tuple(ln.split(",")[2:4]): ln.split(",")[-2:] for ln in lines[1:]}
    assert costs[("ours", "dsa")] == ["1000", "15"]  # whole: printed as an integer
    assert costs[("bar", "dsa")] == ["500.5", ""]  # no record has the key: blank
    assert costs[("zeroshot", "dsa")] == ["0", "0.500"]
    assert costs[("bar", "dsc")] == costs[("ours", "dsb")] == costs[("ours", "dsc")] == ["", ""]

    from reprolab.tables.aggregate import to_markdown

    md = to_markdown(result)
    cost = md.split("## Cost\n", 1)[1].split("\n## Status", 1)[0]
    assert "Trainable parameters (`params/trainable`):" in cost
    assert "| Ours | 1000 | — | · |" in cost  # ours.dsb: no finished seed; ours.dsc: no experiment
    assert "| bar | 500.5 | — | — |" in cost
    assert "Train samples/s (`throughput/train_samples_per_s`):" in cost
    assert "| Ours | 15 (2/3) | — | · |" in cost  # only 2 of 3 counted seeds have the key
    assert "| zeroshot | 0.500 | — | · |" in cost
    # A record without the key still counts for the metric.
    assert "| Ours | 92.0 ± 2.6 (3) [93.7] | missing (0) [88.0] | · [50.0] |" in md
    assert "12 finished, 3 failed, 6 missing" in md


def test_extra_columns_outputs_are_byte_identical_across_runs(extra_spec, tmp_path: Path) -> None:
    logs = _extra_runs(tmp_path / "runs")
    _, first = aggregate_table(extra_spec, log_root=logs, out_dir=tmp_path / "a", plot=False)
    _, second = aggregate_table(extra_spec, log_root=logs, out_dir=tmp_path / "b", plot=False)
    _, again = aggregate_table(extra_spec, log_root=logs, out_dir=tmp_path / "a", plot=False)
    for ext in ("md", "csv"):
        assert first[ext].read_bytes() == second[ext].read_bytes() == again[ext].read_bytes(), ext
    assert "## Cost" in first["md"].read_text()


def test_without_extra_columns_records_costs_are_not_shown(spec, tmp_path: Path) -> None:
    from reprolab.tables.aggregate import to_markdown

    result = aggregate(spec, collect_files(_extra_runs(tmp_path / "runs")))
    assert result.extra_columns == []
    assert to_csv(result) == EXPECTED.read_text()
    assert "## Cost" not in to_markdown(result)


def test_fmt_extra() -> None:
    from reprolab.tables.aggregate import fmt_extra

    assert fmt_extra(None) == "" and fmt_extra(0.0) == "0"
    assert fmt_extra(2457600.0) == "2457600" and fmt_extra(1234.56) == "1234.6"
    assert fmt_extra(0.0345) == "0.0345" and fmt_extra(0.5) == "0.500"


def test_metric_columns_extra_columns_one_value_per_row(tmp_path: Path) -> None:
    """In a metric-column table the costs are the row's run's: every cell of the row holds them."""
    from test_table_schema import METRIC_TABLE, metric_table_configs

    from reprolab.tables.aggregate import to_markdown

    def extra(d: dict) -> None:
        d["table"]["extra_columns"] = list(EXTRA_KEYS)

    spec = validate_table(METRIC_TABLE, metric_table_configs(tmp_path, extra))
    logs = _metric_runs(tmp_path / "logs")
    costs = {
        ("ours", 1): {"params/trainable": 2000.0, "throughput/train_samples_per_s": 100.0},
        ("ours", 2): {"params/trainable": 2000.0, "throughput/train_samples_per_s": 110.0},
        ("ours", 3): {"params/trainable": 2000.0, "throughput/train_samples_per_s": 121.5},
        ("bar", 1): {"params/trainable": 10.0},
        ("bar", 2): {"params/trainable": 20.0},  # lacks test/avg_shift/ece: still the row's run
    }
    for (row, seed), extra_metrics in costs.items():
        path = logs / f"fixpaper.tab2.{row}.dsa" / f"seed{seed}" / "metrics.json"
        record = json.loads(path.read_text())
        record["metrics"] = {**record["metrics"], **extra_metrics}
        path.write_text(json.dumps(record))
    result = aggregate(spec, collect_files(logs))
    for c in result.cells:
        want = {"ours": [2000.0, 110.5], "bar": [15.0, None], "zeroshot": [None, None]}[c.row]
        assert [c.extra_mean(k) for k in EXTRA_KEYS] == want, (c.row, c.col)

    lines = to_csv(result).splitlines()
    assert lines[0].endswith(",commits,params/trainable,throughput/train_samples_per_s")
    assert (
        "fixpaper,tab2,bar,avg_ece,bar_sets,test/avg_shift/ece,partial,1,0.300,,,,1,,2;3,,aaaaaaa,"
        "15," in lines
    )
    assert sum(ln.endswith(",2000,110.5") for ln in lines) == len(spec.cols)
    md = to_markdown(result)
    cost = md.split("## Cost\n", 1)[1].split("\n## Status", 1)[0]
    assert (
        "|  | Trainable parameters (`params/trainable`) | Train samples/s "
        "(`throughput/train_samples_per_s`) |" in cost
    )
    assert "| Ours | 2000 | 110.5 |" in cost
    assert "| bar | 15 | — |" in cost
    assert "| zeroshot | — | — |" in cost
    _, first = aggregate_table(spec, log_root=logs, out_dir=tmp_path / "a", plot=False)
    _, second = aggregate_table(spec, log_root=logs, out_dir=tmp_path / "b", plot=False)
    for ext in ("md", "csv"):
        assert first[ext].read_bytes() == second[ext].read_bytes(), ext
