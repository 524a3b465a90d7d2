"""Image-caption data module for retrieval fine-tuning (the m2-mix paper; robust_finetuning.md §4.1).

Training items are (image, caption) pairs: `train_captions: first` keeps caption 0 of each image
(the m2-mix release: one pair per image), `all` makes every (image, caption) pair a row (the usual
practice elsewhere). Evaluation items are images with their first `eval_captions` captions; the
method encodes both and ranks (`reprolab.metrics.retrieval`). Train images go through the CLIP
evaluation transform (resize + centre crop), as in the release; `train_augment` changes that.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset, default_collate

from reprolab.data.base import TaskDataModule
from reprolab.data.captions import CaptionSpec, CaptionSplit
from reprolab.data.datamodule import EpochSeededSampler
from reprolab.data.info import RetrievalInfo, TaskInfoError, TestSet
from reprolab.data.spec import get_spec
from reprolab.data.transforms import Preprocess, build_transforms
from reprolab.errors import ConfigValueError

log = logging.getLogger(__name__)

TRAIN_CAPTIONS = ("first", "all")


class _TrainPairs(Dataset):
    """Row k: (image, caption) pair k of `pairs` (image index, caption index)."""

    def __init__(self, split: CaptionSplit, pairs: list[tuple[int, int]], transform: Any) -> None:
        self.split, self.pairs, self.transform = split, pairs, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, c = self.pairs[k]
        item = self.split[i]
        return {
            "image": self.transform(item["image"].convert("RGB")),
            "caption": item["captions"][c],
            "index": i,
        }


class _EvalImages(Dataset):
    """Image i with its first `k` captions (`captions` stays a list per item: `collate_eval`)."""

    def __init__(self, split: CaptionSplit, k: int, transform: Any) -> None:
        self.split, self.k, self.transform = split, k, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.split[i]
        return {
            "image": self.transform(item["image"].convert("RGB")),
            "captions": item["captions"][: self.k],
            "index": i,
        }


def collate_eval(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation, except `captions`: a list (one per image) of lists of strings."""
    caps = [it.pop("captions") for it in items]
    out = default_collate(items)
    out["captions"] = caps
    return out


class RetrievalDataModule(TaskDataModule):
    """Train / val / test splits of one `CaptionSpec`, with the method's image preprocessing.

    Args:
        name: data config name.
        dataset: registered caption dataset (`flickr30k`, `coco_captions`, `captioned_scenes`).
        root: data root (`paths.data_dir`).
        dataset_kwargs: passed to the spec factory.
        batch_size: train batch (the release: 128; the last partial batch is dropped, P13).
        eval_batch_size: images per evaluation batch.
        num_workers: loader workers.
        train_captions: `first` (the release) or `all`.
        eval_captions: captions per image that evaluation ranks (<= the spec's `captions_per_image`).
        train_augment: False = the CLIP eval transform for training images (the release); else a
            `build_transforms` augmentation (`finetune`, `coop`).
        val: evaluate the `val` split (model selection) after training, in the test pass: its
            loader comes after the test sets' and the method logs it as `val/<key>`.
        test_sets: which of the spec's test sets to evaluate (default: all).
        drop_last: drop the last partial train batch.
        seed: shuffling seed of the train order.
    """

    accepts = ("preprocess",)

    def __init__(
        self,
        name: str,
        dataset: str,
        root: str | None = None,
        dataset_kwargs: dict | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 4,
        train_captions: str = "first",
        eval_captions: int = 5,
        train_augment: bool | str = False,
        val: bool = True,
        test_sets: list[str] | None = None,
        drop_last: bool = True,
        seed: int = 1,
    ) -> None:
        super().__init__()
        self.name = name
        self.root = Path(root) if root else Path("data")
        spec = get_spec(dataset, **dict(dataset_kwargs or {}))
        if not isinstance(spec, CaptionSpec):
            raise TaskInfoError(
                f"data={name}: dataset '{dataset}' has no captions (it is an image classification "
                "dataset); retrieval needs a caption dataset such as flickr30k, coco_captions or "
                "captioned_scenes."
            )
        self.spec: CaptionSpec = spec
        self.spec.check(self.root)
        if train_captions not in TRAIN_CAPTIONS:
            raise ConfigValueError(
                f"data={name}: train_captions must be one of {list(TRAIN_CAPTIONS)}, "
                f"got {train_captions!r}."
            )
        if not 1 <= int(eval_captions) <= self.spec.captions_per_image:
            raise ConfigValueError(
                f"data={name}: eval_captions must be in 1..{self.spec.captions_per_image} "
                f"(captions per image of {dataset}), got {eval_captions}."
            )
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.train_captions, self.eval_captions = train_captions, int(eval_captions)
        self.train_augment = train_augment
        self.use_val, self.drop_last, self.seed = bool(val), bool(drop_last), int(seed)
        self.test_sets = list(test_sets or self.spec.test_sets)
        unknown = sorted(set(self.test_sets) - set(self.spec.test_sets))
        if unknown:
            raise ConfigValueError(
                f"data={name}: unknown test sets {unknown}; available: {self.spec.test_sets}"
            )
        self.preprocess: Preprocess | None = None
        self._sets: dict[str, Dataset] = {}

    @property
    def info(self) -> RetrievalInfo:
        roles = self.spec.test_roles()
        return RetrievalInfo(
            name=self.name,
            captions_per_image=self.eval_captions,
            train_captions=self.train_captions,
            test_sets=tuple(TestSet(n, roles[n]) for n in self.test_sets),
            val_in_test=self.use_val,
        )

    def set_preprocess(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess
        self._sets.clear()

    def train_pairs(self, split: CaptionSplit) -> list[tuple[int, int]]:
        """(image, caption) index pairs of the training rows."""
        if self.train_captions == "first":
            return [(i, 0) for i in range(len(split))]
        return [(i, c) for i, caps in enumerate(split.captions) for c in range(len(caps))]

    def setup(self, stage: str | None = None) -> None:
        if self.preprocess is None:
            raise RuntimeError(
                f"data={self.name}: configure(preprocess=...) must run before the loaders are used."
            )
        if self._sets:
            return
        eval_tf = build_transforms(self.preprocess, False, False)
        train_tf = (
            eval_tf
            if self.train_augment in (False, "none")
            else build_transforms(self.preprocess, True, self.train_augment)
        )
        train = self.spec.load(self.root, "train")
        self._sets["train"] = _TrainPairs(train, self.train_pairs(train), train_tf)
        if self.use_val:
            self._sets["val"] = _EvalImages(
                self.spec.load(self.root, "val"), self.eval_captions, eval_tf
            )
        for n in self.test_sets:
            self._sets[f"test:{n}"] = _EvalImages(
                self.spec.load(self.root, n), self.eval_captions, eval_tf
            )
        log.info(
            "%s: %s",
            self.name,
            ", ".join(f"{k} {len(v)}" for k, v in self._sets.items()),
        )

    def train_dataloader(self) -> DataLoader:
        ds = self._sets["train"]
        if self.drop_last and len(ds) < self.batch_size:
            raise ConfigValueError(
                f"data={self.name}: {len(ds)} training pairs cannot fill one batch of "
                f"{self.batch_size} with drop_last; lower data.batch_size."
            )
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(ds), self.seed),
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, ds: Dataset) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            collate_fn=collate_eval,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> list:
        # Validation is part of the test pass (`val_in_test`): its metrics are then those of the
        # final model (a `max_steps` run ends mid-epoch, after the last epoch-end validation).
        return []

    def test_dataloader(self) -> list[DataLoader]:
        names = [f"test:{n}" for n in self.test_sets] + (["val"] if self.use_val else [])
        return [self._eval_loader(self._sets[n]) for n in names]
