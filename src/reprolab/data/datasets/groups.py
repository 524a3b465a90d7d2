"""Group-robustness datasets (spec robustness_ood_prompting.md §1.5): Waterbirds and CelebA.

Every item carries `group = y * 2 + a` (group_DRO's convention), so worst-group accuracy works for
every method. Splits are the datasets' official ones.

| name | folder | files | y / a | train/val/test |
|---|---|---|---|---|
| waterbirds | waterbirds | waterbird_complete95_forest2water2/{metadata.csv, <class>/*.jpg} | waterbird / water background | 4795/1199/5794 |
| celeba | celeba | img_align_celeba/*.jpg + list_attr_celeba.{txt,csv} + list_eval_partition.{txt,csv} | Blond_Hair / Male | 162770/19867/19962 |

CelebA accepts the official / torchvision files (`.txt`) and the Kaggle / group_DRO ones (`.csv`,
images possibly nested as img_align_celeba/img_align_celeba/).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from reprolab.data.datasets._common import LocalSpec, Step, assets, templates_for
from reprolab.data.sources import Item
from reprolab.data.spec import register

_SPLIT_CODES = {"0": "train", "1": "val", "2": "test"}


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
    def required(self, root: Path) -> list[Path]:
        return [self.image_base(root) / "metadata.csv"]

    def records(self, root: Path) -> list[tuple[str, str, int, int]]:
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

    def required(self, root: Path) -> list[Path]:
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
