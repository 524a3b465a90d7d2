"""Image-caption retrieval datasets: Flickr30k and MS-COCO (the m2-mix paper; robust_finetuning.md §4.1).

Layouts under the root (the first one present is read):

| name | folder | captions and split | images |
|---|---|---|---|
| flickr30k | flickr30k | dataset_flickr30k.json (Karpathy) | Images/<filename> |
| | | flickr_annotations_30k.csv (nlphuji/flickr30k on HF) | Images/<filename> |
| | | hf/ (nlphuji/flickr30k saved with `save_to_disk`) | inside hf/ |
| coco_captions (variant karpathy) | coco | dataset_coco.json (Karpathy) | images/{train2014,val2014}/ |
| coco_captions (variant release) | coco | annotations/captions_{train,val}2017.json | images/{train2017,val2017}/ |

Splits are train / val / test, images in file order, every caption of an image kept in file order
(evaluation ranks the first 5: `captions_per_image`; training on caption 0 takes the first).
Sizes (images): Flickr30k 29,000 / 1,014 / 1,000 (Karpathy; val really has 1,014), COCO Karpathy
113,287 / 5,000 / 5,000 (train includes restval), COCO release 118,287 / 5,000 / 5,000 (val = test).

Karpathy's split files (`caption_datasets.zip`): {"images": [{"filename", "filepath" (COCO: the
2014 folder), "split": train|val|test|restval, "sentences": [{"raw": caption, ...}, ...]}, ...]}.
The nlphuji/flickr30k copy holds the same split in a `split` column (CSV: `raw` is a JSON list of
the 5 captions; saved dataset: `caption` is that list). Official COCO caption files:
{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}.

`check` stats a handful of paths; `load` reads the annotation file once per root (cached) and opens
no image; `verify` (`prepare_data.py --check` / `--list`) checks sizes, captions per image, and that
every listed image file exists (one directory listing per image folder, not one stat per image).

Preparation (`python scripts/prepare_data.py flickr30k | coco_captions | coco_captions_release`):
Flickr30k fetches nlphuji/flickr30k's flickr_annotations_30k.csv and flickr30k-images.zip (pinned
revision) with `hf_hub_download`. That repo is a loading-script dataset, which `datasets` >= 4 no
longer runs, so `load_dataset(...).save_to_disk` is not the automatic route; a copy saved that way
(with an older `datasets`) is still read from hf/. COCO downloads the official archives from
images.cocodataset.org and, for Karpathy's split, caption_datasets.zip from Karpathy's page.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from reprolab.data import sources
from reprolab.data.captions import CaptionSpec, CaptionSplit
from reprolab.data.datasets._common import Step, download_and_build, report_ready
from reprolab.data.sources import CountMismatchError, check_counts
from reprolab.data.spec import (
    DataNotFoundError,
    MalformedDataError,
    malformed,
    regenerate_fix,
    register,
)

log = logging.getLogger(__name__)

# Karpathy's split names -> ours. `restval` (COCO only: the 30,504 val2014 images outside Karpathy's
# 5k val / 5k test) joins train, the standard practice with Karpathy's COCO split (113,287 train).
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
KARPATHY_ZIP = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
COCO_URL = "http://images.cocodataset.org"
FLICKR_HF = "nlphuji/flickr30k"
# The newest commit of nlphuji/flickr30k seen in its tree listing (holds flickr_annotations_30k.csv,
# flickr30k-images.zip and the loading script flickr30k.py); pinned so the files cannot change.
FLICKR_HF_REVISION = "2b239befc81b6e3f035ce6bd52f5f4d60f5625f7"
SHOWN = 5  # missing files named in a message


class MissingImagesError(MalformedDataError):
    """An annotation file lists image files that are not there (an incomplete download)."""


class IndexedLoader:
    """Picklable `i -> loader(indices[i])`: one split's rows of a file that holds every split."""

    def __init__(self, loader: Callable[[int], Image.Image], indices: Sequence[int]) -> None:
        self.loader, self.indices = loader, list(indices)

    def __call__(self, i: int) -> Image.Image:
        return self.loader(self.indices[i])


@dataclass
class Annotations:
    """One split as read from its annotation source (no image opened).

    `base` + `relpaths` locate the image files (verify checks they exist); `base` is None where the
    images live inside a saved HF dataset. `source` is the annotation file, for messages.
    """

    loader: Callable[[int], Image.Image]
    captions: list[list[str]]
    source: Path
    base: Path | None = None
    relpaths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """One accepted on-disk layout of a caption dataset, relative to its folder.

    kind: `karpathy` (split file), `nlphuji_csv`, `hf` (a saved HF dataset folder) or `coco_official`
    (two caption files: train, then val). `annotations`: the file(s); `images`: the image folder;
    `image_dirs`: its sub-folders that must exist.
    """

    kind: str
    annotations: tuple[str, ...]
    images: str = ""
    image_dirs: tuple[str, ...] = ()

    def required(self, ddir: Path) -> list[Path]:
        paths = [ddir / a for a in self.annotations]
        if self.images:
            img = ddir / self.images
            paths += [img / d for d in self.image_dirs] if self.image_dirs else [img]
        return paths

    def present(self, ddir: Path) -> bool:
        if self.kind == "hf":
            return sources.hf_saved(ddir / self.annotations[0])
        return all(p.exists() for p in self.required(ddir))

    def describe(self) -> str:
        if self.kind == "hf":
            return f"{self.annotations[0]}/ (a saved Hugging Face dataset)"
        dirs = "{" + ",".join(self.image_dirs) + "}" if self.image_dirs else ""
        return " + ".join(self.annotations) + f" + {self.images}/{dirs}"


# --------------------------------------------------------------------------------------------------
# Readers of the annotation formats (each validates its schema; errors name the file)


def _captions(value: Any) -> list[str] | None:
    """A list of caption strings (surrounding whitespace removed), or None if `value` is not one."""
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        return None
    return [c.strip() for c in value]


def read_karpathy(
    path: Path, name: str, with_filepath: bool
) -> dict[str, list[tuple[str, list[str]]]]:
    """`{split: [(relpath, captions), ...]}` from a Karpathy split file, images in file order.

    relpath is `filename` (Flickr30k) or `filepath/filename` (COCO: `val2014/COCO_val2014_...jpg`).
    """
    fix = regenerate_fix(name)
    raw = sources.read_json(path, name)
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        what = (
            type(raw).__name__
            if not isinstance(raw, dict)
            else f"object with keys {sorted(raw)[:5]}"
        )
        raise malformed(
            path, f'holds a JSON {what}, not {{"images": [...]}} (Karpathy format)', fix
        )
    out: dict[str, list[tuple[str, list[str]]]] = {s: [] for s in ("train", "val", "test")}
    keys = '{"filename"' + (', "filepath"' if with_filepath else "") + ', "split", "sentences"}'
    for i, im in enumerate(raw["images"]):
        ok = isinstance(im, dict) and isinstance(im.get("filename"), str)
        ok = ok and (not with_filepath or isinstance(im.get("filepath"), str))
        sents = im.get("sentences") if ok else None
        caps = None
        if isinstance(sents, list) and all(isinstance(s, dict) for s in sents):
            caps = _captions([s.get("raw") for s in sents])
        if caps is None:
            raise malformed(
                path,
                f"images[{i}] is {json.dumps(im)[:100]}, not {keys} with sentences "
                '[{"raw": caption}, ...]',
                fix,
            )
        split = im.get("split")
        if split not in KARPATHY_SPLITS:
            raise malformed(
                path, f"images[{i}] has split {split!r}, not one of {sorted(KARPATHY_SPLITS)}", fix
            )
        rel = f"{im['filepath']}/{im['filename']}" if with_filepath else im["filename"]
        out[KARPATHY_SPLITS[split]].append((rel, caps))
    return out


def read_nlphuji_csv(path: Path, name: str) -> dict[str, list[tuple[str, list[str]]]]:
    """`{split: [(filename, captions), ...]}` from nlphuji/flickr30k's flickr_annotations_30k.csv.

    Its columns (read by the repo's loading script): raw (JSON list of the captions), sentids,
    split (train / val / test: Karpathy's), filename, img_id.
    """
    fix = regenerate_fix(name)
    out: dict[str, list[tuple[str, list[str]]]] = {s: [] for s in ("train", "val", "test")}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            missing = [c for c in ("raw", "split", "filename") if c not in cols]
            if missing:
                raise malformed(
                    path,
                    f"has no column {'/'.join(missing)} (found: {', '.join(cols) or 'none'})",
                    fix,
                )
            for row in reader:
                line = reader.line_num
                try:
                    caps = _captions(json.loads(row["raw"] or ""))
                except json.JSONDecodeError:
                    caps = None
                if caps is None:
                    raise malformed(path, f"line {line}: raw is not a JSON list of captions", fix)
                if row["split"] not in KARPATHY_SPLITS or not row["filename"]:
                    raise malformed(
                        path,
                        f"line {line}: split {row['split']!r} / filename {row['filename']!r}",
                        fix,
                    )
                out[KARPATHY_SPLITS[row["split"]]].append((row["filename"], caps))
    except (UnicodeDecodeError, csv.Error) as err:
        raise malformed(path, f"is not a readable CSV ({err})", fix) from None
    return out


def read_coco_official(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """`[(file_name, captions), ...]` from an official COCO caption file, by increasing image id.

    The order of torchvision's `CocoCaptions` (which the m2-mix release uses): images sorted by id,
    each image's captions in the order of the annotation list, so caption 0 is the release's.
    """
    fix = regenerate_fix(name)
    raw = sources.read_json(path, name)
    ok = isinstance(raw, dict)
    ok = ok and isinstance(raw.get("images"), list) and isinstance(raw.get("annotations"), list)
    if not ok:
        raise malformed(
            path, 'is not a COCO caption file ({"images": [...], "annotations": [...]})', fix
        )
    files: dict[int, str] = {}
    for i, im in enumerate(raw["images"]):
        if not (
            isinstance(im, dict)
            and isinstance(im.get("id"), int)
            and isinstance(im.get("file_name"), str)
        ):
            raise malformed(
                path, f'images[{i}] is {json.dumps(im)[:100]}, not {{"id", "file_name"}}', fix
            )
        files[im["id"]] = im["file_name"]
    caps: dict[int, list[str]] = {k: [] for k in files}
    for j, a in enumerate(raw["annotations"]):
        ok = isinstance(a, dict) and isinstance(a.get("caption"), str)
        if not ok or a.get("image_id") not in caps:
            raise malformed(
                path,
                f'annotations[{j}] is {json.dumps(a)[:100]}, not {{"image_id" (an id in images), '
                '"caption"}',
                fix,
            )
        caps[a["image_id"]].append(a["caption"].strip())
    empty = [files[k] for k in sorted(files) if not caps[k]]
    if empty:
        raise malformed(path, f"{len(empty)} images have no caption (first: {empty[0]})", fix)
    return [(files[k], caps[k]) for k in sorted(files)]


def read_hf_captions(path: Path, name: str) -> dict[str, tuple[list[int], list[list[str]]]]:
    """`{split: (row indices, captions)}` of a saved nlphuji/flickr30k dataset (no image decoded).

    The repo has one split ("test") holding all 31,014 images; its `split` column is Karpathy's.
    """
    import datasets

    fix = regenerate_fix(name)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged folder is reported as such
        raise malformed(path, f"cannot be read by datasets.load_from_disk ({err})", fix) from None
    if not isinstance(ds, datasets.Dataset):
        raise malformed(path, "holds a DatasetDict; save the single split (split='test')", fix)
    missing = [c for c in ("image", "caption", "split") if c not in ds.column_names]
    if missing:
        raise malformed(
            path, f"has no column {'/'.join(missing)} (found: {', '.join(ds.column_names)})", fix
        )
    cols = ds.select_columns(["caption", "split"]).to_dict()
    out: dict[str, tuple[list[int], list[list[str]]]] = {
        s: ([], []) for s in ("train", "val", "test")
    }
    for i, (value, split) in enumerate(zip(cols["caption"], cols["split"], strict=True)):
        caps = _captions(value)
        if caps is None or split not in KARPATHY_SPLITS:
            raise malformed(path, f"row {i}: caption {value!r:.80} / split {split!r}", fix)
        idx, cs = out[KARPATHY_SPLITS[split]]
        idx.append(i)
        cs.append(caps)
    return out


def missing_files(base: Path, relpaths: Sequence[str]) -> list[str]:
    """The relpaths (in order) with no file under `base`: one directory listing per folder."""
    present: dict[str, set[str]] = {}
    out = []
    for rel in relpaths:
        folder, _, name = rel.rpartition("/")
        if folder not in present:
            try:
                with os.scandir(base / folder) as it:
                    present[folder] = {e.name for e in it}
            except (FileNotFoundError, NotADirectoryError):
                present[folder] = set()
        if name not in present[folder]:
            out.append(rel)
    return out


def _find_image_dir(top: Path) -> Path | None:
    """The first folder under `top` (breadth-first, `top` included) holding .jpg files."""
    queue = [top]
    while queue:
        d = queue.pop(0)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if any(e.is_file() and e.name.lower().endswith(".jpg") for e in entries):
            return d
        queue += [
            Path(e.path) for e in entries if e.is_dir() and not e.name.startswith((".", "__"))
        ]
    return None


# --------------------------------------------------------------------------------------------------
# Specs


@dataclass
class CaptionFilesSpec(CaptionSpec):
    """A caption dataset stored under `<root>/<folder>` in one of `layouts` (the first present wins).

    `prepare_as` is the `prepare_data.py` name that prepares this variant (messages name it).
    """

    folder: str = ""
    layouts: list[Layout] = field(default_factory=list)
    # images per split after preparation (verify)
    expected: dict[str, int | None] = field(default_factory=dict)
    disk: str = ""
    size_note: str = ""
    steps: list[Step] = field(default_factory=list)
    manual: str = ""
    prepare_as: str = ""
    _cache: dict[str, dict[str, Annotations]] = field(
        default_factory=dict, repr=False, compare=False
    )

    # ---- layout

    def dataset_dir(self, root: Path | str) -> Path:
        return Path(root) / self.folder

    def layout(self, root: Path | str) -> Layout | None:
        ddir = self.dataset_dir(root)
        return next((lay for lay in self.layouts if lay.present(ddir)), None)

    @property
    def pname(self) -> str:
        """The `prepare_data.py` name of this variant."""
        return self.prepare_as or self.name

    @property
    def command(self) -> str:
        return f"python scripts/prepare_data.py {self.pname}"

    def missing(self, root: Path, expected: str) -> DataNotFoundError:
        return DataNotFoundError(
            f"{self.pname} not found under {root} (expected {expected}). Set DATA_ROOT or run "
            f"`{self.command}`."
        )

    # ---- contract

    def check(self, root: Path | str) -> None:
        """Raise DataNotFoundError unless one layout's files exist (a few stats, nothing read)."""
        if self.layout(root) is None:
            ddir = self.dataset_dir(root)
            wanted = " or ".join(f"{ddir}/{lay.describe()}" for lay in self.layouts)
            raise self.missing(Path(root), wanted)

    def annotations(self, root: Path | str) -> dict[str, Annotations]:
        """Every split's annotations, read once per root (and layout)."""
        self.check(root)  # raises, naming the prepare command, when no layout is present
        lay = self.layout(root)
        key = f"{Path(root).resolve()}:{lay.kind}"
        if key not in self._cache:
            self._cache[key] = self.read(self.dataset_dir(root), lay)
        return self._cache[key]

    def read(self, ddir: Path, lay: Layout) -> dict[str, Annotations]:
        ann = ddir / lay.annotations[0]
        if lay.kind == "hf":
            loader = sources.HFImageLoader(ann, "image")
            return {
                s: Annotations(IndexedLoader(loader, idx), caps, ann)
                for s, (idx, caps) in read_hf_captions(ann, self.pname).items()
            }
        base = ddir / lay.images
        if lay.kind == "coco_official":
            splits = {"train": read_coco_official(ann, self.pname)}
            val = read_coco_official(ddir / lay.annotations[1], self.pname)
            splits["val"] = splits["test"] = val
            dirs = {"train": lay.image_dirs[0], "val": lay.image_dirs[1], "test": lay.image_dirs[1]}
            sources_ = {"train": ann, "val": ddir / lay.annotations[1]}
            sources_["test"] = sources_["val"]
            items = {s: [(f"{dirs[s]}/{f}", c) for f, c in v] for s, v in splits.items()}
        else:
            if lay.kind == "karpathy":  # COCO's entries name their 2014 folder (`filepath`)
                items = read_karpathy(ann, self.pname, with_filepath=bool(lay.image_dirs))
            elif lay.kind == "nlphuji_csv":
                items = read_nlphuji_csv(ann, self.pname)
            else:  # pragma: no cover - a spec lists only known kinds
                raise ValueError(f"unknown caption layout {lay.kind!r}")
            sources_ = dict.fromkeys(items, ann)
        out = {}
        for s, v in items.items():
            rel = [r for r, _ in v]
            out[s] = Annotations(
                sources.FileLoader(base, rel), [c for _, c in v], sources_[s], base, rel
            )
        return out

    def load(self, root: Path | str, split: str) -> CaptionSplit:
        if split not in self.splits_available:
            raise KeyError(f"{self.name}: no split '{split}'; available: {self.splits_available}")
        self.check(root)
        a = self.annotations(root)[split]
        if not a.captions:
            raise malformed(a.source, f"has no {split} images", regenerate_fix(self.pname))
        return CaptionSplit(a.loader, a.captions, f"{self.name}/{split}")

    def verify(self, root: Path | str) -> dict[str, int]:
        """Split sizes, >= `captions_per_image` captions per image, and every image file present."""
        anns = self.annotations(root)
        found = {s: len(anns[s].captions) for s in self.splits_available}
        check_counts(self.pname, self.expected, found)
        k = self.captions_per_image
        for s in self.splits_available:
            a = anns[s]
            short = [i for i, caps in enumerate(a.captions) if len(caps) < k]
            if short:
                first = a.relpaths[short[0]] if a.relpaths else f"row {short[0]}"
                raise CountMismatchError(
                    f"{self.pname}: {len(short)} {s} images have fewer than {k} captions "
                    f"(first: {first} in {a.source})"
                )
        # every listed image file exists (splits sharing a file, release val = test, listed once)
        listed: dict[tuple[Path, Path], dict[str, None]] = {}
        for s in self.splits_available:
            a = anns[s]
            if a.base is not None:
                listed.setdefault((a.source, a.base), {}).update(dict.fromkeys(a.relpaths))
        for (src, base), rels in listed.items():
            gone = missing_files(base, list(rels))
            if gone:
                shown = ", ".join(gone[:SHOWN]) + (", ..." if len(gone) > SHOWN else "")
                raise MissingImagesError(
                    f"{src}: lists {len(gone):,} image files that are missing under {base} "
                    f"({shown}); run `{self.command}` to download them."
                )
        return found

    # ---- preparation

    def manual_text(self, root: Path | str) -> str:
        text = self.manual.strip().replace("{dir}", str(self.dataset_dir(root)))
        return f"Manual preparation of {self.pname} (source: {self.source}):\n{text}"

    def build(self, root: Path) -> None:
        """Post-processing after the automatic steps."""

    def _needs_download(self, root: Path) -> bool:
        """No layout present, or image files missing; a tree that is wrong in another way (sizes, a
        malformed file) is reported by `verify` instead, since downloading would not fix it."""
        try:
            self.check(root)
        except DataNotFoundError:
            return True
        try:
            self.verify(root)
        except MissingImagesError:
            return True
        except (DataNotFoundError, CountMismatchError):
            return False
        finally:
            self._cache.clear()
        return False

    def prepare(self, root: Path | str) -> None:
        root = Path(root)
        if self._needs_download(root):
            if not self.steps:
                raise DataNotFoundError(self.manual_text(root))
            download_and_build(self, root, self.pname)
        report_ready(self, root, self.pname)

    def info(self) -> dict[str, Any]:
        """One row of `prepare_data.py --list` (no classes: a caption dataset)."""
        return {
            "name": self.name,
            "source": self.source,
            "expected": dict(self.expected),
            "total": None,
            "classes": "-",
            "disk": self.disk,
            "folder": self.folder,
            "note": self.size_note,
        }


@dataclass
class Flickr30kSpec(CaptionFilesSpec):
    """Flickr30k; `prepare` fetches nlphuji/flickr30k's CSV and image archive, then names the
    extracted image folder `Images/`."""

    def build(self, root: Path) -> None:
        ddir = self.dataset_dir(root)
        if (ddir / "Images").is_dir():
            return
        found = _find_image_dir(ddir / "_unpacked")
        if found is None:
            raise FileNotFoundError(f"no folder of .jpg images under {ddir / '_unpacked'}")
        found.rename(ddir / "Images")


@dataclass
class CocoCaptionsSpec(CaptionFilesSpec):
    """MS-COCO captions; `variant` is `karpathy` (default) or `release` (the m2-mix code)."""

    variant: str = "karpathy"

    def build(self, root: Path) -> None:
        ddir = self.dataset_dir(root)
        if self.variant != "karpathy" or (ddir / "dataset_coco.json").is_file():
            return
        found = sorted((ddir / "_karpathy").rglob("dataset_coco.json"))
        if not found:
            raise FileNotFoundError(f"dataset_coco.json not in {KARPATHY_ZIP}")
        shutil.copyfile(found[0], ddir / "dataset_coco.json")


_FLICKR_MANUAL = f"""Annotations (one of), in {{dir}}/:
  - dataset_flickr30k.json, Karpathy's split file (inside {KARPATHY_ZIP});
  - flickr_annotations_30k.csv from hf://datasets/{FLICKR_HF} (revision {FLICKR_HF_REVISION}):
    the same split and captions.
Images: extract flickr30k-images.zip (same HF repo; or the official Flickr30k archive, by request at
  http://shannon.cs.illinois.edu/DenotationGraph/) so that {{dir}}/Images/<filename>.jpg exist.
Alternatively, a saved copy of the HF dataset in {{dir}}/hf/ (columns image, caption, split, ...):
  datasets.load_dataset("{FLICKR_HF}", split="test").save_to_disk("{{dir}}/hf") -- the repo is a
  loading script, which datasets >= 4 no longer runs (use datasets < 4 for this step)."""


@register("flickr30k")
def flickr30k() -> Flickr30kSpec:
    """Flickr30k, Karpathy's split (29,000 / 1,014 / 1,000 images, 5 captions each)."""
    return Flickr30kSpec(
        name="flickr30k",
        source=(
            f"Flickr30k (Young et al. 2014) with Karpathy's split: dataset_flickr30k.json, or "
            f"HF {FLICKR_HF} @ {FLICKR_HF_REVISION[:7]}"
        ),
        test_sets=["test"],
        captions_per_image=5,
        folder="flickr30k",
        layouts=[
            Layout("karpathy", ("dataset_flickr30k.json",), "Images"),
            Layout("nlphuji_csv", ("flickr_annotations_30k.csv",), "Images"),
            Layout("hf", ("hf",)),
        ],
        expected={"train": 29000, "val": 1014, "test": 1000},
        disk="~4.5 GB",
        size_note="5 captions per image; val has 1,014 images",
        # The repo's loading script (flickr30k.py) does not run with datasets >= 4, so its files are
        # fetched directly: the annotation CSV and the image archive.
        steps=[
            Step("hf_file", FLICKR_HF, "flickr_annotations_30k.csv", revision=FLICKR_HF_REVISION),
            Step(
                "hf_file",
                FLICKR_HF,
                "flickr30k-images.zip",
                dest="_unpacked",
                extract=True,
                revision=FLICKR_HF_REVISION,
            ),
        ],
        manual=_FLICKR_MANUAL,
        prepare_as="flickr30k",
    )


COCO_VARIANTS = ("karpathy", "release")


@register("coco_captions")
def coco_captions(variant: str = "karpathy") -> CocoCaptionsSpec:
    """MS-COCO captions: Karpathy's 2014 split (default) or the m2-mix release's 2017 split.

    DEVIATION: the m2-mix release (robust_finetuning.md §4.1, P7) trains on train2017 (118,287
    images) and uses val2017 (5,000) as both validation and test set, so its model selection sees
    the test set. The default here is the standard Karpathy split (113,287 train incl. restval /
    5,000 val / 5,000 test from COCO 2014), with a validation set disjoint from the test set;
    `variant: release` (data=coco_captions_release) reproduces the release.
    """
    if variant not in COCO_VARIANTS:
        raise ValueError(
            f"coco_captions: variant must be one of {list(COCO_VARIANTS)}, got {variant!r}"
        )
    common = {
        "name": "coco_captions",
        "test_sets": ["test"],
        "captions_per_image": 5,
        "folder": "coco",
        "disk": "~19 GB",
        "variant": variant,
    }
    if variant == "karpathy":  # the standard split (see DEVIATION below)
        return CocoCaptionsSpec(
            **common,
            source="MS-COCO 2014 images (images.cocodataset.org) + Karpathy's dataset_coco.json",
            layouts=[
                Layout("karpathy", ("dataset_coco.json",), "images", ("train2014", "val2014"))
            ],
            expected={"train": 113287, "val": 5000, "test": 5000},
            size_note="Karpathy split; train includes restval (30,504 val2014 images)",
            steps=[
                Step("url", f"{COCO_URL}/zips/train2014.zip", dest="images", extract=True),
                Step("url", f"{COCO_URL}/zips/val2014.zip", dest="images", extract=True),
                Step("url", KARPATHY_ZIP, dest="_karpathy", extract=True),
            ],
            manual=f"""1. Download {COCO_URL}/zips/train2014.zip and {COCO_URL}/zips/val2014.zip and extract
   both in {{dir}}/images/, giving {{dir}}/images/train2014/ and {{dir}}/images/val2014/.
2. Download {KARPATHY_ZIP} and put its dataset_coco.json in {{dir}}/.""",
            prepare_as="coco_captions",
        )
    # DEVIATION: the m2-mix release trains on train2017 and uses val2017 as both its validation and
    # its test set (model selection on the test set, P7); the default variant above keeps Karpathy's
    # disjoint 5k val / 5k test split of COCO 2014 instead.
    return CocoCaptionsSpec(
        **common,
        source="MS-COCO 2017 images + captions_{train,val}2017.json (images.cocodataset.org); "
        "val = test = val2017 (m2-mix release)",
        layouts=[
            Layout(
                "coco_official",
                ("annotations/captions_train2017.json", "annotations/captions_val2017.json"),
                "images",
                ("train2017", "val2017"),
            )
        ],
        expected={"train": 118287, "val": 5000, "test": 5000},
        size_note="m2-mix release: val = test = val2017",
        steps=[
            Step("url", f"{COCO_URL}/zips/train2017.zip", dest="images", extract=True),
            Step("url", f"{COCO_URL}/zips/val2017.zip", dest="images", extract=True),
            Step("url", f"{COCO_URL}/annotations/annotations_trainval2017.zip", extract=True),
        ],
        manual=f"""1. Download {COCO_URL}/zips/train2017.zip and {COCO_URL}/zips/val2017.zip and extract both
   in {{dir}}/images/, giving {{dir}}/images/train2017/ and {{dir}}/images/val2017/.
2. Download {COCO_URL}/annotations/annotations_trainval2017.zip and extract it in {{dir}}/, giving
   {{dir}}/annotations/captions_train2017.json and captions_val2017.json.""",
        prepare_as="coco_captions_release",
    )
