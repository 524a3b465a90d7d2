"""Dataset specs of NPC's noisy-label benchmarks (robustness_ood_prompting.md §4.4; the noise itself
is `reprolab.data.noisy`).

| name | folder under the data root | format | splits |
|---|---|---|---|
| mnist_noisy | mnist/MNIST/raw/ | torchvision's idx files (`*-idx?-ubyte[.gz]`) | train 60,000 / test 10,000 |
| fmnist_noisy | fmnist/FashionMNIST/raw/ | the same | train 60,000 / test 10,000 |
| cifar10_noisy | cifar10/cifar-10-batches-py/ | the python pickles (data_batch_1..5, test_batch) | train 50,000 / test 10,000 |
| clothing1m | clothing1m/ | the official release's label files + images | below |
| food101n | Food-101N_release/ + food-101/ | Food-101N's meta/imagelist.tsv + Food-101's meta/test.txt | train 310,009 / test 25,250 |

MNIST, FMNIST and CIFAR-10 are read into arrays (no image files are written); `prepare` downloads
them with torchvision (MNIST shares `<root>/mnist` with `loc_mnist`). Their validation split is
carved from train by the data module (upstream: the first 10 %, `val_holdout: first`), and
`noise_features` gives the inputs IDNX noise is computed from, as upstream's loader served them
(MNIST/FMNIST `ToTensor()`; CIFAR-10 `ToTensor()` + `Normalize(0.5, 0.5)`, flattened C·H·W).

Clothing1M (Xiao et al., CVPR 2015; 14 classes; licence: ask the authors, so `prepare` prints the
manual steps). The release's label files (`noisy_label_kv.txt`, `clean_label_kv.txt`,
`noisy_train_key_list.txt`, `clean_val_key_list.txt`, `clean_test_key_list.txt`; in the folder or
its `annotations/`), keys `images/<d>/<dd>/<name>.jpg`, images under `images/` or, as DivideMix and
upstream NPC keep them, with the `images/` prefix stripped. Two protocols (`protocol`):
- `upstream` (default, `BaeHeeSun/NPC: library/util/dataloader.py: clothing_dataset`): train = every
  line of `noisy_label_kv.txt`; val (early stopping) = a random 10 % of it (noisy labels); test =
  every line of `clean_label_kv.txt` (72,409 images, which overlap the noisy training images).
- `standard` (Xiao et al.; DivideMix): train = `noisy_train_key_list.txt` (1 M) with its noisy
  labels; val = `clean_val_key_list.txt` (14,313, clean labels); test = `clean_test_key_list.txt`
  (10,526).
`clean_labels` gives the clean label of a training image where `clean_label_kv.txt` has one, else
`CLEAN_UNKNOWN` (−1).

Food-101N (Lee et al., CleanNet, CVPR 2018; 101 classes): train on Food-101N's 310,009 web images
(`meta/imagelist.tsv`, labels from the class folder; true labels unknown), test on Food-101's
25,250 test images (`food-101/meta/test.txt`, the usual protocol, which the upstream code's single
`FOOD_101M` folder hides); val = a random 10 % of train (upstream).
"""

from __future__ import annotations

import gzip
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reprolab.data.datasets._common import LocalSpec, Step, assets
from reprolab.data.datasets.osr import ArrayLoader, cifar_classnames, read_cifar
from reprolab.data.sources import Item
from reprolab.data.spec import ImageSplit, malformed, regenerate_fix, register

log = logging.getLogger(__name__)

CLEAN_UNKNOWN = -1  # as `reprolab.data.noisy.CLEAN_UNKNOWN` (data specs do not import data modules)

# DEVIATION (STYLE §7 keeps class names in data/assets/): these lists are fixed by the datasets'
# own label order and live here, next to the specs that own them.
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CLOTHING1M_CLASSES = (  # category_names_eng.txt, in label order
    "T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker",
    "Jacket", "Down Coat", "Suit", "Shawl", "Dress", "Vest", "Underwear",
)  # fmt: skip

# Upstream `generate_noisy_data.py: label_list` (map[y] = the label of a flipped y).
ASYM_MAPS = {
    "mnist": (0, 1, 7, 8, 4, 6, 5, 7, 8, 9),  # 2→7, 3→8, 5↔6
    "fmnist": (6, 1, 4, 3, 4, 7, 6, 7, 8, 9),  # 0→6, 2→4, 5→7
    "cifar10": (
        0,
        1,
        0,
        5,
        7,
        3,
        6,
        7,
        8,
        1,
    ),  # bird→airplane, cat↔dog, deer→horse, truck→automobile
}

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


# ------------------------------------------------------------------------------------------------
# Array formats (also what the tests write their fixture trees with)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format: magic, dims, uint8 data), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim, kind = magic & 0xFF, (magic >> 8) & 0xFF
    if kind != 0x08 or ndim < 1:
        raise malformed(
            path, f"is not an idx file of uint8 (magic {magic:#x})", "download it again"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise malformed(path, f"holds {arr.size} values for dims {dims}", "download it again")
    return arr.reshape(dims)


def write_idx(path: Path, arr: np.ndarray) -> None:
    """Write a uint8 array in the idx format (gzipped when `path` ends in .gz)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = (0x0800 | arr.ndim).to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(head + arr.tobytes())


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A CIFAR-10 python batch: `data` (N, 3072) uint8 in C·H·W order, `labels`; and, beside it,
    the `batches.meta` with the label names (as torchvision's download has)."""
    images = np.asarray(images, dtype=np.uint8)  # (N, 32, 32, 3)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"data": data, "labels": [int(v) for v in labels]}, f)
    meta = path.parent / "batches.meta"
    if not meta.exists():
        with open(meta, "wb") as f:
            pickle.dump({"label_names": cifar_classnames("cifar10")}, f)


@dataclass
class ArraySpec(LocalSpec):
    """MNIST / Fashion-MNIST / CIFAR-10 in torchvision's download layout, read into arrays.

    `kind` is `mnist`, `fmnist` or `cifar10`; `raw_dir` the folder of the files under the data
    root; `asym_map` upstream's asymmetric class map; `val_holdout` how the data module carves the
    validation split from train.
    """

    kind: str = "mnist"
    raw_dir: str = ""
    asym_map: tuple[int, ...] | None = None
    val_holdout: str | None = "first"
    noise_rate: float | None = None  # no noise of its own: the data module generates it

    @property
    def splits_available(self) -> list[str]:
        return ["train", *self.test_sets]

    def dataset_dir(self, root: Path | str) -> Path:
        return Path(root) / self.folder

    def _files(self, root: Path, split: str) -> list[Path]:
        d = Path(root) / self.raw_dir
        if self.kind == "cifar10":
            return [d / f for f in CIFAR_FILES[split]]
        out = []
        for name in MNIST_FILES[split]:
            plain = d / name
            out.append(
                plain if plain.exists() or not (d / f"{name}.gz").exists() else d / f"{name}.gz"
            )
        return out

    def required(self, root: Path) -> list[Path]:
        files = [p for s in ("train", "test") for p in self._files(root, s)]
        if self.kind == "cifar10":  # the label names `read_cifar` checks against the assets
            files.append(Path(root) / self.raw_dir / "batches.meta")
        return files

    def arrays(self, root: Path | str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images (N, H, W[, 3]) uint8, labels (N,) int64) of `train` or `test`, cached per root."""
        root = Path(root)
        if split not in ("train", "test"):
            raise KeyError(f"{self.name}: no split '{split}'; available: {self.splits_available}")
        key = f"arrays:{root.resolve()}:{split}"
        if key not in self._cache:
            self.check(root)
            files = self._files(root, split)
            if self.kind == "cifar10":  # torchvision's pickles, read as the OSR specs read them
                images, labels = read_cifar(
                    root / self.folder, "cifar10", split == "train", self.name
                )
            else:
                images, labels = read_idx(files[0]), read_idx(files[1]).astype(np.int64)
            if len(images) != len(labels):
                raise malformed(
                    files[0],
                    f"{len(images)} images for {len(labels)} labels",
                    regenerate_fix(self.name),
                )
            self._cache[key] = (images, labels)
        return self._cache[key]

    def load(self, root: Path | str, split: str) -> ImageSplit:
        images, labels = self.arrays(root, split)
        return ImageSplit(ArrayLoader(images), labels)

    def split_labels(self, root: Path | str) -> dict[str, list[int]]:
        return {s: self.arrays(root, s)[1].tolist() for s in ("train", "test")}

    def noise_features(self, root: Path | str, split: str = "train") -> np.ndarray:
        """The inputs IDNX noise reads, as upstream's loader served them. (N, D) float32"""
        images, _ = self.arrays(root, split)
        if self.kind == "cifar10":  # ToTensor + Normalize((0.5,)*3, (0.5,)*3), C·H·W order
            x = images.transpose(0, 3, 1, 2).reshape(len(images), -1).astype(np.float32) / 255.0
            return (x - 0.5) / 0.5
        return images.reshape(len(images), -1).astype(np.float32) / 255.0  # ToTensor

    def build(self, root: Path) -> None:
        """Download with torchvision into the layout above (network)."""
        from torchvision import datasets as tvd

        cls = {"mnist": tvd.MNIST, "fmnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[self.kind]
        for train in (True, False):
            cls(str(self.dataset_dir(root)), train=train, download=True)


def _array_spec(kind: str, name: str, classnames: list[str], template: str, **kw: Any) -> ArraySpec:
    folder = {"mnist": "mnist", "fmnist": "fmnist", "cifar10": "cifar10"}[kind]
    raw = {"mnist": "MNIST/raw", "fmnist": "FashionMNIST/raw", "cifar10": "cifar-10-batches-py"}[
        kind
    ]
    n_train = 50000 if kind == "cifar10" else 60000
    torch_name = {"mnist": "MNIST", "fmnist": "FashionMNIST", "cifar10": "CIFAR10"}[kind]
    return ArraySpec(
        name=name,
        classnames=list(classnames),
        templates=[template],
        source=f"torchvision.datasets.{torch_name} (downloaded by `prepare`); noise: reprolab.data.noisy",
        folder=folder,
        raw_dir=f"{folder}/{raw}",
        expected={"train": n_train, "test": 10000},
        disk="~0.2 GB" if kind == "cifar10" else "~0.06 GB",
        manual=(
            f"Download with torchvision on a machine with internet: "
            f'`python -c "from torchvision.datasets import {torch_name} as D; '
            f"[D('{{dir}}', train=t, download=True) for t in (True, False)]\"`, "
            "then copy {dir} to this data root."
        ),
        kind=kind,
        asym_map=ASYM_MAPS[kind],
        **kw,
    )


@register("mnist_noisy")
def mnist_noisy() -> ArraySpec:
    return _array_spec(
        "mnist", "mnist_noisy", [str(d) for d in range(10)], "a photo of the number {}."
    )


@register("fmnist_noisy")
def fmnist_noisy() -> ArraySpec:
    return _array_spec("fmnist", "fmnist_noisy", list(FMNIST_CLASSES), "a photo of a {}.")


@register("cifar10_noisy")
def cifar10_noisy() -> ArraySpec:
    return _array_spec("cifar10", "cifar10_noisy", list(CIFAR10_CLASSES), "a photo of a {}.")


# ------------------------------------------------------------------------------------------------
# Clothing1M

CLOTHING_PROTOCOLS = ("upstream", "standard")
CLOTHING_LABEL_FILES = ("noisy_label_kv.txt", "clean_label_kv.txt")
CLOTHING_KEY_LISTS = (
    "noisy_train_key_list.txt",
    "clean_val_key_list.txt",
    "clean_test_key_list.txt",
)


def read_label_kv(path: Path) -> list[tuple[str, int]]:
    """`<key> <label>` lines of a Clothing1M label file, in file order."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise malformed(
                path,
                f"line {n} is not '<image key> <label>': {line[:80]!r}",
                "restore the release's file",
            )
        out.append((parts[0], int(parts[1])))
    return out


def read_key_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Clothing1MSpec(LocalSpec):
    """Clothing1M's release under `<root>/clothing1m` (module docstring); `protocol` upstream |
    standard."""

    protocol: str = "upstream"
    asym_map: tuple[int, ...] | None = None
    noise_rate: float | None = 0.38  # upstream `args.noisy_ratio` (Co-teaching's forget rate)

    @property
    def val_holdout(self) -> str | None:
        return "random" if self.protocol == "upstream" else None

    @property
    def splits_available(self) -> list[str]:
        return ["train", "test"] if self.protocol == "upstream" else ["train", "val", "test"]

    def label_dir(self, root: Path) -> Path:
        d = self.dataset_dir(root)
        return d / "annotations" if (d / "annotations" / CLOTHING_LABEL_FILES[0]).is_file() else d

    def required(self, root: Path) -> list[Path]:
        files = CLOTHING_LABEL_FILES + (CLOTHING_KEY_LISTS if self.protocol == "standard" else ())
        d = self.dataset_dir(root)
        return [d, *(self.label_dir(root) / f for f in files)]

    def _relpath(self, root: Path) -> Any:
        strip = not (self.dataset_dir(root) / "images").is_dir()  # DivideMix / NPC: <d>/<dd>/x.jpg

        def rel(key: str) -> str:
            return key[len("images/") :] if strip and key.startswith("images/") else key

        return rel

    def _labels(self, root: Path) -> tuple[list[tuple[str, int]], dict[str, int]]:
        key = f"kv:{root.resolve()}"
        if key not in self._cache:
            ldir = self.label_dir(root)
            noisy = read_label_kv(ldir / CLOTHING_LABEL_FILES[0])
            clean = read_label_kv(ldir / CLOTHING_LABEL_FILES[1])
            k = len(self.classnames)
            for path, pairs in ((CLOTHING_LABEL_FILES[0], noisy), (CLOTHING_LABEL_FILES[1], clean)):
                bad = sorted({y for _, y in pairs if not 0 <= y < k})
                if bad:
                    raise malformed(
                        ldir / path,
                        f"has labels {bad[:5]} outside 0..{k - 1}",
                        "restore the release's file",
                    )
            self._cache[key] = (noisy, dict(clean))
        return self._cache[key]

    def splits(self, root: Path) -> dict[str, list[Item]]:
        noisy, clean = self._labels(root)
        rel, names = self._relpath(root), self.classnames
        if self.protocol == "upstream":
            train = [(rel(k), y, names[y]) for k, y in noisy]
            test = [(rel(k), y, names[y]) for k, y in clean.items()]
            return {"train": train, "test": test}
        noisy_map, ldir = dict(noisy), self.label_dir(root)
        out: dict[str, list[Item]] = {}
        for split, file, labels in (
            ("train", CLOTHING_KEY_LISTS[0], noisy_map),
            ("val", CLOTHING_KEY_LISTS[1], clean),
            ("test", CLOTHING_KEY_LISTS[2], clean),
        ):
            keys = read_key_list(ldir / file)
            missing = [k for k in keys if k not in labels]
            if missing:
                raise malformed(
                    ldir / file,
                    f"lists {len(missing)} keys without a label (first {missing[0]})",
                    "restore the release's label files",
                )
            out[split] = [(rel(k), labels[k], names[labels[k]]) for k in keys]
        return out

    def clean_labels(self, root: Path | str, split: str) -> list[int]:
        """True labels of a split's items: `clean_label_kv.txt`'s where it has one, else −1."""
        root = Path(root)
        if split != "train":
            return self.load(root, split).labels
        noisy, clean = self._labels(root)
        if self.protocol == "upstream":
            keys = [k for k, _ in noisy]
        else:
            keys = read_key_list(self.label_dir(root) / CLOTHING_KEY_LISTS[0])
        return [clean.get(k, CLEAN_UNKNOWN) for k in keys]


@register("clothing1m")
def clothing1m(protocol: str = "upstream") -> Clothing1MSpec:
    if protocol not in CLOTHING_PROTOCOLS:
        from reprolab.utils.naming import unknown_name

        raise ValueError("clothing1m: " + unknown_name("protocol", protocol, CLOTHING_PROTOCOLS))
    expected: dict[str, int | None] = (
        {"test": 72409}
        if protocol == "upstream"
        else {"train": 1000000, "val": 14313, "test": 10526}
    )
    return Clothing1MSpec(
        name="clothing1m",
        classnames=list(CLOTHING1M_CLASSES),
        templates=["a photo of a {}, a type of clothing."],
        source="Clothing1M (Xiao et al., CVPR 2015), from the authors on request",
        folder="clothing1m",
        expected=expected,
        disk="~40 GB",
        size_note="upstream protocol: train = every noisy_label_kv.txt line (~1.04 M)",
        manual="""Clothing1M is distributed by its authors on request (github.com/Cysu/noisy_label).
1. Get the release and put its label files in {dir}/ (or {dir}/annotations/): noisy_label_kv.txt,
   clean_label_kv.txt, noisy_train_key_list.txt, clean_val_key_list.txt, clean_test_key_list.txt,
   category_names_eng.txt.
2. Extract images/0.tar ... images/9.tar into {dir}/images/ (keys then resolve as
   {dir}/images/<d>/<dd>/<name>.jpg); the DivideMix layout {dir}/<d>/<dd>/<name>.jpg works too.""",
        protocol=protocol,
    )


# ------------------------------------------------------------------------------------------------
# Food-101N (train) + Food-101 (test)

FOOD101N_DIR = "Food-101N_release"
FOOD101_DIR = "food-101"
FOOD101N_URL = "https://iudata.blob.core.windows.net/food101/Food-101N_release.zip"
FOOD101_URL = "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"
_IMAGE_EXT = (".jpg", ".jpeg", ".png")


def _with_ext(name: str) -> str:
    return name if name.lower().endswith(_IMAGE_EXT) else f"{name}.jpg"


def _header_free(lines: list[str], header: str) -> list[str]:
    lines = [line.strip() for line in lines if line.strip()]
    return lines[1:] if lines and lines[0].split("\t")[0].strip().lower() == header else lines


@dataclass
class Food101NSpec(LocalSpec):
    """Food-101N's noisy web images for training, Food-101's test images for testing."""

    folders: list[str] = field(default_factory=list)  # class folders, label order
    asym_map: tuple[int, ...] | None = None
    val_holdout: str | None = "random"
    noise_rate: float | None = 0.27  # upstream `args.noisy_ratio` for Food

    @property
    def splits_available(self) -> list[str]:
        return ["train", "test"]

    def image_base(self, root: Path) -> Path:
        return Path(root)  # items name their own folder: train and test live apart

    def required(self, root: Path) -> list[Path]:
        root = Path(root)
        return [
            root / FOOD101N_DIR / "meta" / "imagelist.tsv",
            root / FOOD101N_DIR / "images",
            root / FOOD101_DIR / "meta" / "test.txt",
            root / FOOD101_DIR / "images",
        ]

    def splits(self, root: Path) -> dict[str, list[Item]]:
        index = {f: i for i, f in enumerate(self.folders)}
        classes = Path(root) / FOOD101N_DIR / "meta" / "classes.txt"
        if classes.is_file():
            listed = _header_free(classes.read_text(encoding="utf-8").splitlines(), "class_name")
            if sorted(listed) != sorted(self.folders):
                raise malformed(
                    classes,
                    "does not list Food-101's 101 class folders",
                    "restore the release's file",
                )
        out: dict[str, list[Item]] = {}
        for split, path, prefix, header in (
            (
                "train",
                Path(root) / FOOD101N_DIR / "meta" / "imagelist.tsv",
                f"{FOOD101N_DIR}/images",
                "class_name/key",
            ),
            ("test", Path(root) / FOOD101_DIR / "meta" / "test.txt", f"{FOOD101_DIR}/images", ""),
        ):
            items = []
            for line in _header_free(path.read_text(encoding="utf-8").splitlines(), header):
                rel = line.split("\t")[0]
                folder = rel.split("/")[0]
                if folder not in index:
                    raise malformed(
                        path,
                        f"names class folder {folder!r}, not one of Food-101's",
                        "restore the release's file",
                    )
                y = index[folder]
                items.append((f"{prefix}/{_with_ext(rel)}", y, self.classnames[y]))
            out[split] = items
        return out

    def clean_labels(self, root: Path | str, split: str) -> list[int]:
        """Food-101N's true labels are unknown (−1); Food-101's test labels are clean."""
        labels = self.split_labels(root)[split]
        return [CLEAN_UNKNOWN] * len(labels) if split == "train" else labels


@register("food101n")
def food101n() -> Food101NSpec:
    return Food101NSpec(
        name="food101n",
        classnames=assets("food101", "classnames.txt"),
        templates=["a photo of {}, a type of food."],
        source="Food-101N (Lee et al., CVPR 2018) for training + Food-101 test (Bossard et al., 2014)",
        folder=FOOD101N_DIR,
        folders=assets("food101", "folders.txt"),
        expected={"train": 310009, "test": 25250},
        disk="~25 GB",
        steps=[
            Step("url", FOOD101N_URL, dest="..", extract=True),
            Step("url", FOOD101_URL, dest="..", extract=True),
        ],
        manual=f"""1. Download Food-101N ({FOOD101N_URL}) and extract it next to {{dir}}, giving
   {{dir}}/meta/imagelist.tsv and {{dir}}/images/<class>/<key>.jpg.
2. Download Food-101 ({FOOD101_URL}) and extract it next to {{dir}}, giving
   {{dir}}/../food-101/meta/test.txt and {{dir}}/../food-101/images/<class>/<id>.jpg.""",
    )
