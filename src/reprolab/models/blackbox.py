"""Query-only view of a frozen CLIP model: the single door to the target model of black-box methods.

Used by BlackVIP (Oh et al., "BlackVIP: Black-Box Visual Prompting for Robust Transfer Learning",
CVPR 2023, arXiv 2303.14773) and its baselines (BAR, VP with SPSA-GC). The black-box setting of the
paper (spec §1): a method sends images and receives the zero-shot logits
``logit_scale * normalize(f(x)) @ T.T`` with one text head computed once; no gradient ever flows
through CLIP, and the number of queries is part of the setting (spec §11: calls and images are both
recorded). Training queries (`queries`, `images`: what the budget limits and what the paper reports)
are counted apart from evaluation queries (`eval_counts["val"]`, `eval_counts["test"]`).

Access settings (`output`, MixDiff's constrained-access settings, robustness_ood_prompting.md
§3.1/§3.3): what the caller receives per image is `logits` (the default), `probs` (their softmax),
`label` (the one-hot of their argmax, a float (B, C) tensor) or `embedding` (the L2-normalised image
embedding (B, D), the input of the zero-shot head). With `embedding`, `head(embeddings)` is the
model's last layer applied to embeddings the caller holds (MixDiff's embedding mixup mixes them):
``logit_scale * z @ T.T`` without renormalising, counted in `head_evals` (not images, not budget).

The target may also be a plain classifier (`classnames=None`): any callable or module mapping an
input stack (N, ...) to logits (N, C) (the 2-D linear-softmax black box of MixDiff's synthetic test);
its `logit_scale` is 1 unless given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from reprolab.errors import ConfigValueError

log = logging.getLogger(__name__)

Phase = Literal["train", "val", "test"]
EVAL_PHASES = ("val", "test")
Output = Literal["logits", "probs", "label", "embedding"]
OUTPUTS: tuple[str, ...] = ("logits", "probs", "label", "embedding")

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
    """Images in, logits (or probabilities, labels, embeddings) out; counts queries and images;
    exposes no parameters.

    The backbone lives only in a closure: the object has no ``parameters()``, no ``backbone`` attribute
    and is not an ``nn.Module``, so it never enters a method's state dict or optimiser. Outputs are
    computed under ``torch.inference_mode()`` and returned as plain tensors without autograd history.

    Args:
        backbone: Frozen CLIP-like model with ``encode_image``, ``zeroshot_weights`` and
            ``logit_scale``; with ``classnames=None``, a classifier: ``backbone(x) -> (N, C)``.
        classnames: Class names of the task (None: ``backbone`` is a classifier).
        templates: Prompt templates (``{}`` is replaced by the class name).
        budget: Optional maximum number of ``budget_unit`` (images or queries) over the whole run's
            training; must be > 0 (a budget of 0 trains nothing and is refused at build time).
        budget_unit: What ``budget`` counts: ``"images"`` or ``"queries"``.
        max_batch: Images evaluated per backbone forward; larger stacks are split into chunks of
            this size (memory only: the logits are the same).
        output: What a query returns: ``logits`` | ``probs`` | ``label`` | ``embedding`` (above).
        logit_scale: The scale of the logits; None: the backbone's (1 for a classifier).
    """

    __slots__ = (
        "_forward",
        "_head",
        "_to",
        "_num_classes",
        "_classifier",
        "_output",
        "_logit_scale",
        "queries",
        "images",
        "eval_counts",
        "head_evals",
        "budget",
        "budget_unit",
        "max_batch",
    )

    def __init__(
        self,
        backbone: ZeroShotBackbone | Callable[[Tensor], Tensor],
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        budget: int | None = None,
        budget_unit: Literal["images", "queries"] = "images",
        max_batch: int = 512,
        output: Output = "logits",
        logit_scale: float | None = None,
    ) -> None:
        if budget_unit not in ("images", "queries"):
            raise ValueError(f"Unknown budget_unit '{budget_unit}'; available: images, queries.")
        if output not in OUTPUTS:
            raise ConfigValueError(
                f"BlackBox: unknown output {output!r}; available: {', '.join(OUTPUTS)}."
            )
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
        classifier = classnames is None
        if classifier and output == "embedding":
            raise ConfigValueError(
                "BlackBox: output=embedding needs a CLIP-like target (encode_image + a zero-shot "
                "head from class names); a plain classifier has no embedding to return. Use "
                "output=logits, probs or label."
            )
        if classifier:
            if not callable(backbone):
                raise TypeError(
                    f"BlackBox: without classnames the target must be a callable classifier "
                    f"(x -> logits); got {type(backbone).__name__}."
                )
            state: dict[str, Any] = {"device": None}
            scale = 1.0 if logit_scale is None else float(logit_scale)
            num_classes: int | None = None
        else:
            with torch.inference_mode():
                weights = backbone.zeroshot_weights(list(classnames), list(templates or ["{}"]))
                weights = F.normalize(weights.float(), dim=-1)  # (C, D)
            scale = float(backbone.logit_scale if logit_scale is None else logit_scale)
            state = {"weights": weights, "device": weights.device}
            num_classes = int(weights.shape[0])

        def place(x: Tensor) -> None:
            if state["device"] is not None and x.device != state["device"]:
                log.info("BlackBox: moving the target model to %s.", x.device)
                to(x.device)

        def embed(images: Tensor) -> Tensor:  # (b, D), L2-normalised
            return F.normalize(backbone.encode_image(images).float(), dim=-1)

        def head(z: Tensor) -> Tensor:  # (b, D) -> (b, C); no renormalisation (MixDiff's mixup)
            place(z)
            return scale * z.float() @ state["weights"].T

        def forward(images: Tensor) -> Tensor:
            place(images)
            if classifier:
                logits = backbone(images).float()  # (b, C)
            elif output == "embedding":
                return embed(images)  # (b, D)
            else:
                logits = scale * embed(images) @ state["weights"].T  # (b, C)
            if output == "probs":
                return logits.softmax(-1)
            if output == "label":
                return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
            return logits

        def to(device: torch.device | str) -> None:
            if hasattr(backbone, "to"):
                backbone.to(device)
            if "weights" in state:
                state["weights"] = state["weights"].to(device)
            state["device"] = torch.device(device)

        object.__setattr__(self, "_forward", forward)
        object.__setattr__(self, "_head", head)
        object.__setattr__(self, "_to", to)
        object.__setattr__(self, "_num_classes", num_classes)
        object.__setattr__(self, "_classifier", classifier)
        object.__setattr__(self, "_output", output)
        object.__setattr__(self, "_logit_scale", scale)
        self.queries = 0
        self.images = 0
        self.eval_counts = {p: {"queries": 0, "images": 0} for p in EVAL_PHASES}
        self.head_evals = {"train": 0, "val": 0, "test": 0}
        self.budget = budget
        self.budget_unit = budget_unit
        self.max_batch = max_batch

    @property
    def num_classes(self) -> int | None:
        """C, the number of logits per image (a classifier's: known after its first query)."""
        return self._num_classes

    @property
    def output(self) -> str:
        """The access setting: what a query returns (`logits`, `probs`, `label`, `embedding`)."""
        return self._output

    @property
    def logit_scale(self) -> float:
        """The scale s of the logits (CLIP: exp of the learned log-scale; MixDiff's energy / MCM
        temperature). A published constant of the deployed model, not a trainable handle."""
        return self._logit_scale

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
        self.head_evals[phase] = 0

    def __call__(self, images: Tensor, queries: int = 1, phase: Phase = "train") -> Tensor:
        """Outputs (``output``: logits by default) of a batch of CLIP-normalised images.

        Args:
            images: Images, or ``queries`` equally sized minibatches stacked along dim 0.
                # (queries * B, 3, H, W); a classifier target takes any (queries * B, ...)
            queries: How many black-box calls this stack stands for (e.g. 2q for a batched SPSA
                step); counted in ``self.queries``.
            phase: ``"train"`` queries are limited by the budget and counted in ``queries`` /
                ``images``; ``"val"`` and ``"test"`` queries are evaluation, never limited, and
                counted in ``eval_counts[phase]``.

        Returns:
            Outputs without autograd history.  # (queries * B, C), embeddings (queries * B, D)

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
        if images.dim() != 4 and not self._classifier:
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
        if self._num_classes is None:  # a classifier target: C is known from its first answer
            object.__setattr__(self, "_num_classes", int(out.shape[-1]))
        return out.clone()  # a normal tensor: usable outside inference mode

    def head(self, embeddings: Tensor, phase: Phase = "test") -> Tensor:
        """Logits of embeddings the caller holds (``output="embedding"`` only): the model's last
        layer, ``logit_scale * z @ T.T``, without renormalising ``z`` (a mixed embedding keeps its
        norm, as in MixDiff's embedding mixup). Counted in ``head_evals[phase]``.

        Args:
            embeddings: Image embeddings, e.g. convex combinations of ones this oracle returned.
                # (N, D)
            phase: Counter to charge (``train``, ``val``, ``test``); never limited by the budget.

        Returns:
            Logits without autograd history.  # (N, C)
        """
        if self._output != "embedding":
            raise ValueError(
                f"BlackBox.head is the embedding setting's last layer; this oracle answers "
                f"output={self._output}. Build it with output='embedding'."
            )
        if embeddings.requires_grad:
            raise BlackBoxGradientError(
                "BlackBox.head got embeddings that require grad; black-box methods cannot "
                "backpropagate through the target model (pass detached embeddings)."
            )
        if phase not in self.head_evals:
            raise ValueError(f"Unknown phase '{phase}'; available: train, val, test.")
        with torch.inference_mode():
            out = torch.cat([self._head(chunk) for chunk in embeddings.split(self.max_batch)])
        self.head_evals[phase] += int(embeddings.shape[0])
        return out.clone()

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
            "(images in, outputs out) and exposes no backbone, parameters or gradients. Available: "
            "__call__, query_many, head, num_classes, output, logit_scale, queries, images, "
            "eval_counts, head_evals, reset_eval, budget, remaining, state, load_state, to."
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise AttributeError(f"BlackBox: '{name}' cannot be set from outside.")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        budget = "none" if self.budget is None else f"{self.budget} {self.budget_unit}"
        return (
            f"BlackBox(classes={self._num_classes}, output={self._output}, queries={self.queries}, "
            f"images={self.images}, eval={self.eval_counts}, budget={budget}, "
            f"max_batch={self.max_batch})"
        )
