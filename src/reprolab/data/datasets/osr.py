"""Open-set OOD benchmarks of MixDiff (ECAI 2024, arXiv 2408.10107), with ZOC's fixed class splits.

MixDiff ("Perturb-and-Compare Approach for Detecting Out-of-Distribution Samples in Constrained
Access Environments") evaluates zero-shot CLIP OOD detection on the open-set splits of ZOC (Esmaeilpour
et al., AAAI 2022): a split names the known classes (ID: the classifier's label space, the train
images MixDiff draws its oracle samples from, the `test` set) and the unknown ones (the `ood` set).
Spec robustness_ood_prompting.md §3.4; the class lists are assets (`assets/osr/`, SOURCE.md names
each upstream file) and each benchmark's table averages its splits.

| name (kwargs) | known / unknown | train | test (ID) | ood | data folder(s) under the root |
|---|---|---|---|---|---|
| cifar10_osr (split 0..4) | 6 / 4 CIFAR-10 classes | 30,000 | 6,000 | 4,000 | cifar-10-batches-py |
| cifar_plus10 (split 0..4) | airplane, automobile, ship, truck / 10 CIFAR-100 animals | 20,000 | 4,000 | 1,000 | + cifar-100-python |
| cifar_plus50 (split 0) | the same 4 / 50 CIFAR-100 animals | 20,000 | 4,000 | 5,000 | + cifar-100-python |
| cifar100_osr (split 0..4) | 20 consecutive CIFAR-100 label ids / the other 80 | 10,000 | 2,000 | 8,000 | cifar-100-python |
| tinyimagenet_osr (split 0..4) | 20 / 180 Tiny ImageNet classes (CAC splits) | 10,000 | 1,000 | 9,000 | tiny-imagenet-200 |

Test sets are the official test split (Tiny ImageNet: its val split, as upstream): `test` (role `id`)
holds the known classes' images and `ood` (role `ood`) the unknown classes' images. Upstream scores
one shuffled loader over both and splits them by label; the scores and metrics are the same.
Labels: known classes 0..K-1 in the split's order (`classnames`); an `ood` item's label is K + its
index in `ood_classnames` (never classified: it says which unknown class an image is). Spec §9 asks
the OSR data to emit `is_ood`; here OOD-ness is the test set's role (`ood`), which is what the
framework's OOD metrics read (and a label >= K says it too).

On disk, the CIFARs are torchvision's "python version" folders, read without torchvision
(`read_cifar`: the pickled batches and meta file), and Tiny ImageNet is the official zip's tree
(`val/val_annotations.txt` + `val/images/`), or ZOC's reorganised one (`tinyimagenet.sh`:
`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`). `python scripts/prepare_data.py cifar10_osr` (or any
other config name) downloads what is missing: the CIFARs through torchvision, Tiny ImageNet from
cs231n.stanford.edu. All splits of a benchmark share one prepared tree.

Also here: `shapes_osr`, the synthetic ID / OOD world of the MixDiff miniature (tiny_clip, CPU):
ID = 5 shapes, `ood_near` = the 5 held-out shapes, `ood_far` = MNIST digits (ShapesSpec's
`ood_digits` images).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reprolab.data import sources
from reprolab.data import synthetic as world
from reprolab.data.datasets._common import LocalSpec, Step, read_annotation_lines
from reprolab.data.datasets.synthetic import ShapesSpec
from reprolab.data.sources import CountMismatchError
from reprolab.data.spec import (
    DataNotFoundError,
    ImageSplit,
    malformed,
    read_lines,
    regenerate_fix,
    register,
)
from reprolab.errors import ConfigValueError

SPLITS = ("train", "test", "ood")
NUM_SPLITS = 5

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
TINY_DIR = "tiny-imagenet-200"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

# (folder, train files, test files, label key, meta file, meta names key) of torchvision's layouts.
_CIFAR = {
    "cifar10": (
        CIFAR10_DIR,
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        "batches.meta",
        "label_names",
    ),
    "cifar100": (CIFAR100_DIR, ("train",), ("test",), "fine_labels", "meta", "fine_label_names"),
}
# ZOC cifarplus_loader in_list [0, 1, 8, 9]
CIFAR_PLUS_KNOWN = ("airplane", "automobile", "ship", "truck")


def osr_assets(file: str) -> list[str]:
    return read_lines(f"osr/{file}")


def cifar_classnames(which: str) -> list[str]:
    """Label names of `cifar10` / `cifar100` in label order (assets/osr/)."""
    return osr_assets(f"{which}_classnames.txt")


def cifar10_split(split: int) -> tuple[list[str], list[str]]:
    """(known, unknown) CIFAR-10 class names of MixDiff's split `split` (cifar10_ood.py)."""
    names = osr_assets("cifar10_splits.txt")[split].split()
    return names[:6], names[6:]


def cifar_plus_unknown(key: str) -> list[int]:
    """CIFAR-100 label ids of the unknown classes of `plus50` or `plus10-<1..5>` (ZOC)."""
    rows = {
        r.split()[0]: [int(t) for t in r.split()[1:]] for r in osr_assets("cifar_plus_splits.txt")
    }
    if key not in rows:
        raise KeyError(f"no CIFAR+ split {key!r}; available: {', '.join(rows)}")
    return rows[key]


def cifar100_split(split: int) -> tuple[list[int], list[int]]:
    """(known, unknown) CIFAR-100 label ids: 20 consecutive ids known (cifar100_ood.py)."""
    known = list(range(20 * split, 20 * split + 20))
    return known, [i for i in range(100) if i not in known]


def tinyimagenet_classes() -> list[tuple[str, str]]:
    """The 200 (wnid, name) pairs, sorted by wnid (index = torchvision ImageFolder's)."""
    out = []
    for line in osr_assets("tinyimagenet_classes.txt"):
        wnid, name = line.split()
        out.append((wnid, name))
    return out


def tinyimagenet_split(split: int) -> tuple[list[int], list[int]]:
    """(known, unknown) class indices of CAC split `split`; known in the split file's order."""
    known = [int(t) for t in osr_assets("tinyimagenet_splits.txt")[split].split()]
    return known, [i for i in range(200) if i not in known]


def _check_split(name: str, split: int, n: int = NUM_SPLITS) -> int:
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split < n:
        choices = "0" if n == 1 else f"0..{n - 1}"
        raise ValueError(
            f"{name}: split must be an integer in {choices} (the fixed class splits of ZOC / "
            f"MixDiff), got {split!r}; set data.dataset_kwargs.split."
        )
    return split


# ------------------------------------------------------------------------------------------------
# Readers


_CIFAR_CACHE: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray]] = {}


def _unpickle(path: Path, name: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise malformed(path, f"is not a CIFAR pickle ({err})", regenerate_fix(name)) from None
    if not isinstance(obj, dict):
        raise malformed(path, f"holds a {type(obj).__name__}, not a dict", regenerate_fix(name))
    return obj


def read_cifar(
    root: Path | str, which: str, train: bool, name: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) of a CIFAR split, from torchvision's folder.

    The python-version batches are read as torchvision reads them (`data` rows are the R, G, B
    planes of a 32x32 image); the meta file's label names must match assets/osr/. Cached per
    process (a split is read once for every test set and run).
    """
    folder, train_files, test_files, label_key, meta_file, names_key = _CIFAR[which]
    base = Path(root) / folder
    key = (str(base.resolve()), bool(train))
    if key in _CIFAR_CACHE:
        return _CIFAR_CACHE[key]
    meta = _unpickle(base / meta_file, name or which)
    expected = cifar_classnames(which)
    if list(meta.get(names_key, [])) != expected:
        raise malformed(
            base / meta_file,
            f"'{names_key}' {list(meta.get(names_key, []))[:3]}... differ from the {which} label "
            "names in assets/osr/",
            regenerate_fix(name or which),
        )
    data, labels = [], []
    for file in train_files if train else test_files:
        batch = _unpickle(base / file, name or which)
        if "data" not in batch or label_key not in batch:
            raise malformed(
                base / file, f"has no 'data' / '{label_key}' entries", regenerate_fix(name or which)
            )
        data.append(np.asarray(batch["data"], np.uint8))
        labels.extend(int(y) for y in batch[label_key])
    images = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    out = (np.ascontiguousarray(images), np.asarray(labels, np.int64))
    _CIFAR_CACHE[key] = out
    return out


class ArrayLoader:
    """Picklable `index -> PIL RGB` over rows `indices` (default: all, in order) of a uint8 array
    (N, H, W, 3), or (N, H, W) grey images (MNIST), converted to RGB."""

    def __init__(self, images: np.ndarray, indices: Sequence[int] | None = None) -> None:
        self.images = images
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices, np.int64)

    def __call__(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[self.indices[i]]).convert("RGB")


def _select(
    labels: np.ndarray, classes: Sequence[int], offset: int = 0
) -> tuple[np.ndarray, list[int]]:
    """Indices (in data order) of the items whose label is in `classes`, relabelled offset + rank."""
    rank = {c: offset + k for k, c in enumerate(classes)}
    idx = np.flatnonzero(np.isin(labels, list(classes)))
    return idx, [rank[int(labels[i])] for i in idx]


def tiny_items(root: Path, part: str, wnids: Sequence[str]) -> list[tuple[str, int]]:
    """(relative path, position in `wnids`) of the Tiny ImageNet `part` images of `wnids`.

    Reads the official tree (`train/<wnid>/images/`, `val/images/` + `val/val_annotations.txt`)
    or ZOC's reorganised one (`train/<wnid>/`, `val/<wnid>/`); file names sorted within a class.
    """
    base = Path(root) / TINY_DIR
    pos = {w: k for k, w in enumerate(wnids)}
    out: list[tuple[str, int]] = []
    if part == "val" and (base / "val" / "val_annotations.txt").is_file():
        rows = read_annotation_lines(base / "val" / "val_annotations.txt")
        by_class: dict[str, list[str]] = {}
        for row in rows:
            if len(row) < 2:
                raise malformed(
                    base / "val" / "val_annotations.txt",
                    f"line {row!r} has no '<file> <wnid>' columns",
                    regenerate_fix("tinyimagenet_osr"),
                )
            by_class.setdefault(row[1], []).append(row[0])
        for w in wnids:
            out.extend((f"val/images/{f}", pos[w]) for f in sorted(by_class.get(w, [])))
        return out
    for w in wnids:
        d = base / part / w
        sub = "images/" if (d / "images").is_dir() else ""
        if not (d / sub).is_dir():
            raise DataNotFoundError(
                f"tinyimagenet_osr: class folder {d / sub} is missing (expected the official "
                "tiny-imagenet-200 tree). Run `python scripts/prepare_data.py tinyimagenet_osr`."
            )
        out.extend((f"{part}/{w}/{sub}{f}", pos[w]) for f in sources.list_images(d / sub))
    return out


# ------------------------------------------------------------------------------------------------
# Specs


@dataclass
class OpenSetSpec(LocalSpec):
    """A fixed open-set split: known classes (ID, labels 0..K-1) and unknown ones (`ood`).

    Subclasses implement `parts(root) -> {split: ImageSplit}` for `train`, `test` and `ood`;
    `check` only looks for the files (`required`), `verify` (prepare, `--check`) reads the labels.
    """

    split: int = 0
    ood_classnames: list[str] = field(default_factory=list)
    folders: tuple[str, ...] = ()  # data folders under the root (one benchmark may read two)

    def dataset_dir(self, root: Path | str) -> Path:
        return Path(root) / self.folders[0]

    def fewshot_dir(self, root: Path | str) -> Path:
        # Outside torchvision's folders; one cache per benchmark and split.
        return Path(root) / "osr_fewshot" / f"{self.name}_split{self.split}"

    def required(self, root: Path) -> list[Path]:
        return [Path(root) / f for f in self.folders]

    @property
    def splits_available(self) -> list[str]:
        return list(SPLITS)

    def parts(self, root: Path) -> dict[str, ImageSplit]:
        raise NotImplementedError

    def cached_parts(self, root: Path | str) -> dict[str, ImageSplit]:
        key = f"parts:{Path(root).resolve()}"
        if key not in self._cache:
            self._cache[key] = self.parts(Path(root))
        return self._cache[key]

    def load(self, root: Path | str, split: str) -> ImageSplit:
        if split == "val":
            raise ConfigValueError(
                f"data={self.name} has no validation split (the open-set benchmarks are scored "
                "post hoc on train oracles, test and ood); set data.val=false."
            )
        if split not in SPLITS:
            raise KeyError(f"{self.name}: no split '{split}'; available: {', '.join(SPLITS)}")
        self.check(Path(root))
        return self.cached_parts(root)[split]

    def split_labels(self, root: Path | str) -> dict[str, list[int]]:
        self.check(Path(root))
        return {s: list(p.labels) for s, p in self.cached_parts(root).items()}

    def verify(self, root: Path | str) -> dict[str, int]:
        """Split sizes, and every known class in train and test, every unknown class in ood."""
        labels = self.split_labels(root)
        found = {s: len(v) for s, v in labels.items()}
        sources.check_counts(self.name, self.expected, found)
        k, u = len(self.classnames), len(self.ood_classnames)
        want = {"train": set(range(k)), "test": set(range(k)), "ood": set(range(k, k + u))}
        for s, ys in labels.items():
            if set(ys) != want[s]:
                missing = sorted(want[s] - set(ys))[:5]
                extra = sorted(set(ys) - want[s])[:5]
                raise CountMismatchError(
                    f"{self.name} split {self.split}: {s} should hold labels {min(want[s])}.."
                    f"{max(want[s])} (missing {missing}, unexpected {extra})"
                )
        return found

    def info(self) -> dict[str, Any]:
        row = super().info()
        row["expected"] = {
            "train": self.expected.get("train"),
            "val": 0,
            "test": self.expected.get("test"),
        }
        row["note"] = f"split {self.split}; ood {self.expected.get('ood'):,}"
        return row


def download_cifar(root: Path, which: str) -> None:
    """torchvision's CIFAR-10 / CIFAR-100 download (python version) into `root`; archive removed."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if which == "cifar10" else CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(str(root), train=train, download=True)
    archive = root / cls.filename
    if archive.is_file():
        archive.unlink()


def cifar_files(root: Path | str, which: str) -> list[Path]:
    """The files of one torchvision CIFAR folder: meta, train and test batches."""
    folder, train_files, test_files, _, meta_file, _ = _CIFAR[which]
    base = Path(root) / folder
    return [base / f for f in (meta_file, *train_files, *test_files)]


_CIFAR_MANUAL = """{n}. python -c "from torchvision.datasets import {cls}; {cls}('{root}', train=True, download=True); {cls}('{root}', train=False, download=True)"
   (or put torchvision's extracted {folder}/ folder, python version, in {root})."""


@dataclass
class CIFAROpenSetSpec(OpenSetSpec):
    """CIFAR-10 / CIFAR+N / CIFAR-100 splits over torchvision's python-version folders."""

    id_source: str = "cifar10"
    ood_source: str = "cifar10"
    known_ids: list[int] = field(default_factory=list)
    unknown_ids: list[int] = field(default_factory=list)

    @property
    def sources_used(self) -> list[str]:
        return list(dict.fromkeys((self.id_source, self.ood_source)))

    def required(self, root: Path) -> list[Path]:
        return [p for which in self.sources_used for p in cifar_files(root, which)]

    def parts(self, root: Path) -> dict[str, ImageSplit]:
        out = {}
        for split, which, train, classes, offset in (
            ("train", self.id_source, True, self.known_ids, 0),
            ("test", self.id_source, False, self.known_ids, 0),
            ("ood", self.ood_source, False, self.unknown_ids, len(self.known_ids)),
        ):
            images, labels = read_cifar(root, which, train, self.name)
            idx, ys = _select(labels, classes, offset)
            out[split] = ImageSplit(ArrayLoader(images, idx), ys)
        return out

    def build(self, root: Path) -> None:
        for which in self.sources_used:
            if not all(p.is_file() for p in cifar_files(root, which)):
                download_cifar(Path(root), which)

    def manual_text(self, root: Path | str) -> str:
        cls = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
        steps = [
            _CIFAR_MANUAL.replace("{n}", str(n))
            .replace("{cls}", cls[w])
            .replace("{folder}", _CIFAR[w][0])
            .replace("{root}", str(root))
            for n, w in enumerate(self.sources_used, 1)
        ]
        steps.append(
            f"{len(steps) + 1}. Re-run `python scripts/prepare_data.py {self.name}` to check it."
        )
        return f"Manual preparation of {self.name} (source: {self.source}):\n" + "\n".join(steps)


def _cifar_spec(
    name: str,
    split: int,
    known: list[str],
    unknown: list[str],
    id_source: str,
    ood_source: str,
    expected: dict[str, int],
    source: str,
) -> CIFAROpenSetSpec:
    id_names, ood_names = cifar_classnames(id_source), cifar_classnames(ood_source)
    used = list(dict.fromkeys((id_source, ood_source)))
    return CIFAROpenSetSpec(
        name=name,
        classnames=list(known),
        templates=osr_assets("templates.txt"),
        test_sets=["test", "ood"],
        ood_sets=["ood"],
        source=source,
        folder=_CIFAR[used[0]][0],
        expected=expected,
        disk=f"~{0.18 * len(used):.2f} GB",
        split=split,
        ood_classnames=list(unknown),
        folders=tuple(_CIFAR[w][0] for w in used),
        id_source=id_source,
        ood_source=ood_source,
        known_ids=[id_names.index(c) for c in known],
        unknown_ids=[ood_names.index(c) for c in unknown],
    )


# DEVIATION: upstream's CIFAR-10 oracle images come from the CIFAR-10 *test* split
# (`ZO_Clip_loaders.cifar10_single_isolated_class_loader` ignores its `train=True` argument), so
# its oracles may coincide with test targets; here `train` is the train split, as spec §3.4 says
# and as upstream does for CIFAR+N, CIFAR-100 and Tiny ImageNet.
@register("cifar10_osr")
def cifar10_osr(split: int = 0) -> CIFAROpenSetSpec:
    """CIFAR-10, 6 known / 4 unknown classes (MixDiff's five splits, `split` 0..4)."""
    known, unknown = cifar10_split(_check_split("cifar10_osr", split))
    return _cifar_spec(
        "cifar10_osr",
        split,
        known,
        unknown,
        "cifar10",
        "cifar10",
        {"train": 30000, "test": 6000, "ood": 4000},
        f"CIFAR-10 (torchvision), MixDiff/ZOC open-set split {split} (6 known / 4 unknown)",
    )


def _cifar_plus(name: str, key: str, split: int) -> CIFAROpenSetSpec:
    unknown = [cifar_classnames("cifar100")[i] for i in cifar_plus_unknown(key)]
    return _cifar_spec(
        name,
        split,
        list(CIFAR_PLUS_KNOWN),
        unknown,
        "cifar10",
        "cifar100",
        {"train": 20000, "test": 4000, "ood": 100 * len(unknown)},
        f"CIFAR-10 airplane/automobile/ship/truck vs {len(unknown)} CIFAR-100 animal classes "
        f"(torchvision; ZOC's {key})",
    )


@register("cifar_plus10")
def cifar_plus10(split: int = 0) -> CIFAROpenSetSpec:
    """CIFAR+10: 4 CIFAR-10 vehicle classes known, 10 CIFAR-100 animal classes unknown (0..4)."""
    split = _check_split("cifar_plus10", split)
    return _cifar_plus("cifar_plus10", f"plus10-{split + 1}", split)


@register("cifar_plus50")
def cifar_plus50(split: int = 0) -> CIFAROpenSetSpec:
    """CIFAR+50: the same 4 known classes, 50 CIFAR-100 animal classes unknown (one split)."""
    # Upstream has one CIFAR+50 split (cifar_plus_50_ood.py reads out_dict['plus50'] only).
    split = _check_split("cifar_plus50", split, 1)
    return _cifar_plus("cifar_plus50", "plus50", split)


@register("cifar100_osr")
def cifar100_osr(split: int = 0) -> CIFAROpenSetSpec:
    """CIFAR-100, 20 consecutive label ids known / 80 unknown (`split` 0..4)."""
    known, unknown = cifar100_split(_check_split("cifar100_osr", split))
    names = cifar_classnames("cifar100")
    return _cifar_spec(
        "cifar100_osr",
        split,
        [names[i] for i in known],
        [names[i] for i in unknown],
        "cifar100",
        "cifar100",
        {"train": 10000, "test": 2000, "ood": 8000},
        f"CIFAR-100 (torchvision), classes {20 * split}..{20 * split + 19} known (MixDiff split {split})",
    )


@dataclass
class TinyImageNetOpenSetSpec(OpenSetSpec):
    """Tiny ImageNet, 20 known / 180 unknown classes; train and the val split (as `test` / `ood`)."""

    known_wnids: list[str] = field(default_factory=list)
    unknown_wnids: list[str] = field(default_factory=list)

    def required(self, root: Path) -> list[Path]:
        d = Path(root) / TINY_DIR
        return [d / "train", d / "val"]

    def parts(self, root: Path) -> dict[str, ImageSplit]:
        base = Path(root) / TINY_DIR
        k = len(self.known_wnids)
        out = {}
        for split, part, wnids, offset in (
            ("train", "train", self.known_wnids, 0),
            ("test", "val", self.known_wnids, 0),
            ("ood", "val", self.unknown_wnids, k),
        ):
            items = tiny_items(root, part, wnids)
            out[split] = sources.file_split(base, [(r, offset + y) for r, y in items])
        return out


@register("tinyimagenet_osr")
def tinyimagenet_osr(split: int = 0) -> TinyImageNetOpenSetSpec:
    """Tiny ImageNet, the CAC split `split` (0..4): 20 known, 180 unknown classes, on val."""
    known, unknown = tinyimagenet_split(_check_split("tinyimagenet_osr", split))
    classes = tinyimagenet_classes()
    return TinyImageNetOpenSetSpec(
        name="tinyimagenet_osr",
        classnames=[classes[i][1] for i in known],
        templates=osr_assets("templates.txt"),
        test_sets=["test", "ood"],
        ood_sets=["ood"],
        source=f"Tiny ImageNet ({TINY_URL}), CAC/ZOC open-set split {split} (20 known / 180 unknown)",
        folder=TINY_DIR,
        expected={"train": 10000, "test": 1000, "ood": 9000},
        disk="~0.5 GB",
        steps=[Step("url", TINY_URL, dest="..", extract=True)],
        manual="""1. Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and extract it next to {dir}
   (giving {dir}/train/<wnid>/images/*.JPEG, {dir}/val/images/*.JPEG and
   {dir}/val/val_annotations.txt). ZOC's reorganised tree (tinyimagenet.sh: {dir}/val/<wnid>/) works too.
2. Re-run `python scripts/prepare_data.py tinyimagenet_osr` to check it.""",
        split=split,
        ood_classnames=[classes[i][1] for i in unknown],
        folders=(TINY_DIR,),
        known_wnids=[classes[i][0] for i in known],
        unknown_wnids=[classes[i][0] for i in unknown],
    )


# ------------------------------------------------------------------------------------------------
# The synthetic miniature: shapes_osr

SHAPES_OSR_ID = ("circle", "square", "triangle", "star", "cross")  # CoOp's base half of shapes


@dataclass
class ShapesOSRSpec(ShapesSpec):
    """ID = `classnames` (5 shapes); `ood_near` = the held-out shapes, `ood_far` = digits.

    ID splits are ShapesSpec's images (task code `shapes_osr`). `ood_near` renders the held-out
    shapes exactly as the ID `test` split renders its shapes (same sizes, positions, colours,
    backgrounds and `clutter`; another random stream); `ood_far` is ShapesSpec's `ood_digits` (one
    held-out MNIST digit, no shape, no clutter). Labels: ID 0..4; `ood_near` 5 + its shape's index in
    `ood_classnames`; `ood_far` the index of `digit`.
    """

    ood_classnames: list[str] = field(default_factory=list)

    def load(self, root: Path | None, split: str) -> ImageSplit:
        k = len(self.classnames)
        if split == "ood_far":
            n = self._size(split)
            return self._ood_digits(n, np.full(n, k + self.ood_classnames.index("digit")))
        if split == "ood_near":
            near = [c for c in self.ood_classnames if c != "digit"]
            inner = ShapesSpec(
                name=f"{self.name}_near",
                classnames=near,
                templates=self.templates,
                seed=self.seed,
                image_size=self.image_size,
                sizes={"test": self._size(split)},
                clutter=self.clutter,
            )
            held = inner.load(root, "test")
            return ImageSplit(_ItemImage(held), [k + y for y in held.labels])
        return super().load(root, split)


class _ItemImage:
    """`index -> image` of another split (picklable)."""

    def __init__(self, split: ImageSplit) -> None:
        self.split = split

    def __call__(self, i: int) -> Image.Image:
        return self.split[i]["image"]


@register("shapes_osr")
def shapes_osr(
    seed: int = 0,
    image_size: int = world.IMAGE_SIZE,
    id_shapes: Sequence[str] = SHAPES_OSR_ID,
    test_size: int = 400,
    clutter: Sequence[int] | None = None,
) -> ShapesOSRSpec:
    """ID / OOD world of the MixDiff miniature: `id_shapes` (default: circle, square, triangle, star,
    cross) are the classes; test sets `test` (ID), `ood_far` (digits) and `ood_near` (the other 5
    shapes), `test_size` images each (the issue's prototype: 400). `clutter=[lo, hi]` crosses every
    ID and `ood_near` image with lo..hi line segments (the digits stay clean)."""
    id_shapes = [str(s) for s in id_shapes]
    bad = [s for s in id_shapes if s not in world.SHAPES]
    if (
        bad
        or not id_shapes
        or len(set(id_shapes)) != len(id_shapes)
        or len(id_shapes) == len(world.SHAPES)
    ):
        raise ValueError(
            f"shapes_osr: id_shapes must be distinct shapes of {list(world.SHAPES)}, leaving at "
            f"least one held out; got {list(id_shapes)}."
        )
    if clutter is not None:
        lo, hi = (int(v) for v in clutter)
        if not 0 <= lo <= hi:
            raise ValueError(
                f"shapes_osr: clutter must be [lo, hi] with 0 <= lo <= hi, got {clutter}"
            )
        clutter = (lo, hi)
    held_out = [s for s in world.SHAPES if s not in id_shapes]
    return ShapesOSRSpec(
        name="shapes_osr",
        classnames=id_shapes,
        templates=read_lines("shapes/templates.txt"),
        test_sets=["test", "ood_far", "ood_near"],
        ood_sets=["ood_far", "ood_near"],
        source=f"synthetic (reprolab.data.synthetic): {len(id_shapes)} shapes ID, "
        f"held-out shapes near OOD, digits far OOD",
        seed=seed,
        image_size=image_size,
        sizes={
            "train": 1000,
            "val": 500,
            "test": int(test_size),
            "ood_far": int(test_size),
            "ood_near": int(test_size),
        },
        clutter=clutter,
        ood_classnames=[*held_out, "digit"],
    )
