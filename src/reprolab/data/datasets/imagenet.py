"""ImageNet-1k and its distribution shifts (ImageNet-V2, -Sketch, -A, -R, ObjectNet).

Layouts under the root (CoOp's DATASETS.md names, so a CoOp `$DATA` folder works as is):

| name | folder | images | test size | classes |
|---|---|---|---|---|
| imagenet | imagenet | images/{train,val}/<wnid>/*.JPEG, or hf/{train,validation} (saved HF dataset) | 50,000 | 1000 |
| imagenet_v2 | imagenetv2 | imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg | 10,000 | 1000 |
| imagenet_sketch | imagenet-sketch | images/<wnid>/*.JPEG, or hf/test (saved HF dataset) | 50,889 | 1000 |
| imagenet_a | imagenet-adversarial | imagenet-a/<wnid>/*.jpg | 7,500 | 200 |
| imagenet_r | imagenet-rendition | imagenet-r/<wnid>/*.jpg | 30,000 | 200 |
| objectnet | objectnet | objectnet-1.0/images/<folder>/*.png (113 of 313 folders used) | ~18,574 | 113 |

Labels: ImageNet index i is the i-th wnid in sorted order (assets/imagenet/wnids.txt). ImageNet "val" is
also the test set (CoOp). V2 labels are the integer folder names (never sort them as strings).
ImageNet-A/R labels are the rank of the image's wnid among the 200 sorted wnids; ObjectNet labels are the
rank of its folder among the 113 mapped folders, and images lose a 2-pixel border (the red frame).

`index_groups` maps each class of a shift set to ImageNet indices: a 1000-way head is evaluated on A/R by
keeping the 200 columns and on ObjectNet by the max over each class's 1-3 columns (`reprolab.metrics.projection.project_logits`).
`get_spec("imagenet", shift_sets=[...])` adds the shift sets as extra test sets (labels in their own
space; `spec.test_index_groups[name]` says how to project the 1000-way logits). A shift set on its own
(`data=imagenet_r`) trains/validates on the ImageNet images of its classes, relabelled.

ObjectNet's classes (folders, names, ImageNet index groups) ship with no file of ours: they are
derived from the release's own `objectnet-1.0/mappings/` when the spec is checked or loaded
(`resolve_objectnet_mappings`, robust_finetuning.md §3.1). Until then the spec knows only that
there are 113 classes; its class names are placeholders and its index groups are unknown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from reprolab.data import sources
from reprolab.data.datasets._common import LocalSpec, Step, assets, templates_for
from reprolab.data.sources import Item
from reprolab.data.spec import ImageSplit, get_spec, register

log = logging.getLogger(__name__)

SHIFT_SETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "objectnet")


@cache
def imagenet_wnids() -> tuple[str, ...]:
    return tuple(assets("imagenet", "wnids.txt"))


@cache
def imagenet_classnames() -> tuple[str, ...]:
    return tuple(assets("imagenet", "classnames.txt"))


def wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


def subset_indices(name: str) -> list[int]:
    """Sorted ImageNet indices of the 200 classes of `imagenet_a` / `imagenet_r`."""
    idx = wnid_index()
    return sorted(idx[w] for w in assets(name, "wnids.txt"))


OBJECTNET_NUM_CLASSES = 113  # robust_finetuning.md §3.1: 113 of the 313 folders overlap ImageNet
OBJECTNET_MAPPING_FILES = (
    "folder_to_objectnet_label.json",
    "objectnet_to_imagenet_1k.json",
    "imagenet_to_label_2012_v2",
    "pytorch_to_imagenet_2012_id.json",
)


def resolve_objectnet_mappings(mappings: str | Path) -> list[tuple[str, str, list[int]]]:
    """(folder, ObjectNet name, ImageNet indices) per mapped class, from ObjectNet's own metadata.

    The procedure of the spec (robust_finetuning.md §3.1): the release's `mappings/` folder has
    `folder_to_objectnet_label.json` (folder -> name), `objectnet_to_imagenet_1k.json` (name -> ImageNet
    class names joined by '; '), `imagenet_to_label_2012_v2` (line k = class name of 2012 id k) and
    `pytorch_to_imagenet_2012_id.json` (PyTorch index -> 2012 id). Chaining them gives each name's
    PyTorch (= sorted-wnid) indices. Sorted by folder.
    """
    m = Path(mappings)
    folder_to_name = sources.read_json(m / "folder_to_objectnet_label.json", "objectnet")
    name_to_folder = {v: k for k, v in folder_to_name.items()}
    to_imagenet = sources.read_json(m / "objectnet_to_imagenet_1k.json", "objectnet")
    id2012_to_torch = {
        int(v): int(k)
        for k, v in sources.read_json(m / "pytorch_to_imagenet_2012_id.json", "objectnet").items()
    }
    lines = (m / "imagenet_to_label_2012_v2").read_text(encoding="utf-8").splitlines()
    name_to_torch = {
        line.strip(): id2012_to_torch[k]
        for k, line in enumerate(lines)
        if line.strip() and k in id2012_to_torch
    }
    out = []
    for name, names in to_imagenet.items():
        if name not in name_to_folder:
            raise sources.CountMismatchError(
                f"objectnet: {name!r} of objectnet_to_imagenet_1k.json has no folder in "
                f"{m / 'folder_to_objectnet_label.json'} (incomplete or mismatched mappings/)"
            )
        unknown = [n for n in names.split("; ") if n not in name_to_torch]
        if unknown:
            raise sources.CountMismatchError(
                f"objectnet: ImageNet class names {unknown} (for {name!r}) are not lines of "
                f"{m / 'imagenet_to_label_2012_v2'} with a PyTorch index in "
                "pytorch_to_imagenet_2012_id.json (incomplete or mismatched mappings/)"
            )
        out.append((name_to_folder[name], name, [name_to_torch[n] for n in names.split("; ")]))
    return sorted(out)


# ------------------------------------------------------------------------------------------------
# ImageNet


@dataclass
class ImageNetSpec(LocalSpec):
    """ImageNet-1k; `val` and `test` are both the 50k validation images (CoOp)."""

    shift_sets: list[str] = field(default_factory=list)
    templates_kind: str = "single"

    _shift_specs: dict[str, ShiftSpec] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.shift_sets) - set(SHIFT_SETS)
        if unknown:
            raise ValueError(
                f"imagenet: unknown shift sets {sorted(unknown)}; choose from {SHIFT_SETS}"
            )
        self.test_sets = ["test", *self.shift_sets]
        self._shift_specs = {s: get_spec(s) for s in self.shift_sets}

    @property
    def test_index_groups(self) -> dict[str, list[list[int]] | None]:
        """Per test set, the ImageNet indices of each of its classes (None: the 1000 classes).

        ObjectNet's groups come from its data folder, so `check(root)` must have run first.
        """
        out: dict[str, list[list[int]] | None] = {"test": None}
        for name, spec in self._shift_specs.items():
            if isinstance(spec, ObjectNetSpec) and not spec.resolved:
                raise RuntimeError(
                    "imagenet: ObjectNet's ImageNet index groups are read from its release's "
                    "objectnet-1.0/mappings/; call spec.check(root) before test_index_groups."
                )
            out[name] = spec.index_groups
        return out

    def check(self, root: Path | str) -> None:
        """ImageNet and every shift set; whatever is missing fails at once, in one line naming the
        `prepare_data.py` command for all of them (not one failed run per missing set)."""
        from reprolab.data.spec import DataNotFoundError

        missing: list[tuple[str, DataNotFoundError]] = []
        for name, check in [("imagenet", super().check)] + [
            (n, spec.check) for n, spec in self._shift_specs.items()
        ]:
            try:
                check(root)
            except DataNotFoundError as e:
                missing.append((name, e))
        if len(missing) == 1:
            raise missing[0][1]
        if missing:
            names = [n for n, _ in missing]
            raise DataNotFoundError(
                f"{len(missing)} datasets of data=imagenet are not ready under {root}: "
                f"{', '.join(names)} (first: {missing[0][1]}). Prepare them with "
                f"`python scripts/prepare_data.py {' '.join(names)}` (set DATA_ROOT to the data root)."
            )

    def prepare(self, root: Path | str) -> None:
        """ImageNet, then each shift set (a missing shift set must not re-run ImageNet's steps)."""
        if not self._shift_specs:
            return super().prepare(root)
        imagenet(templates=self.templates_kind).prepare(root)
        for spec in self._shift_specs.values():
            spec.prepare(root)

    def required(self, root: Path) -> list[Path]:
        d = self.dataset_dir(root)
        return [d / "images" / "train", d / "images" / "val"]

    def splits(self, root: Path) -> dict[str, list[Item]]:
        names = imagenet_classnames()
        idx = wnid_index()

        def listing(split: str) -> list[Item]:
            base = self.dataset_dir(root) / "images" / split
            wnids = sources.list_dirs(base)
            if set(wnids) != set(idx):
                raise sources.CountMismatchError(
                    f"imagenet: {base} must hold the 1000 wnid folders (found {len(wnids)}; "
                    "val must be sorted into wnid folders, e.g. with ILSVRC's valprep.sh)"
                )
            return [
                (f"{split}/{r}", y, c)
                for r, y, c in sources.imagefolder_items(base, list(imagenet_wnids()), list(names))
            ]

        index = sources.fixed_split(
            self.dataset_dir(root) / "split_reprolab_ImageNet.json",
            lambda: {"train": listing("train"), "test": listing("val")},
            self.name,
        )
        return {"train": index["train"], "val": index["test"], "test": index["test"]}

    def image_base(self, root: Path) -> Path:
        return self.dataset_dir(root) / "images"

    def load(self, root: Path | str, split: str) -> ImageSplit:
        if split in self._shift_specs:
            return self._shift_specs[split].load(root, "test")
        return super().load(root, split)


@register("imagenet")
def imagenet(
    templates: str = "single", shift_sets: list[str] | tuple[str, ...] = ()
) -> ImageNetSpec:
    return ImageNetSpec(
        name="imagenet",
        classnames=list(imagenet_classnames()),
        templates=templates_for("imagenet", templates),
        source="ILSVRC-2012 (image-net.org, licence: manual) or HF ILSVRC/imagenet-1k (gated)",
        folder="imagenet",
        expected={"train": 1281167, "val": 50000, "test": 50000},
        disk="~147 GB",
        steps=[
            Step("hf_dataset", "ILSVRC/imagenet-1k", dest="hf/train", split="train"),
            Step("hf_dataset", "ILSVRC/imagenet-1k", dest="hf/validation", split="validation"),
        ],
        hf_layout={"train": "hf/train", "val": "hf/validation", "test": "hf/validation"},
        manual="""ImageNet needs an account (https://image-net.org) or access to the gated HF repo ILSVRC/imagenet-1k.
Either (a) `huggingface-cli login` after accepting the terms on the hub, then re-run this command
(writes {dir}/hf/{train,validation}); or (b) lay out the ILSVRC-2012 archives as
  {dir}/images/train/<wnid>/*.JPEG   (ILSVRC2012_img_train.tar, one tar per wnid)
  {dir}/images/val/<wnid>/*.JPEG     (ILSVRC2012_img_val.tar sorted into wnid folders, e.g. valprep.sh)
Symbolic links to an existing copy are fine. Class names ship with reprolab (OpenAI/CoOp list).""",
        shift_sets=list(shift_sets),
        templates_kind=templates,
    )


# ------------------------------------------------------------------------------------------------
# Shift sets (evaluation only)


@dataclass
class ShiftSpec(LocalSpec):
    """A test-only ImageNet shift set; `train`/`val` are ImageNet's images of the same classes."""

    image_dir: str = ""
    index_groups: list[list[int]] | None = None  # ImageNet indices per class (None: all 1000)
    size_note: str = "train/val: ImageNet's images of these classes"

    def image_base(self, root: Path) -> Path:
        return self.dataset_dir(root) / self.image_dir

    def required(self, root: Path) -> list[Path]:
        return [self.image_base(root)]

    def test_items(self, root: Path) -> list[Item]:
        raise NotImplementedError

    def splits(self, root: Path) -> dict[str, list[Item]]:
        return {"test": self.test_items(root)}

    def load(self, root: Path | str, split: str) -> ImageSplit:
        if split in ("train", "val"):
            return self._imagenet_split(Path(root), split)
        return super().load(root, split)

    def _imagenet_split(self, root: Path, split: str) -> ImageSplit:
        base = get_spec("imagenet").load(root, split)
        if self.index_groups is None:
            return base
        relabel = {i: k for k, g in enumerate(self.index_groups) for i in g}
        keep = [j for j, y in enumerate(base.labels) if y in relabel]
        sub = base.subset(keep)
        sub.labels = [relabel[y] for y in sub.labels]
        return sub


@dataclass
class WnidFolderShift(ShiftSpec):
    """`<image_dir>/<wnid>/*`: all 1000 wnids (Sketch) or a sorted subset (A, R)."""

    wnids: list[str] = field(default_factory=list)

    def test_items(self, root: Path) -> list[Item]:
        return sources.imagefolder_items(self.image_base(root), self.wnids, self.classnames)


@dataclass
class ImageNetV2Spec(ShiftSpec):
    def test_items(self, root: Path) -> list[Item]:
        folders = [str(i) for i in range(1000)]  # integer labels, NOT sorted as strings
        return sources.imagefolder_items(self.image_base(root), folders, self.classnames)


@dataclass
class ObjectNetSpec(ShiftSpec):
    """ObjectNet's 113 ImageNet-overlap classes, derived from the release's own `mappings/` folder.

    Before `check(root)` only the class count is known: `classnames` holds placeholders and
    `index_groups` is None. `check` resolves the mappings and fills both in place (sorted by folder,
    the label order), so a data module that checks before a method copies the names hands over the
    real ones. Class names are the ObjectNet names lower-cased (the clip-benchmark convention).
    """

    folders: list[str] = field(default_factory=list)  # the mapped image folders, in label order
    _resolved_from: Path | None = field(default=None, repr=False, compare=False)

    @property
    def resolved(self) -> bool:
        return self._resolved_from is not None

    def mappings_dir(self, root: Path | str) -> Path:
        return self.dataset_dir(root) / "objectnet-1.0" / "mappings"

    def required(self, root: Path) -> list[Path]:
        m = self.mappings_dir(root)
        return [self.image_base(root), m, *(m / f for f in OBJECTNET_MAPPING_FILES)]

    def check(self, root: Path | str) -> None:
        super().check(root)
        self.resolve_mappings(Path(root))

    def resolve_mappings(self, root: Path) -> None:
        """Folders, names and ImageNet index groups from `<dataset dir>/objectnet-1.0/mappings/`."""
        m = self.mappings_dir(root).resolve()
        if self._resolved_from == m:
            return
        rows = resolve_objectnet_mappings(m)
        if len(rows) != len(self.classnames):
            raise sources.CountMismatchError(
                f"objectnet: {m} maps {len(rows)} ObjectNet classes to ImageNet, expected "
                f"{len(self.classnames)} (is this the ObjectNet 1.0 release's mappings/ folder?)"
            )
        self.folders = [folder for folder, _, _ in rows]
        self.classnames[:] = [name.lower() for _, name, _ in rows]
        self.index_groups = [groups for _, _, groups in rows]
        self._cache.clear()
        self._resolved_from = m
        log.debug("objectnet: %d classes from %s", len(rows), m)

    def load(self, root: Path | str, split: str) -> ImageSplit:
        self.check(root)  # train/val relabel ImageNet with the groups, which need the mappings
        return super().load(root, split)

    def test_items(self, root: Path) -> list[Item]:
        return sources.imagefolder_items(self.image_base(root), self.folders, self.classnames)


@register("imagenet_v2")
def imagenet_v2(templates: str = "single") -> ImageNetV2Spec:
    return ImageNetV2Spec(
        name="imagenet_v2",
        classnames=list(imagenet_classnames()),
        templates=templates_for("imagenet", templates),
        source="ImageNetV2 matched-frequency (HF vaishaal/ImageNetV2 imagenetv2-matched-frequency.tar.gz)",
        folder="imagenetv2",
        image_dir="imagenetv2-matched-frequency-format-val",
        expected={"test": 10000},
        disk="~1.2 GB",
        steps=[
            Step(
                "hf_file",
                "vaishaal/ImageNetV2",
                "imagenetv2-matched-frequency.tar.gz",
                extract=True,
            )
        ],
        manual="""Extract imagenetv2-matched-frequency.tar.gz (hf://datasets/vaishaal/ImageNetV2, or the S3 link in
modestyachts/ImageNetV2) in {dir}, giving {dir}/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg.""",
    )


@register("imagenet_sketch")
def imagenet_sketch(templates: str = "single") -> WnidFolderShift:
    return WnidFolderShift(
        name="imagenet_sketch",
        classnames=list(imagenet_classnames()),
        templates=templates_for("imagenet", templates),
        source="ImageNet-Sketch (HaohanWang/ImageNet-Sketch) or HF clip-benchmark/wds_imagenet_sketch",
        folder="imagenet-sketch",
        image_dir="images",
        wnids=list(imagenet_wnids()),
        expected={"test": 50889},
        disk="~8.4 GB",
        steps=[
            Step("hf_dataset", "clip-benchmark/wds_imagenet_sketch", dest="hf/test", split="test")
        ],
        hf_layout={"test": "hf/test"},
        hf_label="cls",
        manual="""Either re-run with hub access (saves clip-benchmark/wds_imagenet_sketch to {dir}/hf/test), or
download ImageNet-Sketch (links in https://github.com/HaohanWang/ImageNet-Sketch) and extract it so that
{dir}/images/<wnid>/*.JPEG exists (1000 folders).""",
    )


def _subset_spec(
    name: str, folder: str, image_dir: str, url: str, n: int, disk: str, templates: str
) -> WnidFolderShift:
    wnids = assets(name, "wnids.txt")
    idx = wnid_index()
    order = sorted(wnids)
    if order != wnids:
        raise ValueError(f"assets/{name}/wnids.txt must be sorted")
    names = imagenet_classnames()
    return WnidFolderShift(
        name=name,
        classnames=[names[idx[w]] for w in wnids],
        templates=templates_for("imagenet", templates),
        source=f"{url} (Hendrycks et al.)",
        folder=folder,
        image_dir=image_dir,
        wnids=wnids,
        index_groups=[[idx[w]] for w in wnids],
        expected={"test": n},
        disk=disk,
        steps=[Step("url", url, extract=True)],
        manual=f"""mkdir -p {{dir}}; extract {url} in {{dir}}, giving {{dir}}/{image_dir}/<wnid>/*.jpg (200 folders).""",
    )


@register("imagenet_a")
def imagenet_a(templates: str = "single") -> WnidFolderShift:
    return _subset_spec(
        "imagenet_a",
        "imagenet-adversarial",
        "imagenet-a",
        "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
        7500,
        "~0.7 GB",
        templates,
    )


@register("imagenet_r")
def imagenet_r(templates: str = "single") -> WnidFolderShift:
    return _subset_spec(
        "imagenet_r",
        "imagenet-rendition",
        "imagenet-r",
        "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
        30000,
        "~2.1 GB",
        templates,
    )


@register("objectnet")
def objectnet(templates: str = "single") -> ObjectNetSpec:
    return ObjectNetSpec(
        name="objectnet",
        # Names are known once the release's mappings/ is read (ObjectNetSpec.check).
        classnames=[
            f"objectnet class {k} (unknown until prepared)" for k in range(OBJECTNET_NUM_CLASSES)
        ],
        templates=templates_for("imagenet", templates),
        source="ObjectNet 1.0 (objectnet.dev, licence: manual), 113 ImageNet-overlap classes",
        folder="objectnet",
        image_dir="objectnet-1.0/images",
        expected={"test": None},
        size_note="test ~18,574 (locuslab/FLYP issue #7, not verified); train/val: ImageNet's; "
        "class names and ImageNet groups are read from objectnet-1.0/mappings/ once prepared",
        disk="~183 GB",
        crop=2,
        manual="""ObjectNet's licence must be accepted by hand: download objectnet-1.0.zip from https://objectnet.dev
(the page gives the archive password), unzip it in {dir} so that {dir}/objectnet-1.0/images/<folder>/*.png
and {dir}/objectnet-1.0/mappings/*.json exist. Only the 113 folders that overlap ImageNet are read.""",
    )
