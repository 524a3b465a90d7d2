"""`captioned_scenes`: image-caption retrieval on held-out scenes of the synthetic captioned world.

The miniature of the m2-mix paper's retrieval fine-tuning (Flickr30k / COCO): scenes of one or two
objects (shapes, handwritten digits) on plain or textured backgrounds, each with 5 captions drawn
from the world's caption grammar (`CaptionedWorld.recaption`: the same scene described with other
words, positions, colours or backgrounds mentioned or not). Splits use different world seeds and
digit pools, so no test scene (and no test digit) is seen in training or in tiny_clip's pretraining:
train draws the pretraining digit pool with world seed `seed + 1`, val the validation pool with
`seed + 2`, test the held-out test pool with `seed + 3`. Rendered once per split in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from reprolab.data import synthetic as world
from reprolab.data.captions import CaptionSpec, CaptionSplit
from reprolab.data.spec import register

SPLIT_PARTS = {"train": ("pretrain", 1), "val": ("val", 2), "test": ("test", 3)}


@dataclass
class CaptionedScenesSpec(CaptionSpec):
    seed: int = 0
    image_size: int = world.IMAGE_SIZE
    sizes: dict[str, int] = field(default_factory=dict)
    _cache: dict[str, CaptionSplit] = field(default_factory=dict, repr=False, compare=False)

    def check(self, root: Path) -> None:
        """Nothing to check: rendered in memory."""

    def prepare(self, root: Path) -> None:
        """Nothing to prepare: rendered in memory."""

    def load(self, root: Path | None, split: str) -> CaptionSplit:
        if split not in SPLIT_PARTS or split not in self.sizes:
            raise KeyError(f"{self.name}: no split '{split}'; available: {list(self.sizes)}")
        if split not in self._cache:
            part, offset = SPLIT_PARTS[split]
            w = world.CaptionedWorld(self.seed + offset, self.image_size, digit_part=part)
            images, captions = [], []
            for i in range(int(self.sizes[split])):
                image, first, scene = w.sample_scene(i)
                more = [
                    w.recaption(np.random.default_rng([w.seed, i, k]), scene)
                    for k in range(1, self.captions_per_image)
                ]
                images.append(image)
                captions.append([first, *more])
            stack = np.stack(images)
            self._cache[split] = CaptionSplit(
                lambda i: Image.fromarray(stack[i]), captions, f"{self.name}/{split}"
            )
        return self._cache[split]


@register("captioned_scenes")
def captioned_scenes(
    seed: int = 0,
    image_size: int = world.IMAGE_SIZE,
    train_size: int = 2000,
    val_size: int = 500,
    test_size: int = 1000,
    captions_per_image: int = 5,
) -> CaptionedScenesSpec:
    """Held-out scenes of the captioned world with `captions_per_image` captions each."""
    return CaptionedScenesSpec(
        name="captioned_scenes",
        test_sets=["test"],
        source="synthetic captioned world (held-out scenes and digits)",
        captions_per_image=int(captions_per_image),
        seed=int(seed),
        image_size=int(image_size),
        sizes={"train": int(train_size), "val": int(val_size), "test": int(test_size)},
    )
