"""Out-of-distribution detection metrics from one score per sample, higher = more in-distribution.

In-distribution samples are the positives (the convention of Hendrycks & Gimpel, ICLR 2017, and of
the OOD papers reproduced here):
- `auroc`: area under the ROC curve;
- `fpr95`: the fraction of OOD samples accepted at the threshold that keeps 95% of ID samples
  (the smallest false-positive rate among thresholds with TPR >= 0.95);
- `aupr_in`: average precision with ID as positive; `aupr_out`: with OOD as positive (scores negated).
All in percent. torchmetrics computes the curves.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_roc,
)
from torchmetrics.utilities import dim_zero_cat

OOD_KEYS: tuple[str, ...] = ("auroc", "fpr95", "aupr_in", "aupr_out")


def fpr_at_tpr(scores: Tensor, is_id: Tensor, tpr: float = 0.95) -> float:
    """False-positive rate (fraction of OOD accepted) at the first threshold with TPR >= `tpr`."""
    fpr_curve, tpr_curve, _ = binary_roc(scores, is_id)
    ok = tpr_curve >= tpr - 1e-12
    return float(fpr_curve[ok].min())


def ood_metrics(id_scores: Tensor, ood_scores: Tensor) -> dict[str, float]:
    """AUROC, FPR@95%TPR, AUPR-in, AUPR-out (percent) of ID vs OOD scores (higher = ID)."""
    if id_scores.numel() == 0 or ood_scores.numel() == 0:
        raise ValueError(
            f"OOD metrics need scores of both sets (got {id_scores.numel()} ID, "
            f"{ood_scores.numel()} OOD)"
        )
    scores = torch.cat([id_scores, ood_scores]).double()
    is_id = torch.cat([torch.ones_like(id_scores), torch.zeros_like(ood_scores)]).long()
    return {
        "auroc": 100.0 * float(binary_auroc(scores, is_id)),
        "fpr95": 100.0 * fpr_at_tpr(scores, is_id, 0.95),
        "aupr_in": 100.0 * float(binary_average_precision(scores, is_id)),
        "aupr_out": 100.0 * float(binary_average_precision(-scores, 1 - is_id)),
    }


class ScoreCollector(Metric):
    """Collects per-sample scores across batches (and ranks); `compute` returns them all."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor) -> None:
        self.scores.append(scores.detach().float().flatten())

    def compute(self) -> Tensor:
        if not self.scores:
            return torch.empty(0)
        return dim_zero_cat(self.scores)
