"""Zero-shot CLIP (Radford et al., ICML 2021): classify by cosine similarity to class prompts.

The ZS rows of every table. Post-hoc: `train: false`.
"""

from __future__ import annotations

from torch import Tensor

from reprolab.methods.base import ClassificationMethod


class ZeroShot(ClassificationMethod):
    """Logits = logit_scale · cos(image embedding, zero-shot text head)."""

    requires = ("classnames", "templates")

    def setup(self, stage: str) -> None:
        self.register_text_head()

    def logits(self, images: Tensor) -> Tensor:
        return self.backbone.logits(images, self.head.to(images.device))  # (B, C)
