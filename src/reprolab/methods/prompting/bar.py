"""BAR: black-box adversarial reprogramming (Tsai et al., ICML 2020), as configured in the BlackVIP
paper's baseline (spec `blackvip.md` §4.2): a frame program around a downscaled image, focal loss,
one-sided randomized gradient-free estimates, poly-0.9 learning-rate decay.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from reprolab.data.transforms import Preprocess
from reprolab.methods.prompting.prompters import FrameProgram, focal_loss
from reprolab.methods.prompting.zeroth_order import ZerothOrderPrompting
from reprolab.optim.rgf import RGF


class BAR(ZerothOrderPrompting):
    """Frame program P = sigmoid(W) ⊙ M around the image, trained with RGF on the focal loss.

    The data module delivers `input_size` images (194 at 224; `method.input_size`), which the
    program pastes into a black canvas of the target's size.

    Args:
        input_size: side of the embedded image (194 at 224; None: scaled from the target size).
        focal_gamma: focal-loss γ (2).
        rgf: kwargs of `RGF` except `total_steps` (lr0, lr_min, n_dirs, smoothing, sigma).
        total_steps: steps of the whole run, for the LR decay; None = from the trainer.
        seed: direction generator seed.
    """

    def __init__(
        self,
        *args: Any,
        input_size: int | None = None,
        focal_gamma: float = 2.0,
        rgf: dict[str, Any] | None = None,
        total_steps: int | None = None,
        seed: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.input_size = input_size
        pre = self.preprocess
        self.prompter = FrameProgram(
            pre.image_size, _inner_size(pre.image_size, input_size), pre.mean, pre.std
        )
        self.focal_gamma = focal_gamma
        self._total_steps = total_steps
        self.optimizer = RGF(
            self.prompter.parameters(), total_steps=total_steps or 1, seed=seed, **dict(rgf or {})
        )

    def input_preprocess(self) -> Preprocess:
        """The data module must deliver the downscaled image the frame is built around."""
        size = _inner_size(self.preprocess.image_size, self.input_size)
        return dataclasses.replace(self.preprocess, image_size=size)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self._total_steps is None:  # the LR decays over 90% of the run's steps
            self.optimizer.total_steps = int(self.trainer.estimated_stepping_batches)

    def prompted_batched(self, images: Tensor, thetas: Tensor) -> Tensor:
        return self.prompter.forward_batched(images, thetas)

    def prompted(self, images: Tensor) -> Tensor:
        return self.prompter(images)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        r, b, c = logits.shape
        per = focal_loss(
            logits.reshape(r * b, c), labels.repeat(r), gamma=self.focal_gamma, reduction="none"
        )
        return per.view(r, b).mean(dim=1)


def _inner_size(frame_size: int, input_size: int | None) -> int:
    # 194 at 224 (official `INPUT.SIZE`); the same ratio, rounded to an even size, for tiny models.
    return int(input_size) if input_size else 2 * round(frame_size * 194 / 224 / 2)
