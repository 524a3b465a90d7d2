"""Out-of-distribution detection metrics from one score per sample, higher = more in-distribution.

In-distribution samples are the positives (the convention of Hendrycks & Gimpel, ICLR 2017, and of
the OOD papers reproduced here):
- `auroc`: area under the ROC curve;
- `fpr95`: the fraction of OOD samples accepted at the threshold that keeps 95% of ID samples
  (the smallest false-positive rate among thresholds with TPR >= 0.95);
- `fpr95_oodpos`: the mirror image that MixDiff's code reports (spec robustness_ood_prompting.md
  §0.1; `hy18284/mixdiff: mixup/utils.py`, `calculate_fpr_at`): OOD is the positive class, the
  threshold is the score of the k-th most OOD sample, k = round(0.95 n_ood) (95% of OOD samples
  detected), and the value is the fraction of ID samples strictly beyond it (rejected). Say which
  FPR a table reports: MixDiff's tables are `fpr95_oodpos`;
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

OOD_KEYS: tuple[str, ...] = ("auroc", "fpr95", "fpr95_oodpos", "aupr_in", "aupr_out")


def fpr_at_tpr(scores: Tensor, is_id: Tensor, tpr: float = 0.95) -> float:
    """False-positive rate (fraction of OOD accepted) at the first threshold with TPR >= `tpr`."""
    fpr_curve, tpr_curve, _ = binary_roc(scores, is_id)
    ok = tpr_curve >= tpr - 1e-12
    return float(fpr_curve[ok].min())


def fpr_at_ood_detection(id_scores: Tensor, ood_scores: Tensor, rate: float = 0.95) -> float:
    """MixDiff's FPR (fraction): ID samples rejected at the threshold that detects `rate` of OOD.

    Mirrors `calculate_fpr_at` of the MixDiff code on OOD-ness scores u = -s: sort the OOD
    samples from most to least OOD, take the score of the k-th, k = round(n_ood * rate) (Python's
    round, as upstream), and count the ID samples strictly more OOD than it (u_id > u_k, i.e.
    s_id < s_k here, with s higher = more in-distribution).
    """
    ood_sorted = torch.sort(ood_scores.double()).values  # ascending s = most OOD first
    k = round(len(ood_sorted) * rate)
    threshold = ood_sorted[k - 1]  # k = 0 (a single OOD sample below rate 0.5) wraps as upstream
    return float((id_scores.double() < threshold).double().mean())


def ood_metrics(id_scores: Tensor, ood_scores: Tensor) -> dict[str, float]:
    """AUROC, FPR@95%TPR (both forms), AUPR-in, AUPR-out (percent) of ID vs OOD scores
    (higher = ID)."""
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
        "fpr95_oodpos": 100.0 * fpr_at_ood_detection(id_scores, ood_scores, 0.95),
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
