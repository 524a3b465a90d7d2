"""Task info: the one small typed record a data module publishes about its task.

A method is built from `(model, info, **hparams)`; it takes from `info` what it needs and, through
`require`, says at build time, in one line, what the info lacks. The runner passes values only.

Kinds (one dataclass each; every field is plain data or a callable, never a model):
- `ImageClassificationInfo`: class names, prompt templates, groups, test sets with a role each.
- `TabularInfo`: column roles (continuous / binary / categorical), target, sensitive attribute.
- `TokenInfo`: vocabulary size, sequence length, tokenizer, special tokens.
- `InferenceInfo`: simulator, prior bounds, parameter names, true parameters of the observations.
- `RetrievalInfo`: image-caption pairs: captions per image, how training pairs are drawn, test sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from reprolab.errors import ReprolabError

TestRole = Literal["id", "shift", "ood", "new"]
ROLES: tuple[str, ...] = ("id", "shift", "ood", "new")


class TaskInfoError(ReprolabError, ValueError):
    """A method needs something its data module's task info does not provide."""


@dataclass(frozen=True)
class TestSet:
    """One evaluation set.

    Args:
        name: split name (`test`, `imagenet_r`, `ood_digits`).
        role: `id` (the training distribution), `shift` (same label space, shifted inputs), `ood`
            (inputs from outside the label space; scored, not classified) or `new` (classes unseen in
            training, classified over the set's own `classnames`: CoCoOp's new classes).
        index_groups: for a test set labelled in a subset of the training classes (ImageNet-A/R,
            ObjectNet), per class of that set the training-class indices whose logits it covers.
        classnames: a `new` set's class names, in its label order (required for `new`, else None).
    """

    name: str
    role: TestRole = "id"
    index_groups: tuple[tuple[int, ...], ...] | None = None
    classnames: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"test set {self.name}: role '{self.role}' is not one of {ROLES}")
        if (self.role == "new") != (self.classnames is not None):
            raise ValueError(
                f"test set {self.name}: a `new` test set needs its own classnames, and only a `new` "
                f"set has them (role {self.role!r}, classnames {self.classnames!r})"
            )


@dataclass(frozen=True)
class TaskInfo:
    """Base of every task record. `kind` names the task family in messages."""

    kind: ClassVar[str] = "task"
    name: str

    def provides(self, key: str) -> bool:
        value = getattr(self, key, None)
        if value is None or value == 0:  # a size of 0 (no vocabulary, no columns) is not provided
            return False
        if isinstance(value, (Sequence, dict)) and not isinstance(value, str):
            return len(value) > 0
        return True

    def require(self, method: str, *keys: str) -> None:
        """Raise `TaskInfoError` naming the first of `keys` this task does not provide."""
        for key in keys:
            if not self.provides(key):
                have = ", ".join(f.name for f in fields(self) if self.provides(f.name))
                raise TaskInfoError(
                    f"method={method} needs '{key}' from its data, but data={self.name} "
                    f"({self.kind} task) does not provide it (it provides: {have})."
                )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (callables by name) for run records and logs."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            if callable(v):
                v = getattr(v, "__qualname__", type(v).__name__)
            elif isinstance(v, tuple) and v and isinstance(v[0], TestSet):
                v = {t.name: t.role for t in v}
            elif isinstance(v, (list, tuple)) and len(v) > 20:
                v = f"<{len(v)} items>"
            out[f.name] = v
        return out


@dataclass(frozen=True)
class ImageClassificationInfo(TaskInfo):
    """Image classification: what zero-shot heads, prompts and evaluation need."""

    kind: ClassVar[str] = "image classification"
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    test_sets: tuple[TestSet, ...] = (TestSet("test"),)
    num_groups: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def test_set_names(self) -> list[str]:
        return [t.name for t in self.test_sets]

    def sets_with_role(self, *roles: str) -> list[TestSet]:
        return [t for t in self.test_sets if t.role in roles]


@dataclass(frozen=True)
class Column:
    """One column of a table: `continuous`, `binary` or `categorical` (with its cardinality)."""

    name: str
    kind: Literal["continuous", "binary", "categorical"] = "continuous"
    cardinality: int = 1

    @property
    def width(self) -> int:
        """Width of the column in the encoded feature vector (one-hot for categoricals)."""
        return self.cardinality if self.kind == "categorical" else 1


@dataclass(frozen=True)
class TabularInfo(TaskInfo):
    """Tabular data: column roles, the target and the sensitive attribute (fairness papers)."""

    kind: ClassVar[str] = "tabular"
    columns: tuple[Column, ...] = ()
    target: str | None = None
    sensitive: str | None = None
    causal_graph: dict[str, tuple[str, ...]] | None = None  # node -> parents, where known
    test_sets: tuple[TestSet, ...] = (TestSet("test"),)

    @property
    def num_features(self) -> int:
        return sum(c.width for c in self.columns)


@dataclass(frozen=True)
class TokenInfo(TaskInfo):
    """Token sequences: vocabulary, sequence length and the tokenizer that produced them."""

    kind: ClassVar[str] = "token sequence"
    vocab_size: int | None = None
    seq_len: int | None = None
    tokenizer: str | None = None
    pad_id: int | None = None
    test_sets: tuple[TestSet, ...] = (TestSet("test"),)


@dataclass(frozen=True)
class InferenceInfo(TaskInfo):
    """Simulation-based inference: simulator, prior box and the parameters behind the observations."""

    kind: ClassVar[str] = "inference"
    simulator: Callable[..., Any] | None = None
    parameter_names: tuple[str, ...] = ()
    prior_low: tuple[float, ...] = ()
    prior_high: tuple[float, ...] = ()
    true_parameters: tuple[tuple[float, ...], ...] = ()
    observation_dim: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RetrievalInfo(TaskInfo):
    """Image-text retrieval: images with their captions (Flickr30k, MS-COCO, synthetic scenes).

    `captions_per_image` is what evaluation ranks per image (the first K captions; 5 for Flickr30k
    and COCO); `train_captions` says how training pairs are drawn (`first`: caption 0 of each image,
    as the m2-mix release; `all`: every (image, caption) pair).
    """

    kind: ClassVar[str] = "image-text retrieval"
    captions_per_image: int = 0
    train_captions: str = "first"
    test_sets: tuple[TestSet, ...] = (TestSet("test"),)
    val_in_test: bool = False  # the test loaders end with the `val` split (model selection)

    @property
    def test_set_names(self) -> list[str]:
        return [t.name for t in self.test_sets]
