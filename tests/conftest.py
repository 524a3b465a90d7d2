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
