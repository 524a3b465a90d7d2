"""Calibration: expected calibration error with equal-width confidence bins (Guo et al., ICML 2017).

ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|, bins of width 1/n_bins over the top-1 confidence.
15 bins is the common default (and this project's); the robust fine-tuning tables use 10.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_calibration_error

ECE_BINS = 15
ECE_BINS_ROBUST_FT = 10  # robust_finetuning.md: CaRot / FLYP calibration tables


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE (a fraction in [0, 1]) of the softmax of `logits` (N, C) against `labels` (N,)."""
    probs = torch.softmax(logits.float(), dim=-1)
    return float(
        multiclass_calibration_error(probs, labels, logits.shape[-1], n_bins=n_bins, norm="l1")
    )


class BatchAveragedECE(Metric):
    """ECE per evaluation batch, averaged with batch-size weights (robust_finetuning.md §3.2, A).

    What the CaRot code reports (`src/models/eval.py`): each batch's ECE (equal-width bins, L1),
    weighted by its size. It depends on the eval batch size (512 in the paper), the loader order
    and the last partial batch, so it is only comparable at the paper's batch size and order; the
    global ECE (`MulticlassCalibrationError`) is the standard number. Fed probabilities `(B, C)`.
    """

    full_state_update = False

    def __init__(self, n_bins: int = ECE_BINS) -> None:
        super().__init__()
        self.n_bins = int(n_bins)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, labels: Tensor) -> None:
        ece = multiclass_calibration_error(
            probs.float(), labels, probs.shape[-1], n_bins=self.n_bins, norm="l1"
        )
        self.total += ece.double() * labels.numel()
        self.count += labels.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()
