"""What every robust fine-tuning method shares: a trainable CLIP backbone, a head on normalised image
features, gradient clipping, and the evaluation of the CaRot tables.

Evaluation (robust_finetuning.md §3): every test set of the task by its role (`ClassificationMethod`),
ECE with 10 bins, the batch-averaged ECE of the CaRot code next to the global one (`ece_batch`), the
mean over the shifted sets (`test/avg_shift/*`), and `test/sigma_min`, the smallest singular value of
the standardised covariance of the ID test set's image features (the quantity the CaRot paper's
bound is stated in; `reprolab.metrics.features`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.base import ClassificationMethod
from reprolab.metrics.features import smallest_singular_value


class FineTuningMethod(ClassificationMethod):
    """A classification method that trains (parts of) its CLIP backbone.

    Subclasses implement `head_logits(features) -> (B, C)` on raw image features and may rebuild
    their head before evaluation (`prepare_eval_head`).

    Args:
        grad_clip: clip the global gradient norm at this value (None: no clipping). Lightning
            unscales AMP gradients before clipping (the CaRot code's FT did not: pitfall P5).
        sigma_min: log `test/sigma_min` from the ID test set's image features.
        **kwargs: see `ClassificationMethod` (`ece_bins`, `ece_batch`, `optimizer`, ...).
    """

    train_backbone = True
    requires = ("classnames", "templates")
    #: `model.trainable` values this method works with (the backbone says which towers train).
    trainable_modes: ClassVar[tuple[str, ...]] = ("image", "both")

    def __init__(
        self,
        *args: Any,
        grad_clip: float | None = None,
        sigma_min: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        mode = getattr(self.backbone, "trainable", None)
        if mode not in self.trainable_modes:
            raise ConfigValueError(
                f"method={self.name} needs model.trainable in {list(self.trainable_modes)}, but "
                f"model={getattr(self.backbone, 'name', '?')} has trainable={mode}; set "
                f"model.trainable={self.trainable_modes[0]}."
            )
        self.grad_clip = grad_clip
        self.log_sigma_min = sigma_min
        self._id_features: list[Tensor] = []

    # -- logits ---------------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        """Raw (unnormalised) image embeddings, float32. (B, D)"""
        return self.backbone.encode_image(images).float()

    def head_logits(self, features: Tensor) -> Tensor:  # (B, C) from raw features (B, D)
        raise NotImplementedError

    def logits(self, images: Tensor) -> Tensor:
        return self.head_logits(self.image_features(images))

    def prepare_eval_head(self) -> None:
        """Rebuild what evaluation needs from the current weights (FLYP: the text head)."""

    def on_validation_epoch_start(self) -> None:
        self.prepare_eval_head()

    def on_test_epoch_start(self) -> None:
        self.prepare_eval_head()
        self._id_features = []

    # -- evaluation -----------------------------------------------------------------------------
    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if not (self.log_sigma_min and dataloader_idx == self._id_ref):
            return super().test_step(batch, batch_idx, dataloader_idx)
        with torch.no_grad():
            feats = self.image_features(batch["image"])
            raw = self.head_logits(feats)
        self._id_features.append(feats.cpu())
        self._update(
            self.test_metrics[dataloader_idx],
            batch,
            self.test_index_groups[dataloader_idx],
            collect_scores=self._has_ood,
            raw=raw,
        )

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.log_sigma_min and self._id_features:
            feats = torch.cat(self._id_features)
            if self.trainer.world_size > 1:
                feats = self.all_gather(feats.to(self.device)).flatten(0, 1).cpu()
            self.log("test/sigma_min", smallest_singular_value(feats), sync_dist=False)
        self._id_features = []

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (*super().metric_keys(), "test/sigma_min", "train/*")

    # -- optimisation ---------------------------------------------------------------------------
    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        value = gradient_clip_val if gradient_clip_val is not None else self.grad_clip
        if value is not None:
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm="norm")


def normalized(features: Tensor) -> Tensor:
    """L2-normalised features (the zero-shot head's input)."""
    return F.normalize(features, dim=-1)
