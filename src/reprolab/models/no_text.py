"""The CLIP-backbone surface of a featurizer without a text tower (`MLPFeaturizer`, `BertFeaturizer`).

The fine-tuning and group methods size a fresh head from `zeroshot_weights` (`FineTune.build_head`,
`LinearProbe.setup`), so a featurizer without text returns a NaN placeholder of the head's shape
(C, feature_dim); every use of its values goes through `logit_scale`, `encode_text` or `logits`,
which raise a one-line `ConfigValueError` naming `head_init=random`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from reprolab.errors import ConfigValueError


class NoTextTower:
    """Mixin for an `nn.Module` featurizer with `name` and `feature_dim` and no text tower."""

    #: How the error names the model: "model=<name> is <what_it_is>: it has no ...".
    what_it_is: ClassVar[str] = "a featurizer without a text tower"
    name: str
    feature_dim: int

    @property
    def text_trainable(self) -> bool:
        return False

    def _no_text(self, what: str) -> ConfigValueError:
        return ConfigValueError(
            f"model={self.name} is {self.what_it_is}: it has no {what}, so a zero-shot head cannot "
            "apply; start the head at random (method.head_init=random for ft / lp_ft and the group "
            "methods, method.init=random for linear_probe)."
        )

    @torch.no_grad()
    def zeroshot_weights(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        """A NaN placeholder (C, feature_dim): the shape a fresh head needs, no values (no text)."""
        device = next(self.parameters(), torch.empty(0)).device  # type: ignore[attr-defined]
        return torch.full((len(classnames), self.feature_dim), float("nan"), device=device)

    @property
    def logit_scale(self) -> float:
        raise self._no_text("logit scale")

    def encode_text(self, texts: list[str]) -> Tensor:
        raise self._no_text("text encoder")

    def logits(self, images: Tensor, weights: Tensor) -> Tensor:
        raise self._no_text("zero-shot classifier")
