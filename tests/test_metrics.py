"""ECE and the zero-shot head against direct computations."""

import torch
import torch.nn.functional as F

from reprolab.methods.base import GroupAccuracy
from reprolab.metrics.calibration import expected_calibration_error


def test_ece_hand_computed() -> None:
    # Two bins of width 0.5. Confidences 0.9, 0.8 (bin 2), 0.6 (bin 2), 0.4 can't occur for 2 classes
    # (max prob >= 0.5), so use probabilities directly as log-probs.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 0, 1])
    # confidences: .9 (correct), .8 (wrong), .6 (correct), .7 (correct); all in bin (0.5, 1.0]
    # bin acc = 3/4, bin conf = (0.9+0.8+0.6+0.7)/4 = 0.75 -> ECE = |0.75-0.75| = 0 with 2 bins.
    assert abs(expected_calibration_error(probs.log(), labels, n_bins=2)) < 1e-6
    # With 10 bins: bins (0.5,0.6]: {.6 correct}, (0.6,0.7]: {.7 correct}, (0.7,0.8]: {.8 wrong},
    # (0.8,0.9]: {.9 correct}. ECE = 1/4(|1-.6| + |1-.7| + |0-.8| + |1-.9|) = 1/4 * 1.6 = 0.4
    assert abs(expected_calibration_error(probs.log(), labels, n_bins=10) - 0.4) < 1e-6


def test_worst_group_accuracy() -> None:
    m = GroupAccuracy(num_groups=3)
    preds = torch.tensor([0, 1, 1, 0, 1, 1])
    labels = torch.tensor([0, 1, 0, 0, 1, 0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    m.update(preds, labels, groups)
    # group accs: g0 2/2, g1 1/2, g2 1/2 -> worst 0.5
    assert float(m.compute()) == 0.5


def test_zeroshot_head_matches_direct_computation() -> None:
    from reprolab.models.clip import CLIPBackbone

    torch.manual_seed(0)
    bb = CLIPBackbone("t", "reprolab-tiny-clip", pretrained=None)
    classes, templates = ["red_square", "circle"], ["a photo of a {}.", "a {} shape"]
    head = bb.zeroshot_weights(classes, templates)
    tok = bb.tokenizer
    rows = []
    for c in classes:
        texts = [t.format(c.replace("_", " ")) for t in templates]
        e = bb.model.encode_text(tok(texts))
        e = e / e.norm(dim=-1, keepdim=True)
        m = e.mean(0)
        rows.append(m / m.norm())
    expected = torch.stack(rows)
    assert torch.allclose(head, expected, atol=1e-6)
    assert torch.allclose(head.norm(dim=-1), torch.ones(2), atol=1e-6)
    images = torch.randn(3, 3, bb.preprocess.image_size, bb.preprocess.image_size)
    feats = F.normalize(bb.model.encode_image(images), dim=-1)
    assert torch.allclose(bb.logits(images, head), bb.logit_scale * feats @ expected.t(), atol=1e-5)
    assert bb.zeroshot_weights(classes, templates) is head  # cached, text encoded once
