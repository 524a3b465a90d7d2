"""What keeps one run honest: its identity, one writer, signals, finite losses, readable checkpoints.

Used by `reprolab.train.run`:

- `check_identity`: a run dir holding a run of another config (fingerprint, see
  `reprolab.utils.run_record.NON_RESULT_KEYS`) is never reused or resumed silently: refuse naming
  what differs, or with `on_config_change=replace` move the old run aside.
- `RunLock`: `<run_dir>/.lock` (host, pid, start time) under `flock`, so a second process on a
  running cell stops at once; the kernel drops the lock when its holder dies (even on kill -9).
- `SignalGuard`: SIGTERM / SIGUSR2 (SLURM's warnings before preemption) and SIGINT checkpoint at
  the next training step and end the run with `RunInterrupted` (exit status 128 + signal).
- `FiniteLoss`: a NaN / inf training loss stops the run as failed, naming the step.
- `resolve_checkpoint`: a corrupt `last.ckpt` is moved aside and the newest readable checkpoint
  is resumed instead, or the run starts over.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from reprolab.errors import ReprolabError
from reprolab.utils.run_record import (
    FINGERPRINT_FILE,
    LOCK_FILE,
    config_diff,
    file_mode,
    move_aside,
    now,
    read_or_set_aside,
)

log = logging.getLogger("reprolab")

LAST = "last.ckpt"
# A run continued with only these raised is the same run trained longer: it resumes (logged).
EXTENDABLE_KEYS = ("trainer.max_epochs", "trainer.max_steps")


# ------------------------------------------------------------------------------------- errors


class RunRefused(ReprolabError):
    """This launch did not start; nothing in the run dir was changed (no failed.json either)."""


class RunLocked(RunRefused):
    """Another process holds the run dir's lock."""


class ConfigChanged(RunRefused):
    """The run dir holds a run of another config and `on_config_change=refuse`."""


class RunDirError(ReprolabError):
    """The run dir cannot be created."""


class TrainingFailed(ReprolabError):
    """Training went wrong in a way the record must show (not recorded as finished)."""


class NonFiniteLoss(TrainingFailed):
    """The training loss became NaN or infinite."""


class NoTrainingSteps(TrainingFailed):
    """`train=true`, yet fit made no optimiser step."""


class RunInterrupted(SystemExit):
    """A run stopped by a signal. Exits with status `exit_code` = 128 + the signal number, the
    shell's convention, which SLURM and requeue scripts read; `str()` is the one-line report.

    A `SystemExit`, so that nothing that catches `Exception` (Hydra's job runner, a multirun) goes
    on to the next cell of a job that is being preempted, and so that the process exits with the
    right status even where no entry point translates it.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.exit_code = 128 + signum
        self.message = message

    def __str__(self) -> str:
        return self.message


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ------------------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """`<run_dir>/.lock`: one writer per run dir.

    `flock(LOCK_EX | LOCK_NB)` on the file; its content (host, pid, since) only names the holder.
    The kernel releases the lock when the holder dies, so a kill -9 leaves no stale lock; a lock
    still held although its pid is dead on this host (a forked worker kept the file open) is
    taken over with a warning.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        took_over = False
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise RunDirError(
                    f"cannot write the lock {self.path} ({e.strerror or e}); the run dir must be "
                    "writable: set paths.log_dir (or LOG_ROOT) to a writable directory."
                ) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._holder(fd)
                os.close(fd)
                if not took_over and self._stale(holder):
                    log.warning(
                        "Stale lock %s (pid %s on %s is gone); taking it over.",
                        self.path,
                        holder.get("pid"),
                        holder.get("host"),
                    )
                    self.path.unlink(missing_ok=True)
                    took_over = True
                    continue
                raise RunLocked(self._held_message(holder)) from None
            # The holder before us may have removed the file on release: lock the file at the path.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"host": socket.gethostname(), "pid": os.getpid(), "since": now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fchmod(fd, file_mode())
            self.fd = fd
            return self
        raise RunLocked(f"could not take the lock {self.path}; another process keeps replacing it.")

    def release(self) -> None:
        """Remove the lock file (ours: checked by inode) and drop the lock."""
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def _holder(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        return (
            holder.get("host") == socket.gethostname()
            and isinstance(pid, int)
            and pid != os.getpid()
            and not _pid_alive(pid)
        )

    def _held_message(self, holder: dict[str, Any]) -> str:
        who = (
            f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"since {holder.get('since', '?')}"
        )
        return (
            f"{self.run_dir} is being run by {who} (lock {self.path}); wait for it to finish or "
            "stop that process: two runs of one cell would write the same files."
        )


# ------------------------------------------------------------------------------------ identity


@dataclass
class Identity:
    """What `check_identity` found: `same` (resume allowed), `skip` (the finished record is this
    config's: reusable), `replaced` (the old run was moved to `moved_to`), `extended` (only
    `EXTENDABLE_KEYS` were raised: training continues)."""

    same: bool
    skip: bool = False
    replaced: bool = False
    extended: bool = False
    moved_to: Path | None = None


def _has_checkpoints(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(ckpts.rglob("*.ckpt"))


def _flat(container: dict[str, Any], key: str) -> Any:
    node: Any = container
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _extends(old: dict[str, Any], new: dict[str, Any], diff: list[str]) -> bool:
    """Whether the only differences raise `EXTENDABLE_KEYS` (train longer, same run otherwise)."""
    keys = [line.split(":", 1)[0] for line in diff]
    if not keys or any(k not in EXTENDABLE_KEYS for k in keys):
        return False
    for k in keys:
        a, b = _flat(old, k), _flat(new, k)
        if not (isinstance(a, int) and isinstance(b, int)) or a < 0 or not (b > a or b == -1):
            return False
    return True


def replace_command(argv: list[str] | None = None) -> str:
    """The command that reruns this launch with `on_config_change=replace`."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "train.py":
        args = [a for a in argv[1:] if not a.lstrip("+").startswith("on_config_change=")]
        return "python " + shlex.join(["train.py", *args, "on_config_change=replace"])
    return "the same command with on_config_change=replace"


def _open_log_files() -> set[Path]:
    files = set()
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for lg in loggers:
        for h in getattr(lg, "handlers", []):
            if isinstance(h, logging.FileHandler):
                files.add(Path(h.baseFilename).resolve())
    return files


def move_run_aside(run_dir: Path, old_fingerprint: str) -> Path:
    """Move the contents of `run_dir` to `<run_dir>.replaced-<old fingerprint>` (kept, readable).

    Contents, not the dir: this launch's lock and Hydra's `.hydra/` and open log file live in it.
    An open log file is copied (it holds the old run's lines) and stays where it is.
    """
    base = run_dir.with_name(f"{run_dir.name}.replaced-{old_fingerprint}")
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.mkdir(parents=True)
    open_logs = _open_log_files()
    for entry in sorted(run_dir.iterdir()):
        if entry.name in (LOCK_FILE, ".hydra"):
            continue
        if entry.is_file() and entry.resolve() in open_logs:
            shutil.copy2(entry, dest / entry.name)
            continue
        os.replace(entry, dest / entry.name)
    return dest


def check_identity(
    run_dir: Path,
    fingerprint: str,
    container: dict[str, Any],
    done: dict[str, Any] | None,
    *,
    policy: str = "refuse",
    resume: bool = True,
) -> Identity:
    """Compare this launch's config with the run already in `run_dir` (finished or not).

    A record without a fingerprint (written before fingerprints existed) counts as this config,
    and says so. A different config is refused (`ConfigChanged`, one line naming what differs and
    the command that starts it fresh), or with `policy="replace"` the old run is moved aside. A
    config that only raises `EXTENDABLE_KEYS` resumes (when `resume`) and continues training.
    """
    stored = read_or_set_aside(run_dir / FINGERPRINT_FILE)
    stored_fp = (stored or {}).get("fingerprint")
    done_fp = None if done is None else done.get("fingerprint")
    if done is not None and done_fp == fingerprint:
        return Identity(same=True, skip=True)
    if stored_fp == fingerprint:  # this config was started here last (after a finished record
        return Identity(same=True)  # of a shorter run, when training was extended): resume it
    if (done is not None and done_fp is None) or (
        done is None and stored is None and _has_checkpoints(run_dir)
    ):
        log.info(
            "%s records no config fingerprint (a run from before fingerprints); "
            "treating it as this config (%s).",
            run_dir,
            fingerprint,
        )
        return Identity(same=True, skip=done is not None)
    if done is None and stored_fp is None:
        return Identity(same=True)  # nothing started here yet (or only a failed start)
    # the run started here last is the one to compare with (fingerprint.json, else metrics.json)
    old_fp = stored_fp or done_fp
    where = run_dir / (FINGERPRINT_FILE if stored_fp else "metrics.json")
    old_cfg = stored.get("config") if stored and stored.get("fingerprint") == old_fp else None
    diff = config_diff(old_cfg, container) if isinstance(old_cfg, dict) else []
    shown = "; ".join(diff[:6]) + (f"; +{len(diff) - 6} more" if len(diff) > 6 else "")
    what = shown or f"the old config is not recorded ({FINGERPRINT_FILE} missing)"
    if policy == "replace":
        moved = move_run_aside(run_dir, str(old_fp))
        log.warning(
            "Config changed (%s); on_config_change=replace: moved the old run (%s) to %s; "
            "starting fresh in %s.",
            what,
            old_fp,
            moved,
            run_dir,
        )
        return Identity(same=False, replaced=True, moved_to=moved)
    if resume and isinstance(old_cfg, dict) and _extends(old_cfg, container, diff):
        log.warning(
            "Config changed only in its length (%s): continuing the run in %s from its last "
            "checkpoint (an LR schedule keeps the length it was built with; "
            "on_config_change=replace starts over instead).",
            what,
            run_dir,
        )
        return Identity(same=False, extended=True)
    state = "a finished" if done is not None else "an unfinished"
    raise ConfigChanged(
        f"{run_dir} holds {state} run of another config (fingerprint {old_fp} in {where.name}, "
        f"this config {fingerprint}; differs in {what}); the old run is left as it is. Start "
        f"this config fresh with: {replace_command()} (moves the old run to "
        f"{run_dir.name}.replaced-{old_fp}), or use another paths.log_dir."
    )


# ---------------------------------------------------------------------------------- checkpoints


def checkpoint_error(path: Path) -> str | None:
    """Why torch cannot read the checkpoint at `path` (one line), or None when it can."""
    try:  # memory-mapped: cheap, reads the zip directory and the pickled structure
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return None
    except Exception:  # noqa: BLE001 - retry without mmap (a legacy, non-zip file)
        pass
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return None
    except Exception as e:  # noqa: BLE001 - any failure makes it unusable
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _point_last_at(ckpt_dir: Path, target: Path) -> Path:
    last = ckpt_dir / LAST
    if last.is_symlink() or last.exists():
        last.unlink()
    try:
        os.symlink(os.path.relpath(target, ckpt_dir), last)
    except OSError:
        return target
    return last


def resolve_checkpoint(ckpt_dir: Path) -> str | None:
    """The checkpoint `ckpt_path=auto` resumes from in `ckpt_dir`, or None to start over.

    `last.ckpt` when torch can read it. Otherwise the unreadable file is moved aside
    (`<name>.corrupt-<UTC>`) with a warning naming it, and the newest readable `*.ckpt` is resumed
    (`last.ckpt` repointed at it), or, when none is left, the run starts over; the log says which.
    """
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / LAST
    if last.is_symlink() and not last.exists():
        log.warning("%s points at a missing file (%s); removed.", last, os.readlink(last))
        last.unlink()
    elif last.exists():
        target = last.resolve()
        err = checkpoint_error(target)
        if err is None:
            return str(last)
        moved = move_aside(target, "corrupt")
        if last.is_symlink():
            last.unlink()
        log.warning("Checkpoint %s is unreadable (%s); moved aside to %s.", target, err, moved.name)
    candidates = [p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and not p.is_symlink()]
    any_seen = bool(candidates)
    for cand in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        err = checkpoint_error(cand)
        if err is None:
            path = _point_last_at(ckpt_dir, cand)
            log.warning("Resuming from the newest readable checkpoint %s.", cand)
            return str(path)
        moved = move_aside(cand, "corrupt")
        log.warning("Checkpoint %s is unreadable (%s); moved aside to %s.", cand, err, moved.name)
    if any_seen or list(ckpt_dir.glob("*.corrupt-*")):
        log.warning("No readable checkpoint left in %s: starting over.", ckpt_dir)
    return None


def set_aside_checkpoints(ckpt_dir: Path) -> Path | None:
    """A fresh start (`ckpt_path=null`) in a dir with checkpoints moves them aside first, so that
    `last.ckpt` never keeps pointing at an old run (Lightning would write `last-v1.ckpt` beside
    it); they are kept as `checkpoints.old-<UTC>`."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir() or not any(ckpt_dir.iterdir()):
        return None
    moved = move_aside(ckpt_dir, "old")
    log.warning("ckpt_path=null starts fresh: moved the existing checkpoints aside to %s.", moved)
    return moved


# ----------------------------------------------------------------------------------- signals


class SignalGuard:
    """SIGTERM, SIGUSR2 and SIGINT end a run cleanly and resumably.

    While training, the first signal is noted and the run checkpoints at the next step boundary
    (`<ckpt_dir>/last.ckpt`, which `ckpt_path=auto` resumes) and raises `RunInterrupted`. Outside
    training (building, testing) there is nothing new to save: it raises at once. A second signal
    aborts at once. Installed for the whole run; `guard.callback(ckpt_dir)` re-installs it at
    `on_train_start`, after Lightning's own SIGTERM handler, and checks at each step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.training = False
        self.trainer: L.Trainer | None = None
        self.ckpt_dir: Path | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not the main thread: signals are not handled by the run")
            return
        for s in self.SIGNALS:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def callback(self, ckpt_dir: Path) -> L.Callback:
        return _GuardCallback(self, Path(ckpt_dir))

    def _existing_checkpoint(self) -> str:
        if self.ckpt_dir is not None and (self.ckpt_dir / LAST).exists():
            return f"checkpoint {self.ckpt_dir / LAST}"
        return "no checkpoint yet"

    def _where(self) -> str:
        if self.trainer is None:
            return " before training"
        during = " during test" if self.trainer.testing else ""
        return f"{during} at step {self.trainer.global_step}"

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal_name(signum)
        at = self._where()
        if self.signum is not None:
            raise RunInterrupted(
                signum,
                f"aborted by a second {name}{at}, without a new checkpoint "
                f"({self._existing_checkpoint()}); rerun the same command to resume.",
            )
        self.signum = signum
        if self.training:
            log.warning(
                "%s received: checkpointing at the next step boundary (send it again to abort "
                "at once).",
                name,
            )
            return
        raise RunInterrupted(
            signum,
            f"interrupted by {name}{at}; {self._existing_checkpoint()}; "
            "rerun the same command to resume.",
        )

    def interrupt(self, trainer: L.Trainer) -> None:
        """Save `<ckpt_dir>/last.ckpt` now and raise `RunInterrupted` for the pending signal."""
        assert self.signum is not None and self.ckpt_dir is not None
        self.training = False
        last = self.ckpt_dir / LAST
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        from lightning.pytorch.callbacks import ModelCheckpoint

        for cb in trainer.callbacks:
            # the saved state names last.ckpt as the last checkpoint, so that the resumed run's
            # ModelCheckpoint replaces it (instead of writing last-v1.ckpt beside it)
            if isinstance(cb, ModelCheckpoint) and cb.dirpath and Path(cb.dirpath) == self.ckpt_dir:
                cb.last_model_path = str(last)
        tmp = self.ckpt_dir / f".{LAST}.partial"
        trainer.save_checkpoint(tmp)
        os.replace(tmp, last)  # a real file replaces the link: the epoch checkpoint stays as it was
        name = signal_name(self.signum)
        raise RunInterrupted(
            self.signum,
            f"interrupted by {name} at step {trainer.global_step}; checkpoint {last}; "
            "rerun the same command to resume.",
        )


class _GuardCallback(L.Callback):
    def __init__(self, guard: SignalGuard, ckpt_dir: Path) -> None:
        self.guard = guard
        self.ckpt_dir = ckpt_dir

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.guard.trainer = trainer
        self.guard.ckpt_dir = self.ckpt_dir

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's _SignalConnector replaced the SIGTERM handler at fit start (its own raises
        # SIGTERMException at the next step, with no checkpoint): ours again, until teardown
        self.guard.training = True
        if threading.current_thread() is threading.main_thread():
            for s in SignalGuard.SIGNALS:
                signal.signal(s, self.guard._handle)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self.guard.signum is not None:
            self.guard.interrupt(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.guard.signum is not None:  # arrived after the last step (validation, epoch end)
            self.guard.interrupt(trainer)
        self.guard.training = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.guard.training = False


# ------------------------------------------------------------------------------------ finite loss


class FiniteLoss(L.Callback):
    """Stops training as failed when the loss is NaN or infinite, naming the step.

    The loss is the training step's output under automatic optimisation, and the logged
    `train/loss` for methods that optimise manually (the zeroth-order ones return nothing).
    """

    key = "train/loss"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if pl_module.automatic_optimization:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        else:
            loss = trainer.callback_metrics.get(self.key)
        if loss is None:
            return
        try:
            t = torch.as_tensor(loss).detach()
        except (TypeError, ValueError, RuntimeError):
            return
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            value = t.item() if t.numel() == 1 else "non-finite"
            name = getattr(pl_module, "name", type(pl_module).__name__)
            raise NonFiniteLoss(
                f"training loss is {value} at step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}, batch {batch_idx}) of method={name}; the run stopped "
                "as failed; lower the learning rate / step size, or check the data and the method."
            )
