"""Linear probe on frozen image features (Radford et al., ICML 2021, §3.2 protocol, SGD variant).

The head is initialised from the zero-shot text head (scaled by the logit scale), so training starts
at zero-shot accuracy; features are L2-normalised as in the zero-shot classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.methods.base import ClassificationMethod


class LinearProbe(ClassificationMethod):
    """A linear classifier trained by backprop on frozen, normalised image features."""

    requires = ("classnames", "templates")

    def __init__(self, *args, init: str = "zeroshot", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.init = init
        self.head: nn.Linear | None = None

    def setup(self, stage: str) -> None:
        if self.head is not None:
            return
        w = self.backbone.zeroshot_weights(self.classnames, self.templates)  # (C, D)
        self.head = nn.Linear(w.shape[1], w.shape[0]).to(w.device)
        with torch.no_grad():
            if self.init == "zeroshot":
                self.head.weight.copy_(w * self.backbone.logit_scale)
                self.head.bias.zero_()

    def features(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return F.normalize(self.backbone.encode_image(images).float(), dim=-1)  # (B, D)

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))  # (B, C)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self.logits(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss
