"""SIMAT (robust_finetuning.md §4.4): the score on a hand case, the exclusion of the source image, a
NumPy re-implementation, the loader on a fixture in the official file formats, and the retrieval
method's end-of-test evaluation with the embedded tiny CLIP."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reprolab.data.simat import load_simat
from reprolab.data.spec import DataNotFoundError, MalformedDataError
from reprolab.metrics.simat import SIMAT_LAMBDAS, lambda_key, simat_retrieve, simat_score

S = math.sqrt(0.5)

# -- the score ------------------------------------------------------------------------------------
# 2-D database: x0 = (1, 0), x1 = (0, 1), x2 = (s, s), x3 = (-1, 0); words w0 = (1, 0),
# w1 = (0, 1), w2 = (-1, 0).
IMAGES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [S, S], [-1.0, 0.0]], dtype=torch.float64)
WORDS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)


def test_simat_score_on_a_hand_case() -> None:
    # t0: image 0, w0 -> w1, caption 0. q = (1 - l, l)
    #     l = 0.5: (.5, .5) -> x1 .5, x2 .707, x3 -.5 (x0 excluded): image 2
    #     l = 2:   (-1, 2)  -> x1 2, x2 .707, x3 1: image 1
    # t1: image 1, w1 -> w2, caption 1. q = (-l, 1 - l)
    #     l = 0.5: (-.5, .5) -> x0 -.5, x2 0, x3 .5: image 3;  l = 2: (-2, -1) -> image 3
    # t2: image 2, w1 -> w0, caption 2. q = (s + l, s - l): image 0 for both lambdas
    source, value, target, caption = [0, 1, 2], [0, 1, 1], [1, 2, 0], [0, 1, 2]
    oscar = torch.zeros(4, 3)
    oscar[2, 0] = 0.9  # t0 at l = 0.5: a success
    oscar[1, 0] = 0.2  # t0 at l = 2: a failure
    oscar[3, 1] = 0.6  # t1: a success at both
    oscar[0, 2] = 0.5  # t2: exactly the threshold is not a success
    norm2 = [4.0, 16.0, 1.0]  # weights 1/2, 1/4, 1 -> 2/7, 1/7, 4/7
    args = (source, value, target, caption, norm2, oscar)
    out = simat_score(IMAGES, WORDS, *args, lambdas=[0.5, 2])
    assert out["simat@0.5"] == pytest.approx(100 * 3 / 7, abs=1e-9)
    assert out["simat@2"] == pytest.approx(100 / 7, abs=1e-9)
    assert out["simat"] == out["simat@0.5"] and out["simat_lambda"] == 0.5
    assert set(out) == {"simat", "simat_lambda", "simat@0.5", "simat@2"}
    q = IMAGES[source] + 2.0 * (WORDS[target] - WORDS[value])
    assert simat_retrieve(IMAGES, q, torch.tensor(source)).tolist() == [1, 3, 0]
    # embeddings are normalised inside: scaled inputs give the same numbers
    assert simat_score(3 * IMAGES, 0.5 * WORDS, *args, lambdas=[0.5, 2]) == out
    # the release's lambda grid and key spelling
    assert [lambda_key(v) for v in SIMAT_LAMBDAS][:3] == ["simat@0.5", "simat@1", "simat@1.5"]
    assert len(SIMAT_LAMBDAS) == 13 and 6.5 not in SIMAT_LAMBDAS and max(SIMAT_LAMBDAS) == 7


def test_the_source_image_is_never_retrieved() -> None:
    # t: image 2, w1 -> w0, l = 0.1: q = (.807, .607); x2 scores 1.0, x0 .807
    q = IMAGES[2] + 0.1 * (WORDS[0] - WORDS[1])
    assert int((IMAGES @ q).argmax()) == 2  # without the exclusion the source wins
    assert simat_retrieve(IMAGES, q[None], torch.tensor([2])).tolist() == [0]
    oscar = torch.zeros(4, 1)
    oscar[2, 0] = 0.9  # the source would count as a success
    out = simat_score(IMAGES, WORDS, [2], [1], [0], [0], [1.0], oscar, lambdas=[0.1])
    assert out["simat"] == 0.0
    oscar[0, 0] = 0.7
    assert simat_score(IMAGES, WORDS, [2], [1], [0], [0], [1.0], oscar, lambdas=[0.1])[
        "simat"
    ] == pytest.approx(100.0)


def test_simat_score_matches_a_numpy_reimplementation() -> None:
    rng = np.random.default_rng(3)
    n, d, w, t, c = 30, 8, 10, 60, 12
    x, words = rng.normal(size=(n, d)), rng.normal(size=(w, d))
    src, a, b = rng.integers(0, n, t), rng.integers(0, w, t), rng.integers(0, w, t)
    cap, norm2 = rng.integers(0, c, t), rng.integers(1, 900, t).astype(float)
    oscar = rng.uniform(size=(n, c))
    got = simat_score(
        torch.from_numpy(x), torch.from_numpy(words), src, a, b, cap, norm2, torch.from_numpy(oscar)
    )
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    wn = words / np.linalg.norm(words, axis=1, keepdims=True)
    ref = {}
    for lam in SIMAT_LAMBDAS:
        ok = []
        for k in range(t):
            sims = xn @ (xn[src[k]] + lam * (wn[b[k]] - wn[a[k]]))
            sims[src[k]] = -np.inf
            ok.append(oscar[int(np.argmax(sims)), cap[k]] > 0.5)
        ref[lam] = 100 * np.average(ok, weights=1 / np.sqrt(norm2))
        assert got[lambda_key(lam)] == pytest.approx(ref[lam], abs=1e-9)
    assert got["simat"] == pytest.approx(max(ref.values()), abs=1e-9)
    assert got["simat_lambda"] == max(ref, key=ref.get)
    assert len({round(v, 6) for v in ref.values()}) > 1  # the lambdas do differ here


def test_simat_score_refuses_bad_tables() -> None:
    oscar = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="target_caption indices"):
        simat_score(IMAGES, WORDS, [0], [0], [1], [3], [1.0], oscar)
    with pytest.raises(ValueError, match="differ in length"):
        simat_score(IMAGES, WORDS, [0, 1], [0], [1], [0], [1.0], oscar)
    with pytest.raises(ValueError, match="oscar is"):
        simat_score(IMAGES, WORDS, [0], [0], [1], [0], [1.0], torch.zeros(3, 3))
    with pytest.raises(ValueError, match="repeated lambdas"):
        simat_score(IMAGES, WORDS, [0], [0], [1], [0], [1.0], oscar, lambdas=[1, 1.0])


# -- the loader -----------------------------------------------------------------------------------

# (region_id, subj, rel, obj, dataset_id): file order is not database order
TRIPLETS = [
    (61, "dog", "laying in", "pillow", 2),
    (19583, "bear", "laying in", "wall", 0),
    (4, "giraffe", "licking", "leaf", 5),
    (30, "bird", "sitting on", "branch", 1),
    (38, "man", "playing with", "tennis", 3),
    (77, "cat", "laying in", "pillow", 4),
    (90, "dog", "laying in", "rug", 6),
    (91, "cat", "laying in", "rug", 7),
]
CAPTIONS = 6
# (region_id, field, value, target, target_ids, norm2, is_test); the file's own dataset_id column
# is stale in the official file (not the database row), so the fixture writes a wrong one too
TRANSFOS = [
    (61, "obj", "pillow", "rug", 4, 220, False),
    (61, "subj", "dog", "cat", 3, 9, False),
    (77, "obj", "pillow", "rug", 5, 100, True),
    (90, "subj", "dog", "cat", 5, 49, False),
    (30, "subj", "bird", "man", 1, 16, True),
]


def write_simat(root: Path, clone: bool = True) -> Path:
    """A tiny SIMAT in the official formats under `root/simat` (a clone: `simat/simat_db/`)."""
    db = root / "simat" / "simat_db" if clone else root / "simat"
    (db / "images" / "images").mkdir(parents=True)
    with open(db / "triplets.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["region_id", "subj", "rel", "obj", "dataset_id"])
        wr.writerows(TRIPLETS)
    with open(db / "transfos.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(
            [
                "",
                "transfo_id",
                "region_id",
                "field",
                "value",
                "target",
                "norm",
                "query_ids",
                "target_ids",
                "dataset_id",
                "norm2",
                "is_test",
            ]
        )
        for k, (rid, field, a, b, cap, n2, test) in enumerate(TRANSFOS):
            wr.writerow([10 + k, 10 + k, rid, field, a, b, 26, 0, cap, 1642, n2, test])
    g = torch.Generator().manual_seed(0)
    torch.save(torch.rand(len(TRIPLETS), CAPTIONS, generator=g), db / "oscar_similarity_matrix.pt")
    for k, (rid, *_rest) in enumerate(TRIPLETS):
        colour = (30 * k % 256, 255 - 25 * k, (70 * k) % 256)
        Image.new("RGB", (40 + 3 * k, 32), colour).save(db / "images" / "images" / f"{rid}.png")
    return db


def test_loader_reads_the_official_formats(tmp_path: Path) -> None:
    db = write_simat(tmp_path)
    dev = load_simat(tmp_path)  # the release's split
    assert dev.split == "dev" and dev.root == db
    assert dev.region_ids == (19583, 30, 61, 38, 77, 4, 90, 91)  # by dataset_id
    assert dev.image_paths[2] == db / "images" / "images" / "61.png"
    assert dev.words == ("cat", "dog", "pillow", "rug")
    assert dev.transfo_ids == (10, 11, 13)
    assert dev.source.tolist() == [2, 2, 6]  # triplets.csv's dataset_id, not transfos' column
    assert [dev.words[i] for i in dev.value.tolist()] == ["pillow", "dog", "dog"]
    assert [dev.words[i] for i in dev.target.tolist()] == ["rug", "cat", "cat"]
    assert dev.target_caption.tolist() == [4, 3, 5]
    assert dev.norm2.tolist() == [220.0, 9.0, 49.0]
    assert dev.oscar.shape == (8, CAPTIONS) and dev.oscar.dtype == torch.float32
    assert torch.equal(dev.oscar, torch.load(db / "oscar_similarity_matrix.pt"))
    test = load_simat(tmp_path, "test")
    assert test.transfo_ids == (12, 14) and test.source.tolist() == [4, 1]
    assert test.words == ("bird", "man", "pillow", "rug")
    # the simat_db contents straight under simat/ are read as well
    other = tmp_path / "flat"
    write_simat(other, clone=False)
    assert load_simat(other).source.tolist() == [2, 2, 6]


def test_missing_simat_names_the_fix_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        load_simat(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "github.com/facebookresearch/SIMAT" in msg
    assert "prepare_dataset.py" in msg and str(tmp_path / "simat") in msg
    db = write_simat(tmp_path)
    (db / "oscar_similarity_matrix.pt").unlink()
    with pytest.raises(DataNotFoundError, match="lacks oscar_similarity_matrix.pt") as err:
        load_simat(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_images_are_named_then_counted(tmp_path: Path) -> None:
    db = write_simat(tmp_path)
    (db / "images" / "images" / "61.png").unlink()
    with pytest.raises(MalformedDataError, match=r"1 of its 8 images are missing.*\(61\.png\)"):
        load_simat(tmp_path)
    for rid in (19583, 30, 38, 77, 4):
        (db / "images" / "images" / f"{rid}.png").unlink()
    with pytest.raises(MalformedDataError) as err:
        load_simat(tmp_path)
    msg = str(err.value)
    assert "6 of its 8 images are missing" in msg and "\n" not in msg
    assert "19583.png, 30.png, 61.png, 38.png, 77.png, ..." in msg and "4.png" not in msg
    assert "prepare_dataset.py" in msg


def test_malformed_tables_name_the_file(tmp_path: Path) -> None:
    db = write_simat(tmp_path)
    torch.save(torch.zeros(8, 3), db / "oscar_similarity_matrix.pt")  # no column for target 5
    with pytest.raises(MalformedDataError, match="oscar_similarity_matrix.pt: is \\(8, 3\\)"):
        load_simat(tmp_path)
    text = (db / "transfos.csv").read_text().replace(",False\n", ",maybe\n", 1)
    (db / "transfos.csv").write_text(text)
    with pytest.raises(MalformedDataError, match="transfos.csv: row 1: is_test 'maybe'"):
        load_simat(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_simat(tmp_path, "val")


# -- the retrieval method -------------------------------------------------------------------------


def test_retrieval_method_logs_simat_like_a_direct_computation(tmp_path: Path) -> None:
    import hydra

    from reprolab.data.simat import SimatImages
    from reprolab.data.transforms import build_transforms
    from reprolab.train import run
    from reprolab.utils.config import compose_train, metric_is_logged

    write_simat(tmp_path / "data")
    root = str(tmp_path / "data")
    lams = [0.5, 1, 3]
    cfg = compose_train(
        [
            "method=zeroshot_retrieval",
            "data=captioned_scenes",
            "data.dataset_kwargs.train_size=8",
            "data.dataset_kwargs.val_size=4",
            "data.dataset_kwargs.test_size=8",
            "data.batch_size=4",
            "logger=csv",
            "threads=1",
            "progress_bar=false",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"method.simat={{root:'{root}',lambdas:[0.5,1,3],batch_size:3}}",
        ]
    )
    m = run(cfg)["metrics"]
    keys = {k for k in m if k.startswith("test/simat/")}
    assert keys == {"test/simat/simat", "test/simat/simat_lambda"} | {
        f"test/simat/{lambda_key(v)}" for v in lams
    }
    target = cfg.method._target_
    assert all(metric_is_logged(target, k) for k in keys)
    assert "test/rsum" in m  # the retrieval numbers are still there

    # direct: the same images through the model's evaluation transform, the bare words
    backbone = hydra.utils.instantiate(cfg.model).eval()
    data = load_simat(root)
    tf = build_transforms(backbone.preprocess, False, False)
    images = SimatImages(data.image_paths, tf)
    with torch.no_grad():
        u = backbone.encode_image(torch.stack([images[i][0] for i in range(len(images))]))
        w = backbone.encode_text(list(data.words))
    ref = simat_score(
        F.normalize(u.float(), dim=-1), w.float(), lambdas=lams, **data.score_inputs()
    )
    for k, v in ref.items():
        assert m[f"test/simat/{k}"] == pytest.approx(v, abs=1e-4)


def test_simat_encoding_runs_in_eval_mode_and_restores_the_mode(tmp_path: Path) -> None:
    import hydra

    from reprolab.data.info import RetrievalInfo
    from reprolab.errors import ConfigValueError
    from reprolab.methods.finetuning.retrieval import CLIPFineTune, ZeroShotRetrieval
    from reprolab.utils.config import compose_train

    write_simat(tmp_path)
    cfg = compose_train(["method=clip_ft", "data=captioned_scenes", "model.trainable=both"])
    info = RetrievalInfo(name="captioned_scenes", captions_per_image=5)
    method = CLIPFineTune(
        "clip_ft", model=hydra.utils.instantiate(cfg.model), info=info, simat=str(tmp_path)
    )
    assert method.simat["split"] == "dev" and method.simat["lambdas"] == list(SIMAT_LAMBDAS)
    seen = []
    encode = method.encode_images

    def spy(images):
        seen.append(any(m.training for m in method.backbone.modules()))
        return encode(images)

    method.encode_images = spy
    method.backbone.train()
    some = next(m for m in method.backbone.modules() if len(list(m.children())) == 0)
    some.eval()  # a part kept in eval mode stays so
    before = [m.training for m in method.backbone.modules()]
    assert any(before)
    out = method.simat_metrics()
    assert seen and not any(seen)
    assert [m.training for m in method.backbone.modules()] == before
    assert set(out) == {"simat", "simat_lambda"} | {lambda_key(v) for v in SIMAT_LAMBDAS}
    assert 0.0 <= out["simat"] <= 100.0
    backbone = hydra.utils.instantiate(compose_train(["method=zeroshot_retrieval"]).model)
    # off by default; options are checked at build time
    assert ZeroShotRetrieval("zeroshot_retrieval", model=backbone, info=info).simat is None
    with pytest.raises(ConfigValueError, match="unknown simat option 'lambda'"):
        ZeroShotRetrieval(
            "zeroshot_retrieval", model=backbone, info=info, simat={"root": "x", "lambda": [1]}
        )
    with pytest.raises(DataNotFoundError, match="SIMAT not found"):
        ZeroShotRetrieval(
            "zeroshot_retrieval", model=backbone, info=info, simat=str(tmp_path / "none")
        )
