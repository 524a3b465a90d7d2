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


AUGMENTS = ("coop", "finetune", "none")


def build_transforms(pre: Preprocess, train: bool, augment: bool | str) -> T.Compose:
    """CLIP transforms; test: resize + centre crop. Train by `augment`:

    - `coop` (or True): RandomResizedCrop(scale 0.08-1) + horizontal flip (CoOp / Dassl);
    - `finetune`: RandomResizedCrop(scale 0.9-1), no flip (WiSE-FT / FLYP / CaRot's `_transform`,
      robust_finetuning.md §1.2);
    - `none` (or False): a plain resize to the input size.
    """
    interp = _INTERP[pre.interpolation]
    norm = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    augment = {True: "coop", False: "none"}.get(augment, augment)
    if augment not in AUGMENTS:
        raise ValueError(
            f"train_augment must be one of {list(AUGMENTS)} or a bool, got {augment!r}."
        )
    if train and augment == "finetune":
        geo = [T.RandomResizedCrop(pre.image_size, scale=(0.9, 1.0), interpolation=interp)]
    elif train and augment == "coop":
        geo = [
            T.RandomResizedCrop(pre.image_size, scale=(0.08, 1.0), interpolation=interp),
            T.RandomHorizontalFlip(),
        ]
    elif train:
        geo = [T.Resize((pre.image_size, pre.image_size), interpolation=interp)]
    else:
        geo = [T.Resize(pre.image_size, interpolation=interp), T.CenterCrop(pre.image_size)]
    return T.Compose([*geo, *norm])
