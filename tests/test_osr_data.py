"""Open-set OOD data of MixDiff (reprolab.data.datasets.osr): the fixed class splits, the on-disk
formats on miniature trees (no network), preparation, and the synthetic shapes_osr world.

The split lists are checked against copies typed here from the upstream files (`hy18284/mixdiff` @
f64f2d0: mixup/ood_datamodules/cifar10_ood.py, dataloaders/ZO_Clip_loaders.py), independent of the
asset files the specs read. Trees: torchvision's CIFAR "python version" pickles (each pixel encodes
the image's original class, so relabelling is checked on the pixels) and Tiny ImageNet's official zip
tree and ZOC's reorganised one.
"""

from __future__ import annotations

import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reprolab.data import sources
from reprolab.data import synthetic as world
from reprolab.data.datasets import osr
from reprolab.data.datasets.synthetic import ShapesSpec
from reprolab.data.sources import CountMismatchError
from reprolab.data.spec import DataNotFoundError, MalformedDataError, get_spec

ROOT = Path(__file__).resolve().parents[1]

# ---- upstream lists, typed from the MixDiff / ZOC sources (not read from the assets)
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MIXDIFF_CIFAR10_SPLITS = [  # mixup/ood_datamodules/cifar10_ood.py, first 6 known
    ["airplane", "automobile", "bird", "deer", "dog", "truck", "cat", "frog", "horse", "ship"],
    ["airplane", "cat", "dog", "horse", "ship", "truck", "automobile", "bird", "deer", "frog"],
    ["airplane", "automobile", "dog", "frog", "horse", "ship", "bird", "cat", "deer", "truck"],
    ["cat", "deer", "dog", "horse", "ship", "truck", "airplane", "automobile", "bird", "frog"],
    ["airplane", "automobile", "bird", "cat", "horse", "ship", "deer", "dog", "frog", "truck"],
]
ZOC_PLUS10 = [  # ZO_Clip_loaders.cifarplus_loader out_dict['plus10-1'..'plus10-5']
    [43, 36, 24, 18, 80, 98, 30, 93, 78, 3],
    [74, 91, 98, 79, 50, 66, 24, 26, 6, 42],
    [79, 63, 36, 4, 29, 55, 75, 46, 72, 38],
    [95, 93, 26, 43, 36, 27, 18, 30, 64, 32],
    [88, 18, 19, 24, 65, 50, 4, 93, 35, 46],
]
ZOC_PLUS50 = [4, 30, 55, 72, 95, 1, 32, 67, 73, 91, 6, 7, 14, 18, 24, 3, 42, 43, 88, 97, 15, 19, 21]
ZOC_PLUS50 += [31, 38, 34, 63, 64, 66, 75, 26, 45, 77, 79, 99, 2, 11, 35, 46, 98, 27, 29, 44, 78]
ZOC_PLUS50 += [93, 36, 50, 65, 74, 80]
CAC_TINY = [  # ZO_Clip_loaders.tinyimage_semantic_spit_generator
    [192, 112, 145, 107, 91, 180, 144, 193, 10, 125, 186, 28, 72, 124, 54, 77, 157, 169, 104, 166],
    [156, 157, 167, 175, 153, 11, 147, 0, 199, 171, 132, 60, 87, 190, 101, 111, 193, 71, 131, 192],
    [28, 15, 103, 33, 90, 167, 61, 13, 124, 159, 49, 12, 54, 78, 82, 107, 80, 25, 140, 46],
    [128, 132, 123, 72, 154, 35, 86, 10, 188, 28, 85, 89, 91, 82, 116, 65, 96, 41, 134, 25],
    [102, 79, 47, 106, 59, 93, 145, 10, 62, 175, 76, 183, 48, 130, 38, 186, 44, 8, 29, 26],
]
# CIFAR-100's animal superclasses (ZOC's superclass_list): what CIFAR+N draws its unknowns from.
CIFAR100_ANIMALS = """beaver dolphin otter seal whale aquarium_fish flatfish ray shark trout bee beetle
butterfly caterpillar cockroach bear leopard lion tiger wolf camel cattle chimpanzee elephant kangaroo
fox porcupine possum raccoon skunk crab lobster snail spider worm baby boy girl man woman crocodile
dinosaur lizard snake turtle hamster mouse rabbit shrew squirrel""".split()

BENCHMARKS = {  # name: (splits, known, unknown, train, test, ood)
    "cifar10_osr": (5, 6, 4, 30000, 6000, 4000),
    "cifar_plus10": (5, 4, 10, 20000, 4000, 1000),
    "cifar_plus50": (1, 4, 50, 20000, 4000, 5000),
    "cifar100_osr": (5, 20, 80, 10000, 2000, 8000),
    "tinyimagenet_osr": (5, 20, 180, 10000, 1000, 9000),
}


# ------------------------------------------------------------------------------------------------
# Fixture trees in the real formats


def _cifar_batch(labels: list[int], label_key: str, tag: int) -> dict:
    """A CIFAR pickle dict whose image k has R = its label, G = k, B = `tag` everywhere."""
    n = len(labels)
    planes = np.zeros((n, 3, 32, 32), np.uint8)
    planes[:, 0] = np.asarray(labels, np.uint8)[:, None, None]
    planes[:, 1] = (np.arange(n) % 256).astype(np.uint8)[:, None, None]
    planes[:, 2] = tag
    return {"data": planes.reshape(n, 3072), label_key: list(labels), "filenames": []}


def write_cifar(root: Path, which: str, train_per_class: int = 3, test_per_class: int = 2) -> None:
    """torchvision's python-version folder of `which` with a few images per class."""
    folder, train_files, test_files, key, meta_file, names_key = osr._CIFAR[which]
    k = 10 if which == "cifar10" else 100
    names = CIFAR10 if which == "cifar10" else osr.cifar_classnames("cifar100")
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    train = [i % k for i in range(k * train_per_class)]  # interleaved classes, as the real files
    chunks = np.array_split(np.asarray(train), len(train_files))
    for file, chunk in zip(train_files, chunks, strict=True):
        with open(d / file, "wb") as f:
            pickle.dump(_cifar_batch(chunk.tolist(), key, 1), f)
    with open(d / test_files[0], "wb") as f:
        pickle.dump(_cifar_batch([i % k for i in range(k * test_per_class)], key, 2), f)
    with open(d / meta_file, "wb") as f:
        pickle.dump({names_key: list(names)}, f)


def _jpeg(path: Path, value: int) -> None:
    """An 8x8 image named *.JPEG, stored losslessly (PNG bytes) so its pixels encode `value`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value % 256, value // 256, 9)).save(path, "PNG")


def write_tiny(root: Path, layout: str = "official") -> Path:
    """One train and one val image per Tiny ImageNet class; pixel (R, G) = the class index."""
    d = root / osr.TINY_DIR
    wnids = [w for w, _ in osr.tinyimagenet_classes()]
    rows = []
    for idx, w in enumerate(wnids):
        if layout == "official":
            _jpeg(d / "train" / w / "images" / f"{w}_0.JPEG", idx)
            (d / "train" / w / f"{w}_boxes.txt").write_text("x\n")
            _jpeg(d / "val" / "images" / f"val_{idx}.JPEG", idx)
            rows.append(f"val_{idx}.JPEG\t{w}\t0\t0\t7\t7")
        else:  # ZOC's tinyimagenet.sh
            _jpeg(d / "train" / w / f"{w}_0.JPEG", idx)
            _jpeg(d / "val" / w / f"val_{idx}.JPEG", idx)
    if layout == "official":
        (d / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return d


def _pixel(item: dict) -> tuple[int, int, int]:
    return item["image"].convert("RGB").getpixel((0, 0))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    return root


# ------------------------------------------------------------------------------------------------
# The fixed class splits


def test_cifar10_splits_are_mixdiffs():
    for s, upstream in enumerate(MIXDIFF_CIFAR10_SPLITS):
        spec = get_spec("cifar10_osr", split=s)
        assert spec.classnames == upstream[:6] and spec.ood_classnames == upstream[6:], s
        assert spec.known_ids == [CIFAR10.index(c) for c in upstream[:6]]
    assert osr.cifar_classnames("cifar10") == CIFAR10


def test_cifar_plus_splits_are_zocs():
    c100 = osr.cifar_classnames("cifar100")
    assert (c100[0], c100[1], c100[43], c100[98], c100[99]) == (
        "apple",
        "aquarium_fish",
        "lion",
        "woman",
        "worm",
    )
    assert c100 == sorted(c100) and len(set(c100)) == 100  # CIFAR-100 fine labels are alphabetical
    for s, ids in enumerate(ZOC_PLUS10):
        spec = get_spec("cifar_plus10", split=s)
        assert spec.unknown_ids == ids and spec.ood_classnames == [c100[i] for i in ids]
    plus50 = get_spec("cifar_plus50")
    assert plus50.unknown_ids == ZOC_PLUS50
    assert sorted(plus50.ood_classnames) == sorted(CIFAR100_ANIMALS)  # the 10 animal superclasses
    for name in ("cifar_plus10", "cifar_plus50"):
        spec = get_spec(name)
        assert spec.classnames == ["airplane", "automobile", "ship", "truck"]
        assert spec.known_ids == [0, 1, 8, 9]  # ZOC's in_list
        assert set(spec.ood_classnames) <= set(CIFAR100_ANIMALS)


def test_cifar100_and_tinyimagenet_splits():
    c100 = osr.cifar_classnames("cifar100")
    for s in range(5):
        spec = get_spec("cifar100_osr", split=s)
        assert spec.known_ids == list(range(20 * s, 20 * s + 20))
        assert spec.classnames == c100[20 * s : 20 * s + 20]
        tiny = get_spec("tinyimagenet_osr", split=s)
        wnids = sorted(w for w, _ in osr.tinyimagenet_classes())
        assert tiny.known_wnids == [wnids[i] for i in CAC_TINY[s]]  # ImageFolder indices
    classes = dict(osr.tinyimagenet_classes())
    assert len(classes) == 200 and classes["n01443537"] == "goldfish"
    assert classes["n03255030"] == "dumbbell"  # imagenet_id_to_label.txt ("dumbbel" elsewhere)
    assert get_spec("tinyimagenet_osr", split=0).classnames[:4] == [
        "potpie",
        "kimono",
        "school_bus",
        "go-kart",
    ]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_split_sizes_disjointness_and_roles(name):
    n_splits, k, u, train, test, ood = BENCHMARKS[name]
    universe = {"cifar10_osr": 10, "cifar100_osr": 100, "tinyimagenet_osr": 200}.get(name)
    for s in range(n_splits):
        spec = get_spec(name, split=s)
        assert (len(spec.classnames), len(spec.ood_classnames)) == (k, u)
        assert not set(spec.classnames) & set(spec.ood_classnames)
        if universe:  # every class is known or unknown
            assert len(set(spec.classnames) | set(spec.ood_classnames)) == universe
        assert spec.test_roles() == {"test": "id", "ood": "ood"}
        assert spec.expected == {"train": train, "test": test, "ood": ood}
        assert spec.templates == ["This is a photo of a {}"]  # upstream's prompt
    with pytest.raises(ValueError, match=r"data.dataset_kwargs.split"):
        get_spec(name, split=n_splits)


def test_every_cifar10_class_is_unknown_in_some_split():
    unknown = {c for s in range(5) for c in get_spec("cifar10_osr", split=s).ood_classnames}
    assert unknown == set(CIFAR10)


# ------------------------------------------------------------------------------------------------
# Loading the on-disk formats


def test_cifar10_split_loads_relabelled_from_the_pickles(cifar_root):
    spec = get_spec("cifar10_osr", split=3)
    known, unknown = MIXDIFF_CIFAR10_SPLITS[3][:6], MIXDIFF_CIFAR10_SPLITS[3][6:]
    train, test, ood = (spec.load(cifar_root, s) for s in ("train", "test", "ood"))
    assert (len(train), len(test), len(ood)) == (6 * 3, 6 * 2, 4 * 2)
    for split, names, offset, tag in (
        (train, known, 0, 1),
        (test, known, 0, 2),
        (ood, unknown, 6, 2),
    ):
        for i in range(len(split)):
            item = split[i]
            r, _, b = _pixel(item)
            assert (
                CIFAR10[r] == names[item["label"] - offset] and b == tag
            )  # right image, right label
            assert item["image"].size == (32, 32) and item["image"].mode == "RGB"
    assert sorted(set(ood.labels)) == [6, 7, 8, 9]
    with pytest.raises(CountMismatchError, match="expected 30000"):
        spec.verify(cifar_root)  # the miniature tree is not the real size


def test_cifar_plus_reads_both_cifars(cifar_root):
    spec = get_spec("cifar_plus10", split=1)
    ood = spec.load(cifar_root, "ood")
    c100 = osr.cifar_classnames("cifar100")
    for i in range(len(ood)):
        r, _, _ = _pixel(ood[i])
        assert c100[r] == spec.ood_classnames[ood[i]["label"] - 4]
    assert len(ood) == 10 * 2 and len(spec.load(cifar_root, "test")) == 4 * 2
    spec.expected = {"train": 12, "test": 8, "ood": 20}
    assert spec.verify(cifar_root) == {"train": 12, "test": 8, "ood": 20}


def test_cifar100_osr_and_the_data_module(cifar_root):
    from reprolab.data.datamodule import ClassificationDataModule
    from reprolab.data.transforms import Preprocess

    dm = ClassificationDataModule(
        name="cifar100_osr",
        dataset="cifar100_osr",
        root=str(cifar_root),
        dataset_kwargs={"split": 2},
        num_shots=None,
        train_augment=False,
        val=False,
        eval_batch_size=16,
    )
    info = dm.info
    assert [(t.name, t.role) for t in info.test_sets] == [("test", "id"), ("ood", "ood")]
    assert list(info.classnames) == osr.cifar_classnames("cifar100")[40:60]
    dm.configure(preprocess=Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    dm.setup("test")
    test, ood = dm.test_dataloader()
    batch = next(iter(ood))
    assert batch["image"].shape == (16, 3, 32, 32) and bool((batch["label"] >= 20).all())
    assert len(test.dataset) == 20 * 2 and len(ood.dataset) == 80 * 2
    assert (
        len(dm.train_dataloader().dataset) == 20 * 3
    )  # all ID train images (MixDiff's oracle pool)


def test_malformed_meta_and_missing_data_fail_in_one_line(tmp_path):
    with pytest.raises(DataNotFoundError, match="python scripts/prepare_data.py cifar10_osr"):
        get_spec("cifar10_osr").load(tmp_path, "test")
    write_cifar(tmp_path, "cifar10")
    meta = tmp_path / osr.CIFAR10_DIR / "batches.meta"
    with open(meta, "wb") as f:
        pickle.dump({"label_names": list(reversed(CIFAR10))}, f)
    with pytest.raises(
        MalformedDataError, match="batches.meta.*differ.*prepare_data.py cifar10_osr"
    ):
        get_spec("cifar10_osr").load(tmp_path, "test")
    (tmp_path / osr.CIFAR10_DIR / "test_batch").write_bytes(b"not a pickle")
    meta.unlink()
    with pytest.raises(DataNotFoundError, match="batches.meta"):
        get_spec("cifar10_osr").check(tmp_path)


@pytest.mark.parametrize("layout", ["official", "zoc"])
def test_tinyimagenet_tree_layouts(tmp_path, layout):
    write_tiny(tmp_path, layout)
    spec = get_spec("tinyimagenet_osr", split=4)
    index = {w: i for i, (w, _) in enumerate(osr.tinyimagenet_classes())}
    train, test, ood = (spec.load(tmp_path, s) for s in ("train", "test", "ood"))
    assert (len(train), len(test), len(ood)) == (20, 20, 180)
    for split, wnids, offset in ((train, spec.known_wnids, 0), (ood, spec.unknown_wnids, 20)):
        for i in (0, len(split) - 1):
            r, g, _ = _pixel(split[i])
            assert r + 256 * g == index[wnids[split[i]["label"] - offset]]
    assert [index[w] for w in spec.known_wnids] == CAC_TINY[4]
    spec.expected = {"train": 20, "test": 20, "ood": 180}
    assert spec.verify(tmp_path) == spec.expected


# ------------------------------------------------------------------------------------------------
# Preparation (the one command) on fixtures


def test_prepare_data_resolves_each_config_to_its_spec():
    sys.path.insert(0, str(ROOT / "scripts"))
    import prepare_data

    for name in BENCHMARKS:
        dataset, kwargs = prepare_data.resolve(name)
        assert (dataset, kwargs) == (name, {"split": 0})
        assert isinstance(prepare_data.spec_for(name), osr.OpenSetSpec)


def test_cifar_prepare_downloads_once_then_verifies(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_download(root: Path, which: str) -> None:  # torchvision's download, offline
        calls.append(which)
        write_cifar(root, which)

    monkeypatch.setattr(osr, "download_cifar", fake_download)
    spec = get_spec("cifar_plus50")
    spec.expected = {"train": 12, "test": 8, "ood": 100}
    root = tmp_path / "data"
    spec.prepare(root)
    assert calls == ["cifar10", "cifar100"]
    assert "cifar_plus50: ready" in capsys.readouterr().out
    spec.prepare(root)  # idempotent: the tree is there
    assert calls == ["cifar10", "cifar100"]
    other = get_spec("cifar10_osr", split=2)  # shares the CIFAR-10 folder
    other.expected = {"train": 18, "test": 12, "ood": 8}
    other.prepare(root)
    assert calls == ["cifar10", "cifar100"]


def test_cifar_prepare_failure_prints_the_manual_steps(tmp_path, monkeypatch):
    def offline(root: Path, which: str) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(osr, "download_cifar", offline)
    with pytest.raises(DataNotFoundError, match=r"(?s)automatic preparation failed.*CIFAR100\("):
        get_spec("cifar100_osr").prepare(tmp_path)


def test_tinyimagenet_prepare_from_the_official_zip(tmp_path, monkeypatch):
    src = write_tiny(tmp_path / "src")
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(src.rglob("*")):
            z.write(p, p.relative_to(src.parent).as_posix())
    urls = []

    def fake_download(url: str, dest: str | Path, chunk: int = 0) -> Path:
        urls.append(url)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(archive, dest)
        return Path(dest)

    monkeypatch.setattr(sources, "download", fake_download)
    spec = get_spec("tinyimagenet_osr", split=1)
    spec.expected = {"train": 20, "test": 20, "ood": 180}
    root = tmp_path / "data"
    spec.prepare(root)
    assert urls == [osr.TINY_URL]
    assert (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").is_file()
    assert len(spec.load(root, "ood")) == 180


# ------------------------------------------------------------------------------------------------
# shapes_osr: the miniature's ID / OOD world


def test_shapes_osr_roles_sizes_and_held_out_shapes():
    spec = get_spec("shapes_osr", test_size=30)
    assert spec.classnames == ["circle", "square", "triangle", "star", "cross"]
    assert spec.ood_classnames == ["ring", "diamond", "hexagon", "heart", "crescent", "digit"]
    assert spec.test_roles() == {"test": "id", "ood_far": "ood", "ood_near": "ood"}
    test, far, near = (spec.load(None, s) for s in ("test", "ood_far", "ood_near"))
    assert len(test) == len(far) == len(near) == 30
    assert set(test.labels) == set(range(5)) and set(near.labels) == set(range(5, 10))
    assert set(far.labels) == {10}
    assert len(get_spec("shapes_osr").load(None, "test")) == 400  # the prototype
    assert not np.array_equal(np.asarray(test[0]["image"]), np.asarray(near[0]["image"]))
    # ood_far is ShapesSpec's digit rendering (same name, seed and split code)
    ref = ShapesSpec._ood_digits(spec, 30, np.zeros(30, np.int64))
    assert np.array_equal(np.asarray(far[3]["image"]), np.asarray(ref[3]["image"]))
    other = get_spec("shapes_osr", id_shapes=["ring", "heart"], test_size=10)
    assert "circle" in other.ood_classnames and set(other.load(None, "ood_near").labels) <= set(
        range(2, 10)
    )
    with pytest.raises(ValueError, match="id_shapes"):
        get_spec("shapes_osr", id_shapes=["circle", "blob"])
    with pytest.raises(ValueError, match="id_shapes"):
        get_spec("shapes_osr", id_shapes=list(world.SHAPES))


def test_shapes_osr_near_images_show_the_held_out_shapes():
    """Independent check of the rendering: tiny_clip, 10-way over every shape name, reads the
    near-OOD images as their held-out shape and the ID images as their ID shape."""
    from hydra.utils import instantiate

    from reprolab.data.transforms import build_transforms
    from reprolab.utils.config import compose_train

    spec = get_spec("shapes_osr", test_size=40)
    model = instantiate(compose_train(["model=tiny_clip"]).model).eval()
    tf = build_transforms(model.preprocess, False, False)
    names = list(world.SHAPES)
    head = model.zeroshot_weights(names, ["a photo of a {}."])
    for split, classnames in (("ood_near", spec.ood_classnames), ("test", spec.classnames)):
        data = spec.load(None, split)
        offset = 5 if split == "ood_near" else 0
        x = torch.stack([tf(data[i]["image"]) for i in range(len(data))])
        with torch.inference_mode():
            pred = model.logits(x, head).argmax(-1).tolist()
        truth = [names.index(classnames[y - offset]) for y in data.labels]
        acc = np.mean([p == t for p, t in zip(pred, truth, strict=True)])
        assert acc >= 0.8, (split, acc)


def test_shapes_osr_clutter_lines_id_and_near_only():
    plain = get_spec("shapes_osr", test_size=5)
    lined = get_spec("shapes_osr", test_size=5, clutter=[3, 3])
    for split in ("test", "ood_near"):
        a, b = (np.asarray(s.load(None, split)[0]["image"]) for s in (plain, lined))
        assert not np.array_equal(a, b), split
    a, b = (np.asarray(s.load(None, "ood_far")[0]["image"]) for s in (plain, lined))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="clutter"):
        get_spec("shapes_osr", clutter=[3, 1])


def test_shapes_osr_data_configs_compose_into_three_test_sets():
    from hydra.utils import instantiate

    from reprolab.utils.config import compose_train

    for name, kwargs in (
        ("shapes_osr", {"test_size": 400}),
        ("shapes_osr_clutter", {"test_size": 400, "clutter": [2, 5]}),
    ):
        cfg = compose_train([f"data={name}", "paths.log_dir=/tmp/unused"])
        assert dict(cfg.data.dataset_kwargs) == kwargs and cfg.data.num_shots is None
        dm = instantiate(cfg.data)
        assert [(t.name, t.role) for t in dm.info.test_sets] == [
            ("test", "id"),
            ("ood_far", "ood"),
            ("ood_near", "ood"),
        ]
