"""The four Comparative-CLIP datasets outside the CoOp suite, as upstream evaluates them.

Comparative-CLIP (hk1ee/Comparative-CLIP @ 1cef50f, `src/tools.py`, `src/extract_image_features.py`)
reads these through torchvision (CUB through its own ImageFolder wrapper); the test set is the one
upstream scores, the train split is the one whose images its filtering step encodes (spec
robustness_ood_prompting.md §7.2, §7.1 step 4):

| name | on disk (under the data root) | test | train |
|---|---|---|---|
| caltech256 | caltech256/256_ObjectCategories/<NNN.name>/*.jpg (torchvision) | 20% of a seeded split (6,122) | the other 80% (24,485) |
| cifar100 | cifar-100-python/{meta,train,test} (torchvision) | official test (10,000) | official train (50,000) |
| cub | cub/CUB_200_2011/{images/,images.txt,train_test_split.txt,classes.txt} | is_training_image = 0 (5,794) | = 1 (5,994) |
| places365 | places365/{categories_places365.txt,places365_val.txt,val_256/,...} (torchvision, small) | official val (36,500) | train-standard (1,803,460) |

Caltech256's split is upstream's: `torch.manual_seed(1)` then `random_split(dataset, [int(0.8 N),
N - int(0.8 N)])` over torchvision's `Caltech256` item order (categories sorted, then images
`NNN_0001.jpg .. NNN_<n>.jpg`, n = the number of .jpg files in the folder). The permutation is
reproduced with `torch.randperm(N, generator=torch.Generator().manual_seed(1))`, the draw
`random_split` makes. Caltech256 keeps torchvision's 257 classes (upstream's class list includes
`clutter`).

None has a validation split (the cells run with `data.val=false`). Class names are upstream's class
lists in label order (assets/<name>/SOURCE.md); `python scripts/prepare_data.py <name>` downloads what
is missing (torchvision for Caltech256, CIFAR-100 and Places365; the CaltechDATA tarball for CUB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reprolab.data.datasets._common import LocalSpec, Step, assets, read_annotation_lines
from reprolab.data.datasets.osr import ArrayLoader, cifar_files, download_cifar, read_cifar
from reprolab.data.sources import CountMismatchError, Item
from reprolab.data.spec import ImageSplit, malformed, regenerate_fix, register
from reprolab.errors import ConfigValueError

SPLITS = ("train", "test")
CALTECH256_SEED = 1  # upstream tools.setup: torch.manual_seed(1) before random_split
CALTECH256_TRAIN_FRACTION = 0.8
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"


@dataclass
class _TrainTestSpec(LocalSpec):
    """A dataset with a train split and one test split `test`, and no validation split."""

    @property
    def splits_available(self) -> list[str]:
        return list(SPLITS)

    def load(self, root: Path | str, split: str) -> ImageSplit:
        if split == "val":
            raise ConfigValueError(
                f"data={self.name} has no validation split (upstream evaluates the official test "
                "split only); set data.val=false."
            )
        return super().load(root, split)

    def build(self, root: Path) -> None:
        """Download through torchvision (subclasses); the steps do it for CUB."""

    def manual_text(self, root: Path | str) -> str:
        text = super().manual_text(root).replace("{root}", str(root))
        return f"{text}\nThen re-run `python scripts/prepare_data.py {self.name}` to check it."


def _spec_kwargs(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "classnames": assets(name, "classnames.txt"),
        "templates": assets(name, "templates.txt"),
    }


# ------------------------------------------------------------------------------------------------
# Caltech-256


def caltech256_split(n: int) -> tuple[list[int], list[int]]:
    """(train, test) item indices of upstream's seeded 80/20 `random_split` over `n` items."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(CALTECH256_SEED)).tolist()
    n_train = int(CALTECH256_TRAIN_FRACTION * n)
    return perm[:n_train], perm[n_train:]


@dataclass
class Caltech256Spec(_TrainTestSpec):
    """Caltech-256 in torchvision's layout; upstream's seeded 80/20 split (module docstring)."""

    def image_base(self, root: Path) -> Path:
        return self.dataset_dir(root) / "256_ObjectCategories"

    def required(self, root: Path) -> list[Path]:
        return [self.image_base(root)]

    def splits(self, root: Path) -> dict[str, list[Item]]:
        base = self.image_base(root)
        categories = sorted(p.name for p in base.iterdir())  # torchvision: sorted(os.listdir)
        if len(categories) != len(self.classnames):
            raise CountMismatchError(
                f"{self.name}: {base} has {len(categories)} category folders, expected "
                f"{len(self.classnames)} (torchvision's 257, clutter included); "
                f"{regenerate_fix(self.name)}"
            )
        items: list[Item] = []
        for label, cat in enumerate(categories):
            n = sum(1 for f in (base / cat).iterdir() if f.name.endswith(".jpg"))
            # torchvision reads <cat>/<label+1:03d>_<k:04d>.jpg for k = 1..n, whatever the names
            items.extend(
                (f"{cat}/{label + 1:03d}_{k:04d}.jpg", label, self.classnames[label])
                for k in range(1, n + 1)
            )
        train, test = caltech256_split(len(items))
        return {"train": [items[i] for i in train], "test": [items[i] for i in test]}

    def build(self, root: Path) -> None:
        from torchvision.datasets import Caltech256

        Caltech256(str(root), download=True)


@register("caltech256")
def caltech256() -> Caltech256Spec:
    return Caltech256Spec(
        **_spec_kwargs("caltech256"),
        source="Caltech-256 via torchvision.datasets.Caltech256 (data.caltech.edu/records/nyy15-4j048); "
        "upstream's seeded 80/20 split",
        folder="caltech256",
        expected={"train": 24485, "test": 6122},
        disk="~1.2 GB",
        manual="""1. python -c "from torchvision.datasets import Caltech256; Caltech256('{root}', download=True)"
   (or extract 256_ObjectCategories.tar from https://data.caltech.edu/records/nyy15-4j048 into {dir}).""",
    )


# ------------------------------------------------------------------------------------------------
# CIFAR-100


@dataclass
class CIFAR100Spec(_TrainTestSpec):
    """CIFAR-100 from torchvision's python-version pickles (read directly, `osr.read_cifar`)."""

    def dataset_dir(self, root: Path | str) -> Path:
        return Path(root) / "cifar-100-python"

    def fewshot_dir(self, root: Path | str) -> Path:
        return Path(root) / "cdesc_fewshot" / self.name  # not inside torchvision's folder

    def required(self, root: Path) -> list[Path]:
        return cifar_files(root, "cifar100")

    def load(self, root: Path | str, split: str) -> ImageSplit:
        if split not in SPLITS:
            return super().load(root, split)  # the one-line error
        self.check(Path(root))
        images, labels = read_cifar(root, "cifar100", split == "train", self.name)
        return ImageSplit(ArrayLoader(images), labels.tolist())

    def split_labels(self, root: Path | str) -> dict[str, list[int]]:
        return {s: self.load(root, s).labels for s in SPLITS}

    def build(self, root: Path) -> None:
        download_cifar(Path(root), "cifar100")


@register("cifar100")
def cifar100() -> CIFAR100Spec:
    return CIFAR100Spec(
        **_spec_kwargs("cifar100"),
        source="CIFAR-100 (python version) via torchvision.datasets.CIFAR100",
        folder="cifar-100-python",
        expected={"train": 50000, "test": 10000},
        disk="~0.2 GB",
        manual="""1. python -c "from torchvision.datasets import CIFAR100; CIFAR100('{root}', train=True, download=True)"
   (or put torchvision's extracted cifar-100-python/ folder in {root}).""",
    )


# ------------------------------------------------------------------------------------------------
# CUB-200-2011


@dataclass
class CUBSpec(_TrainTestSpec):
    """CUB-200-2011 from the official tarball; train/test from train_test_split.txt.

    Labels are the class folders' positions in sorted order (upstream's ImageFolder), which is the
    order of classes.txt.
    """

    def image_base(self, root: Path) -> Path:
        return self.dataset_dir(root) / "CUB_200_2011" / "images"

    def meta(self, root: Path, file: str) -> Path:
        return self.dataset_dir(root) / "CUB_200_2011" / file

    def required(self, root: Path) -> list[Path]:
        return [
            self.image_base(root),
            *(self.meta(root, f) for f in ("images.txt", "train_test_split.txt")),
        ]

    def splits(self, root: Path) -> dict[str, list[Item]]:
        images_txt = self.meta(root, "images.txt")
        split_txt = self.meta(root, "train_test_split.txt")
        paths = {}
        for row in read_annotation_lines(images_txt):
            if len(row) != 2:
                raise malformed(
                    images_txt, f"line {row!r} is not '<id> <path>'", regenerate_fix(self.name)
                )
            paths[row[0]] = row[1]
        folders = sorted({p.split("/", 1)[0] for p in paths.values()})
        if len(folders) != len(self.classnames):
            raise CountMismatchError(
                f"{self.name}: {images_txt} names {len(folders)} class folders, expected "
                f"{len(self.classnames)}; {regenerate_fix(self.name)}"
            )
        label = {f: k for k, f in enumerate(folders)}
        out: dict[str, list[Item]] = {"train": [], "test": []}
        for row in read_annotation_lines(split_txt):
            if len(row) != 2 or row[0] not in paths or row[1] not in ("0", "1"):
                raise malformed(
                    split_txt,
                    f"line {row!r} is not '<image id> <0|1>' of images.txt",
                    regenerate_fix(self.name),
                )
            path = paths[row[0]]
            y = label[path.split("/", 1)[0]]
            out["train" if row[1] == "1" else "test"].append((path, y, self.classnames[y]))
        return out


@register("cub")
def cub() -> CUBSpec:
    return CUBSpec(
        **_spec_kwargs("cub"),
        source=f"CUB-200-2011 ({CUB_URL}), official train_test_split.txt",
        folder="cub",
        expected={"train": 5994, "test": 5794},
        disk="~1.2 GB",
        steps=[Step("url", CUB_URL, extract=True)],
        manual=f"""1. mkdir -p {{dir}}; extract {CUB_URL} in {{dir}}
   (giving {{dir}}/CUB_200_2011/images/, images.txt, train_test_split.txt).""",
    )


# ------------------------------------------------------------------------------------------------
# Places365


@dataclass
class Places365Spec(_TrainTestSpec):
    """Places365-Standard, small (256 px) images, torchvision's layout: val is the test set."""

    def required(self, root: Path) -> list[Path]:
        d = self.dataset_dir(root)
        return [d / "places365_val.txt", d / "val_256"]

    def train_dir(self, root: Path) -> Path:
        # torchvision looks in data_256_standard; the official tar unpacks to data_256
        d = self.dataset_dir(root)
        return next(
            (d / n for n in ("data_256_standard", "data_256") if (d / n).is_dir()),
            d / "data_256_standard",
        )

    def image_base(self, root: Path) -> Path:
        return self.dataset_dir(root)

    def _read_list(self, path: Path, folder: str) -> list[Item]:
        if not path.is_file():
            raise self.missing(path.parent.parent, str(path))
        out = []
        for row in read_annotation_lines(path):
            if len(row) != 2 or not row[1].isdigit() or int(row[1]) >= len(self.classnames):
                raise malformed(
                    path, f"line {row!r} is not '<image> <label 0..364>'", regenerate_fix(self.name)
                )
            y = int(row[1])
            out.append((f"{folder}/{row[0].lstrip('/')}", y, self.classnames[y]))
        return out

    def splits(self, root: Path) -> dict[str, list[Item]]:
        d = self.dataset_dir(root)
        out = {"test": self._read_list(d / "places365_val.txt", "val_256")}
        train_list = d / "places365_train_standard.txt"
        out["train"] = (
            self._read_list(train_list, self.train_dir(root).name) if train_list.is_file() else []
        )
        return out

    def load(self, root: Path | str, split: str) -> ImageSplit:
        if (
            split == "train"
            and not (self.dataset_dir(root) / "places365_train_standard.txt").is_file()
        ):
            raise self.missing(
                Path(root), str(self.dataset_dir(root) / "places365_train_standard.txt")
            )
        return super().load(root, split)

    def build(self, root: Path) -> None:
        from torchvision.datasets import Places365

        for split in ("val", "train-standard"):
            Places365(str(self.dataset_dir(root)), split=split, small=True, download=True)


@register("places365")
def places365() -> Places365Spec:
    return Places365Spec(
        **_spec_kwargs("places365"),
        source="Places365-Standard 256px via torchvision.datasets.Places365 (data.csail.mit.edu/places)",
        folder="places365",
        expected={"train": 1803460, "test": 36500},
        disk="~26 GB (val alone ~0.5 GB)",
        manual="""1. python -c "from torchvision.datasets import Places365; [Places365('{dir}', split=s, small=True, download=True) for s in ('val', 'train-standard')]"
   (val alone is enough for the unfiltered rows; the filtered row also needs train-standard).""",
    )
