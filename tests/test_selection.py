"""Checkpoint selection on the validation split (`selection:`, reprolab.selection).

A linear probe on the synthetic shapes: validation every 2 steps, the best validation checkpoint is
the one tested (its test metrics equal an independent test of that checkpoint file), early stopping
ends a run whose monitor stops improving, and bad rules fail in one line before anything is built.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from reprolab.errors import ConfigValueError
from reprolab.selection import read_selection
from reprolab.train import run
from reprolab.utils.config import compose_train, validate_config

BASE = [
    "model=tiny_clip_random",
    "data=shapes",
    "method=linear_probe",
    "threads=1",
    "data.num_shots=4",
    "data.batch_size=4",
    "data.val=true",
    "data.eval_batch_size=64",
    "+data.test_sets=[test]",
    "+trainer.limit_test_batches=2",
    "+trainer.limit_val_batches=2",
    "logger=csv",
    "progress_bar=false",
]


def _cfg(tmp_path: Path, *extra: str):
    return compose_train([*BASE, f"paths.log_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def selected(tmp_path_factory) -> tuple[dict, object]:
    tmp = tmp_path_factory.mktemp("selection")
    cfg = _cfg(
        tmp,
        "+trainer.max_steps=12",
        "method.optimizer.lr=0.05",
        "selection={monitor: val/acc, mode: max, every_n_steps: 2, patience: null}",
    )
    return run(cfg), cfg


def test_the_best_validation_checkpoint_is_the_one_tested(selected) -> None:
    record, cfg = selected
    sel = record["selection"]
    checks = sel["checks"]
    assert [c["step"] for c in checks] == [2, 4, 6, 8, 10, 12]
    values = [c["value"] for c in checks]
    first_best = values.index(max(values))  # ties: the earliest
    assert sel["best_step"] == checks[first_best]["step"] and sel["best_value"] == max(values)
    assert sel["stopped_early"] is False and sel["monitor"] == "val/acc"
    # the chosen checkpoint's validation metrics are the run's val/* (what a search's select reads)
    assert record["metrics"]["val/acc"] == sel["best_value"]
    assert {"val/ece", "val/nll"} <= set(record["metrics"])
    (best,) = (Path(cfg.paths.run_dir) / "checkpoints" / "best").glob("*.ckpt")
    state = torch.load(best, map_location="cpu", weights_only=False)
    assert state["global_step"] == sel["best_step"]
    # an independent test of that checkpoint file gives the record's test metrics
    dm = hydra.utils.instantiate(cfg.data)
    method = hydra.utils.instantiate(cfg.method, _convert_="all")(
        model=hydra.utils.instantiate(cfg.model), info=dm.info
    )
    dm.configure(**method.data_requirements())
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, limit_test_batches=2
    )
    (res,) = trainer.test(method, datamodule=dm, ckpt_path=str(best), verbose=False)
    assert res["test/acc"] == pytest.approx(record["metrics"]["test/acc"], abs=1e-6)


def test_early_stopping_ends_a_run_that_stops_improving(tmp_path: Path) -> None:
    """lr 0: the monitor never improves after the first check; patience 1 stops at the second."""
    cfg = _cfg(
        tmp_path,
        "+trainer.max_steps=20",
        "method.optimizer.lr=0.0",
        "selection={monitor: val/acc, mode: max, every_n_steps: 2, patience: 1}",
    )
    record = run(cfg)
    sel = record["selection"]
    assert [c["step"] for c in sel["checks"]] == [2, 4]
    assert sel["stopped_early"] is True and sel["best_step"] == 2
    assert record["global_step"] == 4


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("{monitor: test/acc, every_n_steps: 2}", "must be a validation key"),
        ("{monitor: val/acc, mode: best, every_n_steps: 2}", "must be max or min"),
        ("{monitor: val/acc, every_n_steps: 0}", "every_n_steps=0 must be an integer >= 1"),
        ("{monitor: val/acc, every_n_steps: 2, patience: 0}", "patience=0 must be"),
        ("{monitor: val/acc, every_n_steps: 2, period: 3}", "selection.period is not an option"),
        ("{monitor: val/nope, every_n_steps: 2}", "is not a key method=linear_probe logs"),
    ],
)
def test_bad_rules_fail_in_one_line(tmp_path: Path, rule: str, message: str) -> None:
    cfg = _cfg(tmp_path, f"selection={rule}")
    with pytest.raises(ConfigValueError, match=message) as err:
        validate_config(cfg)
    assert "\n" not in str(err.value)


def test_selection_needs_a_validation_split_and_training(tmp_path: Path) -> None:
    rule = "selection={monitor: val/acc, every_n_steps: 2}"
    with pytest.raises(ConfigValueError, match="set data.val=true"):
        validate_config(_cfg(tmp_path, rule, "data.val=false"))
    with pytest.raises(ConfigValueError, match="does not train"):
        validate_config(_cfg(tmp_path, rule, "method=zeroshot"))
    assert read_selection(OmegaConf.create({"selection": None})) is None
