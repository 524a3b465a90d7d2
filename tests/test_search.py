"""Seeded hyperparameter search (`reprolab.search`), trial run dirs, and model selection by a
validation metric in the aggregator (`reprolab.tables.aggregate`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reprolab.errors import ConfigValueError
from reprolab.search import (
    apply_trial,
    check_search,
    num_trials,
    read_select,
    trial_overrides,
)
from reprolab.tables.aggregate import aggregate, collect_files, to_csv, to_markdown
from reprolab.tables.schema import SWEEP_KEYS, table_errors, validate_table
from reprolab.utils.config import PROJECT_ROOT, compose_train
from reprolab.utils.run_record import config_fingerprint

FIXTURE_CONFIGS = Path(__file__).parent / "fixtures" / "configs"

GRID = {
    "mode": "grid",
    "space": {
        "method.m2_weight": [0.05, 0.01, 0.005, 0.001],
        "method.optimizer.lr": [1.0e-5, 7.0e-6],
        "method.optimizer.weight_decay": [0.2, 0.01],
    },
}
RANDOM = {
    "mode": "random",
    "n": 16,
    "seed": 0,
    "space": {
        "method.optimizer.lr": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
        "method.optimizer.weight_decay": {"low": 0.0, "high": 0.1},
        "data.batch_size": {"low": 3, "high": 9, "log": False, "int": True},
        "method.name": ["a", "b", "c"],
    },
}


# -- the search: grid order, random draws ---------------------------------------------------------


def test_grid_counts_and_indexes_the_product_last_key_fastest() -> None:
    assert num_trials(GRID) == 16
    assert trial_overrides(GRID, 0) == {
        "method.m2_weight": 0.05,
        "method.optimizer.lr": 1.0e-5,
        "method.optimizer.weight_decay": 0.2,
    }
    assert trial_overrides(GRID, 1)["method.optimizer.weight_decay"] == 0.01
    assert trial_overrides(GRID, 2)["method.optimizer.lr"] == 7.0e-6
    assert trial_overrides(GRID, 4)["method.m2_weight"] == 0.01
    assert trial_overrides(GRID, 15) == {
        "method.m2_weight": 0.001,
        "method.optimizer.lr": 7.0e-6,
        "method.optimizer.weight_decay": 0.01,
    }
    points = {tuple(trial_overrides(GRID, t).values()) for t in range(16)}
    assert len(points) == 16  # every combination once
    # A nested space (what `search.space.method.m2_weight=[...]` on the command line makes) is the
    # same search; a grid's n may state its size.
    nested = {"mode": "grid", "n": 16, "space": {"method": {"m2_weight": GRID["space"]["method.m2_weight"],
              "optimizer": {"lr": [1.0e-5, 7.0e-6], "weight_decay": [0.2, 0.01]}}}}  # fmt: skip
    assert [trial_overrides(nested, t) for t in range(16)] == [
        trial_overrides(GRID, t) for t in range(16)
    ]


def test_random_draws_are_seeded_bounded_and_log_uniform() -> None:
    draws = [trial_overrides(RANDOM, t) for t in range(16)]
    assert draws == [trial_overrides(RANDOM, t) for t in range(16)]  # deterministic
    assert len({d["method.optimizer.lr"] for d in draws}) == 16  # trials differ
    for d in draws:
        assert 1.0e-5 <= d["method.optimizer.lr"] < 1.0e-3
        assert 0.0 <= d["method.optimizer.weight_decay"] < 0.1
        assert isinstance(d["data.batch_size"], int) and 3 <= d["data.batch_size"] <= 8
        assert d["method.name"] in ("a", "b", "c")
    # Another search seed gives other draws; the run seed plays no part (not an argument).
    assert trial_overrides({**RANDOM, "seed": 1}, 0) != draws[0]
    # A key's draws do not depend on the other keys of the space (nor on their order).
    lr_only = {**RANDOM, "space": {"method.optimizer.lr": RANDOM["space"]["method.optimizer.lr"]}}
    assert trial_overrides(lr_only, 5)["method.optimizer.lr"] == draws[5]["method.optimizer.lr"]
    # log: true is uniform in log space: over many draws each decade holds about half of them.
    wide = {"mode": "random", "n": 4000, "space": {"x": {"low": 1e-4, "high": 1.0, "log": True}}}
    logs = [math.log10(trial_overrides(wide, t)["x"]) for t in range(4000)]
    for lo in (-4, -3, -2, -1):
        frac = sum(lo <= v < lo + 1 for v in logs) / len(logs)
        assert 0.22 < frac < 0.28, (lo, frac)


def test_random_draws_are_identical_in_another_process() -> None:
    code = (
        "import json, sys; from reprolab.search import trial_overrides; "
        "s = json.loads(sys.argv[1]); "
        "print(json.dumps([trial_overrides(s, t) for t in range(16)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(RANDOM)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [trial_overrides(RANDOM, t) for t in range(16)]


# -- bad search configs fail in one line ----------------------------------------------------------


@pytest.fixture(scope="module")
def base_cfg():
    return compose_train(["method=zeroshot"])


def _with(base_cfg, **blocks):
    cfg = base_cfg.copy()
    for key, value in blocks.items():
        cfg[key] = value
    return cfg


@pytest.mark.parametrize(
    "search, trial, message",
    [
        ({"mode": "grid", "space": {"data.batch_size": [8, 16]}}, 2, "trial=2 is out of range"),
        ({"mode": "grid", "space": {"data.batch_size": [8, 16]}}, -1, "trial=-1 must be"),
        ({"mode": "bayes", "space": {"data.batch_size": [8]}}, 0, "search.mode='bayes' is not"),
        ({"mode": "grid", "space": {"data.batch_size": []}}, 0, "is an empty list"),
        ({"mode": "grid", "space": {}}, 0, "search.space={} must be a non-empty mapping"),
        ({"mode": "grid", "space": {"data.batch_sz": [8]}}, 0, "did you mean 'batch_size'"),
        ({"mode": "random", "space": {"data.batch_size": [8]}}, 0, "needs the number of draws"),
        ({"mode": "grid", "n": 3, "space": {"data.batch_size": [8]}}, 0, "the grid has 1 points"),
        ({"mode": "grid", "space": {"data.batch_size": {"low": 1, "high": 2}}}, 0, "needs a list"),
        (
            {"mode": "random", "n": 2, "space": {"x.y": {"low": 0, "high": 2, "log": True}}},
            0,
            "low > 0",
        ),
        ({"mode": "grid", "space": {"seed": [1, 2]}}, 0, "a search cannot set seed"),
        ({"mode": "grid", "spaces": {"seed": [1, 2]}}, 0, "Unknown key search.spaces"),
        (None, 0, "trial=0 but this config declares no search"),
    ],
)
def test_bad_search_fails_in_one_line(base_cfg, search, trial, message: str) -> None:
    from reprolab.utils.checks import check_values

    cfg = _with(base_cfg, search=search, trial=trial)
    with pytest.raises(ConfigValueError) as err:
        check_values(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "select, message",
    [
        ({"metric": "test/acc", "mode": "max"}, "is a test metric"),
        ({"metric": "val/acc", "mode": "best"}, "select.mode='best' is not one of max, min"),
        ({"metric": "val/*"}, "must be one metric key"),
        ({"metric": "val/acc", "higher": True}, "Unknown key select.higher"),
    ],
)
def test_bad_select_fails_in_one_line(base_cfg, select, message: str) -> None:
    with pytest.raises(ConfigValueError) as err:
        check_search(_with(base_cfg, select=select))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert read_select({"metric": "val/acc"}) == {"metric": "val/acc", "mode": "max"}


def test_entry_point_rejects_a_bad_trial_before_torch(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "train.py", "trial=5", "search={mode:grid,space:{data.batch_size:[8,16]}}"]
        + [f"paths.log_dir={tmp_path}"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: trial=5 is out of range: the search has 2 trials (trial=0..1)."
    )


# -- the runner: overrides applied before anything is built, one run dir per trial ---------------


def test_trial_overrides_are_applied_before_the_fingerprint(base_cfg) -> None:
    search = {"mode": "grid", "space": {"data.eval_batch_size": [64, 128], "data.batch_size": [8]}}
    plain = base_cfg.copy()
    assert "trial" not in Path(plain.paths.run_dir).as_posix().split("/")[-2]
    cfgs = []
    for trial in (0, 1):
        cfg = _with(base_cfg, search=search, trial=trial)
        assert apply_trial(cfg) == {"data.eval_batch_size": [64, 128][trial], "data.batch_size": 8}
        assert cfg.data.eval_batch_size == [64, 128][trial]
        assert Path(cfg.paths.run_dir).parts[-2:] == (f"trial{trial}", "seed1")
        assert Path(cfg.paths.run_dir).parent.parent == Path(plain.paths.run_dir).parent
        cfgs.append(cfg)
    assert len({config_fingerprint(c) for c in (plain, *cfgs)}) == 3  # each trial its own
    # search / select are not part of a run's identity; a null trial is as if absent.
    assert config_fingerprint(_with(base_cfg, search=search, select={"metric": "val/acc"})) == (
        config_fingerprint(plain)
    )
    assert apply_trial(plain) is None


def test_plain_and_trial_job_dirs() -> None:
    """Hydra's per-job dir follows the run dir: `.jobs/<cell>[/trial<k>]/seed<n>`."""
    from hydra import compose, initialize_config_dir

    from reprolab.utils.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        plain = compose("train", overrides=["seed=3"], return_hydra_config=True)
        trial = compose(
            "train",
            overrides=["seed=3", "trial=1", "search={mode:grid,space:{data.batch_size:[8,16]}}"],
            return_hydra_config=True,
        )
    assert plain.hydra.sweep.subdir == f".jobs/{plain.cell}/seed3"
    assert trial.hydra.sweep.subdir == f".jobs/{plain.cell}/trial1/seed3"
    assert plain.paths.run_dir.endswith(f"/{plain.cell}/seed3")


def test_a_trial_run_records_its_trial_and_values(tmp_path: Path) -> None:
    """`python train.py trial=1 search=...`: the real entry point, a post-hoc method (seconds)."""
    out = subprocess.run(
        [sys.executable, "train.py", "trial=1",
         "search={mode:grid,space:{data.eval_batch_size:[64,128]}}",
         "select={metric:val/acc,mode:max}", "model=tiny_clip_random", "logger=csv", "threads=1",
         "+trainer.limit_test_batches=1", "progress_bar=false", f"paths.log_dir={tmp_path}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (record_file,) = tmp_path.glob("*/*/*/metrics.json")
    run_dir = record_file.parent
    assert run_dir.relative_to(tmp_path).parts == ("dev.none.zeroshot.shapes", "trial1", "seed1")
    record = json.loads(record_file.read_text())
    assert record["trial"] == 1 and record["trial_overrides"] == {"data.eval_batch_size": 128}
    assert record["status"] == "finished"
    fingerprinted = json.loads((run_dir / "fingerprint.json").read_text())
    assert fingerprinted["fingerprint"] == record["fingerprint"]
    assert fingerprinted["config"]["data"]["eval_batch_size"] == 128
    assert fingerprinted["config"]["trial"] == 1 and "search" not in fingerprinted["config"]
    assert OmegaConf.load(run_dir / "config.yaml").data.eval_batch_size == 128
    assert "trial 1/2: data.eval_batch_size=128" in (run_dir / "train.log").read_text()


# -- tables: sweeping trial, and selecting by a validation metric ---------------------------------

SEARCH = {"mode": "grid", "space": {"method.lr": [0.1, 0.01, 0.001]}}
SELECT = {"metric": "val/acc", "mode": "max"}
TABLE = "fixpaper_sel"


def _save(data: dict, path: Path) -> None:
    path.write_text("# @package _global_\n" + OmegaConf.to_yaml(OmegaConf.create(data)))


def selection_configs(tmp_path: Path, exp_edit=None, sweep: str = "range(0,3)") -> Path:
    """The fixture config dir with bar_dsa and ours_dsa declaring a 3-point grid search selected
    by val/acc, and a table `fixpaper_sel` (rows bar, ours; col dsa; seeds 1, 2) sweeping trial."""
    config_dir = tmp_path / "configs"
    shutil.copytree(FIXTURE_CONFIGS, config_dir)
    for exp in ("bar_dsa", "ours_dsa"):
        path = config_dir / "experiment" / f"{exp}.yaml"
        data = OmegaConf.to_container(OmegaConf.load(path))
        data.update(search=SEARCH, select=SELECT)
        if exp_edit is not None:
            exp_edit(exp, data)
        _save(data, path)
    table = {
        "table": {
            "name": TABLE, "paper": "fixpaper", "id": "tab1", "metric": "test/acc",
            "rows": ["bar", "ours"], "cols": ["dsa"], "experiments": ["bar_dsa", "ours_dsa"],
            "seeds": [1, 2],
        },
        "hydra": {
            "mode": "MULTIRUN",
            "sweeper": {"params": {"experiment": "bar_dsa,ours_dsa", "seed": "1,2", "trial": sweep}},
        },
    }  # fmt: skip
    _save(table, config_dir / "table" / f"{TABLE}.yaml")
    return config_dir


def test_table_sweeping_trial_validates(tmp_path: Path) -> None:
    assert "trial" in SWEEP_KEYS
    spec = validate_table(TABLE, selection_configs(tmp_path))
    assert spec.trials == [0, 1, 2] and spec.n_jobs == 2 * 2 * 3
    assert spec.select == {"bar_dsa": SELECT, "ours_dsa": SELECT}
    # The fixture table fixpaper_tab1 does not sweep trial: plain runs of these cells, a warning.
    tab1 = validate_table("fixpaper_tab1", tmp_path / "configs")
    assert tab1.select == {} and any("does not sweep `trial`" in w for w in tab1.warnings)


@pytest.mark.parametrize(
    "exp_edit, sweep, message",
    [
        (None, "range(0,4)", "experiment bar_dsa: its search has 3 trials but the table sweeps 4"),
        (None, "1,2,3", "must be the trials 0..N-1"),
        (lambda e, d: d.pop("select"), "range(0,3)", "declares a search but no `select:`"),
        (lambda e, d: d.pop("search"), "range(0,3)", "declares no `search:` but the table sweeps"),
        (lambda e, d: d.update(select={"metric": "test/acc"}), "range(0,3)", "is a test metric"),
        (lambda e, d: d.update(select={"metric": "val/no"}), "range(0,3)", "'val/no' is not a key"),
    ],
)
def test_table_trial_sweep_errors(tmp_path: Path, exp_edit, sweep: str, message: str) -> None:
    errors = table_errors(TABLE, selection_configs(tmp_path, exp_edit, sweep))
    assert any(message in e for e in errors), errors


def _record(root: Path, row: str, seed: int, k: int | None, metrics: dict | None, **extra) -> Path:
    """Run dir `<cell>[/trial<k>]/seed<seed>` with metrics.json, or failed.json when `metrics` is
    None (`extra` goes into the record; a failed.json has no cell, and a trial key only from
    `extra`: the aggregator reads them from its dir)."""
    cell = f"fixpaper.tab1.{row}.dsa"
    run_dir = root / cell / ("" if k is None else f"trial{k}") / f"seed{seed}"
    run_dir.mkdir(parents=True)
    if metrics is None:
        (run_dir / "failed.json").write_text(
            json.dumps({"seed": seed, "status": "failed", "error": "boom", **extra})
        )
        return run_dir
    record = {
        "cell": cell, "seed": seed, "metrics": metrics, "status": "finished",
        "paper": {"id": "fixpaper", "table": "tab1", "row": row, "col": "dsa"},
        "git": {"sha": "a" * 40, "dirty": False}, "finished_at": "2026-12-01T00:00:00+00:00",
        "fingerprint": f"fp{row}{k}",
        **({} if k is None else {"trial": k, "trial_overrides": {"method.lr": [0.1, 0.01, 0.001][k]}}),
        **extra,
    }  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(record))
    return run_dir


@pytest.fixture
def selection(tmp_path: Path):
    spec = validate_table(TABLE, selection_configs(tmp_path))
    root = tmp_path / "logs"
    # ours seed 1: validation and test disagree. The best test (95) is trial 2, the best val is a
    # tie of trials 1 and 2 (80): the lowest, trial 1, is chosen and its test 70 reported.
    _record(root, "ours", 1, 0, {"val/acc": 50.0, "test/acc": 90.0})
    _record(root, "ours", 1, 1, {"val/acc": 80.0, "test/acc": 70.0})
    _record(root, "ours", 1, 2, {"val/acc": 80.0, "test/acc": 95.0})
    # ours seed 2: trial 2 never ran, trial 1 failed: chosen among trial 0 only, flagged.
    _record(root, "ours", 2, 0, {"val/acc": 60.0, "test/acc": 61.0})
    _record(root, "ours", 2, 1, None)  # failed.json without a trial key: read from its dir
    # bar seed 1: trial 0 has no val/acc (an error naming its run dir); trial 2 beats trial 1.
    _record(root, "bar", 1, 0, {"test/acc": 99.0})
    _record(root, "bar", 1, 1, {"val/acc": 40.0, "test/acc": 41.0})
    _record(root, "bar", 1, 2, {"val/acc": 45.0, "test/acc": 42.0})
    # bar seed 2: only a plain run (no trial), which is not a trial of this table's cell.
    _record(root, "bar", 2, None, {"val/acc": 99.0, "test/acc": 99.0})
    return spec, aggregate(spec, collect_files(root))


def test_selection_picks_the_best_validation_trial_not_the_best_test(selection) -> None:
    spec, result = selection
    ours = next(c for c in result.cells if c.row == "ours")
    bar = next(c for c in result.cells if c.row == "bar")
    assert ours.values == {1: 70.0, 2: 61.0}  # not 95.0 (best test) for seed 1
    assert ours.records[1].trial == 1 and ours.records[2].trial == 0
    assert ours.incomplete == [2] and ours.status == "partial"
    assert bar.values == {1: 42.0} and bar.missing == [2]
    sels = {(s.cell.split(".")[2], s.seed): s for s in result.selections}
    assert sels[("ours", 1)].chosen == 1 and sels[("ours", 1)].complete
    assert sels[("ours", 2)].chosen == 0 and sels[("ours", 2)].missing == [2]
    assert list(sels[("ours", 2)].failed) == [1]
    assert sels[("bar", 1)].chosen == 2 and list(sels[("bar", 1)].failed) == [0]
    error = sels[("bar", 1)].failed[0].error
    assert "selection metric 'val/acc' not in the record" in error
    assert "fixpaper.tab1.bar.dsa/trial0/seed1" in error  # names the run dir
    assert sels[("bar", 2)].chosen is None and sels[("bar", 2)].missing == [0, 1, 2]
    assert any("no trial; this cell selects over trials 0-2" in why for _, why in result.ignored)


def test_selection_markdown_and_csv_flag_unfinished_trials(selection) -> None:
    spec, result = selection
    md = to_markdown(result)
    assert "## Model selection" in md
    assert "| ours | 65.5 ± 6.4 (2)* |" in md  # (70 + 61) / 2; * = chosen among unfinished
    assert "`*` = some seed's trial was chosen among unfinished trials" in md
    assert (
        "| `fixpaper.tab1.ours.dsa` | 1 | `val/acc` (max) | 1 | 80 | method.lr=0.01 | 3/3 |  |"
        in md
    )
    assert (
        "| `fixpaper.tab1.ours.dsa` | 2 | `val/acc` (max) | 0 | 60 | method.lr=0.1 | 1/3 | "
        "**incomplete**: failed trials 1; missing trials 2 |" in md
    )
    assert (
        "| `fixpaper.tab1.bar.dsa` | 2 | `val/acc` (max) | — | — | — | 0/3 | no finished trial"
        in md
    )
    assert "**2 seeds chosen among incomplete trials**" in md
    assert (
        "- `fixpaper.tab1.ours.dsa` seed 2 trial 1: boom (`fixpaper.tab1.ours.dsa/trial1/seed2/failed.json`)"
        in md
    )
    # Different trials of a cell are different configs by design: not "Mixed configs".
    assert "**Mixed configs**" not in md
    lines = to_csv(result).splitlines()
    assert lines[0].endswith(",trials,chosen_trials,incomplete_seeds")
    ours_line = next(x for x in lines if ",ours," in x)
    assert ours_line.endswith(",3,1:1;2:0,2") and ",partial," in ours_line


def test_a_mode_min_rule_and_a_seed_whose_trials_all_failed(tmp_path: Path) -> None:
    def minimise(exp: str, data: dict) -> None:
        data["select"] = {"metric": "val/nll", "mode": "min"}

    spec = validate_table(TABLE, selection_configs(tmp_path, minimise))
    root = tmp_path / "logs"
    for trial, nll in enumerate((0.9, 0.3, 0.5)):
        _record(root, "ours", 1, trial, {"val/nll": nll, "test/acc": 10.0 * trial})
    for trial in range(3):
        _record(root, "ours", 2, trial, None, trial=trial)
    result = aggregate(spec, collect_files(root))
    ours = next(c for c in result.cells if c.row == "ours")
    assert ours.values == {1: 10.0}  # trial 1 (lowest val/nll)
    assert "no trial finished with val/nll (3 failed, 0 missing of 3" in ours.failed[2].error
