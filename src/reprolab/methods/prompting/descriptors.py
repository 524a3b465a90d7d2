"""Comparative descriptors (Comparative-CLIP) and DCLIP: mean similarity to described classes.

"Enhancing Visual Classification using Comparative Descriptors" (WACV 2025, arXiv 2411.05357; code
`hk1ee/Comparative-CLIP`), spec robustness_ood_prompting.md §7, and its baselines CLIP (the class-name
prompt) and DCLIP (Menon & Vondrick, ICLR 2023). Training-free (`train: false`) on frozen features:

- score_c(x) = mean_{d in D_c} cos(phi_I(x), phi_T(s(c, d))), s(c, d) = "A photo of a {c}, which (is|has)
  {d}." (`reprolab.data.descriptors.descriptor_sentence`, §7.1 step 3); the prediction is the argmax.
  The mean of cosines is x_hat . mean_d t_hat_d, so each class is one (unnormalised) mean text vector.
- `descriptors`: `comparative` (D_c = features telling c from its most similar classes), `plain`
  (DCLIP's per-class features) or `none` (the CLIP row: D_c empty, the one prompt "A photo of a {c}.").
  A class whose list is empty also gets the class prompt alone (upstream replaces [] by [""]).
- Filtering (§7.1 step 4, `filter_k`): mu_c = mean image feature of the `data.num_shots` training
  images of class c drawn with `data.fewshot_seed` (the data module's k-shot train split);
  tau_c = min(cos(phi_T("A photo of a {c}."), mu_c), 0.3); the unique descriptors with
  cos(phi_T(s(c, d)), mu_c) > tau_c are kept, the `filter_k` most similar of them.
- Logged: `test/acc` and the rest of the classification routine, `test/top5_acc` (and per test set
  `test/<set>/top5_acc`; micro top-5 as upstream's torchmetrics `Accuracy(top_k=5)`), and
  `test/descriptors_per_class` (mean number of descriptors used per class after filtering).

Logits are `logit_scale * score_c` (CLIP's convention, as the zero-shot method); upstream applies the
softmax to the raw mean similarity. Accuracies are the same; ECE / NLL are at CLIP's scale.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from reprolab.data.descriptors import (
    DEFAULT_PREFIX,
    KINDS,
    class_sentence,
    descriptor_sentence,
    load_descriptors,
)
from reprolab.data.info import ImageClassificationInfo
from reprolab.errors import ConfigValueError
from reprolab.methods.prompting.frozen import FrozenCLIPMethod
from reprolab.metrics.projection import project_logits

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = (*KINDS, "none")
TAU_CAP = 0.3  # §7.1 step 4, upstream filter_descriptors.py
# The filter script builds its sentences with the default prefix whatever prefix classification uses
# (it runs once, before base_main.py's `--label_before_text`); so do we.
FILTER_PREFIX = DEFAULT_PREFIX
TOP_K = 5


def filter_descriptors(
    descriptors: list[str],
    sentence_emb: Tensor,
    class_emb: Tensor,
    mu: Tensor,
    k: int,
    cap: float = TAU_CAP,
) -> tuple[list[str], float, Tensor]:
    """Comparative-CLIP's filter for one class (§7.1 step 4).

    Args:
        descriptors: the class's unique descriptors.
        sentence_emb: text embeddings of their sentences s(c, d) (N, D), any norm.
        class_emb: text embedding of "A photo of a {c}." (D,), any norm.
        mu: mean image feature of the class's shot images (D,), any norm.
        k: how many to keep at most.
        cap: the threshold's upper bound (0.3).

    Returns:
        The kept descriptors, most similar to mu first (ties keep file order); tau_c; and the
        similarity of every descriptor to mu (N,).
    """
    mu = F.normalize(mu.float(), dim=-1)
    tau = min(float(F.normalize(class_emb.float(), dim=-1) @ mu), cap)
    sims = F.normalize(sentence_emb.float(), dim=-1) @ mu  # (N,)
    passed = [i for i in range(len(descriptors)) if float(sims[i]) > tau]
    passed.sort(key=lambda i: -float(sims[i]))  # stable: ties keep file order
    return [descriptors[i] for i in passed[:k]], tau, sims


class DescriptorCLIP(FrozenCLIPMethod):
    """Zero-shot classification by the mean similarity to descriptor sentences of each class.

    Args:
        descriptors: `comparative`, `plain` (DCLIP) or `none` (CLIP's class-name prompt).
        descriptor_root: `<data_root>/descriptors`, where generated files live
            (`<root>/<dataset>/<kind>.json`); packaged files are the fallback.
        descriptor_dataset: the dataset name the files are kept under (None: the data's name).
        descriptor_file: an explicit descriptor file, instead of the lookup.
        label_before_text: the sentence prefix (§7.5: "A photo of a " or "A photo of a {concept}: a ").
        filter_k: keep at most this many descriptors per class after filtering (None: no filtering).
            The shot images are the data module's k-shot train split (`data.num_shots`,
            `data.fewshot_seed`).
        text_batch_size: sentences per text-encoder call.
        **kwargs: see `FrozenCLIPMethod` (`cache_image_features`, ...).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module | None = None,
        info: ImageClassificationInfo | None = None,
        descriptors: str = "comparative",
        descriptor_root: str | None = None,
        descriptor_dataset: str | None = None,
        descriptor_file: str | None = None,
        label_before_text: str = DEFAULT_PREFIX,
        filter_k: int | None = None,
        text_batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, model, info, **kwargs)
        if descriptors not in MODES:
            raise ConfigValueError(
                f"method={name}: descriptors must be one of {list(MODES)}, got {descriptors!r}."
            )
        if filter_k is not None and (int(filter_k) < 1 or descriptors == "none"):
            raise ConfigValueError(
                f"method={name}: filter_k must be null or a positive count of descriptors to "
                f"keep, with descriptors=comparative or plain (got filter_k={filter_k!r}, "
                f"descriptors={descriptors})."
            )
        self.mode = descriptors
        self.descriptor_root = descriptor_root
        self.descriptor_dataset = descriptor_dataset or self.info.name
        self.descriptor_file = descriptor_file
        self.prefix = str(label_before_text)
        self.filter_k = None if filter_k is None else int(filter_k)
        self.text_batch_size = int(text_batch_size)
        # Class name -> its descriptor list (as read; filtering replaces the task's classes' lists).
        self.table: dict[str, list[str]] = {}
        names = list(self.classnames)
        for spec in self.test_specs:  # new-class sets fail now, not after the ID test set
            names += [c for c in spec.classnames or () if c not in names]
        self._read(names)
        self.filtered = False
        self._heads: dict[tuple[str, ...], Tensor] = {}
        self._unfiltered_warned = False
        self.top5_metrics = nn.ModuleList(
            MetricCollection(
                {"top5_acc": MulticlassAccuracy(n, top_k=min(TOP_K, n), average="micro")}
            )
            for n in self._test_sizes()
        )

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        own = ("test/top5_acc", "test/*/top5_acc", "test/descriptors_per_class")
        return (*super().metric_keys(), *own)

    def _test_sizes(self) -> list[int]:
        c = len(self.classnames)
        return [
            len(t.classnames) if t.classnames is not None else c if g is None else len(g)
            for t, g in zip(self.test_specs, self.test_index_groups, strict=True)
        ]

    # -- descriptors --------------------------------------------------------------------------
    def _read(self, classnames: list[str]) -> None:
        """Read the descriptors of `classnames` not yet known (one-line error for missing ones)."""
        todo = [c for c in classnames if c not in self.table]
        if not todo:
            return
        if self.mode == "none":
            self.table.update({c: [] for c in todo})
            return
        lists = load_descriptors(
            self.descriptor_dataset, self.mode, todo, self.descriptor_root, self.descriptor_file
        )
        self.table.update(zip(todo, lists, strict=True))

    def sentences(self, classname: str) -> list[str]:
        """The prompts averaged for a class: s(c, d) per descriptor, or the class prompt alone."""
        ds = self.table[classname]
        if not ds:
            return [class_sentence(classname, self.prefix)]
        return [descriptor_sentence(classname, d, self.prefix) for d in ds]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Tensor:
        """L2-normalised float32 text embeddings, `text_batch_size` at a time. (N, D)"""
        out = []
        for i in range(0, len(texts), self.text_batch_size):
            emb = self.backbone.encode_text(texts[i : i + self.text_batch_size]).float()
            out.append(F.normalize(emb, dim=-1))
        return torch.cat(out)

    def class_head(self, classnames: list[str]) -> Tensor:
        """Per class, the mean of its normalised sentence embeddings (not renormalised). (C, D)"""
        key = tuple(classnames)
        if key not in self._heads:
            self._read(list(classnames))
            if self.filter_k is not None and not self.filtered:
                self._warn_unfiltered(classnames)
            per_class = [self.sentences(c) for c in classnames]
            flat = [s for group in per_class for s in group]
            owner = torch.repeat_interleave(torch.tensor([len(g) for g in per_class]))
            emb = self.encode(flat)  # (N, D)
            sums = torch.zeros(len(classnames), emb.shape[1], device=emb.device)
            sums.index_add_(0, owner.to(emb.device), emb)
            counts = torch.bincount(owner, minlength=len(classnames)).to(emb.device)
            self._heads[key] = sums / counts[:, None].float()
        return self._heads[key]

    def _warn_unfiltered(self, classnames: list[str]) -> None:
        unfiltered = [c for c in classnames if c not in self.classnames]
        if unfiltered and not self._unfiltered_warned:
            # DEVIATION: filtering needs training images of a class; new classes (base-to-new) have
            # none, so their descriptors are used unfiltered.
            log.warning(
                "%s: %d classes without training images (e.g. %s) use their descriptors unfiltered",
                self.name,
                len(unfiltered),
                unfiltered[0],
            )
            self._unfiltered_warned = True

    def class_logits(self, features: Tensor, classnames: list[str]) -> Tensor:
        head = self.class_head(list(classnames)).to(features.device)
        feats = F.normalize(features.float(), dim=-1)
        return self.backbone.logit_scale * feats @ head.t()  # (B, C)

    # -- filtering ------------------------------------------------------------------------------
    @torch.no_grad()
    def shot_features(self, datamodule: Any) -> tuple[Tensor, Tensor]:
        """Image features and labels of the data module's k-shot train split, in split order."""
        if getattr(datamodule, "train_augment", False) and not self.cache_image_features:
            raise ConfigValueError(
                f"method={self.name}: filtering reads the train images once, unaugmented (upstream "
                f"encodes them plainly), but data={self.info.name} augments them; set "
                "data.train_augment=false."
            )
        # DEVIATION: upstream's extract_image_features.py converts the train images to grayscale
        # (3 channels) and resizes them to 224 x 224 before encoding them for mu_c; here they go
        # through the data's own unaugmented train transform (colour, the backbone's resize). The
        # shot images are the data module's seeded k-shot draw, not upstream's `random.sample`.
        loader = datamodule.train_dataloader()
        batch_size = getattr(datamodule, "eval_batch_size", None) or loader.batch_size or 256
        feats, labels = [], []
        for batch in DataLoader(loader.dataset, batch_size=batch_size, shuffle=False):
            feats.append(self.image_features(batch["image"].to(self.device)))
            labels.append(torch.as_tensor(batch["label"]))
        return torch.cat(feats), torch.cat(labels).to(self.device)

    @torch.no_grad()
    def apply_filter(self, features: Tensor, labels: Tensor) -> None:
        """Filter the task classes' descriptors with the class means of `features` (§7.1 step 4)."""
        assert self.filter_k is not None
        counts = torch.bincount(labels.long().cpu(), minlength=len(self.classnames))
        empty = [c for c, n in zip(self.classnames, counts.tolist(), strict=True) if n == 0]
        if empty:
            raise ConfigValueError(
                f"method={self.name}: filtering needs training images of every class, and the "
                f"train split has none of {len(empty)} classes (e.g. {empty[0]!r}); raise "
                "data.num_shots or set method.filter_k=null."
            )
        class_emb = self.encode([class_sentence(c, FILTER_PREFIX) for c in self.classnames])
        kept_total = 0
        for i, c in enumerate(self.classnames):
            unique = list(dict.fromkeys(self.table[c]))  # upstream: list(set(...))
            if not unique:
                continue
            mu = features[labels == i].float().mean(dim=0)  # mean of unnormalised features
            sent = self.encode([descriptor_sentence(c, d, FILTER_PREFIX) for d in unique])
            kept, _, _ = filter_descriptors(unique, sent, class_emb[i], mu, self.filter_k)
            self.table[c] = kept
            kept_total += len(kept)
        self.filtered = True
        self._heads.clear()
        log.info(
            "%s: filtered to %.2f descriptors per class (k=%d, %d to %d train images per class)",
            self.name,
            kept_total / len(self.classnames),
            self.filter_k,
            int(counts.min()),
            int(counts.max()),
        )

    def on_test_start(self) -> None:
        if self.filter_k is not None and not self.filtered:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None:
                raise ConfigValueError(
                    f"method={self.name}: filtering reads the data module's train split, and the "
                    "trainer has none; pass `datamodule=` to trainer.test or set filter_k=null."
                )
            self.apply_filter(*self.shot_features(datamodule))
        self.class_head(list(self.classnames))  # encode once, on the test device

    def descriptors_per_class(self) -> float:
        """Mean number of descriptors per task class (after filtering; 0 for the class prompt)."""
        return sum(len(self.table[c]) for c in self.classnames) / len(self.classnames)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def _update(
        self,
        metrics: MetricCollection,
        batch: dict[str, Tensor],
        index_groups: list[list[int]] | None = None,
        collect_scores: bool = False,
        raw: Tensor | None = None,
    ) -> None:
        raw = (self.eval_logits(batch["image"]) if raw is None else raw).float()
        super()._update(metrics, batch, index_groups, collect_scores, raw=raw)
        for i, m in enumerate(self.test_metrics):
            if m is metrics:  # a test set (not validation): its top-5 accuracy as well
                self.top5_metrics[i].update(project_logits(raw, index_groups), batch["label"])

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        out: dict[str, float] = {"test/descriptors_per_class": self.descriptors_per_class()}
        for i, (spec, m) in enumerate(zip(self.test_specs, self.top5_metrics, strict=True)):
            if spec.role == "ood":
                continue
            value = 100.0 * float(m.compute()["top5_acc"])
            out[f"test/{spec.name}/top5_acc"] = value
            if i == 0:
                out["test/top5_acc"] = value
            m.reset()
        self.log_dict(out, add_dataloader_idx=False)
