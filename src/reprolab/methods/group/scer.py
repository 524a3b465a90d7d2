"""SCER: GroupDRO plus a spurious/core alignment penalty on the embeddings (spec §1.2-§1.3).

"Spurious Correlation-Aware Embedding Regularization for Worst-Group Robustness" (ICLR 2026, arXiv
2511.04401). Reproduces the official code's update (`MLAI-Yonsei/SCER`, class `SCER` in
`scer/learning/algorithms.py`, a SubpopBench fork). One step on a batch `{image, label, group}`:

    h = featurizer(x)                                     (B, d), the raw embedding
    L_dro = Σ_{g in batch} q_g L_g after q_g ← q_g exp(η L_g), renormalised   (GroupDRO, η = eta)
    L_emb = λ_sp |s| − λ_core c   from h, y = g // 2, a = g % 2  (`scer_math.scer_embedding_loss`)
    loss = L_dro + L_emb

The closed-form pieces (Σ, Δ0, Δ, a0, β, s, c) are `reprolab.methods.group.scer_math`; the q update
is `GroupDRO`'s (`GroupWeights`, SubpopBench's rule: only groups in the batch, C = 0 by default).

As upstream:
- L_emb reads the featurizer output h, the input of SubpopBench's linear classifier. With a
  zero-shot head (`normalize`) the head sees h / ‖h‖, but L_emb still reads the raw h.
- When one of G0..G3 is missing from the batch, L_emb is the previous step's value, detached (no
  gradient); before any full batch it is 0 (upstream's `embedding_loss_before_step`). The value is
  a buffer, so a resumed run picks it up. # DEVIATION: upstream keeps it in a plain attribute, so
  its resumed runs restart from 0; this only matters at a resume point.
- Only binary y and a enter the regulariser: with 2 classes the data has 4 groups g = 2y + a; with
  more classes (MultiNLI: 3 × 2 = 6 groups) the groups with y ≥ 2 are in L_dro and in Σ but not in
  Δ, Δ0 or a0 (spec §1.2 "Points to note"). Other group layouts fail when the method is built.

Upstream code differences, all without effect on the value or gradient:
- upstream's `SCER.__init__` calls `super(EDRO3, self)` (a renamed class: it crashes as published),
  and on 3-class data its `group_counts[idx_g] += ...` raises KeyError for groups 4 and 5; here
  both work as the spec describes.
- group means from one forward pass under a mask, not a re-run of the featurizer per group
  (`scer_math.group_means`: differs only under BatchNorm / dropout in train mode; spec §1.2 step 3).
- β with `torch.linalg.solve`, not `inv`; s and c with ‖Δ0‖_Σ (‖Δ‖_Σ) cancelled (`scer_math`).

`beta_source=head` (an ablation, spec §1.2): β is the head's logit difference w1 − w0 instead of the
closed form; then L_emb also trains the head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.group.groupdro import GroupDRO
from reprolab.methods.group.scer_math import BETA_SOURCES, NUM_ATTRIBUTES, scer_embedding_loss


class SCER(GroupDRO):
    """GroupDRO's robust loss plus SCER's embedding loss on the featurizer output.

    Args:
        lambda_spurious: λ_sp, the weight of |s| (SCER `lambda_spurious`, 1.0).
        lambda_core: λ_core, the weight of −c (SCER `lambda_core`, 1.0).
        beta_source: `closed_form` (upstream: β from the batch's statistics) or `head` (β = w1 − w0
            of the linear head; binary labels only).
        **kwargs: see `GroupDRO` (`eta` is SCER's `scer_eta`) and `GroupMethod`.
    """

    def __init__(
        self,
        *args: Any,
        lambda_spurious: float = 1.0,
        lambda_core: float = 1.0,
        beta_source: str = "closed_form",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if beta_source not in BETA_SOURCES:
            raise ConfigValueError(
                f"method={self.name}: beta_source must be one of {list(BETA_SOURCES)}, got "
                f"{beta_source!r}."
            )
        num_classes = len(self.classnames)
        if num_classes < 2 or self.num_groups != NUM_ATTRIBUTES * num_classes:
            raise ConfigValueError(
                f"method={self.name} needs groups g = {NUM_ATTRIBUTES}·y + a with a binary "
                f"spurious attribute ({NUM_ATTRIBUTES * num_classes} groups for "
                f"{num_classes} classes), but data={self.info.name} has {self.num_groups} groups."
            )
        if beta_source == "head" and num_classes != 2:
            raise ConfigValueError(
                f"method={self.name}: beta_source=head takes β = w1 − w0 of a binary head, and "
                f"data={self.info.name} has {num_classes} classes; set "
                "method.beta_source=closed_form."
            )
        if beta_source == "closed_form" and not self._backbone_trains:
            raise ConfigValueError(
                f"method={self.name} regularises the featurizer's output, and "
                f"model={getattr(self.backbone, 'name', '?')} is frozen (model.trainable=none): "
                "L_emb would have no gradient (SCER = GroupDRO); set model.trainable=image."
            )
        self.lambda_spurious = float(lambda_spurious)
        self.lambda_core = float(lambda_core)
        self.beta_source = beta_source
        # L_emb of the last batch that had all of G0..G3 (detached); 0 before the first.
        self.register_buffer("prev_l_emb", torch.zeros(()))

    def embedding_loss(self, h: Tensor, groups: Tensor) -> Tensor:
        """L_emb of the batch, or the previous one (detached) when a group of G0..G3 is missing.

        Logs `train/scer_s`, `train/scer_c`, `train/scer_a0` on the batches that compute it.
        """
        groups = groups.to(h.device).long()
        head_weight = self.head.weight if self.beta_source == "head" else None
        out = scer_embedding_loss(
            h,
            groups // NUM_ATTRIBUTES,
            groups % NUM_ATTRIBUTES,
            self.lambda_spurious,
            self.lambda_core,
            beta_source=self.beta_source,
            head_weight=head_weight,
        )
        if out is None:  # upstream: the previous step's value, no gradient
            return self.prev_l_emb.clone()
        loss, diag = out
        self.prev_l_emb.copy_(loss.detach())
        self.log_dict({f"train/scer_{k}": v.float() for k, v in diag.items()})
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        groups = self.batch_groups(batch)
        labels = batch["label"]
        if not torch.equal(groups.long() // NUM_ATTRIBUTES, labels.long()):
            raise ConfigValueError(
                f"method={self.name} reads y = group // {NUM_ATTRIBUTES} and a = group % "
                f"{NUM_ATTRIBUTES}, but the groups of data={self.info.name} are not "
                f"{NUM_ATTRIBUTES}·label + attribute."
            )
        h = self.image_features(batch["image"])  # (B, d): raw featurizer output
        per_sample = self.per_sample_loss(self.head_logits(h), labels)
        l_dro = self.train_loss(per_sample, groups)  # GroupDRO: updates q, logs its stats
        l_emb = self.embedding_loss(h, groups)
        loss = l_dro + l_emb
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/l_dro": l_dro.detach(), "train/l_emb": l_emb.detach()})
        self.log_group_terms(per_sample, groups)
        return loss
