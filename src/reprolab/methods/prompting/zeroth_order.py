"""Shared machinery of black-box prompting methods trained with zeroth-order optimisers.

A black-box method never holds the target model: it receives a `BlackBox` oracle (images in,
logits out, no parameters, no autograd) and estimates gradients from loss queries. Subclasses
define the prompt (`prompted`, `prompted_batched`), the loss and the optimiser; this class runs the
step with Lightning's manual optimisation, counts queries, honours a query budget and keeps the
optimiser and oracle state in checkpoints so that a resumed run continues exactly.

Query counts: `train/queries`, `train/images` are the training queries only (what the budget limits
and the paper reports); evaluation is counted apart, `test/queries`, `test/images` for the test pass
(every test set) and `val/queries`, `val/images` for validation during training.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.errors import ConfigValueError
from reprolab.methods.base import ClassificationMethod
from reprolab.models.blackbox import BlackBox, Phase, QueryBudgetExceeded

log = logging.getLogger(__name__)


class ZerothOrderPrompting(ClassificationMethod):
    """Base of BlackVIP, VP w/ SPSA-GC and BAR.

    Args:
        model: the target model; it is wrapped in a `BlackBox` and not kept.
        budget: optional limit (> 0) on images sent to the oracle during training; training stops
            cleanly when the next step would exceed it. Evaluation queries are not limited.
        batched: evaluate all perturbations of a step in one oracle call (False: one call per
            perturbation; identical update, used by the benchmark).
        max_batch: images per oracle forward (memory only).
        **kwargs: see `ClassificationMethod`.
    """

    requires = ("classnames", "templates")

    def __init__(
        self,
        *args: Any,
        model: nn.Module,
        budget: int | None = None,
        batched: bool = True,
        max_batch: int = 2048,
        **kwargs: Any,
    ) -> None:
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0
        ):
            name = kwargs.get("name", type(self).__name__)
            raise ConfigValueError(
                f"method={name}: method.budget={budget!r} leaves no query for training; give a "
                "positive number of training images, or method.budget=null for no limit."
            )
        super().__init__(*args, model=None, **kwargs)
        self.automatic_optimization = False
        self.preprocess = model.preprocess
        self._target_params = sum(p.numel() for p in model.parameters())
        self.oracle = BlackBox(
            model, self.classnames, self.templates, budget=budget, max_batch=max_batch
        )
        self.budget = budget
        self.batched = batched
        self.optimizer: Any = None  # a zeroth-order optimiser (SPSA, RGF), built by subclasses
        self.budget_exhausted = False

    # -- what subclasses define -------------------------------------------------------------
    def prompted(self, images: Tensor) -> Tensor:
        """Prompted images with the current parameters.  # (B, 3, S, S)"""
        raise NotImplementedError

    def prompted_batched(self, images: Tensor, thetas: Tensor) -> Tensor:
        """Prompted images for each flat parameter row.  # (R, B, 3, S, S)"""
        raise NotImplementedError

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-row loss of logits (R, B, C) against labels (B,).  # (R,)"""
        r, b, c = logits.shape
        ce = F.cross_entropy(logits.reshape(r * b, c), labels.repeat(r), reduction="none")
        return ce.view(r, b).mean(dim=1)

    def prepare_step(self, images: Tensor) -> None:
        """Per-step work shared by all perturbations (BlackVIP caches encoder features)."""

    # -- training ---------------------------------------------------------------------------
    def _losses(self, images: Tensor, labels: Tensor, thetas: Tensor) -> Tensor:
        xs = self.prompted_batched(images, thetas)  # (R, B, 3, S, S)
        r, b = xs.shape[:2]
        logits = self.oracle(xs.flatten(0, 1), queries=r).view(r, b, -1)
        return self.loss(logits.float(), labels)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.budget_exhausted:
            return
        images, labels = batch["image"], batch["label"]
        self.prepare_step(images)

        def batched(thetas: Tensor) -> Tensor:  # (R, N) -> (R,)
            return self._losses(images, labels, thetas)

        def one(theta: Tensor) -> Tensor:  # (N,) -> ()
            return self._losses(images, labels, theta.unsqueeze(0))[0]

        try:
            with torch.no_grad():
                self.optimizer.step(batched if self.batched else one, batched=self.batched)
        except QueryBudgetExceeded as e:
            log.info(
                "Query budget reached after %d images: stopping training (%s)",
                self.oracle.images,
                e,
            )
            self.budget_exhausted = True
            self.trainer.should_stop = True
            return
        self._count_step()
        stats = {f"train/{k}": float(v) for k, v in self.optimizer.stats.items() if k != "loss"}
        stats["train/queries"] = float(self.oracle.queries)
        stats["train/images"] = float(self.oracle.images)
        self.log_dict(stats, prog_bar=False, on_step=True, on_epoch=False)
        self.log("train/loss", float(self.optimizer.stats.get("loss", 0.0)), prog_bar=True)

    def _count_step(self) -> None:
        # Lightning counts global steps through torch optimizers; ours lives outside torch.optim, so
        # the manual-optimisation step counter is advanced here (max_steps, checkpoints and logging
        # all read it, and it is saved and restored with the loop state).
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def configure_optimizers(self) -> None:
        return None  # the zeroth-order optimiser lives outside torch.optim

    def input_preprocess(self) -> Any:
        return self.preprocess

    def extra_parameter_count(self) -> int:
        return self._target_params  # the target model, reachable only through the oracle

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (
            *super().metric_keys(),
            "train/queries",
            "train/images",
            "train/queries_per_step",
            "test/queries",
            "test/images",
            "val/queries",
            "val/images",
        )

    # -- evaluation -------------------------------------------------------------------------
    def _eval_phase(self) -> Phase:
        trainer = self._trainer
        if trainer is not None and (trainer.validating or trainer.sanity_checking):
            return "val"
        return "test"  # the test loop, or a call outside a trainer

    def logits(self, images: Tensor) -> Tensor:
        # Evaluation queries are never limited by the (training) budget and are counted apart.
        return self.oracle(self.prompted(images), phase=self._eval_phase())

    def on_test_start(self) -> None:
        super().on_test_start()
        self.oracle.reset_eval("test")  # one test pass: test/images = the size of the test sets

    def extra_metrics(self) -> dict[str, float]:
        out = {
            "train/queries": float(self.oracle.queries),
            "train/images": float(self.oracle.images),
            "train/queries_per_step": float(self.optimizer.queries_per_step),
        }
        for phase, counts in self.oracle.eval_counts.items():
            if phase == "test" or counts["queries"]:
                out[f"{phase}/queries"] = float(counts["queries"])
                out[f"{phase}/images"] = float(counts["images"])
        return out

    # -- resume -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["zo_optimizer"] = self.optimizer.state_dict()
        checkpoint["oracle"] = self.oracle.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.optimizer.load_state_dict(checkpoint["zo_optimizer"])
        self.oracle.load_state(checkpoint["oracle"])
