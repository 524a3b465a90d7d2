"""The synthetic captioned world and its downstream tasks: determinism, digit hygiene, geometry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from reprolab.data import synthetic as world
from reprolab.data.datasets.synthetic import BIAS_COLORS, LOC_CANVAS, LOC_DIGIT
from reprolab.data.spec import get_spec

TASKS = ["shapes", "loc_digits", "biased_digits", "group_shapes"]


def test_world_is_deterministic_and_seeded() -> None:
    a, b, c = world.CaptionedWorld(0), world.CaptionedWorld(0), world.CaptionedWorld(1)
    for i in (0, 7, 123):
        (ia, ca), (ib, cb) = a.sample(i), b.sample(i)
        assert np.array_equal(ia, ib) and ca == cb
        assert ia.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and ia.dtype == np.uint8
    imgs, caps = a.batch(5, 4)
    assert np.array_equal(imgs[2], a.sample(7)[0]) and caps[2] == a.sample(7)[1]
    other = c.batch(5, 4)
    assert not np.array_equal(imgs, other[0]) or caps != other[1]


def test_world_captions_name_what_is_drawn() -> None:
    w = world.CaptionedWorld(3)
    for i in range(200):
        rng = w.rng(i)
        obj = w.sample_object(rng, "shape")
        _, cap = w.render(rng, [obj])
        assert world.SHAPES[obj.label] in cap
        obj = w.sample_object(rng, "digit")
        _, cap = w.render(rng, [obj])
        assert str(obj.label) in cap.split() or any(
            tok.strip(".") in (str(obj.label), world.DIGIT_WORDS[obj.label]) for tok in cap.split()
        )


def test_digit_pools_are_disjoint_and_complete() -> None:
    images, labels = world.mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    pools = {p: set(world.digit_pool_indices(p).tolist()) for p in world.DIGIT_PARTS}
    assert [len(pools[p]) for p in world.DIGIT_PARTS] == [4000, 300, 700]
    assert not pools["pretrain"] & pools["val"]
    assert not pools["pretrain"] & pools["test"]
    assert not pools["val"] & pools["test"]
    assert set.union(*pools.values()) == set(range(5000))
    for part in world.DIGIT_PARTS:
        for c, idx in enumerate(world.digit_pool(part)):
            assert (labels[idx] == c).all()


def test_downstream_digits_come_from_the_right_pool() -> None:
    pools = {p: set(world.digit_pool_indices(p).tolist()) for p in world.DIGIT_PARTS}
    for split, part in (("train", "pretrain"), ("val", "val"), ("test", "test")):
        for scale in (1, 4):
            plan = get_spec("loc_digits", fake_scale=scale)._plan(split)
            used = set(plan["real"].tolist()) | set(plan["fake"].tolist())
            assert used <= pools[part], (split, scale)
        plan = get_spec("biased_digits", rho=0.9)._plan(split)
        assert set(plan["digit"].tolist()) <= pools[part]
    # The world used for pretraining only ever draws pretraining digits.
    w = world.CaptionedWorld(0)
    drawn = {w.sample_object(w.rng(i), "digit").digit_index for i in range(500)}
    assert drawn <= pools["pretrain"]


@pytest.mark.parametrize("scale", [1, 4])
def test_loc_digits_geometry(scale: int) -> None:
    spec = get_spec("loc_digits", fake_scale=scale)
    images, labels = world.mnist_digits()
    plan = spec._plan("test")
    hi = LOC_CANVAS - LOC_DIGIT
    f = LOC_DIGIT * scale
    lo = LOC_CANVAS // 2 - f // 2
    assert lo == 112 - 14 * scale
    for i in range(40):
        canvas = spec.canvas("test", i, plan)
        r, c = int(plan["row"][i]), int(plan["col"][i])
        assert r in (0, hi) or c in (0, hi)  # one coordinate always touches an edge
        assert 0 <= r <= hi and 0 <= c <= hi
        assert np.array_equal(canvas[r : r + LOC_DIGIT, c : c + LOC_DIGIT], images[plan["real"][i]])
        assert labels[plan["real"][i]] == plan["label"][i]
        assert labels[plan["fake"][i]] == plan["fake_label"][i]
        mask = np.zeros_like(canvas, bool)
        mask[r : r + LOC_DIGIT, c : c + LOC_DIGIT] = True
        mask[lo : lo + f, lo : lo + f] = True
        assert not canvas[~mask].any()  # black everywhere else
        assert canvas[lo : lo + f, lo : lo + f].max() > 100  # the fake digit fills the centre box
    item = spec.load(None, "test")[0]
    assert item["image"].mode == "RGB" and item["image"].size == (64, 64)
    assert item["label"] == plan["label"][0]
    # Both placement branches occur (row on an edge / column on an edge) and labels are balanced.
    assert np.bincount(plan["label"], minlength=10).min() == len(plan["label"]) // 10


@pytest.mark.parametrize("rho,rho_test", [(0.8, 0.2), (0.9, 0.1)])
def test_biased_digits_colour_ratios(rho: float, rho_test: float) -> None:
    spec = get_spec("biased_digits", rho=rho)
    assert spec.rho_test == pytest.approx(rho_test)
    for split, r in (("train", rho), ("val", rho), ("test", rho_test)):
        plan = spec._plan(split)
        for c in range(10):
            colors = plan["color"][plan["label"] == c]
            assert (colors == c).sum() == int(np.floor(len(colors) * r + 1e-9)), (split, c)
    data = get_spec("biased_digits", rho=rho, image_size=28).load(None, "train")
    plan = spec._plan("train")
    images, _ = world.mnist_digits()
    for i in range(10):
        img = np.asarray(data[i]["image"])
        stroke = images[plan["digit"][i]] > 0
        assert (img[stroke] == 255).all()
        assert (img[~stroke] == np.array(BIAS_COLORS[plan["color"][i]])).all()
        assert data[i]["group"] == 2 * data[i]["label"] + int(plan["color"][i] == data[i]["label"])


def test_group_shapes_correlation() -> None:
    spec = get_spec("group_shapes")
    assert spec.num_groups == 4 and spec.classnames == ["circle", "hexagon"]
    train = spec.load(None, "train")
    groups = np.asarray(train.groups)
    labels = np.asarray(train.labels)
    agree = (groups % 2 == labels).mean()
    assert 0.93 < agree < 0.97
    test = spec.load(None, "test")
    counts = np.bincount(test.groups, minlength=4)
    assert counts.min() == counts.max() == len(test) // 4
    assert set(test[0]) == {"image", "label", "group"}


@pytest.mark.parametrize("name", TASKS)
def test_specs_load_deterministically(name: str) -> None:
    spec = get_spec(name)
    assert spec.classnames and spec.templates and all("{}" in t for t in spec.templates)
    for split in ["train", "val", *spec.test_sets]:
        data = spec.load(None, split)
        assert 100 <= len(data) <= 2000
        assert set(data.labels) == set(range(len(spec.classnames)))
    a, b = spec.load(None, spec.test_sets[0]), get_spec(name).load(None, spec.test_sets[0])
    other = get_spec(name, seed=1).load(None, spec.test_sets[0])
    assert a.labels == b.labels
    for i in (0, 5):
        assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))
        assert a[i]["image"].mode == "RGB"
    assert a.labels != other.labels or not np.array_equal(
        np.asarray(a[0]["image"]), np.asarray(other[0]["image"])
    )
    spec.check(None)  # no-op: nothing on disk


@pytest.mark.parametrize("border_scale,fake_scale", [(2, 2), (3, 2)])
def test_mirrored_loc_digits_puts_the_label_in_the_centre(
    border_scale: int, fake_scale: int
) -> None:
    spec = get_spec("loc_digits", border_scale=border_scale, fake_scale=fake_scale, target="centre")
    paper = get_spec("loc_digits", border_scale=border_scale, fake_scale=fake_scale)
    images, labels = world.mnist_digits()
    plan = spec._plan("test")
    s, f = LOC_DIGIT * border_scale, LOC_DIGIT * fake_scale
    lo = LOC_CANVAS // 2 - f // 2
    for i in range(20):
        canvas, flipped = spec.canvas("test", i, plan), paper.canvas("test", i, plan)
        r, c = int(plan["row"][i]), int(plan["col"][i])
        assert r in (0, LOC_CANVAS - s) or c in (0, LOC_CANVAS - s)
        # The labelled digit fills the centre box, the distractor the border box; the paper's
        # geometry (target="border") swaps the two images and keeps every position.
        centre = np.asarray(Image.fromarray(images[plan["real"][i]]).resize((f, f), Image.BILINEAR))
        border = np.asarray(Image.fromarray(images[plan["fake"][i]]).resize((s, s), Image.BILINEAR))
        assert np.array_equal(canvas[lo : lo + f, lo : lo + f], centre)
        assert np.array_equal(canvas[r : r + s, c : c + s], border)
        assert np.array_equal(flipped[r : r + s, c : c + s],
                              np.asarray(Image.fromarray(images[plan["real"][i]]).resize((s, s), Image.BILINEAR)))  # fmt: skip
        assert labels[plan["real"][i]] == plan["label"][i]
    assert np.bincount(plan["label"], minlength=10).min() == len(plan["label"]) // 10


def test_loc_digits_rejects_overlapping_or_unknown_layouts() -> None:
    with pytest.raises(ValueError, match="overlap"):
        get_spec("loc_digits", border_scale=3, fake_scale=4)
    with pytest.raises(ValueError, match="target"):
        get_spec("loc_digits", target="middle")
