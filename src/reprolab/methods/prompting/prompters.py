"""Pixel-space prompts of the black-box baselines of BlackVIP, and their helpers.

Paper: Oh et al., "BlackVIP: Black-Box Visual Prompting for Robust Transfer Learning", CVPR 2023
(arXiv 2303.14773); code `changdaeoh/BlackVIP` (`trainers/visual_prompters.py`, `trainers/utils.py`).
Reproduced here (spec §2.3, §4.2, §4.3):

- ``clamp_normalized``: clip each channel to the image of [0, 1] under CLIP normalisation
  (applied to BlackVIP's prompted image x + eps * h(x));
- ``PadPrompter``: Bahng et al.'s padding prompt (4 strips of width 30 at 224 px: 69,840 parameters),
  added in normalised space with no clipping (VP, VP with SPSA-GC);
- ``FrameProgram``: BAR's program (de-normalise the 194 px image, paste it centred on a black 224 px
  canvas, add sigmoid(W) * M on the border frame, re-normalise);
- ``focal_loss``: BAR's focal loss (gamma = 2);
- ``unflatten_rows``: turn a stack of flat parameter vectors into per-parameter stacks (batched SPSA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FrameProgram",
    "PadPrompter",
    "clamp_normalized",
    "focal_loss",
    "unflatten_rows",
]


def _channel_view(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    """Per-channel constants shaped (3, 1, 1) on ``like``'s device and dtype."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)


def normalized_bounds(
    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> tuple[Tensor, Tensor]:
    """Per-channel image of [0, 1] under (x - mean) / std: (lower, upper), each (3,)."""
    m = torch.as_tensor(mean, dtype=torch.float64)
    s = torch.as_tensor(std, dtype=torch.float64)
    return (0 - m) / s, (1 - m) / s


def clamp_normalized(
    x: Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Tensor:
    """Clip every channel of normalised images to the image of [0, 1] (spec §2.3).

    With CLIP statistics: R in [-1.79226253, 1.93033625], G in [-1.75209713, 2.07488384],
    B in [-1.48021977, 2.14589699].

    Args:
        x: Normalised images with channels at dim -3.  # (..., 3, H, W)
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
    """
    lo, hi = normalized_bounds(mean, std)
    return torch.clamp(x, min=_channel_view(lo, x), max=_channel_view(hi, x))


def unflatten_rows(thetas: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split rows of flat parameter vectors into per-parameter stacks.

    Uses the layout of ``torch.nn.utils.parameters_to_vector`` (parameters concatenated in order,
    each flattened row-major).

    Args:
        thetas: R flat parameter vectors.  # (R, N)
        shapes: Shapes of the parameters, in order; their sizes must sum to N.

    Returns:
        One tensor per parameter.  # [(R, *shape)]
    """
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if sum(sizes) != thetas.shape[-1]:
        raise ValueError(
            f"Parameter rows have {thetas.shape[-1]} entries but the parameters have {sum(sizes)}."
        )
    r = thetas.shape[0]
    return [
        chunk.reshape(r, *shape)
        for chunk, shape in zip(thetas.split(sizes, dim=-1), shapes, strict=True)
    ]


def focal_loss(
    logits: Tensor, target: Tensor, gamma: float = 2.0, reduction: str = "mean"
) -> Tensor:
    """Focal loss -(1 - p_t)^gamma log p_t of BAR (spec §4.2).

    As in the official implementation, the modulating factor (1 - p_t)^gamma is treated as a
    constant (computed from detached probabilities).

    Args:
        logits: Class scores.  # (..., C)
        target: Class indices.  # (...)
        gamma: Focusing parameter (2 in BAR).
        reduction: ``"mean"`` (over all elements), ``"sum"`` or ``"none"``.
    """
    logpt = F.log_softmax(logits.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    pt = logpt.detach().exp()
    loss = -((1 - pt) ** gamma) * logpt  # (...)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"Unknown reduction '{reduction}'; available: mean, sum, none.")


class PadPrompter(nn.Module):
    """Bahng et al.'s padding prompt, added in normalised pixel space without clipping (spec §4.3).

    Four learnable strips: top and bottom 3 x pad x S, left and right 3 x (S - 2 pad) x pad; the centre
    is zero. At S = 224, pad = 30 there are 69,840 parameters. Init N(0, 1) as the official code.

    Args:
        image_size: S, side of the (square) model input.
        pad_size: Width of the strips.
        init_std: standard deviation of the Gaussian init (1.0 = official; 0 starts at zero-shot).
    """

    def __init__(self, image_size: int = 224, pad_size: int = 30, init_std: float = 1.0) -> None:
        super().__init__()
        if not 0 < 2 * pad_size < image_size:
            raise ValueError(
                f"pad_size={pad_size} must be positive and leave a centre in image_size={image_size}."
            )
        self.image_size, self.pad_size = image_size, pad_size
        self.base_size = image_size - 2 * pad_size
        # Registration order = parameters_to_vector order of the official module.
        self.pad_up = nn.Parameter(torch.randn(1, 3, pad_size, image_size))
        self.pad_down = nn.Parameter(torch.randn(1, 3, pad_size, image_size))
        self.pad_left = nn.Parameter(torch.randn(1, 3, self.base_size, pad_size))
        self.pad_right = nn.Parameter(torch.randn(1, 3, self.base_size, pad_size))
        if init_std != 1.0:
            with torch.no_grad():
                for p in self.parameters():
                    p.mul_(init_std)

    @staticmethod
    def _assemble(up: Tensor, down: Tensor, left: Tensor, right: Tensor, base: int) -> Tensor:
        """Put the strips around a zero centre; strips have a leading row dim R.  # (R, 3, S, S)"""
        centre = up.new_zeros(up.shape[0], 3, base, base)
        middle = torch.cat([left, centre, right], dim=3)
        return torch.cat([up, middle, down], dim=2)

    def prompt(self) -> Tensor:
        """The full prompt image.  # (1, 3, S, S)"""
        return self._assemble(
            self.pad_up, self.pad_down, self.pad_left, self.pad_right, self.base_size
        )

    def forward(self, x: Tensor) -> Tensor:
        """x + prompt.  # (B, 3, S, S) -> (B, 3, S, S)"""
        return x + self.prompt()

    def forward_batched(self, x: Tensor, thetas: Tensor) -> Tensor:
        """Prompted images for each of R flat parameter vectors.

        Args:
            x: Normalised images.  # (B, 3, S, S)
            thetas: Flat parameter vectors in ``parameters()`` order.  # (R, N)

        Returns:
            ``x + prompt(theta_r)`` for every row r.  # (R, B, 3, S, S)
        """
        parts = unflatten_rows(thetas, [p.shape for p in self.parameters()])
        prompts = self._assemble(*(p.squeeze(1) for p in parts), base=self.base_size)
        return x.unsqueeze(0) + prompts.unsqueeze(1).to(x.dtype)


class FrameProgram(nn.Module):
    """BAR's visual program (spec §4.2).

    The input (a CLIP-normalised ``image_size`` image) is de-normalised to [0, 1], pasted at the centre
    of a black ``frame_size`` canvas, the program P = sigmoid(W) * M (M = 1 on the border frame, 0 on
    the pasted image) is added, and the result is re-normalised. Values stay in [0, 1] before the
    re-normalisation by construction, so there is no clipping. W is 3 x S x S, N(0, 1) init; the
    masked-out entries are still parameters (150,528 at S = 224).

    Args:
        frame_size: S, side of the target model input (224).
        image_size: Side of the embedded image (194 at 224). Default: 194/224 of ``frame_size``,
            rounded to an even number.
        mean: Normalisation mean of the target model.
        std: Normalisation std of the target model.
    """

    mask: Tensor

    def __init__(
        self,
        frame_size: int = 224,
        image_size: int | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        super().__init__()
        if image_size is None:
            # Tiny models: scale the official 194/224 ratio, keep it even so the frame is symmetric.
            image_size = 2 * round(frame_size * 194 / 224 / 2)
        if not 0 < image_size <= frame_size:
            raise ValueError(f"image_size={image_size} must be in (0, frame_size={frame_size}].")
        self.frame_size, self.image_size = frame_size, image_size
        # Official: centre - size//2 .. centre + size//2 (rows/cols 15..208 at 224/194); identical for
        # even sizes, and also correct for odd ones here.
        self.lower = (frame_size - image_size) // 2
        self.upper = self.lower + image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.W = nn.Parameter(torch.randn(3, frame_size, frame_size))
        mask = torch.ones(3, frame_size, frame_size)
        mask[:, self.lower : self.upper, self.lower : self.upper] = 0
        self.register_buffer("mask", mask, persistent=False)

    def _program(self, x: Tensor, w: Tensor) -> Tensor:
        """Apply programs w (R, 3, S, S) to images x (B, 3, s, s).  # (R, B, 3, S, S)"""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"FrameProgram expects {self.image_size}x{self.image_size} inputs (data.image_size "
                f"for BAR); got {tuple(x.shape[-2:])}."
            )
        mean, std = _channel_view(self.mean, x), _channel_view(self.std, x)
        inner = x * std + mean  # de-normalised to [0, 1]
        canvas = x.new_zeros(x.shape[0], 3, self.frame_size, self.frame_size)
        canvas[:, :, self.lower : self.upper, self.lower : self.upper] = inner
        program = torch.sigmoid(w.to(x.dtype)) * self.mask.to(x.dtype)  # (R, 3, S, S)
        out = canvas.unsqueeze(0) + program.unsqueeze(1)  # (R, B, 3, S, S), in [0, 1]
        return (out - mean) / std

    def forward(self, x: Tensor) -> Tensor:
        """Programmed, normalised images.  # (B, 3, s, s) -> (B, 3, S, S)"""
        return self._program(x, self.W.unsqueeze(0))[0]

    def forward_batched(self, x: Tensor, thetas: Tensor) -> Tensor:
        """Programmed images for each of R flat parameter vectors (R, 3*S*S).  # (R, B, 3, S, S)"""
        (w,) = unflatten_rows(thetas, [self.W.shape])
        return self._program(x, w)
