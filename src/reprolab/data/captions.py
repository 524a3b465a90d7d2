"""Image-caption data: the splits of retrieval datasets (Flickr30k, MS-COCO, the synthetic scenes).

A `CaptionSplit` is a list of images, each with its captions (5 for Flickr30k / COCO's Karpathy
splits). Items are `{"image": PIL.Image (RGB), "captions": list[str]}`; `captions` is readable
without decoding any image. A `CaptionSpec` is a `DatasetSpec` whose `load` returns one; the
retrieval data module (`reprolab.data.retrieval`) turns it into (image, caption) training pairs and
evaluation sets.

Evaluation protocols (robust_finetuning.md §4.1-4.2): the standard one ranks all captions of every
image (5 per image, an image-to-text hit when any of its captions is in the top K); the m2-mix
release keeps one caption per image (the first) and ranks N images against N captions. The data keep
every caption; the method logs both protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from reprolab.data.spec import DatasetSpec, MalformedDataError


class CaptionSplit(torch.utils.data.Dataset):
    """One split of an image-caption dataset.

    Args:
        loader: image `i` as a PIL image (RGB).
        captions: per image, its captions (at least one each).
        name: where the split comes from, for messages.
    """

    def __init__(
        self,
        loader: Callable[[int], Image.Image],
        captions: Sequence[Sequence[str]],
        name: str = "captions",
    ) -> None:
        self._loader = loader
        self.captions = [[str(c) for c in caps] for caps in captions]
        empty = [i for i, caps in enumerate(self.captions) if not caps]
        if empty:
            raise MalformedDataError(
                f"{name}: {len(empty)} images have no caption (first: index {empty[0]})."
            )
        self.name = name

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self._loader(i), "captions": list(self.captions[i])}

    def subset(self, indices: Sequence[int]) -> CaptionSplit:
        idx = list(indices)
        return CaptionSplit(
            lambda j: self._loader(idx[j]), [self.captions[i] for i in idx], self.name
        )


@dataclass
class CaptionSpec(DatasetSpec):
    """A dataset of images with captions (no classes, no templates).

    `captions_per_image` is the number of captions per image the standard evaluation ranks (the
    first K of each image; 5 for Flickr30k and COCO). Splits are `train`, `val` and `test_sets`.
    Subclasses implement `load(root, split) -> CaptionSplit` (and `check`, `prepare` for real data).
    """

    captions_per_image: int = 5

    @property
    def splits_available(self) -> list[str]:
        return ["train", "val", *self.test_sets]

    def load(self, root: Path, split: str) -> CaptionSplit:  # type: ignore[override]
        raise NotImplementedError
