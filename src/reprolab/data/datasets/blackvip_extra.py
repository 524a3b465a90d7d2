"""The three transfer sets BlackVIP adds to CoOp's eleven: SVHN, RESISC45, CLEVR-count (spec §6).

| name | folder | images | split file | protocol without it |
|---|---|---|---|---|
| svhn | svhn | {train,test}/<digit>/*.jpg (written from SVHN's .mat files) | split_SVHN.json (or split_mlai_SVHN.json) | train folder 70/30 per class -> train/val; test folder |
| resisc45 | resisc45 | NWPU-RESISC45/<class>/*.jpg | split_mlai_Resisc45.json | 50/20/30 per class |
| clevr_count | CLEVR_v1.0 | images/{train,val}/*.png + scenes/*.json | split_mlai_CLEVR.json | label = #objects; CLEVR train 80/20 per class -> train/val; CLEVR val -> test |

BlackVIP's own split files (Google Drive links in its README) are honoured when present. The SVHN
file-name mismatch (README `split_mlai_SVHN.json` vs code `split_SVHN.json`, spec §10.2) is resolved by
accepting both, the code's name first.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from reprolab.data import sources
from reprolab.data.datasets._common import SplitFileSpec, Step, assets, templates_for
from reprolab.data.sources import Item
from reprolab.data.spec import register


@dataclass
class SVHNSpec(SplitFileSpec):
    """Images written as `svhn/{train,test}/<digit>/<index>.jpg` from torchvision's SVHN .mat files."""

    def image_base(self, root: Path) -> Path:
        return self.dataset_dir(root)

    def required(self, root: Path) -> list[Path]:
        d = self.dataset_dir(root)
        return [d / "train", d / "test"]

    def fallback_items(self, root: Path) -> dict[str, list[Item]]:
        d = self.dataset_dir(root)
        names = [str(i) for i in range(10)]
        train = [
            (f"train/{r}", y, c) for r, y, c in sources.imagefolder_items(d / "train", names, names)
        ]
        test = [
            (f"test/{r}", y, c) for r, y, c in sources.imagefolder_items(d / "test", names, names)
        ]
        tr, va = sources.split_by_class(train, [0.7], random.Random(self.split_seed))
        return {"train": tr, "val": va, "test": test}

    def build(self, root: Path) -> None:
        from PIL import Image
        from torchvision.datasets import SVHN

        d = self.dataset_dir(root)
        for split in ("train", "test"):
            if (d / split).is_dir():
                continue
            ds = SVHN(str(d / "_downloads"), split=split, download=True)
            tmp = d / f".{split}.tmp"
            for i, (img, y) in enumerate(zip(ds.data, ds.labels, strict=True)):
                out = tmp / str(int(y))
                out.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.transpose(1, 2, 0)).save(out / f"{i:05d}.jpg", quality=95)
            tmp.rename(d / split)


@register("svhn")
def svhn(templates: str = "single") -> SVHNSpec:
    return SVHNSpec(
        name="svhn",
        classnames=assets("svhn", "classnames.txt"),
        templates=templates_for("svhn", templates),
        source="SVHN cropped digits (ufldl.stanford.edu/housenumbers, via torchvision) + BlackVIP split",
        folder="svhn",
        split_file="split_SVHN.json",
        alt_split_files=("split_mlai_SVHN.json",),
        expected={"test": 26032},
        expected_total=73257 + 26032,
        disk="~0.4 GB",
        steps=[],
        manual="""1. python -c "from torchvision.datasets import SVHN; SVHN('{dir}/_downloads', 'train', download=True); SVHN('{dir}/_downloads', 'test', download=True)"
2. Re-run `python scripts/prepare_data.py svhn`: it writes {dir}/{train,test}/<digit>/*.jpg.
3. Optional (the paper's exact split): put BlackVIP's split_mlai_SVHN.json (BlackVIP README) in {dir}/.""",
        fractions=(0.7,),
    )


@register("resisc45")
def resisc45(templates: str = "single") -> SplitFileSpec:
    return SplitFileSpec(
        name="resisc45",
        classnames=assets("resisc45", "classnames.txt"),
        templates=templates_for("resisc45", templates),
        source="NWPU-RESISC45 (Cheng et al. 2017; OneDrive, manual) + BlackVIP split_mlai_Resisc45.json",
        folder="resisc45",
        image_dir="NWPU-RESISC45",
        split_file="split_mlai_Resisc45.json",
        folders=assets("resisc45", "folders.txt"),
        expected_total=31500,
        disk="~0.4 GB",
        manual="""1. Download NWPU-RESISC45.rar (the authors' OneDrive link, also listed by TensorFlow Datasets'
   resisc45 page) and extract it so that {dir}/NWPU-RESISC45/<class>/*.jpg exists (45 x 700 images).
2. Optional (the paper's exact split): put BlackVIP's split_mlai_Resisc45.json (BlackVIP README) in
   {dir}/; otherwise a seeded 50/20/30 per-class split is written once.""",
    )


@dataclass
class CLEVRCountSpec(SplitFileSpec):
    """CLEVR v1.0 object counting: label = number of objects (3..10), names sorted as strings."""

    def required(self, root: Path) -> list[Path]:
        d = self.dataset_dir(root)
        req = [d / "images"]
        if self.split_path(root) is None:
            req += [
                d / "scenes" / "CLEVR_train_scenes.json",
                d / "scenes" / "CLEVR_val_scenes.json",
            ]
        return req

    def _scene_items(self, root: Path, split: str) -> list[Item]:
        path = self.dataset_dir(root) / "scenes" / f"CLEVR_{split}_scenes.json"
        with open(path, encoding="utf-8") as f:
            scenes = json.load(f)["scenes"]
        label = {c: i for i, c in enumerate(self.classnames)}
        out = []
        for s in scenes:
            c = str(len(s["objects"]))
            out.append((f"{split}/{s['image_filename']}", label[c], c))
        return out

    def fallback_items(self, root: Path) -> dict[str, list[Item]]:
        train, val = sources.split_by_class(
            self._scene_items(root, "train"), [0.8], random.Random(self.split_seed)
        )
        return {"train": train, "val": val, "test": self._scene_items(root, "val")}


@register("clevr_count")
def clevr_count(templates: str = "single") -> CLEVRCountSpec:
    return CLEVRCountSpec(
        name="clevr_count",
        classnames=assets("clevr_count", "classnames.txt"),
        templates=templates_for("clevr_count", templates),
        source="CLEVR v1.0 (dl.fbaipublicfiles.com/clevr/CLEVR_v1.0.zip), counts from scene files",
        folder="CLEVR_v1.0",
        image_dir="images",
        split_file="split_mlai_CLEVR.json",
        expected={"test": 15000},
        expected_total=85000,
        disk="~18 GB",
        steps=[
            Step(
                "url",
                "https://dl.fbaipublicfiles.com/clevr/CLEVR_v1.0.zip",
                dest="..",
                extract=True,
            )
        ],
        manual="""1. Extract https://dl.fbaipublicfiles.com/clevr/CLEVR_v1.0.zip next to {dir}, giving
   {dir}/images/{train,val}/ and {dir}/scenes/CLEVR_{train,val}_scenes.json.
2. Optional (the paper's exact split): put BlackVIP's split_mlai_CLEVR.json in {dir}/.""",
        fractions=(0.8,),
    )
