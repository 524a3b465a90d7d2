"""CaRot: calibrated robust fine-tuning (Oh et al., NeurIPS 2024, arXiv 2311.01723; robust_finetuning.md
§2.8, the released `carot_loss.py` path of the README's main-result command).

L = L_MCL + λ_OC ‖PᵀP − I‖_F + λ_CF ‖P T_projᵀ‖_F + λ_SD L_SD

- L_MCL: FLYP's symmetric contrastive loss (`FLYP`), the student's learnable scale.
- L_OC: orthogonality of the visual projection P (ViT: `visual.proj`; ResNet: the attention pool's
  output projection, P = `c_proj.weight`ᵀ — the released ResNet line is broken, pitfall P9). Frobenius
  norm, not squared. λ_OC = 0.2.
- L_CF: the code's cross-modal Frobenius term, not in the paper's equations (λ_CF 0.05 in the
  released command; 0 turns it off).
- L_SD: self-distillation from an EMA teacher ψ (the whole CLIP, pretrained at start): soft-label CE
  of the student's image->text and text->image logits against the teacher's (its own scale), the two
  directions summed, skipped at step 0. λ_SD = 1.5.
- EMA: after the optimiser step s, when s % 500 == 0 (step 0 included), ψ <- m ψ + (1 - m) θ with
  m = m0 + (m1 - m0) s / (0.2 T) during the first 20% of the T steps, then m1 (0.05 -> 0.9).

L_OC and L_CF are computed in float32 outside autocast (pitfall P12). Under DDP the teacher's
features are gathered too, so its soft targets cover the student's global columns (P18). The teacher
stays in eval mode, outside the optimizer, and in the checkpoint (a resumed run continues its average).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from reprolab.methods.finetuning.base import normalized
from reprolab.methods.finetuning.flyp import FLYP, contrastive_loss, soft_cross_entropy


def ema_momentum(
    step: int, total_steps: int, m_start: float, m_end: float, warmup_frac: float
) -> float:
    """The teacher's momentum at optimiser step `step` (0-based) of `total_steps` (spec §2.8)."""
    warm = warmup_frac * total_steps
    if step < warm:
        return m_start + (m_end - m_start) * step / warm
    return m_end


def visual_projection(model: nn.Module) -> Tensor:
    """P with image features = x @ P: `visual.proj` (ViT) or the attention pool's `c_proj.weight`ᵀ."""
    visual = model.visual
    proj = getattr(visual, "proj", None)
    if isinstance(proj, Tensor):
        return proj
    attnpool = getattr(visual, "attnpool", None)
    if attnpool is not None:
        return attnpool.c_proj.weight.t()
    raise ValueError(f"CaRot: no visual projection found on {type(visual).__name__}")


def text_projection(model: nn.Module) -> Tensor:
    """T_proj with text features = x @ T_proj (a parameter, or a Linear's weightᵀ)."""
    proj = model.text_projection
    return proj.weight.t() if isinstance(proj, nn.Linear) else proj


def orthogonality_loss(p: Tensor) -> Tensor:
    """‖PᵀP − I‖_F (not squared), float32."""
    p = p.float()
    return torch.linalg.matrix_norm(p.t() @ p - torch.eye(p.shape[1], device=p.device))


def cross_frobenius_loss(p: Tensor, t: Tensor) -> Tensor:
    """‖P T_projᵀ‖_F, float32 (the released code's L_CF)."""
    return torch.linalg.matrix_norm(p.float() @ t.float().t())


class CaRot(FLYP):
    """FLYP + orthogonality constraint + self-distillation from an EMA teacher.

    Args:
        lambda_oc: weight of ‖PᵀP − I‖_F (0.2).
        lambda_cf: weight of ‖P T_projᵀ‖_F (0.05 in the released command; 0 = the paper's equations).
        lambda_sd: weight of the self-distillation term (1.5).
        ema_every: teacher update interval in optimiser steps (500).
        ema_m_start, ema_m_end, ema_warmup_frac: the momentum schedule (0.05 -> 0.9 over 20%).
        ema_buffers: also average floating buffers (BatchNorm statistics).
            # DEVIATION: the official EMA averages parameters only (harmless for ViT, which has no
            # buffers that change). For a BatchNorm tower a parameter-only teacher would pair averaged
            # weights with the pretrained running statistics; on by default, off for the exact code.
        **kwargs: see `FLYP`.
    """

    def __init__(
        self,
        *args: Any,
        lambda_oc: float = 0.2,
        lambda_cf: float = 0.05,
        lambda_sd: float = 1.5,
        ema_every: int = 500,
        ema_m_start: float = 0.05,
        ema_m_end: float = 0.9,
        ema_warmup_frac: float = 0.2,
        ema_buffers: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lambda_oc, self.lambda_cf, self.lambda_sd = (
            float(lambda_oc),
            float(lambda_cf),
            float(lambda_sd),
        )
        self.ema_every = int(ema_every)
        self.ema_m = (float(ema_m_start), float(ema_m_end), float(ema_warmup_frac))
        self.ema_buffers = bool(ema_buffers)
        self.teacher = copy.deepcopy(self.backbone.model).requires_grad_(False).eval()
        self.teacher_loss = contrastive_loss(with_grad=False)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self.teacher_loss = contrastive_loss(rank, world, with_grad=False)

    def train(self, mode: bool = True) -> CaRot:
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.eval()
        return self

    def param_counts(self) -> dict[str, float]:
        counts = super().param_counts()  # the teacher is a copy of the model: count the model once
        counts["params/total"] -= float(sum(p.numel() for p in self.teacher.parameters()))
        return counts

    # -- loss -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, text = self.contrastive_features(batch)
        scale = self.logit_scale()
        per_image, per_text = self.clip_loss.get_logits(image, text, scale)
        labels = self.clip_loss.get_ground_truth(image.device, per_image.shape[0])
        mcl = (
            torch.nn.functional.cross_entropy(per_image, labels)
            + torch.nn.functional.cross_entropy(per_text, labels)
        ) / 2
        model = self.backbone.model
        with torch.autocast(device_type=image.device.type, enabled=False):
            p = visual_projection(model)
            oc = orthogonality_loss(p)
            cf = (
                cross_frobenius_loss(p, text_projection(model))
                if self.lambda_cf
                else p.new_zeros(())
            )
        loss = mcl + self.lambda_oc * oc + self.lambda_cf * cf
        sd = torch.zeros((), device=image.device)
        if self.lambda_sd and self.global_step > 0:
            t_per_image, t_per_text = self.teacher_logits(batch)
            sd = soft_cross_entropy(per_image, t_per_image) + soft_cross_entropy(
                per_text, t_per_text
            )
            loss = loss + self.lambda_sd * sd
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/mcl": mcl.detach(),
                "train/oc": oc.detach(),
                "train/cf": cf.detach(),
                "train/sd": sd.detach(),
                "train/logit_scale": scale.detach(),
            },
            prog_bar=False,
        )
        return loss

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The teacher's image->text and text->image logits on the batch, its own scale."""
        tokens = self.backbone.tokenizer(self.captions(batch)).to(batch["image"].device)
        image = normalized(self.teacher.encode_image(batch["image"]).float())
        text = normalized(self.teacher.encode_text(tokens).float())
        return self.teacher_loss.get_logits(image, text, self.teacher.logit_scale.exp())

    # -- teacher --------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step - 1  # the optimiser step just taken (0-based)
        if step >= 0 and step % self.ema_every == 0:
            total = int(self.trainer.estimated_stepping_batches)
            m = ema_momentum(step, total, *self.ema_m)
            self.update_teacher(m)
            self.log("train/ema_momentum", m)

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """ψ <- m ψ + (1 - m) θ over parameters (and floating buffers with `ema_buffers`)."""
        student = dict(self.backbone.model.named_parameters())
        for name, p in self.teacher.named_parameters():
            p.mul_(m).add_(student[name].detach(), alpha=1 - m)
        student_buffers = dict(self.backbone.model.named_buffers())
        for name, b in self.teacher.named_buffers():
            if b.is_floating_point() and self.ema_buffers:
                b.mul_(m).add_(student_buffers[name], alpha=1 - m)
