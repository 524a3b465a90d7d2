"""Feature-space statistics.

`smallest_singular_value`: σ_min of the covariance of standardised features, the quantity CaRot (Oh et
al., NeurIPS 2024, arXiv 2311.01723) bounds OOD error and OOD calibration error with and raises with
its orthogonality constraint (robust_finetuning.md §2.8, "paper-level rationale").
"""

from __future__ import annotations

import torch
from torch import Tensor


def smallest_singular_value(features: Tensor, standardize: bool = True, eps: float = 1e-8) -> float:
    """Smallest singular value of the (N, D) features' covariance (dims z-scored when `standardize`).

    With standardisation the covariance is the features' correlation matrix, so σ_min is free of the
    features' scale (a fine-tuned model's feature norm changes). Computed in float64.
    """
    x = features.detach().double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"smallest_singular_value needs (N >= 2, D) features, got {tuple(x.shape)}"
        )
    x = x - x.mean(0, keepdim=True)
    if standardize:
        x = x / x.std(0, keepdim=True).clamp(min=eps)
    cov = x.t() @ x / (x.shape[0] - 1)
    return float(torch.linalg.svdvals(cov).min())
