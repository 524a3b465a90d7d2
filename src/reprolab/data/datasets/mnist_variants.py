"""BlackVIP's synthetic shift benchmarks built from real MNIST: LocMNIST and Colour-Biased MNIST.

Construction follows spec blackvip.md §6.2 / §6.3 (`make_locmnist`, `colour_assignment`, `colourise`
are pure numpy, so tests run them on a few digits). `prepare` downloads MNIST once (torchvision, S3
mirror; or the HF hub `ylecun/mnist`) into `<root>/mnist/` and writes:

| name (kwargs) | folder | images | splits |
|---|---|---|---|
| loc_mnist (fake_scale 1 or 4) | loc_mnist/locmnist_r1_f{1,4} | {train,test}/<digit>/<index>.jpg, 224x224 grey | MNIST train 80/20 per class -> train/val (split_LocMNIST.json); MNIST test -> test |
| colour_biased_mnist (rho 0.8 or 0.9) | colour_biased_mnist/images_rho={rho}_ncl=9_rand=True | {train,test}/<digit>/<index>.png, 28x28 RGB | train at rho, test at 1 - rho; val = test (BlackVIP's USE_TEST_AS_VAL) |

Both use seed 1 (the first run's seed, as the cached official data does, spec §10.6); pixel-exact
equality with the official files is not possible (their RNG follows a JPEG folder listing), the
distributions are the same. Train without augmentation (configs set `train_augment: false`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from reprolab.data import sources
from reprolab.data.colour_bias import colour_assignment
from reprolab.data.datasets._common import SplitFileSpec, assets, templates_for
from reprolab.data.datasets.synthetic import BIAS_COLORS
from reprolab.data.sources import Item
from reprolab.data.spec import register

log = logging.getLogger(__name__)

CANVAS = 224
DIGIT = 28
SEED = 1

# Background colour of each class (spec §6.3): the same list the synthetic task uses.
COLOURS = BIAS_COLORS


# ------------------------------------------------------------------------------------------------
# LocMNIST (§6.2)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def make_locmnist(
    images: np.ndarray, labels: np.ndarray, r_size: int = 1, f_size: int = 1, seed: int = SEED
) -> Iterator[tuple[int, np.ndarray, dict]]:
    """Yield `(index, 224x224 uint8 canvas, meta)` for every digit of one MNIST split, class by class.

    The real digit (label) sits on the border: a ~ U{0..L} (L = 224 - 28*r); b ~ U{0..L} if a is 0 or L,
    else b in {0, L}; with probability 1/2 it goes at (row a, col b), else (row b, col a). A fake digit of
    a uniformly drawn class (may equal the label), a random image of that class from the same split,
    resized to 28*f, is pasted at the exact centre. numpy is seeded once per split.
    """
    rng = np.random.RandomState(seed)
    labels = np.asarray(labels)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    size_r, size_f = DIGIT * r_size, DIGIT * f_size
    lim = CANVAS - size_r
    lo = CANVAS // 2 - size_f // 2
    for c in range(10):
        for i in by_class[c]:
            a = int(rng.randint(0, lim + 1))
            b = int(rng.randint(0, lim + 1)) if a in (0, lim) else int(rng.choice([0, lim]))
            row, col = (a, b) if rng.rand() < 0.5 else (b, a)
            fake_c = int(rng.randint(0, 10))
            pool = by_class[fake_c] if len(by_class[fake_c]) else np.arange(len(labels))
            j = int(rng.choice(pool))
            canvas = np.zeros((CANVAS, CANVAS), np.uint8)
            canvas[row : row + size_r, col : col + size_r] = _resize(
                np.asarray(images[i], np.uint8), size_r
            )
            canvas[lo : lo + size_f, lo : lo + size_f] = _resize(
                np.asarray(images[j], np.uint8), size_f
            )
            yield (
                int(i),
                canvas,
                {"label": c, "row": row, "col": col, "fake": fake_c, "fake_index": j},
            )


# ------------------------------------------------------------------------------------------------
# Colour-biased MNIST (§6.3)


# `colour_assignment` (imported above) lives in reprolab.data.colour_bias, shared with `biased_digits`.
# It replaced this module's own copy (the one that changed): its float floor/ceil could move 1 image
# per class between the own colour and the others (n 100, rho 0.29: 28 -> 29 own) and up to 8 between
# the other colours (n 300, rho 0.19: chunks 28 -> 27); at rho 0.8/0.2 and 0.9/0.1 with the MNIST class
# sizes it moves 0 images per class.


def colourise(digit: np.ndarray, colour: int) -> np.ndarray:
    """28x28 grey digit -> 28x28x3: non-zero pixels white, zero pixels the background colour."""
    out = np.empty((*digit.shape, 3), np.uint8)
    out[:] = COLOURS[colour]
    out[np.asarray(digit) > 0] = 255
    return out


# ------------------------------------------------------------------------------------------------
# MNIST source


def load_mnist(download_dir: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images (N, 28, 28) uint8 and labels; torchvision download, HF `ylecun/mnist` as fallback."""
    try:
        from torchvision.datasets import MNIST

        ds = MNIST(str(download_dir), train=train, download=True)
        return ds.data.numpy(), ds.targets.numpy()
    except Exception as err:  # pragma: no cover - network
        log.warning("torchvision MNIST failed (%s); trying the HF hub ylecun/mnist", err)
        import datasets

        hf = datasets.load_dataset("ylecun/mnist", split="train" if train else "test")
        images = np.stack([np.asarray(im, np.uint8) for im in hf["image"]])
        return images, np.asarray(hf["label"])


@dataclass
class _MNISTVariant(SplitFileSpec):
    def required(self, root: Path) -> list[Path]:
        d = self.dataset_dir(root)
        return [d / "train", d / "test"]

    @property
    def fallback_file(self) -> str:  # our split *is* the protocol here
        return self.split_file or "split.json"

    def splits(self, root: Path) -> dict[str, list[Item]]:
        return sources.fixed_split(
            self.dataset_dir(root) / self.fallback_file, lambda: self.make_fallback(root), self.name
        )

    def _folder_items(self, root: Path, split: str) -> list[Item]:
        names = [str(i) for i in range(10)]
        d = self.dataset_dir(root) / split
        return [(f"{split}/{r}", y, c) for r, y, c in sources.imagefolder_items(d, names, names)]

    def build(self, root: Path) -> None:
        mnist_dir = Path(root) / "mnist"
        for split, train in (("train", True), ("test", False)):
            out = self.dataset_dir(root) / split
            if out.is_dir():
                continue
            images, labels = load_mnist(mnist_dir, train)
            tmp = out.with_name(f".{split}.tmp")
            sources.remove_tree(tmp)
            self.write_split(images, labels, tmp, train)
            tmp.rename(out)


@dataclass
class LocMNISTSpec(_MNISTVariant):
    fake_scale: int = 1

    def make_fallback(self, root: Path) -> dict[str, list[Item]]:
        import random

        train, val = sources.split_by_class(
            self._folder_items(root, "train"), [0.8], random.Random(self.split_seed)
        )
        return {"train": train, "val": val, "test": self._folder_items(root, "test")}

    def write_split(self, images: np.ndarray, labels: np.ndarray, out: Path, train: bool) -> None:
        for d in range(10):
            (out / str(d)).mkdir(parents=True, exist_ok=True)
        for i, canvas, meta in make_locmnist(images, labels, 1, self.fake_scale, SEED):
            Image.fromarray(canvas, "L").save(out / str(meta["label"]) / f"{i:05d}.jpg", quality=95)


@register("loc_mnist")
def loc_mnist(fake_scale: int = 1, templates: str = "single") -> LocMNISTSpec:
    if fake_scale not in (1, 4):
        raise ValueError(f"loc_mnist: fake_scale must be 1 (1:1) or 4 (1:4), got {fake_scale}")
    return LocMNISTSpec(
        name="loc_mnist",
        classnames=assets("loc_mnist", "classnames.txt"),
        templates=templates_for("loc_mnist", templates),
        source=f"built from MNIST (torchvision / HF ylecun/mnist), BlackVIP §6.2, 1:{fake_scale}",
        folder=f"loc_mnist/locmnist_r1_f{fake_scale}",
        split_file="split_LocMNIST.json",
        expected={"test": 10000},
        expected_total=70000,
        disk="~0.4 GB",
        manual="Needs MNIST once (torchvision downloads it into {dir}/../../mnist); re-run the command.",
        fake_scale=fake_scale,
    )


@dataclass
class ColourBiasedMNISTSpec(_MNISTVariant):
    rho: float = 0.8
    rho_test: float = 0.2

    def make_fallback(self, root: Path) -> dict[str, list[Item]]:
        test = self._folder_items(root, "test")
        return {"train": self._folder_items(root, "train"), "val": test, "test": test}

    def write_split(self, images: np.ndarray, labels: np.ndarray, out: Path, train: bool) -> None:
        rng = np.random.RandomState(SEED if train else SEED + 1)
        colours = colour_assignment(labels, self.rho if train else self.rho_test, rng)
        for d in range(10):
            (out / str(d)).mkdir(parents=True, exist_ok=True)
        for i, (img, y, c) in enumerate(zip(images, labels, colours, strict=True)):
            Image.fromarray(colourise(img, int(c)), "RGB").save(out / str(int(y)) / f"{i:05d}.png")
        sources.write_json(out / "colours.json", [int(c) for c in colours])


@register("colour_biased_mnist")
def colour_biased_mnist(rho: float = 0.8, rho_test: float | None = None, templates: str = "single"):
    rho_test = round(1 - rho, 6) if rho_test is None else rho_test
    return ColourBiasedMNISTSpec(
        name="colour_biased_mnist",
        classnames=assets("colour_biased_mnist", "classnames.txt"),
        templates=templates_for("colour_biased_mnist", templates),
        source=f"built from MNIST (torchvision / HF ylecun/mnist), BlackVIP §6.3, rho {rho}/{rho_test}",
        folder=f"colour_biased_mnist/images_rho={rho}_ncl=9_rand=True",
        split_file="split_ColourBiasedMNIST.json",
        expected={"train": 60000, "val": 10000, "test": 10000},
        disk="~0.05 GB",
        manual="Needs MNIST once (torchvision downloads it into {dir}/../../mnist); re-run the command.",
        rho=rho,
        rho_test=rho_test,
    )
