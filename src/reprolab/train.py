"""One run: seed, data, backbone, method, trainer; fit, test, record.

`run(cfg)` takes a composed config and is callable from tests without Hydra's runtime; the root
`train.py` is the Hydra entry point that calls it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from reprolab.utils.config import validate_config
from reprolab.utils.run_record import (
    FAILED_FILE,
    METRICS_FILE,
    git_info,
    now,
    read_record,
    write_failure,
    write_json_atomic,
)

log = logging.getLogger("reprolab")


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`auto` → `<run_dir>/checkpoints/last.ckpt` when it exists (a restart is a resume)."""
    if cfg.ckpt_path in (None, "null", "none"):
        return None
    if cfg.ckpt_path == "auto":
        last = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist (use ckpt_path=auto or null).")
    return str(path)


def _build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for key, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is not None and "_target_" in lcfg:
            loggers.append(hydra.utils.instantiate(lcfg))
            log.debug("logger %s", key)
    return loggers


def _build_callbacks(cfg: DictConfig) -> list:
    callbacks = [
        hydra.utils.instantiate(c)
        for c in (cfg.get("callbacks") or {}).values()
        if c is not None and "_target_" in c
    ]
    if _interactive() and cfg.get("progress_bar", True):
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    return callbacks


def _interactive() -> bool:
    return sys.stdout.isatty() and "SLURM_JOB_ID" not in os.environ


def _base_record(cfg: DictConfig) -> dict[str, Any]:
    return {
        "cell": cfg.cell,
        "seed": int(cfg.seed),
        "experiment": cfg.get("experiment_name"),
        "paper": OmegaConf.to_container(cfg.paper, resolve=True),
        "method": cfg.method.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "tags": list(cfg.get("tags") or []),
        "git": git_info(),
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one table cell for one seed and return its record (also written to metrics.json)."""
    run_dir = Path(cfg.paths.run_dir)
    done = read_record(run_dir)
    if done is not None and cfg.get("skip_if_done", True):
        log.info(
            "%s/seed%s already finished (%s); skipping (skip_if_done=false reruns it)",
            cfg.cell,
            cfg.seed,
            run_dir,
        )
        _print_summary(done, run_dir)
        return done
    validate_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=False)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    record = _base_record(cfg)
    start = time.time()
    wandb_used = False
    try:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        datamodule = _instantiate_data(cfg)  # fails fast if data is missing
        backbone = hydra.utils.instantiate(cfg.model)
        preprocess = backbone.preprocess
        method_cls = hydra.utils.get_class(cfg.method._target_)
        if hasattr(method_cls, "input_preprocess"):  # e.g. BAR feeds 194 px images into a frame
            preprocess = method_cls.input_preprocess(preprocess, cfg.method)
        datamodule.set_preprocess(preprocess)
        method = hydra.utils.instantiate(cfg.method, _convert_="all")(
            backbone=backbone,
            classnames=datamodule.classnames,
            templates=datamodule.templates,
            test_sets=datamodule.test_sets,
            test_index_groups=datamodule.test_index_groups,
            num_groups=datamodule.num_groups,
        )
        loggers = _build_loggers(cfg)
        wandb_loggers = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
        wandb_used = bool(wandb_loggers)
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer,
            logger=loggers or False,
            callbacks=_build_callbacks(cfg),
            default_root_dir=str(run_dir),
            enable_progress_bar=_interactive() and cfg.get("progress_bar", True),
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if cfg.train:
            ckpt = resolve_ckpt_path(cfg)
            if ckpt:
                log.info("Resuming from %s", ckpt)
            trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt)
        results = trainer.test(method, datamodule=datamodule, verbose=False)
        metrics: dict[str, float] = {}
        for r in results:
            metrics.update({k: float(v) for k, v in r.items()})
        metrics.update(getattr(method, "extra_metrics", lambda: {})())
        record.update(
            status="finished",
            metrics=dict(sorted(metrics.items())),
            wall_time_s=round(time.time() - start, 2),
            peak_memory_mb=_peak_memory_mb(),
            wandb_id=_wandb_id(run_dir),
            finished_at=now(),
            global_step=int(trainer.global_step),
        )
        write_json_atomic(run_dir / METRICS_FILE, record)
        (run_dir / FAILED_FILE).unlink(missing_ok=True)
        for lg in wandb_loggers:
            lg.experiment.summary.update(metrics)
        _print_summary(record, run_dir)
        return record
    except BaseException as exc:
        write_failure(run_dir, record, exc)
        raise
    finally:
        if wandb_used:
            import wandb

            wandb.finish()


def _instantiate_data(cfg: DictConfig):
    """Build the data module; a missing dataset surfaces as itself, not as Hydra's wrapper."""
    from hydra.errors import InstantiationException

    from reprolab.data.spec import DataNotFoundError

    try:
        return hydra.utils.instantiate(cfg.data)
    except InstantiationException as e:
        if isinstance(e.__cause__, DataNotFoundError):
            raise e.__cause__ from None
        raise


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _wandb_id(run_dir: Path) -> str | None:
    f = run_dir / "wandb_id.txt"
    return f.read_text().strip() if f.is_file() else None


def _print_summary(record: dict[str, Any], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{record['cell']} · seed {record['seed']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in record["metrics"].items():
        table.add_row(k, f"{v:.4f}" if "ece" in k else f"{v:.2f}")
    Console(stderr=False).print(table)
    log.info("Run record: %s", run_dir / METRICS_FILE)
