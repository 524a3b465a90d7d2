"""The Comparative-CLIP datasets outside the CoOp suite, on tiny fixture trees in the real formats.

- caltech256: torchvision's folder layout; the split equals `torch.manual_seed(1)` +
  `random_split(80/20)` (upstream's) over torchvision's item order; non-.jpg files are skipped.
- cifar100: torchvision's python pickles, official train/test, pixels and labels as stored.
- cub: the official tarball, prepared from a file:// URL; train/test from train_test_split.txt,
  labels = sorted class-folder positions.
- places365: torchvision's small layout; val is the test set; a missing train list names the fix.
- fgvc_aircraft level=family: labels from images_family_*.txt, the 70 family names; the default
  (variant) is unchanged; a bad level fails in one line.
- class-name assets: upstream's counts and a few known positions.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reprolab.data.datasets._common import Step
from reprolab.data.spec import DataNotFoundError, get_spec, read_lines


def _jpg(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # PNG bytes under a .jpg name (PIL reads by content): the pixel value survives exactly
    Image.new("RGB", (4, 4), (value % 256, 0, 0)).save(path, format="PNG")


def test_class_name_assets_are_upstreams_lists() -> None:
    sizes = {"caltech256": 257, "cifar100": 100, "cub": 200, "places365": 365}
    for name, k in sizes.items():
        spec = get_spec(name)
        assert len(spec.classnames) == k == len(set(spec.classnames)), name
        assert spec.templates == ["a photo of a {}."]
    assert get_spec("caltech256").classnames[-1] == "clutter"  # torchvision's 257th class
    assert get_spec("cifar100").classnames[1] == "aquarium fish"  # wordified as upstream
    assert get_spec("cub").classnames[0] == "Black-footed Albatross"
    assert get_spec("places365").classnames[0] == "airfield"


# -- Caltech-256 -------------------------------------------------------------------------------


def test_caltech256_reproduces_upstreams_random_split(tmp_path: Path) -> None:
    spec = get_spec("caltech256")
    base = tmp_path / "caltech256" / "256_ObjectCategories"
    counts = [1 + (i % 3) for i in range(257)]
    for i, n in enumerate(counts):
        folder = base / f"{i + 1:03d}.{spec.classnames[i].replace(' ', '-')}"
        for k in range(1, n + 1):
            _jpg(folder / f"{i + 1:03d}_{k:04d}.jpg", i)
    (base / "198.spider" / "RENAME2").write_text("not an image")  # as in the real archive
    spec.check(tmp_path)
    train, test = spec.load(tmp_path, "train"), spec.load(tmp_path, "test")
    n = sum(counts)
    assert (len(train), len(test)) == (int(0.8 * n), n - int(0.8 * n))

    # reference: torchvision's item order and upstream's seeded random_split
    order = [(i, k) for i, c in enumerate(counts) for k in range(1, c + 1)]
    torch.manual_seed(1)
    tr_ref, te_ref = torch.utils.data.random_split(order, [int(0.8 * n), n - int(0.8 * n)])
    assert test.labels == [y for y, _ in te_ref]
    assert train.labels == [y for y, _ in tr_ref]
    y, k = te_ref[0]
    assert np.asarray(test[0]["image"])[0, 0, 0] == y and test[0]["label"] == y
    with pytest.raises(Exception, match="no validation split"):
        spec.load(tmp_path, "val")


def test_caltech256_missing_names_the_prepare_command(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="prepare_data.py caltech256"):
        get_spec("caltech256").check(tmp_path)


# -- CIFAR-100 ---------------------------------------------------------------------------------


def _cifar100(root: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    names = read_lines("osr/cifar100_classnames.txt")
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names}, f)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, n).tolist()
        with open(d / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels}, f)
        out[split] = (data, labels)
    return out


def test_cifar100_reads_the_official_pickles(tmp_path: Path) -> None:
    raw = _cifar100(tmp_path)
    spec = get_spec("cifar100")
    spec.check(tmp_path)
    for split in ("train", "test"):
        ds = spec.load(tmp_path, split)
        data, labels = raw[split]
        assert ds.labels == labels
        img = np.asarray(ds[1]["image"])
        assert img.shape == (32, 32, 3)
        assert (img[..., 0] == data[1, :1024].reshape(32, 32)).all()  # R plane first
        assert (img[..., 2] == data[1, 2048:].reshape(32, 32)).all()
    assert spec.counts(tmp_path) == {"train": 6, "test": 4}


# -- CUB-200-2011 ------------------------------------------------------------------------------


def _cub_tarball(tmp_path: Path, per_class: int = 2) -> tuple[Path, list[tuple[str, int, int]]]:
    """CUB_200_2011.tgz with 200 classes x `per_class` images; rows (path, label, is_train)."""
    src = tmp_path / "src" / "CUB_200_2011"
    folders = [f"{i + 1:03d}.Bird_{i}" for i in range(200)]
    rows, img_id = [], 1
    lines_images, lines_split = [], []
    for label, folder in enumerate(folders):
        for j in range(per_class):
            path = f"{folder}/Bird_{label}_{j:04d}_{img_id}.jpg"
            _jpg(src / "images" / path, label)
            is_train = int((img_id * 7) % 3 != 0)
            rows.append((path, label, is_train))
            lines_images.append(f"{img_id} {path}")
            lines_split.append(f"{img_id} {is_train}")
            img_id += 1
    # images.txt lists ids in a shuffled order; labels must not depend on it
    (src / "images.txt").write_text("\n".join(reversed(lines_images)) + "\n")
    (src / "train_test_split.txt").write_text("\n".join(lines_split) + "\n")
    (src / "classes.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(folders)))
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src, arcname="CUB_200_2011")
        (tmp_path / "attributes.txt").write_text("x\n")
        t.add(tmp_path / "attributes.txt", arcname="attributes.txt")
    return archive, rows


def test_cub_prepares_from_the_tarball_and_splits_by_train_test_split(tmp_path: Path) -> None:
    archive, rows = _cub_tarball(tmp_path)
    root = tmp_path / "data"
    spec = get_spec("cub")
    assert spec.steps[0].src.startswith("https://data.caltech.edu/records/65de6-vp158/")
    spec.steps = [Step("url", archive.as_uri(), "CUB_200_2011.tgz", extract=True)]
    with pytest.raises(DataNotFoundError, match="prepare_data.py cub"):
        spec.check(root)
    with pytest.raises(Exception, match="test"):  # the real counts (5,994 / 5,794) differ
        spec.prepare(root)
    spec.check(root)  # the tree is in place
    for split, flag in (("train", 1), ("test", 0)):
        ds = spec.load(root, split)
        want = sorted((p, y) for p, y, t in rows if t == flag)
        assert sorted(ds.labels) == sorted(y for _, y in want)
        items = spec.cached_splits(root)[split]
        assert sorted((p, y) for p, y, _ in items) == want
    item = spec.load(root, "test")[0]
    assert np.asarray(item["image"])[0, 0, 0] == item["label"]


# -- Places365 ---------------------------------------------------------------------------------


def test_places365_val_is_the_test_set(tmp_path: Path) -> None:
    d = tmp_path / "places365"
    labels = [0, 364, 7, 7]
    lines = []
    for i, y in enumerate(labels):
        name = f"Places365_val_{i + 1:08d}.jpg"
        _jpg(d / "val_256" / name, y)
        lines.append(f"{name} {y}")
    (d / "places365_val.txt").write_text("\n".join(lines) + "\n")
    spec = get_spec("places365")
    spec.check(tmp_path)
    test = spec.load(tmp_path, "test")
    assert test.labels == labels
    assert np.asarray(test[1]["image"])[0, 0, 0] == 364 % 256
    with pytest.raises(
        DataNotFoundError, match="places365_train_standard.txt.*prepare_data.py places365"
    ):
        spec.load(tmp_path, "train")
    # train-standard, in the folder the official tar unpacks to
    _jpg(d / "data_256" / "a" / "airfield" / "00000001.jpg", 0)
    (d / "places365_train_standard.txt").write_text("/a/airfield/00000001.jpg 0\n")
    spec = get_spec("places365")
    train = spec.load(tmp_path, "train")
    assert train.labels == [0] and train[0]["image"].size == (4, 4)


# -- FGVC-Aircraft families --------------------------------------------------------------------


def _aircraft(root: Path) -> dict[str, list[tuple[str, str, str]]]:
    d = root / "fgvc_aircraft"
    variants = read_lines("fgvc_aircraft/classnames.txt")
    families = read_lines("fgvc_aircraft/families.txt")
    (d / "variants.txt").parent.mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    (d / "families.txt").write_text("\n".join(families) + "\n")
    rows: dict[str, list[tuple[str, str, str]]] = {}
    n = 0
    for s in ("train", "val", "test"):
        rows[s] = []
        for _ in range(3):
            im = f"{1000000 + n:07d}"
            v, f = variants[(n * 37) % 100], families[(n * 11) % 70]
            _jpg(d / "images" / f"{im}.jpg", n)
            rows[s].append((im, v, f))
            n += 1
        (d / f"images_variant_{s}.txt").write_text("".join(f"{i} {v}\n" for i, v, _ in rows[s]))
        (d / f"images_family_{s}.txt").write_text("".join(f"{i} {f}\n" for i, _, f in rows[s]))
    return rows


def test_fgvc_aircraft_family_level(tmp_path: Path) -> None:
    rows = _aircraft(tmp_path)
    fam, var = get_spec("fgvc_aircraft", level="family"), get_spec("fgvc_aircraft")
    assert len(fam.classnames) == 70 and len(var.classnames) == 100
    assert fam.classnames[:3] == ["A300", "A310", "A320"] and "F/A-18" in fam.classnames
    for s in ("train", "val", "test"):
        f_ds, v_ds = fam.load(tmp_path, s), var.load(tmp_path, s)
        assert [fam.classnames[y] for y in f_ds.labels] == [f for _, _, f in rows[s]]
        assert [var.classnames[y] for y in v_ds.labels] == [v for _, v, _ in rows[s]]
    assert fam.fewshot_dir(tmp_path) != var.fewshot_dir(tmp_path)
    assert var.fewshot_dir(tmp_path).name == "split_fewshot"  # unchanged default
    (tmp_path / "fgvc_aircraft" / "families.txt").write_text("A300\n")
    with pytest.raises(Exception, match="families.txt does not match"):
        get_spec("fgvc_aircraft", level="family").load(tmp_path, "test")
    with pytest.raises(ValueError, match="level must be 'variant' or 'family'"):
        get_spec("fgvc_aircraft", level="model")


def test_the_family_data_config_composes() -> None:
    from reprolab.utils.config import compose_train

    cfg = compose_train(["data=fgvc_aircraft_family", "paths.log_dir=/tmp/unused"])
    assert (cfg.data.name, cfg.data.dataset) == ("fgvc_aircraft_family", "fgvc_aircraft")
    assert dict(cfg.data.dataset_kwargs) == {"level": "family"}
