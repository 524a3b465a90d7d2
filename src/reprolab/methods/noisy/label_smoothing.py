"""Label smoothing against label noise (Lukasik et al., "Does label smoothing mitigate label
noise?", ICML 2020), NPC's `ls` baseline (upstream `BaeHeeSun/NPC` @ 928f4d0, `library/LS.py`;
robustness_ood_prompting.md §4.5).

Upstream's `loss_function(outputs, labels, alpha=0.1)` is (1 − α)·CE(outputs, ỹ) + α·(−mean of
log_softmax(outputs) over the batch and the K classes), i.e. CE against the smoothed target
(1 − α)·onehot(ỹ) + α/K (PyTorch's `label_smoothing=α`).

# DEVIATION: upstream's `LS.update_model` computes `self.criterion(outputs, labels)` (plain CE) and
# never calls `loss_function`, so its `ls` classifiers are CE classifiers. This class trains with the
# smoothed loss; `method.alpha=0` reproduces what upstream ran.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.noisy.base import NoisyLabelMethod


def label_smoothing_loss(logits: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """(1 − α)·CE + α·(−mean log_softmax): upstream `LS.loss_function`. Scalar."""
    logp = F.log_softmax(logits.float(), dim=1)
    return (1 - alpha) * F.nll_loss(logp, labels) + alpha * (-logp.mean())


class LabelSmoothing(NoisyLabelMethod):
    """CE against (1 − α)·onehot(ỹ) + α/K.

    Args:
        alpha: the smoothing weight (upstream 0.1).
        **kwargs: see `NoisyLabelMethod`.
    """

    def __init__(self, *args, alpha: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigValueError(f"method={self.name}: alpha must lie in [0, 1], got {alpha}.")
        self.alpha = float(alpha)

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return label_smoothing_loss(logits, batch["label"], self.alpha)
