"""Pad prompter, BAR frame program, normalised-space clamp and focal loss (BlackVIP spec §2.3, §4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import vector_to_parameters

from reprolab.methods.prompting.prompters import (
    CLIP_MEAN,
    CLIP_STD,
    FrameProgram,
    PadPrompter,
    clamp_normalized,
    focal_loss,
    unflatten_rows,
)

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def test_clamp_bounds_match_spec() -> None:
    big = torch.full((2, 3, 4, 4), 1e3)
    hi = clamp_normalized(big)[0, :, 0, 0]
    lo = clamp_normalized(-big)[0, :, 0, 0]
    torch.testing.assert_close(lo, torch.tensor([-1.79226253, -1.75209713, -1.48021977]))
    torch.testing.assert_close(hi, torch.tensor([1.93033625, 2.07488384, 2.14589699]))
    x = 3 * torch.randn(5, 2, 3, 6, 6)  # extra leading dims (R, B, ...) are fine
    pix = clamp_normalized(x) * STD + MEAN
    assert pix.min() >= -1e-6 and pix.max() <= 1 + 1e-6
    inside = torch.rand(2, 3, 6, 6)
    normed = (inside - MEAN) / STD
    torch.testing.assert_close(clamp_normalized(normed), normed)


def test_pad_prompter_shape_count_and_application() -> None:
    vp = PadPrompter(224, 30)
    assert sum(p.numel() for p in vp.parameters()) == 69_840
    p = vp.prompt()
    assert p.shape == (1, 3, 224, 224)
    assert p[..., 30:194, 30:194].abs().sum() == 0 and p[..., :30, :].abs().sum() > 0
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(vp(x), x + p)  # no clipping
    tiny = PadPrompter(32, 4)
    assert sum(q.numel() for q in tiny.parameters()) == 2 * 3 * 4 * 32 + 2 * 3 * 24 * 4


def _assert_batched_matches_rows(prompter: torch.nn.Module, x: torch.Tensor, out_size: int) -> None:
    """forward_batched(x, thetas)[r] == forward(x) with the parameters set to thetas[r]."""
    thetas = torch.randn(3, sum(p.numel() for p in prompter.parameters()))
    out = prompter.forward_batched(x, thetas)
    assert out.shape == (3, x.shape[0], 3, out_size, out_size)
    for r in range(3):
        vector_to_parameters(thetas[r], prompter.parameters())
        with torch.no_grad():
            torch.testing.assert_close(out[r], prompter(x))


def test_pad_prompter_batched_matches_rows() -> None:
    _assert_batched_matches_rows(PadPrompter(32, 4), torch.randn(2, 3, 32, 32), 32)


def test_frame_program_geometry_and_range() -> None:
    prog = FrameProgram(224)
    assert prog.image_size == 194 and (prog.lower, prog.upper) == (15, 209)
    assert prog.W.numel() == 150_528
    assert int(prog.mask[0].sum()) == 224**2 - 194**2  # 37,620 effective values over 3 channels
    x01 = torch.rand(2, 3, 194, 194)
    x01[0, :, :5] = 0.0
    x01[1, :, :5] = 1.0  # the extremes stay in range too
    with torch.no_grad():
        out = prog((x01 - MEAN) / STD)
    assert out.shape == (2, 3, 224, 224)
    pix = out * STD + MEAN
    assert pix.min() >= -1e-5 and pix.max() <= 1 + 1e-5
    torch.testing.assert_close(pix[:, :, 15:209, 15:209], x01, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        pix[:, :, :15],
        torch.sigmoid(prog.W)[None, :, :15].expand(2, -1, -1, -1).detach(),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match="194x194"):
        prog(torch.zeros(1, 3, 224, 224))


def test_frame_program_tiny_and_batched() -> None:
    prog = FrameProgram(64)
    assert prog.image_size == 56 and (prog.lower, prog.upper) == (4, 60)
    assert sum(p.numel() for p in prog.parameters()) == prog.W.numel()
    _assert_batched_matches_rows(prog, torch.randn(2, 3, 56, 56), 64)


def test_focal_loss() -> None:
    logits = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(focal_loss(logits, y, gamma=0.0), F.cross_entropy(logits, y))
    logp = F.log_softmax(logits, -1)[torch.arange(6), y]
    ref = (-((1 - logp.exp()) ** 2) * logp).mean()
    torch.testing.assert_close(focal_loss(logits, y), ref)
    per_row = focal_loss(logits.expand(3, 6, 4), y.expand(3, 6), reduction="none").mean(-1)
    torch.testing.assert_close(per_row, ref.expand(3))


def test_unflatten_rows_checks_sizes() -> None:
    parts = unflatten_rows(torch.arange(14.0).view(2, 7), [torch.Size([1, 3]), torch.Size([4])])
    assert parts[0].shape == (2, 1, 3) and parts[1].tolist() == [[3, 4, 5, 6], [10, 11, 12, 13]]
    with pytest.raises(ValueError):
        unflatten_rows(torch.zeros(2, 5), [torch.Size([4])])
