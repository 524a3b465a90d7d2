"""Run identity and the per-run record (`metrics.json`) that tables are built from."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
FAILED_FILE = "failed.json"
ROUNDS_FILE = "rounds.json"  # per-round curve of a method with an outer loop


def git_info(root: str | Path | None = None) -> dict[str, Any]:
    """Commit SHA and dirty flag of the code that ran (None outside a git checkout)."""
    cwd = str(root or Path(__file__).resolve().parents[3])

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write via a temp file + rename, so a killed job never leaves a half-written record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_record(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_failure(run_dir: Path, base: dict[str, Any], exc: BaseException) -> None:
    record = dict(base)
    record.update(
        status="failed",
        error=f"{type(exc).__name__}: {exc}",
        traceback="".join(traceback.format_exception(exc)),
        failed_at=now(),
    )
    write_json_atomic(Path(run_dir) / FAILED_FILE, record)
