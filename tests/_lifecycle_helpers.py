"""Test-only callbacks for tests/test_run_lifecycle.py (importable by `_target_`, also from a
`python train.py` subprocess with tests/ on PYTHONPATH)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L


class CrashAtEpoch(L.Callback):
    """Simulates a job killed when `epoch` starts (the previous epoch's checkpoint written)."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated preemption")


class SlowSteps(L.Callback):
    """After each training step: writes the step reached to `marker` (for polling), sleeps, and
    waits (at most five minutes) while the file `hold` exists."""

    def __init__(self, seconds: float, marker: str, hold: str | None = None) -> None:
        self.seconds = seconds
        self.marker = Path(marker)
        self.hold = Path(hold) if hold else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.marker.write_text(str(trainer.global_step))
        time.sleep(self.seconds)
        deadline = time.time() + 300
        while self.hold is not None and self.hold.exists() and time.time() < deadline:
            time.sleep(0.05)


class SignalSelf(L.Callback):
    """Sends this process `signum`, `times` times, once step `at_step` has run."""

    def __init__(self, signum: int, at_step: int = 1, times: int = 1) -> None:
        self.signum, self.at_step, self.times = signum, at_step, times
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if not self.sent and trainer.global_step >= self.at_step:
            self.sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
