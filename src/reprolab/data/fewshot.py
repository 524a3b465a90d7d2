"""Deterministic k-shot sampling (CoOp protocol), cached as JSON next to the data.

CoOp (Dassl's `generate_fewshot_dataset`) seeds Python's `random` with SEED once, then for the train
split and afterwards for the val split visits the classes in order of first appearance and takes
`random.sample(items, k)` from each (all items when a class has fewer than k; it still draws when a class
has exactly k). Val uses k_val = min(k, 4). We replay that with a local `random.Random(seed)`, so the
result depends only on (labels, k, seed): not on global RNG state, devices or worker count. With CoOp's
own split files and labels in split-file order this consumes the RNG exactly as CoOp does.

A class with fewer than k training items keeps all of them (Dassl's rule, which CoOp inherits). When
the subset is used for training, `check_shots` logs that cap with the classes it hits, and a k above
the LARGEST class (nothing is few-shot, e.g. `data.num_shots=100000`) is an error (`FewShotError`)
that suggests `data.num_shots=null`, raised before the first training step.

The cache is `<dataset dir>/split_fewshot/shot_{k}-seed_{seed}.json` ({"train": [...], "val": [...]}
indices into the full splits, plus a fingerprint of the labels); it is reused when the fingerprint
matches (a malformed cache is named and resampled) and silently skipped when the folder is read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from reprolab.data.spec import DatasetSpec, ImageSplit
from reprolab.errors import ConfigValueError

log = logging.getLogger(__name__)

VAL_SHOTS_MAX = 4  # CoOp: val is sampled with min(k, 4) per class


class FewShotError(ConfigValueError):
    """`num_shots` does not select a few-shot subset (above the largest class, or below 1)."""


def _check_k(num_shots: int, dataset: str) -> None:
    if isinstance(num_shots, bool) or not isinstance(num_shots, int) or num_shots < 1:
        raise FewShotError(
            f"data.num_shots={num_shots!r} is not a positive integer ({dataset}); use k >= 1 "
            "images per class, or data.num_shots=null for all images."
        )


def check_shots(
    labels: Sequence[int],
    num_shots: int | None,
    dataset: str = "data",
    split: str = "train",
    classnames: Sequence[str] | None = None,
) -> list[int]:
    """Check k against the class sizes of the split a method trains on; returns the capped classes.

    Raises `FewShotError` when k exceeds the largest class (the "few-shot" subset would be the
    whole split, silently); logs the classes smaller than k, which keep all their items (the
    Dassl / CoOp sampler's rule). Called when the k-shot subset is used for training, so a
    post-hoc method (zero-shot) on a small tree is not refused for a k it never uses.
    """
    if num_shots is None:
        return []
    _check_k(num_shots, dataset)
    sizes = Counter(int(y) for y in labels)
    if not sizes:
        raise FewShotError(f"{dataset}: the {split} split is empty; nothing to train on.")
    largest = max(sizes.values())
    if num_shots > largest:
        raise FewShotError(
            f"data.num_shots={num_shots} exceeds the largest class of {dataset} {split} "
            f"({largest} images), so nothing would be few-shot; use data.num_shots=null for all "
            f"images, or k <= {largest}."
        )
    capped = sorted(y for y, n in sizes.items() if n < num_shots)
    if capped:

        def label(y: int) -> str:
            name = classnames[y] if classnames is not None and 0 <= y < len(classnames) else y
            return f"{name} ({sizes[y]})"

        shown = ", ".join(label(y) for y in capped[:10]) + (" ..." if len(capped) > 10 else "")
        log.warning(
            "%s %s: %d of %d classes have fewer than %d images and keep all of them "
            "(as CoOp/Dassl): %s",
            dataset,
            split,
            len(capped),
            len(sizes),
            num_shots,
            shown,
        )
    return capped


def _sample(labels: Sequence[int], k: int, rng: random.Random) -> list[int]:
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    out: list[int] = []
    for idx in by_class.values():  # first-appearance order, as Dassl's defaultdict
        out.extend(rng.sample(idx, k) if len(idx) >= k else idx)
    return out


def fewshot_indices(
    train_labels: Sequence[int],
    val_labels: Sequence[int] | None,
    num_shots: int | None,
    seed: int,
) -> dict[str, list[int] | None]:
    """`{"train": indices, "val": indices or None}`: k per class for train, min(k, 4) for val.

    `num_shots=None` keeps every item. Train is drawn before val from one RNG, as CoOp, so the train
    subset does not depend on whether val is sampled.
    """
    if num_shots is None:
        val = None if val_labels is None else list(range(len(val_labels)))
        return {"train": list(range(len(train_labels))), "val": val}
    _check_k(num_shots, "data")
    rng = random.Random(seed)
    train = _sample(train_labels, num_shots, rng)
    val = None if val_labels is None else _sample(val_labels, min(num_shots, VAL_SHOTS_MAX), rng)
    return {"train": train, "val": val}


def sample_fewshot(labels: Sequence[int], num_shots: int | None, seed: int) -> list[int]:
    """Train indices of `num_shots` items per class (all of them for `None`); see `fewshot_indices`."""
    return fewshot_indices(labels, None, num_shots, seed)["train"]  # type: ignore[return-value]


def labels_fingerprint(labels: Sequence[int] | None) -> str | None:
    if labels is None:
        return None
    h = hashlib.sha1(",".join(str(int(y)) for y in labels).encode())
    return f"{len(labels)}:{h.hexdigest()[:16]}"


def cache_path(cache_dir: str | Path, num_shots: int, seed: int) -> Path:
    return Path(cache_dir) / f"shot_{num_shots}-seed_{seed}.json"


def _valid_indices(value: object, n: int | None) -> bool:
    if n is None:
        return value is None
    return isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in value
    )


def cached_fewshot_indices(
    train_labels: Sequence[int],
    val_labels: Sequence[int] | None,
    num_shots: int | None,
    seed: int,
    cache_dir: str | Path | None,
) -> dict[str, list[int] | None]:
    """`fewshot_indices`, read from / written to `cache_dir` when given (and writable).

    The shot count is checked against the class sizes whether or not the cache is used; a cache
    that is not JSON, not an object or holds indices out of range is named and resampled.
    """
    if num_shots is None or cache_dir is None:
        return fewshot_indices(train_labels, val_labels, num_shots, seed)
    _check_k(num_shots, "data")
    path = cache_path(cache_dir, num_shots, seed)
    fp = {"train": labels_fingerprint(train_labels), "val": labels_fingerprint(val_labels)}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            if data.get("fingerprint") == fp:
                n_val = None if val_labels is None else len(val_labels)
                if _valid_indices(data.get("train"), len(train_labels)) and _valid_indices(
                    data.get("val"), n_val
                ):
                    return {"train": data["train"], "val": data["val"]}
                raise ValueError("indices missing or out of range")
            log.warning("%s was made for other splits; resampling", path)
        except (OSError, ValueError) as err:
            log.warning("malformed few-shot cache %s (%s); resampling and rewriting it", path, err)
    out = fewshot_indices(train_labels, val_labels, num_shots, seed)
    try:
        from reprolab.data.sources import write_json

        write_json(path, {**out, "num_shots": num_shots, "seed": seed, "fingerprint": fp})
    except OSError:
        log.debug("few-shot cache not written (%s is read-only)", path.parent)
    return out


def fewshot_cache_dir(spec: DatasetSpec, root: str | Path) -> Path | None:
    """Where `spec` caches few-shot indices under `root` (None for specs without a data folder)."""
    fn = getattr(spec, "fewshot_dir", None)
    return None if fn is None else fn(Path(root))


def fewshot_splits(
    spec: DatasetSpec, root: str | Path, num_shots: int | None, seed: int, val: bool = True
) -> dict[str, ImageSplit]:
    """`{"train": k-shot train, "val": min(k, 4)-shot val}` of a spec, using the on-disk cache."""
    train = spec.load(Path(root), "train")
    val_split = spec.load(Path(root), "val") if val else None
    idx = cached_fewshot_indices(
        train.labels,
        None if val_split is None else val_split.labels,
        num_shots,
        seed,
        fewshot_cache_dir(spec, root),
    )
    out = {"train": train.subset(idx["train"])}
    if val_split is not None:
        out["val"] = val_split.subset(idx["val"])
    return out
