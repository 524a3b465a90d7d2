"""On-disk formats that dataset specs read, and the few network steps `prepare` may take.

Formats (all local, all lazy: no image is decoded until an item is read):
- image folder: `<dir>/<class folder>/<image>`; class folders are mapped to labels by the caller.
- CoOp split file (`split_zhou_<Name>.json`): `{"train": [[relpath, label, classname], ...], "val": ...,
  "test": ...}`, relpaths relative to the dataset's image directory.
- a saved Hugging Face dataset (`datasets.Dataset.save_to_disk`), with an image column holding encoded
  bytes or a path.
- fixed split files we write ourselves (same schema as CoOp's), written once and reused.

Network helpers (`download`, `hf_file`, `hf_dataset_to_disk`) are only called from `prepare`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from reprolab.data.spec import ImageSplit, malformed, regenerate_fix
from reprolab.errors import ReprolabError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLITS = ("train", "val", "test")

Item = tuple[str, int, str]  # (path relative to the image directory, label, classname), as CoOp


class CountMismatchError(ReprolabError, ValueError):
    """A prepared dataset does not have the expected number of images or classes."""


# --------------------------------------------------------------------------------------------------
# Images


def pil_rgb(path: str | os.PathLike, crop: int = 0) -> Image.Image:
    """Open an image file as RGB, optionally cropping `crop` pixels from every side."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    if crop:
        w, h = im.size
        im = im.crop((crop, crop, w - crop, h - crop))
    return im


class FileLoader:
    """Picklable `index -> PIL RGB` loader over paths relative to `base`."""

    def __init__(self, base: str | os.PathLike, relpaths: Sequence[str], crop: int = 0) -> None:
        self.base = str(base)
        self.relpaths = list(relpaths)
        self.crop = crop

    def __call__(self, i: int) -> Image.Image:
        return pil_rgb(os.path.join(self.base, self.relpaths[i]), self.crop)


def file_split(
    base: str | os.PathLike,
    items: Sequence[Item] | Sequence[tuple[str, int]],
    groups: Sequence[int] | None = None,
    crop: int = 0,
) -> ImageSplit:
    """An `ImageSplit` over image files; nothing is opened until an item is read."""
    return ImageSplit(
        FileLoader(base, [it[0] for it in items], crop), [it[1] for it in items], groups
    )


def list_dirs(path: str | os.PathLike) -> list[str]:
    """Sub-directory names, sorted (Python's case-sensitive order, as CoOp), hidden ones skipped."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def list_images(path: str | os.PathLike) -> list[str]:
    """Image file names in a directory, sorted, hidden files skipped."""
    with os.scandir(path) as it:
        return sorted(
            e.name
            for e in it
            if e.is_file()
            and not e.name.startswith(".")
            and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )


def imagefolder_items(
    image_dir: str | os.PathLike, folders: Sequence[str], classnames: Sequence[str]
) -> list[Item]:
    """Items of an image folder whose class folder `folders[k]` has label k."""
    items: list[Item] = []
    for label, folder in enumerate(folders):
        d = Path(image_dir, folder)
        if not d.is_dir():
            raise FileNotFoundError(f"class folder {d} is missing")
        items.extend((f"{folder}/{name}", label, classnames[label]) for name in list_images(d))
    return items


# --------------------------------------------------------------------------------------------------
# Split files


def read_json(path: str | os.PathLike, name: str | None = None) -> Any:
    """Parse a JSON file; invalid JSON is a `MalformedDataError` naming the file and dataset `name`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise malformed(path, f"is not valid JSON ({err})", regenerate_fix(name)) from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a split file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_split_json(
    path: str | os.PathLike, name: str | None = None, required: Sequence[str] = SPLITS
) -> dict[str, list[Item]]:
    """Read a CoOp-schema split file into `{split: [(relpath, label, classname), ...]}`.

    A file that is not JSON, not an object, lacks one of `required` (train, val, test) or holds an
    entry that is not `[relpath, label, classname]` raises `MalformedDataError` naming the file, the
    problem and the command that regenerates it (`name` is the dataset).
    """
    raw = read_json(path, name)
    fix = regenerate_fix(name)
    if not isinstance(raw, dict):
        raise malformed(path, f"holds a JSON {type(raw).__name__}, not a split object", fix)
    missing = [k for k in required if k not in raw]
    if missing:
        found = ", ".join(sorted(map(str, raw))) or "nothing"
        raise malformed(path, f"has no {'/'.join(missing)} split (found: {found})", fix)
    out: dict[str, list[Item]] = {}
    for k, v in raw.items():
        if not isinstance(v, list):
            raise malformed(path, f"split {k!r} is a {type(v).__name__}, not a list", fix)
        items: list[Item] = []
        for i, it in enumerate(v):
            ok = isinstance(it, (list, tuple)) and len(it) == 3
            ok = ok and isinstance(it[0], str) and isinstance(it[1], int)
            if not ok or isinstance(it[1], bool) or it[1] < 0:
                raise malformed(
                    path,
                    f"entry {i} of split {k!r} is {json.dumps(it)[:80]}, not "
                    "[relpath, label >= 0, classname]",
                    fix,
                )
            items.append((it[0], it[1], str(it[2])))
        out[k] = items
    if not any(out.values()):
        raise malformed(path, "has no items in any split", fix)
    return out


def write_split_json(path: str | os.PathLike, splits: Mapping[str, Sequence[Item]]) -> None:
    write_json(path, {k: [list(it) for it in v] for k, v in splits.items()})


def split_by_class(
    items: Sequence[Item], fractions: Sequence[float], rng: random.Random
) -> list[list[Item]]:
    """Split every class, shuffled by `rng`, into parts of round(n * f) items; the last part gets the rest.

    Classes are visited in label order, so the result depends only on (items, fractions, rng state).
    This is CoOp's `read_and_split_data` (fractions 0.5, 0.2 -> train/val/test) and `split_trainval`
    (fraction 0.8 -> train/val) recipe, with a local RNG instead of the global one.
    """
    by_label: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        by_label[it[1]].append(it)
    parts: list[list[Item]] = [[] for _ in range(len(fractions) + 1)]
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        start = 0
        for k, frac in enumerate(fractions):
            n = round(len(group) * frac)
            parts[k].extend(group[start : start + n])
            start += n
        parts[-1].extend(group[start:])
    return parts


def fixed_split(
    path: str | os.PathLike,
    make: Callable[[], Mapping[str, Sequence[Item]]],
    name: str | None = None,
) -> dict[str, list[Item]]:
    """The split stored at `path`; on first use it is built by `make()` and written there.

    If the folder is read-only the split is kept in memory (and rebuilt identically next time, since
    `make` is seeded) and a warning says so.
    """
    path = Path(path)
    if path.is_file():
        return read_split_json(path, name, required=())
    splits = {k: list(v) for k, v in make().items()}
    try:
        write_split_json(path, splits)
        log.info("wrote fixed split %s (%s)", path, {k: len(v) for k, v in splits.items()})
    except OSError as err:
        log.warning("could not write %s (%s); using the split from memory", path, err)
    return splits


def resolve_base(candidates: Sequence[Path], relpath: str) -> Path:
    """The first directory in `candidates` under which `relpath` exists (the first one if none does)."""
    for base in candidates:
        if (base / relpath).exists():
            return base
    return candidates[0]


# --------------------------------------------------------------------------------------------------
# Saved Hugging Face datasets


_IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")


class HFImageLoader:
    """Picklable `index -> PIL RGB` loader over a saved HF dataset's image column (decoded lazily)."""

    def __init__(self, path: str | os.PathLike, column: str) -> None:
        self.path, self.column = str(path), column
        self._ds = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "column": self.column, "_ds": None}

    def _dataset(self):  # noqa: ANN202 - datasets.Dataset
        if self._ds is None:
            import datasets

            ds = datasets.load_from_disk(self.path)
            if isinstance(ds.features[self.column], datasets.Image):
                ds = ds.cast_column(self.column, datasets.Image(decode=False))
            self._ds = ds.select_columns([self.column])
        return self._ds

    def __call__(self, i: int) -> Image.Image:
        value = self._dataset()[int(i)][self.column]
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            src = io.BytesIO(data) if data else path
        elif isinstance(value, (bytes, bytearray)):
            src = io.BytesIO(value)
        else:
            src = value
        with Image.open(src) as im:
            return im.convert("RGB")


def hf_split(
    path: str | os.PathLike,
    label_column: str = "label",
    image_column: str | None = None,
    group_column: str | None = None,
) -> ImageSplit:
    """An `ImageSplit` over a dataset saved with `save_to_disk`; labels are read without decoding."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if image_column is None:
        found = [c for c in _IMAGE_COLUMNS if c in ds.column_names]
        if not found:
            raise ValueError(f"{path}: no image column among {ds.column_names}")
        image_column = found[0]
    labels = [int(y) for y in ds[label_column]]
    groups = None if group_column is None else [int(g) for g in ds[group_column]]
    return ImageSplit(HFImageLoader(path, image_column), labels, groups)


def hf_saved(path: str | os.PathLike) -> bool:
    """Whether `path` holds a dataset written by `save_to_disk` (cheap: looks for its metadata)."""
    p = Path(path)
    return (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()


# --------------------------------------------------------------------------------------------------
# Network steps (prepare only)


def gdrive_url(file_id: str) -> str:
    """Direct download URL of a public Google Drive file (works for large files without a token)."""
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


def download(url: str, dest: str | os.PathLike, chunk: int = 1 << 20) -> Path:
    """Download `url` (http(s) or file://) to `dest` unless it is already there; atomic rename."""
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"  downloading {url}\n    -> {dest}", flush=True)
    req = urllib.request.Request(url, headers={"User-Agent": "reprolab-prepare/1.0"})
    with urllib.request.urlopen(req, timeout=60) as r, open(tmp, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0)
        done = 0
        while block := r.read(chunk):
            f.write(block)
            done += len(block)
            if total and sys.stdout.isatty():
                print(f"\r    {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB", end="", flush=True)
    if total and sys.stdout.isatty():
        print()
    with open(tmp, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) and not dest.suffix.startswith(".htm"):
        tmp.unlink()
        raise RuntimeError(
            f"{url} returned an HTML page instead of {dest.name} (login, quota or confirmation page)"
        )
    os.replace(tmp, dest)
    return dest


def extract(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract a .zip / .tar(.gz|.bz2|.xz) archive under `dest` (paths outside `dest` are refused)."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    print(f"  extracting {archive.name} -> {dest}", flush=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            root = dest.resolve()
            for name in z.namelist():
                if not (dest / name).resolve().is_relative_to(root):
                    raise ValueError(f"{archive}: unsafe member {name}")
            z.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            if hasattr(tarfile, "data_filter"):
                t.extractall(dest, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                root = dest.resolve()
                for m in t.getmembers():
                    if not (dest / m.name).resolve().is_relative_to(root):
                        raise ValueError(f"{archive}: unsafe member {m.name}")
                t.extractall(dest)
    else:
        raise ValueError(f"{archive}: not a zip or tar archive")


def hf_file(repo_id: str, filename: str, dest_dir: str | os.PathLike, revision: str | None) -> Path:
    """Download one file of a Hugging Face dataset repository into `dest_dir`."""
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(
            repo_id, filename, repo_type="dataset", revision=revision, local_dir=str(dest_dir)
        )
    )


def hf_dataset_to_disk(
    repo_id: str,
    dest: str | os.PathLike,
    split: str,
    revision: str | None = None,
    config: str | None = None,
) -> None:
    """`datasets.load_dataset(repo_id, config, split=split, revision=revision).save_to_disk(dest)`."""
    import datasets

    ds = datasets.load_dataset(repo_id, config, split=split, revision=revision)
    ds.save_to_disk(str(dest))


def remove_tree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Checks


def check_counts(
    name: str, expected: Mapping[str, int | None], found: Mapping[str, int], what: str = "images"
) -> None:
    """Raise CountMismatchError listing every split whose size differs from the expected one."""
    bad = {k: (v, found.get(k)) for k, v in expected.items() if v is not None and found.get(k) != v}
    if bad:
        detail = ", ".join(f"{k}: expected {e}, found {f}" for k, (e, f) in bad.items())
        raise CountMismatchError(f"{name}: wrong number of {what} ({detail})")


def dir_size(path: str | os.PathLike) -> int:
    """Bytes under `path` (follows no symlinks)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total
