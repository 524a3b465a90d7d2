"""End to end: `python train.py` composes, fits, tests, records, resumes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from reprolab.train import run
from reprolab.utils.config import PROJECT_ROOT, compose_train


class CrashAfterFirstEpoch(L.Callback):
    """Simulates a job killed after epoch 1 (its checkpoint already written)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated preemption")


def test_zeroshot_run_writes_metrics_json(tiny_overrides: list[str]) -> None:
    cfg = compose_train([*tiny_overrides, "method=zeroshot"])
    record = run(cfg)
    path = Path(cfg.paths.run_dir) / "metrics.json"
    assert path.is_file()
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(record, default=str))
    assert saved["status"] == "finished" and saved["seed"] == 1
    assert saved["cell"] == "dev.none.zeroshot.shapes"
    for key in ("test/acc", "test/ece"):
        assert key in saved["metrics"]
    assert 0.0 <= saved["metrics"]["test/acc"] <= 100.0
    assert set(saved["git"]) == {"sha", "dirty"}
    assert saved["wall_time_s"] > 0 and saved["peak_memory_mb"] > 0
    # Relaunching a finished cell skips it and returns the stored record.
    t = time.time()
    assert run(cfg)["finished_at"] == saved["finished_at"]
    assert time.time() - t < 2.0


def test_resume_after_kill_continues_in_same_run_dir(tiny_overrides: list[str]) -> None:
    overrides = [*tiny_overrides, "method=linear_probe", "trainer.max_epochs=2", "data.num_shots=8"]
    cfg = compose_train(overrides)
    cfg.callbacks.crash = {"_target_": "test_train.CrashAfterFirstEpoch"}
    run_dir = Path(cfg.paths.run_dir)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        run(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    failed = json.loads((run_dir / "failed.json").read_text())
    assert "simulated preemption" in failed["error"]
    assert not (run_dir / "metrics.json").exists()

    import torch

    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["epoch"] == 0
    steps_per_epoch = first["global_step"]
    record = run(compose_train(overrides))  # the relaunched job: same command, same run dir
    assert record["global_step"] == 2 * steps_per_epoch  # continued, did not restart
    assert not (run_dir / "failed.json").exists()
    assert (run_dir / "metrics.json").is_file()


def test_cli_entry_point_runs_the_demo_cell(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "model=tiny_clip_random",
            "data=shapes",
            "method=zeroshot",
            "logger=csv",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/acc" in out.stdout
    assert list(tmp_path.glob("*/seed1/metrics.json"))


def test_missing_dataset_fails_fast_naming_the_command(tmp_path: Path) -> None:
    from reprolab.data.spec import DataNotFoundError

    cfg = compose_train(
        [
            "experiment=zeroshot_caltech",
            "model=tiny_clip_random",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"paths.data_dir={tmp_path}",
        ]
    )
    t = time.time()
    with pytest.raises(DataNotFoundError, match=r"scripts/prepare_data\.py caltech101"):
        run(cfg)
    assert time.time() - t < 10.0


def test_zeroshot_caltech_runs_on_a_fixture_tree(tmp_path: Path) -> None:
    """The real CoOp layout (images + split_zhou json), miniature: the cell runs end to end."""
    subprocess.run(
        [sys.executable, "tests/fixtures/make_data_tree.py", str(tmp_path / "data"), "caltech101"],
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
    )
    cfg = compose_train(
        [
            "experiment=zeroshot_caltech",
            "model=tiny_clip_random",
            "trainer=cpu",
            "logger=csv",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"paths.data_dir={tmp_path / 'data'}",
            "data.num_workers=0",
        ]
    )
    record = run(cfg)
    assert record["cell"] == "blackvip_cvpr23.tab2.zeroshot.caltech"
    assert record["paper"]["reported"] is None or isinstance(record["paper"]["reported"], float)
    assert 0.0 <= record["metrics"]["test/acc"] <= 100.0
