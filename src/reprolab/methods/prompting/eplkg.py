"""EPLKG: Efficient Prompt Learning with Knowledge Graph (arXiv 2304.10805 v3; v2 "RPLKG: Robust
Prompt Learning with Knowledge Graph").

Reproduces robustness_ood_prompting.md §5, from the released code (`MLAI-Yonsei/RPLKG`, branch
`loader`: `trainers/zsclip.py`, `feature_extractor.py`, `train.py`). CLIP stays frozen; image
features are cached once per split. Per class c a bank of J_c sentences (ConceptNet triples, and
descriptions where the graph is thin: `reprolab.data.knowledge`) is encoded once by the text tower,
T_c ∈ R^{J_c×D}, zero-padded to the largest J, padding masked with −1e8. A selector with three
d×d linear maps (dropout p before each) scores every prompt of every class for the image,

    v̂ = normalise(v + 0.2·ε)  (ε ~ N(0, I), training only, on the UNNORMALISED feature v)
    q = W_q v̂,  k_{c,j} = W_k t_{c,j},  u_{c,j} = W_v t_{c,j},  s_{c,j} = q·k_{c,j} + mask_{c,j}
    M_c = GumbelSoftmax_hard(s_c, τ)  (straight-through: one-hot forward, soft gradients)
    z_c = Σ_j M_{c,j} u_{c,j},  logit_c = S · (α · v̂·ẑ_c + v̂·w_c^ZS)

with w_c^ZS the normalised mean of the normalised bank embeddings of class c (a zero-shot ensemble
over the bank) and S CLIP's logit scale (upstream `SCALE=0`). Loss: cross-entropy. Only W_q, W_k,
W_v train. As upstream, the keys and values read the raw (unnormalised) text embeddings.

Choices and quirks kept as options:
- `num_select`: 1 (v3: one prompt per image-class pair) or 2 (the released code:
  M = GS(s) + GS(s − M₁.detach()). The second draw lowers the first pick's score by 1, it does not
  exclude it: when the first pick leads by more than 1 (plus Gumbel noise) both draws coincide and
  z_c is that one prompt).
- `tau_schedule`: `annealed`, τ(t) = τ_max·exp(t·ln(τ_min/τ_max)/T_anneal) with t the epoch
  (0-based, as Dassl's `self.epoch`), or `upstream_fixed`: the forward pass hard-codes t = 200, so
  τ = τ_max·(τ_min/τ_max)² (0.005 with τ_max 2, τ_min 0.1). The hard forward pick is
  argmax(s + g) whatever τ; τ only scales the straight-through gradients.
- `eval_selection`: `argmax` (default) picks argmax_j s_{c,j} at evaluation (with `num_select: 2`,
  then argmax of s − M₁). DEVIATION: upstream evaluates with the same Gumbel draw as in training
  (`attention_parallel` runs `F.gumbel_softmax` in `test()` too), so its test accuracy is one
  random draw; by the Gumbel-max trick the pick j has probability softmax(s_c)_j, and argmax is the
  most likely pick of that draw, with deterministic metrics. `sample` keeps upstream's draw.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.data.info import ImageClassificationInfo
from reprolab.data.knowledge import (
    DESCRIPTION_MODES,
    SOURCES,
    PromptBank,
    knowledge_dir,
    load_prompt_bank,
)
from reprolab.errors import ConfigValueError
from reprolab.methods.prompting.frozen import FrozenCLIPMethod

log = logging.getLogger(__name__)

MASK_VALUE = -1e8  # upstream: -99999999 on padded prompts
TAU_SCHEDULES: tuple[str, ...] = ("annealed", "upstream_fixed")
UPSTREAM_T = 200  # `self.t = 200` in RPLKG's `attention_parallel`
EVAL_SELECTIONS: tuple[str, ...] = ("argmax", "sample")


def tau_at(epoch: float, tau_max: float, tau_min: float, anneal_epochs: float) -> float:
    """τ(t) = τ_max · exp(t · ln(τ_min/τ_max) / T_anneal) (RPLKG's temperature, not clamped)."""
    return tau_max * math.exp(epoch * math.log(tau_min / tau_max) / anneal_epochs)


def pad_bank(embeddings: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Split a flat bank into classes: padded bank, mask, zero-shot weights.

    Args:
        embeddings: every prompt's raw text embedding, class after class. (N, D)
        sizes: prompts per class (J_c), summing to N, each >= 1.

    Returns:
        bank (C, J, D) zero-padded; mask (C, J), 0 on prompts and −1e8 on padding; w^ZS (C, D), the
        normalised mean of each class's normalised embeddings.
    """
    if min(sizes, default=0) < 1 or sum(sizes) != embeddings.shape[0]:
        raise ValueError(f"bank sizes {sizes} do not split {embeddings.shape[0]} embeddings")
    chunks = torch.split(embeddings.float(), sizes)
    j = max(sizes)
    bank = torch.stack([F.pad(t, (0, 0, 0, j - t.shape[0])) for t in chunks])  # (C, J, D)
    mask = torch.full((len(sizes), j), MASK_VALUE, device=embeddings.device)
    for c, n in enumerate(sizes):
        mask[c, :n] = 0.0
    zs = torch.stack([F.normalize(F.normalize(t, dim=-1).mean(0), dim=-1) for t in chunks])
    return bank, mask, zs


class PromptSelector(nn.Module):
    """EPLKG's selector on tensors: which bank prompt of each class to use for an image.

    Args:
        dim: embedding width D (image and text).
        dropout: dropout before each of W_q, W_k, W_v (upstream `DROPOUT`).
        alpha: weight of the selected-prompt term (upstream `ALPHA`).
        num_select: 1 (v3) or 2 (the released code; see the module docstring).
        feature_noise: std of the Gaussian noise added to the unnormalised image feature in
            training (0.2 upstream).
    """

    def __init__(
        self,
        dim: int,
        dropout: float = 0.4,
        alpha: float = 0.2,
        num_select: int = 1,
        feature_noise: float = 0.2,
    ) -> None:
        super().__init__()
        if num_select not in (1, 2):
            raise ConfigValueError(
                f"num_select must be 1 (v3) or 2 (released code), got {num_select}."
            )
        self.alpha = float(alpha)
        self.num_select = int(num_select)
        self.feature_noise = float(feature_noise)
        self.w_q = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim))
        self.w_k = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim))
        self.w_v = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim))

    def image_query(self, features: Tensor) -> Tensor:
        """v̂: the feature (plus the training noise) L2-normalised. (B, D)"""
        features = features.float()
        if self.training and self.feature_noise > 0:
            features = features + self.feature_noise * torch.randn_like(features)
        return F.normalize(features, dim=-1)

    def scores(
        self, v_hat: Tensor, bank: Tensor, mask: Tensor, keys: Tensor | None = None
    ) -> Tensor:
        """s_{c,j} = W_q v̂ · W_k t_{c,j} + mask_{c,j}; `keys` = W_k t precomputed. (B, C, J)"""
        q = self.w_q(v_hat)  # (B, D)
        k = self.w_k(bank) if keys is None else keys  # (C, J, D)
        c, j, d = k.shape
        return (q @ k.reshape(c * j, d).t()).view(-1, c, j) + mask

    def select(self, scores: Tensor, tau: float, sample: bool) -> Tensor:
        """Selection weights M (B, C, J): straight-through Gumbel draws, or argmax picks.

        With `num_select=2` the second pick is made on s − M₁ (the released code).
        """

        def pick(s: Tensor) -> Tensor:
            if sample:
                return F.gumbel_softmax(s, tau=tau, hard=True, dim=-1)
            return F.one_hot(s.argmax(-1), s.shape[-1]).to(s.dtype)

        first = pick(scores)
        if self.num_select == 1:
            return first
        return first + pick(scores - first.detach())

    def forward(
        self,
        features: Tensor,
        bank: Tensor,
        mask: Tensor,
        zs_weights: Tensor,
        tau: float,
        sample: bool | None = None,
        projected: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Similarities α·v̂·ẑ_c + v̂·w_c^ZS, before the logit scale. (B, C)

        Args:
            features: unnormalised image features. (B, D)
            bank: raw prompt embeddings, zero-padded. (C, J, D)
            mask: 0 on prompts, −1e8 on padding. (C, J)
            zs_weights: w^ZS. (C, D)
            tau: Gumbel-softmax temperature.
            sample: draw the selection (straight-through Gumbel); default: in training mode.
            projected: (W_k t, W_v t) of this bank, computed once (`project`) when the maps are
                fixed (evaluation); None: projected here.
        """
        keys, values = (None, None) if projected is None else projected  # (C, J, D) each
        # Training keeps upstream's order of random draws: feature noise, W_q / W_k dropout, the
        # Gumbel draw, then W_v dropout.
        v_hat = self.image_query(features)  # (B, D)
        weights = self.select(
            self.scores(v_hat, bank, mask, keys), tau, self.training if sample is None else sample
        )  # (B, C, J)
        if values is None:
            values = self.w_v(bank)
        z = torch.einsum("bcj,cjd->bcd", weights, values)
        z_hat = F.normalize(z, dim=-1)  # (B, C, D)
        selected = torch.einsum("bd,bcd->bc", v_hat, z_hat)
        return self.alpha * selected + v_hat @ zs_weights.t()  # (B, C)

    def project(self, bank: Tensor) -> tuple[Tensor, Tensor]:
        """Keys W_k t and values W_v t of every bank prompt. (C, J, D) each"""
        return self.w_k(bank), self.w_v(bank)

    @torch.no_grad()
    def selected_indices(self, features: Tensor, bank: Tensor, mask: Tensor) -> Tensor:
        """The deterministic first pick argmax_j s_{c,j} per image and class (no noise). (B, C)"""
        was = self.training
        self.eval()
        try:
            return self.scores(self.image_query(features), bank, mask).argmax(-1)
        finally:
            self.train(was)


class EPLKG(FrozenCLIPMethod):
    """Prompt selection from a knowledge-graph bank over a frozen CLIP (module docstring).

    Args:
        knowledge_source: where the bank's files are (`reprolab.data.knowledge.knowledge_dir`):
            `auto` (packaged assets for the synthetic worlds, else the data root), `packaged`,
            `data` (`<knowledge_root>/knowledge/<dataset>`), or a folder path.
        knowledge_root: the data root (`paths.data_dir`).
        knowledge_dataset: the dataset whose files to read (`data.dataset`; default: the task's
            name).
        search_level: largest ConceptNet hop used (upstream `SEARCH_LEVEL`, 1).
        descriptions: `never`, `sparse` (only for classes with fewer than `min_kg_prompts` graph
            prompts, v3) or `always`.
        min_kg_prompts: the `sparse` threshold.
        dropout, alpha, num_select, feature_noise: see `PromptSelector`.
        tau_schedule: `annealed` or `upstream_fixed` (module docstring).
        tau_max, tau_min, anneal_epochs: the temperature schedule (upstream 2, 0.1, 100).
        eval_selection: `argmax` (deterministic) or `sample` (upstream's Gumbel draw at test).
        text_batch_size: sentences per text-tower call when encoding a bank.
        cache_image_features: train and test on cached image features (the method as released).
        **kwargs: see `FrozenCLIPMethod` (`optimizer`, `scheduler`, ...).
    """

    requires = ("classnames",)

    def __init__(
        self,
        name: str,
        model: nn.Module | None = None,
        info: ImageClassificationInfo | None = None,
        knowledge_source: str = "auto",
        knowledge_root: str | None = None,
        knowledge_dataset: str | None = None,
        search_level: int = 1,
        descriptions: str = "sparse",
        min_kg_prompts: int = 1,
        dropout: float = 0.4,
        alpha: float = 0.2,
        num_select: int = 1,
        feature_noise: float = 0.2,
        tau_schedule: str = "annealed",
        tau_max: float = 2.0,
        tau_min: float = 0.1,
        anneal_epochs: float = 100.0,
        eval_selection: str = "argmax",
        text_batch_size: int = 256,
        cache_image_features: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, model, info, cache_image_features=cache_image_features, **kwargs)
        checks = [
            (tau_schedule in TAU_SCHEDULES, f"tau_schedule must be one of {TAU_SCHEDULES}"),
            (eval_selection in EVAL_SELECTIONS, f"eval_selection must be one of {EVAL_SELECTIONS}"),
            (descriptions in DESCRIPTION_MODES, f"descriptions must be one of {DESCRIPTION_MODES}"),
            (tau_max > 0 and tau_min > 0, "tau_max and tau_min must be > 0"),
            (anneal_epochs > 0, "anneal_epochs must be > 0"),
            (int(search_level) >= 0, "search_level must be >= 0"),
            (0.0 <= dropout < 1.0, "dropout must lie in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigValueError(f"method={name}: {msg}.")
        if not callable(getattr(self.backbone, "encode_text", None)):
            raise ConfigValueError(
                f"method={name} encodes its prompt bank with a text tower, and "
                f"model={getattr(self.backbone, 'name', '?')} has none; use a CLIP model."
            )
        self.tau_schedule = tau_schedule
        self.tau_max, self.tau_min = float(tau_max), float(tau_min)
        self.anneal_epochs = float(anneal_epochs)
        self.eval_selection = eval_selection
        self.text_batch_size = int(text_batch_size)
        self.knowledge_dataset = knowledge_dataset or self.info.name
        if not str(knowledge_source).strip():
            raise ConfigValueError(
                f"method={name}: knowledge_source must be one of {', '.join(SOURCES)} or a folder."
            )
        self.knowledge_dir = knowledge_dir(
            str(knowledge_source), knowledge_root, self.knowledge_dataset
        )
        self.bank_options = {
            "search_level": int(search_level),
            "descriptions": descriptions,
            "min_kg_prompts": int(min_kg_prompts),
        }
        self._text_banks: dict[tuple[str, ...], PromptBank] = {}
        self._encoded: dict[tuple[str, ...], tuple[Tensor, Tensor, Tensor]] = {}
        # In an eval loop the maps are fixed: each class list's keys / values are projected once.
        self._eval_kv: dict[tuple[str, ...], tuple[Tensor, Tensor]] | None = None
        # Read every bank the run will use now: a missing file or class fails before any GPU work.
        for names in [self.classnames, *(t.classnames for t in self.test_specs if t.classnames)]:
            self.prompt_bank(list(names))
        bank = self.prompt_bank(self.classnames)
        log.info(
            "%s: prompt bank from %s: %d prompts for %d classes (%d to %d per class, sha256 %s)",
            name,
            bank.source,
            sum(bank.sizes),
            len(bank.sizes),
            min(bank.sizes),
            max(bank.sizes),
            hashlib.sha256("\n".join(bank.flat()).encode()).hexdigest()[:12],
        )
        self.selector = PromptSelector(
            self._embed_dim(), dropout, alpha, int(num_select), feature_noise
        )

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (*super().metric_keys(), "train/tau")

    def _embed_dim(self) -> int:
        visual = getattr(getattr(self.backbone, "model", None), "visual", None)
        dim = getattr(visual, "output_dim", None)
        if isinstance(dim, int):
            return dim
        with torch.no_grad():
            return int(self.backbone.encode_text(["a photo of a thing."]).shape[-1])

    # -- the bank -------------------------------------------------------------------------------
    def prompt_bank(self, classnames: list[str]) -> PromptBank:
        """The sentences of `classnames`' bank (read once per class list)."""
        key = tuple(classnames)
        if key not in self._text_banks:
            self._text_banks[key] = load_prompt_bank(
                classnames, self.knowledge_dir, self.knowledge_dataset, **self.bank_options
            )
        return self._text_banks[key]

    def bank_tensors(self, classnames: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(bank (C, J, D), mask (C, J), w^ZS (C, D)) of a class list, encoded once and cached."""
        key = tuple(classnames)
        device = self.device
        if key not in self._encoded:
            texts = self.prompt_bank(classnames)
            # Plain tensors even when first asked for under Lightning's inference mode (a test
            # before any fit), so that training can later use them.
            with torch.inference_mode(False), torch.no_grad():
                sentences = texts.flat()
                emb = torch.cat(
                    [
                        self.backbone.encode_text(sentences[i : i + self.text_batch_size]).float()
                        for i in range(0, len(sentences), self.text_batch_size)
                    ]
                )  # (N, D)
                self._encoded[key] = pad_bank(emb, texts.sizes)
        tensors = self._encoded[key]
        if tensors[0].device != device:
            tensors = tuple(t.to(device) for t in tensors)
            self._encoded[key] = tensors
        return tensors

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.bank_tensors(self.classnames)  # encode on the training device, outside the step timing

    def on_test_start(self) -> None:
        super().on_test_start()
        for names in [self.classnames, *(t.classnames for t in self.test_specs if t.classnames)]:
            self.bank_tensors(list(names))

    # -- the model ------------------------------------------------------------------------------
    def tau(self) -> float:
        """The Gumbel-softmax temperature of the current epoch."""
        t = UPSTREAM_T if self.tau_schedule == "upstream_fixed" else self.current_epoch
        return tau_at(t, self.tau_max, self.tau_min, self.anneal_epochs)

    def class_logits(self, features: Tensor, classnames: list[str]) -> Tensor:
        bank, mask, zs = self.bank_tensors(list(classnames))
        sample = self.training or self.eval_selection == "sample"
        projected = None
        if self._eval_kv is not None and not self.selector.training:
            key = tuple(classnames)
            if key not in self._eval_kv:
                with torch.no_grad():
                    self._eval_kv[key] = self.selector.project(bank)
            projected = self._eval_kv[key]
        sims = self.selector(
            features.to(bank.device), bank, mask, zs, self.tau(), sample=sample, projected=projected
        )
        return self.backbone.logit_scale * sims  # (B, C)

    def on_validation_epoch_start(self) -> None:
        self._eval_kv = {}

    def on_validation_epoch_end(self) -> None:
        self._eval_kv = None
        super().on_validation_epoch_end()

    def on_test_epoch_start(self) -> None:
        self._eval_kv = {}

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._eval_kv = None

    def selected_prompts(self, features: Tensor, classnames: list[str]) -> Tensor:
        """Index (into each class's bank) of the prompt the eval-mode selector picks. (B, C)"""
        bank, mask, _ = self.bank_tensors(list(classnames))
        return self.selector.selected_indices(features.to(bank.device), bank, mask)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.class_logits(self.image_features(batch["image"]), self.classnames)
        loss = F.cross_entropy(logits.float(), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tau", self.tau())
        return loss
