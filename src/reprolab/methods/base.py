"""Base LightningModule for image classification methods; it owns evaluation.

Every test set of the data module is logged as `test/<set>/acc` (top-1, percent) and
`test/<set>/ece` (fraction, equal-width bins); group data adds `test/<set>/worst_group_acc`.
The first test set is also logged as `test/acc` and `test/ece` (what tables read by default).
A test set labelled in a subset of the training label space (ImageNet-A/R: 200 of the 1000
ImageNet classes; ObjectNet: 113 classes of 1-3 ImageNet classes each) is given as index groups; its
logits are projected (`project_logits`: kept columns, or the max within each group) before accuracy
and ECE, so the softmax of the ECE runs over that set's own classes (robust_finetuning.md §3.1-3.2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from reprolab.data.datasets.imagenet import project_logits

log = logging.getLogger(__name__)

OptimFactory = Callable[..., torch.optim.Optimizer]
SchedFactory = Callable[..., Any]


class GroupAccuracy(Metric):
    """Accuracy per group (DDP-safe sums); `compute` returns the worst group's accuracy."""

    def __init__(self, num_groups: int) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros(num_groups), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_groups), dist_reduce_fx="sum")

    def update(self, preds: Tensor, labels: Tensor, groups: Tensor) -> None:
        n = self.total.numel()
        self.correct += torch.bincount(groups, weights=(preds == labels).float(), minlength=n)
        self.total += torch.bincount(groups, minlength=n).float()

    def compute(self) -> Tensor:
        seen = self.total > 0
        return (self.correct[seen] / self.total[seen]).min()


class ClassificationMethod(L.LightningModule):
    """A method that classifies images into `classnames` with a (frozen) backbone it does not own.

    Subclasses implement `logits(images) -> (B, C)`; trainable methods add `training_step` and
    either pass an `optimizer` factory or override `configure_optimizers`.

    Args:
        name: method config name.
        backbone: frozen backbone (`CLIPBackbone`); black-box methods wrap it in `BlackBox`.
        classnames: class names in label order.
        templates: prompt templates with `{}` for the class name.
        test_sets: names of the data module's test sets, in dataloader order.
        test_index_groups: per test set, None (labelled like `classnames`) or, per class of that
            set, the indices into `classnames` it covers (the data module's `test_index_groups`).
        num_groups: number of groups when the data emits `group` (worst-group accuracy).
        ece_bins: equal-width confidence bins for ECE.
        optimizer: partial optimizer factory (`torch.optim.AdamW` with its kwargs).
        scheduler: partial LR scheduler factory.
        post_hoc: nothing to train (`train=false` runs test only); read by `validate_config`.
    """

    train_backbone: bool = False

    def __init__(
        self,
        name: str,
        backbone: nn.Module | None,
        classnames: list[str],
        templates: list[str],
        test_sets: list[str] | None = None,
        test_index_groups: dict[str, list[list[int]] | None] | None = None,
        num_groups: int | None = None,
        ece_bins: int = 15,
        optimizer: OptimFactory | None = None,
        scheduler: SchedFactory | None = None,
        post_hoc: bool = False,
    ) -> None:
        super().__init__()
        # index groups are derived from the data config (up to 1000 ints): kept out of hparams
        self.save_hyperparameters(
            ignore=["backbone", "optimizer", "scheduler", "test_index_groups"]
        )
        self.name = name
        if backbone is not None:  # black-box methods pass None and keep only a query oracle
            self.backbone = backbone.requires_grad_(self.train_backbone)
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.test_sets = list(test_sets or ["test"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        c = len(self.classnames)
        self.test_index_groups = _index_groups(self.test_sets, test_index_groups, c)

        def collection(k: int) -> MetricCollection:
            metrics: dict[str, Metric] = {
                "acc": MulticlassAccuracy(k, average="micro"),
                "ece": MulticlassCalibrationError(k, n_bins=ece_bins, norm="l1"),
            }
            if num_groups:
                metrics["worst_group_acc"] = GroupAccuracy(num_groups)
            return MetricCollection(metrics)

        self.val_metrics = collection(c)
        self.test_metrics = nn.ModuleList(
            collection(c if g is None else len(g)) for g in self.test_index_groups
        )

    def train(self, mode: bool = True) -> ClassificationMethod:
        super().train(mode)
        if not self.train_backbone and hasattr(self, "backbone"):
            self.backbone.eval()  # keep pretrained norm/dropout behaviour
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A frozen backbone is described by cfg.model and rebuilt from its source: keeping it out
        # of checkpoints saves ~600 MB per ViT-B/16 run.
        if not self.train_backbone:
            sd = checkpoint["state_dict"]
            for key in [k for k in sd if k.startswith("backbone.")]:
                del sd[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.train_backbone and hasattr(self, "backbone"):
            sd = checkpoint["state_dict"]
            for key, value in self.backbone.state_dict(prefix="backbone.").items():
                sd.setdefault(key, value)

    def logits(self, images: Tensor) -> Tensor:  # (B, C)
        raise NotImplementedError

    def register_text_head(self) -> None:
        """`self.head`: the backbone's zero-shot head for this task, moved with the module."""
        head = self.backbone.zeroshot_weights(self.classnames, self.templates)  # (C, D)
        self.register_buffer("head", head.to(self.device), persistent=False)

    def eval_logits(self, images: Tensor) -> Tensor:
        """Logits used for evaluation (methods with train/eval differences override this)."""
        return self.logits(images)

    @torch.no_grad()
    def _update(
        self,
        metrics: MetricCollection,
        batch: dict[str, Tensor],
        index_groups: list[list[int]] | None = None,
    ) -> None:
        logits = project_logits(self.eval_logits(batch["image"]).float(), index_groups)
        labels = batch["label"]
        for key, metric in metrics.items():
            if key == "worst_group_acc":
                metric.update(logits.argmax(-1), labels, batch["group"])
            elif key == "ece":
                metric.update(logits.softmax(-1), labels)
            else:
                metric.update(logits, labels)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._update(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(_to_log(self.val_metrics.compute(), "val"), sync_dist=False)
        self.val_metrics.reset()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(
            self.test_metrics[dataloader_idx], batch, self.test_index_groups[dataloader_idx]
        )

    def on_test_epoch_end(self) -> None:
        out: dict[str, float] = {}
        for i, (name, metrics) in enumerate(zip(self.test_sets, self.test_metrics, strict=True)):
            values = _to_log(metrics.compute(), f"test/{name}")
            out.update(values)
            if i == 0:
                out.update({k.replace(f"test/{name}/", "test/"): v for k, v in values.items()})
            metrics.reset()
        self.log_dict(out, add_dataloader_idx=False)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{type(self).__name__}: nothing to train; set train=false.")
        if self.optimizer_factory is None:
            raise RuntimeError(
                f"{type(self).__name__}: no optimizer configured (method.optimizer)."
            )
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        log.info("%s: %d trainable / %d frozen parameters", self.name, trainable, frozen)


def _index_groups(
    test_sets: list[str], groups: dict[str, list[list[int]] | None] | None, num_classes: int
) -> list[list[list[int]] | None]:
    """Index groups in test-set order, checked against the test sets and the class count."""
    groups = dict(groups or {})
    unknown = sorted(set(groups) - set(test_sets))
    if unknown:
        raise ValueError(f"test_index_groups names {unknown}, which are not test sets {test_sets}")
    out = []
    for name in test_sets:
        g = groups.get(name)
        if g is not None:
            g = [[int(i) for i in group] for group in g]
            bad = sorted({i for group in g for i in group if not 0 <= i < num_classes})
            if bad or not all(g):
                raise ValueError(
                    f"test set {name}: index groups must be non-empty lists of indices into the "
                    f"{num_classes} classes (got {bad[:5] or 'an empty group'})"
                )
        out.append(g)
    return out


def _to_log(values: dict[str, Tensor], prefix: str) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        v = float(v)
        out[f"{prefix}/{k}"] = 100.0 * v if k.endswith("acc") else v
    return out
