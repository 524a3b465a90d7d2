"""The SIMAT database (Couairon et al. 2021, github.com/facebookresearch/SIMAT), read from a local
copy: the evaluation set of text-driven image transformation that the m2-mix release scores
(`main.py::SIMAT_eval`; robust_finetuning.md §4.4; the score: `reprolab.metrics.simat`).

Layout: `<data_root>/simat/` is a clone of the SIMAT repository (its `simat_db/` folder is read) or
holds the contents of `simat_db/` directly:

| file | format (as the official `eval.py` / `prepare_dataset.py` read and write it) |
|---|---|
| triplets.csv | `region_id,subj,rel,obj,dataset_id`: one row per database image (5,859); `dataset_id` (0..N-1) is the image's row in the database and in the OSCAR matrix |
| transfos.csv | an unnamed index column, then `transfo_id,region_id,field,value,target,norm,query_ids,target_ids,dataset_id,norm2,is_test`: one transformation per row (17,996; 8,933 with `is_test` False = `dev`, 9,063 True = `test`): source image `region_id`, word `value` -> word `target`, `target_ids` the column of the target triplet's caption in the OSCAR matrix, `norm2` the number of rows (both splits) with the same `value` (weight = norm2 ** -0.5). Its own `dataset_id` column is not the database row and is not used (eval.py maps `region_id` through triplets.csv) |
| oscar_similarity_matrix.pt | a `torch.save`d (images x captions) tensor: OSCAR's similarity of database image `dataset_id` to caption `target_ids` (the captions are the lines of captions.txt, one per distinct triplet) |
| images/images/<region_id>.png | the database images: Visual Genome crops made by the repo's `prepare_dataset.py` (`images/<region_id>.png` is accepted too) |

Splits: `dev` (`is_test` False, what the m2-mix release evaluates) and `test` (`is_test` True).
The images are not in the repository: `prepare_dataset.py --path=<Visual Genome images>/` (a
string prefix: keep the trailing slash; the README's `--VG_PATH` is not the script's flag) crops them
from Visual Genome into simat_db/images/images/. Loading opens no image; it lists the image folder
once and names missing images.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reprolab.data.datasets.captions import MissingImagesError
from reprolab.data.sources import pil_rgb
from reprolab.data.spec import DataNotFoundError, malformed
from reprolab.errors import ConfigValueError

SIMAT_REPO = "https://github.com/facebookresearch/SIMAT"
SPLITS = ("dev", "test")
FILES = ("transfos.csv", "triplets.csv", "oscar_similarity_matrix.pt")
IMAGE_DIRS = ("images/images", "images")
SHOWN = 5  # missing images named in a message
_FIX = f"restore it from {SIMAT_REPO} (simat_db/)"
_CROP = "`python prepare_dataset.py --path=<Visual Genome images>/`"


@dataclass(frozen=True)
class SimatData:
    """One split of SIMAT: the database images and the transformations on them.

    Transformations are columns of equal length T: `source` (database row of the image to
    transform), `value` / `target` (indices into `words`: the word replaced, the word put in its
    place), `target_caption` (column of `oscar`), `norm2` (float64; weight = norm2 ** -0.5),
    `transfo_ids` (the table's `transfo_id`).
    """

    root: Path  # the simat_db folder
    split: str
    region_ids: tuple[int, ...]  # database images, by dataset_id
    image_paths: tuple[Path, ...]
    words: tuple[str, ...]
    source: Tensor
    value: Tensor
    target: Tensor
    target_caption: Tensor
    norm2: Tensor
    transfo_ids: tuple[int, ...]
    oscar: Tensor  # (images, captions), float32

    def __len__(self) -> int:
        return len(self.transfo_ids)

    def score_inputs(self) -> dict[str, Any]:
        """The transformation table and OSCAR matrix as `reprolab.metrics.simat.simat_score`
        keyword arguments."""
        return {
            "source": self.source,
            "value": self.value,
            "target": self.target,
            "target_caption": self.target_caption,
            "norm2": self.norm2,
            "oscar": self.oscar,
        }


class SimatImages(torch.utils.data.Dataset):
    """The database images in database order: item i is `(transform(image i), i)`."""

    def __init__(self, paths: tuple[Path, ...] | list[Path], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(pil_rgb(self.paths[i])), i


def simat_db(data_root: str | os.PathLike) -> Path:
    """The folder holding SIMAT's files: `<data_root>/simat/simat_db` (a clone of the repo) when it
    exists, else `<data_root>/simat`."""
    top = Path(data_root) / "simat"
    return top / "simat_db" if (top / "simat_db").is_dir() else top


def check_simat(data_root: str | os.PathLike) -> Path:
    """The simat_db folder; `DataNotFoundError` (one line, how to get it) if a file is missing."""
    db = simat_db(data_root)
    gone = [f for f in FILES if not (db / f).is_file()]
    image_dir = _image_dir(db)
    if image_dir is None:
        gone.append("images/images/")
    if gone:
        top = Path(data_root) / "simat"
        where = f"{db} lacks {', '.join(gone)}" if top.is_dir() else f"{top} does not exist"
        raise DataNotFoundError(
            f"SIMAT not found under {data_root} ({where}). Clone {SIMAT_REPO} into {top} and, in "
            f"it, crop the database images from Visual Genome with {_CROP}."
        )
    return db


def _image_dir(db: Path) -> Path | None:
    return next((db / d for d in IMAGE_DIRS if any((db / d).glob("*.png"))), None)


def _rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            missing = [c for c in required if c not in cols]
            if missing:
                found = ", ".join(c or "''" for c in cols) or "none"
                raise malformed(path, f"has no column {'/'.join(missing)} (found: {found})", _FIX)
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise malformed(path, f"is not a readable CSV ({err})", _FIX) from None


def _int(path: Path, i: int, col: str, value: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise malformed(path, f"row {i + 1}: {col} {value!r} is not an integer", _FIX) from None


def _bool(path: Path, i: int, value: str) -> bool:
    v = (value or "").strip().lower()
    if v not in ("true", "false", "1", "0"):
        raise malformed(path, f"row {i + 1}: is_test {value!r} is not True/False", _FIX)
    return v in ("true", "1")


def load_simat(data_root: str | os.PathLike, split: str = "dev") -> SimatData:
    """Read `<data_root>/simat/` (module docstring) for `split` (`dev`: `is_test` False, the m2-mix
    release's choice; `test`: True). Opens no image."""
    if split not in SPLITS:
        raise ConfigValueError(f"SIMAT split must be one of {list(SPLITS)}, got {split!r}.")
    db = check_simat(data_root)

    # database: triplets.csv, one row per image, dataset_id = its row
    tpath = db / "triplets.csv"
    by_row: dict[int, int] = {}
    for i, r in enumerate(_rows(tpath, ("region_id", "dataset_id"))):
        rid, did = (
            _int(tpath, i, "region_id", r["region_id"]),
            _int(tpath, i, "dataset_id", r["dataset_id"]),
        )
        if did in by_row:
            raise malformed(tpath, f"row {i + 1}: dataset_id {did} is repeated", _FIX)
        by_row[did] = rid
    n = len(by_row)
    if n < 2 or sorted(by_row) != list(range(n)):
        raise malformed(tpath, f"dataset_id is not 0..{n - 1} over its {n} rows", _FIX)
    region_ids = tuple(by_row[d] for d in range(n))
    row_of = {rid: d for d, rid in enumerate(region_ids)}
    if len(row_of) != n:
        raise malformed(tpath, "a region_id is repeated", _FIX)

    # images: one listing of the image folder
    image_dir = _image_dir(db)
    assert image_dir is not None  # check_simat
    with os.scandir(image_dir) as it:
        present = {e.name for e in it}
    gone = [f"{rid}.png" for rid in region_ids if f"{rid}.png" not in present]
    if gone:
        shown = ", ".join(gone[:SHOWN]) + (", ..." if len(gone) > SHOWN else "")
        where = f" in {db.parent}" if db.name == "simat_db" else " (in the SIMAT repository)"
        raise MissingImagesError(
            f"{tpath}: {len(gone):,} of its {n:,} images are missing under {image_dir} ({shown}); "
            f"crop them from Visual Genome with {_CROP}{where}."
        )

    # transformations of the split
    xpath = db / "transfos.csv"
    cols = ("region_id", "value", "target", "target_ids", "norm2", "is_test")
    fields: dict[str, list[Any]] = {k: [] for k in ("src", "a", "b", "cap", "n2", "id")}
    for i, r in enumerate(_rows(xpath, cols)):
        if _bool(xpath, i, r["is_test"]) != (split == "test"):
            continue
        rid = _int(xpath, i, "region_id", r["region_id"])
        if rid not in row_of:
            raise malformed(xpath, f"row {i + 1}: region_id {rid} is not in triplets.csv", _FIX)
        try:
            n2 = float(r["norm2"])
        except ValueError:
            n2 = float("nan")
        if not n2 > 0:
            raise malformed(xpath, f"row {i + 1}: norm2 {r['norm2']!r} is not positive", _FIX)
        if not r["value"] or not r["target"]:
            raise malformed(xpath, f"row {i + 1}: empty value or target word", _FIX)
        fields["src"].append(row_of[rid])
        fields["a"].append(r["value"])
        fields["b"].append(r["target"])
        fields["cap"].append(_int(xpath, i, "target_ids", r["target_ids"]))
        fields["n2"].append(n2)
        tid = r.get("transfo_id")
        fields["id"].append(_int(xpath, i, "transfo_id", tid) if tid else i)
    if not fields["src"]:
        raise malformed(xpath, f"has no {split} transformation (is_test {split == 'test'})", _FIX)

    # OSCAR similarities: (images, captions)
    opath = db / "oscar_similarity_matrix.pt"
    try:
        oscar = torch.load(opath, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise malformed(
            opath, f"cannot be read by torch.load ({type(err).__name__})", _FIX
        ) from None
    if not isinstance(oscar, Tensor) or oscar.dim() != 2:
        what = tuple(oscar.shape) if isinstance(oscar, Tensor) else type(oscar).__name__
        raise malformed(opath, f"holds {what}, not an (images, captions) tensor", _FIX)
    if oscar.shape[0] != n or max(fields["cap"]) >= oscar.shape[1] or min(fields["cap"]) < 0:
        raise malformed(
            opath,
            f"is {tuple(oscar.shape)}: needs {n} rows (triplets.csv) and a column for every "
            f"target_ids of transfos.csv (0..{max(fields['cap'])})",
            _FIX,
        )

    words = tuple(sorted(set(fields["a"]) | set(fields["b"])))
    widx = {w: k for k, w in enumerate(words)}
    return SimatData(
        root=db,
        split=split,
        region_ids=region_ids,
        image_paths=tuple(image_dir / f"{rid}.png" for rid in region_ids),
        words=words,
        source=torch.tensor(fields["src"], dtype=torch.long),
        value=torch.tensor([widx[w] for w in fields["a"]], dtype=torch.long),
        target=torch.tensor([widx[w] for w in fields["b"]], dtype=torch.long),
        target_caption=torch.tensor(fields["cap"], dtype=torch.long),
        norm2=torch.tensor(fields["n2"], dtype=torch.float64),
        transfo_ids=tuple(fields["id"]),
        oscar=oscar.float(),
    )
