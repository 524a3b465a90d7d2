"""Forward loss correction (Patrini et al., "Making Deep Neural Networks Robust to Label Noise: a Loss
Correction Approach", CVPR 2017), NPC's `forward` baseline (upstream `BaeHeeSun/NPC` @ 928f4d0,
`library/FORWARD.py`; robustness_ood_prompting.md §4.5).

With T[i, j] = P(ỹ = j | y = i), the network's clean posterior p(y|x) = softmax(logits) is pushed
through T and trained with the NLL of the noisy label: loss = −log (p(y|x)ᵀ T)_ỹ, the product
clamped to [1e-6, 1 − 1e-6] as upstream.

T (`transition`):
- `estimated` (upstream, default): one warm-up epoch of plain CE (`warmup_epochs`; upstream runs it
  before its `total_epochs`, so set trainer.max_epochs = 201 for parity), then before every epoch
  (`reestimate: true`; false: once, after the warm-up, as Patrini et al.) T is re-estimated from the
  posteriors recorded during the previous epoch: for each noisy class i, among the training samples
  labelled i, the sample at the 97th percentile of the class-i posterior (`torch.topk(p_i,
  int(0.03·n_i))[-1]`) is the anchor, and T[i, :] is its posterior over the noisy classes.
- `known`: the data's own true T (`datamodule.transition`: symmetric and asymmetric noise only).

# DEVIATION: upstream's `loss_forward` multiplies T^T[ỹ] and p(y|x) element-wise and reads entry ỹ,
# i.e. −log(T[ỹ, ỹ]·p(ỹ|x)), whose gradient is plain CE's (T is a constant); here the product is
# the matrix one of the paper. Consistently, the posteriors the estimator records are the model's
# noisy-label posterior p(y|x)ᵀT (= p(y|x) in the CE warm-up): upstream records p(y|x) of a network
# that its CE-equivalent loss trains to predict ỹ, which is that same quantity.

Upstream optimises with Adagrad, lr 1e-3 (configs/method/forward.yaml).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reprolab.errors import ConfigValueError
from reprolab.methods.noisy.base import NoisyLabelMethod

log = logging.getLogger(__name__)

TRANSITIONS = ("estimated", "known")
ANCHOR_TOP = 0.03  # upstream: torch.topk(p_i, int(len * 0.03))[-1], the 97th percentile
CLAMP = 1e-6


def forward_loss(logits: Tensor, labels: Tensor, transition: Tensor) -> Tensor:
    """−log (softmax(logits) @ T)[ỹ], clamped to [1e-6, 1 − 1e-6], averaged over the batch."""
    noisy = F.softmax(logits.float(), dim=1) @ transition.float()  # (B, K): p(ỹ | x)
    return F.nll_loss(torch.log(noisy.clamp(CLAMP, 1 - CLAMP)), labels)


def estimate_transition(
    probs: Tensor, labels: Tensor, num_classes: int, top: float = ANCHOR_TOP
) -> Tensor:
    """Upstream's anchor estimate of T from per-sample posteriors over the noisy classes.

    Args:
        probs: (N, K) posteriors recorded for the training samples.
        labels: (N,) their noisy labels.
        num_classes: K.
        top: the anchor of class i is the sample at rank max(1, int(top·n_i)) of p_i among the n_i
            samples labelled i (rank 1 = the largest).

    Returns:
        T (K, K), row i = the anchor's posterior (identity row for a class with no sample).
    """
    t = torch.eye(num_classes, dtype=probs.dtype)
    for i in range(num_classes):
        rows = probs[labels == i]
        if len(rows) == 0:
            continue
        k = max(1, int(len(rows) * top))
        anchor = torch.topk(rows[:, i], k).indices[-1]
        t[i] = rows[anchor]
    return t


class Forward(NoisyLabelMethod):
    """Forward-corrected CE with an estimated or the true transition matrix.

    Args:
        transition: `estimated` (upstream) or `known` (the data's true T).
        warmup_epochs: epochs of plain CE before the correction starts (upstream 1).
        reestimate: re-estimate T before every corrected epoch (upstream) or once (Patrini).
        **kwargs: see `NoisyLabelMethod`.
    """

    def __init__(
        self,
        *args: Any,
        transition: str = "estimated",
        warmup_epochs: int = 1,
        reestimate: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if transition not in TRANSITIONS:
            raise ConfigValueError(
                f"method={self.name}: transition must be one of {list(TRANSITIONS)}, got {transition!r}."
            )
        if transition == "estimated" and int(warmup_epochs) < 1:
            raise ConfigValueError(
                f"method={self.name}: an estimated T needs a CE warm-up to read posteriors from; "
                "set method.warmup_epochs >= 1 (or method.transition=known)."
            )
        self.transition_mode = transition
        self.warmup_epochs = int(warmup_epochs)
        self.reestimate = bool(reestimate)
        k = len(self.classnames)
        self.register_buffer("transition", torch.eye(k))  # persistent: in checkpoints
        self._probs: Tensor | None = None  # (N, K) posteriors recorded this epoch (CPU)
        self._labels: Tensor | None = None
        self._seen: Tensor | None = None
        self._estimated = False

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.transition_mode == "known":
            t = getattr(getattr(self.trainer, "datamodule", None), "transition", None)
            if t is None:
                raise ConfigValueError(
                    f"method={self.name} transition=known needs the data's transition matrix, and "
                    "this data has none (instance-dependent or real noise); set "
                    "method.transition=estimated."
                )
            self.transition.copy_(torch.as_tensor(np.asarray(t), dtype=torch.float32))

    def _record(self, index: Tensor, probs: Tensor, labels: Tensor) -> None:
        n = int(index.max()) + 1
        if self._probs is None or n > len(self._probs):
            size = max(
                n,
                len(self.trainer.train_dataloader.dataset) if self.trainer.train_dataloader else 0,
            )
            probs_new = torch.zeros(size, probs.shape[1])
            labels_new = torch.zeros(size, dtype=torch.long)
            seen_new = torch.zeros(size, dtype=torch.bool)
            if self._probs is not None:
                m = len(self._probs)
                probs_new[:m], labels_new[:m], seen_new[:m] = self._probs, self._labels, self._seen
            self._probs, self._labels, self._seen = probs_new, labels_new, seen_new
        idx = index.long().cpu()
        self._probs[idx] = probs.detach().float().cpu()
        self._labels[idx] = labels.long().cpu()
        self._seen[idx] = True

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        corrected = self.current_epoch >= self.warmup_epochs
        if not corrected or self.transition_mode != "estimated":
            return
        if (
            (self._estimated and not self.reestimate)
            or self._seen is None
            or not bool(self._seen.any())
        ):
            return  # resumed without recorded posteriors: keep the checkpoint's T
        seen = self._seen
        t = estimate_transition(self._probs[seen], self._labels[seen], len(self.classnames))
        self.transition.copy_(t.to(self.transition))
        self._estimated = True
        self._seen.zero_()
        self.log("train/transition_diag", float(t.diagonal().mean()), on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["noisy_state"]["forward_estimated"] = self._estimated

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._estimated = bool((checkpoint.get("noisy_state") or {}).get("forward_estimated"))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if "index" not in batch:
            raise ConfigValueError(
                f"method={self.name} records a posterior per training sample by its `index`, and "
                "these train batches carry none."
            )
        logits = self.logits(batch["image"])
        labels = batch["label"]
        corrected = self.current_epoch >= self.warmup_epochs
        if corrected:
            loss = forward_loss(logits, labels, self.transition)
        else:
            loss = F.cross_entropy(logits.float(), labels)
        with torch.no_grad():
            noisy_post = F.softmax(logits.float(), dim=1)
            if corrected:
                noisy_post = noisy_post @ self.transition.float()
            self._record(batch["index"], noisy_post, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        self.log_train_accuracy(logits, batch)
        return loss

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return forward_loss(logits, batch["label"], self.transition)
