"""Checkpoint selection on the validation split (SubpopBench's protocol; the group-robustness papers).

A run with `selection:` validates every `every_n_steps` optimiser steps (across epoch boundaries),
keeps the checkpoint with the best `monitor` value, optionally stops early after `patience`
validations without improvement, and is then TESTED AT THAT CHECKPOINT, never at a test-chosen one:

```yaml
selection:
  monitor: val/worst_group_acc   # a val/ key the method logs
  mode: max                      # max | min
  every_n_steps: 300             # SubpopBench's CHECKPOINT_FREQ
  patience: 5                    # validations without improvement before stopping; null: never
```

The default `selection: null` leaves a run as before: the last step is tested. `metrics.json`
gains `selection`: the rule, the best step and value, whether the run stopped early, and every
validation (step, value), so the choice can be audited; the validation metrics of the chosen
checkpoint (`val/...`) join the run's `metrics`, so a search's `select: {metric: val/...}` can
compare trials.

Ties keep the earliest checkpoint (Lightning's ModelCheckpoint replaces the best only on strict
improvement). A killed run resumes from its last checkpoint with the best-so-far checkpoint, the
early-stopping counter and the history restored (they are callback state in the checkpoint).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from reprolab.errors import ConfigValueError

KEYS = ("monitor", "mode", "every_n_steps", "patience")


def read_selection(cfg: DictConfig) -> dict[str, Any] | None:
    """`cfg.selection` as a plain dict with every key, or None; one-line errors for bad values."""
    sel = cfg.get("selection")
    if sel is None:
        return None
    sel = OmegaConf.to_container(sel, resolve=True) if OmegaConf.is_config(sel) else sel
    if not isinstance(sel, dict):
        raise ConfigValueError(
            f"selection must be {{monitor, mode, every_n_steps, patience}} or null, got {sel!r}."
        )
    unknown = sorted(set(sel) - set(KEYS))
    if unknown:
        raise ConfigValueError(
            f"selection.{unknown[0]} is not an option (options: {', '.join(KEYS)})."
        )
    out = {"monitor": None, "mode": "max", "every_n_steps": None, "patience": None, **sel}
    monitor = out["monitor"]
    if not isinstance(monitor, str) or not monitor.startswith("val/"):
        raise ConfigValueError(
            f"selection.monitor={monitor!r} must be a validation key (val/...), e.g. "
            "selection.monitor=val/worst_group_acc: checkpoints are never chosen on a test metric."
        )
    if out["mode"] not in ("max", "min"):
        raise ConfigValueError(f"selection.mode={out['mode']!r} must be max or min.")
    n = out["every_n_steps"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigValueError(
            f"selection.every_n_steps={n!r} must be an integer >= 1 (validate every N steps)."
        )
    p = out["patience"]
    if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
        raise ConfigValueError(
            f"selection.patience={p!r} must be an integer >= 1, or null (no early stopping)."
        )
    return out


def check_selection(cfg: DictConfig) -> None:
    """Build-free checks of a run with `selection:` (called from `validate_config`)."""
    sel = read_selection(cfg)
    if sel is None:
        return
    from reprolab.utils.config import metric_is_logged

    if cfg.get("train") is False or cfg.method.get("post_hoc", False):
        raise ConfigValueError(
            f"selection is set but method={cfg.method.name} does not train: nothing to select; "
            "set selection=null."
        )
    if not cfg.data.get("val", False):
        raise ConfigValueError(
            f"selection needs a validation split, but data={cfg.data.name} has val=false; set "
            "data.val=true."
        )
    if not metric_is_logged(str(cfg.method._target_), sel["monitor"]):
        raise ConfigValueError(
            f"selection.monitor={sel['monitor']} is not a key method={cfg.method.name} logs."
        )


def trainer_overrides(sel: dict[str, Any]) -> dict[str, Any]:
    """Validate every N optimiser steps, counted across epochs."""
    return {"val_check_interval": int(sel["every_n_steps"]), "check_val_every_n_epoch": None}


class SelectionHistory(L.Callback):
    """Every validation's (step, monitored value), kept in the checkpoint for resumed runs."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.checks: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ConfigValueError(
                f"selection.monitor={self.monitor} was not logged by the validation pass "
                f"(logged: {', '.join(sorted(trainer.callback_metrics)) or 'nothing'})."
            )
        val = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1
        }
        self.checks.append({"step": int(trainer.global_step), "value": float(value), "val": val})

    def state_dict(self) -> dict[str, Any]:
        return {"checks": list(self.checks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.checks = list(state_dict.get("checks", []))


def selection_callbacks(sel: dict[str, Any], ckpt_dir: Path) -> list[L.Callback]:
    """Best-checkpoint keeper, early stopping (with `patience`) and the validation history."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    best = ModelCheckpoint(
        dirpath=str(ckpt_dir / "best"),
        filename="best-step{step:07d}",
        auto_insert_metric_name=False,
        monitor=sel["monitor"],
        mode=sel["mode"],
        save_top_k=1,
        save_last=False,
        save_on_train_epoch_end=False,
    )
    out: list[L.Callback] = [best, SelectionHistory(sel["monitor"])]
    if sel["patience"] is not None:
        out.append(
            EarlyStopping(
                monitor=sel["monitor"],
                mode=sel["mode"],
                patience=int(sel["patience"]),
                check_on_train_epoch_end=False,
                strict=True,
            )
        )
    return out


def best_checkpoint(callbacks: list[L.Callback], monitor: str) -> str | None:
    """Path of the best checkpoint the selection callbacks kept (None before any validation)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for c in callbacks:
        if isinstance(c, ModelCheckpoint) and c.monitor == monitor:
            return c.best_model_path or None
    return None


def selection_record(sel: dict[str, Any], callbacks: list[L.Callback]) -> dict[str, Any]:
    """`metrics.json` -> `selection`: the rule, the chosen step and value, the history."""
    from lightning.pytorch.callbacks import EarlyStopping

    checks: list[dict[str, float]] = []
    stopped = False
    for c in callbacks:
        if isinstance(c, SelectionHistory):
            checks = c.checks
        if isinstance(c, EarlyStopping):
            stopped = c.wait_count >= c.patience  # stopped_epoch is 0 for a stop in epoch 0
    best = None
    for c in checks:  # earliest best, as the checkpoint keeper (strict improvement only)
        if best is None or _better(c["value"], best["value"], sel["mode"]):
            best = c
    return {
        **sel,
        "best_step": None if best is None else best["step"],
        "best_value": None if best is None else best["value"],
        "best_val": {} if best is None else dict(best.get("val", {})),
        "stopped_early": stopped,
        "checks": [{"step": c["step"], "value": c["value"]} for c in checks],
    }


def _better(a: float, b: float, mode: str) -> bool:
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if mode == "max" else a < b
