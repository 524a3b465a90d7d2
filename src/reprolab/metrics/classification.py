"""Classification metrics: top-1 accuracy, negative log-likelihood, Brier score.

Functional forms take logits `(N, C)` and integer labels `(N,)`; the `Metric` classes accumulate
sums (DDP-safe) for the evaluation loops. Accuracy uses torchmetrics; NLL and Brier are not in
torchmetrics' classification package in this form (mean over samples of the multiclass score).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_accuracy


def top1_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float(
        multiclass_accuracy(logits, labels, num_classes=logits.shape[-1], average="micro")
    )


def negative_log_likelihood(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample NLL in nats: -log softmax(logits)[label]. (N, C), (N,) -> (N,)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def brier_score(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample multiclass Brier score: sum_c (p_c - 1[c = y])^2 (Brier, 1950). -> (N,)."""
    probs = logits.float().softmax(-1)
    onehot = F.one_hot(labels, probs.shape[-1]).to(probs)
    return (probs - onehot).pow(2).sum(-1)


class _MeanOfPerSample(Metric):
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_sample(self, logits: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, logits: Tensor, labels: Tensor) -> None:
        values = self._per_sample(logits, labels)
        self.total += values.double().sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class NegativeLogLikelihood(_MeanOfPerSample):
    """Mean NLL (nats) over samples, from logits."""

    def _per_sample(self, logits: Tensor, labels: Tensor) -> Tensor:
        return negative_log_likelihood(logits, labels)


class BrierScore(_MeanOfPerSample):
    """Mean multiclass Brier score over samples, from logits."""

    def _per_sample(self, logits: Tensor, labels: Tensor) -> Tensor:
        return brier_score(logits, labels)
