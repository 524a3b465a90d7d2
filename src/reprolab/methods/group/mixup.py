"""Mixup of the batch's inputs (SubpopBench `Mixup`; spec robustness_ood_prompting.md §1.7).

Zhang et al., "mixup: Beyond Empirical Risk Minimization" (ICLR 2018), as SubpopBench runs it
(`YyzHarry/SubpopBench` `subpopbench/learning/algorithms.py`, class `Mixup`, L490-505, with
`subpopbench/utils/misc.py` `mixup_data`, L172-181). One step on a batch (x, y):

    λ ~ Beta(α, α) (one value per batch; λ = 1 when α = 0),  π = a random permutation of the batch
    x̃ = λ x + (1 − λ) x_π
    loss = λ CE(f(x̃), y) + (1 − λ) CE(f(x̃), y_π)

Plain input mixup within the batch, ignoring groups; group labels are needed only for the
evaluation (worst-group accuracy), as for ERM. Images are mixed as the preprocessed tensors the model
reads, vectors as they are. Token ids (text: integer inputs, `reprolab.data.tokens`) cannot be mixed:
there, as upstream does for text (`Mixup.update`, the `text` branch), the featurizer output is mixed
and the head reads the mixture.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.group.base import GroupMethod


def mix_inputs(x: Tensor, lam: float, perm: Tensor) -> Tensor:
    """λ x + (1 − λ) x[perm], any input shape (B, ...)."""
    return lam * x + (1.0 - lam) * x[perm.to(x.device)]


def mixup_loss(
    logits: Tensor, labels: Tensor, lam: float, perm: Tensor, label_smoothing: float = 0.0
) -> Tensor:
    """λ CE(logits, y) + (1 − λ) CE(logits, y[perm]) (batch means)."""
    first = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    second = F.cross_entropy(
        logits, labels[perm.to(labels.device)], label_smoothing=label_smoothing
    )
    return lam * first + (1.0 - lam) * second


def beta_sample(alpha: float, size: int | None = None) -> Tensor:
    """Draws from Beta(α, α) with torch's global generator (seeded by the run); () or (size,)."""
    a = torch.tensor(float(alpha), dtype=torch.float64)
    dist = torch.distributions.Beta(a, a)
    return dist.sample() if size is None else dist.sample((size,))


class Mixup(GroupMethod):
    """Input mixup within the batch (see the module docstring).

    Args:
        alpha: the Beta(α, α) parameter of λ (SubpopBench `mixup_alpha`, 0.2); 0 turns mixing off.
        **kwargs: see `GroupMethod`.
    """

    mixes_inputs = True

    def __init__(self, *args: Any, alpha: float = 0.2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if alpha < 0:
            raise ConfigValueError(f"method={self.name}: alpha must be >= 0, got {alpha}.")
        self.alpha = float(alpha)

    def sample_lambda(self) -> float:
        return float(beta_sample(self.alpha)) if self.alpha > 0 else 1.0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, labels = batch["image"], batch["label"]
        lam = self.sample_lambda()
        perm = torch.randperm(len(labels)).to(labels.device)
        if x.is_floating_point():
            logits = self.logits(mix_inputs(x, lam, perm)).float()
        else:  # token ids: mix the featurizer output (upstream's text branch)
            logits = self.head_logits(mix_inputs(self.image_features(x), lam, perm)).float()
        loss = mixup_loss(logits, labels, lam, perm, self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mixup_lambda", lam)
        return loss
