"""Geodesic multi-modal mixup (Oh et al., "Geodesic Multi-Modal Mixup for Robust Fine-Tuning",
NeurIPS 2023, arXiv 2203.03897; robust_finetuning.md §2.9, pitfalls P13, P16, P18).

m2-mix adds hard negatives on the unit sphere: m_j = slerp(u_j, v_j; lambda), the geodesic mix of pair
j's image and text embeddings, lambda ~ Beta(beta, beta) once per batch. For anchor image i the
positive is its caption v_i and the negatives are the mixes m_j (j != i); the same for anchor text
v_i. With a separate temperature tau2 (the release's `--sep_scale`, 0.07):

    L_m2 = CE_rows(A) + CE_rows(B),  A_ij = u_i.m_j / tau2 (j != i), A_ii = u_i.v_i / tau2,
                                      B_ij = v_i.m_j / tau2 (j != i), B_ii = v_i.u_i / tau2,

summed over the two directions, each a mean over rows. The total is L_CLIP + w(e) mu L_m2 with
w(e) = 1 / (e + 1) at 0-indexed epoch e (`epoch_decay`, the scripts' `--schedule 1`).

m3-mix adds, each with its own lambda, uni-modal and joint mixups between pair i and pair B-1-i
(the batch reversed): image mix (mixed images against the captions, soft targets lambda I +
(1 - lambda) flip(I), symmetric soft cross-entropy, weight mu_v), text mix (the same with texts,
mu_l), joint mix (both mixed with one lambda, targets I + flip(I) as released, mu_vl). The mix terms
share w(e).

DDP (P18): the m2 term's negatives are built from the gathered global batch (gradients carried by
the gather), one lambda for all ranks (drawn from (seed, step), never from a per-rank RNG).
# DEVIATION: under DDP the m3-mix uni-modal and joint terms pair within each rank's local batch
# (the release is single-GPU, where local = global); on one device they are the release's terms.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import gather_features
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.finetuning.retrieval import CLIPFineTune

EPS = 1e-6


def slerp(a: Tensor, b: Tensor, lam: float | Tensor) -> Tensor:
    """Geodesic interpolation of unit rows: [sin(lam t) a + sin((1 - lam) t) b] / sin t, t = angle(a, b).

    `lam` weights `a` (lam = 1 returns a, 0 returns b). Computed in float32 with the cosine clamped
    to [-1 + eps, 1 - eps] (P13: arccos of a rounded cosine above 1 is NaN; sin t -> 0 divides by 0).
    """
    a32, b32 = a.float(), b.float()
    cos = (a32 * b32).sum(-1, keepdim=True).clamp(-1 + EPS, 1 - EPS)
    theta = torch.arccos(cos)
    lam = torch.as_tensor(lam, dtype=torch.float32, device=a.device)
    out = (torch.sin(lam * theta) * a32 + torch.sin((1 - lam) * theta) * b32) / torch.sin(theta)
    return out.to(a.dtype)


def m2mix_loss(
    u: Tensor,
    v: Tensor,
    lam: float,
    tau: float,
    all_u: Tensor | None = None,
    all_v: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """L_m2 of the local rows (u, v) (B, D) against the mixed negatives of the global batch
    (all_u, all_v) (N, D) (default: the local batch); row i's own pair sits at column offset + i."""
    all_u = u if all_u is None else all_u
    all_v = v if all_v is None else all_v
    m = slerp(all_u, all_v, lam)  # (N, D)
    rows = torch.arange(u.shape[0], device=u.device)
    target = rows + offset
    own = F.one_hot(target, all_u.shape[0]).bool()  # (B, N)
    pos = (u * v).sum(-1, keepdim=True)  # (B, 1)
    a = torch.where(own, pos, u @ m.t()) / tau
    b = torch.where(own, pos, v @ m.t()) / tau
    return F.cross_entropy(a, target) + F.cross_entropy(b, target)


def soft_clip_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The release's `clip_loss`: mean_i ½[CE(row i, targets row i) + CE(column i, targets column i)]
    with soft targets (rows need not sum to 1)."""
    rows = -(targets * F.log_softmax(logits, -1)).sum(-1)
    cols = -(targets.t() * F.log_softmax(logits.t(), -1)).sum(-1)
    return ((rows + cols) / 2).mean()


class M2Mix(CLIPFineTune):
    """CLIP-FT (fixed tau) + the m2-mix term.

    Args:
        m2_weight: mu of L_m2 (the scripts sweep 0.05, 0.01, 0.005, 0.001).
        m2_beta: Beta(beta, beta) of its lambda (0.5 in m2mix.sh, 0.2 in m3mix.sh).
        m2_temperature: tau2 of the mixed logits (0.07, `--tau2`; P16: a divisor).
        epoch_decay: weight the mix terms by 1 / (epoch + 1).
        seed: seed of the lambda draws (one per step and term, the same on every rank).
        **kwargs: see `CLIPFineTune` (`temperature` = tau1, 0.01).
    """

    def __init__(
        self,
        *args: Any,
        m2_weight: float = 0.01,
        m2_beta: float = 0.5,
        m2_temperature: float = 0.07,
        epoch_decay: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if m2_beta <= 0 or m2_temperature <= 0 or m2_weight < 0:
            raise ConfigValueError(
                f"method={self.name}: m2_beta and m2_temperature must be > 0 and m2_weight >= 0 "
                f"(got {m2_beta}, {m2_temperature}, {m2_weight})."
            )
        self.m2_weight, self.m2_beta = float(m2_weight), float(m2_beta)
        self.m2_temperature = float(m2_temperature)
        self.epoch_decay, self.seed = bool(epoch_decay), int(seed)

    def draw_lambda(self, beta: float, term: int) -> float:
        """lambda ~ Beta(beta, beta) from (seed, global step, term): identical across ranks and
        when a killed run resumes at this step."""
        rng = np.random.default_rng([self.seed, int(self.global_step), term])
        return float(rng.beta(beta, beta))

    def mix_weight(self) -> float:
        """w(e) = 1 / (e + 1) with `epoch_decay`, else 1."""
        return 1.0 / (self.current_epoch + 1) if self.epoch_decay else 1.0

    def _global(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return u, v, 0
        rank = self.trainer.global_rank
        all_u, all_v = gather_features(u, v, True, True, rank, world)
        return all_u, all_v, rank * u.shape[0]

    def mix_terms(self, u: Tensor, v: Tensor) -> dict[str, Tensor]:
        """Unweighted-by-w(e) mix terms (already multiplied by their mu)."""
        if self.m2_weight == 0:
            return {}
        all_u, all_v, offset = self._global(u, v)
        lam = self.draw_lambda(self.m2_beta, 0)
        return {
            "loss_m2": self.m2_weight
            * m2mix_loss(u, v, lam, self.m2_temperature, all_u, all_v, offset)
        }

    def extra_loss(self, u: Tensor, v: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        terms = self.mix_terms(u, v)
        if not terms:
            return u.new_zeros(()), {}
        total = self.mix_weight() * sum(terms.values())
        return total, {**terms, "mix_weight": torch.tensor(self.mix_weight())}


class M3Mix(M2Mix):
    """m2-mix + uni-modal (image, text) and joint mixups of pairs (i, B-1-i) (m3mix.sh).

    Args:
        uni_beta: Beta parameter of the image and text mixes (0.5).
        image_weight, text_weight: mu_v, mu_l (0.05 each).
        joint_beta: Beta parameter of the joint mix (beta1, 0.5).
        joint_weight: mu_vl (0.05, 0.1 or 0.2 in the script).
        **kwargs: see `M2Mix` (m3mix.sh: m2_weight 0.01, m2_beta 0.2).
    """

    def __init__(
        self,
        *args: Any,
        uni_beta: float = 0.5,
        image_weight: float = 0.05,
        text_weight: float = 0.05,
        joint_beta: float = 0.5,
        joint_weight: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.uni_beta, self.joint_beta = float(uni_beta), float(joint_beta)
        self.image_weight, self.text_weight = float(image_weight), float(text_weight)
        self.joint_weight = float(joint_weight)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if len(batch["caption"]) % 2:
            # P13: with an odd batch the middle pair is mixed with itself (angle 0).
            raise ConfigValueError(
                f"method={self.name} needs an even batch (got {len(batch['caption'])}); use an "
                "even data.batch_size with data.drop_last=true."
            )
        return super().training_step(batch, batch_idx)

    def mix_terms(self, u: Tensor, v: Tensor) -> dict[str, Tensor]:
        terms = super().mix_terms(u, v)
        tau = self.temperature
        eye = torch.eye(u.shape[0], device=u.device)
        flip = eye.flip(0)
        if self.image_weight:
            lam = self.draw_lambda(self.uni_beta, 1)
            logits = slerp(u, u.flip(0), lam) @ v.t() / tau
            target = lam * eye + (1 - lam) * flip
            terms["loss_image_mix"] = self.image_weight * soft_clip_loss(logits, target)
        if self.text_weight:
            lam = self.draw_lambda(self.uni_beta, 2)
            logits = u @ slerp(v, v.flip(0), lam).t() / tau
            target = lam * eye + (1 - lam) * flip
            terms["loss_text_mix"] = self.text_weight * soft_clip_loss(logits, target)
        if self.joint_weight:
            lam = self.draw_lambda(self.joint_beta, 3)
            logits = slerp(u, u.flip(0), lam) @ slerp(v, v.flip(0), lam).t() / tau
            terms["loss_joint_mix"] = self.joint_weight * soft_clip_loss(logits, eye + flip)
        return terms
