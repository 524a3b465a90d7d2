"""The black-box oracle: logits only, no autograd, no parameters, counted queries and budgets."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.models.blackbox import BlackBox, BlackBoxGradientError, QueryBudgetExceeded

CLASSES = ["cat", "dog", "car", "tree", "boat"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


class FakeBackbone(nn.Module):
    """A random linear "CLIP" with the CLIPBackbone protocol (encode_image, zeroshot_weights)."""

    def __init__(self, dim: int = 16, size: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * size * size, dim)
        self.logit_scale = 100.0
        self.dim = dim
        self.text_calls = 0

    def encode_image(self, images: Tensor) -> Tensor:
        return self.proj(images.flatten(1))  # (B, D)

    def zeroshot_weights(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        self.text_calls += 1
        gen = torch.Generator().manual_seed(0)
        emb = torch.randn(len(classnames), len(templates), self.dim, generator=gen)
        return F.normalize(F.normalize(emb, dim=-1).mean(1), dim=-1)  # (C, D)


@pytest.fixture()
def backbone() -> FakeBackbone:
    torch.manual_seed(0)
    return FakeBackbone()


def test_logits_match_zero_shot_head(backbone: FakeBackbone) -> None:
    bb = BlackBox(backbone, CLASSES, TEMPLATES)
    x = torch.randn(4, 3, 8, 8)
    out = bb(x)
    with torch.no_grad():
        w = backbone.zeroshot_weights(CLASSES, TEMPLATES)
        ref = 100.0 * F.normalize(backbone.encode_image(x), dim=-1) @ w.T
    torch.testing.assert_close(out, ref)
    assert out.shape == (4, 5) and bb.num_classes == 5
    assert backbone.text_calls == 2  # the head is computed once at construction (+1 here)
    assert not out.requires_grad and out.grad_fn is None and not out.is_inference()


def test_refuses_gradients(backbone: FakeBackbone) -> None:
    bb = BlackBox(backbone, CLASSES, TEMPLATES)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with pytest.raises(BlackBoxGradientError, match="estimate gradients from queries"):
        bb(x)
    out = bb(x.detach())
    with pytest.raises(RuntimeError):
        out.sum().backward()
    assert all(not p.requires_grad for p in backbone.parameters())
    assert bb.queries == 1  # the refused call is not counted


def test_counts_queries_and_images(backbone: FakeBackbone) -> None:
    bb = BlackBox(backbone, CLASSES, TEMPLATES)
    bb(torch.randn(3, 3, 8, 8))
    bb(torch.randn(10, 3, 8, 8), queries=5)  # 5 stacked minibatches of 2
    outs = bb.query_many([torch.randn(4, 3, 8, 8) for _ in range(3)])
    assert [o.shape for o in outs] == [(4, 5)] * 3
    assert bb.queries == 1 + 5 + 3 and bb.images == 3 + 10 + 12
    with pytest.raises(ValueError, match="equal minibatches"):
        bb(torch.randn(7, 3, 8, 8), queries=2)
    state = bb.state()
    fresh = BlackBox(backbone, CLASSES, TEMPLATES)
    fresh.load_state(state)
    assert fresh.state() == {"queries": 9, "images": 25}


@pytest.mark.parametrize("unit", ["images", "queries"])
def test_budget_stops_before_overrun(backbone: FakeBackbone, unit: str) -> None:
    budget = 20 if unit == "images" else 3
    bb = BlackBox(backbone, CLASSES, TEMPLATES, budget=budget, budget_unit=unit)  # type: ignore[arg-type]
    bb(torch.randn(8, 3, 8, 8))
    bb(torch.randn(8, 3, 8, 8))
    assert bb.remaining == (4 if unit == "images" else 1)
    with pytest.raises(QueryBudgetExceeded, match="budget exhausted"):
        bb(torch.randn(8, 3, 8, 8), queries=2)
    assert bb.state() == {"queries": 2, "images": 16}
    bb(torch.randn(4, 3, 8, 8))
    with pytest.raises(QueryBudgetExceeded):
        bb(torch.randn(1, 3, 8, 8))


def test_exposes_no_parameters(backbone: FakeBackbone) -> None:
    bb = BlackBox(backbone, CLASSES, TEMPLATES)
    assert not isinstance(bb, nn.Module)
    for name in ("parameters", "named_parameters", "state_dict", "backbone", "model", "visual"):
        assert not hasattr(bb, name)
    with pytest.raises(AttributeError, match="query-only"):
        bb.parameters()  # type: ignore[attr-defined]
    with pytest.raises((AttributeError, TypeError)):
        vars(bb)  # no __dict__
    with pytest.raises(AttributeError):
        bb._forward = lambda x: x  # type: ignore[misc]
    holder = nn.Module()
    holder.oracle = bb  # type: ignore[assignment]  # a plain attribute: not a submodule
    assert list(holder.parameters()) == [] and holder.state_dict() == {}


def test_chunked_evaluation_is_identical(backbone: FakeBackbone) -> None:
    x = torch.randn(23, 3, 8, 8)
    whole = BlackBox(backbone, CLASSES, TEMPLATES, max_batch=1000)(x)
    chunked = BlackBox(backbone, CLASSES, TEMPLATES, max_batch=4)(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)  # BLAS blocking only
    bb = BlackBox(backbone, CLASSES, TEMPLATES, max_batch=3)
    parts = bb.query_many([x[:5], x[5:10]])
    torch.testing.assert_close(torch.cat(parts), whole[:10], rtol=1e-5, atol=1e-5)
    assert "BlackBox(classes=5" in repr(bb)
