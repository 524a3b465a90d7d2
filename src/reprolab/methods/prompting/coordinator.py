"""The BlackVIP Coordinator: an input-dependent visual prompt generator.

Paper: Oh et al., "BlackVIP: Black-Box Visual Prompting for Robust Transfer Learning", CVPR 2023
(arXiv 2303.14773). Reproduces the released `Coordinator` / `CoordinatorINIT` / `DecoderManual` of
`changdaeoh/BlackVIP` (`trainers/visual_prompters.py`; spec §2):

    h_phi(x) = g_{phi_d}([f_enc(x); phi_t]),   x' = clamp(x + eps * h_phi(x))

- ``f_enc``: a frozen encoder (MAE ViT-B/16 by default; supervised in21k ViT-B/16, DINO ResNet-50, a
  random "scratch" conv net, or a tiny conv net for CPU tests). It sees the same CLIP-normalised tensor
  as CLIP (no re-normalisation). The timm encoders are built by ``reprolab.models.timm.TimmBackbone``
  (weights, offline checks, freezing); the feature taken from them is the Coordinator's own.
- ``phi_t``: a learnable trigger vector of length SRC_DIM - z_dim, U(0, 0.1) init.
- ``g``: grouped transposed-conv decoder (spec §2.2 table), 9,920 learnable parameters with the
  official configuration (vit_mae_base, SRC_DIM 1568, 224 px), no output activation.

The learnable vector (``learnable_parameters()``, trigger first, then the decoder body in order, as
``parameters_to_vector`` of the official decoder) is what SPSA-GC optimises; the encoder is not in it.
``decode_batched`` evaluates the decoder for a stack of flat parameter vectors in one pass while every
row normalises with its own batch statistics and the BN running statistics are updated row by row, in
order (spec §2.4), exactly as sequential evaluation would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from reprolab.methods.prompting.prompters import unflatten_rows
from reprolab.models.timm import TimmBackbone
from reprolab.utils.naming import unknown_name

log = logging.getLogger(__name__)

EncoderName = Literal["vit_mae_base", "vit_base", "dino_rn50", "scratch", "tiny"]
ENCODERS: tuple[str, ...] = ("vit_mae_base", "vit_base", "dino_rn50", "scratch", "tiny")

# timm equivalents of the official Hugging Face encoders (spec §2.1).
TIMM_NAMES: dict[str, str] = {
    "vit_mae_base": "vit_base_patch16_224.mae",  # HF facebook/vit-mae-base
    "vit_base": "vit_base_patch16_224.orig_in21k",  # HF google/vit-base-patch16-224-in21k
    # timm has no DINO ResNet-50 tag: build the plain architecture and load DINO's torchvision-format
    # checkpoint (dino_resnet50_pretrain.pth; HF Ramos-Ramos/dino-resnet-50 converts the same
    # weights) from `checkpoint_path`.
    "dino_rn50": "resnet50",
}

GRID = 7  # the decoder starts from a SRC_DIM/49 x 7 x 7 cube

__all__ = [
    "Coordinator",
    "CoordinatorDecoder",
    "ENCODERS",
    "ScratchEncoder",
    "TinyEncoder",
    "build_encoder",
]


class _TimmViTFeature(nn.Module):
    """CLS token of a timm ViT, before (``pre_norm``) or after the final LayerNorm."""

    def __init__(self, model: nn.Module, pre_norm: bool) -> None:
        super().__init__()
        self.model = model
        self.pre_norm = pre_norm

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        # forward_features without the final norm: no random masking, no head (spec §2.1 pitfall).
        h = m.patch_embed(x)
        h = m._pos_embed(h)
        h = m.patch_drop(h)
        h = m.norm_pre(h)
        h = m.blocks(h)  # (B, 1 + L, D)
        if not self.pre_norm:
            h = m.norm(h)
        return h[:, 0]  # (B, D)


class _TimmPooledFeature(nn.Module):
    """Global-average-pooled last feature map of a timm CNN (HF ResNetModel ``pooler_output``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x).mean(dim=(2, 3))  # (B, 2048)


class ScratchEncoder(nn.Module):
    """The 5-stage conv encoder of the "scratch" Coordinator (official ``EncoderManual``).

    Each stage: conv3x3 (bias), stride-2 conv2x2 (no bias), BN, GELU; channels 32, 64, 64, 128,
    ``out_dim``; 224 px in, ``out_dim`` x 7 x 7 out.

    Args:
        out_dim: Channels of the output cube (``E_OUT_DIM``, 32).
        batch_stats: BN normalises with the current batch statistics even in eval mode. This is what
            the official code does: only the decoder is registered with the trainer, so this encoder
            is never switched to eval mode.
    """

    def __init__(self, out_dim: int = 32, batch_stats: bool = True) -> None:
        super().__init__()
        chans = [(3, 32, 32), (32, 32, 64), (64, 64, 64), (64, 64, 128), (128, 128, out_dim)]
        layers: list[nn.Module] = []
        for c_in, c_mid, c_out in chans:
            layers += [
                nn.Conv2d(c_in, c_mid, 3, 1, 1),
                nn.Conv2d(c_mid, c_out, 2, 2, 0, bias=False),
                nn.BatchNorm2d(c_out, track_running_stats=not batch_stats),
                nn.GELU(),
            ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, out_dim, 7, 7)


class TinyEncoder(nn.Module):
    """A small random conv encoder for CPU tests and the tiny demo (not in the paper).

    Args:
        z_dim: Output feature size.
        width: Channels of the first conv.
    """

    def __init__(self, z_dim: int = 64, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 4, 4),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 2, 2),
            nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 2, 2),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, z_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, z_dim)


def _create_timm(
    encoder: str, pretrained: bool, checkpoint_path: str | Path | None, **model_kwargs: Any
) -> nn.Module:
    """The timm model of a pretrained-encoder variant, frozen, through `TimmBackbone`."""
    name = TIMM_NAMES[encoder]
    weights: bool | str = bool(pretrained)
    if checkpoint_path is not None:
        path = Path(checkpoint_path).expanduser().absolute()
        if not path.is_file():
            raise FileNotFoundError(
                f"Coordinator encoder checkpoint not found: {path}. Point `checkpoint_path` at a "
                f"weights file for timm '{name}', or set it to null to use the timm/HF hub weights."
            )
        log.info("Coordinator encoder %s: weights from %s", name, path)
        weights = str(path)  # an absolute path: TimmBackbone reads it as a file, never as a tag
    elif pretrained and encoder == "dino_rn50":
        raise ValueError(
            "Encoder 'dino_rn50' has no timm hub weights; set `checkpoint_path` to DINO's "
            "dino_resnet50_pretrain.pth (torchvision ResNet-50 keys), or pretrained=false for a "
            "random encoder."
        )
    try:
        backbone = TimmBackbone(
            f"coordinator_{encoder}", name, weights, trainable=False, num_classes=0, **model_kwargs
        )
    except FileNotFoundError as e:
        if weights is not True:
            raise
        raise FileNotFoundError(
            f"{e} For the Coordinator: `python scripts/download_weights.py --coordinator` fetches "
            "both ViT encoders; or set method.coordinator.checkpoint_path to a local weights file, "
            "or method.coordinator.pretrained=false for a random frozen encoder."
        ) from e
    return backbone.model


def build_encoder(
    name: str,
    pretrained: bool = True,
    checkpoint_path: str | Path | None = None,
    z_dim: int = 64,
    tiny_width: int = 16,
    e_out_dim: int = 32,
    scratch_batch_stats: bool = True,
) -> tuple[nn.Module, int | None, int | None]:
    """Build a Coordinator encoder.

    Args:
        name: One of ``ENCODERS``.
        pretrained: Load pretrained weights (timm / HF hub, or ``checkpoint_path``).
        checkpoint_path: Local weights file (timm keys; MAE/DINO original checkpoints work).
        z_dim: Feature size of the ``tiny`` encoder.
        tiny_width: Width of the ``tiny`` encoder.
        e_out_dim: Output channels of the ``scratch`` encoder.
        scratch_batch_stats: See :class:`ScratchEncoder`.

    Returns:
        ``(encoder, z_dim, input_size)``: ``z_dim`` is None for ``scratch`` (it outputs the decoder's
        input cube directly); ``input_size`` is None when the encoder takes the image as it comes.
    """
    if name not in ENCODERS:
        raise ValueError(unknown_name("Coordinator encoder", name, ENCODERS))
    if name in ("vit_mae_base", "vit_base"):
        # The official code runs the HF ports, whose configs use LayerNorm eps 1e-12 (timm's
        # default is 1e-6); the eps is not a weight, so match it here.
        norm = partial(nn.LayerNorm, eps=1e-12)
        model = _create_timm(name, pretrained, checkpoint_path, norm_layer=norm)
        size = model.patch_embed.img_size
        return _TimmViTFeature(model, pre_norm=name == "vit_mae_base"), model.num_features, size[0]
    if name == "dino_rn50":
        model = _create_timm(name, pretrained, checkpoint_path)
        return _TimmPooledFeature(model), model.num_features, 224
    if name == "scratch":
        if pretrained or checkpoint_path is not None:
            raise ValueError(
                "The 'scratch' Coordinator encoder is random by design (spec §2.2); set "
                "pretrained=false and checkpoint_path=null."
            )
        return ScratchEncoder(e_out_dim, batch_stats=scratch_batch_stats), None, 224
    if pretrained or checkpoint_path is not None:
        raise ValueError(
            "The 'tiny' Coordinator encoder has no pretrained weights; set pretrained=false."
        )
    return TinyEncoder(z_dim, tiny_width), z_dim, None


class CoordinatorDecoder(nn.Module):
    """Trigger vector + transposed-conv decoder (official ``DecoderManual``, spec §2.2).

    Args:
        src_channels: Channels of the 7 x 7 input cube (SRC_DIM / 49).
        z_dim: Encoder feature size; the trigger has ``49 * src_channels - z_dim`` entries. None: the
            input is already a cube (scratch encoder) and there is no trigger.
        image_size: Side of the prompt. 224 = 5 doublings of 7; other sizes use
            round(log2(size / 7)) doublings and a bilinear resize.
        first_groups: Groups of the first transposed conv (default min(src_channels, 64); 32 for the
            DINO ResNet-50 variant).
        trigger_init: Bounds of the uniform trigger initialisation.
    """

    def __init__(
        self,
        src_channels: int,
        z_dim: int | None,
        image_size: int = 224,
        first_groups: int | None = None,
        trigger_init: tuple[float, float] = (0.0, 0.1),
    ) -> None:
        super().__init__()
        self.src_channels, self.z_dim, self.image_size = src_channels, z_dim, image_size
        if z_dim is not None:
            trig_dim = src_channels * GRID * GRID - z_dim
            if trig_dim < 0:
                raise ValueError(
                    f"src_dim={src_channels * GRID * GRID} is smaller than the encoder feature "
                    f"z_dim={z_dim}; use a multiple of 49 >= z_dim."
                )
            # Registered first: the official p_trigger leads parameters_to_vector.
            self.trigger = nn.Parameter(torch.empty(1, trig_dim))  # (1, SRC_DIM - z_dim)
            nn.init.uniform_(self.trigger, a=trigger_init[0], b=trigger_init[1])
        else:
            self.register_parameter("trigger", None)

        # Nearest power of two in log space: the resize factor stays within [0.71, 1.41], and small
        # models are not decoded at twice their resolution (CPU cost).
        n_up = max(1, round(math.log2(image_size / GRID)))
        self.native_size = GRID * 2**n_up
        # 224: blocks (src->64->64), (64->64->32), (32->32->32), (32->32->16), then ConvT 16->3.
        # Fewer/more doublings drop/add 32-channel middle blocks.
        n_blocks = n_up - 1
        outs = [16] if n_blocks == 1 else ([64] + [32] * (n_blocks - 2) + [16] if n_blocks else [])
        layers: list[nn.Module] = []
        c_in = src_channels
        for i, c_out in enumerate(outs):
            mid = 64 if i == 0 else c_in
            groups = (first_groups or min(src_channels, 64)) if i == 0 else c_in
            layers += [
                nn.ConvTranspose2d(c_in, mid, 2, 2, 0, groups=groups),  # dw, doubles H and W
                nn.ConvTranspose2d(mid, c_out, kernel_size=1, bias=False),  # pw
                nn.BatchNorm2d(c_out),
                nn.GELU(),
            ]
            c_in = c_out
        # Last step: dense ConvT to RGB, no output activation (the prompt is unbounded).
        layers.append(nn.ConvTranspose2d(c_in, 3, 2, 2, 0, bias=False))
        self.body = nn.Sequential(*layers)

    def _cube(self, z: Tensor, trigger: Tensor | None, rows: int) -> Tensor:
        """Decoder input for ``rows`` parameter rows, stacked along channels.  # (B, R*src_c, 7, 7)

        Args:
            z: Encoder features (B, z_dim), or a cube (B, src_c, 7, 7) when there is no trigger.
            trigger: Trigger rows (R, 1, T), or None.
            rows: R.
        """
        b = z.shape[0]
        if trigger is None:
            return z.repeat(1, rows, 1, 1)
        feats = z.unsqueeze(1).expand(b, rows, z.shape[-1])  # (B, R, z_dim)
        trig = trigger.reshape(1, rows, -1).expand(b, rows, trigger.shape[-1])  # (B, R, T)
        flat = torch.cat([feats.to(trig.dtype), trig], dim=2)  # (B, R, SRC_DIM)
        return flat.reshape(b, rows * self.src_channels, GRID, GRID)

    def _resize(self, out: Tensor) -> Tensor:
        if self.native_size == self.image_size:
            return out
        # DEVIATION: the official decoder only targets 224 px (5 exact doublings of 7). For other
        # sizes (tiny models) the prompt is decoded at 7 * 2^round(log2(size/7)) and resized
        # bilinearly to the target size.
        size = (self.image_size, self.image_size)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)

    def forward(self, z: Tensor) -> Tensor:
        """Prompt from encoder features with the module's own parameters.  # (B, 3, S, S)"""
        trig = None if self.trigger is None else self.trigger.unsqueeze(0)
        return self._resize(self.body(self._cube(z, trig, 1)))

    def forward_batched(self, z: Tensor, thetas: Tensor) -> Tensor:
        """Prompts for R flat parameter vectors in one pass.

        Train mode: row r normalises with its own batch statistics, and the BN running statistics are
        updated once per row in row order, as R sequential forwards would do (spec §2.4). Eval mode:
        every row uses the running statistics.

        Args:
            z: Encoder features (B, z_dim) or cube (B, src_c, 7, 7), shared by all rows.
            thetas: Flat parameter vectors in ``parameters()`` order.  # (R, N)

        Returns:
            Prompts.  # (R, B, 3, S, S)
        """
        named = list(self.named_parameters())
        rows = thetas.shape[0]
        parts = dict(
            zip(
                [n for n, _ in named],
                unflatten_rows(thetas, [p.shape for _, p in named]),
                strict=True,
            )
        )
        x = self._cube(z, parts.get("trigger"), rows)
        for i, layer in enumerate(self.body):
            w, b = parts.get(f"body.{i}.weight"), parts.get(f"body.{i}.bias")
            if isinstance(layer, nn.ConvTranspose2d):
                assert w is not None
                x = F.conv_transpose2d(
                    x,
                    w.reshape(rows * w.shape[1], *w.shape[2:]),  # (R*in, out/g, k, k)
                    None if b is None else b.reshape(-1),
                    stride=layer.stride,
                    padding=layer.padding,
                    output_padding=layer.output_padding,
                    groups=layer.groups * rows,
                    dilation=layer.dilation,
                )
            elif isinstance(layer, nn.BatchNorm2d):
                x = _batch_norm_rows(layer, x, w, b, rows)
            else:
                x = layer(x)
        bsz, _, h, wd = x.shape
        out = x.reshape(bsz, rows, 3, h, wd).transpose(0, 1)  # (R, B, 3, H, W)
        return self._resize(out.reshape(rows * bsz, 3, h, wd)).reshape(
            rows, bsz, 3, self.image_size, self.image_size
        )


def _batch_norm_rows(
    bn: nn.BatchNorm2d, x: Tensor, weight: Tensor | None, bias: Tensor | None, rows: int
) -> Tensor:
    """BatchNorm of ``rows`` decoders stacked along channels (B, R*C, H, W), each with its own affine."""
    w = None if weight is None else weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    use_batch_stats = bn.training or bn.running_mean is None
    if not use_batch_stats:
        assert bn.running_mean is not None and bn.running_var is not None
        return F.batch_norm(
            x, bn.running_mean.repeat(rows), bn.running_var.repeat(rows), w, b, False, 0.0, bn.eps
        )
    y = F.batch_norm(x, None, None, w, b, True, 0.0, bn.eps)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            xf = x.detach().float()
            mean = xf.mean(dim=(0, 2, 3)).reshape(rows, -1)  # (R, C)
            var = xf.var(dim=(0, 2, 3), unbiased=True).reshape(rows, -1)  # (R, C), as nn.BatchNorm
            assert bn.running_var is not None and bn.num_batches_tracked is not None
            for r in range(rows):  # sequential updates, in row order
                bn.num_batches_tracked.add_(1)
                f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
                rm, rv = bn.running_mean, bn.running_var
                rm.copy_(f * mean[r].to(rm.dtype) + (1 - f) * rm)
                rv.copy_(f * var[r].to(rv.dtype) + (1 - f) * rv)
    return y


class Coordinator(nn.Module):
    """BlackVIP's prompt generator h_phi(x) = g([f_enc(x); phi_t]) (spec §2).

    Args:
        encoder: One of ``vit_mae_base`` (official default), ``vit_base``, ``dino_rn50``, ``scratch``,
            ``tiny``.
        src_dim: SRC_DIM, size of the decoder input (a multiple of 49): 1568 (ViT encoders), 3136
            (dino_rn50). Ignored by ``scratch`` (its encoder outputs ``e_out_dim`` x 7 x 7).
        image_size: Side of the prompt (the target model's input size).
        pretrained: Load the encoder's pretrained weights (False: random, for tests).
        checkpoint_path: Local weights file for the encoder (overrides the hub).
        z_dim: Feature size of the ``tiny`` encoder.
        tiny_width: Width of the ``tiny`` encoder.
        encoder_input_size: Input size of the ``tiny`` encoder (None: the image as it comes).
        e_out_dim: Output channels of the ``scratch`` encoder (``E_OUT_DIM``).
        scratch_batch_stats: The ``scratch`` encoder's BN uses batch statistics (official behaviour).
        trigger_init: Bounds of the uniform trigger initialisation.
        save_encoder: Keep the frozen encoder's weights in ``state_dict`` (default: only when it is
            not pretrained, since pretrained weights are re-loaded from their source on construction).
    """

    def __init__(
        self,
        encoder: str = "vit_mae_base",
        src_dim: int = 1568,
        image_size: int = 224,
        pretrained: bool = True,
        checkpoint_path: str | Path | None = None,
        z_dim: int = 64,
        tiny_width: int = 16,
        encoder_input_size: int | None = None,
        e_out_dim: int = 32,
        scratch_batch_stats: bool = True,
        trigger_init: Sequence[float] = (0.0, 0.1),
        save_encoder: bool | None = None,
    ) -> None:
        super().__init__()
        if encoder != "scratch" and src_dim % (GRID * GRID):
            raise ValueError(f"src_dim={src_dim} must be a multiple of 49 (a C x 7 x 7 cube).")
        enc, feat_dim, input_size = build_encoder(
            encoder, pretrained, checkpoint_path, z_dim, tiny_width, e_out_dim, scratch_batch_stats
        )
        self.encoder_name = encoder
        self.encoder = enc.eval().requires_grad_(False)
        self.encoder_input_size = encoder_input_size if encoder == "tiny" else input_size
        self.image_size = image_size
        lo, hi = float(trigger_init[0]), float(trigger_init[1])
        if encoder == "scratch":
            self.decoder = CoordinatorDecoder(e_out_dim, None, image_size, trigger_init=(lo, hi))
        else:
            self.decoder = CoordinatorDecoder(
                src_dim // (GRID * GRID),
                feat_dim,
                image_size,
                first_groups=32 if encoder == "dino_rn50" else None,
                trigger_init=(lo, hi),
            )
        self.save_encoder = (not pretrained) if save_encoder is None else save_encoder
        self.register_state_dict_post_hook(_drop_encoder_keys)
        self.register_load_state_dict_pre_hook(_fill_encoder_keys)

    def train(self, mode: bool = True) -> Coordinator:
        super().train(mode)
        self.encoder.eval()  # frozen: pretrained norm/dropout behaviour
        return self

    def learnable_parameters(self) -> list[nn.Parameter]:
        """The SPSA parameter vector's tensors: trigger, then decoder weights and BN affines."""
        return list(self.decoder.parameters())

    @property
    def num_learnable(self) -> int:
        """Length of the learnable vector (9,920 for the official configuration)."""
        return sum(p.numel() for p in self.learnable_parameters())

    def flat_parameters(self) -> Tensor:
        """The learnable vector.  # (N,)"""
        with torch.no_grad():
            return parameters_to_vector(self.learnable_parameters()).detach().clone()

    def load_flat(self, vec: Tensor) -> None:
        """Overwrite the learnable vector with ``vec`` (N,)."""
        with torch.no_grad():
            vector_to_parameters(vec.detach().clone(), self.learnable_parameters())

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Frozen encoder feature; compute once per step and reuse for every perturbation.

        Args:
            x: CLIP-normalised images, as CLIP receives them.  # (B, 3, S, S)

        Returns:
            ``(B, z_dim)``, or ``(B, e_out_dim, 7, 7)`` for the scratch encoder.
        """
        size = self.encoder_input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            # Only for non-native sizes (tiny models): at 224 px the encoder sees x unchanged.
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Prompt from cached features with the current parameters.  # (B, 3, S, S)"""
        return self.decoder(z)

    def decode_batched(self, z: Tensor, thetas: Tensor, max_rows: int | None = None) -> Tensor:
        """Prompts for R flat parameter vectors (see ``CoordinatorDecoder.forward_batched``).

        Args:
            z: Cached encoder features.
            thetas: Learnable vectors, e.g. SPSA's (+Delta_1, -Delta_1, ...) rows.  # (R, N)
            max_rows: Decode at most this many rows per pass (memory); chunks run in row order,
                so outputs and BN running statistics are unchanged.

        Returns:
            Prompts.  # (R, B, 3, S, S)
        """
        if max_rows is None or max_rows >= thetas.shape[0]:
            return self.decoder.forward_batched(z, thetas)
        return torch.cat([self.decoder.forward_batched(z, t) for t in thetas.split(max_rows)])

    def forward(self, x: Tensor) -> Tensor:
        """Prompt h_phi(x) (unbounded; the caller adds eps * prompt and clamps).  # (B, 3, S, S)"""
        return self.decode(self.encode(x))

    def forward_batched(self, x: Tensor, thetas: Tensor, max_rows: int | None = None) -> Tensor:
        """Prompts of x for R flat parameter vectors, encoding x once.  # (R, B, 3, S, S)"""
        return self.decode_batched(self.encode(x), thetas, max_rows)


def _drop_encoder_keys(
    module: Coordinator, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    if module.save_encoder:
        return
    for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
        del state_dict[key]


def _fill_encoder_keys(
    module: Coordinator,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Checkpoints without encoder weights keep the current (re-loaded pretrained) encoder."""
    enc_prefix = prefix + "encoder."
    if module.save_encoder or any(k.startswith(enc_prefix) for k in state_dict):
        return
    for key, value in module.encoder.state_dict().items():
        state_dict[enc_prefix + key] = value
