"""Run identity and the per-run record (`metrics.json`) that tables are built from.

Standard library and omegaconf only (no torch), so the entry point can record a cell that cannot
start before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
FINGERPRINT_FILE = "fingerprint.json"  # {fingerprint, config}: written when a run starts
LOCK_FILE = ".lock"  # held (flock) by the one process running the cell; see reprolab.runguard

# Config keys that cannot change a run's results, left out of its fingerprint: where files go
# (`paths`, `hydra`), how progress is shown or logged, how fast it runs (`threads`), how a launch
# treats an existing run dir (`skip_if_done`, `ckpt_path`, `on_config_change`), extra callbacks,
# names and tags, the paper's reported numbers (`paper.reported`, `paper.seeds`), and a
# hyperparameter search's space and selection rule (`search`, `select`: a trial's config holds the
# values it runs with; see reprolab.search). Dotted keys name nested entries. Anything else that
# differs makes it a different run.
NON_RESULT_KEYS: tuple[str, ...] = (
    "paths",
    "hydra",
    "logger",
    "progress_bar",
    "threads",
    "skip_if_done",
    "ckpt_path",
    "on_config_change",
    "callbacks",
    "experiment_name",
    "table_name",
    "table",
    "tags",
    "paper.reported",
    "paper.seeds",
    "search",
    "select",
)
#: Keys that count only when set: null reads as absent (the fingerprints of runs from before
#: these keys existed stay what they were).
NULL_AS_ABSENT_KEYS: tuple[str, ...] = (
    "trial",
    "selection",
    "method.simat",
    "data.subsample_classes",
    "method.cache_image_features",
)

log = logging.getLogger("reprolab")


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


# ------------------------------------------------------------------------------------ identity


def fingerprint_config(cfg: Any) -> dict[str, Any]:
    """The resolved config container a run is identified by: `NON_RESULT_KEYS` left out.

    `paths.*` are replaced by placeholders before resolving, so a value built from them
    (`data.root: ${paths.data_dir}`) reads `<paths.data_dir>` and the fingerprint does not change
    when the data or logs move to another disk. `seed` is replaced too (it is in the run dir's
    name): every seed of a cell has one fingerprint, and values that follow it
    (`data.fewshot_seed: ${seed}`) read `<seed>` unless a run sets them to something else.
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    work = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if isinstance(work.get("paths"), DictConfig):
        for key in list(work.paths.keys()):
            work.paths[key] = f"<paths.{key}>"
    if "seed" in work:
        work.seed = "<seed>"
    top = {k for k in NON_RESULT_KEYS if "." not in k}
    out: dict[str, Any] = {}
    for key in work.keys():
        if key in top:
            continue
        try:
            value = work[key]
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001 - an unresolvable value is identified by its text
            value = OmegaConf.to_container(work, resolve=False)[key]
        out[str(key)] = value
    for key in NULL_AS_ABSENT_KEYS:
        *parents, leaf = key.split(".")
        node: Any = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] is None:
            del node[leaf]
    for dotted in NON_RESULT_KEYS:
        if "." in dotted:
            *parents, leaf = dotted.split(".")
            parent: Any = out
            for p in parents:
                parent = parent.get(p) if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(leaf, None)
    return _canonical(out)


def _canonical(value: Any) -> Any:
    """JSON-ready, with `1.0` and `1` the same number (`method.lr=1` and `=1.0` are one run)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_fingerprint(cfg: Any) -> str:
    """First 12 hex chars of the sha256 of the canonical JSON of `fingerprint_config(cfg)`."""
    return fingerprint_of(fingerprint_config(cfg))


def fingerprint_of(container: dict[str, Any]) -> str:
    """The fingerprint of an already fingerprinted container (as stored in fingerprint.json)."""
    text = json.dumps(container, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


_ABSENT = object()


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprinted configs, one `key: old -> new` per dotted key."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb or type(va) is not type(vb):
            lines.append(f"{key}: {_show(va)} -> {_show(vb)}")
    return lines


# ------------------------------------------------------------------------------------ files


def file_mode() -> int:
    """Mode for a new record file: 0666 less the umask (0644 with the usual 022)."""
    try:  # Linux: read without touching the process umask (thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write via a temp file + rename, so a killed job never leaves a half-written record.

    The file gets `file_mode()` (mkstemp makes 0600, which a lab group could not aggregate).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), file_mode())
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def utc_stamp() -> str:
    """A UTC timestamp for file names: 20261126T160000Z."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def move_aside(path: Path, tag: str) -> Path:
    """Rename `path` to `<path>.<tag>-<UTC timestamp>` (kept, never overwritten); the new path."""
    path = Path(path)
    base = path.with_name(f"{path.name}.{tag}-{utc_stamp()}")
    target, n = base, 1
    while target.exists() or target.is_symlink():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    os.replace(path, target)
    return target


class DamagedRecordError(ValueError):
    """A record file exists but is not a JSON object (empty, truncated, a list...)."""


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when there is no file; `DamagedRecordError` otherwise."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedRecordError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise DamagedRecordError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def read_or_set_aside(path: Path) -> dict[str, Any] | None:
    """`read_json_object`, but a damaged file is moved aside (`<name>.damaged-<UTC>`) with a
    warning naming it, and reads as absent: a damaged record must not block its cell forever."""
    try:
        return read_json_object(path)
    except DamagedRecordError as e:
        moved = move_aside(Path(path), "damaged")
        log.warning("%s; moved aside to %s, the cell reruns.", e, moved.name)
        return None


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The finished record of a run dir, or None (a damaged one is moved aside: see above)."""
    return read_or_set_aside(Path(run_dir) / METRICS_FILE)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def one_line_error(exc: BaseException, limit: int = 500) -> str:
    """`Type: message` on one line (whitespace collapsed), at most `limit` characters."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_failure(run_dir: Path, base: dict[str, Any], exc: BaseException) -> None:
    """`<run_dir>/failed.json`: the base record plus `error` (one line) and `traceback`."""
    record = dict(base)
    record.update(
        status="failed",
        error=one_line_error(exc),
        traceback="".join(traceback.format_exception(exc)),
        failed_at=now(),
    )
    write_json_atomic(Path(run_dir) / FAILED_FILE, record)


def start_record(cfg: Any) -> dict[str, Any]:
    """`cell`, `seed`, `trial` (when set) and `fingerprint` of a config, as far as they can be
    read: the minimum a failed.json carries for a cell that could not start (a broken value must
    not hide the cell)."""
    from omegaconf import OmegaConf

    def get(key: str) -> Any:
        try:
            return OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:  # noqa: BLE001 - an unresolvable value: record what can be read
            return None

    seed = get("seed")
    try:
        seed = int(seed) if seed is not None and not isinstance(seed, bool) else seed
    except (TypeError, ValueError):
        seed = str(seed)
    try:
        fingerprint: str | None = config_fingerprint(cfg)
    except Exception:  # noqa: BLE001
        fingerprint = None
    trial = get("trial")
    extra = {} if trial is None else {"trial": trial}  # a trial of a search (reprolab.search)
    return {"cell": get("cell"), "seed": seed, **extra, "fingerprint": fingerprint}


def record_cannot_start(cfg: Any, exc: BaseException) -> Path | None:
    """Write failed.json for a cell that failed before its run started (e.g. a config check in the
    entry point); the path written, or None when the run dir cannot be made or another process
    holds the cell's lock (its files are not this launch's to touch)."""
    from omegaconf import OmegaConf

    try:
        run_dir = Path(str(OmegaConf.select(cfg, "paths.run_dir")))
        run_dir.mkdir(parents=True, exist_ok=True)
        if _lock_held_elsewhere(run_dir / LOCK_FILE):
            return None
        write_failure(run_dir, start_record(cfg), exc)
    except Exception:  # noqa: BLE001 - best effort: the error itself is what the user sees
        return None
    return run_dir / FAILED_FILE


def _lock_held_elsewhere(path: Path) -> bool:
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
