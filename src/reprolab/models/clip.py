"""Frozen CLIP backbones over open_clip.

`CLIPBackbone` wraps any open_clip architecture with an OpenAI / LAION pretrained tag, a local
checkpoint file, or random init (tests). It exposes what the methods need and nothing they should
not touch: image and text encoders, the logit scale, the preprocessing, and the zero-shot head.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.data.transforms import Preprocess

log = logging.getLogger(__name__)


class CLIPBackbone(nn.Module):
    """A frozen open_clip model.

    Args:
        name: config name (lands in hparams and metrics.json).
        arch: open_clip architecture, e.g. `ViT-B-16`, `RN50`, or a registered custom config.
        pretrained: an open_clip pretrained tag (`openai`, `laion2b_s34b_b88k`), a local checkpoint
            file, or None for random init.
        cache_dir: where open_clip caches downloaded weights (`paths.weights_dir`).
        precision: `fp32` (the papers cast CLIP to fp32) or `fp16`/`bf16`.
    """

    def __init__(
        self,
        name: str,
        arch: str,
        pretrained: str | None = None,
        cache_dir: str | None = None,
        precision: str = "fp32",
        force_quick_gelu: bool | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.arch = arch
        self.pretrained = pretrained
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
        log.info(
            "Backbone %s (%s, %s): %.1fM frozen parameters, input %s",
            name,
            arch,
            pretrained or "random init",
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            self.preprocess,
        )

    def train(self, mode: bool = True) -> CLIPBackbone:
        # Frozen: pretrained norm/dropout behaviour is kept whatever the parent module does.
        return super().train(False)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().clamp(max=100.0))

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)  # (B, D)

    def encode_text(self, texts: list[str]) -> Tensor:
        device = self.model.logit_scale.device
        tokens = self.tokenizer(texts).to(device)
        return self.model.encode_text(tokens)  # (N, D)

    @torch.no_grad()
    def zeroshot_weights(self, classnames: list[str], templates: list[str]) -> Tensor:
        """Zero-shot head: per-class mean of L2-normalised template embeddings, renormalised."""
        key = (tuple(classnames), tuple(templates))
        if key not in self._head_cache:
            weights = []
            for c in classnames:
                texts = [t.format(c.replace("_", " ")) for t in templates]
                emb = F.normalize(self.encode_text(texts).float(), dim=-1)  # (T, D)
                weights.append(F.normalize(emb.mean(dim=0), dim=-1))
            self._head_cache[key] = torch.stack(weights)  # (C, D)
        return self._head_cache[key].to(self.model.logit_scale.device)

    def logits(self, images: Tensor, weights: Tensor) -> Tensor:
        feats = F.normalize(self.encode_image(images).float(), dim=-1)  # (B, D)
        return self.logit_scale * feats @ weights.t()  # (B, C)


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
