"""ReWeight: cross-entropy weighted by inverse group size (SubpopBench `ReWeight`; spec §1.7).

`YyzHarry/SubpopBench` `subpopbench/learning/algorithms.py`, class `ReWeight` (L207-224): from the
training split's group sizes n_g (a group with none gets weight 0, upstream's 1 / inf),

    w_g = (1 / n_g) / Σ_h (1 / n_h) · G                 (G groups; the weights average to 1)
    loss = mean_i w_{g_i} · CE_i                        (the batch mean of the weighted losses)

The sizes are read when the fit starts (`base.train_group_counts`, as GroupDRO's adjustment does):
the train split the data module serves, after any few-shot sampling. A data module that gives
none fails in one line.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.group.base import GroupMethod, train_group_counts


def inverse_size_weights(counts: Tensor) -> Tensor:
    """SubpopBench's per-group weights from the group sizes: 1/n_g normalised to mean 1 (absent
    groups: 0). float64 (G,)"""
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1e-300), torch.zeros_like(counts))
    if float(inv.sum()) <= 0:
        raise ValueError("every group has size 0: no weights can be formed.")
    return inv / inv.sum() * len(counts)


class ReWeight(GroupMethod):
    """ERM with per-sample weights w_g ∝ 1 / n_g of the sample's group (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("group_weights", torch.ones(self.num_groups), persistent=False)
        self.has_weights = False

    def set_group_counts(self, counts: Tensor | None) -> None:
        """Set the weights from the training group sizes n_g (one-line errors)."""
        if counts is None:
            raise ConfigValueError(
                f"method={self.name} weights each group by 1 / its train size, and data="
                f"{self.info.name} gives no train group counts (no train_group_counts() and no "
                "group labels on its train split)."
            )
        counts = torch.as_tensor(counts).double().flatten()
        if counts.numel() != self.num_groups:
            raise ConfigValueError(
                f"method={self.name}: the train split has {counts.numel()} group counts, the task "
                f"{self.num_groups} groups."
            )
        self.group_weights.copy_(inverse_size_weights(counts).to(self.group_weights))
        self.has_weights = True

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            dm = self._trainer.datamodule if self._trainer is not None else None
            self.set_group_counts(train_group_counts(dm, self.num_groups))

    def train_loss(self, per_sample: Tensor, groups: Tensor) -> Tensor:
        if not self.has_weights:
            raise RuntimeError(f"method={self.name}: group weights were never set (setup).")
        w = self.group_weights.to(per_sample)[groups.to(per_sample.device).long()]
        self.log("train/ce", per_sample.detach().mean())
        return (w * per_sample).mean()
