"""Checks of config values that run right after composition, before torch or Lightning is imported.

`check_values(cfg)` catches the ordinary mistakes (`seed=abc`, `data.num_shots=-1`,
`method.budget=0`, `ckpt_path=/nope`, a malformed `search:` block, a `trial` outside it) in well
under a second, with one line that names the key, the value and the fix, instead of a traceback
after the data and the model were built. Imports: the standard library and omegaconf only (a test
checks that importing this module pulls in no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from reprolab.errors import ConfigValueError, ReprolabError
from reprolab.search import check_search

__all__ = ["ConfigValueError", "ReprolabError", "check_values"]

#: What a run does when its run dir holds a run of another config (`reprolab.runguard`).
ON_CONFIG_CHANGE = ("refuse", "replace")

_MISSING = object()
_NULLS = (None, "null", "none", "None")


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)


def _bad(key: str, value: Any, problem: str, fix: str) -> ConfigValueError:
    return ConfigValueError(f"{key}={value!r} {problem} (config key {key}); {fix}.")


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `seed=true` is a mistake, not the seed 1
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_at_least(
    cfg: DictConfig, key: str, low: int, nullable: bool, fix: str, allowed: tuple[int, ...] = ()
) -> None:
    value = _get(cfg, key)
    if value is _MISSING or (nullable and value is None):
        return
    if not _is_int(value):
        raise _bad(key, value, "is not an integer", fix)
    if value < low and value not in allowed:
        raise _bad(key, value, f"must be >= {low}", fix)


def _bool(cfg: DictConfig, key: str, nullable: bool = False) -> None:
    value = _get(cfg, key)
    if value is _MISSING or (nullable and value is None):
        return
    if not isinstance(value, bool):
        null = ", null" if nullable else ""
        raise _bad(key, value, "is not a boolean", f"use {key}=true or {key}=false{null}")


def check_values(cfg: DictConfig) -> None:
    """Raise `ConfigValueError` (one line: what, where, how to fix) for an obviously wrong value.

    Only values whose meaning is fixed by the framework are checked (seed, shots, batch sizes,
    threads, epochs, checkpoint path, a black-box query budget); a group a config does not have is
    skipped. Nothing is imported or built.
    """
    seed = _get(cfg, "seed")
    if seed is not _MISSING and not _is_int(seed):
        raise _bad("seed", seed, "is not an integer", "pass an integer, e.g. seed=1")
    _int_at_least(
        cfg,
        "data.num_shots",
        1,
        nullable=True,
        fix="use k >= 1 images per class, or data.num_shots=null for all images",
    )
    _int_at_least(cfg, "data.fewshot_seed", 0, False, "use a non-negative integer")
    for key in ("data.batch_size", "data.eval_batch_size"):
        _int_at_least(cfg, key, 1, nullable=False, fix=f"use {key}=1 or more")
    _int_at_least(
        cfg, "data.num_workers", 0, False, "use data.num_workers=0 (main process) or more"
    )
    _int_at_least(
        cfg,
        "threads",
        1,
        nullable=True,
        fix="use threads=1 or more, or threads=null (torch default)",
    )
    max_steps = _get(cfg, "trainer.max_steps")
    limited_by_steps = _is_int(max_steps) and max_steps > 0
    _int_at_least(
        cfg,
        "trainer.max_epochs",
        1,
        nullable=True,
        fix="use trainer.max_epochs=1 or more (-1 = no epoch limit, only with trainer.max_steps)",
        allowed=(-1,) if limited_by_steps else (),
    )
    _int_at_least(
        cfg,
        "trainer.max_steps",
        1,
        True,
        "use trainer.max_steps=1 or more, or -1 (no limit)",
        (-1,),
    )
    _int_at_least(cfg, "method.rounds", 1, nullable=True, fix="use method.rounds=1 or more")
    for key in ("skip_if_done", "progress_bar"):
        _bool(cfg, key)
    _bool(cfg, "train", nullable=True)
    _check_budget(cfg)
    _check_ckpt_path(cfg)
    on_config_change_policy(cfg)
    _int_at_least(
        cfg,
        "trial",
        0,
        nullable=True,
        fix="use trial=0 or more (a trial of the experiment's search), or trial=null (a plain run)",
    )
    check_search(cfg)  # search / select blocks, and trial within the search's trials


def on_config_change_policy(cfg: DictConfig) -> str:
    """`on_config_change` (default `refuse`), checked against `ON_CONFIG_CHANGE`."""
    policy = str(cfg.get("on_config_change") or "refuse")
    if policy not in ON_CONFIG_CHANGE:
        raise ConfigValueError(
            f"on_config_change={policy!r} is not one of {', '.join(ON_CONFIG_CHANGE)} (config key "
            "on_config_change); use on_config_change=refuse (default) or replace."
        )
    return policy


def _check_budget(cfg: DictConfig) -> None:
    budget = _get(cfg, "method.budget")
    if budget is _MISSING or budget is None:
        return
    fix = "give a positive number of training images, or method.budget=null for no limit"
    if not _is_number(budget):
        raise _bad("method.budget", budget, "is not a number", fix)
    if budget <= 0:
        raise _bad("method.budget", budget, "leaves no query for training", fix)


def _check_ckpt_path(cfg: DictConfig) -> None:
    value = _get(cfg, "ckpt_path")
    if value is _MISSING or value in _NULLS or value == "auto":
        return
    if not isinstance(value, str):
        raise _bad("ckpt_path", value, "is not a path", "use ckpt_path=auto, null or a .ckpt file")
    if not Path(value).is_file():
        raise _bad(
            "ckpt_path",
            value,
            "is not an existing file",
            "use ckpt_path=auto (resume this run if it can), null (start fresh) or a .ckpt file",
        )
