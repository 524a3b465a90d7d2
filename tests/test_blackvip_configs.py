"""BlackVIP (Oh et al., CVPR 2023) paper-table configs: cells hold the spec's numbers, tables validate.

Numbers checked here come from specs/blackvip.md §5.2 (per-dataset, Table 2) and §5.3 (synthetic,
Table 3); reported values from §12.2. Composition only: no model or data is built.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reprolab.tables.schema import table_errors, validate_table
from reprolab.utils.config import CONFIG_DIR, compose_train, validate_config

TABLES = {"blackvip_fewshot": ("tab2", 70), "blackvip_synthetic": ("tab3", 40)}
METHODS = ("zeroshot", "vp", "bar", "vp_spsa", "blackvip")
BLACK_BOX = ("blackvip", "bar", "vp_spsa")
TL_COLS = ["caltech", "pets", "cars", "flowers", "food", "aircraft", "sun", "dtd", "svhn",
           "eurosat", "resisc", "clevr", "ucf", "imagenet"]  # fmt: skip
SYN_SETS = ["biasedmnist_0p8", "biasedmnist_0p9", "locmnist_1to1", "locmnist_1to4"]
DATA = {
    "caltech": "caltech101", "pets": "oxford_pets", "cars": "stanford_cars",
    "flowers": "oxford_flowers", "food": "food101", "aircraft": "fgvc_aircraft", "sun": "sun397",
    "dtd": "dtd", "svhn": "svhn", "eurosat": "eurosat", "resisc": "resisc45", "clevr": "clevr_count",
    "ucf": "ucf101", "imagenet": "imagenet", "locmnist_1to1": "loc_mnist",
    "locmnist_1to4": "loc_mnist_f4", "biasedmnist_0p8": "colour_biased_mnist",
    "biasedmnist_0p9": "colour_biased_mnist_hard",
}  # fmt: skip


def _experiments(table: str) -> list[str]:
    return list(OmegaConf.load(CONFIG_DIR / "table" / f"{table}.yaml").table.experiments)


ALL_EXPERIMENTS = sorted({e for t in TABLES for e in _experiments(t)})


@cache
def _composed(name: str):
    """`experiment=<name>` composed once per session (read-only use)."""
    cfg = compose_train([f"experiment={name}"])
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _get(cfg, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=True)


# (experiment, {dotted key: expected value}); every value is a spec §5.2 / §5.3 number.
# fmt: off
CASES = [
    ("blackvip_caltech", {
        "method.eps": 0.2, "method.spsa.c": 0.005, "method.spsa.gamma": 0.2,
        "method.spsa.momentum": 0.9, "method.spsa.a": 0.01, "method.spsa.alpha": 0.4,
        "method.spsa.o": 1.0, "method.spsa.n_perturb": 5, "trainer.max_epochs": 5000,
        "data.batch_size": 128, "data.num_shots": 16, "paper.reported": 93.7,
    }),
    ("blackvip_imagenet", {
        "method.eps": 0.3, "method.spsa.c": 0.005, "method.spsa.gamma": 0.2,
        "trainer.max_epochs": 500, "paper.reported": 67.1,
    }),
    ("blackvip_resisc", {"method.spsa.momentum": 0.95, "paper.reported": None}),
    ("vp_spsa_eurosat", {
        "method.spsa.a": 10.0, "method.spsa.c": 0.005, "method.spsa.momentum": 0.3,
        "method.spsa.alpha": 0.4, "method.spsa.gamma": 0.1, "method.spsa.o": 1.0,
        "trainer.max_epochs": 5000, "data.batch_size": 128, "paper.reported": 70.9,
    }),
    ("vp_spsa_caltech", {"method.spsa.a": 20.0, "method.spsa.c": 0.01}),
    ("bar_sun", {
        "method.rgf.lr0": 5.0, "method.rgf.lr_min": 0.01, "method.rgf.n_dirs": 5,
        "trainer.max_epochs": 1000, "data.batch_size": 128,
    }),
    ("vp_cars", {"method.lr": 5.0, "trainer.max_epochs": 1000, "data.batch_size": 64}),
    ("vp_imagenet", {"method.lr": 1.0, "trainer.max_epochs": 400}),
    ("vp_sun", {"method.lr": 40.0, "trainer.max_epochs": 500}),
    ("blackvip_locmnist_1to4", {
        "method.spsa.momentum": 0.95, "method.spsa.a": 0.02, "method.spsa.c": 0.01,
        "method.spsa.alpha": 0.5, "method.spsa.gamma": 0.1, "method.eps": 1.0,
        "trainer.max_epochs": 5000, "data.num_shots": 16, "data.train_augment": False,
    }),
    ("blackvip_locmnist_1to4_32shot", {
        "method.spsa.momentum": 0.95, "method.spsa.a": 0.02, "method.spsa.c": 0.01,
        "method.spsa.alpha": 0.5, "data.num_shots": 32, "data.name": "loc_mnist_f4",
        "paper.col": "locmnist_1to4_32shot", "paper.table": "tab3",
    }),
    ("blackvip_locmnist_1to1", {"method.spsa.c": 0.005, "method.spsa.alpha": 0.5}),
    ("vp_spsa_biasedmnist_0p9_32shot", {
        "method.spsa.a": 10.0, "method.spsa.c": 0.005, "method.spsa.alpha": 0.4,
        "method.spsa.momentum": 0.9, "data.num_shots": 32, "data.batch_size": 128,
    }),
    ("vp_spsa_locmnist_1to1", {"method.spsa.a": 10.0, "method.spsa.alpha": 0.5}),
    ("bar_locmnist_1to1", {"method.rgf.lr0": 5.0, "method.rgf.lr_min": 0.5}),
    ("vp_locmnist_1to4_32shot", {"method.lr": 10.0, "trainer.max_epochs": 1000,
                                 "data.batch_size": 64, "data.num_shots": 32}),
    ("zeroshot_eurosat", {"method.name": "zeroshot", "train": False, "paper.reported": None}),
]
# fmt: on


@pytest.mark.parametrize(("name", "expected"), CASES, ids=[c[0] for c in CASES])
def test_experiment_holds_spec_numbers(name: str, expected: dict, tmp_path: Path) -> None:
    cfg = compose_train([f"experiment={name}", f"paths.log_dir={tmp_path}"])
    validate_config(cfg)
    assert cfg.model.name == "clip_vit_b16" and cfg.trainer.accelerator == "gpu"
    for key, want in expected.items():
        got = _get(cfg, key)
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, (key, got)


def test_command_line_groups_beat_the_experiment(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=vp_spsa_locmnist_1to4_32shot", "model=tiny_clip_random",
                         "data=shapes", "trainer=cpu", f"paths.log_dir={tmp_path}"])  # fmt: skip
    assert (cfg.model.name, cfg.data.name, cfg.trainer.accelerator) == (
        "tiny_clip_random", "shapes", "cpu")  # fmt: skip
    assert cfg.method.name == "vp_spsa" and cfg.method.spsa.momentum == 0.9
    assert cfg.paper.col == "locmnist_1to4_32shot"


@pytest.mark.parametrize("table", TABLES)
def test_table_validates_with_expected_cells(table: str) -> None:
    assert table_errors(table, CONFIG_DIR) == []
    spec = validate_table(table, CONFIG_DIR)
    tid, n_cells = TABLES[table]
    assert (spec.paper, spec.id, spec.metric, spec.seeds) == ("blackvip_cvpr23", tid, "test/acc",
                                                              [1, 2, 3])  # fmt: skip
    assert spec.rows == list(METHODS)
    assert spec.n_cells == len(spec.rows) * len(spec.cols) == n_cells
    assert spec.warnings == []  # experiments' reported/seeds agree with the table
    sweep = OmegaConf.load(CONFIG_DIR / "table" / f"{table}.yaml").hydra
    assert str(sweep.mode) == "MULTIRUN"
    assert str(sweep.sweeper.params.seed).replace(" ", "") == "1,2,3"
    assert [e.strip() for e in str(sweep.sweeper.params.experiment).split(",")] == spec.experiments


def test_table_layouts() -> None:
    tab2 = validate_table("blackvip_fewshot", CONFIG_DIR)
    assert tab2.cols == TL_COLS
    tab3 = validate_table("blackvip_synthetic", CONFIG_DIR)
    assert sorted(tab3.cols) == sorted(SYN_SETS + [f"{s}_32shot" for s in SYN_SETS])
    # Only secondary numbers of spec §12.2: BlackVIP row (12 cells) + VP w/ SPSA-GC EuroSAT.
    assert tab2.reported[("vp_spsa", "eurosat")] == 70.9
    assert {c for r, c in tab2.reported if r == "blackvip"} == set(TL_COLS) - {"resisc", "clevr"}
    assert len(tab2.reported) == 13 and tab3.reported == {}


@pytest.mark.parametrize("name", ALL_EXPERIMENTS)
def test_experiment_file_matches_its_cell(name: str) -> None:
    path = CONFIG_DIR / "experiment" / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == "# @package _global_"
    cfg = _composed(name)
    row = next(m for m in sorted(METHODS, key=len, reverse=True) if name.startswith(m + "_"))
    col = name.removeprefix(row + "_")
    assert (cfg.paper.row, cfg.paper.col, cfg.method.name) == (row, col, row)
    assert cfg.data.name == DATA[col.removesuffix("_32shot")]
    assert cfg.data.num_shots == (32 if col.endswith("_32shot") else 16)
    assert list(cfg.tags) == ["blackvip_cvpr23", cfg.paper.table]
    assert list(cfg.paper.seeds) == [1, 2, 3]
    if row in BLACK_BOX:
        assert cfg.data.batch_size == 128
        assert cfg.trainer.max_epochs == (
            {"cars": 2500, "sun": 1000, "imagenet": 500}.get(col, 5000)
        )
    elif row == "vp":
        assert cfg.data.batch_size == 64
        assert cfg.trainer.max_epochs == {"sun": 500, "imagenet": 400}.get(col, 1000)


def test_32shot_cells_share_the_16shot_hyperparameters() -> None:
    for m in METHODS:
        for s in SYN_SETS:
            c16, c32 = _composed(f"{m}_{s}"), _composed(f"{m}_{s}_32shot")
            assert c16.method == c32.method and c16.trainer == c32.trainer
            d16, d32 = OmegaConf.to_container(c16.data), OmegaConf.to_container(c32.data)
            assert d32.pop("num_shots") == 32 and d16.pop("num_shots") == 16 and d16 == d32
