"""Hydra callbacks of a multirun: validate a table before launch; list every failed cell at the end.

Registered in `configs/hydra/default.yaml`:

    callbacks:
      validate_table:
        _target_: reprolab.tables.hydra_callbacks.ValidateTable
      failed_cells:
        _target_: reprolab.tables.hydra_callbacks.FailedCells

`on_multirun_start` runs after the primary config is composed and before the sweeper expands
`hydra.sweeper.params`, so a typo in a table (unknown experiment, sweep/table mismatch, a metric
that a method of the table does not log) fails once, locally, instead of in every SLURM array task
(each job still re-validates in `validate_config`). Kept import-light: it is instantiated for every
`python train.py` call; validating a table imports the method classes of its experiments (their
`metric_keys()`), and only when a table is launched.
"""

from __future__ import annotations

import logging
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


log = logging.getLogger("reprolab")


class FailedCells(Callback):  # type: ignore[misc]
    """A failed cell never stops a multirun; the multirun ends listing every failed cell.

    Hydra's basic sweeper re-raises the first failed job's exception once its batch is done, which
    hides every other failure and skips `on_multirun_end`. Each failed job is recorded here (its
    run dir keeps `failed.json`, written by `reprolab.train.run`) and its return is marked as
    handled, so the sweep goes on; `on_multirun_end` then prints one line per failed cell and
    exits with status 1. Runs in the process that runs the jobs (the local launcher); under
    SLURM each array task reports its own failure and `make aggregate` lists failed cells.
    """

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.jobs = 0

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        self.jobs += 1
        if job_return.status != JobStatus.FAILED:
            return
        exc = job_return._return_value
        cell = OmegaConf.select(config, "cell", default="?")
        seed = OmegaConf.select(config, "seed", default="?")
        run_dir = OmegaConf.select(config, "paths.run_dir", default="?")
        from reprolab.errors import one_line, single_line

        error = single_line(f"{type(exc).__name__}: {one_line(exc)}", 300)
        line = f"{cell} seed {seed}: {error} ({run_dir})"
        self.failed.append(line)
        log.error("Cell failed, the multirun goes on: %s", line)
        job_return.status = JobStatus.COMPLETED  # handled here: the sweeper must not re-raise
        job_return._return_value = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.failed:
            return
        lines = "\n".join(f"  - {f}" for f in self.failed)
        raise SystemExit(
            f"{len(self.failed)} of {self.jobs} cells failed (failed.json in each run dir; "
            f"relaunching the same command reruns only unfinished cells):\n{lines}"
        )
