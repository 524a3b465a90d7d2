"""Prompt-learning paper tables (issue 15): the cells hold the spec's recipes, the tables validate.

Grids (configs/cells/): `coop_b2n` (CoCoOp Table 1, base-to-new, read by three tables of the same
runs: prompt_b2n_{base,new,hm}), `coop_fewshot` (CoOp's few-shot curves, prompt_fewshot), `coop_xd`
(CoCoOp Tables 2-3: ImageNet-trained prompts, prompt_dg for the training runs and their ImageNet
variants, prompt_xd for the test-only transfer runs) and `prompt_tiny` (the CPU miniature,
prompt_tiny and prompt_tiny_textcos). Values checked against specs/prompting_posthoc.md A1-A4 and
robustness_ood_prompting.md §0.1, §5.2-§5.3.

The fast tests compose a few representative cells and read the grid and table files; validating
every table (and composing each of its cells) takes minutes and is marked slow.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reprolab.utils.config import CONFIG_DIR, compose_train

CELLS = CONFIG_DIR / "cells"
TABLE_DIR = CONFIG_DIR / "table"
DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
            "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]  # fmt: skip
TARGETS = DATASETS[1:]
SHOTS = [1, 2, 4, 8, 16]
#: spec A1.2 (COOP.md): epochs by shots; ImageNet 50 at every shot count.
EPOCHS_BY_SHOTS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
B2N_ROWS = ["zs", "coop", "cocoop", "kgcoop", "eplkg"]
#: spec A4 (11-dataset averages, CoCoOp Table 1 as quoted; KgCoOp from its README): Base, New, H.
A4 = {"zs": (69.34, 74.22, 71.70), "coop": (82.69, 63.22, 71.66),
      "cocoop": (80.47, 71.69, 75.83), "kgcoop": (80.73, 73.6, 77.0)}  # fmt: skip
TABLES = ["prompt_b2n_base", "prompt_b2n_new", "prompt_b2n_hm", "prompt_fewshot", "prompt_xd",
          "prompt_dg", "prompt_tiny", "prompt_tiny_textcos"]  # fmt: skip


@cache
def _composed(name: str, seed: int = 1):
    """`experiment=<name>` composed once per session (read-only use)."""
    cfg = compose_train([f"experiment={name}", f"seed={seed}", "paths.log_dir=/logs"])
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _table(name: str):
    return OmegaConf.load(TABLE_DIR / f"{name}.yaml")


def _sweep(name: str) -> list[str]:
    return [e.strip() for e in str(_table(name).hydra.sweeper.params.experiment).split(",")]


# -- base-to-new (CoCoOp Table 1) -----------------------------------------------------------------

# (cell, {dotted key: expected}); spec A1.2 (CoOp vit_b16_ctxv1), A2 (CoCoOp c4_ep10_batch1_ctxv1),
# A3 (KgCoOp vit_b16_ep100_ctxv1), robustness_ood_prompting.md §5.2 (EPLKG).
# fmt: off
B2N_CASES = [
    ("zs_b2n_oxford_pets", {"method.name": "zeroshot", "method.post_hoc": True,  # train: false
                            "method.cache_image_features": False}),
    ("coop_b2n_caltech101", {
        "method.name": "coop", "method.ctx_init": "a photo of a", "method.n_ctx": 4,
        "method.csc": False, "method.class_token_position": "end", "method.kg_weight": 0.0,
        "method.cache_image_features": False, "method.optimizer.lr": 0.002,
        "method.optimizer.momentum": 0.9, "method.optimizer.weight_decay": 5e-4,
        "method.scheduler._target_": "reprolab.optim.schedules.dassl_cosine",
        "method.scheduler.warmup_epochs": 1, "method.scheduler.warmup_lr": 1e-5,
        "data.batch_size": 32, "data.train_augment": True, "trainer.max_epochs": 200,
    }),
    ("coop_b2n_imagenet", {"trainer.max_epochs": 50, "data.batch_size": 32}),
    ("cocoop_b2n_dtd", {
        "method.name": "cocoop", "method.ctx_init": "a photo of a", "method.n_ctx": 4,
        "method.cache_image_features": False, "method.optimizer.lr": 0.002,
        "data.batch_size": 1, "trainer.max_epochs": 10,
    }),
    ("cocoop_b2n_imagenet", {"data.batch_size": 1, "trainer.max_epochs": 10}),
    ("kgcoop_b2n_eurosat", {
        "method.name": "kgcoop", "method.kg_weight": 8.0, "method.ctx_init": "a photo of a",
        "method.cache_image_features": False, "data.batch_size": 128, "trainer.max_epochs": 100,
        "method.optimizer.lr": 0.002,
    }),
    ("eplkg_b2n_ucf101", {
        "method.name": "eplkg", "method.cache_image_features": True, "data.train_augment": False,
        "data.batch_size": 64, "trainer.max_epochs": 100, "method.dropout": 0.4,
        "method.alpha": 0.2, "method.search_level": 1, "method.optimizer.weight_decay": 3e-3,
    }),
]
# fmt: on


@pytest.mark.parametrize(("name", "expected"), B2N_CASES, ids=[c[0] for c in B2N_CASES])
def test_b2n_cells_hold_the_recipes_and_are_base_to_new(name: str, expected: dict) -> None:
    cfg = _composed(name)
    row, col = name.split("_b2n_")
    assert (cfg.paper.id, cfg.paper.table, cfg.paper.row, cfg.paper.col) == (
        "cocoop_cvpr22", "tab1", row, f"b2n_{col}")  # fmt: skip
    assert cfg.data.name == col and cfg.data.subsample_classes == "base_to_new"
    assert cfg.data.num_shots == 16 and cfg.model.name == "clip_vit_b16"
    assert cfg.data.val is False and list(cfg.paper.seeds) == [1, 2, 3]
    got = {k: OmegaConf.select(cfg, k, throw_on_missing=True) for k in expected}
    assert got == expected


def test_every_b2n_column_is_base_to_new() -> None:
    """The grid sets base_to_new for every cell and no column or row takes it back."""
    grid = OmegaConf.load(CELLS / "coop_b2n" / "grid.yaml")
    assert grid.data.subsample_classes == "base_to_new" and grid.data.num_shots == 16
    cols = sorted(p.stem for p in (CELLS / "coop_b2n" / "cols").glob("*.yaml"))
    assert cols == sorted(f"b2n_{d}" for d in DATASETS)
    for path in [*(CELLS / "coop_b2n" / "cols").glob("*.yaml"),
                 *(CELLS / "coop_b2n" / "rows").glob("*.yaml")]:  # fmt: skip
        assert "subsample_classes" not in path.read_text(), path.name
    for col in ("b2n_sun397", "b2n_food101"):  # and a composed cell of each row on another column
        for row in B2N_ROWS:
            assert _composed(f"{row}_{col}").data.subsample_classes == "base_to_new"


def test_b2n_tables_read_the_same_runs_with_their_own_metric_and_average() -> None:
    cells = [f"{r}_b2n_{d}" for r in B2N_ROWS for d in DATASETS]
    for i, (which, metric, rule) in enumerate(
        [
            ("base", "test/base_acc", "mean"),
            ("new", "test/new_acc", "mean"),
            ("hm", "test/hm", "base_new_hm"),
        ]  # fmt: skip
    ):
        t = _table(f"prompt_b2n_{which}").table
        assert (t.paper, t.id, t.output, t.metric) == ("cocoop_cvpr22", "tab1", f"tab1_{which}",
                                                       metric)  # fmt: skip
        assert list(t.experiments) == cells == _sweep(f"prompt_b2n_{which}")
        assert list(t.rows) == B2N_ROWS and list(t.cols) == [f"b2n_{d}" for d in DATASETS]
        assert dict(t.average) == {"col": "average", "label": "Average", "rule": rule}
        rep = OmegaConf.to_container(t.reported)
        assert rep["eplkg"] is None  # EPLKG's tables not read (§5.3)
        for row, numbers in A4.items():
            assert rep[row].pop("average") == numbers[i]
            assert rep[row] == {f"b2n_{d}": None for d in DATASETS}  # TODO: CoCoOp Table 1


# -- few-shot curves (CoOp) -----------------------------------------------------------------------


def test_fewshot_epochs_by_shots_in_every_column() -> None:
    cols = CELLS / "coop_fewshot" / "cols"
    assert sorted(p.stem for p in cols.glob("*.yaml")) == sorted(
        f"{d}_{k}shot" for d in DATASETS for k in SHOTS
    )
    for d in DATASETS:
        for k in SHOTS:
            spec = OmegaConf.load(cols / f"{d}_{k}shot.yaml")
            epochs = 50 if d == "imagenet" else EPOCHS_BY_SHOTS[k]
            assert spec.data == d and spec.common.data.num_shots == k
            assert spec.rows.coop_rn50.trainer.max_epochs == epochs, (d, k)
            assert spec.rows.lp_rn50.trainer.max_epochs == epochs, (d, k)


@pytest.mark.parametrize(
    ("name", "shots", "epochs"),
    [
        ("coop_rn50_dtd_1shot", 1, 50),
        ("coop_rn50_eurosat_4shot", 4, 100),
        ("coop_rn50_food101_16shot", 16, 200),
        ("coop_rn50_imagenet_8shot", 8, 50),
    ],  # fmt: skip
)
def test_fewshot_coop_cells(name: str, shots: int, epochs: int) -> None:
    cfg = _composed(name)
    assert (cfg.paper.id, cfg.paper.table, cfg.paper.row) == ("coop_ijcv22", "fewshot", "coop_rn50")
    assert cfg.model.name == "clip_rn50" and cfg.data.subsample_classes == "all"
    assert cfg.data.num_shots == shots and cfg.trainer.max_epochs == epochs
    # spec A1.2: M = 16, random init, unified, class token at the end; batch 32, lr 0.002
    m = cfg.method
    assert (m.name, m.n_ctx, m.ctx_init, m.csc, m.class_token_position) == (
        "coop", 16, None, False, "end")  # fmt: skip
    assert m.optimizer.lr == 0.002 and cfg.data.batch_size == 32 and cfg.data.train_augment


def test_fewshot_table_layout() -> None:
    t = _table("prompt_fewshot").table
    assert list(t.cols) == [f"{d}_{k}shot" for d in DATASETS for k in SHOTS]
    zs = [f"zs_rn50_{d}_16shot" for d in DATASETS]  # zero-shot needs no shots: one run each
    coop = [f"coop_rn50_{c}" for c in t.cols]
    lp = [f"lp_rn50_{c}" for c in t.cols]
    assert list(t.experiments) == zs + coop + lp == _sweep("prompt_fewshot")
    assert OmegaConf.to_container(t.reported) == {}  # figures: nothing printed
    lp_cell = _composed("lp_rn50_caltech101_2shot")
    assert lp_cell.method.name == "linear_probe" and lp_cell.method.init == "random"
    assert lp_cell.trainer.max_epochs == 100 and lp_cell.data.train_augment is False


# -- cross-dataset transfer and domain generalisation (CoCoOp Tables 2-3) --------------------------


@pytest.mark.parametrize("row", ["coop", "cocoop"])
@pytest.mark.parametrize("seed", [1, 3])
def test_xd_eval_cells_load_the_imagenet_run_of_the_same_seed(row: str, seed: int) -> None:
    train = _composed(f"{row}_xd_imagenet", seed)
    # `train: null` = fit unless the method is post-hoc (configs/train.yaml)
    assert train.train is None and not train.method.get("post_hoc", False)
    assert train.data.name == "imagenet"
    assert train.data.subsample_classes == "all" and train.data.num_shots == 16
    for target in ("caltech101", "ucf101"):
        ev = _composed(f"{row}_xd_{target}", seed)
        assert ev.train is False and ev.data.name == target and ev.data.subsample_classes == "all"
        assert ev.method.source.run_dir == train.paths.run_dir
        assert ev.method.source.run_dir == (
            f"/logs/cocoop_cvpr22.tab2_3.{row}.xd_imagenet/seed{seed}"
        )
        assert ev.method.source.experiment == f"{row}_xd_imagenet"
        assert ev.model.name == train.model.name == "clip_vit_b16"


def test_xd_target_columns_all_transfer() -> None:
    cols = CELLS / "coop_xd" / "cols"
    assert sorted(p.stem for p in cols.glob("*.yaml")) == sorted(f"xd_{d}" for d in DATASETS)
    base = OmegaConf.load(cols / "xd_caltech101.yaml")
    assert base.common.train is False and set(base.rows) == {"coop", "cocoop"}
    for d in TARGETS[1:]:
        spec = OmegaConf.load(cols / f"xd_{d}.yaml")
        assert (spec.extends, spec.data) == ("xd_caltech101", d)
    zs = _composed("zs_xd_eurosat")
    assert zs.train is False and zs.method.name == "zeroshot" and "source" not in zs.method


def test_xd_imagenet_runs_are_tested_on_the_imagenet_variants() -> None:
    cfg = _composed("cocoop_xd_imagenet")
    shifts = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]  # Table 3's order
    assert list(cfg.data.dataset_kwargs.shift_sets) == shifts
    assert (cfg.data.batch_size, cfg.trainer.max_epochs) == (1, 10)  # A2
    coop = _composed("coop_xd_imagenet")
    assert (coop.method.ctx_init, coop.data.batch_size, coop.trainer.max_epochs) == (
        "a photo of a", 32, 50)  # fmt: skip
    dg = _table("prompt_dg").table
    assert (dg.id, dg.output) == ("tab2_3", "tab3") and list(dg.experiments) == [
        "zs_xd_imagenet", "coop_xd_imagenet", "cocoop_xd_imagenet"]  # fmt: skip
    assert [dg.col_metrics[c] for c in dg.cols] == [
        "test/test/acc", *(f"test/{s}/acc" for s in shifts), "test/avg_shift/acc"]  # fmt: skip


def test_xd_table_sweeps_the_training_cells_first_and_averages_the_targets() -> None:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    t = _table("prompt_xd")
    assert (t.table.id, t.table.output) == ("tab2_3", "tab2")
    assert list(t.table.average.cols) == [f"xd_{d}" for d in TARGETS]  # not the source column
    params = t.hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    order = [dict(o.split("=", 1) for o in job)["experiment"] for job in batch]
    assert len(order) == 33 * 3
    last_train = max(i for i, e in enumerate(order) if e.endswith("_xd_imagenet"))
    first_eval = min(i for i, e in enumerate(order) if not e.endswith("_xd_imagenet"))
    assert last_train < first_eval


# -- the miniature --------------------------------------------------------------------------------


@pytest.mark.parametrize("row", ["zs", "coop", "cocoop", "kgcoop", "eplkg", "cdesc"])
def test_tiny_cells_run_on_cached_features_on_the_cpu(row: str) -> None:
    cfg = _composed(f"{row}_clutter_shapes")
    assert (cfg.paper.id, cfg.paper.table, cfg.paper.row) == ("cocoop_cvpr22", "tiny", row)
    assert cfg.model.name == "tiny_clip" and cfg.trainer.accelerator == "cpu"
    assert cfg.data.name == "clutter_shapes" and cfg.data.subsample_classes == "base_to_new"
    assert cfg.data.num_shots == 16 and cfg.data.train_augment is False
    assert cfg.method.cache_image_features is True and cfg.trainer.max_steps == 500
    if row in ("coop", "kgcoop", "cocoop"):
        assert (cfg.method.ctx_init, cfg.method.n_ctx) == ("a photo of a", 4)
    if row in ("coop", "kgcoop", "cocoop", "eplkg"):
        assert cfg.method.optimizer.lr == 2e-2 and cfg.method.optimizer.momentum == 0.9
        assert cfg.data.batch_size == (1 if row == "cocoop" else 32)
    assert cfg.method.get("kg_weight", 0.0) == (8.0 if row == "kgcoop" else 0.0)


def test_no_two_tables_write_the_same_results() -> None:
    """Tables of the same runs (paper.table) need their own `output`, else they overwrite."""
    seen: dict[tuple[str, str], str] = {}
    for path in sorted(TABLE_DIR.glob("*.yaml")):
        t = OmegaConf.load(path).table
        key = (str(t.paper), str(t.get("output") or t.id))
        assert key not in seen, f"{path.stem} and {seen[key]} both write results/{key[0]}/{key[1]}"
        seen[key] = path.stem
    assert seen[("cocoop_cvpr22", "tiny_text_cos")] == "prompt_tiny_textcos"


# -- slow: every table validates and every cell composes ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("table", TABLES)
def test_table_validates(table: str) -> None:
    from reprolab.tables.schema import table_errors, validate_table

    assert table_errors(table, CONFIG_DIR) == []
    spec = validate_table(table, CONFIG_DIR)
    assert spec.warnings == [] and spec.seeds == [1, 2, 3]
    n_cells = {"prompt_fewshot": 121, "prompt_xd": 33, "prompt_dg": 3, "prompt_tiny": 6,
               "prompt_tiny_textcos": 2}.get(table, 55)  # fmt: skip
    assert spec.n_cells == n_cells
    if table.startswith("prompt_b2n_"):
        assert spec.average.rule == ("base_new_hm" if table.endswith("_hm") else "mean")
        assert spec.reported[("coop", "average")] in A4["coop"]


@pytest.mark.slow
@pytest.mark.parametrize("table", TABLES)
def test_every_cell_of_the_table_composes_and_validates(table: str, tmp_path: Path) -> None:
    from reprolab.utils.config import validate_config

    for name in _sweep(table):
        cfg = compose_train([f"experiment={name}", f"paths.log_dir={tmp_path}"])
        validate_config(cfg)
        assert cfg.paths.run_dir == f"{tmp_path}/{cfg.cell}/seed1"
