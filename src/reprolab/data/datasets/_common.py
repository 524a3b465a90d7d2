"""Shared machinery of the real-dataset specs: a data folder under the root, split lists, preparation.

A `LocalSpec` knows its folder (`<root>/<folder>`), the files that must exist (`required`, checked
without decoding anything), how to list its splits (`splits`, cached per root), the expected split sizes
(checked by `verify`), and how to prepare it: automatic `Step`s (archives, Google Drive files, Hugging
Face repositories) followed by `build`, or, where the licence needs a human, the manual steps printed
verbatim.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprolab.data import sources
from reprolab.data.sources import Item, check_counts
from reprolab.data.spec import DataNotFoundError, DatasetSpec, ImageSplit, read_lines

log = logging.getLogger(__name__)


def assets(name: str, file: str) -> list[str]:
    return read_lines(f"{name}/{file}")


def templates_for(name: str, which: str = "single") -> list[str]:
    """`single`: the paper's one template (templates.txt); `ensemble`: templates_ensemble.txt."""
    if which not in ("single", "ensemble"):
        raise ValueError(f"templates must be 'single' or 'ensemble', got {which!r}")
    return assets(name, "templates.txt" if which == "single" else "templates_ensemble.txt")


def norm_name(s: str) -> str:
    return " ".join(s.replace("_", " ").lower().split())


@dataclass
class Step:
    """One automatic preparation step, run inside the dataset folder.

    kind: "url" (src = URL), "gdrive" (src = Google Drive file id), "hf_file" (src = HF dataset repo,
    `filename` = file in the repo), "hf_dataset" (src = HF dataset repo; saved with `save_to_disk` to
    `dest`), "archive" (src = an archive already in the dataset folder), "move" (src = a folder in the
    dataset folder whose contents move to `dest`). Archives (`extract=True`) are unpacked into `dest`;
    plain files are saved as `dest/filename`. Paths are relative to the dataset folder.
    """

    kind: str
    src: str
    filename: str = ""
    dest: str = "."
    extract: bool = False
    revision: str | None = None
    split: str | None = None
    config: str | None = None

    def describe(self) -> str:
        if self.kind == "gdrive":
            return f"Google Drive file {self.src} -> {self.filename}"
        if self.kind == "hf_file":
            return f"hf://datasets/{self.src}/{self.filename} (revision {self.revision or 'main'})"
        if self.kind in ("archive", "move"):
            return f"{self.kind} {self.src} -> {self.dest}"
        if self.kind == "hf_dataset":
            return f"HF dataset {self.src} split {self.split} (revision {self.revision or 'main'})"
        return self.src

    def run(self, ddir: Path) -> None:
        dest = ddir / self.dest
        if self.kind == "move":
            src = ddir / self.src
            if src.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                for child in src.iterdir():
                    if not (dest / child.name).exists():
                        child.rename(dest / child.name)
            return
        if self.kind == "hf_dataset":
            if not sources.hf_saved(dest):
                print(f"  {self.describe()} -> {dest}", flush=True)
                sources.hf_dataset_to_disk(
                    self.src, dest, self.split or "train", self.revision, self.config
                )
            return
        dl_dir = ddir / "_downloads" if self.extract else dest
        if self.kind == "hf_file":
            path = sources.hf_file(self.src, self.filename, dl_dir, self.revision)
        elif self.kind == "archive":
            path = ddir / self.src
        else:
            url = sources.gdrive_url(self.src) if self.kind == "gdrive" else self.src
            path = sources.download(url, dl_dir / (self.filename or url.rsplit("/", 1)[-1]))
        if self.extract:
            marker = dest / f".extracted-{path.name}"
            if not marker.exists():
                sources.extract(path, dest)
                marker.touch()


def download_and_build(spec: Any, root: Path, label: str) -> None:
    """Run `spec.steps` in its folder (each skips what is done), then `spec.build(root)`, then
    `spec.check(root)`; a failure names what went wrong and the manual way (`spec.manual_text`)."""
    ddir = spec.dataset_dir(root)
    ddir.mkdir(parents=True, exist_ok=True)
    try:
        for step in spec.steps:
            step.run(ddir)
        spec.build(root)
    except Exception as err:  # network, licence, missing optional tool
        log.debug("%s", traceback.format_exc())
        raise DataNotFoundError(
            f"{label}: automatic preparation failed ({type(err).__name__}: {err}).\n"
            + spec.manual_text(root)
        ) from err
    try:
        spec.check(root)
    except DataNotFoundError as err:
        raise DataNotFoundError(f"{err}\n{spec.manual_text(root)}") from None


def report_ready(spec: Any, root: Path, label: str) -> None:
    """Verify the prepared tree (counts, files) and print where it is."""
    spec._cache.clear()
    found = spec.verify(root)
    print(f"{label}: ready under {spec.dataset_dir(root)} {found}", flush=True)


@dataclass
class LocalSpec(DatasetSpec):
    """A dataset stored as files under `<root>/<folder>`.

    Optionally an alternative layout of saved Hugging Face datasets (`hf_layout`: split -> folder
    relative to the dataset folder, written by `save_to_disk`) is read when the file layout is absent.
    """

    folder: str = ""
    expected: dict[str, int | None] = field(default_factory=dict)  # split sizes after preparation
    expected_total: int | None = None  # distinct images over all splits, where split sizes vary
    disk: str = ""  # approximate size on disk, for `prepare_data.py --list`
    size_note: str = ""  # shown by `--list` where sizes are approximate or borrowed
    steps: list[Step] = field(default_factory=list)
    manual: str = ""  # manual steps; "{dir}" is replaced by the dataset folder
    crop: int = 0  # pixels cropped from each side at load time (ObjectNet: 2)
    hf_layout: dict[str, str] = field(default_factory=dict)
    hf_label: str = "label"
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---- layout

    def dataset_dir(self, root: Path | str) -> Path:
        return Path(root) / self.folder

    def fewshot_dir(self, root: Path | str) -> Path:
        return self.dataset_dir(root) / "split_fewshot"

    def image_base(self, root: Path) -> Path:
        return self.dataset_dir(root)

    def required(self, root: Path) -> list[Path]:
        """Paths that must exist for `load` to work (checked without listing or decoding)."""
        return [self.dataset_dir(root)]

    def hf_active(self, root: Path) -> bool:
        """Whether the saved-HF layout is present (and the file layout is not)."""
        if not self.hf_layout:
            return False
        ddir = self.dataset_dir(root)
        if all(p.exists() for p in self.required(root)):
            return False
        return all(sources.hf_saved(ddir / d) for d in set(self.hf_layout.values()))

    @property
    def splits_available(self) -> list[str]:
        return ["train", "val", *self.test_sets]

    # ---- contract

    def check(self, root: Path | str) -> None:
        root = Path(root)
        if self.hf_active(root):
            return
        for p in self.required(root):
            if not p.exists():
                raise self.missing(root, str(p))

    def splits(self, root: Path) -> dict[str, list[Item]]:
        raise NotImplementedError

    def groups(self, root: Path) -> dict[str, list[int]] | None:
        return None

    def cached_splits(self, root: Path | str) -> dict[str, list[Item]]:
        key = str(Path(root).resolve())
        if key not in self._cache:
            self._cache[key] = self.splits(Path(root))
        return self._cache[key]

    def load(self, root: Path | str, split: str) -> ImageSplit:
        root = Path(root)
        if split not in self.splits_available:
            raise KeyError(f"{self.name}: no split '{split}'; available: {self.splits_available}")
        self.check(root)
        if self.hf_active(root):
            return sources.hf_split(self.dataset_dir(root) / self.hf_layout[split], self.hf_label)
        items = self.cached_splits(root)[split]
        groups = self.groups(root)
        base = self._cache.get(f"base:{root.resolve()}", self.image_base(root))
        return sources.file_split(base, items, None if groups is None else groups[split], self.crop)

    # ---- preparation

    def split_labels(self, root: Path | str) -> dict[str, list[int]]:
        """Labels of every available split, without decoding images."""
        root = Path(root)
        self.check(root)
        if self.hf_active(root):
            return {
                s: self.load(root, s).labels for s in self.splits_available if s in self.hf_layout
            }
        splits = self.cached_splits(root)
        return {s: [y for _, y, _ in splits[s]] for s in self.splits_available if s in splits}

    def counts(self, root: Path | str) -> dict[str, int]:
        return {s: len(v) for s, v in self.split_labels(root).items()}

    def verify(self, root: Path | str) -> dict[str, int]:
        """Check the prepared data: required files, split sizes, class count. Returns the sizes."""
        root = Path(root)
        labels = self.split_labels(root)
        found = {s: len(v) for s, v in labels.items()}
        check_counts(self.name, self.expected, found)
        if self.expected_total is not None and not self.hf_active(root):
            splits = self.cached_splits(root)
            total = len({r for items in splits.values() for r, _, _ in items})
            check_counts(self.name, {"all splits": self.expected_total}, {"all splits": total})
        k = len(self.classnames)
        for s, ys in labels.items():
            bad = {y for y in ys if not 0 <= y < k}
            if bad:
                raise sources.CountMismatchError(
                    f"{self.name}: split {s} has labels {sorted(bad)[:5]} outside 0..{k - 1}"
                )
        primary = "train" if "train" in labels else self.test_sets[0]
        n_classes = len(set(labels.get(primary, [])))
        if primary in labels and n_classes != k:
            raise sources.CountMismatchError(
                f"{self.name}: wrong number of classes in {primary} (expected {k}, found {n_classes})"
            )
        return found

    def manual_text(self, root: Path | str) -> str:
        text = self.manual.strip().replace("{dir}", str(self.dataset_dir(root)))
        return f"Manual preparation of {self.name} (source: {self.source}):\n{text}"

    def build(self, root: Path) -> None:
        """Post-processing after the automatic steps (write folders, split files...)."""

    def prepare(self, root: Path | str) -> None:
        root = Path(root)
        try:
            self.check(root)
            ready = True
        except DataNotFoundError:
            ready = False
        if not ready:
            if not self.steps and type(self).build is LocalSpec.build:
                raise DataNotFoundError(self.manual_text(root))
            download_and_build(self, root, self.name)
        report_ready(self, root, self.name)

    def info(self) -> dict[str, Any]:
        """One row of `prepare_data.py --list`."""
        return {
            "name": self.name,
            "source": self.source,
            "expected": dict(self.expected),
            "total": self.expected_total,
            "classes": len(self.classnames),
            "disk": self.disk,
            "folder": self.folder,
            "note": self.size_note,
        }


@dataclass
class SplitFileSpec(LocalSpec):
    """CoOp-style dataset: images under `image_dir`, splits from `split_file` when it exists.

    Without the split file, `fallback_items` (if implemented) lists every image with its label, and a
    seeded per-class split with `fractions` is written once to `split_reprolab_<...>.json` and reused
    (a warning says it is not the paper's split).
    """

    image_dir: str = ""
    split_file: str = ""  # e.g. split_zhou_Caltech101.json
    alt_split_files: tuple[str, ...] = ()  # other accepted names, tried in order
    folders: list[str] | None = None  # class folders in label order (image-folder fallback)
    fractions: tuple[float, ...] = (
        0.5,
        0.2,
    )  # train, val (rest = test), CoOp's read_and_split_data
    split_seed: int = 1
    has_fallback: bool = True

    def image_base(self, root: Path) -> Path:
        return self.dataset_dir(root) / self.image_dir

    def check(self, root: Path | str) -> None:
        """Files exist; with a split file, also read it (no image is opened) so that its class names
        are adopted before anyone (the data module, a method) copies `classnames`."""
        super().check(root)
        if not self.hf_active(Path(root)) and self.split_path(Path(root)) is not None:
            self.cached_splits(root)

    def split_path(self, root: Path) -> Path | None:
        for name in (self.split_file, *self.alt_split_files):
            if name and (self.dataset_dir(root) / name).is_file():
                return self.dataset_dir(root) / name
        return None

    @property
    def fallback_file(self) -> str:
        stem = (
            self.split_file.removesuffix(".json").split("_")[-1] if self.split_file else self.name
        )
        return f"split_reprolab_{stem}.json"

    def required(self, root: Path) -> list[Path]:
        req = [self.dataset_dir(root), self.image_base(root)]
        if not self.has_fallback and self.split_path(root) is None:
            req.append(self.dataset_dir(root) / self.split_file)
        return req

    def fallback_items(self, root: Path) -> dict[str, list[Item]] | list[Item]:
        """Every image with its label (list), or pre-split items (dict) when the data has splits."""
        if self.folders is None:
            raise NotImplementedError
        return sources.imagefolder_items(self.image_base(root), self.folders, self.classnames)

    def make_fallback(self, root: Path) -> dict[str, list[Item]]:
        items = self.fallback_items(root)
        if isinstance(items, dict):
            return items
        parts = sources.split_by_class(items, self.fractions, random.Random(self.split_seed))
        return dict(zip(("train", "val", "test"), parts, strict=True))

    def splits(self, root: Path) -> dict[str, list[Item]]:
        path = self.split_path(root)
        if path is not None:
            splits = sources.read_split_json(path, self.name, required=self.split_names_required)
            # split files written by other code may hold paths relative to the dataset folder
            first = next((it[0] for v in splits.values() for it in v), None)
            if first is not None:
                base = sources.resolve_base([self.image_base(root), self.dataset_dir(root)], first)
                self._cache[f"base:{root.resolve()}"] = base
            self.adopt_classnames(splits, path.name)
            return splits
        log.warning(
            "%s: no %s under %s; using our seeded split %s (NOT the paper's split)",
            self.name,
            self.split_file,
            self.dataset_dir(root),
            self.fallback_file,
        )
        return sources.fixed_split(
            self.dataset_dir(root) / self.fallback_file, lambda: self.make_fallback(root), self.name
        )

    @property
    def split_names_required(self) -> tuple[str, ...]:
        """Splits a split file must hold: those `load` reads from it (train, val, test sets)."""
        return tuple(s for s in ("train", "val", "test") if s in self.splits_available)

    def adopt_classnames(self, splits: dict[str, list[Item]], source: str) -> None:
        """Compare the split file's class names with ours; the split file wins, as in CoOp."""
        from_file: dict[int, str] = {}
        for items in splits.values():
            for _, y, c in items:
                from_file.setdefault(y, c)
        if not from_file:
            return
        if max(from_file) >= len(self.classnames):
            raise sources.CountMismatchError(
                f"{self.name}: {source} has {max(from_file) + 1} classes, expected {len(self.classnames)}"
            )
        diff = [
            (y, self.classnames[y], c)
            for y, c in sorted(from_file.items())
            if norm_name(c) != norm_name(self.classnames[y])
        ]
        if diff:
            shown = "; ".join(f"{y}: {a!r} -> {b!r}" for y, a, b in diff[:10])
            log.warning(
                "%s: %d class names differ from %s, using the split file's (%s%s)",
                self.name,
                len(diff),
                source,
                shown,
                " ..." if len(diff) > 10 else "",
            )
            for y, _, c in diff:
                self.classnames[y] = c.replace("_", " ")


def read_annotation_lines(path: Path) -> list[list[str]]:
    """Whitespace-split lines of a text annotation file, skipping blanks and '#' comments."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line.split())
    return out


def format_count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def subset_items(items: Sequence[Item], keep: set[int], relabel: dict[int, int]) -> list[Item]:
    return [(r, relabel[y], c) for r, y, c in items if y in keep]
