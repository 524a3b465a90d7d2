"""Toy pieces shared by the group-method tests (test_group_methods, test_scer_method,
test_group_baselines): a 3 -> 4 featurizer, data modules that serve given batches, a task info, and
a bare trainer that fits one pass over the batches."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from reprolab.data.info import ImageClassificationInfo


class Featurizer(nn.Module):
    """A trainable 3 -> 4 featurizer with the backbone surface the group methods read."""

    def __init__(self, trainable: str = "image", bn: bool = False) -> None:
        super().__init__()
        self.name, self.trainable, self.feature_dim, self.preprocess = "toy", trainable, 4, None
        layers = [nn.Linear(3, 4), *([nn.BatchNorm1d(4)] if bn else []), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.requires_grad_(trainable != "none")

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BatchData(L.LightningDataModule):
    """Serves `batches` as they are; no train group counts."""

    def __init__(self, batches: list[dict], counts: list[float] | None = None) -> None:
        super().__init__()
        self.batches, self.counts, self.name = batches, counts, "toy"

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


class CountedBatchData(BatchData):
    """`BatchData` that also publishes train group counts."""

    def train_group_counts(self) -> list[float] | None:
        return self.counts


def toy_info(num_groups: int | None, classes: int = 2) -> ImageClassificationInfo:
    return ImageClassificationInfo(
        name="toy", classnames=tuple("abcdef"[:classes]), templates=("{}",), num_groups=num_groups
    )


def fit_batches(
    method: L.LightningModule, datamodule: L.LightningDataModule, callbacks: list | None = None
) -> L.Trainer:
    """One pass over the data module's batches on the CPU, nothing logged or saved."""
    trainer = L.Trainer(
        max_steps=len(datamodule.batches),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(method, datamodule=datamodule)
    return trainer
