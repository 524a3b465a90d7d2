"""The BlackVIP Coordinator (spec §2): parameter count, shapes, frozen encoder, batched == sequential."""

from __future__ import annotations

import copy
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from reprolab.methods.prompting import coordinator as coordinator_module
from reprolab.methods.prompting.coordinator import (
    Coordinator,
    CoordinatorDecoder,
    _TimmPooledFeature,
    _TimmViTFeature,
)


def _tiny(**kw: object) -> Coordinator:
    torch.manual_seed(0)
    args: dict = dict(encoder="tiny", src_dim=784, image_size=64, pretrained=False, z_dim=64)
    args.update(kw)
    return Coordinator(**args)


def test_official_parameter_count_and_shape() -> None:
    # Meta device: the 86M-parameter MAE encoder is described, not allocated; it is not counted.
    with torch.device("meta"):
        coord = Coordinator("vit_mae_base", src_dim=1568, image_size=224, pretrained=False)
        prompt = coord(torch.empty(2, 3, 224, 224))
        dino = Coordinator("dino_rn50", src_dim=3136, image_size=224, pretrained=False)
    assert coord.num_learnable == 9_920
    assert coord.decoder.trigger is not None and coord.decoder.trigger.shape == (1, 800)
    assert prompt.shape == (2, 3, 224, 224)
    assert dino.num_learnable == 10_464
    assert all(not p.requires_grad for p in coord.encoder.parameters())
    names = [n for n, _ in coord.decoder.named_parameters()]
    assert names[0] == "trigger"  # leads the SPSA vector, like the official p_trigger


def test_decoder_layout_matches_spec_table() -> None:
    dec = CoordinatorDecoder(32, 768, 224)
    convs = [m for m in dec.body if isinstance(m, nn.ConvTranspose2d)]
    got = [
        (m.in_channels, m.out_channels, m.kernel_size[0], m.groups, m.bias is not None)
        for m in convs
    ]
    assert got == [
        (32, 64, 2, 32, True),
        (64, 64, 1, 1, False),
        (64, 64, 2, 64, True),
        (64, 32, 1, 1, False),
        (32, 32, 2, 32, True),
        (32, 32, 1, 1, False),
        (32, 32, 2, 32, True),
        (32, 16, 1, 1, False),
        (16, 3, 2, 1, False),
    ]
    assert [m.num_features for m in dec.body if isinstance(m, nn.BatchNorm2d)] == [64, 32, 32, 16]
    assert not isinstance(dec.body[-1], (nn.Tanh, nn.Sigmoid, nn.GELU))  # no output activation
    assert dec.trigger is not None and 0 <= dec.trigger.min() and dec.trigger.max() <= 0.1


def test_scratch_and_tiny_shapes() -> None:
    torch.manual_seed(0)
    scratch = Coordinator("scratch", image_size=224, pretrained=False)
    assert scratch.decoder.trigger is None and scratch.num_learnable == 9_920 - 800
    assert scratch(torch.randn(2, 3, 224, 224)).shape == (2, 3, 224, 224)
    coord = _tiny()
    assert coord.decoder.native_size == 56  # 3 doublings of 7, then resized to 64
    assert CoordinatorDecoder(32, 768, 224).native_size == 224  # official: 5 doublings, no resize
    assert coord(torch.randn(3, 3, 64, 64)).shape == (3, 3, 64, 64)
    small_in = _tiny(encoder_input_size=32)
    assert small_in.encode(torch.randn(2, 3, 64, 64)).shape == (2, 64)
    with pytest.raises(ValueError, match="did you mean 'vit_mae_base'"):
        Coordinator("vit_mae_bse", pretrained=False)
    with pytest.raises(ValueError, match="multiple of 49"):
        Coordinator("tiny", src_dim=100, pretrained=False)


def test_encoder_frozen_and_in_eval_mode() -> None:
    coord = _tiny()
    coord.train()
    assert coord.decoder.training and not coord.encoder.training
    learn = {id(p) for p in coord.learnable_parameters()}
    assert all(id(p) not in learn and not p.requires_grad for p in coord.encoder.parameters())
    z = coord.encode(torch.randn(2, 3, 64, 64))
    assert not z.requires_grad


def test_mae_feature_is_pre_final_norm_cls_token() -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    vit.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pre = _TimmViTFeature(vit, pre_norm=True)(x)
        post = vit.forward_features(x)[:, 0]
        torch.testing.assert_close(vit.norm(pre), post)
        torch.testing.assert_close(_TimmViTFeature(vit, pre_norm=False)(x), post)
    assert not torch.allclose(pre, post)


@pytest.mark.parametrize(("train", "max_rows"), [(True, None), (True, 4), (False, None)])
def test_batched_decoding_equals_sequential(train: bool, max_rows: int | None) -> None:
    coord = _tiny()
    coord.train(train)
    x = torch.randn(8, 3, 64, 64)
    phi = coord.flat_parameters()
    thetas = phi + 0.05 * torch.randn(6, phi.numel())  # (+D1, -D1, ...) or any rows
    seq_model = copy.deepcopy(coord)
    with torch.no_grad():
        z = coord.encode(x)
        batched = coord.decode_batched(z, thetas, max_rows=max_rows)
        seq = []
        for theta in thetas:
            seq_model.load_flat(theta)
            seq.append(seq_model.decode(z))
    assert batched.shape == (6, 8, 3, 64, 64)
    torch.testing.assert_close(batched, torch.stack(seq), rtol=1e-5, atol=1e-5)
    for bn_b, bn_s in zip(coord.decoder.modules(), seq_model.decoder.modules(), strict=True):
        if isinstance(bn_b, nn.BatchNorm2d):
            torch.testing.assert_close(bn_b.running_mean, bn_s.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bn_b.running_var, bn_s.running_var, rtol=1e-5, atol=1e-6)
            assert int(bn_b.num_batches_tracked) == int(bn_s.num_batches_tracked) == 6 * train
    # decode_batched does not touch the parameters themselves.
    torch.testing.assert_close(coord.flat_parameters(), phi, rtol=0, atol=0)


def test_batched_official_decoder_at_224_equals_sequential() -> None:
    torch.manual_seed(0)
    dec = CoordinatorDecoder(32, 768, 224).train()
    ref = copy.deepcopy(dec)
    z = torch.randn(4, 768)
    phi = torch.nn.utils.parameters_to_vector(dec.parameters()).detach()
    thetas = phi + 0.01 * torch.randn(4, phi.numel())
    with torch.no_grad():
        batched = dec.forward_batched(z, thetas)
        seq = []
        for theta in thetas:
            torch.nn.utils.vector_to_parameters(theta.clone(), ref.parameters())
            seq.append(ref(z))
    torch.testing.assert_close(batched, torch.stack(seq), rtol=1e-5, atol=1e-5)
    bns = [(a, b) for a, b in zip(dec.body, ref.body, strict=True) if isinstance(a, nn.BatchNorm2d)]
    for a, b in bns:
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)


def test_state_dict_skips_pretrained_encoder_only() -> None:
    coord = _tiny()
    assert any(k.startswith("encoder.") for k in coord.state_dict())
    lean = _tiny(save_encoder=False)
    sd = lean.state_dict()
    assert not any(k.startswith("encoder.") for k in sd) and "decoder.trigger" in sd
    other = _tiny(save_encoder=False)
    with torch.no_grad():
        other.decoder.trigger.zero_()
    other.load_state_dict(sd)  # strict: encoder keys are filled from the live encoder
    torch.testing.assert_close(other.flat_parameters(), lean.flat_parameters())
    wrapper = nn.Module()
    wrapper.coordinator = lean
    assert not any(".encoder." in k for k in wrapper.state_dict())
    with pytest.raises(RuntimeError):
        _tiny().load_state_dict(sd)  # a saved-encoder model still demands its encoder weights


@pytest.mark.parametrize(
    ("size", "native", "n_bn"), [(32, 28, 1), (48, 56, 2), (96, 112, 3), (448, 448, 5)]
)
def test_other_sizes_shapes_and_batched(size: int, native: int, n_bn: int) -> None:
    torch.manual_seed(0)
    dec = CoordinatorDecoder(16, 64, size).train()
    assert dec.native_size == native
    assert sum(isinstance(m, nn.BatchNorm2d) for m in dec.body) == n_bn
    ref = copy.deepcopy(dec)
    z = torch.randn(3, 64)
    thetas = torch.nn.utils.parameters_to_vector(dec.parameters()).detach().repeat(2, 1)
    thetas[1] += 0.01
    with torch.no_grad():
        out = dec.forward_batched(z, thetas)
        torch.nn.utils.vector_to_parameters(thetas[1].clone(), ref.parameters())
        ref(z)
        last = ref(z)
    assert out.shape == (2, 3, 3, size, size)
    torch.testing.assert_close(out[1], last, rtol=1e-5, atol=1e-5)


def test_tiny_encoder_outputs_are_pinned() -> None:
    # The miniature BlackVIP table runs this encoder: seed 0 must keep giving these features and
    # prompts (recorded before the timm encoders moved to models/timm.py).
    coord = _tiny()
    coord.train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z, prompt = coord.encode(x), coord(x)
    expected = [[-0.10662910, -0.13033397, -0.02321367], [-0.10889471, -0.13351106, -0.02485907]]
    torch.testing.assert_close(z[:, :3], torch.tensor(expected), rtol=0, atol=1e-6)
    assert float(z.sum()) == pytest.approx(1.1613507, abs=1e-5)
    assert float(prompt.sum()) == pytest.approx(-329.49734, abs=1e-2)
    assert float(prompt.abs().sum()) == pytest.approx(5022.6733, abs=1e-2)
    torch.testing.assert_close(
        prompt[0, 0, 0, :3], torch.tensor([-0.21436070, 0.38845566, -0.06567244]), rtol=0, atol=1e-5
    )


# Small timm stand-ins for the paper encoders (same code path, CPU-test sizes).
SMALL_TIMM = {
    "vit_mae_base": "vit_tiny_patch16_224",
    "vit_base": "vit_tiny_patch16_224",
    "dino_rn50": "resnet18",
}


@pytest.mark.parametrize("encoder", ["vit_mae_base", "vit_base", "dino_rn50"])
def test_timm_encoders_equal_direct_timm_construction(
    encoder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built through TimmBackbone: the same weights and features as the old direct timm call."""
    import timm

    monkeypatch.setattr(coordinator_module, "TIMM_NAMES", {**SMALL_TIMM, "dino_rn50": "resnet18"})
    name = coordinator_module.TIMM_NAMES[encoder]
    src_dim = 3136 if encoder == "dino_rn50" else 1568
    torch.manual_seed(0)
    coord = Coordinator(encoder, src_dim=src_dim, image_size=224, pretrained=False)
    torch.manual_seed(0)  # the old path: timm.create_model, then the feature wrapper
    if encoder == "dino_rn50":
        ref = _TimmPooledFeature(timm.create_model(name, pretrained=False, num_classes=0))
    else:
        norm = partial(nn.LayerNorm, eps=1e-12)
        vit = timm.create_model(name, pretrained=False, num_classes=0, norm_layer=norm)
        ref = _TimmViTFeature(vit, pre_norm=encoder == "vit_mae_base")
    ref.eval()
    assert coord.encoder_input_size == 224
    sd, ref_sd = coord.encoder.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(coord.encode(x), ref(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in coord.encoder.parameters())


def test_timm_encoder_checkpoint_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coordinator_module, "TIMM_NAMES", SMALL_TIMM)
    torch.manual_seed(0)
    src = Coordinator("vit_mae_base", image_size=224, pretrained=False)
    torch.save(src.encoder.model.state_dict(), tmp_path / "mae.pth")
    torch.manual_seed(1)
    loaded = Coordinator(
        "vit_mae_base", image_size=224, pretrained=True, checkpoint_path=tmp_path / "mae.pth"
    )
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), src.encode(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        Coordinator("vit_mae_base", pretrained=True, checkpoint_path=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="no timm hub weights"):
        Coordinator("dino_rn50", src_dim=3136, pretrained=True)


def test_offline_pretrained_encoder_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    from reprolab.models import timm as timm_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(timm_backbone, "_is_cached", lambda cfg, cache_dir: False)
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as e:
        Coordinator("vit_mae_base", pretrained=True)
    assert time.perf_counter() - t0 < 1.0  # before the 86M-parameter ViT is built
    msg = str(e.value)
    assert "download_weights.py --timm vit_base_patch16_224.mae" in msg
    assert "--coordinator" in msg and "method.coordinator.pretrained=false" in msg
