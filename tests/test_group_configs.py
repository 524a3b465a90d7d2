"""SCER (ICLR 2026) and ASGDRO / SIL (CVPR 2025) paper-table configs: the cells hold the recipes.

The cells come from the paper grids configs/cells/scer_iclr26/ (11 methods x waterbirds, celeba,
metashift, cmnist, civilcomments, multinli; SubpopBench's random search of 16 trials per cell, text
columns with BERT and SubpopBench's text optimisation) and
configs/cells/asgdro_cvpr25/ (9 methods x the four image benchmarks with suffix _sil; the SIL code's
README values, no search); the tables are table/scer_main.yaml and table/asgdro_main.yaml. Values
checked: specs robustness_ood_prompting.md §1.3-§1.6, §2.3-§2.4, SubpopBench's hparams_registry.py
and datasets.py (N_STEPS, CHECKPOINT_FREQ). Composition only: nothing is built or trained.
"""

from __future__ import annotations

import math
import subprocess
import sys
from functools import cache

import pytest
from omegaconf import OmegaConf

from reprolab.search import apply_trial, num_trials, read_search, trial_overrides
from reprolab.tables.schema import experiment_names, validate_table
from reprolab.utils.config import CONFIG_DIR, PROJECT_ROOT, compose_train, validate_config

N_TRIALS = 16
SCER_ROWS = ["erm", "groupdro", "lisa", "irm", "coral", "jtt", "dfr", "resample", "reweight"]
SCER_ROWS += ["mixup", "scer"]
# column -> (data, N_STEPS, CHECKPOINT_FREQ): SubpopBench datasets.py
SCER_COLS = {
    "waterbirds": ("waterbirds", 5001, 300),
    "celeba": ("celeba", 30001, 1000),
    "metashift": ("metashift", 5001, 300),
    "cmnist": ("cmnist", 5001, 250),
    "civilcomments": ("civilcomments", 30001, 1000),
    "multinli": ("multinli", 30001, 1000),
}
TEXT_COLS = {"civilcomments": 220, "multinli": 128}  # max_length (SubpopBench datasets.py)
ASGDRO_ROWS = ["erm", "groupdro", "sam", "asam", "lisa", "irm", "coral", "jtt", "asgdro"]
# column -> (data, lr, wd, epochs, steps per epoch = train size // 16, rho, adjustment): SIL README
ASGDRO_COLS = {
    "waterbirds_sil": ("waterbirds", 1e-5, 1.0, 300, 4795 // 16, 0.05, 2.0),
    "celeba_sil": ("celeba", 1e-4, 0.1, 50, 162770 // 16, 0.5, 1.0),
    "cmnist_sil": ("cmnist", 1e-3, 1e-4, 50, 30000 // 16, 0.8, 0.0),
    "metashift_sil": ("metashift", 1e-3, 1e-4, 100, 2276 // 16, 0.5, 0.0),
}
SCER_CELLS = [(f"{r}_{c}", r, c) for r in SCER_ROWS for c in SCER_COLS]
SCER_TEXT_CELLS = [c for c in SCER_CELLS if c[2] in TEXT_COLS]
SCER_CELLS = [c for c in SCER_CELLS if c[2] not in TEXT_COLS]
ASGDRO_CELLS = [(f"{r}_{c}", r, c) for r in ASGDRO_ROWS for c in ASGDRO_COLS]


def _one_column_fast(cells: list[tuple[str, str, str]], fast_col: str) -> list:
    """Every cell, the cells of columns other than `fast_col` behind the `slow` marker (each cell
    also composes in tests/test_configs.py; `make test` stays within its time)."""
    return [
        pytest.param(*c, id=c[0], marks=() if c[2] == fast_col else pytest.mark.slow) for c in cells
    ]


TWO_ROUNDS_OR_POST_HOC = {"jtt", "dfr"}  # no checkpoint selection inside the run

# SubpopBench hparams_registry.py, images: lr 10^U(-4,-2), wd 10^U(-6,-3), batch int(2^U(6,6.75)).
SHARED = {
    "method.optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "method.optimizer.weight_decay": {"low": 1e-6, "high": 1e-3, "log": True},
    "data.batch_size": {"low": 64, "high": 2**6.75, "log": True, "int": True},
}
# Each method's own ranges (SubpopBench; SCER: the SCER code's registry, spec §1.3).
OWN = {
    "erm": {},
    "resample": {},
    "reweight": {},
    "groupdro": {"method.eta": {"low": 1e-3, "high": 1e-1, "log": True}},
    "scer": {
        "method.eta": {"low": 1e-3, "high": 1e-1, "log": True},
        "method.lambda_spurious": {"low": 0.0, "high": 1.0},
        "method.lambda_core": {"low": 0.0, "high": 1.0},
    },
    "lisa": {
        "method.alpha": {"low": 0.1, "high": 10.0, "log": True},
        "method.p_sel": {"low": 0.0, "high": 1.0},
        "method.mix_method": ["mixup", "cutmix"],
    },
    "irm": {
        "method.irm_lambda": {"low": 0.1, "high": 1e5, "log": True},
        "method.anneal_iters": {"low": 1, "high": 10_000, "log": True, "int": True},
    },
    "coral": {"method.mmd_gamma": {"low": 0.1, "high": 10.0, "log": True}},
    "mixup": {"method.alpha": {"low": 0.1, "high": 10.0, "log": True}},
    "jtt": {
        "method.first_stage_step_frac": {"low": 0.2, "high": 0.8},
        "method.jtt_lambda": {"low": 1.0, "high": 10**2.5, "log": True},
    },
}


@cache
def _composed(name: str, trial: int | None = None, seed: int = 1):
    over = [f"experiment={name}", f"seed={seed}", "paths.log_dir=/logs"]
    cfg = compose_train([*over, f"trial={trial}"] if trial is not None else over)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _space(name: str) -> dict:
    return read_search(_composed(name, 0).search)["space"]


def test_the_grids_generate_every_cell_of_both_tables() -> None:
    names = set(experiment_names(CONFIG_DIR))
    assert {c[0] for c in SCER_CELLS + SCER_TEXT_CELLS} | {c[0] for c in ASGDRO_CELLS} <= names
    assert {c for c in names if c.endswith("_sil")} == {c[0] for c in ASGDRO_CELLS}


@pytest.mark.parametrize(("name", "row", "col"), _one_column_fast(SCER_CELLS, "waterbirds"))
def test_scer_cell_composes_with_the_subpopbench_protocol(name: str, row: str, col: str) -> None:
    cfg = compose_train([f"experiment={name}", "trial=0", "paths.log_dir=/logs"])
    validate_config(cfg)
    data, n_steps, freq = SCER_COLS[col]
    assert cfg.cell == f"scer_iclr26.main.{row}.{col}"
    assert cfg.paths.run_dir == f"/logs/{cfg.cell}/trial0/seed1"
    assert (cfg.paper.metric, cfg.paper.reported) == ("test/test/worst_group_acc", None)
    assert cfg.method.name == row and cfg.data.name == data
    assert (cfg.model.arch, cfg.model.pretrained) == ("resnet50", "resnet50.tv_in1k")
    assert cfg.model.trainable is (row != "dfr")  # dfr: the ERM run's featurizer, frozen
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "32-true"
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (n_steps, -1)
    assert (cfg.data.val, cfg.data.train_augment) == (True, False)
    balanced = row in ("resample", "groupdro", "scer")  # SubpopBench / the SCER code's draws
    assert cfg.data.sampler == ("group_balanced" if balanced else None)
    if row in TWO_ROUNDS_OR_POST_HOC:
        assert cfg.selection is None
    else:
        assert OmegaConf.to_container(cfg.selection) == {
            "monitor": "val/worst_group_acc",
            "mode": "max",
            "every_n_steps": freq,
            "patience": 5,
        }
        assert cfg.method.optimizer._target_ == "torch.optim.SGD"
        assert (cfg.method.optimizer.momentum, cfg.method.scheduler) == (0.9, None)
    assert num_trials(cfg.search) == N_TRIALS
    rule = {"metric": "dfr/tune_worst_group_acc" if row == "dfr" else "val/worst_group_acc"}
    assert OmegaConf.to_container(cfg.select) == {**rule, "mode": "max"}


# SubpopBench hparams_registry.py, text: lr 10^U(-5.5,-4), wd 10^U(-6,-3), batch int(2^U(3,5.5)),
# last_layer_dropout {0, 0.1, 0.5} (0 = BERT's hidden_dropout_prob: null here).
TEXT_SHARED = {
    "method.optimizer.lr": {"low": 10**-5.5, "high": 1e-4, "log": True},
    "method.optimizer.weight_decay": {"low": 1e-6, "high": 1e-3, "log": True},
    "data.batch_size": {"low": 8, "high": 2**5.5, "log": True, "int": True},
    "model.dropout": [None, 0.1, 0.5],
}


@pytest.mark.parametrize(
    ("name", "row", "col"),
    [
        pytest.param(
            *c,
            id=c[0],
            marks=()
            if c[1] in ("scer", "dfr", "jtt") and c[2] == "civilcomments"
            else pytest.mark.slow,
        )
        for c in SCER_TEXT_CELLS
    ],
)
def test_scer_text_cell_composes_with_bert_and_subpopbench_text_optimisation(
    name: str, row: str, col: str
) -> None:
    cfg = compose_train([f"experiment={name}", "trial=0", "paths.log_dir=/logs"])
    validate_config(cfg)
    data, n_steps, freq = SCER_COLS[col]
    assert cfg.cell == f"scer_iclr26.main.{row}.{col}" and cfg.method.name == row
    assert (cfg.data.name, cfg.data.max_length) == (data, TEXT_COLS[col])
    assert (cfg.model.name, cfg.model.pretrained) == ("bert_base", "bert-base-uncased")
    assert cfg.model.trainable is (row != "dfr")
    assert "train_augment" not in cfg.data  # an image-only key
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (n_steps, -1)
    assert (
        cfg.selection is None
        if row in TWO_ROUNDS_OR_POST_HOC
        else cfg.selection.every_n_steps == freq
    )
    opt = cfg.method.optimizer  # method/optim=bert_adamw replaced SGD: no momentum left over
    assert (opt._target_, opt.lr, opt.weight_decay, opt.eps) == (
        "reprolab.optim.param_groups.adamw",
        1e-5,
        1e-4,
        1e-8,
    )
    assert "momentum" not in opt and cfg.method.grad_clip == 1.0
    assert cfg.method.scheduler._target_ == "reprolab.optim.param_groups.linear_lr"
    assert cfg.method.scheduler.warmup_steps == 0
    space = read_search(cfg.search)["space"]
    if row == "dfr":
        assert list(space) == ["method.source.run_dir"]
    else:
        assert space == {**TEXT_SHARED, **OWN[row]}


@pytest.mark.parametrize("row", SCER_ROWS)
def test_scer_row_searches_subpopbench_ranges_with_16_trials(row: str) -> None:
    cfg = _composed(f"{row}_waterbirds", 0)
    search = read_search(cfg.search)
    assert search["n"] == N_TRIALS and num_trials(cfg.search) == N_TRIALS
    if row == "dfr":  # a grid over the 16 ERM trials it retrains
        assert search["mode"] == "grid" and list(search["space"]) == ["method.source.run_dir"]
        return
    assert (search["mode"], search["seed"]) == ("random", 0)
    assert search["space"] == {**SHARED, **OWN[row]}
    for k in range(N_TRIALS):  # the draws lie in the ranges; batch sizes are SubpopBench's 64..107
        values = trial_overrides(cfg.search, k)
        assert 1e-4 <= values["method.optimizer.lr"] < 1e-2
        assert 1e-6 <= values["method.optimizer.weight_decay"] < 1e-3
        assert isinstance(values["data.batch_size"], int) and 64 <= values["data.batch_size"] <= 107


def test_a_trial_draws_the_same_shared_values_for_every_row_and_column() -> None:
    """As SubpopBench's seed_hash(hparams_seed, name): trial k's lr / wd / batch do not depend on
    the method or the dataset, and the method's own keys add to them."""
    shared = [
        {k: trial_overrides(_composed(f"{r}_{c}", 0).search, 7)[k] for k in SHARED}
        for r in ("erm", "scer", "irm")
        for c in ("waterbirds", "cmnist")
    ]
    assert all(s == shared[0] for s in shared)
    values = apply_trial(compose_train(["experiment=scer_celeba", "trial=7", "paths.log_dir=/l"]))
    assert set(values) == set(SHARED) | set(OWN["scer"])
    assert 1e-3 <= values["method.eta"] < 1e-1 and 0.0 <= values["method.lambda_core"] < 1.0
    draws = [trial_overrides(_composed("irm_waterbirds", 0).search, k) for k in range(N_TRIALS)]
    assert all(isinstance(d["method.anneal_iters"], int) for d in draws)
    assert len({d["method.optimizer.lr"] for d in draws}) == N_TRIALS  # 16 different draws
    assert math.isclose(_space("jtt_cmnist")["method.jtt_lambda"]["high"], 10**2.5)


@pytest.mark.parametrize(("trial", "seed"), [(0, 1), (9, 2), (15, 3)])
def test_dfr_trial_retrains_the_erm_run_of_the_same_column_trial_and_seed(
    trial: int, seed: int
) -> None:
    dfr = compose_train(
        ["experiment=dfr_metashift", f"trial={trial}", f"seed={seed}", "paths.log_dir=/logs"]
    )
    (erm_dir,) = apply_trial(dfr).values()
    assert erm_dir == _composed("erm_metashift", trial, seed).paths.run_dir
    assert dfr.method.source.run_dir == erm_dir
    assert erm_dir == f"/logs/scer_iclr26.main.erm.metashift/trial{trial}/seed{seed}"
    assert dfr.method.post_hoc is True and dfr.selection is None


@pytest.mark.parametrize(("name", "row", "col"), _one_column_fast(ASGDRO_CELLS, "waterbirds_sil"))
def test_asgdro_cell_composes_with_the_readme_recipe(name: str, row: str, col: str) -> None:
    cfg = compose_train([f"experiment={name}", "paths.log_dir=/logs"])
    validate_config(cfg)
    data, lr, wd, epochs, epoch_steps, rho, adjustment = ASGDRO_COLS[col]
    assert cfg.cell == f"asgdro_cvpr25.main.{row}.{col}"
    assert cfg.paths.run_dir == f"/logs/{cfg.cell}/seed1"
    assert cfg.method.name == row and cfg.data.name == data
    assert (cfg.model.pretrained, cfg.model.trainable) == ("resnet50.tv_in1k", True)
    assert (cfg.data.batch_size, cfg.data.val, cfg.data.train_augment) == (16, True, False)
    assert (cfg.method.optimizer.lr, cfg.method.optimizer.weight_decay) == (lr, wd)
    assert (cfg.method.optimizer.momentum, cfg.method.scheduler) == (0.9, None)
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps) == (epochs, -1)
    assert cfg.search is None and cfg.select is None and cfg.get("trial") is None
    if row == "jtt":
        assert cfg.selection is None
    else:  # the epoch with the best validation worst-group accuracy, every epoch trained
        assert OmegaConf.to_container(cfg.selection) == {
            "monitor": "val/worst_group_acc",
            "mode": "max",
            "every_n_steps": epoch_steps,
            "patience": None,
        }
    if row in ("asgdro", "groupdro"):
        assert (cfg.method.eta, cfg.method.adjustment, cfg.method.update_absent) == (
            0.01,
            adjustment,
            True,
        )
        assert cfg.data.sampler == "group_balanced"
    else:
        assert cfg.data.sampler is None
    if row in ("asgdro", "asam"):  # the README's rho, davda54's adaptive SAM
        assert (cfg.method.rho, cfg.method.asam_eta, cfg.method.adaptive_params) == (
            rho,
            0.0,
            "all",
        )


def test_asgdro_waterbirds_holds_the_readme_command() -> None:
    """`--lr 1e-5 --batch_size 16 --weight_decay 1.0 --n_epochs 300 --generalization_adjustment 2
    --reweight_groups --rho 0.05 --asgdro --save_best` (robust_step_size: the default 0.01)."""
    cfg = _composed("asgdro_waterbirds_sil")
    assert cfg.method._target_ == "reprolab.methods.group.asgdro.ASGDRO"
    assert (cfg.method.optimizer.lr, cfg.method.optimizer.weight_decay) == (1e-5, 1.0)
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.data.sampler) == (
        16,
        300,
        "group_balanced",
    )
    assert (cfg.method.rho, cfg.method.eta, cfg.method.adjustment) == (0.05, 0.01, 2.0)
    assert cfg.selection.monitor == "val/worst_group_acc" and cfg.selection.every_n_steps == 299


@pytest.mark.parametrize(
    ("table", "rows", "cols", "trials"),
    [
        ("scer_main", SCER_ROWS, list(SCER_COLS), N_TRIALS),  # 3168 jobs
        ("asgdro_main", ASGDRO_ROWS, list(ASGDRO_COLS), 0),
    ],
)
def test_table_validates_with_its_job_count(table: str, rows, cols, trials: int) -> None:
    spec = validate_table(table, CONFIG_DIR)  # raises, listing every error, on an invalid table
    assert (spec.rows, spec.cols, spec.seeds) == (rows, cols, [1, 2, 3])
    assert spec.metric == "test/test/worst_group_acc" and spec.extra_columns == ["test/test/acc"]
    assert spec.reported == {} and spec.warnings == []
    assert spec.n_cells == len(rows) * len(cols)
    assert spec.trials == list(range(trials))
    assert spec.n_jobs == len(rows) * len(cols) * 3 * max(trials, 1)  # 3168 and 108
    if trials:
        assert {r["metric"] for r in spec.select.values()} == {
            "val/worst_group_acc",
            "dfr/tune_worst_group_acc",
        }


def test_scer_table_composes_for_a_slurm_launch() -> None:
    """`python train.py table=scer_main hydra/launcher=slurm --cfg hydra` (what `make table
    T=scer_main LAUNCHER=slurm` composes), and one job of the array as a worker composes it."""
    out = subprocess.run(
        [sys.executable, "train.py", "table=scer_main", "hydra/launcher=slurm", "--cfg", "hydra"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    hydra_cfg = OmegaConf.create(out.stdout)["hydra"]
    assert hydra_cfg.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert hydra_cfg.mode == "MULTIRUN" and hydra_cfg.launcher.gpus_per_node == 1
    params = hydra_cfg.sweeper.params
    assert (params.seed, params.trial) == ("1,2,3", "range(0,16)")
    swept = params.experiment.split(",")
    assert len(swept) == 66 and swept[-6:] == [f"dfr_{c}" for c in SCER_COLS]  # dfr after erm
    job = compose_train(
        ["table=scer_main", "hydra/launcher=slurm", "experiment=scer_celeba", "seed=3", "trial=15"]
    )
    validate_config(job)  # validates the table too (table_name is set)
    assert job.table_name == "scer_main" and job.paths.run_dir.endswith(
        "scer_iclr26.main.scer.celeba/trial15/seed3"
    )
