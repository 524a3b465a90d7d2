"""What every group-robustness training method shares (robustness_ood_prompting.md §1.7, §2).

SubpopBench (`YyzHarry/SubpopBench`, `subpopbench/learning/algorithms.py`) trains a featurizer and a
freshly initialised linear classifier on its output with cross-entropy; a group method changes only
the loss of a batch `{image, label, group}` (ERM: the mean; GroupDRO: a q-weighted mean of group
losses) or the optimiser step (SAM, ASAM, ASGDRO). Here the featurizer is `cfg.model`:

- a CLIP-like backbone (`model.trainable`: `none` = frozen features, only the head trains; `image` =
  the image tower trains too), a timm network (`model.trainable: false | true`) or the MLP featurizer
  of the synthetic checks (`none | image`);
- the head is `FineTune`'s linear head: `head_init: random` (PyTorch's default init, SubpopBench's
  `networks.Classifier`) on the raw features, or `zeroshot` (CLIP's zero-shot head scaled by its
  logit scale) on L2-normalised features, as the robust fine-tuning methods; `normalize` overrides
  the feature normalisation (default: on for a zero-shot head, off for a random one).

Evaluation is the classification routine's (`ClassificationMethod`): per test set `acc`, `ece`, ...,
`worst_group_acc`, `avg_group_acc`, and `val/*` when the data module has `val: true`. With
`alignment: true` (binary y and a) every method also logs SCER's alignments of its featurizer output
on the first ID test set, `test/scer_abs_s` (|s|, spurious) and `test/scer_c` (core), with β in closed
form from that set's statistics (`scer_math.scer_embedding_loss`): spec §1.8's check "|s| for SCER is
below |s| for ERM at the end of training" compares the same number across methods.

Group methods need group labels: `requires` includes `num_groups`, so a group method on data without
groups fails when it is built, in one line (`TaskInfoError`).

Train group counts (group_DRO's generalisation adjustment C/√n_g) are read when the fit starts from
the data module (`train_group_counts`): its `train_group_counts()` if it has one, else the group
labels of the train split it has set up (`ClassificationDataModule`: the split's `groups`;
`VectorGroupDataModule`: the `group` tensor). Only a method that needs them asks (adjustment > 0).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from reprolab.errors import ConfigValueError
from reprolab.methods.finetuning.base import normalized
from reprolab.methods.finetuning.ft import FineTune
from reprolab.methods.group.scer_math import scer_embedding_loss


def train_group_counts(datamodule: Any, num_groups: int) -> Tensor | None:
    """Items per group in the train split the data module serves (float64, (G,)), or None.

    Asks the data module's `train_group_counts()` when it has one; otherwise reads the group labels
    of its set-up train split (`ClassificationDataModule`: `ImageSplit.groups`, after few-shot
    sampling; `VectorGroupDataModule`: the split's `group` tensor). None when neither is there.
    """
    if datamodule is None:
        return None
    own = getattr(datamodule, "train_group_counts", None)
    if callable(own):
        return torch.as_tensor(own(), dtype=torch.float64)
    splits = getattr(datamodule, "_splits", None)
    ds = splits.get("train") if isinstance(splits, dict) else None
    groups = getattr(getattr(ds, "split", None), "groups", None)
    if groups is None and isinstance(getattr(ds, "tensors", None), dict):
        groups = ds.tensors.get("group")
    if groups is None:
        return None
    g = torch.as_tensor(groups).long().flatten()
    return torch.bincount(g, minlength=num_groups).double()[:num_groups]


def group_mean_losses(per_sample: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Mean of `per_sample` over each group's samples, and the counts. ((G,), (G,))

    An absent group's mean is 0 (group_DRO's `compute_group_avg`). Gradients flow into the means.

    Args:
        per_sample: losses (B,).
        groups: group index per sample (B,), in [0, num_groups).
        num_groups: G.
    """
    groups = groups.to(per_sample.device).long()
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        raise ValueError(
            f"group labels must lie in [0, {num_groups}); got {int(groups.min())}..{int(groups.max())}"
        )
    onehot = F.one_hot(groups, num_groups).to(per_sample.dtype)  # (B, G)
    counts = onehot.sum(dim=0)  # (G,)
    means = onehot.T @ per_sample / counts.clamp(min=1)
    return means, counts


class GroupMethod(FineTune):
    """A linear head on the backbone's features, trained with cross-entropy on grouped batches.

    Subclasses define the loss of a batch (`train_loss`) or the whole step (the two-pass methods).

    Args:
        head_init: `random` (SubpopBench: a fresh linear classifier) or `zeroshot` (CLIP's zero-shot
            head; needs templates and normalised features).
        normalize: L2-normalise the features before the head (None: True iff head_init=zeroshot).
        alignment: log SCER's |s| and c of the featurizer output on the first ID test set
            (`test/scer_abs_s`, `test/scer_c`; needs 2 classes and 4 groups g = 2y + a).
        feature_cache: with a frozen featurizer, ask the data for its cached features
            (`reprolab.data.feature_cache`: encoded once, reused by every run of the same key)
            instead of images; the same numbers, without the featurizer's forward per step.
        **kwargs: see `FineTune` / `FineTuningMethod` (`optimizer`, `scheduler`, `grad_clip`,
            `label_smoothing`, `sigma_min`, `ece_bins`, ...).
    """

    requires = ("classnames", "num_groups")
    #: Mixes the input batch (Mixup, LISA): features cannot stand in for its inputs.
    mixes_inputs: ClassVar[bool] = False
    #: CLIP-like and MLP backbones: `none` (linear head only) or `image`; timm: False / True.
    trainable_modes: ClassVar[tuple[Any, ...]] = ("none", "image", "image_last", False, True)

    def __init__(
        self,
        *args: Any,
        head_init: str = "random",
        normalize: bool | None = None,
        alignment: bool = False,
        feature_cache: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, head_init=head_init, **kwargs)
        if head_init == "zeroshot":
            self.info.require(self.name, "templates")
            if not callable(getattr(self.backbone, "zeroshot_weights", None)):
                raise ConfigValueError(
                    f"method={self.name}: head_init=zeroshot needs a backbone with a text tower, "
                    f"and model={getattr(self.backbone, 'name', '?')} has none; set "
                    "method.head_init=random."
                )
        self.normalize = (head_init == "zeroshot") if normalize is None else bool(normalize)
        if head_init == "zeroshot" and not self.normalize:
            raise ConfigValueError(
                f"method={self.name}: a zero-shot head reads L2-normalised features; set "
                "method.normalize=true (or null), or method.head_init=random."
            )
        self.num_groups = int(self.info.num_groups)
        self.alignment = bool(alignment)
        if self.alignment and (len(self.classnames) != 2 or self.num_groups != 4):
            raise ConfigValueError(
                f"method={self.name}: alignment=true measures SCER's |s| and c, defined for 2 "
                f"classes x 2 attributes (4 groups); data={self.info.name} has "
                f"{len(self.classnames)} classes and {self.num_groups} groups. Set "
                "method.alignment=false."
            )
        self._aligned: list[tuple[Tensor, Tensor]] = []
        self._backbone_trains = any(p.requires_grad for p in self.backbone.parameters())
        self.feature_cache = bool(feature_cache)
        if self.feature_cache and (self._backbone_trains or self.mixes_inputs):
            why = "mixes its inputs" if self.mixes_inputs else "trains its featurizer"
            raise ConfigValueError(
                f"method={self.name} {why}, so it cannot train on cached features; set "
                "method.feature_cache=false"
                + ("" if self.mixes_inputs else " or model.trainable=none")
                + "."
            )

    # -- the model ------------------------------------------------------------------------------
    def build_head(self, init: str) -> nn.Linear:
        if init == "zeroshot":
            return super().build_head(init)
        dim = getattr(self.backbone, "feature_dim", None)
        if dim is None:  # CLIP: the width of its zero-shot head
            templates = self.templates or ["{}"]
            dim = int(self.backbone.zeroshot_weights(self.classnames, templates).shape[1])
        device = next(self.backbone.parameters(), torch.empty(0)).device  # identity: none
        return nn.Linear(int(dim), len(self.classnames)).to(device)  # PyTorch's default init

    def data_requirements(self) -> dict[str, Any]:
        out = super().data_requirements()
        if self.feature_cache:
            from reprolab.data.feature_cache import FeatureSource

            out["features"] = FeatureSource.of(self.backbone)
        return out

    def image_features(self, images: Tensor) -> Tensor:
        if self.feature_cache:  # the data serve the frozen featurizer's cached output
            return images.float()
        if self._backbone_trains:
            return super().image_features(images)
        with torch.no_grad():  # a frozen featurizer: no graph through it
            return super().image_features(images)

    def head_logits(self, features: Tensor) -> Tensor:
        return self.head(normalized(features) if self.normalize else features)

    def per_sample_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy per sample. (B,)"""
        return F.cross_entropy(
            logits.float(), labels, reduction="none", label_smoothing=self.label_smoothing
        )

    def batch_groups(self, batch: dict[str, Tensor]) -> Tensor:
        if "group" not in batch:
            raise ConfigValueError(
                f"method={self.name} trains on group labels, but the train batches of "
                f"data={self.info.name} carry no `group`."
            )
        return batch["group"]

    # -- training (one pass; the two-pass methods override training_step) ----------------------
    def train_loss(self, per_sample: Tensor, groups: Tensor) -> Tensor:
        """The loss of a batch from its per-sample losses and groups."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        groups = self.batch_groups(batch)
        per_sample = self.per_sample_loss(self.logits(batch["image"]), batch["label"])
        loss = self.train_loss(per_sample, groups)
        self.log("train/loss", loss, prog_bar=True)
        self.log_group_terms(per_sample, groups)
        return loss

    def log_group_terms(self, per_sample: Tensor, groups: Tensor) -> None:
        """`train/worst_group_loss`: the largest mean loss over the groups present in the batch."""
        with torch.no_grad():
            losses, counts = group_mean_losses(per_sample.detach(), groups, self.num_groups)
            worst = losses.masked_fill(counts == 0, float("-inf")).max()
        self.log("train/worst_group_loss", worst)

    # -- evaluation: train-weighted accuracy ----------------------------------------------------
    def on_test_start(self) -> None:
        """Give the test group metrics the training group counts (`acc_weighted`), when known."""
        super().on_test_start()
        counts = train_group_counts(getattr(self.trainer, "datamodule", None), self.num_groups)
        for metrics in self.test_metrics:  # a MetricCollection per id / shift set
            if isinstance(metrics, MetricCollection) and "group" in metrics:
                metrics["group"].set_weights(counts)

    # -- the alignment diagnostic (alignment=true) ---------------------------------------------
    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.alignment and dataloader_idx == self._id_ref:
            with torch.no_grad():
                h = self.image_features(batch["image"]).float()
            self._aligned.append((h.cpu(), batch["group"].cpu()))
        return super().test_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if not self._aligned:
            return
        h = torch.cat([x for x, _ in self._aligned]).double()
        g = torch.cat([x for _, x in self._aligned]).long()
        self._aligned = []
        out = scer_embedding_loss(h, g // 2, g % 2, 1.0, 1.0)
        if out is None:
            return  # a group is absent from the test set: no alignment to report
        diag = out[1]
        self.log("test/scer_abs_s", diag["s"].abs().float(), sync_dist=False)
        self.log("test/scer_c", diag["c"].float(), sync_dist=False)

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (*super().metric_keys(), "test/scer_*")
