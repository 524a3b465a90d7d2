"""Methods over a frozen CLIP backbone's image features: zero-shot, prompt learners, descriptors.

`FrozenCLIPMethod` is the base of every method whose image tower never trains (zero-shot CLIP,
CoOp / CoCoOp / KgCoOp, EPLKG, comparative descriptors). It owns the one place where image features
come from: the backbone's image encoder, or, with `cache_image_features=true`, the persistent
feature cache (`reprolab.data.feature_cache`), whose vectors the data module then serves as
`batch["image"]` (B, D). Subclasses score features against classes by name (`class_logits`), so
the same method classifies its training classes, a base-to-new run's new classes (role `new`), or
another dataset's classes (cross-dataset transfer).

Caching drops per-epoch augmentation: for CoOp / KgCoOp it is a DEVIATION (prompting_posthoc.md
A5), for EPLKG the method as released. The data module refuses it for an augmented train split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from reprolab.data.info import ImageClassificationInfo
from reprolab.methods.base import ClassificationMethod


class FrozenCLIPMethod(ClassificationMethod):
    """Classifies a frozen CLIP backbone's image features against classes given by name.

    Args:
        cache_image_features: ask the data for cached image features (encoded once per split and
            reused by every run, seed and method of the same key) instead of images.
        **kwargs: see `ClassificationMethod`.
    """

    supports_new_classes = True

    def __init__(
        self,
        name: str,
        model: nn.Module | None = None,
        info: ImageClassificationInfo | None = None,
        cache_image_features: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, model, info, **kwargs)
        self.cache_image_features = bool(cache_image_features)

    def data_requirements(self) -> dict[str, Any]:
        out = super().data_requirements()
        if self.cache_image_features:
            from reprolab.data.feature_cache import FeatureSource

            out["features"] = FeatureSource.of(self.backbone)
        return out

    def image_features(self, images: Tensor) -> Tensor:
        """Unnormalised image features (B, D) float32: encoded, or the cached vectors passed on."""
        if self.cache_image_features:
            return images.float()
        with torch.no_grad():
            return self.backbone.encode_image(images).float()

    def class_logits(self, features: Tensor, classnames: list[str]) -> Tensor:
        """Logits of unnormalised image features over `classnames`. (B, len(classnames))"""
        raise NotImplementedError

    def logits(self, images: Tensor) -> Tensor:  # (B, C)
        return self.class_logits(self.image_features(images), self.classnames)

    def new_class_logits(self, images: Tensor, classnames: list[str]) -> Tensor:
        return self.class_logits(self.image_features(images), classnames)
