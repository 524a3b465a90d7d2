"""Backbones: CLIPBackbone's trainable towers and logit scale, the zero-shot head, TimmBackbone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from reprolab.models import tiny_clip
from reprolab.models.clip import CLIPBackbone, zeroshot_head
from reprolab.models.timm import TimmBackbone

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "red_square", "star"]
TEMPLATES = ["a photo of a {}.", "a {} shape"]


def _clip(trainable: str = "none", **kw: object) -> CLIPBackbone:
    torch.manual_seed(0)
    return CLIPBackbone("t", tiny_clip.TINY_CLIP_ARCH, trainable=trainable, **kw)


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _grads(bb: CLIPBackbone) -> dict[str, bool]:
    """Per part: whether every parameter requires grad (asserting the part is uniform)."""
    out = {}
    for part, members in bb.parts().items():
        flags = set()
        for _, obj in members:
            ps = obj.parameters() if isinstance(obj, nn.Module) else [obj]
            flags |= {p.requires_grad for p in ps}
        assert len(flags) == 1, part
        out[part] = flags.pop()
    return out


def test_unknown_trainable_mode_lists_choices() -> None:
    with pytest.raises(
        ValueError, match=r"available: none, image, image_last, text, both \(did you mean 'image'"
    ):
        _clip("imag")


def test_frozen_by_default() -> None:
    bb = _clip()
    assert bb.trainable == "none" and not bb.train_logit_scale
    assert not any(p.requires_grad for p in bb.parameters())
    parent = nn.Module()
    parent.backbone = bb
    parent.train()
    assert not any(m.training for m in bb.modules())
    assert bb.frozen_state_prefixes() == [""]
    assert isinstance(bb.logit_scale, float)
    head = bb.zeroshot_weights(CLASSES, TEMPLATES)
    assert bb.zeroshot_weights(CLASSES, TEMPLATES) is head  # cached


@pytest.mark.parametrize(
    ("trainable", "expected"),
    [
        ("image", {"image": True, "text": False, "scale": False}),
        ("text", {"image": False, "text": True, "scale": False}),
        ("both", {"image": True, "text": True, "scale": True}),
    ],
)
def test_trained_towers_get_grads_and_follow_train_mode(trainable: str, expected: dict) -> None:
    bb = _clip(trainable)
    assert _grads(bb) == expected
    parent = nn.Module()
    parent.backbone = bb
    for mode in (True, False, True):
        parent.train(mode)
        assert bb.model.visual.training == (mode and expected["image"])
        assert bb.model.transformer.training == (mode and expected["text"])
        assert all(
            m.training == bb.model.transformer.training for m in bb.model.transformer.modules()
        )
    # A contrastive loss reaches exactly the trained parameters.
    img = F.normalize(bb.encode_image(_images()), dim=-1)
    txt = F.normalize(bb.encode_text(["a photo of a circle.", "a photo of a star."]), dim=-1)
    loss = F.cross_entropy(bb.scale() * img @ txt.t(), torch.arange(2))
    if trainable == "image":
        assert not txt.requires_grad
    loss.backward()
    for part, members in bb.parts().items():
        for key, obj in members:
            ps = list(obj.parameters()) if isinstance(obj, nn.Module) else [obj]
            got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)
            assert got == expected[part], (trainable, key)


def test_head_recomputed_when_text_trains_and_cached_when_frozen() -> None:
    bb = _clip("text")
    head = bb.zeroshot_weights(CLASSES, TEMPLATES)
    assert not head.requires_grad
    torch.testing.assert_close(bb.zeroshot_weights(CLASSES, TEMPLATES), head, rtol=0, atol=0)
    assert bb.zeroshot_weights(CLASSES, TEMPLATES) is not head  # recomputed, not cached
    # Differentiable head: the shared implementation over encode_text.
    grad_head = zeroshot_head(bb.encode_text, CLASSES, TEMPLATES)
    assert grad_head.requires_grad
    torch.testing.assert_close(grad_head.detach(), head)
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=1.0)
    img = F.normalize(bb.encode_image(_images(3)), dim=-1)
    F.cross_entropy(bb.logit_scale * img @ grad_head.t(), torch.arange(3)).backward()
    opt.step()
    after = bb.zeroshot_weights(CLASSES, TEMPLATES)
    assert not torch.allclose(after, head, atol=1e-4)  # one step on the text tower moved the head

    # The head depends on the text tower only: cached while it is frozen, even if the image trains.
    for mode in ("none", "image"):
        frozen = _clip(mode)
        h = frozen.zeroshot_weights(CLASSES, TEMPLATES)
        assert frozen.zeroshot_weights(CLASSES, TEMPLATES) is h, mode
    # ... until a state dict is loaded (WiSE-FT interpolation, a checkpoint): then recomputed.
    sd = {k: v.clone() for k, v in frozen.state_dict().items()}
    sd["model.text_projection"] = torch.randn_like(sd["model.text_projection"])
    frozen.load_state_dict(sd)
    assert not torch.allclose(frozen.zeroshot_weights(CLASSES, TEMPLATES), h, atol=1e-4)


@pytest.mark.parametrize(
    ("trainable", "flag", "trains"),
    [("none", None, False), ("image", None, False), ("text", None, False), ("both", None, True),
     ("both", False, False), ("image", True, True), ("none", True, True)],
)  # fmt: skip
def test_logit_scale_trains_only_when_asked(
    trainable: str, flag: bool | None, trains: bool
) -> None:
    bb = _clip(trainable, train_logit_scale=flag)
    assert bb.train_logit_scale == trains == bb.model.logit_scale.requires_grad
    s = bb.scale()
    assert s.requires_grad == trains and float(s.detach()) == bb.logit_scale
    head = bb.zeroshot_weights(CLASSES, TEMPLATES)
    logits = bb.logits(_images(), head)
    assert logits.requires_grad == (trains or trainable in ("image", "both"))
    if trains:
        logits.logsumexp(-1).sum().backward()
        assert bb.model.logit_scale.grad is not None and bb.model.logit_scale.grad != 0


def test_scale_at_the_clamp_still_has_a_gradient() -> None:
    bb = _clip("both")
    with torch.no_grad():
        bb.model.logit_scale.fill_(5.0)  # exp = 148
    bb.clamp_logit_scale_()
    assert float(bb.model.logit_scale.detach()) == pytest.approx(4.6052, abs=1e-4)
    s = bb.scale()  # OpenAI's value: exp(float32(ln 100)) = 100.0000076
    assert float(s.detach()) == bb.logit_scale == 100.0
    s.backward()
    assert float(bb.model.logit_scale.grad) == pytest.approx(100.0)


def _round_trip(child: nn.Module, fresh: nn.Module, mutate: list[str]) -> dict[str, torch.Tensor]:
    """Save `parent.backbone` without its frozen prefixes, load into `fresh` refilled from it.

    This is what the generic `Method` does: drop `<child>.<prefix>*` keys in on_save_checkpoint,
    `setdefault` them from the live module in on_load_checkpoint, then a strict load.
    """
    parent, other = nn.Module(), nn.Module()
    parent.backbone, other.backbone = child, fresh
    with torch.no_grad():
        for name, p in parent.named_parameters():
            if any(name.startswith(m) for m in mutate):
                p.add_(0.5)
    prefixes = tuple(f"backbone.{p}" for p in child.frozen_state_prefixes())
    saved = {
        k: v for k, v in parent.state_dict().items() if not (prefixes and k.startswith(prefixes))
    }
    loaded = dict(saved)
    for key, value in other.state_dict().items():
        if prefixes and key.startswith(prefixes):
            loaded.setdefault(key, value)
    other.load_state_dict(loaded, strict=True)
    return saved


@pytest.mark.parametrize(
    ("trainable", "flag", "prefixes"),
    [
        ("none", None, [""]),
        ("image", None, ["model.transformer.", "model.token_embedding.", "model.ln_final.",
                         "model.positional_embedding", "model.text_projection",
                         "model.logit_scale"]),
        ("text", None, ["model.visual.", "model.logit_scale"]),
        ("text", True, ["model.visual."]),
        ("both", None, []),
        ("both", False, ["model.logit_scale"]),
    ],
)  # fmt: skip
def test_frozen_state_prefixes_round_trip(
    trainable: str, flag: bool | None, prefixes: list
) -> None:
    bb = _clip(trainable, train_logit_scale=flag)
    assert sorted(bb.frozen_state_prefixes()) == sorted(prefixes)
    torch.manual_seed(1)  # the fresh module's frozen parts differ: they must come from it
    fresh = CLIPBackbone("t", tiny_clip.TINY_CLIP_ARCH, trainable=trainable, train_logit_scale=flag)
    live = {k: v.clone() for k, v in fresh.state_dict().items()}
    saved = _round_trip(bb, fresh, mutate=["backbone.model."])
    keys = list(bb.state_dict())
    frozen = {k for k in keys if any(k.startswith(p) for p in prefixes)}
    params = dict(bb.named_parameters())
    assert sorted(saved) == sorted(f"backbone.{k}" for k in keys if k not in frozen)
    for k, v in bb.state_dict().items():
        # Trained parts come from the checkpoint, frozen ones from the live (rebuilt) module.
        assert torch.equal(fresh.state_dict()[k], live[k] if k in frozen else v), k
        assert k in frozen or k not in params or not torch.equal(v, live[k]), k


@pytest.mark.parametrize("arch", ["ViT-B-16", "RN50", "ViT-B-16-SigLIP"])
def test_parts_cover_every_state_key_once(arch: str) -> None:
    import open_clip

    from reprolab.models.clip import _split_parts

    with torch.device("meta"):  # described, not allocated
        model = open_clip.create_model(arch, device="meta")
    parts = _split_parts(model)
    for key in model.state_dict():
        owners = [part for part, prefixes in parts.items() for p in prefixes if key.startswith(p)]
        assert len(owners) == 1, (key, owners)
    assert parts["image"] == ["visual."] and "logit_scale" in parts["scale"]


def test_one_zero_shot_head_implementation() -> None:
    bb = CLIPBackbone("t", tiny_clip.TINY_CLIP_ARCH, pretrained=str(tiny_clip.weights_path()))
    model, _ = tiny_clip.create_tiny_clip(True)
    names, templates = ["circle", "star"], ["a photo of a {}."]
    torch.testing.assert_close(
        tiny_clip.zeroshot_head(model, names, templates),
        bb.zeroshot_weights(names, templates),
        rtol=0,
        atol=0,
    )
    # Underscores become spaces, in both.
    torch.testing.assert_close(
        tiny_clip.zeroshot_head(model, ["sea_lion"], templates),
        tiny_clip.zeroshot_head(model, ["sea lion"], templates),
        rtol=0,
        atol=0,
    )


def test_param_counts_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="reprolab.models.clip"):
        _clip("image")
    lines = [r.getMessage() for r in caplog.records if "trainable" in r.getMessage()]
    assert len(lines) == 1 and "trainable=image" in lines[0] and "M frozen" in lines[0]


# -- timm -------------------------------------------------------------------------------------


def _resnet(**kw: object) -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone("r", "resnet18", **kw)


def test_timm_random_init_encodes_and_publishes_preprocess() -> None:
    import timm

    bb = _resnet()
    feats = bb.encode_image(_images(2, 64))
    assert feats.shape == (2, 512) == (2, bb.feature_dim)
    cfg = timm.data.resolve_model_data_config(bb.model)
    pre = bb.preprocess
    assert (pre.image_size, pre.mean, pre.std, pre.interpolation) == (
        cfg["input_size"][-1],
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        cfg["interpolation"],
    )
    torch.manual_seed(0)
    vit = TimmBackbone("v", "vit_tiny_patch16_224", img_size=32)
    assert vit.encode_image(_images(3, 32)).shape == (3, 192) == (3, vit.feature_dim)
    assert vit.preprocess.mean == (0.5, 0.5, 0.5)


def test_timm_frozen_or_trainable() -> None:
    frozen, trained = _resnet(), _resnet(trainable=True)
    parent = nn.Module()
    parent.a, parent.b = frozen, trained
    parent.train()
    assert not any(m.training for m in frozen.modules()) and trained.model.training
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trained.parameters())
    assert frozen.frozen_state_prefixes() == [""] and trained.frozen_state_prefixes() == []
    x = _images(2, 32)
    assert not frozen.encode_image(x).requires_grad and trained.encode_image(x).requires_grad
    torch.manual_seed(1)
    fresh = TimmBackbone("r", "resnet18")
    live = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert _round_trip(frozen, fresh, mutate=["backbone."]) == {}  # nothing saved
    assert all(torch.equal(v, live[k]) for k, v in fresh.state_dict().items())
    torch.manual_seed(1)
    fresh = TimmBackbone("r", "resnet18", trainable=True)
    saved = _round_trip(trained, fresh, mutate=["backbone."])
    assert len(saved) == len(trained.state_dict())
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_timm_local_checkpoint_and_cached_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import save_file

    ref = _resnet()
    x = _images(2, 32)
    torch.save(ref.model.state_dict(), tmp_path / "w.pth")
    from_file = TimmBackbone("r", "resnet18", pretrained=str(tmp_path / "w.pth"))
    assert torch.equal(from_file.encode_image(x), ref.encode_image(x))
    # An offline run finds a tag in the Hugging Face cache layout.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc")
    save_file(
        {k: v.contiguous() for k, v in ref.model.state_dict().items()}, snap / "model.safetensors"
    )
    cached = TimmBackbone("r", "resnet18", pretrained="a1_in1k", cache_dir=str(tmp_path / "hf"))
    assert cached.weights == "resnet18.a1_in1k"
    assert torch.equal(cached.encode_image(x), ref.encode_image(x))


@pytest.mark.parametrize("pretrained", [True, "resnet50.tv_in1k", "a1_in1k"])
def test_timm_offline_uncached_tag_fails_fast(
    pretrained: bool | str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    full = (
        "resnet50.a1_in1k" if pretrained is True else f"resnet50.{str(pretrained).split('.')[-1]}"
    )
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as e:
        TimmBackbone("r", "resnet50", pretrained=pretrained, cache_dir=str(tmp_path / "hf"))
    assert time.perf_counter() - t0 < 1.0  # before any model is built
    assert f"python scripts/download_weights.py --timm {full}" in str(e.value)
    assert "HF_HUB_OFFLINE=1" in str(e.value) and "local checkpoint file" in str(e.value)


def test_timm_bad_names() -> None:
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        TimmBackbone("r", "resnt50")
    with pytest.raises(ValueError, match="did you mean 'tv_in1k'"):
        TimmBackbone("r", "resnet50", pretrained="tv_in1kk")
    with pytest.raises(ValueError, match="does not match"):
        TimmBackbone("r", "resnet50", pretrained="vit_base_patch16_224.mae")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TimmBackbone("r", "resnet50", pretrained="/nowhere/weights.pth")


@pytest.mark.parametrize(
    ("config", "dim"),
    [("timm_resnet50", 2048), ("timm_vit_b16", 768), ("timm_resnet50_random", 2048),
     ("timm_vit_b16_random", 768)],
)  # fmt: skip
def test_timm_configs(config: str, dim: int) -> None:
    import hydra

    cfg = OmegaConf.load(ROOT / "configs" / "model" / f"{config}.yaml")
    assert cfg.name == config and cfg._target_ == "reprolab.models.timm.TimmBackbone"
    if not config.endswith("_random"):
        assert isinstance(cfg.pretrained, str) and cfg.pretrained.startswith(f"{cfg.arch}.")
        return
    assert cfg.pretrained is False
    cfg.cache_dir = None
    with torch.device("meta"):  # the full-size models are described, not allocated
        bb = hydra.utils.instantiate(cfg)
    assert bb.feature_dim == dim and bb.preprocess.image_size == 224


@pytest.mark.parametrize(
    ("arch", "last"),
    [
        ("ViT-B-16", ["visual.transformer.resblocks.11.", "visual.ln_post.", "visual.proj"]),
        ("RN50", ["visual.attnpool."]),
    ],
)
def test_image_last_splits_the_tower_so_every_key_has_one_owner(arch: str, last: list) -> None:
    """`image_last`: the last stage is `image`, the rest of the tower `image_rest`, disjoint."""
    import open_clip

    from reprolab.models.clip import _split_last_stage, _split_parts

    with torch.device("meta"):
        model = open_clip.create_model(arch, device="meta")
    parts = _split_last_stage(model, _split_parts(model))
    assert parts["image"] == last
    for key in model.state_dict():
        owners = [part for part, prefixes in parts.items() for p in prefixes if key.startswith(p)]
        assert len(owners) == 1, (key, owners)
    assert "visual.transformer.resblocks.10." in parts["image_rest"] or arch == "RN50"


def test_image_last_trains_only_the_last_stage_and_checkpoints_only_it() -> None:
    bb = _clip("image_last")
    trained = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.visual.attnpool.") for n in trained)
    bb.train()
    assert bb.model.visual.attnpool.training and not bb.model.visual.layer4.training
    assert not bb.model.visual.bn1.training  # frozen BatchNorm keeps its statistics
    frozen = bb.frozen_state_prefixes()
    kept = [k for k in bb.state_dict() if not any(k.startswith(p) for p in frozen)]
    assert sorted(kept) == sorted(
        k for k in bb.state_dict() if k.startswith("model.visual.attnpool.")
    )
    loss = bb.encode_image(_images()).sum()
    loss.backward()
    assert bb.model.visual.attnpool.c_proj.weight.grad is not None
    assert bb.model.visual.layer4[0].conv1.weight.grad is None
