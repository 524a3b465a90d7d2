"""Calibration metrics."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_calibration_error


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al., 2017): sum_b |B_b|/n |acc_b - conf_b|."""
    probs = torch.softmax(logits.float(), dim=-1)
    return float(
        multiclass_calibration_error(probs, labels, logits.shape[-1], n_bins=n_bins, norm="l1")
    )
