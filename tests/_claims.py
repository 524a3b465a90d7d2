"""Runs of a miniature table's cells for the claim tests (tests/test_*_claims.py).

`table_runs` runs (or, with `<ENV>=<log dir of a table run>`, reuses: same config fingerprint) each
row's cell of one column per seed, in row order, and returns their metrics; `seed_mean` averages one
metric of a row over the seeds.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from reprolab.train import run
from reprolab.utils.config import compose_train


def table_runs(
    rows: Sequence[str], col: str, seeds: Sequence[int], env: str, fresh_dir: Path
) -> dict[tuple[str, int], dict[str, float]]:
    """`{(row, seed): metrics}` of cells `<row>_<col>`, logged under `$env` or `fresh_dir`."""
    log = os.environ.get(env) or str(fresh_dir)
    out = {}
    for row in rows:
        for seed in seeds:
            cfg = compose_train(
                [
                    f"experiment={row}_{col}",
                    f"seed={seed}",
                    f"paths.log_dir={log}",
                    "logger=csv",
                    "progress_bar=false",
                    "threads=1",
                ]
            )
            out[row, seed] = run(cfg)["metrics"]
    return out


def seed_mean(
    runs: dict[tuple[str, int], dict[str, float]], row: str, key: str, seeds: Sequence[int]
) -> float:
    return statistics.fmean(runs[row, s][key] for s in seeds)
