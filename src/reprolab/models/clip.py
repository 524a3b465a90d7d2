"""CLIP backbones over open_clip: frozen (prompting, zero-shot, black-box) or fine-tuned.

`CLIPBackbone` wraps any open_clip architecture with an OpenAI / LAION pretrained tag, a local
checkpoint file, or random init (tests). It exposes what the methods need and nothing they should
not touch: image and text encoders, the logit scale, the preprocessing, and the zero-shot head.

Frozen by default. The robust fine-tuning papers train CLIP itself: WiSE-FT (Wortsman et al.,
"Robust fine-tuning of zero-shot models", CVPR 2022, arXiv 2109.01903) the image tower, FLYP (Goyal
et al., "Finetune like you pretrain", CVPR 2023, arXiv 2212.00638) and CaRot (Oh et al., "Towards
calibrated robust fine-tuning of vision-language models", NeurIPS 2024, arXiv 2311.01723) both
towers and the logit scale, contrastively. `trainable` picks the towers; the frozen rest stays in
eval mode, without gradients, and out of checkpoints (`frozen_state_prefixes`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.data.transforms import Preprocess
from reprolab.utils.naming import unknown_name

log = logging.getLogger(__name__)

TRAINABLE: tuple[str, ...] = ("none", "image", "image_last", "text", "both")
MAX_LOGIT_SCALE = 100.0
_SCALE_PARAMS = ("logit_scale", "logit_bias")  # SigLIP models also learn a bias


def zeroshot_head(
    encode_text: Callable[[list[str]], Tensor], classnames: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """Zero-shot head: per-class mean of L2-normalised template embeddings, renormalised. (C, D)

    The one implementation (CONTRACTS.md), used by `CLIPBackbone.zeroshot_weights` and by tiny_clip's
    pretraining evaluation. Underscores in class names become spaces (`sea_lion` -> "sea lion").
    Gradients flow when `encode_text` has them (callers that want none wrap it in `torch.no_grad`).

    Args:
        encode_text: texts -> text embeddings (N, D), e.g. `CLIPBackbone.encode_text`.
        classnames: class names, in label order.
        templates: prompt templates with `{}` for the class name.
    """
    weights = []
    for c in classnames:
        texts = [t.format(c.replace("_", " ")) for t in templates]
        emb = F.normalize(encode_text(texts).float(), dim=-1)  # (T, D)
        weights.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(weights)  # (C, D)


class CLIPBackbone(nn.Module):
    """An open_clip model, frozen or with trainable towers.

    Args:
        name: config name (lands in hparams and metrics.json).
        arch: open_clip architecture, e.g. `ViT-B-16`, `RN50`, or a registered custom config.
        pretrained: an open_clip pretrained tag (`openai`, `laion2b_s34b_b88k`), a local checkpoint
            file, or None for random init.
        cache_dir: where open_clip caches downloaded weights (`paths.weights_dir`).
        precision: `fp32` (the papers cast CLIP to fp32) or `fp16`/`bf16`.
        force_quick_gelu: None: QuickGELU for OpenAI weights only.
        trainable: which towers train: `none` (frozen, the default), `image`, `text` or `both`;
            `image_last`: only the image tower's last stage (a ResNet's attention pool; a ViT's last
            residual block, final LayerNorm and projection), the "last layer" of group robustness.
            Trained towers get gradients and follow the parent's train()/eval() mode; frozen ones
            stay in eval mode without gradients.
        train_logit_scale: train the logit scale (and a SigLIP logit bias). None: only when
            `trainable == "both"` (FLYP / CaRot train it with both towers).
    """

    def __init__(
        self,
        name: str,
        arch: str,
        pretrained: str | None = None,
        cache_dir: str | None = None,
        precision: str = "fp32",
        force_quick_gelu: bool | None = None,
        trainable: str = "none",
        train_logit_scale: bool | None = None,
    ) -> None:
        super().__init__()
        if trainable not in TRAINABLE:
            raise ValueError(
                f"model={name}: {unknown_name('trainable mode', trainable, TRAINABLE)}. "
                "Set model.trainable to one of them."
            )
        self.name = name
        self.arch = arch
        self.pretrained = pretrained
        self.trainable = trainable
        self.train_logit_scale = (
            trainable == "both" if train_logit_scale is None else bool(train_logit_scale)
        )
        _register_custom_archs()
        if force_quick_gelu is None:
            # OpenAI's weights were trained with QuickGELU; open_clip's plain configs use nn.GELU.
            force_quick_gelu = pretrained == "openai"
        pretrained_arg = _resolve_pretrained(arch, pretrained, cache_dir)
        self.model = open_clip.create_model(
            arch,
            pretrained=pretrained_arg,
            precision=precision,
            cache_dir=cache_dir,
            force_quick_gelu=force_quick_gelu,
        )
        self.model.requires_grad_(False).eval()
        self._part_keys = _split_parts(self.model)
        if trainable == "image_last":
            self._part_keys = _split_last_stage(self.model, self._part_keys)
        parts = self.parts()
        for part in self._trained_parts():
            for _, obj in parts[part]:
                if isinstance(obj, (nn.Module, nn.Parameter)):  # not buffers
                    obj.requires_grad_(True)
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = getattr(self.model.visual, "preprocess_cfg", {})
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.preprocess = Preprocess(
            image_size=int(size),
            mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
            interpolation=cfg.get("interpolation", "bicubic"),
        )
        self._head_cache: dict[tuple, Tensor] = {}
        # A loaded state dict may change the text tower (WiSE-FT interpolation): drop the head.
        self.register_load_state_dict_post_hook(_clear_head_cache)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        log.info(
            "Backbone %s (%s, %s): trainable=%s%s, %.2fM trainable / %.2fM frozen parameters, "
            "input %s",
            name,
            arch,
            pretrained or "random init",
            trainable,
            " + logit scale" if self.train_logit_scale else "",
            n_train / 1e6,
            (n_all - n_train) / 1e6,
            self.preprocess,
        )

    def _trained_parts(self) -> list[str]:
        parts = {
            "none": [],
            "image": ["image"],
            "image_last": ["image"],  # `image` is then the last stage; the rest is `image_rest`
            "text": ["text"],
            "both": ["image", "text"],
        }
        return parts[self.trainable] + (["scale"] if self.train_logit_scale else [])

    @property
    def text_trainable(self) -> bool:
        return self.trainable in ("text", "both")

    def parts(self) -> dict[str, list[tuple[str, nn.Module | Tensor]]]:
        """`image`, `text`, `scale`: (state-dict prefix relative to `self.model`, module/tensor)."""
        return {
            part: [(key, _resolve(self.model, key.rstrip("."))) for key in keys]
            for part, keys in self._part_keys.items()
        }

    def train(self, mode: bool = True) -> CLIPBackbone:
        if self.trainable == "none":
            # Frozen: pretrained norm/dropout behaviour is kept whatever the parent module does.
            return super().train(False)
        super().train(mode)
        trained = self._trained_parts()
        for part, members in self.parts().items():
            if part not in trained:
                for _, obj in members:
                    if isinstance(obj, nn.Module):
                        obj.eval()
        return self

    def frozen_state_prefixes(self) -> list[str]:
        """State-dict key prefixes (relative to this module) of the frozen parts.

        A checkpoint need not hold them: they are rebuilt from `cfg.model`. `[""]` (everything)
        when nothing trains; the frozen tower's (and logit scale's) keys when one tower trains;
        `[]` when both towers and the logit scale train.
        """
        trained = self._trained_parts()
        if not trained:
            return [""]
        return [
            f"model.{key}"
            for part, keys in self._part_keys.items()
            if part not in trained
            for key in keys
        ]

    @property
    def logit_scale(self) -> float:
        """exp(learned log-scale), clamped at 100, as a float (frozen users, black box)."""
        return float(self.model.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))

    def scale(self) -> Tensor:
        """The logit scale as a 0-dim tensor with gradients (when `train_logit_scale`).

        Its value is `logit_scale`'s (clamped at 100). Its gradient is that of exp(log-scale) even at
        the clamp: OpenAI's log-scale is float32(ln 100), whose exp is 100.0000076, so a plain
        clamp would never pass a gradient. As in open_clip's training loop, keep the parameter in
        range with `clamp_logit_scale_()` after each optimiser step.
        """
        s = self.model.logit_scale.exp()
        return s - (s - MAX_LOGIT_SCALE).clamp(min=0).detach()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the log-scale parameter to [0, ln 100] in place (open_clip's recipe)."""
        self.model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)  # (B, D)

    def encode_text(self, texts: list[str]) -> Tensor:
        """Text embeddings; with gradients when the text tower trains (contrastive losses). (N, D)"""
        device = self.model.logit_scale.device
        tokens = self.tokenizer(texts).to(device)
        return self.model.encode_text(tokens)  # (N, D)

    @torch.no_grad()
    def zeroshot_weights(self, classnames: list[str], templates: list[str]) -> Tensor:
        """Zero-shot head (`zeroshot_head`), without gradients. (C, D)

        Cached per (classnames, templates) while the text tower is frozen (the head depends on it
        alone; a `load_state_dict` drops the cache); recomputed from the current weights on every
        call when it trains. For a head with gradients call `zeroshot_head(self.encode_text, ...)`.
        """
        if self.text_trainable:
            return zeroshot_head(self.encode_text, classnames, templates)
        key = (tuple(classnames), tuple(templates))
        if key not in self._head_cache:
            self._head_cache[key] = zeroshot_head(self.encode_text, classnames, templates)
        return self._head_cache[key].to(self.model.logit_scale.device)

    def logits(self, images: Tensor, weights: Tensor) -> Tensor:
        feats = F.normalize(self.encode_image(images).float(), dim=-1)  # (B, D)
        scale = self.scale() if self.train_logit_scale else self.logit_scale
        return scale * feats @ weights.t()  # (B, C)

    # -- the text tower at the embedding level (prompt learning: CoOp, CoCoOp, KgCoOp) ----------
    def _clip_text(self) -> nn.Module:
        """`self.model` when its text tower sits at the top level (open_clip `CLIP`), else raise."""
        if not isinstance(self.model, open_clip.model.CLIP):
            raise NotImplementedError(
                f"model={self.name} ({self.arch}) is an open_clip {type(self.model).__name__}, "
                "whose text tower prompt learning cannot enter at the token-embedding level; "
                "supported: "
                "open_clip CLIP archs (OpenAI / LAION RN50, RN101, ViT-B-32, ViT-B-16, ViT-L-14, "
                "reprolab-tiny-clip)."
            )
        return self.model

    @property
    def text_width(self) -> int:
        """Width of the token embeddings (d_tok: 512 for ViT-B/16 and RN50)."""
        return int(self._clip_text().token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        """Number of token positions of a tokenised text (77 for OpenAI CLIP)."""
        return int(self._clip_text().positional_embedding.shape[0])

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids with SOT/EOT, zero-padded to `context_length`, on the model's device. (N, L)"""
        self._clip_text()
        return self.tokenizer(list(texts)).to(self.model.logit_scale.device)

    def token_embedding(self, tokens: Tensor) -> Tensor:
        """Token embeddings of ids (no positional embedding). (N, L, d_tok)"""
        return self._clip_text().token_embedding(tokens)

    def encode_text_embeddings(self, embeds: Tensor, tokens: Tensor) -> Tensor:
        """Text embeddings of token embeddings: `encode_text` after its token lookup. (N, D)

        Adds the positional embedding, runs the text transformer with the model's causal mask,
        `ln_final`, pools with the model's own pooling (argmax of `tokens` = the EOT position for
        OpenAI CLIP) and projects; unnormalised. With `embeds = token_embedding(tokens)` it equals
        `encode_text` on the same texts. Gradients reach `embeds` (the learned context of CoOp)
        whether or not the tower is frozen.

        Args:
            embeds: token embeddings, some positions possibly learned vectors. (N, L, d_tok)
            tokens: the ids the pooling reads (the EOT position). (N, L)
        """
        m = self._clip_text()
        cast = m.transformer.get_cast_dtype()
        x = embeds.to(cast) + m.positional_embedding.to(cast)  # (N, L, d_tok)
        # open_clip >= 2.24 takes (N, L, d) whatever its `batch_first` (it transposes inside).
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        # open_clip >= 3 pools on an EOS id for some tokenizers; 2.x has no such argument.
        eos = {"eos_token_id": m.text_eos_id} if hasattr(m, "text_eos_id") else {}
        pooled = open_clip.transformer.text_global_pool(x, tokens, m.text_pool_type, **eos)
        if isinstance(pooled, tuple):  # open_clip 2.x returns (pooled, tokens)
            pooled = pooled[0]
        proj = m.text_projection
        if proj is None:
            return pooled  # (N, D)
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj  # (N, D)


def _split_parts(model: nn.Module) -> dict[str, list[str]]:
    """open_clip's state by part: `image` (visual tower), `text`, `scale` (logit scale / bias).

    Keys are state-dict prefixes relative to `model`: `name.` for a submodule, `name` for a direct
    parameter or persistent buffer. Covers `CLIP` (text modules at the top level) and
    `CustomTextCLIP` (`text`).
    """
    parts: dict[str, list[str]] = {"image": [], "text": [], "scale": []}
    for n, _ in model.named_children():
        parts["image" if n == "visual" else "text"].append(f"{n}.")
    for n, _ in model.named_parameters(recurse=False):
        parts["scale" if n in _SCALE_PARAMS else "text"].append(n)
    persistent = set(model.state_dict(keep_vars=True)) - {n for n, _ in model.named_parameters()}
    for n, _ in model.named_buffers(recurse=False):
        if n in persistent:
            parts["text"].append(n)
    return parts


def _last_stage(visual: nn.Module) -> list[str]:
    """Prefixes (relative to `visual`) of the image tower's last stage, for `image_last`."""
    if hasattr(visual, "attnpool"):  # open_clip ModifiedResNet
        return ["attnpool."]
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is not None:  # open_clip VisionTransformer
        out = [f"transformer.resblocks.{len(blocks) - 1}."]
        out += [f"{n}." for n in ("ln_post", "attn_pool") if getattr(visual, n, None) is not None]
        return out + (["proj"] if getattr(visual, "proj", None) is not None else [])
    raise ValueError(
        f"model.trainable=image_last: no last stage known for {type(visual).__name__} (open_clip "
        "ModifiedResNet and VisionTransformer are); use model.trainable=image."
    )


def _split_last_stage(model: nn.Module, parts: dict[str, list[str]]) -> dict[str, list[str]]:
    """`image` -> the last stage's prefixes; the rest of the visual tower -> `image_rest`, as the
    finest prefixes that contain no trained key (so a checkpoint keeps exactly the trained ones)."""
    trained = [f"visual.{k}" for k in _last_stage(model.visual)]
    rest: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for n, child in module.named_children():
            key = f"{prefix}{n}."
            if key in trained:
                continue
            if any(t.startswith(key) for t in trained):
                walk(child, key)
            else:
                rest.append(key)
        state = set(module.state_dict(keep_vars=True))
        for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if f"{prefix}{n}" not in trained and n in state:
                rest.append(f"{prefix}{n}")

    walk(model.visual, "visual.")
    return {**parts, "image": trained, "image_rest": rest}


def _resolve(model: nn.Module, path: str) -> nn.Module | Tensor:
    """A submodule, parameter or buffer of `model` by dotted path."""
    obj: object = model
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj  # type: ignore[return-value]


def _clear_head_cache(module: CLIPBackbone, incompatible_keys: object) -> None:
    module._head_cache.clear()


def _register_custom_archs() -> None:
    """Make the project's own open_clip configs (tiny_clip) known to open_clip."""
    from reprolab.models import tiny_clip

    tiny_clip.register()


def _resolve_pretrained(arch: str, pretrained: str | None, cache_dir: str | None) -> str | None:
    """Fail fast, with the fix, when weights are a missing file or an uncached tag offline."""
    if pretrained is None:
        return None
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Checkpoint {path} for {arch} does not exist. Point model.pretrained at a local "
                "open_clip checkpoint file or use a pretrained tag."
            )
        from reprolab.models import tiny_clip

        if arch == tiny_clip.TINY_CLIP_ARCH:  # committed weights are packed; unpack once, cached
            path = tiny_clip.resolve_checkpoint(path)
        return str(path)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tags and pretrained not in tags:
        raise ValueError(f"Unknown pretrained tag '{pretrained}' for {arch}; available: {tags}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        try:
            open_clip.download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as e:
            raise FileNotFoundError(
                f"Weights {arch}/{pretrained} are not in the local cache and HF_HUB_OFFLINE=1. On a "
                f"machine with internet run `python scripts/download_weights.py {arch} {pretrained}`"
                f" (cache: {cache_dir or 'default'}), or set model.pretrained to a local file."
            ) from e
    return pretrained
