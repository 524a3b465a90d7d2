"""Group robustness: accuracy per group, worst-group and average-group accuracy.

Groups are (label, attribute) combinations such as Waterbirds' (bird, background). Worst-group
accuracy is the minimum over groups that occur in the evaluated data (Sagawa et al., ICLR 2020);
average-group accuracy is the unweighted mean over those groups (SubpopBench's `adjusted_accuracy`);
weighted accuracy weights each group's accuracy by its share of the *training* data (group_DRO's
Waterbirds convention, "average accuracy" of the DFR / JTT tables), over the groups present.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def group_accuracies(preds: Tensor, labels: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Accuracy (fraction) per group; NaN for a group with no sample. -> (num_groups,)."""
    correct = torch.bincount(groups, weights=(preds == labels).double(), minlength=num_groups)
    total = torch.bincount(groups, minlength=num_groups).double()
    return torch.where(total > 0, correct / total.clamp(min=1), torch.nan)


def weighted_accuracy(per_group: Tensor, weights: Tensor) -> Tensor:
    """Σ_g w_g acc_g / Σ_g w_g over the groups with an accuracy (not NaN). -> ()"""
    seen = ~torch.isnan(per_group)
    w = weights.to(per_group)[seen]
    return (w * per_group[seen]).sum() / w.sum()


class GroupAccuracy(Metric):
    """Accuracy per group (DDP-safe sums); `compute` gives `{"worst", "average"}` as fractions,
    `group<k>` for every group present, and `weighted` once `set_weights` has given the training
    group shares."""

    full_state_update = False

    def __init__(self, num_groups: int) -> None:
        super().__init__()
        self.num_groups = int(num_groups)
        self.add_state(
            "correct", torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("total", torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.weights: Tensor | None = None

    def set_weights(self, counts: Tensor | None) -> None:
        """The training group counts (or shares) that `weighted` averages with; None: none."""
        self.weights = None if counts is None else torch.as_tensor(counts, dtype=torch.float64)
        self._computed = None  # torchmetrics caches compute(): the weights change its value

    def update(self, preds: Tensor, labels: Tensor, groups: Tensor) -> None:
        if groups.numel() and int(groups.max()) >= self.num_groups:
            raise ValueError(
                f"group index {int(groups.max())} out of range for num_groups={self.num_groups}"
            )
        n = self.num_groups
        self.correct += torch.bincount(groups, weights=(preds == labels).double(), minlength=n)
        self.total += torch.bincount(groups, minlength=n).double()

    def compute(self) -> dict[str, Tensor]:
        seen = self.total > 0
        acc = self.correct[seen] / self.total[seen]
        out = {"worst": acc.min().float(), "average": acc.mean().float()}
        per_group = torch.where(seen, self.correct / self.total.clamp(min=1), torch.nan)
        if self.weights is not None and len(self.weights) == self.num_groups:
            out["weighted"] = weighted_accuracy(per_group, self.weights).float()
        for g in torch.nonzero(seen).flatten().tolist():
            out[f"group{g}"] = per_group[g].float()
        return out
