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
