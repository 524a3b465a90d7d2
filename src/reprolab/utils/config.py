"""Composing and validating configs outside Hydra's runtime (tests, scripts)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from reprolab.errors import ConfigValueError

PROJECT_ROOT = Path(__file__).resolve().parents[3]
CONFIG_DIR = PROJECT_ROOT / "configs"


def _method_class(method_target: str) -> type:
    import hydra

    cls = hydra.utils.get_class(method_target)
    if not hasattr(cls, "metric_keys"):
        raise TypeError(f"{method_target} is not a reprolab Method (no metric_keys()).")
    return cls


def method_metric_keys(method_target: str) -> tuple[str, ...]:
    """The metric keys (fnmatch patterns, e.g. `test/*/acc`) the method class at `method_target`
    declares it logs (`Method.metric_keys()`), read without building anything."""
    return tuple(_method_class(method_target).metric_keys())


def method_primary_metric(method_target: str) -> str:
    """The method's headline metric (`Method.primary_metric`: test/acc, test/elbo, ...)."""
    return str(_method_class(method_target).primary_metric)


def metric_is_logged(method_target: str, metric: str) -> bool:
    """Whether the method class at `method_target` declares a metric key matching `metric`."""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(str(metric), p) for p in method_metric_keys(method_target))


def choices(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def unknown_choice(group: str, name: str, config_dir: Path = CONFIG_DIR) -> str:
    from reprolab.utils.naming import unknown_name

    return unknown_name(group, name, choices(group, config_dir))


def compose_train(overrides: list[str] | None = None, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose `configs/train.yaml` with overrides, as `python train.py <overrides>` would."""
    from hydra import compose, initialize_config_dir

    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    choices_ = cfg.hydra.runtime.choices
    OmegaConf.set_struct(cfg, False)
    cfg.experiment_name = choices_.get("experiment")
    cfg.table_name = choices_.get("table")
    del cfg["hydra"]
    return cfg


def validate_config(cfg: DictConfig) -> None:
    """Checks that run before any model is built; errors say what to change.

    A run without `paper.metric` (a plain `python train.py model=... data=... method=...`) gets
    its method's headline metric.
    """
    target = str(cfg.method._target_)
    if cfg.paper.get("metric") is None:
        cfg.paper.metric = method_primary_metric(target)
    metric = str(cfg.paper.metric)
    if not metric_is_logged(target, metric):
        keys = ", ".join(method_metric_keys(target))
        raise ConfigValueError(
            f"paper.metric '{metric}' is not a key method={cfg.method.name} logs; it logs: {keys}."
        )
    post_hoc = bool(cfg.method.get("post_hoc", False))
    if cfg.train is None:
        cfg.train = not post_hoc
    elif cfg.train and post_hoc:
        raise ConfigValueError(
            f"method={cfg.method.name} is post-hoc (nothing to train); set train=false."
        )
    from reprolab.selection import check_selection

    check_selection(cfg)
    table = cfg.get("table_name") or (cfg.get("table") or {}).get("name")
    if table:
        from reprolab.tables.schema import validate_table

        validate_table(table, CONFIG_DIR)
