"""Every experiment and table config composes, and bad configs fail with a useful message."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reprolab.utils.config import CONFIG_DIR, compose_train, validate_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
TABLES = sorted(p.stem for p in (CONFIG_DIR / "table").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name: str, tmp_path: Path) -> None:
    cfg = compose_train([f"experiment={name}", f"paths.log_dir={tmp_path}"])
    assert cfg.experiment_name == name
    OmegaConf.resolve(cfg)  # every interpolation resolves
    validate_config(cfg)
    assert cfg.paper.id != "dev", f"{name}: experiment must set its paper block"
    assert str(tmp_path) in cfg.paths.run_dir and cfg.cell in cfg.paths.run_dir


@pytest.mark.parametrize("name", TABLES)
def test_table_composes(name: str, tmp_path: Path) -> None:
    cfg = compose_train([f"table={name}", f"paths.log_dir={tmp_path}"])
    validate_config(cfg)


def test_default_config_is_the_offline_demo() -> None:
    cfg = compose_train([])
    assert cfg.model.name == "tiny_clip" and cfg.data.name == "shapes"
    assert cfg.trainer.accelerator == "cpu"


def test_bad_metric_key_is_rejected() -> None:
    cfg = compose_train(["paper.metric=test/accuracy"])
    with pytest.raises(ValueError, match="not a key any method logs"):
        validate_config(cfg)


def test_post_hoc_method_refuses_training() -> None:
    cfg = compose_train(["method=zeroshot", "train=true"])
    with pytest.raises(ValueError, match="post-hoc"):
        validate_config(cfg)
