"""Visual prompting with a padding prompt (Bahng et al., arXiv 2203.17274), as the BlackVIP paper's
baselines: white-box VP (backprop through the frozen target) and VP w/ SPSA-GC (black-box).

Spec `blackvip.md` §4.3 (VPOUR) and §4.4 (VPWB).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reprolab.methods.base import ClassificationMethod
from reprolab.methods.prompting.prompters import PadPrompter
from reprolab.methods.prompting.zeroth_order import ZerothOrderPrompting
from reprolab.optim.spsa import SPSA


def _pad_for(image_size: int, pad_size: int | None) -> int:
    # 30 px at 224 (official); scaled for smaller inputs (tiny models).
    return pad_size if pad_size is not None else max(1, round(30 * image_size / 224))


class VPSPSA(ZerothOrderPrompting):
    """Padding prompt x + P (no clipping) trained with SPSA-GC through the oracle (VPOUR).

    Args:
        pad_size: strip width (30 at 224; default scales with the input size).
        init_std: std of the prompt's Gaussian init (1.0 = official).
        spsa: kwargs of `SPSA`.
        seed: perturbation generator seed.
    """

    def __init__(
        self,
        *args: Any,
        pad_size: int | None = None,
        init_std: float = 1.0,
        spsa: dict[str, Any] | None = None,
        seed: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        size = self.preprocess.image_size
        self.prompter = PadPrompter(size, _pad_for(size, pad_size), init_std)
        self.optimizer = SPSA(self.prompter.parameters(), seed=seed, **dict(spsa or {}))

    def prompted_batched(self, images: Tensor, thetas: Tensor) -> Tensor:
        return self.prompter.forward_batched(images, thetas)

    def prompted(self, images: Tensor) -> Tensor:
        return self.prompter(images)


class VP(ClassificationMethod):
    """White-box VP: the padding prompt trained by backprop through the frozen target (VPWB).

    SGD with momentum; the LR follows the official per-epoch schedule: epoch 0 at `warmup_min_lr`,
    then linear warmup lr·e/W for e < W, then a cosine of period max_epoch restarted at W.

    Args:
        pad_size: strip width (30 at 224; default scales with the input size).
        init_std: std of the prompt's Gaussian init (1.0 = official).
        lr, momentum, weight_decay: SGD settings (lr 40 for most datasets; spec §5.2).
        warmup_epochs: W (100 in the official configs).
        warmup_min_lr: LR of the first epoch (0.1).
    """

    requires = ("classnames", "templates")

    def __init__(
        self,
        *args: Any,
        pad_size: int | None = None,
        lr: float = 40.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_epochs: int = 100,
        warmup_min_lr: float = 0.1,
        init_std: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        size = self.backbone.preprocess.image_size
        self.prompter = PadPrompter(size, _pad_for(size, pad_size), init_std)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.warmup_epochs, self.warmup_min_lr = warmup_epochs, warmup_min_lr

    def setup(self, stage: str) -> None:
        self.register_text_head()

    def logits(self, images: Tensor) -> Tensor:
        return self.backbone.logits(self.prompter(images), self.head.to(images.device))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self.logits(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of `lr` at `epoch` (0-based), official VPWB schedule."""
        total = (self.trainer.max_epochs or 1) if self._trainer else 1
        return vp_lr_factor(epoch, self.lr, self.warmup_epochs, self.warmup_min_lr, total)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(
            self.prompter.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def vp_lr_factor(epoch: int, lr: float, warmup: int, warmup_min_lr: float, total: int) -> float:
    """Official VPWB per-epoch schedule as a multiplier of `lr`: epoch 0 at `warmup_min_lr`, then
    linear warmup lr·e/W for e < W, then cosine annealing whose period is the full `total` epochs,
    counted from 0 again at W (Dassl's `WARMUP_RECOUNT`): the cosine never reaches 0, its last
    epoch is at 0.5 (1 + cos(pi (total - 1 - W) / total)) of `lr` (2.5% for W 100, total 1000)."""
    if warmup > 0 and epoch == 0:
        return warmup_min_lr / lr
    if epoch < warmup:
        return epoch / warmup
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(total, 1)))
