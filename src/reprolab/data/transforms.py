"""Image preprocessing as data: what a model expects (`Preprocess`) and the transforms built from it.

A model publishes a `Preprocess` (size, mean, std, interpolation); the data module builds its
torchvision transforms from it. The record lives in `data/` so that data never imports a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchvision import transforms as T


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for a backbone (CLIP: 224, bicubic, OpenAI mean/std)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


_INTERP = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def build_transforms(pre: Preprocess, train: bool, augment: bool) -> T.Compose:
    """CLIP/CoOp transforms: train RandomResizedCrop(0.08-1)+flip, test resize+centre crop."""
    interp = _INTERP[pre.interpolation]
    norm = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    if train and augment:
        geo = [
            T.RandomResizedCrop(pre.image_size, scale=(0.08, 1.0), interpolation=interp),
            T.RandomHorizontalFlip(),
        ]
    elif train:
        geo = [T.Resize((pre.image_size, pre.image_size), interpolation=interp)]
    else:
        geo = [T.Resize(pre.image_size, interpolation=interp), T.CenterCrop(pre.image_size)]
    return T.Compose([*geo, *norm])
