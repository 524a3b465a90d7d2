"""Zero-shot CLIP (Radford et al., ICML 2021): classify by cosine similarity to class prompts.

The ZS rows of every table. Post-hoc: `train: false`. Classifies any class list by name (the new
classes of a base-to-new run), on images or on cached image features (`cache_image_features`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from reprolab.methods.prompting.frozen import FrozenCLIPMethod


class ZeroShot(FrozenCLIPMethod):
    """Logits = logit_scale · cos(image embedding, zero-shot text head)."""

    requires = ("classnames", "templates")

    def setup(self, stage: str) -> None:
        self.register_text_head()

    def class_logits(self, features: Tensor, classnames: list[str]) -> Tensor:
        if list(classnames) == self.classnames:
            head = self.head
        else:  # cached per class list by the backbone
            head = self.backbone.zeroshot_weights(list(classnames), self.templates)
        feats = F.normalize(features.float(), dim=-1)
        return self.backbone.logit_scale * feats @ head.to(feats.device).t()  # (B, C)
