"""Query-only view of a frozen CLIP model: the single door to the target model of black-box methods.

Used by BlackVIP (Oh et al., "BlackVIP: Black-Box Visual Prompting for Robust Transfer Learning",
CVPR 2023, arXiv 2303.14773) and its baselines (BAR, VP with SPSA-GC). The black-box setting of the
paper (spec §1): a method sends images and receives the zero-shot logits
``logit_scale * normalize(f(x)) @ T.T`` with one text head computed once; no gradient ever flows
through CLIP, and the number of queries is part of the setting (spec §11: calls and images are both
recorded). Training queries (`queries`, `images`: what the budget limits and what the paper reports)
are counted apart from evaluation queries (`eval_counts["val"]`, `eval_counts["test"]`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from reprolab.errors import ConfigValueError

log = logging.getLogger(__name__)

Phase = Literal["train", "val", "test"]
EVAL_PHASES = ("val", "test")

__all__ = ["BlackBox", "BlackBoxGradientError", "QueryBudgetExceeded", "ZeroShotBackbone"]


class ZeroShotBackbone(Protocol):
    """The part of ``CLIPBackbone`` (docs/CONTRACTS.md) that the black box uses."""

    logit_scale: float

    def encode_image(self, images: Tensor) -> Tensor: ...  # (B, 3, H, W) -> (B, D)

    def zeroshot_weights(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor: ...


class QueryBudgetExceeded(RuntimeError):
    """Raised before a query that would exceed the budget; the query is not evaluated or counted."""


class BlackBoxGradientError(RuntimeError):
    """Raised when a black-box query is asked to carry autograd history."""


class BlackBox:
    """Images in, logits out; counts queries and images; exposes no parameters.

    The backbone lives only in a closure: the object has no ``parameters()``, no ``backbone`` attribute
    and is not an ``nn.Module``, so it never enters a method's state dict or optimiser. Logits are
    computed under ``torch.inference_mode()`` and returned as plain tensors without autograd history.

    Args:
        backbone: Frozen CLIP-like model with ``encode_image``, ``zeroshot_weights`` and
            ``logit_scale``.
        classnames: Class names of the task.
        templates: Prompt templates (``{}`` is replaced by the class name).
        budget: Optional maximum number of ``budget_unit`` (images or queries) over the whole run's
            training; must be > 0 (a budget of 0 trains nothing and is refused at build time).
        budget_unit: What ``budget`` counts: ``"images"`` or ``"queries"``.
        max_batch: Images evaluated per backbone forward; larger stacks are split into chunks of
            this size (memory only: the logits are the same).
    """

    __slots__ = (
        "_forward",
        "_to",
        "_num_classes",
        "queries",
        "images",
        "eval_counts",
        "budget",
        "budget_unit",
        "max_batch",
    )

    def __init__(
        self,
        backbone: ZeroShotBackbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        budget: int | None = None,
        budget_unit: Literal["images", "queries"] = "images",
        max_batch: int = 512,
    ) -> None:
        if budget_unit not in ("images", "queries"):
            raise ValueError(f"Unknown budget_unit '{budget_unit}'; available: images, queries.")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0
        ):
            raise ConfigValueError(
                f"BlackBox query budget={budget!r} leaves no query for training; give a positive "
                f"number of {budget_unit} (method.budget), or None (method.budget=null) for no limit."
            )
        if hasattr(backbone, "eval"):
            backbone.eval()
        if hasattr(backbone, "requires_grad_"):
            backbone.requires_grad_(False)
        with torch.inference_mode():
            weights = backbone.zeroshot_weights(list(classnames), list(templates))  # (C, D)
            weights = F.normalize(weights.float(), dim=-1)
        scale = float(backbone.logit_scale)
        state: dict[str, Any] = {"weights": weights}

        def forward(images: Tensor) -> Tensor:
            if images.device != state["weights"].device:
                log.info("BlackBox: moving the target model to %s.", images.device)
                to(images.device)
            feats = backbone.encode_image(images)  # (b, D)
            feats = F.normalize(feats.float(), dim=-1)
            return scale * feats @ state["weights"].T  # (b, C)

        def to(device: torch.device | str) -> None:
            if hasattr(backbone, "to"):
                backbone.to(device)
            state["weights"] = state["weights"].to(device)

        object.__setattr__(self, "_forward", forward)
        object.__setattr__(self, "_to", to)
        object.__setattr__(self, "_num_classes", int(weights.shape[0]))
        self.queries = 0
        self.images = 0
        self.eval_counts = {p: {"queries": 0, "images": 0} for p in EVAL_PHASES}
        self.budget = budget
        self.budget_unit = budget_unit
        self.max_batch = max_batch

    @property
    def num_classes(self) -> int:
        """C, the number of logits per image."""
        return self._num_classes

    @property
    def used(self) -> int:
        """Consumption in ``budget_unit``."""
        return self.images if self.budget_unit == "images" else self.queries

    @property
    def remaining(self) -> int | None:
        """Budget left in ``budget_unit`` (None without a budget)."""
        return None if self.budget is None else self.budget - self.used

    def to(self, device: torch.device | str) -> BlackBox:
        """Move the hidden backbone and text head to ``device``; returns self."""
        self._to(device)
        return self

    def reset_eval(self, phase: str) -> None:
        """Zero the counters of evaluation phase ``phase`` (``"val"`` or ``"test"``)."""
        self.eval_counts[phase] = {"queries": 0, "images": 0}

    def __call__(self, images: Tensor, queries: int = 1, phase: Phase = "train") -> Tensor:
        """Logits of a batch of CLIP-normalised images.

        Args:
            images: Images, or ``queries`` equally sized minibatches stacked along dim 0.
                # (queries * B, 3, H, W)
            queries: How many black-box calls this stack stands for (e.g. 2q for a batched SPSA
                step); counted in ``self.queries``.
            phase: ``"train"`` queries are limited by the budget and counted in ``queries`` /
                ``images``; ``"val"`` and ``"test"`` queries are evaluation, never limited, and
                counted in ``eval_counts[phase]``.

        Returns:
            Logits without autograd history.  # (queries * B, C)

        Raises:
            BlackBoxGradientError: ``images`` requires grad.
            QueryBudgetExceeded: the call would exceed the budget (nothing is evaluated).
        """
        if images.requires_grad:
            raise BlackBoxGradientError(
                "BlackBox got images that require grad. Black-box methods cannot backpropagate "
                "through the target model; estimate gradients from queries (SPSA, RGF) and pass "
                "detached images (e.g. compute prompts under torch.no_grad())."
            )
        if images.dim() != 4:
            raise ValueError(
                f"BlackBox expects images (N, 3, H, W); got shape {tuple(images.shape)}."
            )
        if queries < 1 or images.shape[0] % queries:
            raise ValueError(
                f"{images.shape[0]} images cannot be split into queries={queries} equal minibatches."
            )
        if phase != "train" and phase not in EVAL_PHASES:
            raise ValueError(f"Unknown phase '{phase}'; available: train, val, test.")
        n = int(images.shape[0])
        cost = n if self.budget_unit == "images" else queries
        if phase == "train" and self.budget is not None and self.used + cost > self.budget:
            raise QueryBudgetExceeded(
                f"Query budget exhausted: {self.used} of {self.budget} {self.budget_unit} used, this "
                f"call needs {cost} more. Stop training (the method should catch this) or raise "
                "the budget."
            )
        with torch.inference_mode():
            out = torch.cat([self._forward(chunk) for chunk in images.split(self.max_batch)])
        if phase == "train":
            self.queries += queries
            self.images += n
        else:
            counts = self.eval_counts[phase]
            counts["queries"] += queries
            counts["images"] += n
        return out.clone()  # a normal tensor: usable outside inference mode

    def query_many(self, batches: Sequence[Tensor], phase: Phase = "train") -> list[Tensor]:
        """Evaluate several minibatches (each one query) together, chunked by ``max_batch``.

        Returns:
            One logits tensor per minibatch, in order.  # [(B_i, C)]
        """
        sizes = [int(b.shape[0]) for b in batches]
        if len(set(sizes)) > 1:
            return [self(b, phase=phase) for b in batches]
        logits = self(torch.cat(list(batches)), queries=len(batches), phase=phase)
        return list(logits.split(sizes))

    def state(self) -> dict[str, int]:
        """Training counters, for checkpoints (a resumed run keeps counting; evaluation counters
        are per evaluation pass and are not saved)."""
        return {"queries": self.queries, "images": self.images}

    def load_state(self, state: dict[str, int]) -> None:
        """Restore counters saved by :meth:`state`."""
        self.queries = int(state["queries"])
        self.images = int(state["images"])

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"BlackBox has no attribute '{name}': it is a query-only view of the target model "
            "(images in, logits out) and exposes no backbone, parameters or gradients. Available: "
            "__call__, query_many, num_classes, queries, images, eval_counts, reset_eval, budget, "
            "remaining, state, load_state, to."
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise AttributeError(f"BlackBox: '{name}' cannot be set from outside.")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        budget = "none" if self.budget is None else f"{self.budget} {self.budget_unit}"
        return (
            f"BlackBox(classes={self._num_classes}, queries={self.queries}, images={self.images}, "
            f"eval={self.eval_counts}, budget={budget}, max_batch={self.max_batch})"
        )
