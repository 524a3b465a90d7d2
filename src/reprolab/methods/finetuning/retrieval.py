"""Image-text retrieval with CLIP: the evaluation routine, zero-shot retrieval and contrastive
fine-tuning with a fixed temperature (the m2-mix paper's CLIP-FT baseline; robust_finetuning.md §2.9,
§4.2-4.5).

Evaluation, per test set, and on the `val` split as `val/<key>` (model selection; evaluated in the
test pass, after the test sets, so it measures the final model):
- the standard protocol, every image against its first K captions (5 for Flickr30k / COCO):
  `i2t_r@{1,5,10}`, `t2i_r@{1,5,10}`, `rsum` (their sum) and `r1_sum` (i2t + t2i R@1);
- the m2-mix release's protocol (one caption per image, the first; N images against N captions):
  the same keys under `cap1/`, retrieval ECE (`ece_i2t`, `ece_t2i`, softmax over the N candidates of
  the similarity times the method's scale) and the embedding geometry of the (image, first caption)
  pairs: `uniformity` ([U; V]), `uniformity_code` ([U; U], the release's call), `alignment`,
  `rel_alignment`, `modality_gap`, `cos_image`, `cos_text`, `cos_pos`, `cos_neg`.
Features are L2-normalised float32; under DDP they are gathered and de-duplicated by image index.

SIMAT (optional, `simat:`; robust_finetuning.md §4.4): at the end of the test pass the method
encodes the SIMAT database images (its own preprocessing) and the transformation words (the bare
word, as the release) and logs `test/simat/simat` (best lambda), `test/simat/simat_lambda` and
`test/simat/simat@<lambda>` (`reprolab.metrics.simat`, `reprolab.data.simat`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.data.info import RetrievalInfo
from reprolab.data.simat import SimatData, SimatImages, load_simat
from reprolab.data.transforms import build_transforms
from reprolab.errors import ConfigValueError
from reprolab.methods.base import Method
from reprolab.methods.finetuning.flyp import contrastive_loss
from reprolab.metrics.retrieval import embedding_geometry, recall_at_k, retrieval_ece
from reprolab.metrics.simat import SIMAT_LAMBDAS, simat_score

log = logging.getLogger(__name__)

RECALL_KEYS = tuple(f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)) + ("rsum", "r1_sum")
CAP1_KEYS = (*(f"cap1/{k}" for k in RECALL_KEYS), "ece_i2t", "ece_t2i")
GEOMETRY_KEYS = (
    "uniformity",
    "uniformity_code",
    "alignment",
    "rel_alignment",
    "modality_gap",
    "cos_image",
    "cos_text",
    "cos_pos",
    "cos_neg",
)
ALL_KEYS = (*RECALL_KEYS, *CAP1_KEYS, *GEOMETRY_KEYS)
#: `simat:` keys and their defaults (`root` is required).
SIMAT_DEFAULTS: dict[str, Any] = {
    "root": None,  # the data root holding simat/ (reprolab.data.simat)
    "split": "dev",  # the m2-mix release evaluates the dev transformations (is_test False)
    "lambdas": list(SIMAT_LAMBDAS),
    "batch_size": 64,
    "num_workers": 0,
}


def simat_options(name: str, simat: Any) -> dict[str, Any] | None:
    """`simat:` as a full dict of options: a data root (str / path), a dict, or None (off)."""
    if simat is None:
        return None
    if isinstance(simat, (str, os.PathLike)):
        simat = {"root": simat}
    if not isinstance(simat, dict):
        raise ConfigValueError(
            f"method={name}: simat must be a data root or {{root, split, lambdas, ...}}, got "
            f"{simat!r}."
        )
    unknown = sorted(set(simat) - set(SIMAT_DEFAULTS))
    if unknown:
        raise ConfigValueError(
            f"method={name}: unknown simat option {unknown[0]!r} (options: "
            f"{', '.join(SIMAT_DEFAULTS)})."
        )
    opts = {**SIMAT_DEFAULTS, **simat}
    if not opts["root"]:
        raise ConfigValueError(
            f"method={name}: simat needs root, the data root holding simat/ "
            f"(method.simat={{root:${{paths.data_dir}},...}})."
        )
    lams = opts["lambdas"]
    if not isinstance(lams, (list, tuple)) or not lams:
        raise ConfigValueError(f"method={name}: simat.lambdas must be a non-empty list.")
    if int(opts["batch_size"]) < 1 or int(opts["num_workers"]) < 0:
        raise ConfigValueError(f"method={name}: simat.batch_size must be >= 1, num_workers >= 0.")
    opts["lambdas"] = [float(v) for v in lams]
    return opts


class RetrievalMethod(Method):
    """A CLIP method evaluated by image-text retrieval on a `RetrievalInfo` task.

    Args:
        name, model, info: see `Method`; `model` is a `CLIPBackbone` (its `trainable` says what
            trains: `none` for zero-shot, `both` for contrastive fine-tuning).
        temperature: fixed temperature tau of the contrastive logits (the release's `--tau`, 0.01)
            and of the retrieval ECE; None = the model's own logit scale.
        ece_bins: bins of the retrieval ECE.
        backbone_eval: keep the backbone in eval mode while training (the release calls
            `clip_model.eval()` before its training loop: no dropout, frozen BatchNorm statistics).
        simat: None (off), a data root holding `simat/`, or `{root, split: dev | test, lambdas,
            batch_size, num_workers}` (defaults: `SIMAT_DEFAULTS`): score SIMAT at the end of the
            test pass (`test/simat/*`). The data is read when the method is built.
        **kwargs: see `Method` (`optimizer`, `scheduler`, `post_hoc`).
    """

    info_type = RetrievalInfo
    requires = ("captions_per_image",)
    primary_metric = "test/rsum"
    #: `model.trainable` values this method works with.
    trainable_modes: ClassVar[tuple[str, ...]] = ("none",)

    def __init__(
        self,
        name: str,
        model: nn.Module | None = None,
        info: RetrievalInfo | None = None,
        temperature: float | None = None,
        ece_bins: int = 10,
        backbone_eval: bool = True,
        simat: dict[str, Any] | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, model, info, **kwargs)
        if model is None or not hasattr(model, "encode_text"):
            raise ConfigValueError(
                f"method={name} needs a CLIP model with an image and a text tower "
                f"(model=tiny_clip, clip_vit_b32, ...)."
            )
        mode = getattr(model, "trainable", "none")
        if mode not in self.trainable_modes:
            raise ConfigValueError(
                f"method={name} needs model.trainable in {list(self.trainable_modes)}, but "
                f"model={getattr(model, 'name', '?')} has trainable={mode}; set "
                f"model.trainable={self.trainable_modes[0]}."
            )
        if temperature is not None and not temperature > 0:
            raise ConfigValueError(f"method={name}: temperature must be > 0, got {temperature}.")
        self.backbone = model
        if mode == "none":
            self.freeze("backbone")
        self.temperature = temperature
        self.ece_bins = int(ece_bins)
        self.backbone_eval = bool(backbone_eval)
        self.eval_sets = [t.name for t in self.info.test_sets]
        if getattr(self.info, "val_in_test", False):
            self.eval_sets.append("val")  # its loader comes last (`RetrievalInfo.val_in_test`)
        self._collected: dict[str, list[dict[str, Tensor]]] = {}
        self.simat = simat_options(name, simat)
        self._simat_data: SimatData | None = None
        if self.simat is not None:  # read now: a missing SIMAT fails before training
            self._simat_data = load_simat(self.simat["root"], self.simat["split"])

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        keys = ALL_KEYS
        return (
            *super().metric_keys(),
            "train/*",
            *(f"test/{k}" for k in keys),
            *(f"test/*/{k}" for k in keys),
            *(f"val/{k}" for k in keys),
            "test/simat/*",
        )

    def data_requirements(self) -> dict[str, Any]:
        return {"preprocess": self.backbone.preprocess}

    def train(self, mode: bool = True) -> RetrievalMethod:
        super().train(mode)
        if self.backbone_eval:
            self.backbone.eval()
        return self

    # -- features -------------------------------------------------------------------------------
    def encode_images(self, images: Tensor) -> Tensor:
        """L2-normalised float32 image embeddings. (B, D)"""
        return F.normalize(self.backbone.encode_image(images).float(), dim=-1)

    def encode_texts(self, texts: list[str]) -> Tensor:
        """L2-normalised float32 text embeddings. (N, D)"""
        return F.normalize(self.backbone.encode_text(list(texts)).float(), dim=-1)

    def scale(self) -> Tensor:
        """1 / temperature when fixed, else exp(the model's log-scale) (with its gradient)."""
        if self.temperature is not None:
            return torch.tensor(1.0 / self.temperature, device=self.device)
        return self.backbone.model.logit_scale.exp()

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def _collect(self, key: str, batch: dict[str, Any]) -> None:
        caps: list[list[str]] = batch["captions"]
        counts = torch.tensor([len(c) for c in caps])
        texts = [c for group in caps for c in group]
        self._collected.setdefault(key, []).append(
            {
                "index": batch["index"].cpu(),
                "image": self.encode_images(batch["image"]).cpu(),
                "text": self.encode_texts(texts).cpu(),
                "counts": counts,
            }
        )

    def _gathered(self, key: str) -> tuple[Tensor, Tensor, Tensor]:
        """(image features in index order (I, D), caption features (T, D), caption -> image (T,))."""
        parts = self._collected.pop(key, [])
        if self._trainer is not None and self.trainer.world_size > 1 and dist.is_initialized():
            everyone: list[Any] = [None] * self.trainer.world_size
            dist.all_gather_object(everyone, parts)
            parts = [p for rank_parts in everyone for p in rank_parts]
        images: dict[int, Tensor] = {}
        texts: dict[int, Tensor] = {}
        for p in parts:
            start = 0
            for j, idx in enumerate(p["index"].tolist()):
                n = int(p["counts"][j])
                images.setdefault(idx, p["image"][j])  # a padded DDP sampler repeats images
                texts.setdefault(idx, p["text"][start : start + n])
                start += n
        order = sorted(images)
        u = torch.stack([images[i] for i in order])
        v = torch.cat([texts[i] for i in order])
        owner = torch.cat(
            [torch.full((len(texts[i]),), pos, dtype=torch.long) for pos, i in enumerate(order)]
        )
        return u, v, owner

    def retrieval_metrics(self, u: Tensor, v: Tensor, owner: Tensor) -> dict[str, float]:
        """Every evaluation key (module docstring) of one set's features."""
        out = recall_at_k(u @ v.t(), owner)
        # `owner` is sorted: each image's first caption is where its run of captions starts
        v1 = v[torch.searchsorted(owner, torch.arange(len(u)))]
        sim1 = u @ v1.t()
        out.update({f"cap1/{k}": val for k, val in recall_at_k(sim1, torch.arange(len(u))).items()})
        out.update(retrieval_ece(sim1, float(self.scale()), self.ece_bins))
        out.update(embedding_geometry(u, v1, code_compat=True))
        return out

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(self.eval_sets[dataloader_idx], batch)

    def on_test_epoch_end(self) -> None:
        out: dict[str, float] = {}
        for i, name in enumerate(self.eval_sets):
            values = self.retrieval_metrics(*self._gathered(name))
            if name == "val" and i == len(self.eval_sets) - 1:
                out.update({f"val/{k}": v for k, v in values.items()})
                continue
            out.update({f"test/{name}/{k}": v for k, v in values.items()})
            if i == 0:
                out.update({f"test/{k}": v for k, v in values.items()})
        if self._simat_data is not None:
            out.update({f"test/simat/{k}": v for k, v in self.simat_metrics().items()})
        self.log_dict(out, add_dataloader_idx=False, sync_dist=False)

    # -- SIMAT ----------------------------------------------------------------------------------
    @torch.no_grad()
    def simat_metrics(self) -> dict[str, float]:
        """SIMAT scores of the current model (`reprolab.metrics.simat`): the database images
        through the model's evaluation preprocessing, the words bare (the release tokenises the
        word alone, no prompt template). Under DDP each rank encodes every world-th image and the
        features are gathered. Every backbone module's train / eval mode is restored afterwards."""
        data, opts = self._simat_data, self.simat
        assert data is not None and opts is not None
        modes = [(m, m.training) for m in self.backbone.modules()]
        self.backbone.eval()
        try:
            world, rank = 1, 0
            if self._trainer is not None and self.trainer.world_size > 1 and dist.is_initialized():
                world, rank = self.trainer.world_size, self.trainer.global_rank
            mine = list(range(rank, len(data.image_paths), world))
            images = SimatImages(
                [data.image_paths[i] for i in mine],
                build_transforms(self.backbone.preprocess, False, False),
            )
            loader = torch.utils.data.DataLoader(
                images,
                batch_size=int(opts["batch_size"]),
                shuffle=False,
                num_workers=int(opts["num_workers"]),
            )
            feats = torch.cat([self.encode_images(x.to(self.device)).cpu() for x, _ in loader])
            if world > 1:
                everyone: list[Any] = [None] * world
                dist.all_gather_object(everyone, (mine, feats))
                u = torch.empty(len(data.image_paths), feats.shape[1])
                for idx, f in everyone:
                    u[idx] = f
            else:
                u = feats
            words = list(data.words)
            step = int(opts["batch_size"])
            w = torch.cat(
                [self.encode_texts(words[s : s + step]).cpu() for s in range(0, len(words), step)]
            )
        finally:
            for m, mode in modes:  # each module's own flag (a partly trained backbone)
                m.training = mode
        dev = self.device  # scored where the model is (8,933 x 5,859 dot products per lambda)
        return simat_score(u.to(dev), w.to(dev), lambdas=opts["lambdas"], **data.score_inputs())


class ZeroShotRetrieval(RetrievalMethod):
    """The pretrained CLIP, evaluated as it is (the zero-shot rows). Post-hoc: `train: false`."""


class CLIPFineTune(RetrievalMethod):
    """Contrastive fine-tuning of both towers on (image, caption) pairs with a FIXED temperature
    (the m2-mix release's CLIP-FT baseline: L_CLIP with tau = 0.01, the model's logit scale unused).

    The loss is the shared symmetric contrastive loss (`flyp.contrastive_loss`, open_clip's
    `ClipLoss`): under DDP each rank's rows against the global batch, gradient-equivalent to the
    single-process loss (spec §1.6). Subclasses add terms with `extra_loss`.
    """

    trainable_modes = ("both",)

    def __init__(self, *args: Any, temperature: float | None = 0.01, **kwargs: Any) -> None:
        super().__init__(*args, temperature=temperature, **kwargs)
        self.clip_loss = contrastive_loss()

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self.clip_loss = contrastive_loss(rank, world)

    def extra_loss(self, u: Tensor, v: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Terms added to L_CLIP (and their values to log) for normalised features u, v (B, D)."""
        return u.new_zeros(()), {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        u = self.encode_images(batch["image"])
        v = self.encode_texts(batch["caption"])
        loss_clip = self.clip_loss(u, v, self.scale())
        extra, parts = self.extra_loss(u, v)
        loss = loss_clip + extra
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/loss_clip", loss_clip.detach())
        for k, val in parts.items():
            self.log(f"train/{k}", val.detach() if isinstance(val, Tensor) else val)
        return loss
