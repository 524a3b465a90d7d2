"""Table configs: the fixture table validates; typos and inconsistencies fail with useful messages."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from _slow import PAPER_SCALE_TABLES
from omegaconf import OmegaConf

from reprolab.tables.hydra_callbacks import ValidateTable
from reprolab.tables.schema import (
    TableConfigError,
    find_table,
    list_tables,
    table_errors,
    validate_table,
)

FIXTURE_CONFIGS = Path(__file__).parent / "fixtures" / "configs"
REAL_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REAL_TABLES = sorted(p.stem for p in (REAL_CONFIGS / "table").glob("*.yaml"))
NAME = "fixpaper_tab1"


def edited(tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the fixture config dir with the fixture table edited by `edit(table_dict)`."""
    config_dir = tmp_path / "configs"
    shutil.copytree(FIXTURE_CONFIGS, config_dir)
    path = config_dir / "table" / f"{NAME}.yaml"
    data = OmegaConf.to_container(OmegaConf.load(path))
    edit(data)
    save(data, path)
    return config_dir


def save(data: dict, path: Path) -> None:
    path.write_text("# @package _global_\n" + OmegaConf.to_yaml(OmegaConf.create(data)))


def errors_of(config_dir: Path) -> str:
    with pytest.raises(TableConfigError) as info:
        validate_table(NAME, config_dir)
    return str(info.value)


def test_fixture_table_validates() -> None:
    assert table_errors(NAME, FIXTURE_CONFIGS) == []
    spec = validate_table(NAME, FIXTURE_CONFIGS)
    assert (spec.paper, spec.id, spec.metric, spec.decimals) == ("fixpaper", "tab1", "test/acc", 1)
    assert spec.rows == ["zeroshot", "bar", "ours"] and spec.cols == ["dsa", "dsb", "dsc"]
    assert spec.seeds == [1, 2, 3] and spec.n_cells == 7 and spec.n_jobs == 21
    # ours_dsb inherits its paper block from ours_base through `defaults` and sets only the col.
    assert spec.cells[("ours", "dsb")] == "ours_dsb"
    assert ("zeroshot", "dsc") not in spec.cells
    # null / absent reported numbers are unknown, not zero.
    assert spec.reported == {
        ("zeroshot", "dsb"): 71.5,
        ("bar", "dsa"): 59.0,
        ("ours", "dsa"): 93.7,
        ("ours", "dsb"): 88.0,
        ("ours", "dsc"): 50.0,
    }
    assert spec.cell_id("ours", "dsa") == "fixpaper.tab1.ours.dsa"


def test_reported_disagreement_is_a_warning_and_the_table_wins() -> None:
    spec = validate_table(NAME, FIXTURE_CONFIGS)
    assert any("ours_dsa" in w and "93.5" in w and "93.7" in w for w in spec.warnings)
    assert spec.reported[("ours", "dsa")] == 93.7


def test_list_tables() -> None:
    assert list_tables(FIXTURE_CONFIGS) == [(NAME, 7, 3)]
    assert find_table("fixpaper", "tab1", FIXTURE_CONFIGS) == NAME


def test_unknown_table_suggests_a_close_match() -> None:
    with pytest.raises(TableConfigError, match="did you mean 'fixpaper_tab1'"):
        validate_table("fixpaper_tab", FIXTURE_CONFIGS)


def test_experiment_typo_lists_valid_names(tmp_path: Path) -> None:
    def typo(d: dict) -> None:
        d["table"]["experiments"][0] = "zeroshot_dza"
        d["hydra"]["sweeper"]["params"]["experiment"] = ",".join(d["table"]["experiments"])

    msg = errors_of(edited(tmp_path, typo))
    assert "Unknown experiment 'zeroshot_dza'" in msg
    assert "available: bar_dsa, bar_dsb, bar_dsc, ours_base, ours_dsa" in msg
    assert "did you mean 'zeroshot_dsa'?" in msg


def test_sweeper_must_equal_table_experiments(tmp_path: Path) -> None:
    def drop(d: dict) -> None:
        d["hydra"]["sweeper"]["params"]["experiment"] = "zeroshot_dsa,bar_dsa,ours_base"

    msg = errors_of(edited(tmp_path, drop))
    assert "hydra.sweeper.params.experiment must equal table.experiments" in msg
    assert "not swept: bar_dsb, bar_dsc, ours_dsa, ours_dsb, zeroshot_dsb" in msg
    assert "swept but not in table.experiments: ours_base" in msg


def test_sweeper_glob_and_range_are_expanded(tmp_path: Path) -> None:
    def glob(d: dict) -> None:
        d["hydra"]["sweeper"]["params"] = {
            "experiment": "glob(*,exclude=ours_base)",
            "seed": "range(1,4)",
        }

    assert table_errors(NAME, edited(tmp_path, glob)) == []


def test_seeds_must_match(tmp_path: Path) -> None:
    def seeds(d: dict) -> None:
        d["hydra"]["sweeper"]["params"]["seed"] = "1,2"

    assert "sweeps [1, 2] but table.seeds is [1, 2, 3]" in errors_of(edited(tmp_path, seeds))


def test_extra_swept_key_would_collide_run_dirs(tmp_path: Path) -> None:
    def extra(d: dict) -> None:
        d["hydra"]["sweeper"]["params"]["method.lr"] = "0.1,0.01"

    assert "jobs would overwrite each other" in errors_of(edited(tmp_path, extra))


def test_bad_metric_key_lists_valid_ones(tmp_path: Path) -> None:
    def metric(d: dict) -> None:
        d["table"]["metric"] = "test/accuracy"

    msg = errors_of(edited(tmp_path, metric))
    assert "metric 'test/accuracy' is not a key every method of the table logs" in msg
    # what each method does log, from its class: BAR's query counts, zero-shot's without them
    assert "method=zeroshot (zeroshot_dsa, zeroshot_dsb) logs train/loss" in msg
    assert "test/*/acc, test/*/ece" in msg and "train/queries" in msg


def test_metric_one_method_does_not_log_names_it(tmp_path: Path) -> None:
    def set_metric(d: dict) -> None:
        d["table"]["metric"] = "train/queries"  # black-box rows log it, zero-shot does not

    (error,) = table_errors(NAME, edited(tmp_path, set_metric))
    assert "method=zeroshot (zeroshot_dsa, zeroshot_dsb)" in error
    assert "method=bar" not in error and "method=ours" not in error


@pytest.mark.parametrize(
    "metric",
    ["test/ece", "test/imagenet_r/acc", "test/test/ece", "test/worst_group_acc", "test/nll"],
)
def test_valid_metric_keys(tmp_path: Path, metric: str) -> None:
    def set_metric(d: dict) -> None:
        d["table"]["metric"] = metric

    errors = table_errors(NAME, edited(tmp_path, set_metric))
    assert errors == []


def test_cell_outside_rows_and_duplicate_cells(tmp_path: Path) -> None:
    def bad(d: dict) -> None:
        d["table"]["rows"] = ["zeroshot", "ours"]  # bar_* now point at an unknown row

    msg = errors_of(edited(tmp_path, bad))
    assert "experiment bar_dsa: paper.row — Unknown row 'bar'; available: zeroshot, ours" in msg

    config_dir = tmp_path / "dup"
    shutil.copytree(FIXTURE_CONFIGS, config_dir)
    dup = config_dir / "experiment" / "bar_dsa_v2.yaml"
    dup.write_text((config_dir / "experiment" / "bar_dsa.yaml").read_text())
    path = config_dir / "table" / f"{NAME}.yaml"
    d = OmegaConf.to_container(OmegaConf.load(path))
    d["table"]["experiments"].append("bar_dsa_v2")
    d["hydra"]["sweeper"]["params"]["experiment"] += ",bar_dsa_v2"
    save(d, path)
    assert "produced by both bar_dsa and bar_dsa_v2" in errors_of(config_dir)


def test_reported_typos_and_unknown_keys_fail(tmp_path: Path) -> None:
    def bad(d: dict) -> None:
        d["table"]["reported"]["ours"]["dsd"] = 1.0
        d["table"]["seed"] = [1]

    msg = errors_of(edited(tmp_path, bad))
    assert "table.reported.ours: Unknown col 'dsd'" in msg
    assert "Unknown key table.seed" in msg and "did you mean 'seeds'?" in msg


def test_experiment_of_another_table_fails(tmp_path: Path) -> None:
    config_dir = edited(tmp_path, lambda d: None)
    exp = config_dir / "experiment" / "bar_dsa.yaml"
    exp.write_text(exp.read_text().replace("table: tab1", "table: tab2"))
    assert "paper.table is 'tab2' but table.id is 'tab1'" in errors_of(config_dir)


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    def many(d: dict) -> None:
        d["table"]["metric"] = "acc"
        d["table"]["name"] = "other"
        d["hydra"]["sweeper"]["params"]["seed"] = "1"

    with pytest.raises(TableConfigError) as info:
        validate_table(NAME, edited(tmp_path, many))
    assert len(info.value.errors) == 3


def test_hydra_callback_validates_before_launch(tmp_path: Path) -> None:
    def config(config_dir: Path) -> OmegaConf:
        return OmegaConf.create(
            {
                "table": {"name": NAME},
                "hydra": {
                    "runtime": {
                        "choices": {"table": NAME},
                        "config_sources": [
                            {"path": str(config_dir), "schema": "file", "provider": "main"}
                        ],
                    }
                },
            }
        )

    ValidateTable().on_multirun_start(config(FIXTURE_CONFIGS))

    def metric(d: dict) -> None:
        d["table"]["metric"] = "test/accuracy"

    # SystemExit, not an Exception: Hydra downgrades exceptions raised in callbacks to warnings.
    with pytest.raises(SystemExit, match="not a key every method of the table logs"):
        ValidateTable().on_multirun_start(config(edited(tmp_path, metric)))
    ValidateTable().on_multirun_start(OmegaConf.create({"hydra": {"runtime": {"choices": {}}}}))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in PAPER_SCALE_TABLES else n
        for n in REAL_TABLES
    ],
)
def test_real_table_is_valid(name: str) -> None:
    assert table_errors(name, REAL_CONFIGS) == []


def test_package_header_must_come_first(tmp_path: Path) -> None:
    config_dir = edited(tmp_path, lambda d: None)
    path = config_dir / "table" / f"{NAME}.yaml"
    path.write_text(f"# configs/table/{NAME}.yaml\n# @package _global_\n" + path.read_text())
    assert "must be `# @package _global_`" in errors_of(config_dir)


# -- metric-column tables (table.col_metrics): the columns are metrics of one run per row --------

METRIC_TABLE = "fixpaper_tab2"
#: One run per row reads every column: test sets, an average over the shift sets, ECE beside acc.
COL_METRICS = {
    "a_acc": "test/test/acc",
    "b_acc": "test/dsb/acc",
    "avg_acc": "test/avg_shift/acc",
    "a_ece": "test/test/ece",
    "avg_ece": "test/avg_shift/ece",
    "a_ece_pct": "test/test/ece",  # the same key again, scaled to percent
}
METRIC_ROWS = {"zeroshot": "zs_sets", "bar": "bar_sets", "ours": "ours_sets"}


def metric_table_configs(tmp_path: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """The fixture config dir plus a metric-column table `fixpaper_tab2` over three experiments
    (`zs_sets`, `bar_sets`, `ours_sets`), each one run on dataset `dsa` with its shift sets;
    `edit(table_dict)` changes the table file before it is written."""
    config_dir = tmp_path / "configs"
    shutil.copytree(FIXTURE_CONFIGS, config_dir)
    for row, exp in METRIC_ROWS.items():
        paper = {"id": "fixpaper", "table": "tab2", "row": row, "col": "dsa", "reported": None}
        data = {
            "defaults": [{"override /method": row}, {"override /data": "dsa"}],
            "paper": {**paper, "metric": "test/acc"},
            "tags": ["fixpaper", "tab2"],
        }
        save(data, config_dir / "experiment" / f"{exp}.yaml")
    table = {
        "table": {
            "name": METRIC_TABLE,
            "paper": "fixpaper",
            "id": "tab2",
            "title": "Fixture metric-column table (3 methods, one run each)",
            "source": "Fixture et al. 2026, Table 2",
            "col_metrics": dict(COL_METRICS),
            "decimals": 1,
            "col_decimals": {"a_ece": 3, "avg_ece": 3},
            "col_scale": {"a_ece_pct": 100},
            "rows": list(METRIC_ROWS),
            "cols": list(COL_METRICS),
            "experiments": list(METRIC_ROWS.values()),
            "seeds": [1, 2, 3],
            "labels": {"ours": "Ours", "a_acc": "A", "a_ece": "ECE A", "a_ece_pct": "ECE A (%)"},
            "reported": {
                "zeroshot": {"a_acc": 70.0},
                "bar": None,  # a row without the paper's numbers
                "ours": {"a_acc": 83.0, "a_ece": 0.047, "a_ece_pct": 4.7, "b_acc": None},
            },
        },
        "hydra": {
            "mode": "MULTIRUN",
            "sweeper": {"params": {"experiment": ",".join(METRIC_ROWS.values()), "seed": "1,2,3"}},
        },
    }
    if edit is not None:
        edit(table)
    save(table, config_dir / "table" / f"{METRIC_TABLE}.yaml")
    return config_dir


def metric_errors(config_dir: Path) -> list[str]:
    return table_errors(METRIC_TABLE, config_dir)


def test_metric_column_table_validates(tmp_path: Path) -> None:
    spec = validate_table(METRIC_TABLE, metric_table_configs(tmp_path))
    assert spec.metric_columns and spec.metric is None and spec.col_metrics == COL_METRICS
    assert spec.metric_of("avg_ece") == "test/avg_shift/ece"
    # One experiment per row fills the whole row; its runs keep their own paper.col (dsa).
    assert {spec.cells[("bar", c)] for c in spec.cols} == {"bar_sets"}
    assert spec.row_cols == {"zeroshot": "dsa", "bar": "dsa", "ours": "dsa"}
    assert spec.cell_id("ours") == spec.cell_id("ours", "b_acc") == "fixpaper.tab2.ours.dsa"
    assert (spec.n_cells, spec.n_jobs) == (3, 9)
    assert (spec.decimals_of("a_ece"), spec.decimals_of("a_acc")) == (3, 1)
    assert (spec.scale_of("a_ece_pct"), spec.scale_of("a_ece")) == (100.0, 1.0)
    assert spec.reported == {
        ("zeroshot", "a_acc"): 70.0,
        ("ours", "a_acc"): 83.0,
        ("ours", "a_ece"): 0.047,
        ("ours", "a_ece_pct"): 4.7,
    }
    assert spec.warnings == []


def test_metric_column_key_no_method_logs_fails_in_one_line(tmp_path: Path) -> None:
    def add_queries(d: dict) -> None:
        d["table"]["cols"].append("queries")
        d["table"]["col_metrics"]["queries"] = "train/queries"  # black-box rows only

    (error,) = metric_errors(metric_table_configs(tmp_path, add_queries))
    assert "\n" not in error
    assert "a col_metrics key is not logged by every method of the table" in error
    assert "method=zeroshot (zs_sets) does not log col queries (train/queries)" in error
    assert "method=bar" not in error and "method=ours" not in error


def test_metric_column_keys_of_several_columns_and_methods_in_one_line(tmp_path: Path) -> None:
    def typos(d: dict) -> None:
        d["table"]["col_metrics"]["b_acc"] = "test/dsb/accuracy"
        d["table"]["col_metrics"]["avg_ece"] = "test/avg_shift/calibration"

    (error,) = metric_errors(metric_table_configs(tmp_path, typos))
    assert "\n" not in error
    for method, exps in (("zeroshot", "zs_sets"), ("bar", "bar_sets"), ("ours", "ours_sets")):
        assert (
            f"method={method} ({exps}) does not log col b_acc (test/dsb/accuracy), "
            "avg_ece (test/avg_shift/calibration); it logs" in error
        )


def test_metric_column_layout_errors(tmp_path: Path) -> None:
    def bad(d: dict) -> None:
        t = d["table"]
        t["col_metrics"]["a_acx"] = t["col_metrics"].pop("a_acc")  # typo: unknown col
        t["col_metrics"]["avg_acc"] = "test/*/acc"  # a pattern, not a key
        t["col_decimals"]["a_ece"] = 3.5
        t["col_scale"]["a_ece_pct"] = 0
        t["metric"] = "test/acc"  # exclusive with col_metrics

    errors = metric_errors(metric_table_configs(tmp_path, bad))
    assert any("table.col_metrics: Unknown col 'a_acx'" in e and "'a_acc'?" in e for e in errors)
    assert any("table.metric and table.col_metrics exclude each other" in e for e in errors)
    assert any("table.col_metrics.avg_acc must be one metric key" in e for e in errors)
    assert any("has no metric key for col a_acc, avg_acc" in e for e in errors)
    assert any("table.col_decimals.a_ece must be an integer in 0..10" in e for e in errors)
    assert any("table.col_scale.a_ece_pct must be a non-zero number" in e for e in errors)


def test_metric_column_table_takes_one_experiment_per_row(tmp_path: Path) -> None:
    def second_ours(d: dict) -> None:
        d["table"]["experiments"].append("ours_dsb")  # row ours again (another paper.table too)
        d["hydra"]["sweeper"]["params"]["experiment"] += ",ours_dsb"

    errors = metric_errors(metric_table_configs(tmp_path, second_ours))
    assert any(
        "row ours is produced by both ours_sets and ours_dsb; a metric-column table takes one "
        "experiment per row" in e
        for e in errors
    )


def test_metric_column_reported_mapping_and_unknown_cols(tmp_path: Path) -> None:
    config_dir = metric_table_configs(tmp_path)
    exp = config_dir / "experiment" / "ours_sets.yaml"
    data = OmegaConf.to_container(OmegaConf.load(exp))
    data["paper"]["reported"] = {"a_acc": 82.5, "a_ece": 0.047}
    save(data, exp)
    spec = validate_table(METRIC_TABLE, config_dir)
    (warning,) = spec.warnings
    assert "paper.reported.a_acc=82.5 but table.reported.ours.a_acc=83.0" in warning
    assert spec.reported[("ours", "a_acc")] == 83.0  # the table's number wins

    data["paper"]["reported"] = {"in_acc": 82.5}
    save(data, exp)
    (error,) = metric_errors(config_dir)
    assert "experiment ours_sets: paper.reported — Unknown col 'in_acc'" in error

    def reported_typo(d: dict) -> None:
        d["table"]["reported"]["ours"]["a_accc"] = 1.0

    errors = metric_errors(metric_table_configs(tmp_path / "b", reported_typo))
    assert any("table.reported.ours: Unknown col 'a_accc'" in e for e in errors)


def test_reported_mapping_in_a_single_metric_table_fails(tmp_path: Path) -> None:
    config_dir = edited(tmp_path, lambda d: None)
    exp = config_dir / "experiment" / "bar_dsa.yaml"
    exp.write_text(exp.read_text().replace("reported: null", "reported: {dsa: 59.0}"))
    assert "paper.reported is a mapping {col: number}, which only a metric-column table" in (
        errors_of(config_dir)
    )


# -- cost columns (table.extra_columns) ---------------------------------------------------------


def test_extra_columns_are_validated_keys_in_order(tmp_path: Path) -> None:
    assert validate_table(NAME, FIXTURE_CONFIGS).extra_columns == []  # absent: none

    def extra(d: dict) -> None:
        # train/queries: logged by the black-box rows only; the others' records show "—"
        d["table"]["extra_columns"] = ["throughput/train_samples_per_s", "params/trainable",
                                       "train/queries"]  # fmt: skip

    spec = validate_table(NAME, edited(tmp_path, extra))
    assert spec.extra_columns == [
        "throughput/train_samples_per_s",
        "params/trainable",
        "train/queries",
    ]
    assert not any("extra_columns" in w for w in spec.warnings)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("params/trainable", "table.extra_columns must be a list of metric keys"),
        (["params/trainable", 3], "table.extra_columns[1] must be a metric key"),
        (["throughput/*"], "table.extra_columns[0] must be one metric key of the run record, not"),
        (["params/trainable", "params/total", "params/trainable"],
         "table.extra_columns lists params/trainable more than once"),
        (["params/trainable", "test/accuracy"],
         "table.extra_columns 'test/accuracy' is not a key any method of the table logs; "
         "method=zeroshot logs train/loss"),
    ],
)  # fmt: skip
def test_bad_extra_columns_fail_in_one_line(tmp_path: Path, value, message: str) -> None:
    def extra(d: dict) -> None:
        d["table"]["extra_columns"] = value

    (error,) = table_errors(NAME, edited(tmp_path, extra))
    assert message in error and "\n" not in error


def test_extra_columns_of_a_metric_column_table(tmp_path: Path) -> None:
    def extra(d: dict) -> None:
        d["table"]["extra_columns"] = ["params/trainable"]

    spec = validate_table(METRIC_TABLE, metric_table_configs(tmp_path, extra))
    assert spec.extra_columns == ["params/trainable"] and spec.metric_columns
