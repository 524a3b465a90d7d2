"""NPC (Bae et al., ICML 2022) table configs: the cells hold the spec's recipe, the tables validate.

Grids: configs/cells/npc_icml22/ (the main table: 6 base classifiers and NPC over each, x MNIST /
FMNIST / CIFAR-10 noise settings, Clothing1M, Food-101N; tables npc_main_classifiers and npc_main)
and configs/cells/npc_tiny/ (the miniature on noisy_blobs; table npc_tiny). Checked: every NPC cell
reads the run dir of its classifier cell of the same column and seed, on the same data (the check
NPC itself runs passes), the recipe values of spec §4.3-§4.4, and that a missing classifier run
stops an NPC run in one line naming the command that makes it. Composition only, except that one
in-process run (noisy_blobs needs no files). Composing all 276 main cells is slow-marked.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reprolab.methods.finetuning.source import SourceRunError
from reprolab.methods.noisy.npc import _expected_data, data_differences
from reprolab.tables.schema import validate_table
from reprolab.utils.config import CONFIG_DIR, compose_train, validate_config

BASES = ("ce_noisy", "ce_early", "coteaching", "label_smoothing", "sce", "forward")
SETTINGS = {"sym20": ("sym", 0.2), "sym50": ("sym", 0.5), "sym80": ("sym", 0.8),
            "asym20": ("asym", 0.2), "asym40": ("asym", 0.4), "idnx20": ("idnx", 0.2),
            "idnx40": ("idnx", 0.4)}  # fmt: skip
DATASETS = {"mnist": ("mnist_noisy", "cnn_mnist"), "fmnist": ("fmnist_noisy", "cnn_mnist"),
            "cifar10": ("cifar10_noisy", "cnn9")}  # fmt: skip
REAL = {"clothing1m": 10, "food101n": 100}  # classifier epochs (train_classifier.py)
MAIN_COLS = [f"{d}_{s}" for d in DATASETS for s in SETTINGS] + list(REAL)
MAIN_ROWS = [r for b in BASES for r in (b, f"{b}_npc")]


@cache
def _composed(name: str, seed: int = 2, log_dir: str = "/logs"):
    """`experiment=<name>` composed, resolved and validated once per session (read-only use)."""
    cfg = compose_train([f"experiment={name}", f"seed={seed}", f"paths.log_dir={log_dir}"])
    OmegaConf.resolve(cfg)
    validate_config(cfg)  # the check train.py runs before anything is built (fills `train`)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_pair(base: str, col: str, seed: int = 2) -> tuple:
    """The classifier cell and its NPC cell: linked by run dir and experiment, same data."""
    clf, npc = _composed(f"{base}_{col}", seed), _composed(f"{base}_npc_{col}", seed)
    assert clf.train is True and npc.train is True  # NPC trains its CVAE
    assert npc.method.name == "npc" and clf.method.name == base
    assert npc.method.source.run_dir == clf.paths.run_dir
    assert clf.paths.run_dir.endswith(f"/{clf.cell}/seed{seed}")
    assert npc.method.source.experiment == f"{base}_{col}"
    assert (npc.paper.row, npc.paper.col) == (f"{base}_npc", col)
    # NPC's own data check (LOADER_KEYS aside) accepts the classifier's data; the model is the same
    expected = _expected_data(OmegaConf.to_container(npc.method.source))
    assert expected == OmegaConf.to_container(npc.data)
    assert data_differences(expected, clf) == []
    assert npc.model == clf.model
    assert npc.data.val is False and npc.trainer.max_epochs == 10  # main_npc.py --total_iter 10
    m = npc.method  # upstream README: onehot prior, rho 5, beta 1, Adam 1e-3
    assert (m.knn_mode, m.knn_k, m.prior_norm, m.beta) == ("onehot", 10, 5.0, 1.0)
    assert m.optimizer.lr == 1e-3 and m.fe_init == m.prior_features == "classifier"
    assert m.reparam == m.kl_form == "upstream"
    return clf, npc


# -- the miniature --------------------------------------------------------------------------------
@pytest.mark.parametrize("col", ["sym40", "asym30"])
def test_tiny_npc_cell_reads_its_ce_cell(col: str) -> None:
    clf = _composed(f"ce_noisy_{col}")
    npc = _composed(f"npc_{col}")
    assert npc.method.source.run_dir == clf.paths.run_dir
    assert npc.method.source.experiment == f"ce_noisy_{col}"
    assert data_differences(_expected_data(OmegaConf.to_container(npc.method.source)), clf) == []
    assert clf.data.name == "noisy_blobs" and clf.model.name == "mlp_featurizer"
    assert (clf.data.dim, clf.model.input_dim, clf.data.separation) == (8, 8, 3.0)
    assert clf.data.n_train == 300 and clf.data.batch_size == 32
    assert clf.data.data_seed == clf.data.noise_seed == 2  # a draw per seed
    kind, rate = {"sym40": ("sym", 0.4), "asym30": ("asym", 0.3)}[col]
    assert (clf.data.noise_type, clf.data.noise_rate) == (kind, rate)
    assert clf.trainer.max_epochs == 200 and npc.trainer.max_epochs == 50
    assert clf.trainer.accelerator == "cpu" and clf.trainer.enable_checkpointing is True


def test_tiny_table_validates_and_sweeps_the_classifiers_first() -> None:
    spec = validate_table("npc_tiny", CONFIG_DIR)
    assert (spec.paper, spec.id, spec.seeds) == ("npc_icml22", "tiny", [1, 2, 3])
    assert spec.metric == "test/acc"
    assert spec.rows == ["ce_noisy", "npc"] and spec.cols == ["sym40", "asym30"]
    assert spec.warnings == [] and spec.n_cells == 4
    sweep = OmegaConf.load(CONFIG_DIR / "table" / "npc_tiny.yaml").hydra.sweeper.params.experiment
    order = sweep.split(",")
    assert max(order.index(f"ce_noisy_{c}") for c in spec.cols) < min(
        order.index(f"npc_{c}") for c in spec.cols
    )


def test_an_npc_run_without_its_classifier_run_stops_in_one_line(tmp_path: Path) -> None:
    from reprolab.train import run

    overrides = ["experiment=npc_sym40", "seed=3", f"paths.log_dir={tmp_path}", "logger=csv"]
    cfg = compose_train([*overrides, "progress_bar=false", "threads=1"])
    with pytest.raises(SourceRunError) as err:
        run(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "python train.py experiment=ce_noisy_sym40 seed=3" in msg
    assert f"{tmp_path}/npc_icml22.tiny.ce_noisy.sym40/seed3" in msg


def test_npc_refuses_a_classifier_run_on_other_data(tmp_path: Path) -> None:
    """The data check, on a run's config as train.py saves it (unresolved, with ${seed})."""
    theirs = {"name": "noisy_blobs", "dim": 8, "data_seed": "${seed}", "separation": 6.0}
    saved = OmegaConf.create({"seed": 2, "data": {**theirs, "batch_size": 64, "val": True}})
    ours = {"name": "noisy_blobs", "dim": 8, "data_seed": 2, "separation": 3.0}
    ours.update(batch_size=32, val=False)  # loader keys: not compared
    assert data_differences(ours, saved) == ["data.separation: 6.0 != 3.0"]
    ours["separation"] = 6.0
    assert data_differences(ours, saved) == []
    ours["data_seed"] = 3
    assert data_differences(ours, saved) == ["data.data_seed: 2 != 3"]


# -- the main table -------------------------------------------------------------------------------
def _params(cols: list[str], fast: str) -> list:
    return [pytest.param(c, id=c, marks=() if c == fast else pytest.mark.slow) for c in cols]


@pytest.mark.parametrize("col", _params(MAIN_COLS[: -len(REAL)], "mnist_asym40"))
def test_main_cells_hold_the_noise_setting_and_recipe(col: str) -> None:
    ds, setting = col.split("_")
    data, model = DATASETS[ds]
    kind, rate = SETTINGS[setting]
    for base in BASES:
        clf, npc = _check_pair(base, col)
        assert (clf.data.name, clf.model.name) == (data, model)
        assert (clf.data.noise_type, clf.data.noise_rate, clf.data.noise_seed) == (kind, rate, 0)
        assert clf.data.batch_size == npc.data.batch_size == 128  # upstream, both stages
        assert clf.model.dropout == 0.3  # args.dropout for the CNNs
        assert clf.trainer.max_epochs == (201 if base == "forward" else 200)
        assert clf.data.val is (base == "ce_early")  # ES reads the noisy holdout
        assert clf.paper.table == npc.paper.table == "main" and clf.paper.reported is None


@pytest.mark.parametrize("col", _params(list(REAL), "clothing1m"))
def test_real_noise_cells_train_resnet50_on_its_imagenet_logits(col: str) -> None:
    for base in BASES:
        clf, npc = _check_pair(base, col)
        assert clf.model.name == "timm_resnet50" and clf.model.trainable is True
        assert clf.model.num_classes is None  # ResNet50Pre: the ImageNet head is kept ...
        assert clf.method.head_input == "backbone_logits"  # ... and the K-way head reads its logits
        assert clf.trainer.max_epochs == REAL[col] + (1 if base == "forward" else 0)
        assert clf.data.batch_size == 64 and npc.data.batch_size == 32
        assert npc.method.fe_dim is None  # φ = the classifier's 1000-d ImageNet output (npc.py)
        if base == "coteaching":
            assert clf.method.lr_decay_start is None  # int(0.6 · epochs)


@pytest.mark.slow
@pytest.mark.parametrize(("table", "rows", "output"), [
    ("npc_main_classifiers", list(BASES), "main_classifiers"),
    ("npc_main", MAIN_ROWS, None),
])  # fmt: skip
def test_main_tables_validate_with_the_classifiers_swept_first(table, rows, output) -> None:
    spec = validate_table(table, CONFIG_DIR)
    assert (spec.paper, spec.id, spec.seeds) == ("npc_icml22", "main", [1, 2, 3])
    assert spec.metric == "test/acc"
    assert spec.rows == rows and spec.cols == MAIN_COLS and spec.output == output
    assert spec.n_cells == len(rows) * len(MAIN_COLS) and spec.warnings == []
    assert spec.reported == {} or all(v is None for v in spec.reported.values())
    order = OmegaConf.load(CONFIG_DIR / "table" / f"{table}.yaml").hydra.sweeper.params.experiment
    order = order.split(",")
    assert sorted(order) == sorted(f"{r}_{c}" for r in rows for c in MAIN_COLS)
    first_npc = min((i for i, e in enumerate(order) if "_npc_" in e), default=len(order))
    assert all("_npc_" not in e for e in order[:first_npc]) and all(
        "_npc_" in e for e in order[first_npc:]
    )
