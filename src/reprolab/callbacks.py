"""Callbacks the runner adds to every run."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from torch import Tensor


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor (dict, tuple or tensor)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        values = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        return 0
    for v in values:
        n = batch_size_of(v)
        if n:
            return n
    return 0


class Throughput(L.Callback):
    """Samples per second in training and in test, from wall time between stage start and end.

    Training time covers the whole fit loop (data loading and validation included), which is what a
    user waits for; `train_s` and `test_s` are kept so rates can be recomputed. The same numbers as
    EPLKG's efficiency columns (prompting_posthoc.md §0.2), measured identically for every method:
    `train/sec_per_image` = training wall time / (epochs x training images) (images seen),
    `test/sec_per_image` likewise, and on CUDA `train/peak_mem_gb` =
    `torch.cuda.max_memory_allocated` at the end of the first training epoch (the runner resets the
    peak before fitting; on a CPU there is no per-run allocator peak, so the key is left out).
    """

    def __init__(self) -> None:
        self.samples = {"train": 0, "test": 0}
        self.seconds = {"train": 0.0, "test": 0.0}
        self._t0: dict[str, float] = {}
        self.peak_mem_gb: float | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch

        if self.peak_mem_gb is None and torch.cuda.is_available():
            device = pl_module.device
            if device.type == "cuda":
                self.peak_mem_gb = round(torch.cuda.max_memory_allocated(device) / 1e9, 4)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0["train"] = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds["train"] += time.perf_counter() - self._t0.pop("train", time.perf_counter())

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0["test"] = time.perf_counter()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds["test"] += time.perf_counter() - self._t0.pop("test", time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.samples["train"] += batch_size_of(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # noqa: ANN001
        self.samples["test"] += batch_size_of(batch)

    def metrics(self, queried_images: float | None = None) -> dict[str, float]:
        """`throughput/*` keys of the run record (stages that did not run are left out)."""
        out: dict[str, float] = {}
        for stage in ("train", "test"):
            if self.samples[stage] and self.seconds[stage] > 0:
                out[f"throughput/{stage}_samples_per_s"] = round(
                    self.samples[stage] / self.seconds[stage], 2
                )
                out[f"throughput/{stage}_s"] = round(self.seconds[stage], 3)
                out[f"{stage}/sec_per_image"] = self.seconds[stage] / self.samples[stage]
        if self.peak_mem_gb is not None:
            out["train/peak_mem_gb"] = self.peak_mem_gb
        if queried_images and self.seconds["train"] > 0:
            out["throughput/queried_images_per_s"] = round(
                queried_images / self.seconds["train"], 2
            )
        return out
