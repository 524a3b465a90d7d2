"""Few-shot image classification data module: k-shot train, val, and named test sets.

Real datasets follow CoOp: k shots per class for train and min(k, 4) per class for val, sampled with
`fewshot_seed` and cached next to the data (`reprolab.data.fewshot.fewshot_splits`). Synthetic specs
have no data folder: their k-shot train is sampled the same way (uncached) and val is kept whole.
Test sets whose labels live in a subset of the label space of the training classes (ImageNet-A/R,
ObjectNet evaluated with a 1000-way ImageNet head) come with `test_index_groups`.

`sampler` picks the train order: null (a shuffle per epoch), `group_balanced` (with replacement, item
weight 1 / size of its group: group_DRO's `--reweight_groups`, SubpopBench's ReSample) or
`class_balanced` (the same with classes). A split that lacks one of the data's groups is logged at
setup and listed in `missing_groups`: its worst- and average-group accuracy are over the groups present.

`cache_images: true` transforms every item of a split once and keeps the tensors for the life of the
process, keyed by everything they depend on (dataset and its kwargs, root, shots, preprocess, ...),
so a multirun in one process (the local launcher) builds each split once for all its jobs. Only
splits with deterministic transforms are cached (val and test; train when `train_augment` is off and
no caption pairs), so the batches are the ones an uncached run sees. It costs the tensors' memory
(3·H·W floats per item): meant for the in-memory synthetic data, not for full-size datasets.

A method with a frozen image tower may ask for `features=FeatureSource(...)`
(`reprolab.data.feature_cache`): every split is then encoded once into the persistent feature cache
under the data root (reused by every later run, seed and method of the same key) and served as
`image` = the feature vector (D,); an augmented train split cannot be cached and fails in one line.
The encoding runs in `prepare_data` (local rank 0 under DDP; the other ranks read the files at
setup), on this process's GPU when there is one (`encoding_device`).

`subsample_classes` (`reprolab.data.classsplit`): `all` (default), `base` or `new` (CoOp's class
halves, relabelled), or `base_to_new` (train / val on base classes; the first test set split into
`base` and `new`, the latter a role-`new` set with its own class names). The subsets are taken last,
from the full built splits, so cached features and materialised splits are shared by all settings.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from reprolab.data.base import TaskDataModule
from reprolab.data.classsplit import SUBSAMPLE, ClassSubset, base_new_classes
from reprolab.data.fewshot import check_shots, fewshot_cache_dir, fewshot_splits
from reprolab.data.info import ImageClassificationInfo, TestSet
from reprolab.data.spec import DatasetSpec, ImageSplit, get_spec
from reprolab.data.transforms import Preprocess, build_transforms
from reprolab.errors import ConfigValueError

log = logging.getLogger(__name__)


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch that depends only on (seed, epoch).

    Lightning calls `set_epoch` before every epoch, so a run resumed at epoch e sees the same order
    as one that was never interrupted (a plain seeded generator would restart its sequence).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        # Chunked: ImageNet's caption pairs are 102.5 M indices (0.8 GB as int64; a list of Python
        # ints would be ~4 GB). The permutation is the same as one `tolist()` of it.
        for chunk in torch.randperm(self.n, generator=g).split(1 << 16):
            yield from chunk.tolist()


SAMPLERS = (None, "group_balanced", "class_balanced")


def check_sampler(name: str, sampler: str | None) -> None:
    """A `sampler` value every data module accepts (`SAMPLERS`), else one line naming them."""
    if sampler not in SAMPLERS:
        raise ConfigValueError(
            f"data={name}: sampler must be null, group_balanced or class_balanced, got {sampler!r}."
        )


class WeightedEpochSampler(Sampler[int]):
    """`len(weights)` indices drawn with replacement, index i with probability ∝ weights[i].

    Like `EpochSeededSampler`, the draw depends only on (seed, epoch) (Lightning calls `set_epoch`),
    so a resumed run sees the same indices as one that was never interrupted.
    """

    def __init__(self, weights: Sequence[float] | torch.Tensor, seed: int) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.ndim != 1 or len(w) == 0 or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("WeightedEpochSampler needs a non-empty 1-D tensor of weights >= 0.")
        self.cum = torch.cumsum(w / w.sum(), 0)
        self.n, self.seed, self.epoch = len(w), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        top = self.n - 1
        for start in range(0, self.n, 1 << 16):
            u = torch.rand(min(1 << 16, self.n - start), generator=g, dtype=torch.float64)
            yield from torch.searchsorted(self.cum, u, right=True).clamp_(max=top).tolist()


def balanced_weights(keys: Sequence[int]) -> torch.Tensor:
    """Weight 1 / (number of items with the same key) per item: every key is drawn equally often."""
    k = torch.as_tensor(list(keys), dtype=torch.long)
    return 1.0 / torch.bincount(k).double()[k]


def _split_groups(ds: Dataset) -> list[int] | None:
    """Per-item groups of a built split (`_Transformed`, or `_CaptionPairs` over one), else None."""
    if isinstance(ds, _CaptionPairs):
        groups = _split_groups(ds.images)
        t = ds.num_templates
        return None if groups is None else [g for g in groups for _ in range(t)]
    return getattr(getattr(ds, "split", None), "groups", None)


def _split_labels(ds: Dataset) -> list[int]:
    if isinstance(ds, _CaptionPairs):
        return [y for y in _split_labels(ds.images) for _ in range(ds.num_templates)]
    return list(ds.split.labels)


def report_missing_groups(
    name: str, split: str, groups: Sequence[int], num_groups: int, num_attrs: int = 2
) -> list[int]:
    """The groups of [0, num_groups) with no item in `groups`, sorted; logged as a warning when any
    (worst- and average-group accuracy of that split are then over the groups present)."""
    missing = sorted(set(range(num_groups)) - set(groups))
    if missing:
        log.warning(
            "%s: split %s has no item of group(s) %s of %d (group = %d*y + a); its worst- and "
            "average-group accuracy are over the %d groups present",
            name,
            split,
            missing,
            num_groups,
            num_attrs,
            num_groups - len(missing),
        )
    return missing


class _Transformed(Dataset):
    def __init__(self, split: ImageSplit, transform: Callable[[Any], Any]) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.split[i])
        item["image"] = self.transform(item["image"].convert("RGB"))
        item["index"] = i
        return item


class _Materialized(Dataset):
    """A `_Transformed` split with every item transformed once, held as tensors (`cache_images`)."""

    def __init__(self, ds: _Transformed) -> None:
        self.split = ds.split
        items = [ds[i] for i in range(len(ds))]
        self.images = torch.stack([it.pop("image") for it in items]) if items else None
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.items[i])
        item["image"] = self.images[i]
        return item


class _FeatureSplit(Dataset):
    """Cached features served as `image` (D,), with the image split's labels and groups."""

    def __init__(self, features: Dataset, images: Dataset) -> None:
        self.features, self.split = features, images.split

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.features[i])
        item["image"] = item.pop("features")
        return item


# cache_images: materialised splits per key (`ClassificationDataModule._cache_key`), most recent last.
_SPLIT_CACHE: OrderedDict[tuple, dict[str, Dataset]] = OrderedDict()
_SPLIT_CACHE_SIZE = 4


class _CaptionPairs(Dataset):
    """The (image, template) product of a train split: item k is image k // T with template k % T.

    FLYP / CaRot train on one (image, caption) pair per row of a table that pairs every train image
    with every template (1.28 M x 80 rows for ImageNet; robust_finetuning.md §2.5, §5). The table is
    never written: an item carries `template` (an index) and the method formats the caption from
    its class name. A shuffled pass over this product is the released loader's distribution.
    """

    def __init__(self, images: Dataset, num_templates: int) -> None:
        self.images, self.num_templates = images, int(num_templates)

    def __len__(self) -> int:
        return len(self.images) * self.num_templates

    def __getitem__(self, k: int) -> dict[str, Any]:
        item = self.images[k // self.num_templates]
        item["template"] = k % self.num_templates
        return item


class ClassificationDataModule(TaskDataModule):
    """Train (k-shot) / val / test sets of one dataset spec, with the method's input transforms.

    The spec is checked at construction so a missing dataset fails before any model is built.
    `info` is an `ImageClassificationInfo`; the method's `preprocess` requirement arrives through
    `configure(preprocess=...)` (or `set_preprocess`) before the loaders are used. A contrastive
    fine-tuning method asks for `caption_pairs=True`: the train loader then runs over every
    (train image, template) pair, each item with its `template` index (`_CaptionPairs`), and
    `steps_per_epoch` (the trainer's `limit_train_batches`) sets what an epoch is.

    `test_index_groups[name]` is None for a test set labelled in the training label space, else the
    list, per class of that set, of the training-class indices it covers (`project_logits`).
    """

    accepts = ("preprocess", "caption_pairs", "features")

    def __init__(
        self,
        name: str,
        dataset: str,
        root: str | None = None,
        dataset_kwargs: dict | None = None,
        num_shots: int | None = 16,
        fewshot_seed: int = 1,
        train_augment: bool | str = True,
        batch_size: int = 32,
        eval_batch_size: int = 100,
        num_workers: int = 0,
        val: bool = True,
        test_sets: list[str] | None = None,
        drop_last: bool = True,
        sampler: str | None = None,
        cache_images: bool = False,
        subsample_classes: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.dataset = dataset
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.cache_images = bool(cache_images)
        self.root = Path(root) if root else Path("data")
        check_sampler(name, sampler)
        self.spec: DatasetSpec = get_spec(dataset, **dict(dataset_kwargs or {}))
        if sampler == "group_balanced" and not self.spec.num_groups:
            raise ConfigValueError(
                f"data={name}: sampler=group_balanced needs group labels and dataset {dataset} has "
                "none (num_groups is null); use sampler=class_balanced or null."
            )
        self.sampler = sampler
        subsample_classes = subsample_classes or "all"
        if subsample_classes not in SUBSAMPLE:
            raise ConfigValueError(
                f"data={name}: subsample_classes must be one of {', '.join(SUBSAMPLE)}, got "
                f"{subsample_classes!r}."
            )
        self.subsample_classes = subsample_classes
        self.spec.check(self.root)
        self.num_shots = num_shots
        self.fewshot_seed = fewshot_seed
        self.train_augment = train_augment
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.use_val = val
        self.drop_last = drop_last
        self.test_sets = list(test_sets or self.spec.test_sets)
        unknown = set(self.test_sets) - set(self.spec.test_sets)
        if unknown:
            raise ValueError(
                f"{name}: unknown test sets {sorted(unknown)}; available: {self.spec.test_sets}"
            )
        groups = getattr(self.spec, "test_index_groups", None) or {}  # read after check()
        self.test_index_groups: dict[str, list[list[int]] | None] = {
            n: groups.get(n) for n in self.test_sets
        }
        self.preprocess: Preprocess | None = None
        self.caption_pairs = False
        self.features: Any = None  # a FeatureSource: serve cached features (set_features)
        self._splits: dict[str, Dataset] = {}
        self._shots_checked = False
        self.missing_groups: dict[str, list[int]] = {}  # split -> groups absent from it (setup)
        self._halves: tuple[list[int], list[int]] | None = None
        if subsample_classes != "all" and len(self.test_sets) > 1 and test_sets is not None:
            raise ConfigValueError(
                f"data={name}: subsample_classes={subsample_classes} evaluates the first test set "
                f"only; set data.test_sets to one set (got {self.test_sets})."
            )

    def class_halves(self) -> tuple[list[int], list[int]]:
        """(base, new) label ids of the full label space (`base_new_classes` of the train labels)."""
        if self._halves is None:
            self._halves = base_new_classes(self.spec.load(self.root, "train").labels)
        return self._halves

    @property
    def train_classes(self) -> list[int]:
        """Label ids of the full label space that train (and are `info.classnames`), in order."""
        if self.subsample_classes == "all":
            return list(range(len(self.spec.classnames)))
        base, new = self.class_halves()
        return new if self.subsample_classes == "new" else base

    @property
    def classnames(self) -> list[str]:
        names = self.spec.classnames
        if self.subsample_classes == "all" or not names:
            return names
        return [names[i] for i in self.train_classes]

    @property
    def eval_test_sets(self) -> list[str]:
        """Names of the test sets as the method sees them (`base`, `new` for base_to_new)."""
        if self.subsample_classes == "base_to_new":
            return ["base", "new"]
        return list(self.test_sets if self.subsample_classes == "all" else self.test_sets[:1])

    @property
    def templates(self) -> list[str]:
        return self.spec.templates

    @property
    def num_groups(self) -> int | None:
        return self.spec.num_groups

    @property
    def info(self) -> ImageClassificationInfo:
        roles = self.spec.test_roles()
        groups = self.test_index_groups
        if self.subsample_classes == "base_to_new":
            new = tuple(self.spec.classnames[i] for i in self.class_halves()[1])
            test_sets = (TestSet("base", "id"), TestSet("new", "new", classnames=new))
        else:
            test_sets = tuple(
                TestSet(
                    n,
                    roles[n],
                    None
                    if groups[n] is None
                    else tuple(tuple(int(i) for i in g) for g in groups[n]),
                )
                for n in self.eval_test_sets
            )
        return ImageClassificationInfo(
            name=self.name,
            classnames=tuple(self.classnames),
            templates=tuple(self.templates),
            test_sets=test_sets,
            num_groups=self.num_groups,
        )

    def set_preprocess(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess
        self._splits.clear()

    def set_features(self, source: Any) -> None:
        """Serve the frozen backbone's cached features instead of images (`FeatureSource`)."""
        self.features = source
        self._splits.clear()

    def set_caption_pairs(self, on: bool) -> None:
        if on and not self.templates:
            raise ValueError(f"data={self.name} has no templates to pair the train images with.")
        self.caption_pairs = bool(on)
        self._splits.clear()

    def prepare_data(self) -> None:
        """With cached features: build the splits (and any missing cache file) here. Lightning calls
        this on local rank 0 only, then waits at a barrier, so under DDP one process encodes and
        every rank's `setup` reads the files."""
        if self.features is not None and self.preprocess is not None:
            self.setup("fit")

    def setup(self, stage: str | None = None) -> None:
        if self.preprocess is None:
            raise RuntimeError(
                f"data={self.name}: configure(preprocess=...) must run before the loaders are used."
            )
        if self._splits:
            return
        key = self._cache_key() if self.cache_images else None
        if key is not None and key in _SPLIT_CACHE:
            _SPLIT_CACHE.move_to_end(key)
            self._splits = dict(_SPLIT_CACHE[key])
            self._serve_features()
            self._subsample()
            self._check_groups()
            log.info("%s: transformed splits reused from this process (cache_images)", self.name)
            return
        # CoOp's val subset only where there is a data folder to cache it in (real datasets).
        real = fewshot_cache_dir(self.spec, self.root) is not None
        parts = fewshot_splits(
            self.spec, self.root, self.num_shots, self.fewshot_seed, val=self.use_val and real
        )
        self._splits["train"] = _Transformed(
            parts["train"], build_transforms(self.preprocess, True, self.train_augment)
        )
        if self.caption_pairs:
            self._splits["train"] = _CaptionPairs(self._splits["train"], len(self.templates))
        test_tf = build_transforms(self.preprocess, False, False)
        if self.use_val:
            val = parts["val"] if real else self.spec.load(self.root, "val")
            self._splits["val"] = _Transformed(val, test_tf)
        for name in self.test_sets if self.subsample_classes == "all" else self.test_sets[:1]:
            self._splits[f"test:{name}"] = _Transformed(self.spec.load(self.root, name), test_tf)
        if key is not None:
            self._materialize(key)
        self._serve_features()
        self._subsample()
        self._check_groups()
        sizes = {k: len(v) for k, v in self._splits.items()}
        log.info(
            "%s: %d classes, %s-shot, split sizes %s",
            self.name,
            len(self.classnames),
            self.num_shots,
            sizes,
        )

    def _serve_features(self) -> None:
        """With a `FeatureSource`: every split from the persistent feature cache (built once)."""
        if self.features is None:
            return
        from reprolab.data.feature_cache import (
            FeatureCache,
            FeatureDataset,
            encode_split,
            encoding_device,
            split_key,
        )

        src, cache = self.features, FeatureCache(self.root)
        for split, ds in list(self._splits.items()):
            if split == "train" and (self.train_augment or self.caption_pairs):
                raise ConfigValueError(
                    f"data={self.name}: cached features need a deterministic train split, and "
                    f"this one is augmented (train_augment={self.train_augment!r}) or paired with "
                    "captions; set data.train_augment=false or method.feature_cache=false."
                )
            key = split_key(self, split, src.backbone, src.pretrained, src.weights)

            def build(ds: Dataset = ds) -> Any:
                with encoding_device(getattr(src, "module", None)) as device:
                    return encode_split(src.encode, ds, src.batch_size, device=device)

            self._splits[split] = _FeatureSplit(FeatureDataset(cache.get_or_build(key, build)), ds)

    def _subsample(self) -> None:
        """Restrict the built splits to a class half (`subsample_classes`), relabelled."""
        if self.subsample_classes == "all":
            return
        if self.caption_pairs:
            raise ConfigValueError(
                f"data={self.name}: subsample_classes={self.subsample_classes} does not combine "
                "with caption pairs; set data.subsample_classes=all."
            )
        base, new = self.class_halves()
        keep = new if self.subsample_classes == "new" else base
        first = f"test:{self.test_sets[0]}"
        out = {s: ClassSubset(self._splits[s], keep) for s in ("train", "val") if s in self._splits}
        if self.subsample_classes == "base_to_new":
            out["test:base"] = ClassSubset(self._splits[first], base)
            out["test:new"] = ClassSubset(self._splits[first], new)
        else:
            out[first] = ClassSubset(self._splits[first], keep)
        self._splits = out
        log.info(
            "%s: subsample_classes=%s: base classes %s, new classes %s",
            self.name,
            self.subsample_classes,
            base if len(base) <= 12 else f"{len(base)} ids",
            new if len(new) <= 12 else f"{len(new)} ids",
        )

    def _cache_key(self) -> tuple:
        """Everything the transformed splits depend on (`cache_images`)."""
        return (
            self.dataset,
            repr(sorted(self.dataset_kwargs.items())),
            str(self.root),
            self.num_shots,
            None if self.num_shots is None else self.fewshot_seed,
            self.use_val,
            tuple(self.test_sets),
            self.preprocess,
            self.train_augment,
            self.caption_pairs,
        )

    def _materialize(self, key: tuple) -> None:
        """Transform every item of the deterministic splits once and keep them for this process."""
        for split, ds in list(self._splits.items()):
            if split == "train" and (self.train_augment or self.caption_pairs):
                continue  # random per epoch: transformed on the fly
            if isinstance(ds, _Transformed):
                self._splits[split] = _Materialized(ds)
        _SPLIT_CACHE[key] = dict(self._splits)
        while len(_SPLIT_CACHE) > _SPLIT_CACHE_SIZE:
            _SPLIT_CACHE.popitem(last=False)

    def _check_groups(self) -> None:
        """Log, and record in `missing_groups`, each split that lacks some of the data's groups."""
        self.missing_groups = {}
        k = self.num_groups
        for split, ds in self._splits.items():
            base = ds.images if isinstance(ds, _CaptionPairs) else ds  # pairs repeat its groups
            groups = _split_groups(base) if k else None
            if groups is None:
                if split == "train" and self.sampler == "group_balanced":
                    raise ConfigValueError(
                        f"data={self.name}: sampler=group_balanced needs groups, and the train "
                        "split has none; use sampler=class_balanced or null."
                    )
                continue
            missing = report_missing_groups(self.name, split, groups, k)
            if missing:
                self.missing_groups[split] = missing

    def train_sampler(self, ds: Dataset) -> Sampler[int]:
        """The train order: a seeded shuffle, or balanced draws with replacement (`sampler`)."""
        if self.sampler is None:
            return EpochSeededSampler(len(ds), self.fewshot_seed)
        keys = _split_groups(ds) if self.sampler == "group_balanced" else _split_labels(ds)
        return WeightedEpochSampler(balanced_weights(keys), self.fewshot_seed)

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self.train_sampler(ds) if train else None,
            drop_last=train and self.drop_last and len(ds) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if not self._shots_checked and self.num_shots is not None:
            # Only a method that trains asks for this loader: a k above the largest class is an
            # error here (before the first step), classes below k are logged as capped. A post-hoc
            # method on a small tree never trains on the subset and is not refused for its k.
            labels = self.spec.load(self.root, "train").labels  # labels only, nothing decoded
            check_shots(labels, self.num_shots, self.name, "train", self.spec.classnames)
            self._shots_checked = True
        return self._loader(self._splits["train"], True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self._splits["val"], False) if self.use_val else []

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self._splits[f"test:{n}"], False) for n in self.eval_test_sets]
