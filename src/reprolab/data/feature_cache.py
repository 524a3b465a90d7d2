"""A persistent cache of image features from a frozen backbone, stored next to the data.

Methods that keep the image tower frozen (linear probes, CLIP-Adapter / Tip-Adapter style heads,
zero-shot and post-hoc OOD scorers, the head-only group baselines) see the same image features in
every epoch, every seed and every method. Those features are computed once per `FeatureKey`:
(backbone, pretrained tag, a fingerprint of the image tower's weights, dataset and its kwargs,
split, transform, shots, seed), and stored as

    <root>/features/<dataset>/<split>-<fingerprint[:16]>.pt     # tensors + the full key
    <root>/features/<dataset>/<split>-<fingerprint[:16]>.json   # the key, for humans
    <root>/features/<dataset>/index.json    # (backbone, split, shots, seed) -> the last key built

Files are written atomically (temp file + rename), so concurrent runs never read half a file. A
file is used only when the key stored inside it equals the requested one: a hash-prefix collision or
a hand-copied file is logged and rebuilt, never used. A miss names what changed since the last
build of the same (backbone, split, shots, seed) (`rebuilt: weights changed (a -> b)`), or, for a
new shot count or seed, how it differs from the closest features already cached.

Only deterministic transforms are cached: an augmented train split draws new random views every
epoch, and `transform_id` refuses it in one line. The index file is a log aid only (last writer
wins under concurrency); correctness rests on the key stored in each file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from reprolab.data.fewshot import fewshot_cache_dir
from reprolab.data.transforms import Preprocess
from reprolab.errors import ConfigValueError
from reprolab.utils.run_record import file_mode

if TYPE_CHECKING:
    from reprolab.data.datamodule import ClassificationDataModule

log = logging.getLogger(__name__)

FORMAT = "reprolab-feature-cache-v1"
PROGRESS_MIN_ITEMS = 2_000  # shorter splits encode in seconds: no progress bar
Encoded = tuple[Tensor, Tensor, Tensor | None, Tensor]  # features, labels, groups, index


def canonical_json(value: Any) -> str:
    """Sorted, compact JSON; tuples as lists, `1.0` as `1` (so `seed=1` and `seed=1.0` agree)."""

    def canon(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): canon(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [canon(x) for x in v]
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return str(v)

    return json.dumps(canon(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def state_fingerprint(module: nn.Module) -> str:
    """sha256 (hex) over a module's state dict: every tensor's name, dtype, shape and bytes.

    Keys are visited in sorted order, so it names the weights, not the registration order; buffers
    (BatchNorm statistics) count, as they change the outputs. ~30 ms for 8 M fp32 parameters.
    """
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def transform_id(preprocess: Preprocess, train: bool, augment: bool | str = False) -> str:
    """`FeatureKey.transform` of the split `build_transforms(preprocess, train, augment)` serves.

    Raises `ConfigValueError` for an augmented train split: its views are random per epoch.
    """
    if not train:
        return f"{preprocess!r} eval"  # resize + centre crop
    mode = {True: "coop", False: "none"}.get(augment, augment)
    if mode != "none":
        raise ConfigValueError(
            f"feature cache: the train split uses train_augment={augment!r} (new random views "
            "each epoch), which cannot be cached; set data.train_augment=false or encode images "
            "on the fly."
        )
    return f"{preprocess!r} train:none"  # plain resize


@dataclass(frozen=True)
class FeatureKey:
    """Everything the image features of one split depend on.

    `dataset_kwargs` may be given as a dict; it is stored as canonical JSON. `seed` is dropped
    (None) when `shots` is None: the full split does not depend on the few-shot seed.
    """

    backbone: str
    pretrained: str | None
    weights: str  # `state_fingerprint` of the frozen image tower
    dataset: str
    dataset_kwargs: str
    split: str
    transform: str  # `transform_id`
    shots: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset_kwargs, str):
            object.__setattr__(self, "dataset_kwargs", canonical_json(self.dataset_kwargs or {}))
        if self.pretrained is not None:
            object.__setattr__(self, "pretrained", str(self.pretrained))
        if self.shots is None:
            object.__setattr__(self, "seed", None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON of the key (and the file format)."""
        return hashlib.sha256(
            canonical_json({"format": FORMAT, **self.to_dict()}).encode()
        ).hexdigest()

    def slot(self) -> str:
        """The index entry this key replaces when it changes: backbone, split, shots, seed."""
        return f"{self.backbone}|{self.split}|shots={self.shots}|seed={self.seed}"

    def diff(self, other: FeatureKey | Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """`(field, other's value, this value)` for each field that differs."""
        old = other.to_dict() if isinstance(other, FeatureKey) else dict(other)
        new = self.to_dict()
        return [
            (f.name, old.get(f.name), new[f.name])
            for f in fields(self)
            if old.get(f.name) != new[f.name]
        ]


def split_key(
    dm: ClassificationDataModule,
    split: str,
    backbone: str,
    pretrained: str | None,
    weights: str,
) -> FeatureKey:
    """The key of one split of a configured `ClassificationDataModule` (after `configure`).

    Args:
        dm: the data module; its `preprocess` must be set.
        split: `train`, `val` or a test set name (`test:<name>` is accepted too).
        backbone, pretrained: the model's config name and pretrained tag / checkpoint path.
        weights: `state_fingerprint` of the frozen image tower.
    """
    if dm.preprocess is None:
        raise RuntimeError(f"data={dm.name}: configure(preprocess=...) before asking for a key.")
    split = split.removeprefix("test:")
    train = split == "train"
    if train and dm.caption_pairs:
        raise ConfigValueError(
            f"feature cache: data={dm.name} serves (image, template) caption pairs for train; "
            "cache the image features of the split without caption_pairs instead."
        )
    if train:
        shots = dm.num_shots
    elif split == "val" and fewshot_cache_dir(dm.spec, dm.root) is not None:
        shots = dm.num_shots  # a real dataset's val is the min(k, 4)-shot subset
    else:
        shots = None  # test sets, and a synthetic spec's whole val split
    return FeatureKey(
        backbone=backbone,
        pretrained=pretrained,
        weights=weights,
        dataset=dm.dataset,
        dataset_kwargs=dm.dataset_kwargs,
        split=split,
        transform=transform_id(dm.preprocess, train, dm.train_augment if train else False),
        shots=shots,
        seed=dm.fewshot_seed,
    )


@dataclass
class CachedFeatures:
    """The encoded items of one split, in split order."""

    features: Tensor  # (N, D) float32
    labels: Tensor  # (N,) long
    groups: Tensor | None  # (N,) long
    index: Tensor  # (N,) long: the item's index within the split
    key: FeatureKey

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class FeatureSource:
    """What a method with a frozen image tower hands its data module so that the data serve cached
    features (`ClassificationDataModule` requirement `features`): the key parts that name the
    backbone, and the function that encodes a batch of preprocessed images. (B, D)"""

    backbone: str
    pretrained: str | None
    weights: str  # state_fingerprint of the frozen tower
    encode: Callable[[Tensor], Tensor] = field(compare=False, repr=False)
    batch_size: int = 250
    # The module `encode` runs (the backbone): on a CUDA machine it is moved to the GPU for the
    # encoding (the data module sets up before Lightning moves the model) and back afterwards.
    module: nn.Module | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, backbone: nn.Module) -> FeatureSource:
        """The source for a frozen backbone with `encode_image` (its `name` and `pretrained`, a
        fingerprint of its weights); what a method with a frozen image tower asks its data for."""
        return cls(
            backbone=str(getattr(backbone, "name", type(backbone).__name__)),
            pretrained=getattr(backbone, "pretrained", None),
            weights=state_fingerprint(backbone),
            encode=backbone.encode_image,  # type: ignore[arg-type]
            module=backbone,
        )


@contextlib.contextmanager
def encoding_device(module: nn.Module | None) -> Iterator[torch.device]:
    """The device to encode on: this process's GPU when there is one (`module` moved there for the
    duration, then back to where it was), else the CPU."""
    if module is None or not torch.cuda.is_available():
        yield torch.device("cpu")
        return
    params = list(module.parameters())
    home = params[0].device if params else torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    module.to(device)
    try:
        yield device
    finally:
        module.to(home)


class FeatureDataset(Dataset):
    """Items `{"features": (D,), "label", ["group"], "index"}` over `CachedFeatures`."""

    def __init__(self, cached: CachedFeatures) -> None:
        self.cached = cached

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        c = self.cached
        item = {"features": c.features[i], "label": c.labels[i], "index": c.index[i]}
        if c.groups is not None:
            item["group"] = c.groups[i]
        return item

    @property
    def labels(self) -> list[int]:
        return self.cached.labels.tolist()

    @property
    def groups(self) -> list[int] | None:
        return None if self.cached.groups is None else self.cached.groups.tolist()


def _progress(total: int, enabled: bool | None) -> Any:
    """A rich progress bar on stderr (disabled: a no-op), transient so logs stay clean."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(file=sys.stderr)
    on = (total >= PROGRESS_MIN_ITEMS and console.is_terminal) if enabled is None else enabled
    return Progress(console=console, disable=not on, transient=True)


@torch.no_grad()
def encode_split(
    encode: Callable[[Tensor], Tensor],
    dataset: Dataset,
    batch_size: int,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool | None = None,
) -> Encoded:
    """Encode every item of a dataset of dicts (`image`, `label`, [`group`], [`index`]) in order.

    Args:
        encode: images (B, 3, H, W) on `device` -> features (B, D), e.g. `backbone.encode_image`.
        dataset: the split, iterated without shuffling.
        batch_size: images per forward pass.
        device: where the images go.
        num_workers: DataLoader workers.
        progress: a progress bar on stderr; None: for splits of `PROGRESS_MIN_ITEMS` items or
            more, when stderr is a terminal.

    Returns:
        features (N, D) float32 on the CPU, labels (N,), groups (N,) or None, index (N,) (the
        item's `index` when it has one, else its position).
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels, groups, index = [], [], [], []
    total = len(dataset)  # type: ignore[arg-type]
    with _progress(total, progress) as bar:
        task = bar.add_task("encoding", total=total)
        seen = 0
        for batch in loader:
            n = len(batch["label"])
            feats.append(encode(batch["image"].to(device)).float().cpu())
            labels.append(torch.as_tensor(batch["label"]).long())
            if "group" in batch:
                groups.append(torch.as_tensor(batch["group"]).long())
            idx = batch.get("index")
            index.append(
                torch.arange(seen, seen + n) if idx is None else torch.as_tensor(idx).long()
            )
            seen += n
            bar.advance(task, n)
    if not feats:
        raise ValueError("encode_split: the dataset is empty; there is nothing to encode.")
    if groups and len(groups) != len(labels):
        raise ValueError("encode_split: some items carry a `group` and others do not.")
    return (
        torch.cat(feats),
        torch.cat(labels),
        torch.cat(groups) if groups else None,
        torch.cat(index),
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _show(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:12] if re.fullmatch(r"[0-9a-f]{64}", text) else text  # a sha256: its prefix


def _show_pair(old: Any, new: Any) -> str:
    """`old -> new`; two long strings are shown by the part that differs (`...size=8, ...`)."""
    a, b = _show(old), _show(new)
    if min(len(a), len(b)) <= 40:
        return f"{a} -> {b}"
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    p = max(a.rfind(c, 0, p) for c in " (,") + 1  # back to a word boundary
    s = len(a) - min((i for i in (a.find(c, len(a) - s) for c in ",)") if i >= 0), default=len(a))

    def cut(t: str) -> str:
        return ("..." if p else "") + t[p : len(t) - s] + ("..." if s else "")

    return f"{cut(a)} -> {cut(b)}"


def _describe(diffs: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{name} changed ({_show_pair(a, b)})" for name, a, b in diffs)


def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a lab group shares the cache
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class FeatureCache:
    """Features of frozen backbones under `<root>/features/` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root) / "features"

    def path(self, key: FeatureKey) -> Path:
        return self.root / _safe(key.dataset) / f"{_safe(key.split)}-{key.fingerprint()[:16]}.pt"

    def _index_path(self, key: FeatureKey) -> Path:
        return self.root / _safe(key.dataset) / "index.json"

    def load(self, key: FeatureKey) -> CachedFeatures | None:
        """The cached features of `key`, or None when absent, unreadable or made for another key."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            stored = data["key"]
            feats, labels, groups, index = (
                data[k] for k in ("features", "labels", "groups", "index")
            )
            n = len(labels)
            if (
                feats.ndim != 2
                or len(feats) != n
                or len(index) != n
                or (groups is not None and len(groups) != n)
            ):
                raise ValueError("tensors of inconsistent lengths")
        except Exception as err:  # noqa: BLE001  (any unreadable file is rebuilt, never used)
            log.warning("feature cache %s is unreadable (%s); not used", path, err)
            return None
        if stored != key.to_dict():
            log.warning(
                "feature cache %s was made for another key (%s); not used",
                path,
                _describe(key.diff(stored)) or "format",
            )
            return None
        return CachedFeatures(
            feats.float(),
            labels.long(),
            None if groups is None else groups.long(),
            index.long(),
            key,
        )

    def save(self, cached: CachedFeatures, build_s: float | None = None) -> Path:
        """Write the features and the JSON sidecar atomically; returns the `.pt` path."""
        key, path = cached.key, self.path(cached.key)
        payload = {
            "format": FORMAT,
            "key": key.to_dict(),
            "fingerprint": key.fingerprint(),
            "features": cached.features.float().contiguous(),
            "labels": cached.labels.long(),
            "groups": None if cached.groups is None else cached.groups.long(),
            "index": cached.index.long(),
        }
        _atomic_write(path, lambda f: torch.save(payload, f), binary=True)
        meta = {
            "format": FORMAT,
            "key": key.to_dict(),
            "fingerprint": key.fingerprint(),
            "items": len(cached),
            "dim": int(cached.features.shape[1]),
            "build_s": None if build_s is None else round(build_s, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        sidecar = path.with_suffix(".json")
        _atomic_write(sidecar, lambda f: json.dump(meta, f, indent=2, sort_keys=True), binary=False)
        return path

    def _read_index(self, key: FeatureKey) -> dict[str, Any]:
        try:
            data = json.loads(self._index_path(key).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _cached_keys(self, key: FeatureKey) -> list[dict[str, Any]]:
        """The keys of every file cached for `key`'s dataset (from the JSON sidecars)."""
        out = []
        for sidecar in sorted((self.root / _safe(key.dataset)).glob("*-*.json")):
            try:
                stored = json.loads(sidecar.read_text()).get("key")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(stored, dict) and sidecar.with_suffix(".pt").is_file():
                out.append(stored)
        return out

    def _why_missing(self, key: FeatureKey) -> str:
        """Why `key` is built: `rebuilt: <field> changed (old -> new)` against the last build of
        the same (backbone, split, shots, seed); else how the closest cached key differs."""
        last = self._read_index(key).get(key.slot())
        if isinstance(last, dict) and isinstance(last.get("key"), dict):
            diffs = key.diff(last["key"])
            return f"rebuilt: {_describe(diffs)}" if diffs else "rebuilt: file missing or unusable"
        near = [
            key.diff(k)
            for k in self._cached_keys(key)
            if k.get("backbone") == key.backbone and k.get("split") == key.split
        ]
        if near:
            return f"miss (new; closest cached: {_describe(min(near, key=len))})"
        return "miss"

    def _record(self, key: FeatureKey, path: Path) -> None:
        entries = self._read_index(key)
        entries.pop(key.slot(), None)  # most recent last
        entries[key.slot()] = {
            "fingerprint": key.fingerprint(),
            "file": path.name,
            "key": key.to_dict(),
        }
        _atomic_write(
            self._index_path(key),
            lambda f: json.dump(entries, f, indent=1, sort_keys=False),
            binary=False,
        )

    def get_or_build(self, key: FeatureKey, build: Callable[[], Encoded]) -> CachedFeatures:
        """The cached features of `key`, or `build()` (e.g. `encode_split`) saved under it.

        Logs one line: a hit (path), or a miss / rebuild naming what changed, items and seconds.
        A read-only cache folder is logged and the built features are returned unsaved.
        """
        what = f"{key.backbone} {key.dataset}/{key.split}"
        cached = self.load(key)
        if cached is not None:
            log.info("feature cache hit: %s, %d items, %s", what, len(cached), self.path(key))
            return cached
        why = self._why_missing(key)
        start = time.perf_counter()
        feats, labels, groups, index = build()
        secs = time.perf_counter() - start
        groups = None if groups is None else groups.long().cpu()
        cached = CachedFeatures(
            feats.float().cpu(), labels.long().cpu(), groups, index.long().cpu(), key
        )
        try:
            path = self.save(cached, secs)
            self._record(key, path)
        except OSError as err:
            log.warning(
                "feature cache %s; built %s: %d items in %.2f s, not saved (%s)",
                why,
                what,
                len(cached),
                secs,
                err,
            )
            return cached
        log.info(
            "feature cache %s; built %s: %d items in %.2f s -> %s",
            why,
            what,
            len(cached),
            secs,
            path,
        )
        return cached
