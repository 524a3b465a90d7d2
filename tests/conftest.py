"""Tests run offline on the CPU: no hub lookups, no W&B network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

# Subprocesses and the other core stay free: no oversubscription on 2 cores.
torch.set_num_threads(1)


@pytest.fixture
def run_experiment(tmp_path):
    """`run_experiment(name, *overrides, seed=1)`: a table cell's metrics, run in-process (CSV
    logger, one thread, records under the test's tmp dir)."""
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    def _run(experiment: str, *extra: str, seed: int = 1) -> dict:
        overrides = [f"experiment={experiment}", f"seed={seed}", f"paths.log_dir={tmp_path}"]
        overrides += ["logger=csv", "progress_bar=false", "threads=1", *extra]
        return run(compose_train(overrides))["metrics"]

    return _run


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make any config run in seconds on the CPU."""
    return [
        "model=tiny_clip_random",
        "data=shapes",
        "trainer=cpu",
        "logger=csv",
        f"paths.log_dir={tmp_path}",
        "progress_bar=false",
    ]
