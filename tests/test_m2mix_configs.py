"""m2-mix (Oh et al., NeurIPS 2023) paper-table configs: cells hold the spec's recipe and search.

The cells come from the paper grid configs/cells/m2mix_neurips23/ (rows zs, clip_ft, m2mix, m3mix on
ViT-B/32 and <row>_rn50 / <row>_vitb16; columns flickr30k and coco). The tables
table/m2mix_<col>_<group>.yaml are metric-column tables, one per row group and column because the
groups search different numbers of trials. Values checked: specs/robust_finetuning.md §2.9, §4.
Composition only (no model or data is built), except one `train.py` subprocess that must stop at the
missing data in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reprolab.search import apply_trial, num_trials, trial_overrides
from reprolab.tables.schema import experiment_names, table_errors, validate_table
from reprolab.utils.config import CONFIG_DIR, compose_train, validate_config

ROOT = Path(__file__).resolve().parents[1]
COLS = {"flickr30k": "flickr30k", "coco": "coco_captions"}
GROUPS = {"zs": None, "clip_ft": 4, "m2mix": 16, "m3mix": 12}  # trials of each row group's search
BACKBONES = {"": "ViT-B-32", "_rn50": "RN50", "_vitb16": "ViT-B-16"}
TABLES = [f"m2mix_{c}_{g}" for c in COLS for g in GROUPS]
LRS, WDS = [1e-5, 7e-6], [0.2, 0.01]


@cache
def _composed(name: str, trial: int | None = None):
    over = [f"experiment={name}", "seed=1", "paths.log_dir=/logs"]
    cfg = compose_train([*over, f"trial={trial}"] if trial is not None else over)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _cells() -> list[tuple[str, str, str, str]]:
    """(cell name, group, backbone suffix, column) of every cell of the grid."""
    return [(f"{g}{b}_{c}", g, b, c) for g in GROUPS for b in BACKBONES for c in COLS]


def test_the_tables_name_every_cell_of_the_grid() -> None:
    named = {e for t in TABLES for e in validate_table(t, CONFIG_DIR).experiments}
    assert named == {c[0] for c in _cells()} and len(named) == 24
    assert named <= set(experiment_names(CONFIG_DIR))


@pytest.mark.parametrize("table", TABLES)
def test_table_validates_with_its_groups_trial_count(table: str) -> None:
    assert table_errors(table, CONFIG_DIR) == []
    spec = validate_table(table, CONFIG_DIR)
    col, group = table.removeprefix("m2mix_").split("_", 1)
    n = GROUPS[group]
    assert (spec.paper, spec.id, spec.seeds) == ("m2mix_neurips23", f"{col}_{group}", [1, 2, 3])
    assert spec.warnings == [] and spec.metric_columns and spec.reported == {}
    assert spec.rows == [f"{group}{b}" for b in BACKBONES]
    assert spec.trials == (list(range(n)) if n else [])
    assert spec.n_jobs == 3 * 3 * (n or 1)
    if n:  # every experiment picks its trial by validation R@1 sum, never a test metric
        assert {r["metric"] for r in spec.select.values()} == {"val/r1_sum"}
        assert {r["mode"] for r in spec.select.values()} == {"max"}
    assert spec.metric_of("i2t_r1") == "test/test/i2t_r@1"
    assert spec.metric_of("gap") == "test/test/modality_gap"


@pytest.mark.parametrize(
    ("name", "group", "suffix", "col"),
    [  # every cell also composes in tests/test_configs.py: the coco half runs with `slow`
        pytest.param(*c, id=c[0], marks=() if c[3] == "flickr30k" else pytest.mark.slow)
        for c in _cells()
    ],
)
def test_cell_composes_with_its_backbone_data_and_search(
    name: str, group: str, suffix: str, col: str, tmp_path: Path
) -> None:
    n = GROUPS[group]
    over = [f"experiment={name}", f"paths.log_dir={tmp_path}"]
    cfg = compose_train([*over, "trial=0"] if n else over)
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    assert cfg.paper.id == "m2mix_neurips23" and cfg.paper.table == f"{col}_{group}"
    assert cfg.cell == f"m2mix_neurips23.{col}_{group}.{group}{suffix}.{col}"
    assert cfg.paths.run_dir == f"{tmp_path}/{cfg.cell}{'/trial0' if n else ''}/seed1"
    assert cfg.model.arch == BACKBONES[suffix] and cfg.model.pretrained == "openai"
    assert cfg.model.precision == "fp32" and cfg.model.train_logit_scale is False
    assert cfg.model.trainable == ("none" if group == "zs" else "both")
    assert cfg.method.name == ("zeroshot_retrieval" if group == "zs" else group)
    assert cfg.train is (group != "zs")
    assert cfg.data.name == COLS[col] and cfg.data.train_captions == "first"
    assert (cfg.data.batch_size, cfg.data.drop_last, cfg.data.val) == (128, True, True)
    assert cfg.data.eval_captions == 5  # the release's caption-0 protocol is logged as cap1/*
    assert cfg.trainer.max_epochs == 9 and cfg.trainer.precision == "bf16-mixed"
    if n:
        assert num_trials(cfg.search) == n
        assert OmegaConf.to_container(cfg.select) == {"metric": "val/r1_sum", "mode": "max"}
    else:
        assert cfg.search is None and cfg.select is None


# (experiment, {dotted key: expected}); spec §2.9 (main.py, scripts/m2mix.sh, scripts/m3mix.sh).
# fmt: off
CASES = [
    ("clip_ft_flickr30k", {
        "method._target_": "reprolab.methods.finetuning.retrieval.CLIPFineTune",
        "method.temperature": 0.01, "method.backbone_eval": True, "method.ece_bins": 10,
        "method.optimizer._target_": "torch.optim.AdamW",
        "method.scheduler._target_": "reprolab.optim.schedules.cosine_lr",
        "method.scheduler.warmup_frac": 0.1, "method.scheduler.min_lr": 0.0,
    }),
    ("m2mix_flickr30k", {
        "method._target_": "reprolab.methods.finetuning.m2mix.M2Mix", "method.temperature": 0.01,
        "method.m2_beta": 0.5, "method.m2_temperature": 0.07, "method.epoch_decay": True,
        "method.scheduler.warmup_frac": 0.1,
    }),
    ("m3mix_coco", {
        "method._target_": "reprolab.methods.finetuning.m2mix.M3Mix", "method.temperature": 0.01,
        "method.m2_weight": 0.01, "method.m2_beta": 0.2, "method.m2_temperature": 0.07,
        "method.uni_beta": 0.5, "method.image_weight": 0.05, "method.text_weight": 0.05,
        "method.joint_beta": 0.5, "method.epoch_decay": True,
    }),
    ("zs_coco", {
        "method._target_": "reprolab.methods.finetuning.retrieval.ZeroShotRetrieval",
        "method.temperature": None,
    }),
]
# fmt: on


@pytest.mark.parametrize(("name", "expected"), CASES, ids=[c[0] for c in CASES])
def test_cell_holds_the_spec_hyperparameters(name: str, expected: dict) -> None:
    cfg = _composed(name)
    assert {k: OmegaConf.select(cfg, k, throw_on_missing=True) for k in expected} == expected


# The scripts' sweeps (spec §2.9) in the order the space lists them, the last key fastest.
SWEEPS = {
    "clip_ft_flickr30k": [(lr, wd) for lr in LRS for wd in WDS],
    "m2mix_flickr30k": [
        (mu, lr, wd) for mu in [0.05, 0.01, 0.005, 0.001] for lr in LRS for wd in WDS
    ],
    "m3mix_coco": [(mu, lr, wd) for mu in [0.05, 0.1, 0.2] for lr in LRS for wd in WDS],
}


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_the_search_is_the_scripts_grid(name: str) -> None:
    cfg = _composed(name)
    points = [tuple(trial_overrides(cfg.search, k).values()) for k in range(num_trials(cfg.search))]
    assert points == SWEEPS[name]


def test_a_trial_runs_its_grid_point() -> None:
    """Trial 13 of m2-mix = (mu 0.001, lr 1e-5, wd 0.01), written into the config as the runner
    does before anything is built, and its own run dir."""
    cfg = compose_train(
        ["experiment=m2mix_vitb16_coco", "seed=1", "trial=13", "paths.log_dir=/logs"]
    )
    assert apply_trial(cfg) == {
        "method.m2_weight": 0.001,
        "method.optimizer.lr": 1e-5,
        "method.optimizer.weight_decay": 0.01,
    }
    assert cfg.trial == 13 and cfg.model.arch == "ViT-B-16"
    assert (cfg.method.m2_weight, cfg.method.optimizer.lr) == (0.001, 1e-5)
    assert cfg.method.optimizer.weight_decay == 0.01
    assert cfg.paths.run_dir == "/logs/m2mix_neurips23.coco_m2mix.m2mix_vitb16.coco/trial13/seed1"


def test_m2mix_flickr30k_stops_at_the_missing_data_in_one_line(tmp_path: Path) -> None:
    """`python train.py experiment=m2mix_flickr30k trial=0` without Flickr30k: exit 2 before any
    model is built, one line naming the command that prepares it."""
    env = {**os.environ, "DATA_ROOT": str(tmp_path / "data"), "LOG_ROOT": str(tmp_path / "logs")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    env.pop("REPROLAB_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=m2mix_flickr30k", "trial=0", "logger=csv"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "flickr30k" in lines[0] and "python scripts/prepare_data.py flickr30k" in lines[0]
