"""One run: seed, data, backbone, method, trainer; fit, test, record.

`run(cfg)` takes a composed config and is callable from tests without Hydra's runtime; the root
`train.py` is the Hydra entry point that calls it.
"""

from __future__ import annotations

import json
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

from reprolab.callbacks import Throughput
from reprolab.utils.config import validate_config
from reprolab.utils.run_record import (
    FAILED_FILE,
    METRICS_FILE,
    ROUNDS_FILE,
    git_info,
    now,
    read_record,
    write_failure,
    write_json_atomic,
)

log = logging.getLogger("reprolab")


def resolve_ckpt_path(cfg: DictConfig, ckpt_dir: Path | None = None) -> str | None:
    """`auto` → `<ckpt_dir>/last.ckpt` when it exists (a restart is a resume)."""
    if cfg.ckpt_path in (None, "null", "none"):
        return None
    if cfg.ckpt_path == "auto":
        last = (ckpt_dir or Path(cfg.paths.run_dir) / "checkpoints") / "last.ckpt"
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


def _build_callbacks(cfg: DictConfig, ckpt_dir: Path | None = None) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [
        hydra.utils.instantiate(c)
        for c in (cfg.get("callbacks") or {}).values()
        if c is not None and "_target_" in c
    ]
    if ckpt_dir is not None:  # a round of an outer loop keeps its own checkpoints
        for c in callbacks:
            if isinstance(c, ModelCheckpoint):
                c.dirpath = str(ckpt_dir)
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
        model = hydra.utils.instantiate(cfg.model) if cfg.get("model") else None
        method = hydra.utils.instantiate(cfg.method, _convert_="all")(
            model=model, info=datamodule.info
        )
        datamodule.configure(**method.data_requirements())
        loggers = _build_loggers(cfg)
        wandb_loggers = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
        wandb_used = bool(wandb_loggers)
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        throughput = Throughput()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        metrics, trainer, rounds = _fit_and_test(cfg, method, datamodule, loggers, throughput)
        metrics.update(method.extra_metrics())
        metrics.update(method.param_counts())
        metrics.update(throughput.metrics(metrics.get("train/images")))
        record.update(
            status="finished",
            metrics=dict(sorted(metrics.items())),
            wall_time_s=round(time.time() - start, 2),
            peak_memory_mb=_peak_memory_mb(),
            wandb_id=_wandb_id(run_dir),
            finished_at=now(),
            global_step=int(trainer.global_step),
            task=datamodule.info.kind,
        )
        if rounds is not None:
            record["rounds"] = rounds
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


def _trainer(cfg: DictConfig, loggers: list, callbacks: list) -> L.Trainer:
    return hydra.utils.instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(cfg.paths.run_dir),
        enable_progress_bar=_interactive() and cfg.get("progress_bar", True),
    )


def _test_metrics(trainer: L.Trainer, method: L.LightningModule, datamodule: Any) -> dict:
    results = trainer.test(method, datamodule=datamodule, verbose=False)
    metrics: dict[str, float] = {}
    for r in results:
        metrics.update({k: float(v) for k, v in r.items()})
    return metrics


def _fit_and_test(
    cfg: DictConfig, method: Any, datamodule: Any, loggers: list, throughput: Throughput
) -> tuple[dict[str, float], L.Trainer, list[dict[str, Any]] | None]:
    """Fit (unless post-hoc) and test; with rounds, once per round, resuming where a run died.

    One round: checkpoints in `<run_dir>/checkpoints`. Several: round r keeps its own in
    `<run_dir>/checkpoints/round<r>`, and `<run_dir>/rounds.json` holds, per finished round, its
    test metrics and the method's `round_state()`; a restarted run restores the last finished
    round (state and weights) and continues with the next, or inside the round it died in.
    """
    run_dir = Path(cfg.paths.run_dir)
    if method.num_rounds == 1:
        trainer = _trainer(cfg, loggers, [*_build_callbacks(cfg), throughput])
        if cfg.train:
            ckpt = resolve_ckpt_path(cfg)
            if ckpt:
                log.info("Resuming from %s", ckpt)
            trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt)
        return _test_metrics(trainer, method, datamodule), trainer, None

    rounds_file = run_dir / ROUNDS_FILE
    fresh = cfg.ckpt_path in (None, "null", "none")
    done: list[dict[str, Any]] = []
    if rounds_file.is_file() and not fresh:
        done = json.loads(rounds_file.read_text())["rounds"]
    restore: list[L.Callback] = []
    if done:
        last = len(done) - 1
        method.load_round_state(done[-1].get("state", {}), datamodule)
        ckpt = run_dir / "checkpoints" / f"round{last}" / "last.ckpt"
        if cfg.train and ckpt.is_file():
            restore = [_RestoreWeights(ckpt)]
        log.info("Resuming after round %d of %d (%s)", last, method.num_rounds, rounds_file)
    trainer = None
    metrics: dict[str, float] = {}
    for r in range(len(done), method.num_rounds):
        ckpt_dir = run_dir / "checkpoints" / f"round{r}"
        method.start_round(r, datamodule)
        trainer = _trainer(cfg, loggers, [*_build_callbacks(cfg, ckpt_dir), throughput, *restore])
        restore = []
        if cfg.train:
            ckpt = resolve_ckpt_path(cfg, ckpt_dir) if not fresh else None
            if ckpt:
                log.info("Round %d: resuming from %s", r, ckpt)
            trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt)
        metrics = _test_metrics(trainer, method, datamodule)
        done.append(
            {"round": r, "metrics": dict(sorted(metrics.items())), "state": method.round_state()}
        )
        write_json_atomic(rounds_file, {"rounds": done})
        log.info("Round %d of %d done: %s", r, method.num_rounds, _headline(metrics, cfg))
    if trainer is None:  # every round had finished before this start: test the restored method
        trainer = _trainer(cfg, loggers, [*_build_callbacks(cfg), throughput, *restore])
        metrics = _test_metrics(trainer, method, datamodule)
    return metrics, trainer, done


class _RestoreWeights(L.Callback):
    """Loads a finished round's weights (not its loop state) once the method is set up.

    At `on_fit_start` / `on_test_start` the method's `setup` has built what it builds lazily (a
    linear probe's head); the copy is in place, so the optimizer's parameter references hold.
    """

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt
        self.done = False

    def _load(self, pl_module: L.LightningModule) -> None:
        if self.done:
            return
        state = torch.load(self.ckpt, map_location="cpu", weights_only=False)
        pl_module.on_load_checkpoint(state)
        pl_module.load_state_dict(state["state_dict"])
        self.done = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._load(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._load(pl_module)


def _headline(metrics: dict[str, float], cfg: DictConfig) -> str:
    key = str(cfg.paper.metric)
    return f"{key}={metrics[key]:.4g}" if key in metrics else f"{len(metrics)} metrics"


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
