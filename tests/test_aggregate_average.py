"""The average column of dataset-column tables (`table.average`), against hand-computed numbers.

A bare config tree (the fixture methods, four rows x two datasets) holds three tables over the SAME
runs, as CoCoOp's Table 1 prints Base, New and HM of one set of runs: `fixb2n_hm` (metric test/hm,
rule base_new_hm), `fixb2n_base` and `fixb2n_new` (rule mean); `table.output` keeps their results
apart. The runs (RUNS below, metrics.json files written under tmp) were chosen so that the HM of the
averages and the mean of the per-dataset HMs differ: row coop has B = 82 / 90 and N = 60 / 30 on
dsa / dsb (seed means), so B̄ = 86, N̄ = 45 and the average is 2·86·45/131 = 7740/131 = 59.08,
while the per-dataset HM cells (means of per-run HMs) are 69.29 and 44.99, whose mean is 57.14.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_table_schema import FIXTURE_CONFIGS, save

from reprolab.tables.aggregate import (
    CSV_COLUMNS,
    aggregate,
    aggregate_table,
    collect_files,
    output_paths,
    to_csv,
    to_markdown,
)
from reprolab.tables.schema import TableConfigError, table_errors, validate_table

ROWS = {"zs": "zeroshot", "coop": "ours", "kg": "bar", "nokey": "ours"}  # row -> fixture method
COLS = ["dsa", "dsb"]
#: (row, col) -> per seed (base acc, new acc); test/hm = 2BN/(B+N) is written beside them.
RUNS = {
    ("zs", "dsa"): {1: (70, 74), 2: (70, 74), 3: (70, 74)},
    ("zs", "dsb"): {1: (60, 80), 2: (60, 80), 3: (60, 80)},
    ("coop", "dsa"): {1: (80, 60), 2: (82, 58), 3: (84, 62)},
    ("coop", "dsb"): {1: (90, 30), 2: (92, 32), 3: (88, 28)},
    ("kg", "dsa"): {1: (75, 70), 2: (75, 70), 3: (75, 70)},
    ("kg", "dsb"): {1: (75, 70)},  # seed 2: failed.json below; seed 3: no record
    ("nokey", "dsa"): {1: (50, 50), 2: (50, 50), 3: (50, 50)},
    ("nokey", "dsb"): {1: (70, 70), 2: (70, 70), 3: (70, 70)},  # seed 1 lacks test/new_acc
}
#: The paper's averages (CoCoOp Table 1 as quoted in spec A4: zero-shot, CoOp HM).
REPORTED_HM = {"zs": {"average": 71.70}, "coop": {"average": 71.66, "dsa": None}}
HM_OF_MEANS = 7740 / 131  # row coop: 2 * 86 * 45 / (86 + 45)
MEAN_OF_HMS = 57.137230176023664  # row coop: the mean of its two HM cells (what must NOT be used)


def _hm(b: float, n: float) -> float:
    return 2 * b * n / (b + n)


def b2n_configs(tmp_path: Path, edit: Callable[[str, dict], None] | None = None) -> Path:
    """The fixture config dir plus experiments `<row>_<col>` (paper fixb2n, table tab1) and the
    three tables; `edit(table_name, table_dict)` changes a table before it is written."""
    config_dir = tmp_path / "configs"
    shutil.copytree(FIXTURE_CONFIGS, config_dir)
    exps = []
    for row, method in ROWS.items():
        for col in COLS:
            paper = {"id": "fixb2n", "table": "tab1", "row": row, "col": col, "reported": None}
            data = {
                "defaults": [{"override /method": method}, {"override /data": col}],
                "paper": {**paper, "metric": "test/hm"},
                "tags": ["fixb2n"],
            }
            save(data, config_dir / "experiment" / f"{row}_{col}.yaml")
            exps.append(f"{row}_{col}")
    for which, metric, rule in (
        ("hm", "test/hm", "base_new_hm"),
        ("base", "test/base_acc", "mean"),
        ("new", "test/new_acc", "mean"),
    ):
        name = f"fixb2n_{which}"
        table = {
            "table": {
                "name": name,
                "paper": "fixb2n",
                "id": "tab1",
                "output": f"tab1_{which}",
                "title": f"Fixture base-to-new table ({which})",
                "metric": metric,
                "decimals": 1,
                "rows": list(ROWS),
                "cols": list(COLS),
                "experiments": list(exps),
                "seeds": [1, 2, 3],
                "labels": {"coop": "CoOp", "dsb": "Data B"},
                "average": {"col": "average", "label": "Average", "rule": rule},
                "reported": copy.deepcopy(REPORTED_HM) if which == "hm" else {},
            },
            "hydra": {
                "mode": "MULTIRUN",
                "sweeper": {"params": {"experiment": ",".join(exps), "seed": "1,2,3"}},
            },
        }
        if edit is not None:
            edit(name, table)
        save(table, config_dir / "table" / f"{name}.yaml")
    return config_dir


def b2n_runs(root: Path, scale: float = 1.0) -> Path:
    """metrics.json files of RUNS (values times `scale`), one failed.json, one record lacking a key."""
    for (row, col), seeds in RUNS.items():
        for seed, (b, n) in seeds.items():
            run_dir = root / f"fixb2n.tab1.{row}.{col}" / f"seed{seed}"
            run_dir.mkdir(parents=True)
            metrics = {
                "test/base_acc": b * scale,
                "test/new_acc": n * scale,
                "test/hm": _hm(b, n) * scale,
            }
            if (row, col, seed) == ("nokey", "dsb", 1):
                del metrics["test/new_acc"]
            record = {
                "cell": f"fixb2n.tab1.{row}.{col}", "seed": seed, "metrics": metrics,
                "paper": {"id": "fixb2n", "table": "tab1", "row": row, "col": col},
                "status": "finished", "git": {"sha": "a" * 40, "dirty": False},
                "finished_at": f"2026-12-01T00:00:0{seed}+00:00", "fingerprint": f"fp{row}{col}",
            }  # fmt: skip
            (run_dir / "metrics.json").write_text(json.dumps(record))
    failed = root / "fixb2n.tab1.kg.dsb" / "seed2"
    failed.mkdir(parents=True)
    (failed / "failed.json").write_text(
        json.dumps({"cell": "fixb2n.tab1.kg.dsb", "seed": 2, "status": "failed",
                    "error": "RuntimeError: boom", "git": {"sha": "a" * 40}})
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("b2n")
    return b2n_configs(tmp), b2n_runs(tmp / "logs")


def _result(tree: tuple[Path, Path], which: str):
    configs, logs = tree
    return aggregate(validate_table(f"fixb2n_{which}", configs), collect_files(logs))


def _averages(result) -> dict:
    return {a.row: a for a in result.averages}


def test_base_new_hm_is_the_hm_of_the_mean_base_and_mean_new(tree) -> None:
    result = _result(tree, "hm")
    avg = _averages(result)
    coop = avg["coop"]
    assert (coop.base, coop.new) == (86.0, 45.0)
    assert coop.mean == pytest.approx(HM_OF_MEANS) and coop.status == "ok"
    # the per-dataset HM cells are means of per-run HMs; their mean is a different number
    cells = {(c.row, c.col): c for c in result.cells}
    hm_cells = [cells[("coop", c)].mean for c in COLS]
    assert hm_cells == pytest.approx([69.28558382257012, 44.9888765294772])
    assert sum(hm_cells) / 2 == pytest.approx(MEAN_OF_HMS)
    assert abs(coop.mean - MEAN_OF_HMS) > 1.9
    # zero-shot: B̄ = (70 + 60) / 2, N̄ = (74 + 80) / 2, HM = 2 * 65 * 77 / 142
    zs = avg["zs"]
    assert (zs.base, zs.new) == (65.0, 77.0) and zs.mean == pytest.approx(10010 / 142)
    assert zs.reported == 71.70 and zs.delta == pytest.approx(10010 / 142 - 71.70)
    assert coop.reported == 71.66 and avg["kg"].reported is None
    assert zs.seeds == coop.seeds == [1, 2, 3] and zs.n == 3 and zs.commits == ["aaaaaaa"]


def test_average_is_blank_unless_every_column_is_complete(tree) -> None:
    avg = _averages(_result(tree, "hm"))
    kg = avg["kg"]  # dsb: seed 2 failed, seed 3 missing
    assert kg.mean is None and kg.status == "incomplete" and kg.n == 1
    assert kg.why == ["Data B: missing seed 3; failed seed 2"]
    nokey = avg["nokey"]  # every HM cell complete, but one record lacks N
    assert nokey.mean is None
    assert nokey.why == ["Data B seed 1: metric 'test/new_acc' not in the record"]


def test_mean_rule_averages_the_cells_seed_means(tree) -> None:
    base = _averages(_result(tree, "base"))
    assert base["coop"].mean == 86.0 and base["zs"].mean == 65.0 and base["nokey"].mean == 60.0
    assert base["coop"].base is None and base["kg"].mean is None
    new = _averages(_result(tree, "new"))
    assert new["coop"].mean == 45.0 and new["zs"].mean == 77.0
    # the record without test/new_acc is a failed seed of that cell: the row's average is blank
    assert new["nokey"].mean is None and new["nokey"].why == ["Data B: failed seed 1"]


def test_markdown_shows_the_average_column_and_why_cells_are_blank(tree) -> None:
    md = to_markdown(_result(tree, "hm"))
    assert "|  | dsa | Data B | Average |" in md
    assert "| CoOp | 69.3 ± 1.8 (3) | 45.0 ± 2.5 (3) | 59.1 [71.7] |" in md
    assert "| zs | 71.9 ± 0.0 (3) | 68.6 ± 0.0 (3) | 70.5 [71.7] |" in md
    assert "57.1" not in md  # never the mean of the per-dataset HMs
    section = md.split("## Average\n", 1)[1].split("\n## ", 1)[0]
    assert "rule `base_new_hm`" in section and "not the mean of the per-column HMs" in section
    assert "- CoOp: 59.1 (B̄ 86.0, N̄ 45.0)" in section
    assert "- zs: 70.5 (B̄ 65.0, N̄ 77.0)" in section
    assert "- kg: blank: Data B: missing seed 3; failed seed 2" in section
    assert "- nokey: blank: Data B seed 1: metric 'test/new_acc' not in the record" in section
    delta = md.split("Δ = ours − paper:\n", 1)[1].split("\n## ", 1)[0]
    assert "| CoOp |  |  | -12.6 |" in delta and "| zs |  |  | -1.2 |" in delta


def test_markdown_row_with_blank_average(tree) -> None:
    md = to_markdown(_result(tree, "hm"))
    line = next(ln for ln in md.splitlines() if ln.startswith("| kg |"))
    assert line.endswith("|  |")  # blank: no value and no paper number
    assert line.split(" | ")[2].startswith("72.4 (1)")


def test_csv_adds_one_average_line_per_row(tree) -> None:
    lines = to_csv(_result(tree, "hm")).splitlines()
    assert tuple(lines[0].split(",")) == CSV_COLUMNS
    assert len(lines) == 1 + len(ROWS) * (len(COLS) + 1)
    assert lines[3] == (
        "fixb2n,tab1,zs,average,,base_new_hm:test/base_acc;test/new_acc,ok,3,70.5,,71.7,-1.2,"
        "1;2;3,,,,aaaaaaa"
    )
    assert lines[6] == (
        "fixb2n,tab1,coop,average,,base_new_hm:test/base_acc;test/new_acc,ok,3,59.1,,71.7,-12.6,"
        "1;2;3,,,,aaaaaaa"
    )
    assert (
        lines[9].startswith("fixb2n,tab1,kg,average,,base_new_hm:")
        and ",incomplete,1,,," in lines[9]
    )
    base = to_csv(_result(tree, "base")).splitlines()
    assert base[6] == "fixb2n,tab1,coop,average,,mean:test/base_acc,ok,3,86.0,,,,1;2;3,,,,aaaaaaa"


def test_outputs_are_byte_identical_and_tables_of_the_same_runs_do_not_collide(
    tree, tmp_path: Path
) -> None:
    configs, logs = tree
    written = {}
    for which in ("hm", "base", "new"):
        spec = validate_table(f"fixb2n_{which}", configs)
        assert output_paths(spec, tmp_path)["md"] == tmp_path / "fixb2n" / f"tab1_{which}.md"
        _, first = aggregate_table(spec, log_root=logs, out_dir=tmp_path / "a")
        _, second = aggregate_table(spec, log_root=logs, out_dir=tmp_path / "b")
        for ext in ("md", "csv", "png"):
            assert first[ext].read_bytes() == second[ext].read_bytes(), (which, ext)
        written[which] = first["csv"].read_text()
    assert len(set(written.values())) == 3
    assert sorted(p.name for p in (tmp_path / "a" / "fixb2n").iterdir()) == [
        f"tab1_{w}.{e}" for w in ("base", "hm", "new") for e in ("csv", "md", "png")
    ]


def test_col_scale_applies_to_base_and_new(tmp_path: Path) -> None:
    def percent(name: str, d: dict) -> None:
        d["table"]["col_scale"] = {"dsa": 100, "dsb": 100}

    spec = validate_table("fixb2n_hm", b2n_configs(tmp_path, percent))
    result = aggregate(spec, collect_files(b2n_runs(tmp_path / "logs", scale=0.01)))
    coop = _averages(result)["coop"]
    assert coop.base == pytest.approx(86.0) and coop.new == pytest.approx(45.0)
    assert coop.mean == pytest.approx(HM_OF_MEANS)


def test_average_over_a_subset_of_columns(tmp_path: Path) -> None:
    """`average.cols`: a transfer table averages its target columns, not its source."""

    def only_dsa(name: str, d: dict) -> None:
        d["table"]["average"]["cols"] = ["dsa"]

    spec = validate_table("fixb2n_hm", b2n_configs(tmp_path, only_dsa))
    assert spec.average.cols == ("dsa",)
    result = aggregate(spec, collect_files(b2n_runs(tmp_path / "logs")))
    avg = _averages(result)
    assert (avg["coop"].base, avg["coop"].new) == (82.0, 60.0)
    assert avg["coop"].mean == pytest.approx(2 * 82 * 60 / 142)
    assert avg["kg"].mean == pytest.approx(2 * 75 * 70 / 145)  # its incomplete dsb is not averaged
    assert avg["nokey"].mean == 50.0
    md = to_markdown(result)
    assert "the mean over the 1 column dsa of each cell's seed-mean `test/base_acc`" in md


def test_records_of_other_tables_sharing_the_runs_are_counted_not_listed(tmp_path: Path) -> None:
    """A table with `output` shares its paper.table: the other tables' cells are summarised."""

    def drop_nokey(name: str, d: dict) -> None:
        t = d["table"]
        t["rows"] = [r for r in t["rows"] if r != "nokey"]
        t["experiments"] = [e for e in t["experiments"] if not e.startswith("nokey_")]
        d["hydra"]["sweeper"]["params"]["experiment"] = ",".join(t["experiments"])
        if name == "fixb2n_new":
            del t["output"]  # without `output`: listed one by one, as before

    configs = b2n_configs(tmp_path, drop_nokey)
    logs = b2n_runs(tmp_path / "logs")
    md = to_markdown(aggregate(validate_table("fixb2n_hm", configs), collect_files(logs)))
    ignored = md.split("## Ignored records\n", 1)[1]
    assert "None." in ignored and "nokey" not in ignored
    assert (
        "Not listed: 6 records of 2 cells of paper.table `tab1` that this table does not show"
        in ignored
    )
    md = to_markdown(aggregate(validate_table("fixb2n_new", configs), collect_files(logs)))
    ignored = md.split("## Ignored records\n", 1)[1]
    assert ignored.count("fixb2n.tab1.nokey.") == 6 and "Not listed" not in ignored


def test_the_fixture_tables_validate(tree) -> None:
    configs, _ = tree
    for which in ("hm", "base", "new"):
        assert table_errors(f"fixb2n_{which}", configs) == []
    spec = validate_table("fixb2n_hm", configs)
    assert (spec.average.col, spec.average.label, spec.average.rule) == (
        "average", "Average", "base_new_hm")  # fmt: skip
    assert spec.average.cols == ("dsa", "dsb")  # default: every column
    assert spec.reported == {("zs", "average"): 71.70, ("coop", "average"): 71.66}
    assert spec.label("average") == "Average" and spec.output == "tab1_hm"


def _errors(tmp_path: Path, table: str, edit: Callable[[dict], None]) -> str:
    def only(name: str, d: dict) -> None:
        if name == table:
            edit(d["table"])

    with pytest.raises(TableConfigError) as info:
        validate_table(table, b2n_configs(tmp_path, only))
    return str(info.value)


@pytest.mark.parametrize(
    ("table", "edit", "message"),
    [
        (
            "fixb2n_base",
            lambda t: t["average"].update(rule="base_new_hm"),
            "table.metric must be test/hm (got test/base_acc); use rule mean",
        ),
        (
            "fixb2n_hm",
            lambda t: t["average"].update(rule="means"),
            "table.average.rule must be one of mean, base_new_hm, got 'means' (did you mean 'mean'?)",
        ),
        (
            "fixb2n_hm",
            lambda t: t["average"].update(col="dsb"),
            "table.average.col 'dsb' is also in table.cols",
        ),
        (
            "fixb2n_hm",
            lambda t: t["average"].update(lable="Avg"),
            "Unknown key table.average.lable; allowed: col, label, rule, cols (did you mean 'label'?)",
        ),
        ("fixb2n_hm", lambda t: t.update(average="mean"), "table.average must be a mapping"),
        (
            "fixb2n_hm",
            lambda t: t.update(average=None),  # then `average` is an unknown column of reported
            "table.reported.zs: Unknown col 'average'",
        ),
        (
            "fixb2n_hm",
            lambda t: t["reported"].update(coop={"avg": 1.0}),
            "table.reported.coop: Unknown col 'avg'",
        ),
        ("fixb2n_hm", lambda t: t.update(output="a/b"), "table.output must be a file stem"),
        (
            "fixb2n_hm",
            lambda t: t["average"].update(cols=["dsa", "dsc"]),
            "table.average.cols: Unknown col 'dsc'",
        ),
        ("fixb2n_hm", lambda t: t["average"].update(cols=[]), "table.average.cols must be a"),
    ],
)
def test_bad_average_configs_name_the_fix(
    tmp_path: Path, table: str, edit: Callable[[dict], None], message: str
) -> None:
    msg = _errors(tmp_path, table, edit)
    assert message in msg, msg


def test_an_invalid_average_block_still_owns_its_reported_numbers(tmp_path: Path) -> None:
    """A typo inside `average` is one error, not also one per row's reported average."""
    msg = _errors(tmp_path, "fixb2n_hm", lambda t: t["average"].update(rule="HM"))
    assert "\n" not in msg and "table.average.rule must be one of mean, base_new_hm" in msg


def test_average_on_a_metric_column_table_fails(tmp_path: Path) -> None:
    from test_table_schema import METRIC_TABLE, metric_table_configs

    def average(d: dict) -> None:
        d["table"]["average"] = {"col": "average", "rule": "mean"}

    msg = str(table_errors(METRIC_TABLE, metric_table_configs(tmp_path, average)))
    assert "a metric-column table (table.col_metrics) are different metrics" in msg
