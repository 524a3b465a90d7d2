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

from reprolab.callbacks import Throughput
from reprolab.errors import ConfigValueError
from reprolab.runguard import (
    FiniteLoss,
    NoTrainingSteps,
    RunDirError,
    RunLock,
    RunRefused,
    SignalGuard,
    check_identity,
    resolve_checkpoint,
    set_aside_checkpoints,
)
from reprolab.search import apply_trial, overrides_of
from reprolab.selection import (
    best_checkpoint,
    read_selection,
    selection_callbacks,
    selection_record,
    trainer_overrides,
)
from reprolab.utils.checks import on_config_change_policy
from reprolab.utils.config import validate_config
from reprolab.utils.run_record import (
    FAILED_FILE,
    FINGERPRINT_FILE,
    METRICS_FILE,
    ROUNDS_FILE,
    fingerprint_config,
    fingerprint_of,
    git_info,
    now,
    read_or_set_aside,
    read_record,
    start_record,
    write_failure,
    write_json_atomic,
)

log = logging.getLogger("reprolab")


def _fresh(cfg: DictConfig) -> bool:
    return cfg.ckpt_path in (None, "null", "none")


def resolve_ckpt_path(cfg: DictConfig, ckpt_dir: Path | None = None) -> str | None:
    """`auto` → `<ckpt_dir>/last.ckpt` when torch can read it (a restart is a resume); a corrupt
    one is moved aside and the newest readable checkpoint resumed, or none (see
    `reprolab.runguard.resolve_checkpoint`)."""
    if _fresh(cfg):
        return None
    if cfg.ckpt_path == "auto":
        return resolve_checkpoint(ckpt_dir or Path(cfg.paths.run_dir) / "checkpoints")
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


def _base_record(cfg: DictConfig, fingerprint: str) -> dict[str, Any]:
    trial = {}
    if cfg.get("trial") is not None:  # a trial of a hyperparameter search: which, with what values
        trial = {"trial": int(cfg.trial), "trial_overrides": overrides_of(cfg)}
    return {
        "fingerprint": fingerprint,
        "cell": cfg.cell,
        "seed": int(cfg.seed),
        **trial,
        "experiment": cfg.get("experiment_name"),
        "paper": OmegaConf.to_container(cfg.paper, resolve=True),
        "method": cfg.method.name,
        "model": cfg.model.name if cfg.get("model") else None,
        "data": cfg.data.name,
        "tags": list(cfg.get("tags") or []),
        "git": git_info(),
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one table cell for one seed and return its record (also written to metrics.json).

    One process per run dir (`<run_dir>/.lock`); a run of another config there is refused or,
    with `on_config_change=replace`, moved aside; a finished run of this config is returned as it
    is (`skip_if_done`). Whatever fails once the lock is held leaves `failed.json` (cell, seed,
    fingerprint, one-line error, traceback) and is re-raised; a signal ends the run with
    `RunInterrupted` after a checkpoint (see `reprolab.runguard`).

    With `trial` set, the trial's values of `cfg.search` are written into `cfg` first (in place),
    before the run dir, the record and the fingerprint are read (`reprolab.search.apply_trial`).
    """
    apply_trial(cfg)
    run_dir = Path(cfg.paths.run_dir)
    record = start_record(cfg)  # what a failed.json can say if the config itself is broken
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"cannot create the run dir {run_dir} ({e.strerror or e}); set paths.log_dir "
            "(or LOG_ROOT) to a writable directory."
        ) from e
    lock = RunLock(run_dir).acquire()  # RunLocked (one line naming the holder) when taken
    guard = SignalGuard()
    wandb_used: list[bool] = []
    try:
        guard.install()
        return _run_locked(cfg, run_dir, record, guard, wandb_used)
    except RunRefused:
        raise  # nothing was started: the run dir stays as it was
    except BaseException as exc:
        try:
            write_failure(run_dir, record, exc)
        except Exception as e:  # noqa: BLE001 - the original error matters more
            log.error("Could not write %s: %s", run_dir / FAILED_FILE, e)
        raise
    finally:
        guard.restore()
        lock.release()
        if wandb_used:
            import wandb

            wandb.finish()


def _run_locked(
    cfg: DictConfig,
    run_dir: Path,
    record: dict[str, Any],
    guard: SignalGuard,
    wandb_used: list[bool],
) -> dict[str, Any]:
    """`run` once the lock is held; `record` is filled in place (failed.json is written from it)."""
    policy = on_config_change_policy(cfg)  # also in check_values; run() is called from Python too
    validate_config(cfg)  # fills train and paper.metric: part of the fingerprint
    container = fingerprint_config(cfg)
    fingerprint = fingerprint_of(container)
    record.clear()
    record.update(_base_record(cfg, fingerprint))
    read_or_set_aside(run_dir / FAILED_FILE)  # a damaged one is moved aside, with a warning
    done = read_record(run_dir)
    identity = check_identity(
        run_dir, fingerprint, container, done, policy=policy, resume=cfg.ckpt_path == "auto"
    )
    if identity.replaced:
        done = None
    if done is not None and identity.skip and cfg.get("skip_if_done", True):
        log.info(
            "%s/seed%s already finished (%s); skipping (skip_if_done=false reruns it)",
            cfg.cell,
            cfg.seed,
            run_dir,
        )
        _print_summary(done, run_dir)
        return done
    write_json_atomic(run_dir / FINGERPRINT_FILE, {"fingerprint": fingerprint, "config": container})
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=False)
    if _fresh(cfg) and cfg.train:
        set_aside_checkpoints(run_dir / "checkpoints")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    start = time.time()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = _instantiate_data(cfg)  # fails fast if data is missing
    model = hydra.utils.instantiate(cfg.model) if cfg.get("model") else None
    method = hydra.utils.instantiate(cfg.method, _convert_="all")(model=model, info=datamodule.info)
    datamodule.configure(**method.data_requirements())
    loggers = _build_loggers(cfg)
    wandb_loggers = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
    if wandb_loggers:
        wandb_used.append(True)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    throughput = Throughput()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    metrics, trainer, rounds = _fit_and_test(cfg, method, datamodule, loggers, throughput, guard)
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
    if getattr(method, "selection_record", None) is not None:
        record["selection"] = method.selection_record
    write_json_atomic(run_dir / METRICS_FILE, record)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    for lg in wandb_loggers:
        lg.experiment.summary.update(metrics)
    _print_summary(record, run_dir)
    return record


def _trainer(
    cfg: DictConfig, loggers: list, callbacks: list, overrides: dict[str, Any] | None = None
) -> L.Trainer:
    """`cfg.trainer` with the run's loggers and callbacks; `overrides` (a round's) win over it."""
    return hydra.utils.instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(cfg.paths.run_dir),
        enable_progress_bar=_interactive() and cfg.get("progress_bar", True),
        **(overrides or {}),
    )


def _test_metrics(
    trainer: L.Trainer, method: L.LightningModule, datamodule: Any, ckpt_path: str | None = None
) -> dict:
    results = trainer.test(method, datamodule=datamodule, verbose=False, ckpt_path=ckpt_path)
    metrics: dict[str, float] = {}
    for r in results:
        metrics.update({k: float(v) for k, v in r.items()})
    return metrics


def _fit(
    cfg: DictConfig, trainer: L.Trainer, method: Any, datamodule: Any, ckpt: str | None
) -> None:
    """`trainer.fit`, then the check that it trained: 0 steps with `train=true` is an error."""
    trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt)
    if trainer.global_step == 0:  # a resumed run starts from its checkpoint's (> 0) step
        raise NoTrainingSteps(
            f"method={cfg.method.name} trained 0 steps although train=true (the fit loop made no "
            "optimiser step); check trainer.max_epochs / max_steps / limit_train_batches, the "
            "train split and the method's budget, or set train=false to only evaluate."
        )


def _guards(guard: SignalGuard | None, ckpt_dir: Path) -> list[L.Callback]:
    return [FiniteLoss(), *([guard.callback(ckpt_dir)] if guard is not None else [])]


def _fit_and_test(
    cfg: DictConfig,
    method: Any,
    datamodule: Any,
    loggers: list,
    throughput: Throughput,
    guard: SignalGuard | None = None,
) -> tuple[dict[str, float], L.Trainer, list[dict[str, Any]] | None]:
    """Fit (unless post-hoc) and test; with rounds, once per round, resuming where a run died.

    One round: checkpoints in `<run_dir>/checkpoints`. Several: round r keeps its own in
    `<run_dir>/checkpoints/round<r>`, and `<run_dir>/rounds.json` holds, per finished round, its
    test metrics and the method's `round_state()`; a restarted run restores the last finished
    round (state and weights) and continues with the next, or inside the round it died in.
    """
    run_dir = Path(cfg.paths.run_dir)
    sel = read_selection(cfg)
    if sel is not None and method.num_rounds != 1:
        raise ConfigValueError(
            f"selection is not supported for method={cfg.method.name}, which trains in "
            f"{method.num_rounds} rounds; set selection=null."
        )
    if method.num_rounds == 1:
        guards = _guards(guard, run_dir / "checkpoints")
        chosen = selection_callbacks(sel, run_dir / "checkpoints") if sel else []
        trainer = _trainer(
            cfg,
            loggers,
            [*_build_callbacks(cfg), *chosen, throughput, *guards],
            trainer_overrides(sel) if sel else None,
        )
        if cfg.train:
            ckpt = resolve_ckpt_path(cfg)
            if ckpt:
                log.info("Resuming from %s", ckpt)
            _fit(cfg, trainer, method, datamodule, ckpt)
        if not sel:
            return _test_metrics(trainer, method, datamodule), trainer, None
        best = best_checkpoint(chosen, sel["monitor"])
        if best is None:
            raise ConfigValueError(
                f"selection: no validation ran in {trainer.global_step} steps (every_n_steps="
                f"{sel['every_n_steps']}); lower selection.every_n_steps or train longer."
            )
        chosen_record = selection_record(sel, chosen)
        log.info(
            "Selection: testing the checkpoint of step %s (%s=%.4g, %d validations%s)",
            chosen_record["best_step"],
            sel["monitor"],
            chosen_record["best_value"],
            len(chosen_record["checks"]),
            ", stopped early" if chosen_record["stopped_early"] else "",
        )
        metrics = _test_metrics(trainer, method, datamodule, ckpt_path=best)
        metrics.update(chosen_record.pop("best_val"))  # the chosen checkpoint's val/* metrics
        method.selection_record = chosen_record
        return metrics, trainer, None

    rounds_file = run_dir / ROUNDS_FILE
    fresh = _fresh(cfg)
    done: list[dict[str, Any]] = []
    if not fresh:  # a damaged rounds.json is moved aside: the rounds rerun from their checkpoints
        state = read_or_set_aside(rounds_file)
        done = list((state or {}).get("rounds") or [])
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
        ckpt = resolve_ckpt_path(cfg, ckpt_dir) if cfg.train and not fresh else None
        if ckpt:  # resuming inside round r: its own checkpoint, not the last round's weights
            restore = []
        callbacks = [*_build_callbacks(cfg, ckpt_dir), throughput, *restore]
        trainer = _trainer(
            cfg, loggers, [*callbacks, *_guards(guard, ckpt_dir)], method.round_trainer_overrides(r)
        )
        restore = []
        if cfg.train:
            if ckpt:
                log.info("Round %d: resuming from %s", r, ckpt)
            _fit(cfg, trainer, method, datamodule, ckpt)
        metrics = _test_metrics(trainer, method, datamodule)
        done.append(
            {"round": r, "metrics": dict(sorted(metrics.items())), "state": method.round_state()}
        )
        write_json_atomic(rounds_file, {"rounds": done})
        log.info("Round %d of %d done: %s", r, method.num_rounds, _headline(metrics, cfg))
    if trainer is None:  # every round had finished before this start: test the restored method
        guards = _guards(guard, run_dir / "checkpoints")
        trainer = _trainer(cfg, loggers, [*_build_callbacks(cfg), throughput, *restore, *guards])
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
