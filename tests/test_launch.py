"""A table launched as a local multirun: every cell and seed runs; a relaunch runs only what is
missing; aggregation of the result is readable."""

import json
import os
import subprocess
import sys
from pathlib import Path

from reprolab.utils.config import PROJECT_ROOT


def _launch(log_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LOG_ROOT=str(log_dir))
    return subprocess.run(
        [sys.executable, "train.py", "-m", "table=reprolab_smoke", "logger=csv", *extra],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_relaunched_table_runs_only_unfinished_cells(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    out = _launch(logs)
    assert out.returncode == 0, out.stderr[-3000:]
    records = sorted(logs.glob("*/seed*/metrics.json"))
    assert len(records) == 4  # 2 cells x 2 seeds
    stamps = {p: json.loads(p.read_text())["finished_at"] for p in records}

    killed = logs / "reprolab.smoke.linear_probe.shapes" / "seed2" / "metrics.json"
    killed.unlink()  # as if the job had died before writing its record
    out = _launch(logs)
    assert out.returncode == 0, out.stderr[-3000:]
    assert killed.is_file()
    for p, stamp in stamps.items():
        if p != killed:
            assert json.loads(p.read_text())["finished_at"] == stamp, f"{p} was rerun"
    assert "already finished" in out.stderr + out.stdout

    res = subprocess.run(
        [
            sys.executable,
            "scripts/aggregate.py",
            "reprolab_smoke",
            "--from",
            str(logs),
            "--out",
            str(tmp_path / "results"),
            "--no-plot",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "results" / "reprolab" / "smoke.md").read_text()
    _a_cell_that_cannot_start_does_not_stop_the_others(logs)
    assert "(2)" in md and "linear_probe" in md


def test_table_with_unknown_experiment_fails_before_launch(tmp_path: Path) -> None:
    out = _launch(tmp_path / "logs", "hydra.sweeper.params.experiment=zeroshot_shapez")
    assert out.returncode != 0
    assert "zeroshot_shapes" in out.stderr + out.stdout  # the valid names are listed
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").rglob("metrics.json"))


def _a_cell_that_cannot_start_does_not_stop_the_others(logs: Path) -> None:
    """A cell whose run dir cannot be created (a file in its place) fails alone; the multirun
    goes on and ends listing every failed cell, with exit status 1."""
    import shutil

    broken = logs / "reprolab.smoke.zeroshot.shapes" / "seed1"
    shutil.rmtree(broken)
    broken.write_text("not a directory\n")
    redo = logs / "reprolab.smoke.linear_probe.shapes" / "seed2"
    shutil.rmtree(redo)  # a cell after the broken one in the sweep order must still run
    out = _launch(logs)
    assert out.returncode == 1, out.stderr[-3000:]
    assert (redo / "metrics.json").is_file()
    tail = out.stderr[out.stderr.index("1 of 4 cells failed") :]
    assert "reprolab.smoke.zeroshot.shapes seed 1:" in tail and "seed1" in tail
