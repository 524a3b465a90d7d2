"""Deterministic k-shot sampling (CoOp protocol), cached as JSON next to the data.

CoOp (Dassl's `generate_fewshot_dataset`) seeds Python's `random` with SEED once, then for the train
split and afterwards for the val split visits the classes in order of first appearance and takes
`random.sample(items, k)` from each (all items when a class has fewer than k; it still draws when a class
has exactly k). Val uses k_val = min(k, 4). We replay that with a local `random.Random(seed)`, so the
result depends only on (labels, k, seed): not on global RNG state, devices or worker count. With CoOp's
own split files and labels in split-file order this consumes the RNG exactly as CoOp does.

The cache is `<dataset dir>/split_fewshot/shot_{k}-seed_{seed}.json` ({"train": [...], "val": [...]}
indices into the full splits, plus a fingerprint of the labels); it is reused when the fingerprint
matches and silently skipped when the folder is read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

from reprolab.data.spec import DatasetSpec, ImageSplit

log = logging.getLogger(__name__)

VAL_SHOTS_MAX = 4  # CoOp: val is sampled with min(k, 4) per class


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
    if num_shots < 1:
        raise ValueError(f"num_shots must be >= 1 or None, got {num_shots}")
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


def cached_fewshot_indices(
    train_labels: Sequence[int],
    val_labels: Sequence[int] | None,
    num_shots: int | None,
    seed: int,
    cache_dir: str | Path | None,
) -> dict[str, list[int] | None]:
    """`fewshot_indices`, read from / written to `cache_dir` when given (and writable)."""
    if num_shots is None or cache_dir is None:
        return fewshot_indices(train_labels, val_labels, num_shots, seed)
    path = cache_path(cache_dir, num_shots, seed)
    fp = {"train": labels_fingerprint(train_labels), "val": labels_fingerprint(val_labels)}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("fingerprint") == fp:
                return {"train": data["train"], "val": data["val"]}
            log.warning("%s was made for other splits; resampling", path)
        except (OSError, ValueError, KeyError) as err:
            log.warning("unreadable few-shot cache %s (%s); resampling", path, err)
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
