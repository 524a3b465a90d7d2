"""Caption-retrieval datasets (Flickr30k, MS-COCO) against miniature trees in the real formats.

Formats: Karpathy's split files (dataset_flickr30k.json, dataset_coco.json), nlphuji/flickr30k's
annotation CSV and its saved Hugging Face dataset, the official COCO caption files (the m2-mix
release's split); preparation from archives (file:// URLs, a stubbed HF download) and the CLI.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import pickle
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from reprolab.data import sources
from reprolab.data.captions import CaptionSpec
from reprolab.data.datasets._common import Step
from reprolab.data.sources import CountMismatchError
from reprolab.data.spec import DataNotFoundError, MalformedDataError, get_spec

ROOT = Path(__file__).resolve().parents[1]

# Karpathy split of the miniature Flickr30k, in file order (splits interleaved as in the real file).
FLICKR = [
    ("101.jpg", "train"),
    ("201.jpg", "val"),
    ("102.jpg", "train"),
    ("301.jpg", "test"),
    ("103.jpg", "train"),
    ("202.jpg", "val"),
    ("302.jpg", "test"),
]
FLICKR_SIZES = {"train": 3, "val": 2, "test": 2}


def colour(name: str) -> tuple[int, int, int]:
    k = int("".join(ch for ch in name if ch.isdigit())[-3:])
    return (k % 256, (3 * k) % 256, 7)


def png(name: str) -> bytes:
    """Tiny image whose colour encodes its file name (PNG content; PIL reads it whatever the name)."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour(name)).save(buf, "PNG")
    return buf.getvalue()


def caps(name: str, n: int = 5) -> list[str]:
    return [f"{Path(name).stem} says {k} " for k in range(n)]  # trailing space: stripped on load


def write_images(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(png(n))


def karpathy_entry(i: int, name: str, split: str, captions: list[str], filepath: str | None = None):
    entry = {
        "filename": name,
        "imgid": i,
        "split": split,
        "sentids": list(range(5 * i, 5 * i + len(captions))),
        "sentences": [
            {"tokens": c.lower().split(), "raw": c, "imgid": i, "sentid": 5 * i + k}
            for k, c in enumerate(captions)
        ],
    }
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def flickr_captions(name: str) -> list[str]:
    return caps(name, 6 if name == "102.jpg" else 5)  # one image with a sixth caption


def make_flickr(root: Path, annotations: str = "karpathy") -> Path:
    d = root / "flickr30k"
    d.mkdir(parents=True, exist_ok=True)
    if annotations == "karpathy":
        images = [karpathy_entry(i, n, s, flickr_captions(n)) for i, (n, s) in enumerate(FLICKR)]
        (d / "dataset_flickr30k.json").write_text(
            json.dumps({"images": images, "dataset": "flickr30k"})
        )
    else:  # nlphuji/flickr30k's flickr_annotations_30k.csv
        with open(d / "flickr_annotations_30k.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["raw", "sentids", "split", "filename", "img_id"])
            for i, (n, s) in enumerate(FLICKR):
                c = flickr_captions(n)
                w.writerow(
                    [json.dumps(c), json.dumps([str(5 * i + k) for k in range(len(c))]), s, n, i]
                )
    write_images(d / "Images", [n for n, _ in FLICKR])
    return d


def save_flickr_hf(path: Path) -> None:
    """nlphuji/flickr30k as `load_dataset(..., split="test").save_to_disk(path)` writes it."""
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png(n), "path": None} for n, _ in FLICKR],
            "caption": [flickr_captions(n) for n, _ in FLICKR],
            "sentids": [[str(5 * i + k) for k in range(5)] for i in range(len(FLICKR))],
            "split": [s for _, s in FLICKR],
            "img_id": [str(i) for i in range(len(FLICKR))],
            "filename": [n for n, _ in FLICKR],
        }
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(path))


# Karpathy's COCO split: (folder, file, split) in file order; restval images come from val2014.
COCO_KARPATHY = [
    ("train2014", "COCO_train2014_000000000009.jpg", "train"),
    ("val2014", "COCO_val2014_000000000042.jpg", "restval"),
    ("val2014", "COCO_val2014_000000000073.jpg", "val"),
    ("val2014", "COCO_val2014_000000000074.jpg", "test"),
    ("train2014", "COCO_train2014_000000000025.jpg", "train"),
    ("val2014", "COCO_val2014_000000000133.jpg", "restval"),
    ("val2014", "COCO_val2014_000000000136.jpg", "test"),
    ("val2014", "COCO_val2014_000000000139.jpg", "val"),
]


def make_coco_karpathy(root: Path) -> Path:
    d = root / "coco"
    images = [
        karpathy_entry(i, f, s, caps(f), filepath=p) for i, (p, f, s) in enumerate(COCO_KARPATHY)
    ]
    d.mkdir(parents=True, exist_ok=True)
    (d / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for p, f, _ in COCO_KARPATHY:
        write_images(d / "images" / p, [f])
    return d


# Official COCO caption files: image ids out of order, annotations interleaved across images.
COCO_2017 = {
    "train2017": {30: 2, 9: 1, 25: 2},  # id -> how many annotations come before the next image's
    "val2017": {285: 1, 139: 1},
}


def coco_official(folder: str) -> dict:
    ids = list(COCO_2017[folder])
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 4, "width": 4} for i in ids]
    anns, k = [], 0
    for rnd in range(5):  # five captions per image, round-robin over the images
        for i in ids:
            anns.append({"id": k, "image_id": i, "caption": f"{i} round {rnd}\n"})
            k += 1
    return {"info": {}, "licenses": [], "images": images, "annotations": anns}


def make_coco_release(root: Path) -> Path:
    d = root / "coco"
    (d / "annotations").mkdir(parents=True, exist_ok=True)
    for folder in COCO_2017:
        part = folder.removesuffix("2017")
        (d / "annotations" / f"captions_{part}2017.json").write_text(
            json.dumps(coco_official(folder))
        )
        write_images(d / "images" / folder, [f"{i:012d}.jpg" for i in COCO_2017[folder]])
    return d


def sized(spec, sizes: dict[str, int]):
    spec.expected = dict(sizes)
    return spec


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------
# Splits, caption order, lazy images


def test_flickr30k_karpathy_splits_caption_order_and_lazy_images(tmp_path, monkeypatch):
    make_flickr(tmp_path)
    opened = []
    real = sources.pil_rgb
    monkeypatch.setattr(sources, "pil_rgb", lambda p, crop=0: opened.append(p) or real(p, crop))
    spec = get_spec("flickr30k")
    assert isinstance(spec, CaptionSpec) and spec.captions_per_image == 5
    assert spec.splits_available == ["train", "val", "test"]
    spec.check(tmp_path)
    splits = {s: spec.load(tmp_path, s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == FLICKR_SIZES
    assert opened == []  # nothing decoded by load
    for s, split in splits.items():
        names = [n for n, sp in FLICKR if sp == s]  # file order within the split
        assert split.captions == [[c.strip() for c in flickr_captions(n)] for n in names]
    assert len(splits["train"].captions[1]) == 6  # every caption kept; evaluation takes 5
    item = splits["test"][1]
    assert item["image"].mode == "RGB" and item["image"].getpixel((0, 0)) == colour("302.jpg")
    assert item["captions"][0] == "302 says 0" and len(opened) == 1
    clone = pickle.loads(pickle.dumps(splits["val"]))  # DataLoader workers
    assert clone[0]["image"].getpixel((0, 0)) == colour("201.jpg")
    assert sized(spec, FLICKR_SIZES).verify(tmp_path) == FLICKR_SIZES


def test_flickr30k_nlphuji_csv_gives_the_same_splits_and_karpathy_json_wins(tmp_path):
    make_flickr(tmp_path / "a")
    make_flickr(tmp_path / "b", annotations="csv")
    spec = get_spec("flickr30k")
    for s in ("train", "val", "test"):
        assert spec.load(tmp_path / "b", s).captions == spec.load(tmp_path / "a", s).captions
    assert spec.load(tmp_path / "b", "train")[2]["image"].getpixel((0, 0)) == colour("103.jpg")
    # both files present: Karpathy's split file is read
    make_flickr(tmp_path / "c", annotations="csv")
    images = [karpathy_entry(0, n, "train", ["from json"] * 5) for n, _ in FLICKR]
    (tmp_path / "c" / "flickr30k" / "dataset_flickr30k.json").write_text(
        json.dumps({"images": images})
    )
    fresh = get_spec("flickr30k")
    assert fresh.load(tmp_path / "c", "train").captions[0][0] == "from json"


def test_flickr30k_saved_hf_layout_filters_the_split_column_lazily(tmp_path):
    save_flickr_hf(tmp_path / "flickr30k" / "hf")
    spec = get_spec("flickr30k")
    spec.check(tmp_path)
    val = spec.load(tmp_path, "val")
    assert val.captions == [[c.strip() for c in caps(n)] for n in ("201.jpg", "202.jpg")]
    assert val._loader.loader._ds is None  # the image column is not even opened by load
    clone = pickle.loads(pickle.dumps(val))
    img = clone[1]["image"]
    assert img.mode == "RGB" and img.getpixel((0, 0)) == colour("202.jpg")
    assert spec.load(tmp_path, "train")[1]["captions"][5] == "102 says 5"
    assert sized(spec, FLICKR_SIZES).verify(tmp_path) == FLICKR_SIZES


def test_coco_karpathy_restval_joins_train_in_file_order(tmp_path):
    make_coco_karpathy(tmp_path)
    spec = get_spec("coco_captions")
    train = spec.load(tmp_path, "train")
    want = [f for _, f, s in COCO_KARPATHY if s in ("train", "restval")]
    assert [c[0] for c in train.captions] == [f"{Path(f).stem} says 0" for f in want]
    assert train[1]["image"].getpixel((0, 0)) == colour(want[1])  # restval, from val2014/
    sizes = {"train": 4, "val": 2, "test": 2}
    assert sized(spec, sizes).verify(tmp_path) == sizes
    assert spec.load(tmp_path, "val").captions[1][4] == "COCO_val2014_000000000139 says 4"


def test_coco_release_variant_val_is_test_in_cocos_order(tmp_path):
    make_coco_release(tmp_path)
    spec = get_spec("coco_captions", variant="release")
    train = spec.load(tmp_path, "train")
    # torchvision CocoCaptions order: images by id, captions in annotation order
    assert [c[0] for c in train.captions] == ["9 round 0", "25 round 0", "30 round 0"]
    assert train.captions[1] == [f"25 round {r}" for r in range(5)]
    val, test = spec.load(tmp_path, "val"), spec.load(tmp_path, "test")
    assert (
        val.captions == test.captions == [[f"{i} round {r}" for r in range(5)] for i in (139, 285)]
    )
    assert test[1]["image"].getpixel((0, 0)) == colour("000000000285.jpg")
    sizes = {"train": 3, "val": 2, "test": 2}
    assert sized(spec, sizes).verify(tmp_path) == sizes
    with pytest.raises(ValueError, match="variant must be one of"):
        get_spec("coco_captions", variant="2017")


# ------------------------------------------------------------------------------------------------
# Failures name the file and the command


@pytest.mark.parametrize(
    ("kwargs", "command"),
    [
        ({"name": "flickr30k"}, "flickr30k"),
        ({"name": "coco_captions"}, "coco_captions"),
        ({"name": "coco_captions", "variant": "release"}, "coco_captions_release"),
    ],
)
def test_missing_data_names_the_prepare_command(tmp_path, kwargs, command):
    kwargs = dict(kwargs)
    spec = get_spec(kwargs.pop("name"), **kwargs)
    t0 = time.perf_counter()
    with pytest.raises(DataNotFoundError, match=f"`python scripts/prepare_data.py {command}`"):
        spec.check(tmp_path)
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(DataNotFoundError):
        spec.load(tmp_path, "test")
    with pytest.raises(KeyError, match="no split 'dev'"):
        spec.load(tmp_path, "dev")


def _break(root: Path, case: str) -> tuple[str, dict, Path]:
    """A tree whose annotation file is damaged: (dataset, kwargs, the damaged file)."""
    if case.startswith("flickr_json"):
        d = make_flickr(root)
        path = d / "dataset_flickr30k.json"
        path.write_text(
            {
                "flickr_json_syntax": '{"images": [',
                "flickr_json_list": "[1, 2]",
                "flickr_json_no_sentences": json.dumps(
                    {"images": [{"filename": "101.jpg", "split": "train"}]}
                ),
                "flickr_json_split": json.dumps(
                    {"images": [karpathy_entry(0, "101.jpg", "dev", caps("101.jpg"))]}
                ),
            }[case]
        )
        return "flickr30k", {}, path
    if case == "flickr_csv_columns":
        d = make_flickr(root, annotations="csv")
        path = d / "flickr_annotations_30k.csv"
        path.write_text("caption,split,filename\nx,train,101.jpg\n")
        return "flickr30k", {}, path
    if case == "flickr_csv_raw":
        d = make_flickr(root, annotations="csv")
        path = d / "flickr_annotations_30k.csv"
        path.write_text('raw,sentids,split,filename,img_id\n"just text",[],train,101.jpg,0\n')
        return "flickr30k", {}, path
    if case == "flickr_hf_columns":
        import datasets

        path = root / "flickr30k" / "hf"
        datasets.Dataset.from_dict({"image": [b"x"], "split": ["train"]}).save_to_disk(str(path))
        return "flickr30k", {}, path
    if case == "coco_karpathy_no_filepath":
        d = make_coco_karpathy(root)
        path = d / "dataset_coco.json"
        path.write_text(json.dumps({"images": [karpathy_entry(0, "a.jpg", "train", caps("a"))]}))
        return "coco_captions", {}, path
    d = make_coco_release(root)
    path = d / "annotations" / "captions_train2017.json"
    bad = coco_official("train2017")
    if case == "coco_release_caption":
        del bad["annotations"][3]["caption"]
    elif case == "coco_release_image_id":
        bad["annotations"][0]["image_id"] = 12345
    else:  # coco_release_uncaptioned
        bad["images"].append({"id": 7, "file_name": "000000000007.jpg"})
    path.write_text(json.dumps(bad))
    return "coco_captions", {"variant": "release"}, path


@pytest.mark.parametrize(
    "case",
    [
        "flickr_json_syntax",
        "flickr_json_list",
        "flickr_json_no_sentences",
        "flickr_json_split",
        "flickr_csv_columns",
        "flickr_csv_raw",
        "flickr_hf_columns",
        "coco_karpathy_no_filepath",
        "coco_release_caption",
        "coco_release_image_id",
        "coco_release_uncaptioned",
    ],
)
def test_malformed_annotation_file_is_named(tmp_path, case):
    name, kwargs, path = _break(tmp_path, case)
    spec = get_spec(name, **kwargs)
    spec.check(tmp_path)  # the files are there: check stays cheap and passes
    with pytest.raises(MalformedDataError) as err:
        spec.load(tmp_path, "train")
    msg = str(err.value)
    assert str(path) in msg and f"python scripts/prepare_data.py {spec.pname}" in msg, msg


def test_verify_names_missing_image_files_but_load_stays_lazy(tmp_path):
    d = make_flickr(tmp_path)
    for n in ("103.jpg", "301.jpg"):
        (d / "Images" / n).unlink()
    spec = sized(get_spec("flickr30k"), FLICKR_SIZES)
    assert len(spec.load(tmp_path, "train")) == 3  # load stats no image file
    with pytest.raises(MalformedDataError) as err:
        spec.verify(tmp_path)
    msg = str(err.value)
    assert "dataset_flickr30k.json: lists 2 image files that are missing" in msg
    assert "(103.jpg, 301.jpg)" in msg and "python scripts/prepare_data.py flickr30k" in msg
    # the real sizes are expected by default
    with pytest.raises(CountMismatchError, match="train: expected 29000, found 3"):
        get_spec("flickr30k").verify(tmp_path)
    # an image with fewer captions than evaluation ranks
    images = [
        karpathy_entry(i, n, s, caps(n, 4 if i == 2 else 5)) for i, (n, s) in enumerate(FLICKR)
    ]
    (d / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(
        CountMismatchError, match="1 train images have fewer than 5 captions.*102.jpg"
    ):
        sized(get_spec("flickr30k"), FLICKR_SIZES).verify(tmp_path)


def test_verify_release_lists_a_missing_val_image_once(tmp_path):
    d = make_coco_release(tmp_path)
    (d / "images" / "val2017" / "000000000139.jpg").unlink()
    spec = sized(get_spec("coco_captions", variant="release"), {"train": 3, "val": 2, "test": 2})
    with pytest.raises(
        MalformedDataError,
        match=r"captions_val2017.json: lists 1 image files .*"
        r"\(val2017/000000000139.jpg\).*prepare_data.py coco_captions_release",
    ):
        spec.verify(tmp_path)


# ------------------------------------------------------------------------------------------------
# Preparation (no network: file:// archives, a stubbed HF download)


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_prepare_release_from_archives(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    archives = {}
    for folder, ids in COCO_2017.items():
        files = {f"{folder}/{i:012d}.jpg": png(f"{i:012d}.jpg") for i in ids}
        archives[folder] = _zip(src / f"{folder}.zip", files)
    archives["ann"] = _zip(
        src / "annotations_trainval2017.zip",
        {
            f"annotations/captions_{p}2017.json": json.dumps(coco_official(f"{p}2017"))
            for p in ("train", "val")
        },
    )
    spec = sized(get_spec("coco_captions", variant="release"), {"train": 3, "val": 2, "test": 2})
    spec.steps = [
        Step("url", archives["train2017"].as_uri(), dest="images", extract=True),
        Step("url", archives["val2017"].as_uri(), dest="images", extract=True),
        Step("url", archives["ann"].as_uri(), extract=True),
    ]
    root = tmp_path / "data"
    spec.prepare(root)
    assert "coco_captions_release: ready under" in capsys.readouterr().out
    assert spec.load(root, "test")[0]["captions"][0] == "139 round 0"
    spec.prepare(root)  # ready: nothing downloaded or extracted again
    out = capsys.readouterr().out
    assert "downloading" not in out and "extracting" not in out
    # an extraction that did not finish (no marker, images missing) is redone
    (root / "coco" / "images" / ".extracted-val2017.zip").unlink()
    (root / "coco" / "images" / "val2017" / "000000000285.jpg").unlink()
    spec.prepare(root)
    out = capsys.readouterr().out
    assert "extracting val2017.zip" in out and "extracting train2017.zip" not in out
    assert "ready under" in out


def test_prepare_flickr30k_from_the_hf_files(tmp_path, monkeypatch):
    src = make_flickr(tmp_path / "src", annotations="csv")
    zipped = {f"flickr30k-images/{n}": png(n) for n, _ in FLICKR}
    zipped["__MACOSX/flickr30k-images/._101.jpg"] = b"junk"
    _zip(src / "flickr30k-images.zip", zipped)
    calls = []

    def fake_hf_file(repo, filename, dest_dir, revision):
        calls.append((repo, filename, revision))
        Path(dest_dir).mkdir(parents=True, exist_ok=True)
        out = Path(dest_dir) / filename
        out.write_bytes((src / filename).read_bytes())
        return out

    monkeypatch.setattr(sources, "hf_file", fake_hf_file)
    spec = sized(get_spec("flickr30k"), FLICKR_SIZES)
    root = tmp_path / "data"
    spec.prepare(root)
    assert {c[1] for c in calls} == {"flickr_annotations_30k.csv", "flickr30k-images.zip"}
    assert all(c[0] == "nlphuji/flickr30k" and c[2] for c in calls)  # pinned revision
    assert sorted(p.name for p in (root / "flickr30k" / "Images").iterdir()) == sorted(
        n for n, _ in FLICKR
    )
    assert spec.load(root, "val")[1]["image"].getpixel((0, 0)) == colour("202.jpg")


def test_prepare_failure_prints_the_manual_steps(tmp_path):
    spec = get_spec("coco_captions")
    spec.steps = [Step("url", (tmp_path / "nope.zip").as_uri(), dest="images", extract=True)]
    with pytest.raises(
        DataNotFoundError, match="(?s)automatic preparation failed.*caption_datasets.zip"
    ):
        spec.prepare(tmp_path / "data")


# ------------------------------------------------------------------------------------------------
# Configs and the CLI


def test_caption_data_configs():
    from omegaconf import OmegaConf

    cli = _script("prepare_data")
    for stem in ("flickr30k", "coco_captions", "coco_captions_release"):
        cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "data" / f"{stem}.yaml"))
        assert cfg["_target_"] == "reprolab.data.retrieval.RetrievalDataModule"
        assert cfg["name"] == stem and cfg["root"] == "${paths.data_dir}"
        assert cfg["seed"] == "${seed}" and cfg["batch_size"] == 128 and cfg["drop_last"] is True
        assert cfg["num_workers"] == 4 and cfg["train_captions"] == "first"
        spec = cli.spec_for(stem)
        assert isinstance(spec, CaptionSpec) and spec.pname == stem  # messages name this config
    assert cli.spec_for("coco_captions_release").expected["train"] == 118287


def test_retrieval_data_module_accepts_the_configs(tmp_path):
    from omegaconf import OmegaConf

    from reprolab.data.retrieval import RetrievalDataModule

    make_flickr(tmp_path)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "data" / "flickr30k.yaml"))
    cfg.pop("_target_")
    dm = RetrievalDataModule(**{**cfg, "root": str(tmp_path), "seed": 1})
    assert dm.info.captions_per_image == 5 and [t.name for t in dm.info.test_sets] == ["test"]


def test_prepare_data_list_and_check_show_caption_datasets(tmp_path, capsys):
    cli = _script("prepare_data")
    make_flickr(tmp_path)
    assert cli.main(["--list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    flickr = lines["flickr30k"].split()
    assert flickr[1:6] == ["-", "29,000", "1,014", "1,000", "~4.5"] and "bad" in flickr
    assert lines["coco_captions"].split()[1:5] == ["-", "113,287", "5,000", "5,000"]
    assert "missing" in lines["coco_captions"].split()
    assert "118,287" in lines["coco_captions_release"]
    assert "flickr30k: flickr30k: wrong number of images (train: expected 29000, found 3" in out
    assert cli.main(["--check", "coco_captions_release", "--root", str(tmp_path)]) == 1
    assert "python scripts/prepare_data.py coco_captions_release" in capsys.readouterr().err
    assert cli.main(["--manual", "flickr30k"]) == 0
    assert "flickr_annotations_30k.csv" in capsys.readouterr().out
