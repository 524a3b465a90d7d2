"""MixDiff (ECAI 2024) table configs: the cells hold the official scripts' values.

Grids: configs/cells/mixdiff_ecai24/ (18 rows x 21 columns, one column per fixed class split of the
five open-set benchmarks; tables table/mixdiff_<benchmark>_{auroc,fpr95}.yaml, the splits plus their
mean) and configs/cells/mixdiff_tiny/ (the miniature, table/mixdiff_tiny.yaml). The expected values
are typed here from spec robustness_ood_prompting.md §3.3 and `hy18284/mixdiff: mixup/scripts/**`
(--n, --m, --r, --p, --gamma, --ref_mode, intermediate_state, the score calculator). Composition
only: nothing is built or run. One column of the paper grid composes in the fast suite, the others
and the 90-cell tables under `slow`.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from reprolab.tables.schema import experiment_names, validate_table
from reprolab.utils.config import CONFIG_DIR, compose_train, validate_config

IN_BATCH = {"aux": "in_batch", "n": 15, "r": 7, "gamma": 2.0}
# row -> (method config, method values) from the scripts (spec §3.3)
ROWS = {
    # baselines/baselines.sh: utilize_mixup false, intermediate_state logit
    "msp": ("msp", {"score": "msp", "output": "logits"}),
    "maxlogit": ("maxlogit", {"score": "maxlogit", "output": "logits"}),
    "energy": ("energy", {"score": "energy", "output": "logits"}),
    "entropy": ("entropy_ood", {"score": "entropy", "output": "logits"}),
    "mcm": ("mcm", {"score": "mcm", "output": "logits", "temperature": 1.0}),
    # logit/mixdiff_logit.sh (Entropy; the other base scores with the same values)
    **{
        f"mixdiff_logit_{b}": (
            "mixdiff",
            {"output": "logits", "base_score": b, "m": 15, **IN_BATCH},
        )
        for b in ("msp", "maxlogit", "energy", "entropy", "mcm")
    },
    # prob/mixdiff_prob_msp.sh, prob/mixdiff_prob_entropy.sh (in_batch: --p unused, P = N)
    "mixdiff_prob_msp": ("mixdiff", {"output": "probs", "base_score": "msp", "m": 15, **IN_BATCH}),
    "mixdiff_prob_entropy": (
        "mixdiff",
        {"output": "probs", "base_score": "entropy", "m": 10, **IN_BATCH},
    ),
    # prob/mixdiff_entropy_orc.sh (--p 3 overridden upstream: P = M), prob/mixdiff_entropy_rnd_id.sh
    "mixdiff_prob_entropy_orc": (
        "mixdiff",
        {"output": "probs", "base_score": "entropy", "aux": "oracle", "n": 100, "m": 15, "r": 7},
    ),
    "mixdiff_prob_entropy_rnd": (
        "mixdiff",
        {"output": "probs", "base_score": "entropy", "aux": "rand_id", "n": 100, "p": 9, "m": 15},
    ),
    # label/onehot_agmax_orc.sh, label/onehot_agmax_rnd_id.sh: gamma 1
    "mixdiff_label_orc": (
        "mixdiff",
        {"output": "label", "base_score": "onehot", "aux": "oracle", "n": 5, "m": 10, "r": 7},
    ),
    "mixdiff_label_rnd": (
        "mixdiff",
        {"output": "label", "base_score": "onehot", "aux": "rand_id", "n": 3, "p": 14, "m": 15},
    ),
    # embed/mixdiff_embedding.sh: rand_id, N 100, P 14, M 15, R 5, gamma 2
    **{
        f"mixdiff_embed_{b}": (
            "mixdiff",
            {"output": "embedding", "base_score": b, "aux": "rand_id", "n": 100, "p": 14, "m": 15},
        )
        for b in ("msp", "entropy")
    },
}
R_AND_GAMMA = {  # rows whose R / gamma differ from in_batch's 7 / 2
    "mixdiff_prob_entropy_orc": (7, 2.0),
    "mixdiff_prob_entropy_rnd": (5, 2.0),
    "mixdiff_label_orc": (7, 1.0),
    "mixdiff_label_rnd": (7, 1.0),
    "mixdiff_embed_msp": (5, 2.0),
    "mixdiff_embed_entropy": (5, 2.0),
}
# benchmark (paper.table) -> (data config, splits)
BENCHMARKS = {
    "cifar10": ("cifar10_osr", 5),
    "cifar_plus10": ("cifar_plus10", 5),
    "cifar_plus50": ("cifar_plus50", 1),
    "cifar100": ("cifar100_osr", 5),
    "tinyimagenet": ("tinyimagenet_osr", 5),
}
COLS = {f"{b}_s{s}": (b, data, s) for b, (data, n) in BENCHMARKS.items() for s in range(n)}
FAST_COL = "cifar_plus50_s0"
CELLS = [(f"{r}_{c}", r, c) for r in ROWS for c in COLS]
TABLES = [f"mixdiff_{b}_{m}" for b in BENCHMARKS for m in ("auroc", "fpr95")]
METRIC = {"auroc": "test/ood/auroc", "fpr95": "test/ood/fpr95_oodpos"}

TINY_ROWS = [
    "msp",
    "maxlogit",
    "energy",
    "entropy",
    "mcm",
    "mixdiff",
    "mixdiff_term",
    "mixdiff_msp",
]


def _composed(name: str):
    return compose_train([f"experiment={name}", "paths.log_dir=/logs"])


def _table_yaml(name: str):
    return OmegaConf.load(CONFIG_DIR / "table" / f"{name}.yaml")


def test_the_grids_generate_every_cell():
    from hydra_plugins.reprolab_cells.grid import load

    grids = load(CONFIG_DIR / "cells")
    paper = {n for n, c in grids.cells.items() if c.grid == "mixdiff_ecai24"}
    tiny = {n for n, c in grids.cells.items() if c.grid == "mixdiff_tiny"}
    assert paper == {c[0] for c in CELLS} and len(paper) == 18 * 21
    assert tiny == {f"{r}_shapes_osr" for r in TINY_ROWS}
    assert paper | tiny <= set(experiment_names(CONFIG_DIR))


@pytest.mark.parametrize(
    ("name", "row", "col"),
    [pytest.param(*c, id=c[0], marks=() if c[2] == FAST_COL else pytest.mark.slow) for c in CELLS],
)
def test_paper_cell_holds_the_script_values(name: str, row: str, col: str) -> None:
    cfg = _composed(name)
    validate_config(cfg)
    method, values = ROWS[row]
    bench, data, split = COLS[col]
    assert cfg.method.name == method
    for key, value in values.items():
        assert cfg.method[key] == value, (name, key)
    if method == "mixdiff":
        r, gamma = R_AND_GAMMA.get(row, (7, 2.0))
        assert (cfg.method.r, cfg.method.gamma) == (r, gamma)
        assert cfg.method.seed == cfg.seed  # oracle and auxiliary draws follow the run seed
    # upstream's CLIP pipeline: OpenAI ViT-B/32, "This is a photo of a {}", CIFAR mean/std
    assert (cfg.model.arch, cfg.model.pretrained) == ("ViT-B-32", "openai")
    assert (cfg.method.templates, cfg.method.normalize) == ("upstream", "upstream")
    assert cfg.data.dataset == data and cfg.data.dataset_kwargs.split == split
    assert cfg.data.num_shots is None and cfg.data.val is False  # oracles from the whole ID train
    assert (cfg.paper.id, cfg.paper.table, cfg.paper.row, cfg.paper.col) == (
        "mixdiff_ecai24",
        bench,
        row,
        col,
    )
    assert list(cfg.paper.seeds) == [0] and cfg.paper.reported is None


@pytest.mark.parametrize("name", TABLES)
def test_table_files_pair_every_row_with_the_benchmarks_splits(name: str) -> None:
    """The layout, read from the YAML (fast): rows x split columns, their mean, seed 0, no paper
    numbers yet, the sweep = the experiments; the AUROC and FPR95 tables read the same runs."""
    bench, kind = name.removeprefix("mixdiff_").rsplit("_", 1)
    t = OmegaConf.to_container(_table_yaml(name), resolve=False)
    table, sweep = t["table"], t["hydra"]["sweeper"]["params"]
    cols = [c for c, (b, _, _) in COLS.items() if b == bench]
    assert table["rows"] == list(ROWS) and table["cols"] == cols
    assert table["experiments"] == [f"{r}_{c}" for r in ROWS for c in cols]
    assert sweep["experiment"].split(",") == table["experiments"] and str(sweep["seed"]) == "0"
    assert table["seeds"] == [0] and table["metric"] == METRIC[kind]
    assert table["average"]["rule"] == "mean" and table["average"]["col"] == "average"
    assert (table["id"], table["output"]) == (bench, f"{bench}_{kind}")
    assert table["reported"] == dict.fromkeys(ROWS)  # the paper's numbers were not found (§3.5)
    convention = "fpr95_oodpos" if kind == "fpr95" else "AUROC"
    assert convention in table["title"]
    twin = _table_yaml(f"mixdiff_{bench}_{'fpr95' if kind == 'auroc' else 'auroc'}").table
    assert list(twin.experiments) == table["experiments"] and twin.id == table["id"]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=() if "plus50" in n else pytest.mark.slow) for n in TABLES],
)
def test_table_validates_with_its_average_column(name: str) -> None:
    spec = validate_table(name, CONFIG_DIR)
    assert spec.average is not None and spec.average.label.startswith("Average")
    assert spec.n_jobs == len(spec.rows) * len(spec.cols)
    assert not spec.warnings and not spec.reported


# ---- the miniature


@pytest.mark.parametrize("row", TINY_ROWS)
def test_tiny_cell_composes(row: str) -> None:
    cfg = _composed(f"{row}_shapes_osr")
    validate_config(cfg)
    assert cfg.model.name == "tiny_clip" and cfg.trainer.accelerator == "cpu"
    assert cfg.data.name == "shapes_osr" and cfg.data.dataset_kwargs.test_size == 100
    assert cfg.data.cache_images is True and cfg.method.normalize == "model"
    assert (cfg.paper.id, cfg.paper.table, cfg.paper.row) == ("mixdiff_ecai24", "tiny", row)
    if row.startswith("mixdiff"):  # the issue's prototype: oracle aux, M 8, R 3, gamma 2
        m = cfg.method
        assert (m.aux, m.m, m.r, m.gamma, m.output) == ("oracle", 8, 3, 2.0, "logits")
        assert m.base_score == ("msp" if row == "mixdiff_msp" else "energy")
        assert m.add_base_score is (row != "mixdiff_term")


def test_tiny_table_reads_far_and_near_from_one_run() -> None:
    spec = validate_table("mixdiff_tiny", CONFIG_DIR)
    assert spec.rows == TINY_ROWS and spec.n_jobs == 8 * 3
    assert spec.col_metrics == {
        "far_auroc": "test/ood_far/auroc",
        "near_auroc": "test/ood_near/auroc",
        "far_fpr95": "test/ood_far/fpr95",
        "near_fpr95": "test/ood_near/fpr95",
    }
    assert "standard" in spec.title and not spec.warnings


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixdiff_tiny", *TABLES])
def test_table_composes_as_a_multirun(name: str, tmp_path) -> None:
    cfg = compose_train([f"table={name}", f"paths.log_dir={tmp_path}"])
    validate_config(cfg)
