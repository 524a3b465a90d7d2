"""Logit projection for test sets labelled in a subset of the training classes.

ImageNet-A and ImageNet-R cover 200 of the 1,000 ImageNet classes: a 1000-way head is evaluated on
the 200 columns of their classes. ObjectNet's 113 classes each cover 1-3 ImageNet classes: a class's
logit is the max over its columns (robust_finetuning.md §3.1-3.2). Accuracy and ECE are computed on
the projected logits, so the softmax of the ECE runs over that set's own classes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def project_logits(logits: Tensor, index_groups: list[list[int]] | None) -> Tensor:
    """(B, C) logits -> (B, len(index_groups)): per group the max of its columns (None: as is)."""
    if index_groups is None:
        return logits
    if all(len(g) == 1 for g in index_groups):
        return logits[:, [g[0] for g in index_groups]]
    width = max(len(g) for g in index_groups)
    padded = torch.tensor(
        [list(g) + [g[0]] * (width - len(g)) for g in index_groups], device=logits.device
    )
    return logits[:, padded].amax(dim=-1)
