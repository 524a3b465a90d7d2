"""Class subsets of a classification task: CoCoOp's base-to-new protocol (prompting_posthoc.md A1.3).

CoOp's `subsample_classes` (Dassl `datasets/oxford_pets.py`): sort the label ids present in the
training split; base = the first ceil(K/2), new = the rest; every split keeps only the items of
one half, relabelled to 0..n-1 in sorted-id order. Few-shot sampling happens on all classes first,
so the base training images are exactly the all-class k-shot subset restricted to base classes.

`SUBSAMPLE` names the data option (`data.subsample_classes`): `all`, `base`, `new`, or
`base_to_new` (train and val on base; the first test set split into `base`, role `id`, and `new`,
role `new`, classified over the new class names: one run gives Base, New and HM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from reprolab.data.spec import ImageSplit

SUBSAMPLE: tuple[str, ...] = ("all", "base", "new", "base_to_new")


def base_new_classes(train_labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """(base, new) label ids: the sorted ids present in `train_labels`, split at ceil(K/2)."""
    ids = sorted({int(y) for y in train_labels})
    m = math.ceil(len(ids) / 2)
    return ids[:m], ids[m:]


def relabel_map(keep: Sequence[int]) -> dict[int, int]:
    """Old label id -> new label (its position among the sorted kept ids)."""
    return {y: i for i, y in enumerate(sorted(int(k) for k in keep))}


class ClassSubset(Dataset):
    """The items of `inner` whose label is in `keep`, relabelled 0..n-1 (`relabel_map`).

    `inner` is a built split (transformed images or cached features) with a `split` attribute
    (`ImageSplit`) whose `labels` need no decoding. `split` here is the matching `ImageSplit` view
    (new labels, the kept items' groups), so samplers and group checks work unchanged.
    """

    def __init__(self, inner: Dataset, keep: Sequence[int]) -> None:
        self.inner = inner
        self.mapping = relabel_map(keep)
        base: ImageSplit = inner.split  # type: ignore[attr-defined]
        self.indices = [i for i, y in enumerate(base.labels) if y in self.mapping]
        idx = self.indices
        groups = None if base.groups is None else [base.groups[i] for i in idx]
        self.split = ImageSplit(
            lambda j: base[idx[j]]["image"],
            [self.mapping[base.labels[i]] for i in idx],
            groups,
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        item = dict(self.inner[self.indices[j]])
        item["label"] = self.mapping[int(item["label"])]
        item["index"] = j  # position within this subset, as in any split
        return item
