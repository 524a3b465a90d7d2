"""CoOp and KgCoOp: a learned prompt context for a frozen CLIP (prompting_posthoc.md A1, A3, A5).

- CoOp: Zhou, Yang, Loy, Liu, "Learning to Prompt for Vision-Language Models", IJCV 2022, arXiv
  2109.01134 (official code `KaiyangZhou/CoOp`, `trainers/coop.py`).
- KgCoOp: Yao, Zhang, Xu, "Visual-Language Prompt Tuning with Knowledge-guided Context
  Optimization", CVPR 2023, arXiv 2303.13283 (official code `htyao89/KgCoOp`,
  `KgCoOp/trainers/kgcoop.py`).

The prompt of class c is the token-embedding sequence of "X X … X {classname}." with the M
placeholder embeddings replaced by the learned context V (unified M×d_tok, or one per class with
`csc`), or the class name moved to the middle / front of the context. The frozen text encoder maps
it to w_c (pooled at EOT, projected, L2-normalised), and logits = s · û·w_c. Only V trains. KgCoOp
adds λ · (1 − mean_c cos(w_c, w_c^clip)) with w_c^clip the fixed CLIP embedding of a hand-written
template (`kg_weight` λ; 0 = CoOp). Other class lists (new classes, other datasets) reuse V with
their own SOS/class/EOS embeddings, so one trained context serves base-to-new, cross-dataset and
domain-generalisation evaluation (`source`: the trained context of a finished run).

Reproduced: the model, initialisation, loss, the optimiser and Dassl's per-epoch schedule
(`configs/method/{coop,kgcoop}.yaml`). At test the run also logs `test/text_cos_base` (and, with a
role-`new` test set, `test/text_cos_new`): the mean cosine between the learned class embeddings and
zero-shot CLIP's for "a photo of a {}.", the quantity KgCoOp keeps high. Unit tests (spec A6 items
1-4, 7): `tests/test_coop.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.data.info import ImageClassificationInfo
from reprolab.errors import ConfigValueError
from reprolab.methods.finetuning.source import SourceRun, check_shapes
from reprolab.methods.prompting.frozen import FrozenCLIPMethod
from reprolab.utils.naming import unknown_name

POSITIONS: tuple[str, ...] = ("end", "middle", "front")
#: Zero-shot reference template of `test/text_cos_*` (CLIP's "a photo of a {}.").
ZS_TEMPLATE = "a photo of a {}."
#: KgCoOp's default hand-crafted template (its `CUSTOM_TEMPLATES` for most datasets).
KG_TEMPLATE = "a photo of a {}."


@dataclass
class ClassPrompts:
    """The fixed token embeddings of one class list's prompts (CoOp's `token_prefix/suffix`).

    Attributes:
        tokens: ids of the assembled prompts, in the positions of the assembled embeddings. (K, L)
        prefix: SOS embeddings. (K, 1, d_tok)
        suffix: class-name, ".", EOS and padding embeddings. (K, L - 1 - M, d_tok)
        order: position j of the assembled prompt takes position order[j] of the `end` layout
            [SOS, V, class, ., EOS, pad]; None for `end`. (K, L)
        name_lens: BPE tokens of each class name.
    """

    tokens: Tensor
    prefix: Tensor
    suffix: Tensor
    order: Tensor | None
    name_lens: list[int]


def name_length(backbone: Any, text: str) -> int:
    """Number of BPE tokens of `text` (without SOT/EOT)."""
    tokens = backbone.tokenize([text])[0]
    return int((tokens != 0).sum()) - 2


def position_order(
    position: str, n_ctx: int, name_lens: list[int], length: int, device: torch.device
) -> Tensor | None:
    """Gather index from the `end` layout to the `middle` / `front` layout (None for `end`). (K, L)

    `middle`: SOS, the first ⌊M/2⌋ context vectors, the class name, the other context vectors,
    then ".", EOS; `front`: SOS, the class name, the M context vectors, ".", EOS (A1.1).
    """
    if position == "end":
        return None
    rows = []
    for n in name_lens:
        n = min(n, length - 1 - n_ctx)  # a name cut by the context length
        ctx = list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + n))
        rest = list(range(1 + n_ctx + n, length))
        if position == "middle":
            half = n_ctx // 2
            rows.append([0, *ctx[:half], *name, *ctx[half:], *rest])
        else:
            rows.append([0, *name, *ctx, *rest])
    return torch.tensor(rows, dtype=torch.long, device=device)


class PromptLearner(nn.Module):
    """CoOp's learned context V and the assembly of class prompts as token embeddings.

    The backbone is not a submodule (the method owns it); it is passed to the calls that read it.
    Fixed token embeddings are kept per class list (`class_prompts`), never in checkpoints: a
    checkpoint holds V only, and any class list gets its prompts from the current class names.

    Args:
        backbone: the frozen `CLIPBackbone` (token embedding, tokenizer, width).
        classnames: the training classes (CSC learns one context for each).
        n_ctx: M, number of context vectors (ignored with `ctx_init`).
        ctx_init: initialise V from these words (M = number of words, "a photo of a" -> 4), else
            N(0, 0.02²) with "X X … X" as placeholder text.
        csc: class-specific context (K×M×d_tok) instead of one unified context (M×d_tok).
        class_token_position: `end`, `middle` or `front`.
        method: method name for messages.
    """

    def __init__(
        self,
        backbone: Any,
        classnames: list[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        csc: bool = False,
        class_token_position: str = "end",
        method: str = "coop",
    ) -> None:
        super().__init__()
        if class_token_position not in POSITIONS:
            what = unknown_name("class_token_position", class_token_position, POSITIONS)
            raise ConfigValueError(f"method={method}: {what}.")
        width = backbone.text_width
        if ctx_init:
            if csc:
                # The official code silently learns one unified context when both are set.
                raise ConfigValueError(
                    f"method={method}: csc=true learns a random per-class context; ctx_init "
                    f"'{ctx_init}' would be ignored as in the official code. Set "
                    "method.ctx_init=null or method.csc=false."
                )
            words = " ".join(ctx_init.replace("_", " ").split())
            n_ctx = len(words.split(" "))
            if name_length(backbone, words) != n_ctx:
                raise ConfigValueError(
                    f"method={method}: ctx_init '{words}' is {n_ctx} words but "
                    f"{name_length(backbone, words)} BPE tokens; CoOp takes one context vector per "
                    "word, so use words that are single tokens (e.g. 'a photo of a')."
                )
            with torch.no_grad():
                emb = backbone.token_embedding(backbone.tokenize([words]))  # (1, L, d)
            ctx = emb[0, 1 : 1 + n_ctx].detach().float().cpu().clone()  # (M, d)
            self.prompt_prefix = words
        else:
            if int(n_ctx) < 1:
                raise ConfigValueError(f"method={method}: n_ctx must be >= 1, got {n_ctx}.")
            n_ctx = int(n_ctx)
            shape = (len(classnames), n_ctx, width) if csc else (n_ctx, width)
            ctx = torch.empty(shape)
            nn.init.normal_(ctx, std=0.02)
            self.prompt_prefix = " ".join(["X"] * n_ctx)
        # DEVIATION: the official code keeps V in CLIP's fp16; V stays fp32 here (a master copy),
        # cast to the text tower's dtype when the prompts enter it (spec A1.2 allows this).
        self.ctx = nn.Parameter(ctx)  # (M, d) or (K, M, d)
        self.n_ctx = n_ctx
        self.csc = bool(csc)
        self.class_token_position = class_token_position
        self.train_classnames = tuple(classnames)
        self.method = method
        self._cache: dict[tuple[str, ...], ClassPrompts] = {}

    def class_prompts(self, backbone: Any, classnames: list[str]) -> ClassPrompts:
        """The fixed parts of the prompts of `classnames`, built once per class list and device."""
        key = tuple(classnames)
        cached = self._cache.get(key)
        if cached is not None and cached.prefix.device == self.ctx.device:
            return cached
        names = [c.replace("_", " ") for c in classnames]
        tokens = backbone.tokenize([f"{self.prompt_prefix} {n}." for n in names])  # (K, L)
        with torch.no_grad():
            emb = backbone.token_embedding(tokens).float()  # (K, L, d)
        tokens, emb = tokens.to(self.ctx.device), emb.to(self.ctx.device)
        lens = [name_length(backbone, n) for n in names]
        order = position_order(
            self.class_token_position, self.n_ctx, lens, tokens.shape[1], tokens.device
        )
        prompts = ClassPrompts(
            tokens=tokens if order is None else tokens.gather(1, order),
            prefix=emb[:, :1],
            suffix=emb[:, 1 + self.n_ctx :],
            order=order,
            name_lens=lens,
        )
        self._cache[key] = prompts
        return prompts

    def forward(
        self, backbone: Any, classnames: list[str], shift: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Prompt embeddings and their token ids for `classnames`.

        Args:
            backbone: the frozen `CLIPBackbone`.
            classnames: the classes to build prompts for.
            shift: CoCoOp's per-image bias π(u) added to every context vector. (B, d_tok)

        Returns:
            embeddings (K, L, d_tok), or (B, K, L, d_tok) with `shift`; token ids (K, L).
        """
        if self.csc and tuple(classnames) != self.train_classnames:
            raise ConfigValueError(
                f"method={self.method}: csc=true learned one context for each of the "
                f"{len(self.train_classnames)} training classes and cannot classify other classes "
                f"({len(classnames)} given: new classes, another dataset); train with "
                "method.csc=false for base-to-new or transfer."
            )
        p = self.class_prompts(backbone, classnames)
        k = len(classnames)
        ctx = self.ctx
        if shift is None:
            ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(k, -1, -1)  # (K, M, d)
            prompts = torch.cat([p.prefix, ctx, p.suffix], dim=1)  # (K, L, d)
        else:
            b = shift.shape[0]
            ctx = (ctx.unsqueeze(0) + shift.unsqueeze(1)).unsqueeze(1)  # (B, 1, M, d)
            prompts = torch.cat(
                [
                    p.prefix.unsqueeze(0).expand(b, -1, -1, -1),
                    ctx.expand(-1, k, -1, -1),
                    p.suffix.unsqueeze(0).expand(b, -1, -1, -1),
                ],
                dim=2,
            )  # (B, K, L, d)
        if p.order is not None:
            idx = p.order.unsqueeze(-1).expand(*p.order.shape, prompts.shape[-1])  # (K, L, d)
            if shift is not None:
                idx = idx.unsqueeze(0).expand(prompts.shape[0], -1, -1, -1)
            prompts = prompts.gather(-2, idx)
        return prompts, p.tokens


class CoOp(FrozenCLIPMethod):
    """CoOp (and KgCoOp with `kg_weight` > 0): only the prompt context V trains.

    Args:
        n_ctx: M, number of context vectors (16; ignored with `ctx_init`).
        ctx_init: initialise V from these words ("a photo of a": M = 4), else random N(0, 0.02²).
        csc: class-specific contexts (K×M×d_tok).
        class_token_position: `end` | `middle` | `front`.
        kg_weight: KgCoOp's λ (8.0); 0 = CoOp.
        kg_template: KgCoOp's hand-crafted template for w^clip; None: `kg_templates[data name]`,
            else "a photo of a {}.".
        kg_templates: data name -> template (KgCoOp's `CUSTOM_TEMPLATES`, spec A3).
        source: `{run_dir, experiment}` of a finished run whose trained context this run loads
            (test-only transfer: `train=false`, another dataset or its new classes).
        **kwargs: see `FrozenCLIPMethod` (`cache_image_features`, `optimizer`, `scheduler`, ...).
    """

    requires = ("classnames",)
    #: Logs `test/text_cos_base` / `test/text_cos_new` (prompts that do not depend on the image).
    logs_text_cos: ClassVar[bool] = True
    #: State-dict prefixes a `source` run must provide.
    source_modules: ClassVar[tuple[str, ...]] = ("prompt_learner",)

    def __init__(
        self,
        name: str,
        model: nn.Module | None = None,
        info: ImageClassificationInfo | None = None,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        csc: bool = False,
        class_token_position: str = "end",
        kg_weight: float = 0.0,
        kg_template: str | None = None,
        kg_templates: dict[str, str] | None = None,
        source: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, model, info, **kwargs)
        if model is None:
            raise ConfigValueError(f"method={name} needs a CLIP backbone (cfg.model), got none.")
        self.prompt_learner = PromptLearner(
            self.backbone, self.classnames, n_ctx, ctx_init, csc, class_token_position, name
        )
        new_sets = [t.name for t in self.test_specs if t.role == "new"]
        if csc and new_sets:
            raise ConfigValueError(
                f"method={name}: csc=true learns one context per training class and cannot "
                f"classify the new classes of test set(s) {new_sets} (data={self.info.name}); set "
                "method.csc=false for base-to-new."
            )
        self.kg_weight = float(kg_weight)
        if self.kg_weight < 0:
            raise ConfigValueError(f"method={name}: kg_weight must be >= 0, got {kg_weight}.")
        self.kg_template = kg_template or (kg_templates or {}).get(self.info.name, KG_TEMPLATE)
        if "{}" not in self.kg_template:
            raise ConfigValueError(
                f"method={name}: kg_template '{self.kg_template}' has no '{{}}' for the class name."
            )
        self._eval_text: dict[tuple[str, ...], Tensor] | None = None
        self.source = None if source is None else SourceRun.parse(name, source)
        if self.source is not None:  # read now: a missing run fails before anything is built
            self.load_source(self.source)

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        keys = ("train/ce", "train/kg")
        if cls.logs_text_cos:
            keys += ("test/text_cos_base", "test/text_cos_new")
        return (*super().metric_keys(), *keys)

    def load_source(self, source: SourceRun) -> None:
        """Load the trained prompt parts (`source_modules`) of a finished run's checkpoint."""
        state = source.load(self.name, getattr(self.backbone, "name", None))
        for prefix in self.source_modules:
            module = getattr(self, prefix)
            module.load_state_dict(check_shapes(self.name, source, state, module, f"{prefix}."))

    # -- text features --------------------------------------------------------------------------
    def text_features(self, classnames: list[str]) -> Tensor:
        """L2-normalised text features of the learned prompts of `classnames`. (K, D)"""
        embeds, tokens = self.prompt_learner(self.backbone, classnames)
        return F.normalize(self.backbone.encode_text_embeddings(embeds, tokens).float(), dim=-1)

    def clip_text_features(self, classnames: list[str], template: str) -> Tensor:
        """Fixed, normalised CLIP text features of a hand-written template (no gradients). (K, D)"""
        return self.backbone.zeroshot_weights(list(classnames), [template]).to(self.device)

    def class_logits(self, features: Tensor, classnames: list[str]) -> Tensor:
        u = F.normalize(features.float(), dim=-1)  # (B, D)
        key = tuple(classnames)
        if self._eval_text is not None:  # an eval loop: V is fixed, encode the prompts once
            if key not in self._eval_text:
                self._eval_text[key] = self.text_features(classnames)
            w = self._eval_text[key]
        else:
            w = self.text_features(classnames)
        return self.backbone.logit_scale * u @ w.t()  # (B, K)

    # -- training -------------------------------------------------------------------------------
    def loss_terms(self, features: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """`train/loss`, `train/ce` and (KgCoOp) `train/kg` of a batch of image features."""
        u = F.normalize(features.float(), dim=-1)  # (B, D)
        w = self.text_features(self.classnames)  # (K, D)
        ce = F.cross_entropy(self.backbone.logit_scale * u @ w.t(), labels)
        terms = {"train/ce": ce}
        loss = ce
        if self.kg_weight > 0:
            w_clip = self.clip_text_features(self.classnames, self.kg_template)  # (K, D)
            kg = 1.0 - (w * w_clip).sum(-1).mean()  # KgCoOp: 1 - mean_c cos(w_c, w_c^clip)
            terms["train/kg"] = kg
            loss = ce + self.kg_weight * kg
        terms["train/loss"] = loss
        return terms

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self.loss_terms(self.image_features(batch["image"]), batch["label"])
        self.log("train/loss", terms["train/loss"], prog_bar=True)
        self.log_dict({k: v for k, v in terms.items() if k != "train/loss"})
        return terms["train/loss"]

    # -- evaluation -----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_text = {}

    def on_validation_epoch_end(self) -> None:
        self._eval_text = None
        super().on_validation_epoch_end()

    def on_test_epoch_start(self) -> None:
        self._eval_text = {}

    @torch.no_grad()
    def text_cos(self, classnames: list[str]) -> float:
        """Mean over classes of cos(learned w_c, zero-shot w_c of "a photo of a {}.")."""
        w = self.text_features(classnames)
        return float((w * self.clip_text_features(classnames, ZS_TEMPLATE)).sum(-1).mean())

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._eval_text = None
        if not self.logs_text_cos:
            return
        out = {"test/text_cos_base": self.text_cos(self.classnames)}
        new = next((t for t in self.test_specs if t.role == "new"), None)
        if new is not None and not self.prompt_learner.csc:
            out["test/text_cos_new"] = self.text_cos(list(new.classnames or ()))
        self.log_dict(out, add_dataloader_idx=False)
