"""timm image backbones: ImageNet ResNet-50 / ViT-B/16 baselines and BlackVIP's Coordinator encoders.

`TimmBackbone` wraps `timm.create_model` with the same contract as `CLIPBackbone`'s image side:
`preprocess` (`reprolab.data.transforms.Preprocess`), `encode_image(images) -> (B, D)` pooled
pre-logit features, `feature_dim`, frozen (eval, no gradients, out of checkpoints:
`frozen_state_prefixes`) or trainable. Weights: random init, timm's default tag, a named tag
(`resnet50.a1_in1k`, `vit_base_patch16_224.augreg_in21k_ft_in1k`), or a local checkpoint file.
With HF_HUB_OFFLINE=1 an uncached tag fails at once, naming `scripts/download_weights.py --timm`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from reprolab.data.transforms import Preprocess
from reprolab.utils.naming import did_you_mean, unknown_name

log = logging.getLogger(__name__)

_CKPT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".safetensors", ".npz", ".ckpt")
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # what `data.transforms` builds


class TimmBackbone(nn.Module):
    """A timm image model, frozen or trainable.

    Args:
        name: config name (lands in hparams and metrics.json).
        arch: timm architecture, optionally with a pretrained tag (`resnet50`,
            `vit_base_patch16_224.mae`).
        pretrained: False: random init; True: the tag in `arch`, else timm's default tag; a tag
            (`a1_in1k` or `resnet50.a1_in1k`); or a local checkpoint file (timm keys; loaded through
            `pretrained_cfg_overlay=dict(file=...)`, so timm's key filters apply).
        trainable: train every parameter (False: eval mode, no gradients, not in checkpoints).
        cache_dir: download cache for hub / URL weights (`paths.weights_dir`; None: Hugging Face's
            and torch hub's defaults).
        num_classes: classifier size; 0 (default) drops the head, None keeps the pretrained one.
        **model_kwargs: passed to `timm.create_model` (`img_size`, `norm_layer`, `drop_path_rate`).
    """

    def __init__(
        self,
        name: str,
        arch: str,
        pretrained: bool | str = False,
        trainable: bool = False,
        cache_dir: str | None = None,
        num_classes: int | None = 0,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        self.name = name
        self.arch = arch
        self.trainable = bool(trainable)
        model_name, create_kwargs, self.weights = resolve_pretrained(arch, pretrained, cache_dir)
        if num_classes is not None:
            create_kwargs["num_classes"] = num_classes
        try:
            self.model = timm.create_model(model_name, **create_kwargs, **model_kwargs)
        except OSError as e:  # a download that could not happen (no network, hub error)
            if "pretrained_cfg_overlay" in create_kwargs or not create_kwargs.get("pretrained"):
                raise
            raise FileNotFoundError(_fetch_hint(self.weights, cache_dir, type(e).__name__)) from e
        self.model.requires_grad_(self.trainable)
        if not self.trainable:
            self.model.eval()
        data_cfg = timm.data.resolve_model_data_config(self.model)
        interpolation = data_cfg.get("interpolation", "bicubic")
        if interpolation not in _INTERPOLATIONS:
            interpolation = "bicubic"  # timm's "random" (train-time) has no test-time meaning
        # DEVIATION: timm evaluates with resize to size / crop_pct, then a centre crop; `Preprocess`
        # has no crop fraction, so the data module resizes to the input size and crops nothing
        # (crop_pct 1.0, as for CLIP). Kept in `self.crop_pct` for when `Preprocess` grows one.
        self.crop_pct = float(data_cfg.get("crop_pct", 1.0))
        self.preprocess = Preprocess(
            image_size=int(data_cfg["input_size"][-1]),
            mean=tuple(float(v) for v in data_cfg["mean"]),
            std=tuple(float(v) for v in data_cfg["std"]),
            interpolation=interpolation,
        )
        self.feature_dim = int(getattr(self.model, "head_hidden_size", self.model.num_features))
        n_all = sum(p.numel() for p in self.model.parameters())
        log.info(
            "Backbone %s (timm %s, %s): %.2fM trainable / %.2fM frozen parameters, input %s",
            name,
            model_name,
            self.weights,
            (n_all if self.trainable else 0) / 1e6,
            (0 if self.trainable else n_all) / 1e6,
            self.preprocess,
        )

    def train(self, mode: bool = True) -> TimmBackbone:
        # Frozen: pretrained norm/dropout behaviour is kept whatever the parent module does.
        return super().train(mode and self.trainable)

    def frozen_state_prefixes(self) -> list[str]:
        """`[""]` (everything: rebuilt from `cfg.model`) when frozen, `[]` when trainable."""
        return [] if self.trainable else [""]

    def encode_image(self, images: Tensor) -> Tensor:
        """Pooled pre-logit features (after timm's global pool / fc_norm).  # (B, feature_dim)"""
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def forward(self, images: Tensor) -> Tensor:
        """timm's own forward: logits, or the pooled features when `num_classes=0`."""
        return self.model(images)


def resolve_pretrained(
    arch: str, pretrained: bool | str | None, cache_dir: str | None = None
) -> tuple[str, dict[str, Any], str]:
    """`timm.create_model` arguments for `arch` + `pretrained`; fail fast with the fix.

    Returns:
        `(model_name, create_model kwargs, description of the weights)`.
    """
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    base, arch_tag = split_model_name_tag(arch)
    if not timm.is_model(base):
        raise ValueError(
            f"Unknown timm architecture '{base}'{did_you_mean(base, timm.list_models())}; list them "
            "with `timm.list_models('<pattern>*')`."
        )
    if pretrained is None or pretrained is False:
        return arch, {"pretrained": False}, "random init"
    if isinstance(pretrained, str) and _is_file_like(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Checkpoint {path} for timm {arch} does not exist. Point model.pretrained at a local "
                "timm checkpoint file, or use a pretrained tag (`timm.list_pretrained('"
                f"{base}.*')`)."
            )
        overlay = {"pretrained_cfg_overlay": {"file": str(path)}}
        return arch, {"pretrained": True, **overlay}, str(path)
    tags = [split_model_name_tag(t)[1] for t in timm.list_pretrained(f"{base}.*")]
    if not tags:
        raise ValueError(
            f"timm {base} has no pretrained weights; set model.pretrained=false (random init) or to "
            "a local checkpoint file."
        )
    tag = arch_tag
    if isinstance(pretrained, str):
        p_base, p_tag = (
            split_model_name_tag(pretrained) if "." in pretrained else (base, pretrained)
        )
        if p_base != base or (arch_tag and p_tag != arch_tag):
            raise ValueError(
                f"model.pretrained='{pretrained}' does not match model.arch='{arch}'; give the tag "
                f"of {base} (e.g. '{base}.{tags[0]}' or just '{tags[0]}')."
            )
        tag = p_tag
    if tag and tag not in tags:
        raise ValueError(unknown_name(f"timm {base} pretrained tag", tag, tags))
    cfg = get_pretrained_cfg(f"{base}.{tag}" if tag else base)
    full = f"{base}.{cfg.tag}"
    if _offline() and not _is_cached(cfg, cache_dir):
        raise FileNotFoundError(_fetch_hint(full, cache_dir, "HF_HUB_OFFLINE=1"))
    kwargs: dict[str, Any] = {"pretrained": True}
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    return full, kwargs, full


def _fetch_hint(full: str, cache_dir: str | None, reason: str) -> str:
    where = cache_dir or "the Hugging Face / torch hub cache"
    return (
        f"Weights timm/{full} are not in the local cache ({reason}). On a machine with internet run "
        f"`python scripts/download_weights.py --timm {full}` (cache: {where}), or set "
        "model.pretrained to a local checkpoint file (or false for random init)."
    )


def _is_file_like(s: str) -> bool:
    return os.sep in s or s.startswith("~") or s.endswith(_CKPT_SUFFIXES)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _is_cached(cfg: Any, cache_dir: str | None) -> bool:
    """Whether timm would find `cfg`'s weights without the network."""
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import check_cached_file

    load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    if load_from == "hf-hub":
        from huggingface_hub import try_to_load_from_cache

        repo, filename = loc if isinstance(loc, tuple) else (loc, None)
        # timm asks for pytorch_model.bin and prefers its safetensors twin.
        names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
        return any(
            isinstance(try_to_load_from_cache(repo, n, cache_dir=cache_dir), str) for n in names
        )
    if load_from == "url":
        return bool(check_cached_file(loc, check_hash=False, cache_dir=cache_dir))
    return True  # a file or state dict in the cfg itself
