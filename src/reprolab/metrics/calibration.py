"""Calibration: expected calibration error with equal-width confidence bins (Guo et al., ICML 2017).

ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|, bins of width 1/n_bins over the top-1 confidence.
15 bins is the common default (and this project's); the robust fine-tuning tables use 10.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_calibration_error

ECE_BINS = 15
ECE_BINS_ROBUST_FT = 10  # robust_finetuning.md: CaRot / FLYP calibration tables


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE (a fraction in [0, 1]) of the softmax of `logits` (N, C) against `labels` (N,)."""
    probs = torch.softmax(logits.float(), dim=-1)
    return float(
        multiclass_calibration_error(probs, labels, logits.shape[-1], n_bins=n_bins, norm="l1")
    )
