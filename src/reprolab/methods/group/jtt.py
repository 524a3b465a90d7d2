"""JTT: Just Train Twice (Liu et al., "Just Train Twice: Improving Group Robustness without Training
Group Information", ICML 2021, arXiv 2107.09044; spec robustness_ood_prompting.md §1.7).

Two stages in one command, as two rounds of the runner (a killed run resumes in the stage it died in;
the stage-1 test metrics and the error set stay in `metrics.json` under `rounds`):

- round 0 (`identify`): ERM for `first_stage_step_frac` of the run's steps (SubpopBench
  `AbstractTwoStage.switch_step = int(first_stage_step_frac * steps)`), then the error set: the
  indices of the training examples the stage-1 model misclassifies (one in-order pass over the train
  split in eval mode, at the start of the round's test);
- round 1 (`upweight`): a model trained from its initial state again (the featurizer's initial
  weights, a fresh head; SubpopBench builds a second `ERM` for stage 2, `JTT_Stage2`) for the
  remaining steps, with cross-entropy weighted `jtt_lambda` on the error set and 1 elsewhere,
  averaged over the batch (SubpopBench `JTT_Stage2._compute_loss`: `(loss * weights).mean()`).

Group labels are not used for training (only by the evaluation, and by the run record's per-group
count of the error set, a diagnostic).

# DEVIATION (from the official `anniesch/jtt`, not from SubpopBench): the official code upsamples the
# error set λ_up times in the stage-2 training set (`process_training.py` writes the error set,
# `generate_downstream.py` launches stage 2 with `--up_weight`); here, as in SubpopBench, the loss of
# each error-set example is weighted by λ_up, keyed by the batch's `index` (both data modules serve
# it), which leaves the data modules' samplers alone.
# DEVIATION (SubpopBench): SubpopBench marks a stage-2 batch's errors by running the frozen stage-1
# model on that (possibly augmented) batch; here the error set is computed once, on the train split as
# the data module serves it (its train transforms). Without augmentation the two are the same set.
# DEVIATION (SubpopBench): with a randomly initialised featurizer (`model=mlp_featurizer`) stage 2
# restarts from stage 1's initial featurizer weights, not a second random draw; with pretrained
# featurizers (SubpopBench's case) both restart from the pretrained weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from reprolab.errors import ConfigValueError
from reprolab.methods.group.base import GroupMethod

log = logging.getLogger(__name__)

STAGES = ("identify", "upweight")


def ordered_batches(
    dataset: Dataset, batch_size: int, num_workers: int = 0
) -> Iterator[dict[str, Tensor]]:
    """Every item of a data module's split once, in index order, as batches of dicts.

    `VectorGroupDataModule`'s rows (a dataset indexed by a list of rows, `tensors`) are sliced
    directly; an item dataset (`ClassificationDataModule`) goes through a sequential DataLoader.
    """
    if isinstance(getattr(dataset, "tensors", None), dict):
        n = len(dataset)
        for start in range(0, n, batch_size):
            yield dataset[list(range(start, min(n, start + batch_size)))]
        return
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def train_split(datamodule: Any) -> Dataset:
    """The train split a data module serves (the dataset behind its train loader)."""
    return datamodule.train_dataloader().dataset


def stage2_weights(error_set: list[int], num_train: int, lambda_up: float) -> Tensor:
    """Per training example: `lambda_up` on the error set, 1 elsewhere. (N,)"""
    w = torch.ones(num_train)
    if error_set:
        w[torch.as_tensor(error_set, dtype=torch.long)] = float(lambda_up)
    return w


class JTT(GroupMethod):
    """ERM (round 0), then ERM from scratch with the stage-1 error set upweighted (round 1).

    Args:
        jtt_lambda: λ_up, the loss weight of the error set in stage 2.
        first_stage_step_frac: the share of the run's length that stage 1 trains.
        total_steps: the run's length in optimiser steps (`trainer.max_steps`; null or <= 0: use
            `total_epochs`); stage 1 gets `int(first_stage_step_frac * total_steps)`, stage 2 the rest.
        total_epochs: the run's length in epochs (`trainer.max_epochs`), split the same way, when
            there is no step budget.
        identify_batch_size: batch size of the pass that finds the error set (None: the data
            module's `eval_batch_size`).
        **kwargs: see `GroupMethod` (`head_init`, `normalize`, `optimizer`, ...).
    """

    def __init__(
        self,
        *args: Any,
        jtt_lambda: float = 10.0,
        first_stage_step_frac: float = 0.5,
        total_steps: int | None = None,
        total_epochs: int | None = None,
        identify_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        name = kwargs.get("name", "jtt")
        if kwargs.get("rounds", 2) != 2:
            raise ConfigValueError(
                f"method={name} trains in two stages (two rounds); remove method.rounds."
            )
        kwargs["rounds"] = 2
        super().__init__(*args, **kwargs)
        if not float(jtt_lambda) > 0:
            raise ConfigValueError(f"method={name}: jtt_lambda must be > 0, got {jtt_lambda}.")
        if not 0.0 < float(first_stage_step_frac) < 1.0:
            raise ConfigValueError(
                f"method={name}: first_stage_step_frac must lie in (0, 1), got "
                f"{first_stage_step_frac}."
            )
        self.jtt_lambda = float(jtt_lambda)
        self.first_stage_step_frac = float(first_stage_step_frac)
        self.stage_budgets = self._split_budget(total_steps, total_epochs)
        self.identify_batch_size = identify_batch_size
        self.stage = STAGES[0]
        self.error_set: list[int] | None = None
        self.num_train: int | None = None
        self.error_set_groups: list[int] | None = None
        self.register_buffer("upweights", None, persistent=False)  # (N,) in stage 2
        # Stage 2 restarts the featurizer from here (only the parts that train; on CPU).
        self._initial_backbone = self._trainable_backbone_state() if self._backbone_trains else {}

    # -- stages ---------------------------------------------------------------------------------
    def _split_budget(self, steps: int | None, epochs: int | None) -> list[dict[str, int]]:
        """The trainer arguments of each stage: the run's steps (or epochs) split at the fraction."""
        frac = self.first_stage_step_frac
        for key, total in (("max_steps", steps), ("max_epochs", epochs)):
            if total is None or int(total) <= 0:
                continue
            total = int(total)
            first = int(frac * total)  # SubpopBench: switch_step = int(frac * steps)
            if first < 1 or total - first < 1:
                raise ConfigValueError(
                    f"method={self.name}: {key}={total} at first_stage_step_frac={frac} leaves a "
                    f"stage without training ({first} + {total - first}); train longer."
                )
            return [{key: first}, {key: total - first}]
        raise ConfigValueError(
            f"method={self.name} splits the run's length between its two stages and got none; "
            "set trainer.max_steps (or trainer.max_epochs)."
        )

    def round_trainer_overrides(self, round_idx: int) -> dict[str, Any]:
        return dict(self.stage_budgets[round_idx])

    def start_round(self, round_idx: int, datamodule: L.LightningDataModule) -> None:
        self.stage = STAGES[round_idx]
        if self.stage == "upweight":
            if self.error_set is None or self.num_train is None:
                raise RuntimeError("JTT stage 2 started without the stage-1 error set.")
            self.upweights = stage2_weights(self.error_set, self.num_train, self.jtt_lambda).to(
                self.device
            )
            log.info(
                "%s stage 2: %d of %d training examples in the error set (%.2f%%), loss weight %g",
                self.name,
                len(self.error_set),
                self.num_train,
                100.0 * len(self.error_set) / max(self.num_train, 1),
                self.jtt_lambda,
            )

    def round_state(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "num_train": self.num_train,
            "error_set_size": None if self.error_set is None else len(self.error_set),
            "error_set_groups": self.error_set_groups,
            "error_set": self.error_set,
        }

    def load_round_state(self, state: dict[str, Any], datamodule: L.LightningDataModule) -> None:
        if state.get("error_set") is not None:
            self.error_set = [int(i) for i in state["error_set"]]
            self.num_train = int(state["num_train"])
            self.error_set_groups = state.get("error_set_groups")
        self.stage = state.get("stage", self.stage)

    # -- stage 1 -> error set -------------------------------------------------------------------
    def on_test_start(self) -> None:
        if self.stage == "identify" and self.error_set is None:
            dm = self.trainer.datamodule
            bs = self.identify_batch_size or getattr(dm, "eval_batch_size", 256)
            self.identify_errors(train_split(dm), int(bs), getattr(dm, "num_workers", 0))

    @torch.no_grad()
    def identify_errors(self, dataset: Dataset, batch_size: int, num_workers: int = 0) -> list[int]:
        """The error set: indices (batch `index`) of the examples the current model misclassifies.

        Sets `error_set` (sorted), `num_train` and `error_set_groups` (per-group counts, when the
        batches carry groups).
        """
        was_training = self.training
        self.eval()
        wrong: list[Tensor] = []
        groups: list[Tensor] = []
        n = 0
        for batch in ordered_batches(dataset, batch_size, num_workers):
            index = self._batch_index(batch)
            pred = self.logits(batch["image"].to(self.device)).argmax(-1).cpu()
            miss = pred.ne(batch["label"].cpu())
            wrong.append(index.cpu()[miss])
            if "group" in batch:
                groups.append(batch["group"].cpu()[miss])
            n = max(n, int(index.max()) + 1 if index.numel() else 0)
        self.train(was_training)
        errors = torch.cat(wrong).long() if wrong else torch.zeros(0, dtype=torch.long)
        self.error_set = sorted(errors.tolist())
        self.num_train = max(n, len(dataset))
        self.error_set_groups = (
            torch.bincount(torch.cat(groups).long(), minlength=self.num_groups).tolist()
            if groups
            else None
        )
        log.info(
            "%s stage 1: error set of %d / %d training examples (per group: %s)",
            self.name,
            len(self.error_set),
            self.num_train,
            self.error_set_groups,
        )
        return self.error_set

    # -- stage 2 starts from scratch ------------------------------------------------------------
    def _trainable_backbone_state(self) -> dict[str, Tensor]:
        frozen = tuple(getattr(self.backbone, "frozen_state_prefixes", list)())
        return {
            k: v.detach().cpu().clone()
            for k, v in self.backbone.state_dict().items()
            if not (frozen and k.startswith(frozen))
        }

    @torch.no_grad()
    def reinitialize(self) -> None:
        """The featurizer's initial weights and a fresh head (in place: the optimiser holds them)."""
        if self._initial_backbone:
            self.backbone.load_state_dict(self._initial_backbone, strict=False)
        if self.head_init == "zeroshot":
            fresh = self.build_head("zeroshot")
            self.head.weight.copy_(fresh.weight)
            self.head.bias.copy_(fresh.bias)
            return
        # nn.Linear's default init from a generator of its own: the same head whether or not the
        # run was restarted between the stages.
        g = torch.Generator().manual_seed((torch.initial_seed() + 1) % 2**63)
        w = torch.empty(self.head.weight.shape)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        bound = 1.0 / math.sqrt(w.shape[1]) if w.shape[1] else 0.0
        b = torch.empty(self.head.bias.shape).uniform_(-bound, bound, generator=g)
        self.head.weight.copy_(w)
        self.head.bias.copy_(b)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.stage != "upweight":
            return
        ckpt = self.trainer.ckpt_path
        if ckpt:
            # Resumed inside stage 2: the runner has just put the finished round's (stage 1's)
            # weights back over the ones Lightning restored from this round's checkpoint; put the
            # stage-2 weights back.
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            self.on_load_checkpoint(state)
            self.load_state_dict(state["state_dict"])
            log.info("%s stage 2: resumed from %s", self.name, ckpt)
        else:
            self.reinitialize()
            log.info("%s stage 2: training from the initial weights again", self.name)

    # -- training -------------------------------------------------------------------------------
    def _batch_index(self, batch: dict[str, Tensor]) -> Tensor:
        if "index" not in batch:
            raise ConfigValueError(
                f"method={self.name} weights training examples by their index, but the batches "
                f"of data={self.info.name} carry no `index`."
            )
        return torch.as_tensor(batch["index"]).long()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        per_sample = self.per_sample_loss(self.logits(batch["image"]), batch["label"])
        if self.stage == "upweight":
            w = self.upweights.to(per_sample.device)[self._batch_index(batch).to(per_sample.device)]
            loss = (per_sample * w).mean()  # SubpopBench: the mean of the weighted losses
            self.log("train/upweighted_frac", (w != 1).float().mean())
        else:
            loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True)
        if "group" in batch:  # a diagnostic only: JTT trains without group labels
            self.log_group_terms(per_sample, batch["group"])
        return loss

    # -- record ---------------------------------------------------------------------------------
    def extra_metrics(self) -> dict[str, float]:
        if self.error_set is None or not self.num_train:
            return {}
        k = len(self.error_set)
        return {"jtt/error_set_size": float(k), "jtt/error_set_frac": 100.0 * k / self.num_train}

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (*super().metric_keys(), "jtt/*")
