"""Symmetric cross-entropy (Wang et al., "Symmetric Cross Entropy for Robust Learning with Noisy
Labels", ICCV 2019), NPC's `sce` baseline (upstream `BaeHeeSun/NPC` @ 928f4d0, `library/SCE.py`;
robustness_ood_prompting.md §4.5).

SCE = α·CE(p, ỹ) + β·RCE, RCE = −Σ_k p_k·log q_k with p = softmax clamped to [1e-7, 1] and q =
onehot(ỹ) clamped to [1e-4, 1], i.e. log 0 is read as A = log(1e-4) ≈ −9.21 and RCE = −A·(1 − p_ỹ)
(for p_ỹ ≥ 1e-7). α/β as upstream: CNN_MNIST 0.01/1.0, CNN and ResNet-50 0.1/1.0 (the SCE paper's
MNIST and CIFAR-10 values); `alpha: null` picks by the model.

`rce_reduction`: `sum` over the classes (the SCE paper and its official code) or `mean` (upstream
NPC's `loss_function`, which divides RCE by K); either way RCE is then averaged over the batch.

# DEVIATION: upstream's `SCE.update_model` computes plain CE (`self.criterion`) and never calls its
# `loss_function`, so its `sce` classifiers are CE classifiers; `method.alpha=1 method.beta=0`
# reproduces what upstream ran.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.noisy.base import NoisyLabelMethod

log = logging.getLogger(__name__)

RCE_LOG_ZERO = 1e-4  # the one-hot target is clamped here: log(0) := log(1e-4)
PROB_MIN = 1e-7


def sce_loss(
    logits: Tensor, labels: Tensor, alpha: float, beta: float, rce_reduction: str = "sum"
) -> Tensor:
    """α·CE + β·RCE (module docstring), averaged over the batch. Scalar."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels)
    p = F.softmax(logits, dim=1).clamp(PROB_MIN, 1.0)
    target = F.one_hot(labels, logits.shape[1]).float().clamp(RCE_LOG_ZERO, 1.0)
    terms = -(p * torch.log(target))
    rce = terms.sum(dim=1) if rce_reduction == "sum" else terms.mean(dim=1)
    return alpha * ce + beta * rce.mean()


class SCE(NoisyLabelMethod):
    """α·CE + β·RCE against the noisy labels.

    Args:
        alpha: CE weight (None: 0.01 for cnn_mnist, 0.1 otherwise, as upstream).
        beta: RCE weight (1.0).
        rce_reduction: `sum` (SCE paper) or `mean` (upstream NPC's definition).
        **kwargs: see `NoisyLabelMethod`.
    """

    def __init__(
        self,
        *args,
        alpha: float | None = None,
        beta: float = 1.0,
        rce_reduction: str = "sum",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if rce_reduction not in ("sum", "mean"):
            raise ConfigValueError(
                f"method={self.name}: rce_reduction must be sum or mean, got {rce_reduction!r}."
            )
        if alpha is None:
            from reprolab.models.cnn import CNNMNIST

            alpha = 0.01 if isinstance(self.backbone, CNNMNIST) else 0.1
            log.info(
                "%s: alpha=%s for model=%s (upstream)",
                self.name,
                alpha,
                getattr(self.backbone, "name", "?"),
            )
        self.alpha, self.beta, self.rce_reduction = float(alpha), float(beta), rce_reduction

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return sce_loss(logits, batch["label"], self.alpha, self.beta, self.rce_reduction)
