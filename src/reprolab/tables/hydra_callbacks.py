"""Hydra callback: validate `table=<name>` in the launching process, before any job is submitted.

Registered in `configs/hydra/default.yaml`:

    callbacks:
      validate_table:
        _target_: reprolab.tables.hydra_callbacks.ValidateTable

`on_multirun_start` runs after the primary config is composed and before the sweeper expands
`hydra.sweeper.params`, so a typo in a table (unknown experiment, sweep/table mismatch, a metric
that a method of the table does not log) fails once, locally, instead of in every SLURM array task
(each job still re-validates in `validate_config`). Kept import-light: it is instantiated for every
`python train.py` call; validating a table imports the method classes of its experiments (their
`metric_keys()`), and only when a table is launched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra < 1.1
    Callback = object  # type: ignore[misc,assignment]


def config_dir_of(config: DictConfig) -> Path:
    """The primary config dir (`configs/`) of a composed config that still has its `hydra` node."""
    for src in OmegaConf.select(config, "hydra.runtime.config_sources", default=None) or []:
        if src.get("provider") == "main" and src.get("schema") == "file":
            return Path(str(src.get("path")))
    return Path(os.environ.get("PROJECT_ROOT", ".")) / "configs"


def table_name_of(config: DictConfig) -> str | None:
    name = OmegaConf.select(config, "hydra.runtime.choices.table", default=None)
    if name in (None, "null"):
        name = OmegaConf.select(config, "table.name", default=None)
    return None if name is None else str(name)


class ValidateTable(Callback):  # type: ignore[misc]
    """Stop a table's multirun before it launches anything when the table config is invalid.

    Hydra turns an `Exception` raised in a callback into a warning and carries on, so the
    `TableConfigError` is re-raised as `SystemExit` (exit status 1, message on stderr), which it
    does not catch.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        name = table_name_of(config)
        if not name:
            return
        from reprolab.tables.schema import TableConfigError, validate_table

        try:
            validate_table(name, config_dir_of(config))
        except TableConfigError as exc:
            sep = " " if len(exc.errors) == 1 else "\n"  # one problem: one line
            raise SystemExit(f"{exc}{sep}Nothing was launched.") from exc
