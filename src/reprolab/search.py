"""Seeded hyperparameter search: which values trial `k` of an experiment runs with.

An experiment (or cell) declares its search space and how its trials are compared:

    search:
      mode: grid            # grid | random
      n: null               # random: number of draws (required); grid: null (or the grid's size)
      seed: 0               # random draws depend on (search.seed, trial, key) only, not on `seed`
      space:                # dotted config key -> list of values, or (random) {low, high, log, int}
        method.m2_weight: [0.05, 0.01, 0.005, 0.001]
        method.optimizer.lr: [1.0e-5, 7.0e-6]
    select: {metric: val/rsum, mode: max}   # what the aggregator picks a seed's trial by
    trial: null             # which trial this run is; null = no search, a plain run

- grid: trial `k` indexes the cartesian product of the lists in the order the space lists its
  keys, the last key fastest (`itertools.product`); there are `prod(len(list))` trials.
- random: `n` trials; each key of trial `k` is drawn from its own generator,
  `numpy.random.default_rng([search.seed, k, crc32(key)])`, so a draw is the same on every
  machine and process, and adding, removing or reordering other keys leaves it unchanged. A list
  is a uniform choice; `{low, high}` is uniform in [low, high), with `log: true` log-uniform, with
  `int: true` rounded down to an integer (SubpopBench's `int(2 ** uniform(3, 9))` batch sizes).

`apply_trial(cfg)` (the runner, before anything is built or fingerprinted) writes trial `k`'s
values into the config; the search block itself is not part of a run's fingerprint (its values
are). The run dir of a trial is `<log_dir>/<cell>/trial<k>/seed<n>` (the `trial_dir` resolver
below, used by `configs/paths/default.yaml` and `configs/hydra/default.yaml`); a run without a
trial keeps `<log_dir>/<cell>/seed<n>`.

Standard library and omegaconf only at import (numpy is imported for a random draw), so the entry
point checks a search before torch is imported. Every mistake is a `ConfigValueError`, one line.
"""

from __future__ import annotations

import itertools
import logging
import math
import zlib
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from reprolab.errors import ConfigValueError
from reprolab.utils.naming import did_you_mean

log = logging.getLogger("reprolab")

SEARCH_KEYS = ("mode", "n", "seed", "space")
SEARCH_MODES = ("grid", "random")
SELECT_KEYS = ("metric", "mode")
SELECT_MODES = ("max", "min")
RANGE_KEYS = ("low", "high", "log", "int")
#: Keys a search may not set: the run's identity and the search itself.
FORBIDDEN_KEYS = ("seed", "trial", "cell", "search", "select", "paths", "paper", "hydra")

_MISSING = object()


# ------------------------------------------------------------------------------ run dir resolver


def trial_dir(trial: Any) -> str:
    """The run-dir segment of a trial: `/trial<k>`, or nothing for a plain run (trial null)."""
    return "" if trial is None else f"/trial{trial}"


def register_resolvers() -> None:
    """Register `${trial_dir:${trial}}` (idempotent). Done when `reprolab` is imported, so every
    process that resolves a run dir (the entry point, a SLURM worker, `compose_train`) has it."""
    if not OmegaConf.has_resolver("trial_dir"):
        OmegaConf.register_new_resolver("trial_dir", trial_dir)


# ------------------------------------------------------------------------------ reading blocks


def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_range(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and set(value) <= set(RANGE_KEYS)


def _flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{a.b: [...]}` and `{a: {b: [...]}}` (what `search.space.a.b=[...]` on the command line
    makes) both give `{"a.b": [...]}`; a `{low, high, ...}` mapping is a value, not a group."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and not _is_range(value):
            if not value:
                raise ConfigValueError(
                    f"search.space.{name} is an empty mapping; give a list of values for it."
                )
            out.update(_flatten_space(value, name))
        else:
            out[name] = value
    return out


def _space(search: dict[str, Any]) -> dict[str, Any]:
    space = search.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigValueError(
            f"search.space={space!r} must be a non-empty mapping of config keys to value lists "
            "(e.g. search.space: {method.optimizer.lr: [1.0e-5, 7.0e-6]})."
        )
    return _flatten_space(space)


def read_search(search_cfg: Any) -> dict[str, Any]:
    """The search block as plain values, checked (shape only; `check_search` checks the keys
    against a config too): mode, n, seed and the flattened space (dotted key -> list | range)."""
    search = _plain(search_cfg)
    if not isinstance(search, dict):
        raise ConfigValueError(
            f"search={search!r} must be a mapping with mode, space (and n, seed), or null."
        )
    unknown = sorted(str(k) for k in search if k not in SEARCH_KEYS)
    if unknown:
        raise ConfigValueError(
            f"Unknown key search.{unknown[0]}; allowed: {', '.join(SEARCH_KEYS)}."
        )
    mode = search.get("mode", "grid")
    if mode not in SEARCH_MODES:
        raise ConfigValueError(
            f"search.mode={mode!r} is not one of {', '.join(SEARCH_MODES)} (grid: every "
            "combination of the lists; random: search.n seeded draws)."
        )
    seed = search.get("seed", 0)
    if seed is None:
        seed = 0
    if not _is_int(seed) or seed < 0:
        raise ConfigValueError(f"search.seed={seed!r} must be a non-negative integer.")
    space = _space(search)
    for key, values in space.items():
        _check_values(mode, key, values)
    n = search.get("n")
    if mode == "random":
        if not _is_int(n) or n < 1:
            raise ConfigValueError(
                f"search.n={n!r}: a random search needs the number of draws, an integer >= 1 "
                "(e.g. search.n=16)."
            )
    elif n is not None:
        size = math.prod(len(v) for v in space.values())
        if not _is_int(n) or n != size:
            raise ConfigValueError(
                f"search.n={n!r} but the grid has {size} points; a grid search runs all of them "
                "(set search.n=null, or to the grid's size)."
            )
    return {"mode": mode, "n": n, "seed": seed, "space": space}


def _check_values(mode: str, key: str, values: Any) -> None:
    where = f"search.space.{key}"
    if isinstance(values, list):
        if not values:
            raise ConfigValueError(f"{where} is an empty list; give at least one value.")
        return
    if isinstance(values, dict):
        if mode == "grid":
            raise ConfigValueError(
                f"{where}={values!r}: a grid search needs a list of values (ranges "
                "{low, high} are for search.mode=random)."
            )
        unknown = sorted(str(k) for k in values if k not in RANGE_KEYS)
        if unknown:
            raise ConfigValueError(
                f"Unknown key {where}.{unknown[0]}; a range has {', '.join(RANGE_KEYS)}."
            )
        low, high = values.get("low"), values.get("high")
        if not _is_number(low) or not _is_number(high) or not low < high:
            raise ConfigValueError(
                f"{where}={values!r} needs numbers low < high (e.g. {{low: 1.0e-5, high: "
                "1.0e-3, log: true}})."
            )
        for flag in ("log", "int"):
            if not isinstance(values.get(flag, False), bool):
                raise ConfigValueError(f"{where}.{flag}={values[flag]!r} must be true or false.")
        if values.get("log") and low <= 0:
            raise ConfigValueError(f"{where}: a log-uniform range needs low > 0, got low={low}.")
        return
    raise ConfigValueError(
        f"{where}={values!r} must be a list of values"
        + (" or a range {low, high, log: bool}." if mode == "random" else ".")
    )


def read_select(select_cfg: Any) -> dict[str, str]:
    """The `select` block, checked: `{metric, mode}`; a test metric is refused (selecting a
    trial on the test set reports an optimistic test number)."""
    select = _plain(select_cfg)
    if not isinstance(select, dict):
        raise ConfigValueError(
            f"select={select!r} must be a mapping {{metric: val/<key>, mode: max | min}}, or null."
        )
    unknown = sorted(str(k) for k in select if k not in SELECT_KEYS)
    if unknown:
        raise ConfigValueError(f"Unknown key select.{unknown[0]}; allowed: metric, mode.")
    metric, mode = select.get("metric"), select.get("mode", "max")
    if not isinstance(metric, str) or not metric.strip() or any(c in metric for c in "*?["):
        raise ConfigValueError(
            f"select.metric={metric!r} must be one metric key of the run record (e.g. val/acc)."
        )
    if metric.startswith("test/"):
        raise ConfigValueError(
            f"select.metric={metric!r} is a test metric; trials are selected on validation "
            "metrics only (e.g. val/worst_group_acc), the test metric is what gets reported."
        )
    if mode not in SELECT_MODES:
        raise ConfigValueError(
            f"select.mode={mode!r} is not one of max, min (whether a larger {metric} is better)."
        )
    return {"metric": metric, "mode": mode}


# ------------------------------------------------------------------------------ trials


def num_trials(search_cfg: Any) -> int:
    """How many trials a search has: the grid's size, or `n` random draws."""
    search = read_search(search_cfg)
    if search["mode"] == "random":
        return int(search["n"])
    return math.prod(len(v) for v in search["space"].values())


def _check_trial(trial: Any, n: int) -> None:
    if not _is_int(trial) or trial < 0:
        raise ConfigValueError(
            f"trial={trial!r} must be an integer in 0..{n - 1} (the search has {n} trials)."
        )
    if trial >= n:
        raise ConfigValueError(
            f"trial={trial} is out of range: the search has {n} trials (trial=0..{n - 1})."
        )


def _draw(seed: int, trial: int, key: str, values: Any) -> Any:
    import numpy as np

    rng = np.random.default_rng([seed, trial, zlib.crc32(key.encode())])
    if isinstance(values, list):
        return values[int(rng.integers(len(values)))]
    low, high = float(values["low"]), float(values["high"])
    if values.get("log"):
        x = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        x = float(rng.uniform(low, high))
    return int(math.floor(x)) if values.get("int") else x


def trial_overrides(search_cfg: Any, trial: int) -> dict[str, Any]:
    """`{dotted key: value}` of trial `trial`, in the order the space lists its keys."""
    search = read_search(search_cfg)
    space = search["space"]
    n = num_trials(search_cfg)
    _check_trial(trial, n)
    if search["mode"] == "grid":
        point = next(itertools.islice(itertools.product(*space.values()), trial, None))
        return dict(zip(space, point, strict=True))
    return {key: _draw(search["seed"], trial, key, values) for key, values in space.items()}


# ------------------------------------------------------------------------------ configs


def check_search(cfg: DictConfig) -> None:
    """Check `search`, `select` and `trial` of a composed config (no value is changed).

    A search's keys must exist in the config and be none of `FORBIDDEN_KEYS`; `trial` needs a
    search and must be one of its trials.
    """
    search_cfg, select_cfg = cfg.get("search"), cfg.get("select")
    trial = cfg.get("trial")
    if select_cfg is not None:
        read_select(select_cfg)
    if search_cfg is None:
        if trial is not None:
            raise ConfigValueError(
                f"trial={trial} but this config declares no search (a `search:` block in the "
                "experiment); drop trial for a plain run."
            )
        return
    search = read_search(search_cfg)
    for key in search["space"]:
        if key.split(".")[0] in FORBIDDEN_KEYS:
            raise ConfigValueError(
                f"search.space.{key}: a search cannot set {key.split('.')[0]} (it names the run); "
                "search over method, data, model or trainer values."
            )
        found = OmegaConf.select(
            cfg, key, default=_MISSING, throw_on_missing=False, throw_on_resolution_failure=False
        )
        if found is _MISSING:
            parent = key.rpartition(".")[0]
            node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            have = (
                ", ".join(str(k) for k in node.keys()) if isinstance(node, DictConfig) else "none"
            )
            leaf = key.rpartition(".")[2]
            close = did_you_mean(leaf, node.keys()) if isinstance(node, DictConfig) else ""
            raise ConfigValueError(
                f"search.space.{key}: the config has no key {key} (under {parent or 'the top'}: "
                f"{have}){close}."
            )
    if trial is not None:
        _check_trial(trial, num_trials(search_cfg))


def apply_trial(cfg: DictConfig) -> dict[str, Any] | None:
    """Write trial `cfg.trial`'s values into `cfg` (in place) and log them; None without a trial.

    Runs before anything is built and before the fingerprint: the run's config (and record)
    holds the values the trial ran with.
    """
    check_search(cfg)
    trial = cfg.get("trial")
    if trial is None:
        return None
    values = trial_overrides(cfg.search, int(trial))
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    log.info("trial %d/%d: %s", trial, num_trials(cfg.search), format_overrides(values))
    return values


def overrides_of(cfg: DictConfig) -> dict[str, Any] | None:
    """The values of the config's trial (None for a plain run)."""
    trial = cfg.get("trial")
    if trial is None or cfg.get("search") is None:
        return None
    return trial_overrides(cfg.search, int(trial))


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_overrides(values: dict[str, Any] | None) -> str:
    """`key=value, ...` (floats with 6 significant digits)."""
    if not values:
        return ""
    return ", ".join(f"{k}={format_value(v)}" for k, v in values.items())


register_resolvers()
