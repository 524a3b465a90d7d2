"""Method bases: the generic `Method` every family builds on, and the image-classification routine.

`Method(name, model, info, **hparams)` is what the runner needs from any method (docs/CONTRACTS.md):
- it checks at build time that the task info provides what it `requires` (one-line error);
- it declares the metric keys it logs (`metric_keys()`, fnmatch patterns), so a table whose metric no
  method logs fails before launch;
- it reports trainable / total parameters and its extra metrics for the run record;
- it names its frozen parts (`freeze`), keeps them in eval mode and out of checkpoints;
- it may declare an outer loop of rounds (`num_rounds`, `start_round`, `round_state`).

`ClassificationMethod` is the routine for image classification: every test set of the task is
evaluated by its role. `id` and `shift` sets log `test/<set>/acc` (top-1, percent), `ece` (fraction,
equal-width bins), `nll`, `brier`, and on group data `worst_group_acc` / `avg_group_acc`; `ood` sets
are scored (one score per sample, higher = in-distribution) and log `auroc`, `fpr95`, `aupr_in`,
`aupr_out` (percent) against the first `id` test set, whose scores are collected alongside. The
primary (first) test set is also logged as `test/acc`, `test/ece`, ... (what tables read by default).
A test set labelled in a subset of the training classes (ImageNet-A/R, ObjectNet) carries index
groups; its logits are projected (`project_logits`) before accuracy and ECE, so the softmax of the
ECE runs over that set's own classes (robust_finetuning.md §3.1-3.2).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from reprolab.data.info import ImageClassificationInfo, TaskInfo, TaskInfoError, TestSet
from reprolab.metrics.calibration import BatchAveragedECE
from reprolab.metrics.classification import BrierScore, NegativeLogLikelihood
from reprolab.metrics.group import GroupAccuracy
from reprolab.metrics.ood import OOD_KEYS, ScoreCollector, ood_metrics
from reprolab.metrics.projection import project_logits

log = logging.getLogger(__name__)

OptimFactory = Callable[..., torch.optim.Optimizer]
SchedFactory = Callable[..., Any]

# Written by the runner for every method: sizes, throughput, and the per-image time and peak memory
# of EPLKG's efficiency comparison (prompting_posthoc.md §0.2), measured by `callbacks.Throughput`.
COST_KEYS: tuple[str, ...] = (
    "params/*",
    "throughput/*",
    "train/sec_per_image",
    "test/sec_per_image",
    "train/peak_mem_gb",
)


class Method(L.LightningModule):
    """Base of every method: a LightningModule around a model it may or may not own.

    Args:
        name: method config name (lands in hparams and the run record).
        model: what `cfg.model` built (a backbone, a network), or None.
        info: the data module's task info (`reprolab.data.info`).
        optimizer: partial optimizer factory (`torch.optim.AdamW` with its kwargs).
        scheduler: partial LR scheduler factory (stepped every optimizer step); a factory with
            `total_steps=None` gets the run's length (`trainer.estimated_stepping_batches`).
        post_hoc: nothing to train (`train=false` runs test only); read by `validate_config`.
        rounds: outer-loop rounds (active-learning acquisitions, sequential inference rounds); the
            runner fits once per round. Methods with rounds implement `start_round`.
    """

    info_type: ClassVar[type[TaskInfo]] = TaskInfo
    requires: ClassVar[tuple[str, ...]] = ()
    primary_metric: ClassVar[str] = "train/loss"  # `paper.metric` when a run does not set one

    def __init__(
        self,
        name: str,
        model: nn.Module | None = None,
        info: TaskInfo | None = None,
        optimizer: OptimFactory | None = None,
        scheduler: SchedFactory | None = None,
        post_hoc: bool = False,
        rounds: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "info", "optimizer", "scheduler"])
        self.name = name
        self.info = self.check_info(name, info)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.num_rounds = int(rounds)
        if self.num_rounds < 1:
            raise ValueError(f"method={name}: rounds must be >= 1, got {rounds}.")
        self._frozen: list[str] = []

    # -- build-time contract --------------------------------------------------------------------
    @classmethod
    def check_info(cls, name: str, info: TaskInfo | None) -> TaskInfo:
        """The info, checked against `info_type` and `requires` (one line naming what is missing)."""
        if info is None:
            raise TaskInfoError(f"method={name} was built without task info (data module `info`).")
        if not isinstance(info, cls.info_type):
            raise TaskInfoError(
                f"method={name} needs {_a(cls.info_type.kind)} task, but data={info.name} is "
                f"{_a(info.kind)} task."
            )
        info.require(name, *cls.requires)
        return info

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        """Keys (fnmatch patterns) this method logs into its run record."""
        return ("train/loss", *COST_KEYS)

    def data_requirements(self) -> dict[str, Any]:
        """What the data module must be configured with before its loaders run (values only)."""
        return {}

    # -- frozen parts ---------------------------------------------------------------------------
    def freeze(self, *names: str) -> None:
        """Freeze the named child modules: no gradients, eval mode, not in checkpoints."""
        for n in names:
            getattr(self, n).requires_grad_(False).eval()
            if n not in self._frozen:
                self._frozen.append(n)

    def frozen_state_prefixes(self) -> list[str]:
        """State-dict prefixes a checkpoint must not hold (rebuilt from `cfg.model`)."""
        out = [f"{n}." for n in self._frozen]
        for child_name, child in self.named_children():
            if child_name in self._frozen:
                continue
            prefixes = getattr(child, "frozen_state_prefixes", None)
            if callable(prefixes):
                out += [f"{child_name}.{p}" for p in prefixes()]
        return out

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for n in getattr(self, "_frozen", []):
            getattr(self, n).eval()  # keep pretrained norm / dropout behaviour
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen parts are described by cfg.model and rebuilt from their source: keeping them out of
        # checkpoints saves ~600 MB per ViT-B/16 run.
        prefixes = tuple(self.frozen_state_prefixes())
        if prefixes:
            sd = checkpoint["state_dict"]
            for key in [k for k in sd if k.startswith(prefixes)]:
                del sd[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = tuple(self.frozen_state_prefixes())
        if prefixes:
            sd = checkpoint["state_dict"]
            for key, value in self.state_dict().items():
                if key.startswith(prefixes):
                    sd.setdefault(key, value)

    # -- what the run record holds --------------------------------------------------------------
    def param_counts(self) -> dict[str, float]:
        """`params/trainable` and `params/total` (each tensor counted once)."""
        seen: set[int] = set()
        trainable = total = 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        total += self.extra_parameter_count()
        return {"params/trainable": float(trainable), "params/total": float(total)}

    def extra_parameter_count(self) -> int:
        """Parameters the method uses but does not hold (a black-box target model)."""
        return 0

    def extra_metrics(self) -> dict[str, float]:
        """Metrics beyond what `test` logs (query counts, ...), added to the run record."""
        return {}

    # -- rounds ---------------------------------------------------------------------------------
    def start_round(self, round_idx: int, datamodule: L.LightningDataModule) -> None:
        """Called before fitting round `round_idx` (0-based); acquisitions happen here."""

    def round_state(self) -> dict[str, Any]:
        """JSON-able state the runner stores after each round (acquired indices, ...)."""
        return {}

    def load_round_state(self, state: dict[str, Any], datamodule: L.LightningDataModule) -> None:
        """Restore `round_state()` when a killed run resumes after a finished round."""

    def round_trainer_overrides(self, round_idx: int) -> dict[str, Any]:
        """Trainer arguments of round `round_idx` that differ from `cfg.trainer` (LP-FT's LP epochs)."""
        return {}

    # -- optimisation ---------------------------------------------------------------------------
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
        factory = self.scheduler_factory
        # `null` lengths in a scheduler config are the run's: `total_steps` (trainer.max_steps, or
        # epochs x batches per epoch) and `steps_per_epoch` (Dassl's per-epoch schedules). Read the
        # config's keywords once and wrap once (a partial over Hydra's partial does not flatten).
        keywords = factory.keywords if isinstance(factory, functools.partial) else {}
        fill: dict[str, int] = {}
        if "total_steps" in keywords and keywords["total_steps"] is None:
            fill["total_steps"] = int(self.trainer.estimated_stepping_batches)
        if "steps_per_epoch" in keywords and keywords["steps_per_epoch"] is None:
            self.trainer.estimated_stepping_batches  # noqa: B018 (sets up the train loader)
            per_epoch = int(self.trainer.num_training_batches)
            accumulate = max(1, int(self.trainer.accumulate_grad_batches))
            fill["steps_per_epoch"] = max(1, math.ceil(per_epoch / accumulate))
        if fill:
            factory = functools.partial(factory, **fill)
        sched = factory(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        c = self.param_counts()
        log.info(
            "%s: %d trainable / %d total parameters",
            self.name,
            c["params/trainable"],
            c["params/total"],
        )


OOD_SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    # Post-hoc scores from logits, higher = more in-distribution.
    "msp": lambda z: z.softmax(-1).max(-1).values,  # Hendrycks & Gimpel, ICLR 2017
    "max_logit": lambda z: z.max(-1).values,  # Hendrycks et al., ICML 2022
    "energy": lambda z: torch.logsumexp(z, -1),  # negative energy, Liu et al., NeurIPS 2020
}


class ClassificationMethod(Method):
    """A method that classifies images of an `ImageClassificationInfo` task.

    Subclasses implement `logits(images) -> (B, C)`; trainable ones add `training_step` and either
    pass an `optimizer` factory or override `configure_optimizers`. The model (a backbone) is kept
    as `self.backbone` and frozen unless the class sets `train_backbone = True`; then the backbone's
    own `trainable` setting says which parts train (`CLIPBackbone(trainable="image")`).

    Args:
        ece_bins: equal-width confidence bins for ECE (15; robust fine-tuning tables use 10).
        ece_batch: also log `ece_batch`, the batch-averaged ECE the CaRot code reports
            (robust_finetuning.md §3.2 Variant A; it depends on the eval batch size and order).
        ood_score: post-hoc OOD score of `ood` test sets (`msp`, `max_logit`, `energy`), used
            unless the subclass overrides `ood_scores`.
        **kwargs: see `Method`.
    """

    info_type = ImageClassificationInfo
    requires = ("classnames",)
    primary_metric = "test/acc"
    train_backbone: bool = False
    # Can classify a role-`new` test set over its own class names (`new_class_logits`).
    supports_new_classes: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        model: nn.Module | None = None,
        info: ImageClassificationInfo | None = None,
        ece_bins: int = 15,
        ece_batch: bool = False,
        ood_score: str = "msp",
        **kwargs: Any,
    ) -> None:
        super().__init__(name, model, info, **kwargs)
        if ood_score not in OOD_SCORES:
            raise ValueError(
                f"method={name}: unknown ood_score '{ood_score}'; choose from {sorted(OOD_SCORES)}."
            )
        info = self.info
        if model is not None:  # black-box methods pass None and keep only a query oracle
            self.backbone = model
            if not self.train_backbone:
                self.freeze("backbone")
        self.classnames = list(info.classnames)
        self.templates = list(info.templates)
        self.ood_score = ood_score
        self.test_specs: list[TestSet] = list(info.test_sets)
        self.test_sets = [t.name for t in self.test_specs]
        c = len(self.classnames)
        self.test_index_groups = _index_groups(self.test_specs, c)
        id_sets = [i for i, t in enumerate(self.test_specs) if t.role != "ood"]
        if not id_sets:
            raise TaskInfoError(f"data={info.name}: every test set is `ood`; one must be `id`.")
        self._id_ref = next((i for i in id_sets if self.test_specs[i].role == "id"), id_sets[0])
        self._has_ood = any(t.role == "ood" for t in self.test_specs)
        new_sets = [t.name for t in self.test_specs if t.role == "new"]
        if new_sets and not self.supports_new_classes:
            raise TaskInfoError(
                f"method={name} classifies over its training classes only, and data={info.name} "
                f"has new-class test set(s) {new_sets} (base-to-new); use a method that builds "
                "a head from class names (zeroshot, coop, cocoop, kgcoop, eplkg, cdesc) or "
                "data.subsample_classes=base."
            )
        num_groups = info.num_groups

        def collection(k: int) -> MetricCollection:
            metrics: dict[str, Metric] = {
                "acc": MulticlassAccuracy(k, average="micro"),
                "ece": MulticlassCalibrationError(k, n_bins=ece_bins, norm="l1"),
                "nll": NegativeLogLikelihood(),
                "brier": BrierScore(),
            }
            if ece_batch:
                metrics["ece_batch"] = BatchAveragedECE(n_bins=ece_bins)
            if num_groups:
                metrics["group"] = GroupAccuracy(num_groups)
            return MetricCollection(metrics)

        self.val_metrics = collection(c)

        def size(t: TestSet, g: list | None) -> int:
            return len(t.classnames) if t.classnames is not None else c if g is None else len(g)

        self.test_metrics = nn.ModuleList(
            ScoreCollector() if t.role == "ood" else collection(size(t, g))
            for t, g in zip(self.test_specs, self.test_index_groups, strict=True)
        )
        self.id_scores = ScoreCollector()

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        cls_keys = ("acc", "ece", "ece_batch", "nll", "brier", "worst_group_acc", "avg_group_acc")
        cls_keys += ("acc_weighted", "group*_acc")  # group data: train-weighted, per group
        ood_keys = OOD_KEYS  # auroc, fpr95, fpr95_oodpos (MixDiff's mirror), aupr_in, aupr_out
        return (
            *super().metric_keys(),
            *(f"test/{k}" for k in (*cls_keys, *BASE_NEW_KEYS)),
            *(f"test/*/{k}" for k in (*cls_keys, *ood_keys)),
            *(f"val/{k}" for k in cls_keys),
        )

    def data_requirements(self) -> dict[str, Any]:
        return {"preprocess": self.input_preprocess()}

    def input_preprocess(self) -> Any:
        """How the data module must prepare images (the backbone's preprocessing by default)."""
        return self.backbone.preprocess

    def logits(self, images: Tensor) -> Tensor:  # (B, C)
        raise NotImplementedError

    def register_text_head(self) -> None:
        """`self.head`: the backbone's zero-shot head for this task, moved with the module."""
        head = self.backbone.zeroshot_weights(self.classnames, self.templates)  # (C, D)
        self.register_buffer("head", head.to(self.device), persistent=False)

    def eval_logits(self, images: Tensor) -> Tensor:
        """Logits used for evaluation (methods with train/eval differences override this)."""
        return self.logits(images)

    def new_class_logits(self, images: Tensor, classnames: list[str]) -> Tensor:
        """Logits over other class names (a role-`new` test set). (B, len(classnames))

        Methods whose head is built from class names (`supports_new_classes`) implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot classify new classes.")

    def ood_scores(self, logits: Tensor, images: Tensor) -> Tensor:
        """One score per sample, higher = more in-distribution (post-hoc from logits by default)."""
        return OOD_SCORES[self.ood_score](logits.float())  # (B,)

    @torch.no_grad()
    def _update(
        self,
        metrics: MetricCollection,
        batch: dict[str, Tensor],
        index_groups: list[list[int]] | None = None,
        collect_scores: bool = False,
        raw: Tensor | None = None,
    ) -> None:
        """Update `metrics` with a batch; `raw` = logits already computed for it (else computed)."""
        raw = (self.eval_logits(batch["image"]) if raw is None else raw).float()
        if collect_scores:
            self.id_scores.update(self.ood_scores(raw, batch["image"]))
        logits = project_logits(raw, index_groups)
        labels = batch["label"]
        for key, metric in metrics.items():
            if key == "group":
                metric.update(logits.argmax(-1), labels, batch["group"])
            elif key in ("ece", "ece_batch"):
                metric.update(logits.softmax(-1), labels)
            else:
                metric.update(logits, labels)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._update(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(_to_log(self.val_metrics.compute(), "val"), sync_dist=False)
        self.val_metrics.reset()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        metrics = self.test_metrics[dataloader_idx]
        if self.test_specs[dataloader_idx].role == "ood":
            with torch.no_grad():
                logits = self.eval_logits(batch["image"]).float()
                metrics.update(self.ood_scores(logits, batch["image"]))
            return
        spec = self.test_specs[dataloader_idx]
        raw = None
        if spec.role == "new":
            with torch.no_grad():
                raw = self.new_class_logits(batch["image"], list(spec.classnames or ()))
        self._update(
            metrics,
            batch,
            self.test_index_groups[dataloader_idx],
            collect_scores=self._has_ood and dataloader_idx == self._id_ref,
            raw=raw,
        )

    def on_test_epoch_end(self) -> None:
        out: dict[str, float] = {}
        id_scores = self.id_scores.compute() if self._has_ood else None
        for i, (spec, metrics) in enumerate(zip(self.test_specs, self.test_metrics, strict=True)):
            if spec.role == "ood":
                values = {
                    f"test/{spec.name}/{k}": v
                    for k, v in ood_metrics(id_scores, metrics.compute()).items()
                }
            else:
                values = _to_log(metrics.compute(), f"test/{spec.name}")
            out.update(values)
            if i == 0:
                out.update({k.replace(f"test/{spec.name}/", "test/"): v for k, v in values.items()})
            metrics.reset()
        self.id_scores.reset()
        out.update(shift_average(out, [t.name for t in self.test_specs if t.role == "shift"]))
        out.update(base_new_summary(out, self.test_specs))
        self.log_dict(out, add_dataloader_idx=False)


SHIFT_AVERAGE = "avg_shift"  # `test/avg_shift/<key>`: unweighted mean over the `shift` test sets


def shift_average(values: dict[str, float], shift_sets: list[str]) -> dict[str, float]:
    """`test/avg_shift/<key>` = unweighted mean of `test/<set>/<key>` over the shift sets.

    The robust fine-tuning tables' "avg OOD" (robust_finetuning.md §3.1; computed here, never taken
    from a logged average: pitfall P2). Keys some shift set lacks are left out.
    """
    if not shift_sets:
        return {}
    keys = {k.split("/")[-1] for k in values if k.startswith(f"test/{shift_sets[0]}/")}
    out = {}
    for key in sorted(keys):
        vals = [values.get(f"test/{s}/{key}") for s in shift_sets]
        if all(v is not None for v in vals):
            out[f"test/{SHIFT_AVERAGE}/{key}"] = float(sum(vals) / len(vals))
    return out


BASE_NEW_KEYS: tuple[str, ...] = ("base_acc", "new_acc", "hm")


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2BN / (B + N) (CoCoOp's base-to-new summary); 0 when both are 0."""
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


def base_new_summary(values: dict[str, float], test_sets: list[TestSet]) -> dict[str, float]:
    """`test/base_acc` (the first `id` set), `test/new_acc` (the first `new` set) and `test/hm`.

    Empty without a `new` test set. Per run; a table's average row averages B and N over datasets
    and takes the HM of those averages (`reprolab.tables.aggregate`), never the mean of HMs.
    """
    base = next((t.name for t in test_sets if t.role == "id"), None)
    new = next((t.name for t in test_sets if t.role == "new"), None)
    if base is None or new is None:
        return {}
    b, n = values.get(f"test/{base}/acc"), values.get(f"test/{new}/acc")
    if b is None or n is None:
        return {}
    return {"test/base_acc": b, "test/new_acc": n, "test/hm": harmonic_mean(b, n)}


def _a(noun: str) -> str:
    """The noun with its indefinite article ("an image classification")."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _index_groups(test_sets: Iterable[TestSet], num_classes: int) -> list[list[list[int]] | None]:
    """Index groups in test-set order, checked against the class count."""
    out = []
    for t in test_sets:
        g = t.index_groups
        if g is not None:
            g = [[int(i) for i in group] for group in g]
            bad = sorted({i for group in g for i in group if not 0 <= i < num_classes})
            if bad or not all(g):
                raise ValueError(
                    f"test set {t.name}: index groups must be non-empty lists of indices into the "
                    f"{num_classes} classes (got {bad[:5] or 'an empty group'})"
                )
        out.append(g)
    return out


#: GroupAccuracy's `{"worst", "average", "weighted", "group<k>"}` (fractions) as logged keys
#: (percent). A MetricCollection flattens a metric's dict result into its keys, so they arrive as
#: `worst` / `average` / `weighted` / `group0` ...
_GROUP_KEYS = {"worst": "worst_group_acc", "average": "avg_group_acc", "weighted": "acc_weighted"}


def _group_key(k: str) -> str | None:
    if k in _GROUP_KEYS:
        return _GROUP_KEYS[k]
    if k.startswith("group") and k[5:].isdigit():
        return f"{k}_acc"  # group0_acc, ...
    return None


def _to_log(values: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in values.items():
        if k == "group":  # the unflattened form: {"worst", "average", ...}
            out.update(_to_log(dict(v), prefix))
            continue
        if _group_key(k) is not None:
            out[f"{prefix}/{_group_key(k)}"] = 100.0 * float(v)
            continue
        v = float(v)
        out[f"{prefix}/{k}"] = 100.0 * v if k.endswith("acc") else v
    return out
