"""What NPC's classifier baselines share (robustness_ood_prompting.md §4.3, §4.5; upstream
`BaeHeeSun/NPC` @ 928f4d0, `train_classifier.py` and `library/*.py`).

Every baseline trains a network (`cfg.model`: `cnn_mnist`, `cnn9`, `timm_resnet50` with
`model.trainable=true`, or `mlp_featurizer` for `noisy_blobs`) plus a linear head on the noisy
labels ỹ (`batch["label"]`) and is tested on clean labels, like any classification method. What the
post-processor (NPC, `methods/noisy/npc.py`) reads from a finished run:

- `logits(images) -> (B, K)` (`eval_logits` for evaluation);
- `embed(images) -> (B, E)`: the penultimate embedding (upstream's first network output, what its
  KNN prior reads): the backbone's `encode_image` (CNN_MNIST 256, CNN 128, ResNet-50 2048);
- `embed_dim` = E and `head` (the last linear layer).

A finished run dir holds `config.yaml` (the composed config, unresolved), `fingerprint.json` (the
resolved one) and `checkpoints/last.ckpt` (whose state dict holds backbone, head and the method's
buffers), so the method is rebuilt with `instantiate(cfg.model)` and `instantiate(cfg.method)(model=,
info=)` and `load_state_dict`.

Upstream (`CE`, `ES`, `LS`, `SCE`, ...): Adam lr 1e-3 (Forward: Adagrad), no weight decay, no
schedule, batch 128 (MNIST/FMNIST/CIFAR-10) or 64 (Clothing1M/Food-101N), 200 epochs for the CNNs
(Clothing1M 10, Food-101N 100), the last epoch's network tested. `args.pre_epoch` (10/5/1) is only
part of upstream's directory names: none of these five baselines reads it (the warm-ups that exist
are Forward's CE epoch and Co-teaching's forget-rate ramp).

`early_stop=true` is upstream's `ES` ("vanilla"): after every epoch the accuracy on the noisy
validation split (`val/acc`, the val batches' `label` = ỹ) is compared with the previous epoch's,
and training stops at the first decrease; the network of that epoch (the one whose accuracy
dropped) is kept and tested, as upstream breaks before training further and saves the current
network. (`selection: {monitor: val/acc, mode: max, every_n_steps: <steps per epoch>, patience: 1}`
on the experiment instead tests the best epoch's checkpoint: # DEVIATION from `ES`.)

`head_input: backbone_logits` is upstream's `ResNet50Pre`: the K-way head reads the ImageNet
classifier's 1000 logits (the timm model built with `model.num_classes=null`), while `embed` is the
2048-d pooled feature; `features` (default) puts the head on the embedding.

Logged during training: `train/loss`, `train/acc_noisy` (prediction = ỹ, upstream's "train label
acc"), `train/acc_clean` (prediction = y where the data knows y, its "train class acc").
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from reprolab.data.info import ImageClassificationInfo
from reprolab.errors import ConfigValueError
from reprolab.methods.base import ClassificationMethod

log = logging.getLogger(__name__)

HEAD_INPUTS = ("features", "backbone_logits")
CLEAN_UNKNOWN = -1  # `reprolab.data.noisy.CLEAN_UNKNOWN`


def make_head(backbone: nn.Module, head_input: str, num_classes: int, who: str) -> nn.Linear:
    """A fresh Linear(in, K) (PyTorch's default init) on what `head_input` feeds it."""
    if head_input not in HEAD_INPUTS:
        raise ConfigValueError(
            f"method={who}: head_input must be one of {list(HEAD_INPUTS)}, got {head_input!r}."
        )
    if head_input == "backbone_logits":
        inner = getattr(backbone, "model", None)
        n = int(getattr(inner, "num_classes", 0) or 0)
        if n <= 0 or not callable(getattr(inner, "get_classifier", None)):
            raise ConfigValueError(
                f"method={who}: head_input=backbone_logits reads the ImageNet classifier of a timm "
                f"model, and model={getattr(backbone, 'name', '?')} has none; set "
                "model.num_classes=null (keep it) or method.head_input=features."
            )
        return nn.Linear(n, int(num_classes))
    dim = getattr(backbone, "feature_dim", None)
    if dim is None:
        raise ConfigValueError(
            f"method={who} puts a linear head on the model's embedding and model="
            f"{getattr(backbone, 'name', '?')} declares no feature_dim; use cnn_mnist, cnn9, "
            "timm_resnet50 or mlp_featurizer."
        )
    return nn.Linear(int(dim), int(num_classes))


def net_forward(
    backbone: nn.Module, head: nn.Linear, head_input: str, images: Tensor
) -> tuple[Tensor, Tensor]:
    """(embedding (B, E), logits (B, K)) of one network."""
    emb = backbone.encode_image(images).float()
    if head_input == "backbone_logits":
        return emb, head(backbone.model.get_classifier()(emb).float())
    return emb, head(emb)


class NoisyLabelMethod(ClassificationMethod):
    """A network and a linear head trained on noisy labels (see the module docstring).

    Subclasses implement `loss(logits, batch) -> scalar`.

    Args:
        head_input: `features` (the head reads the embedding) or `backbone_logits` (upstream
            ResNet50Pre: the head reads a timm model's ImageNet logits).
        early_stop: stop at the first epoch whose noisy validation accuracy is below the previous
            epoch's (upstream `ES`; needs `data.val=true`).
        **kwargs: see `ClassificationMethod` (`optimizer`, `scheduler`, `ece_bins`, ...).
    """

    train_backbone = True

    def __init__(
        self,
        name: str,
        model: nn.Module | None = None,
        info: ImageClassificationInfo | None = None,
        head_input: str = "features",
        early_stop: bool = False,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ConfigValueError(
                f"method={name} trains a network; set model= (cnn_mnist, cnn9, ...)."
            )
        super().__init__(name, model, info, **kwargs)
        self.head_input = head_input
        self.head = make_head(self.backbone, head_input, len(self.classnames), name)
        self.embed_dim = int(getattr(self.backbone, "feature_dim", 0) or 0)
        self.early_stop = bool(early_stop)
        self._prev_val_acc: float | None = None
        self._stopped_epoch: int | None = None
        self._train_acc: dict[str, Tensor] = {}
        self.last_train_acc: dict[str, float] = {}  # the last epoch's, for the run record
        if not any(p.requires_grad for p in self.backbone.parameters()):
            log.warning(
                "%s: model=%s is frozen, so only the linear head trains (upstream trains the whole "
                "network: set model.trainable=true)",
                name,
                getattr(self.backbone, "name", "?"),
            )

    # -- what a post-processor reads ------------------------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        """The penultimate embedding. (B, E)"""
        return self.backbone.encode_image(images).float()

    def logits(self, images: Tensor) -> Tensor:
        return net_forward(self.backbone, self.head, self.head_input, images)[1]

    # -- training -------------------------------------------------------------------------------
    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The training loss of a batch from its logits (B, K) and noisy labels."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.logits(batch["image"])
        loss = self.loss(logits, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        self.log_train_accuracy(logits, batch)
        return loss

    @torch.no_grad()
    def log_train_accuracy(
        self, logits: Tensor, batch: dict[str, Tensor], suffix: str = ""
    ) -> None:
        """Count this batch into the epoch's `train/acc_noisy{suffix}` (prediction = ỹ) and
        `train/acc_clean{suffix}` (= y where known), logged at the end of the epoch (counted here
        rather than `self.log`-ged per step: Lightning's per-call cost dominates a small model)."""
        pred = logits.argmax(-1)
        acc = self._train_acc.get(suffix)
        if acc is None:
            acc = self._train_acc[suffix] = torch.zeros(4, dtype=torch.float64, device=pred.device)
        acc[0] += (pred == batch["label"]).sum()
        acc[1] += len(pred)
        clean = batch.get("clean_label")
        if clean is not None:
            known = clean != CLEAN_UNKNOWN
            acc[2] += (pred[known] == clean[known]).sum()
            acc[3] += known.sum()

    def on_train_epoch_start(self) -> None:
        self._train_acc = {}

    def on_train_epoch_end(self) -> None:
        out = {}
        for suffix, acc in self._train_acc.items():
            right, n, right_clean, known = acc.tolist()
            if n:
                out[f"train/acc_noisy{suffix}"] = 100.0 * right / n
            if known:
                out[f"train/acc_clean{suffix}"] = 100.0 * right_clean / known
        if out:
            self.log_dict(out, on_step=False, on_epoch=True)
            self.last_train_acc = out

    # -- early stopping (upstream ES) -----------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.early_stop:
            dm = getattr(self.trainer, "datamodule", None)
            if not getattr(dm, "use_val", False):
                raise ConfigValueError(
                    f"method={self.name} stops on the accuracy of the noisy validation split, and "
                    f"data={getattr(dm, 'name', '?')} serves none; set data.val=true."
                )

    def on_validation_epoch_end(self) -> None:
        acc = float(self.val_metrics["acc"].compute()) * 100.0 if self.early_stop else None
        super().on_validation_epoch_end()
        if acc is None or self.trainer.sanity_checking:
            return
        prev = self._prev_val_acc
        if prev is not None and acc < prev:
            self.trainer.should_stop = True
            self._stopped_epoch = int(self.current_epoch)
            log.info(
                "%s: noisy val accuracy fell from %.2f to %.2f after epoch %d: stopping (upstream ES)",
                self.name,
                prev,
                acc,
                self.current_epoch,
            )
        self._prev_val_acc = acc

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["noisy_state"] = {
            "prev_val_acc": self._prev_val_acc,
            "stopped": self._stopped_epoch,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("noisy_state") or {}
        self._prev_val_acc = state.get("prev_val_acc")
        self._stopped_epoch = state.get("stopped")

    def extra_metrics(self) -> dict[str, float]:
        out = {**super().extra_metrics(), **self.last_train_acc}
        if self.early_stop:
            # Epochs trained (the epoch whose network is tested, 1-based); -1: it never stopped.
            out["train/early_stop_epoch"] = float(
                -1 if self._stopped_epoch is None else self._stopped_epoch + 1
            )
        return out

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (*super().metric_keys(), "train/*")
