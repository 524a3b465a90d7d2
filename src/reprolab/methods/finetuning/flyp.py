"""FLYP: fine-tune like you pretrain (Goyal et al., CVPR 2023, arXiv 2212.00638; robust_finetuning.md
§1.6, §2.5).

Both towers and the logit scale train with CLIP's symmetric contrastive loss on (image, caption)
pairs, the caption being a random class template filled with the image's class name. The batch's
negatives are the other captions, same-class ones included (no de-duplication). The loss is
open_clip's `ClipLoss`; under DDP it sees the global batch (`local_loss=True, gather_with_grad=True`,
spec §1.6 / pitfall P17), so the update equals the single-device one on the same global batch.

The (image, template) pairs come from the data module (`caption_pairs=True`: every train image with
every template, shuffled; captions are formatted per batch, never written out). Evaluation rebuilds
the zero-shot head from the fine-tuned text tower with all templates and uses the learned,
unclamped logit scale (pitfall P15: it sets the temperature and so the ECE).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor

from reprolab.methods.finetuning.base import FineTuningMethod, normalized


class FLYP(FineTuningMethod):
    """Contrastive fine-tuning of the whole CLIP (`model.trainable=both`)."""

    trainable_modes = ("both",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clip_loss = contrastive_loss()
        self.register_buffer("head", torch.empty(0), persistent=False)

    def data_requirements(self) -> dict[str, Any]:
        return {**super().data_requirements(), "caption_pairs": True}

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self.clip_loss = contrastive_loss(rank, world)

    # -- training -------------------------------------------------------------------------------
    def captions(self, batch: dict[str, Tensor]) -> list[str]:
        """The batch's captions: template `batch["template"][i]` of the image's class name."""
        return [
            self.templates[int(t)].format(self.classnames[int(y)].replace("_", " "))
            for y, t in zip(batch["label"], batch["template"], strict=True)
        ]

    def logit_scale(self) -> Tensor:
        """exp(learned log-scale), unclamped, with gradients."""
        return self.backbone.model.logit_scale.exp()

    def contrastive_features(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """L2-normalised image and caption features of the batch. (B, D), (B, D)"""
        image = normalized(self.backbone.encode_image(batch["image"]).float())
        text = normalized(self.backbone.encode_text(self.captions(batch)).float())
        return image, text

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, text = self.contrastive_features(batch)
        scale = self.logit_scale()
        loss = self.clip_loss(image, text, scale)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", scale.detach())
        return loss

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_eval_head(self) -> None:
        """The zero-shot head of the current text tower (all templates) times the learned scale."""
        self.head = self.backbone.zeroshot_weights(self.classnames, self.templates) * float(
            self.logit_scale()
        )

    def head_logits(self, features: Tensor) -> Tensor:
        if self.head.numel() == 0:
            self.prepare_eval_head()
        return normalized(features) @ self.head.t()


def contrastive_loss(rank: int = 0, world_size: int = 1, with_grad: bool = True) -> ClipLoss:
    """open_clip's `ClipLoss` as FLYP / CaRot need it: under DDP each rank's rows against the global
    batch's columns, the gather carrying gradients (`local_loss=True, gather_with_grad=True`), which
    is gradient-equivalent to the single-process loss on the global batch (spec §1.6). `with_grad=False`
    for the CaRot teacher's logits (no gradient to carry)."""
    return ClipLoss(
        local_loss=True,
        gather_with_grad=with_grad,
        cache_labels=True,
        rank=rank,
        world_size=world_size,
    )


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """mean_i [ -sum_j softmax(teacher_i)_j log softmax(student_i)_j ], with log_softmax (P11)."""
    return -(F.softmax(teacher_logits, -1) * F.log_softmax(student_logits, -1)).sum(-1).mean()
