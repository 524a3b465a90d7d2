"""CoOp, CoCoOp, KgCoOp (prompting_posthoc.md A6 items 1-4 and 7) on the embedded tiny_clip.

Each check compares with an independent reference: zero-shot CLIP's head (`zeroshot_weights`), the
tokenizer's own ids and token embeddings, `encode_text`, a CoOp whose context is V + π(u_i) (for
CoCoOp's per-image prompts), Dassl's scheduler rebuilt from torch's `CosineAnnealingLR`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import open_clip
import pytest
import torch
import torch.nn.functional as F
from _group_helpers import BatchData, fit_batches

from reprolab.data.info import ImageClassificationInfo, TestSet
from reprolab.errors import ConfigValueError
from reprolab.methods.finetuning.source import SourceRunError
from reprolab.methods.prompting import cocoop as cocoop_module
from reprolab.methods.prompting.cocoop import CoCoOp
from reprolab.methods.prompting.coop import CoOp, PromptLearner
from reprolab.models import tiny_clip
from reprolab.models.clip import CLIPBackbone
from reprolab.optim.schedules import dassl_cosine

# Multi-token names (`sea_lion` -> "sea lion") exercise the middle / front assembly.
BASE = ["circle", "sea_lion", "triangle", "star"]
NEW = ["hexagon", "ring", "crescent_moon"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def backbone() -> CLIPBackbone:
    return CLIPBackbone(
        "tiny_clip", tiny_clip.TINY_CLIP_ARCH, pretrained=str(tiny_clip.weights_path())
    )


def info(classnames: list[str] = BASE, name: str = "shapes", **kw) -> ImageClassificationInfo:
    return ImageClassificationInfo(
        name=name, classnames=tuple(classnames), templates=(TEMPLATE,), **kw
    )


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def sgd(params, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def clip_state(b: CLIPBackbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in b.state_dict().items()}


# -- 1. exactness at init ----------------------------------------------------------------------
def test_coop_from_words_is_zero_shot_and_kg_term_is_zero(backbone: CLIPBackbone) -> None:
    torch.manual_seed(0)
    m = CoOp("kgcoop", backbone, info(), n_ctx=16, ctx_init="a photo of a", kg_weight=8.0)
    assert m.prompt_learner.ctx.shape == (4, backbone.text_width)  # M = words, whatever n_ctx says
    x = images(6)
    with torch.no_grad():
        ref = backbone.logits(x, backbone.zeroshot_weights(BASE, [TEMPLATE]))  # zero-shot CLIP
        got = m.logits(x)
        terms = m.loss_terms(m.image_features(x), torch.tensor([0, 1, 2, 3, 0, 1]))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert abs(float(terms["train/kg"])) < 1e-6
    assert float(terms["train/loss"]) == pytest.approx(float(terms["train/ce"]), abs=1e-5)
    assert m.text_cos(BASE) == pytest.approx(1.0, abs=1e-6)


# -- 2. token assembly --------------------------------------------------------------------------
def test_embedding_encoder_equals_encode_text(backbone: CLIPBackbone) -> None:
    texts = ["a photo of a sea lion.", "X X X X circle.", "star"]
    tokens = backbone.tokenize(texts)
    assert tokens.shape == (3, backbone.context_length) and tokens.dtype == torch.long
    emb = backbone.token_embedding(tokens).detach().requires_grad_(True)
    out = backbone.encode_text_embeddings(emb, tokens)
    torch.testing.assert_close(out, backbone.encode_text(texts), atol=1e-6, rtol=0)
    out.sum().backward()  # the tower is frozen, the embeddings still get gradients
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_token_assembly(backbone: CLIPBackbone, position: str) -> None:
    m_ctx = 5
    torch.manual_seed(0)
    learner = PromptLearner(backbone, BASE, n_ctx=m_ctx, class_token_position=position)
    embeds, tokens = learner(backbone, BASE)
    length, d = backbone.context_length, backbone.text_width
    assert embeds.shape == (len(BASE), length, d) and tokens.shape == (len(BASE), length)
    tok = backbone.tokenizer
    for c, name in enumerate(BASE):
        text = name.replace("_", " ")
        ids = backbone.tokenize([f"{text}."])[0]  # SOT, name, ".", EOT: the reference ids
        n = int((backbone.tokenize([text])[0] != 0).sum()) - 2
        start = {"end": 1 + m_ctx, "middle": 1 + m_ctx // 2, "front": 1}[position]
        ctx_pos = [p for p in range(1, 1 + m_ctx + n) if not start <= p < start + n]
        assert len(ctx_pos) == m_ctx
        # context slots hold V, in order
        torch.testing.assert_close(embeds[c, ctx_pos], learner.ctx.detach(), atol=0, rtol=0)
        # the rest decodes to the class name prompt, and holds its token embeddings
        rest = [p for p in range(length) if p not in ctx_pos]
        rest_ids = tokens[c, rest]
        nonpad = int((ids != 0).sum())
        assert torch.equal(rest_ids[:nonpad], ids[:nonpad])
        assert tok.decode(rest_ids[1 : nonpad - 1].tolist()).strip() == f"{text} ."
        assert torch.equal(tokens[c, start : start + n], ids[1 : 1 + n])
        ref = backbone.token_embedding(ids[None])[0]
        torch.testing.assert_close(embeds[c, rest][:nonpad], ref[:nonpad], atol=0, rtol=0)
        # EOT: SOT + M context + n name tokens + "." ; the pooled position is argmax of the ids
        eot = 1 + m_ctx + n + 1
        assert int(tokens[c].argmax()) == eot and int(tokens[c, eot]) == tok.eot_token_id


def test_class_specific_context(backbone: CLIPBackbone) -> None:
    torch.manual_seed(0)
    learner = PromptLearner(backbone, BASE, n_ctx=3, csc=True)
    assert learner.ctx.shape == (len(BASE), 3, backbone.text_width)
    embeds, _ = learner(backbone, BASE)
    for c in range(len(BASE)):
        assert torch.equal(embeds[c, 1:4], learner.ctx[c].detach())
    with pytest.raises(ConfigValueError, match="csc=true learned one context"):
        learner(backbone, NEW)
    with pytest.raises(ConfigValueError, match="ctx_init"):
        PromptLearner(backbone, BASE, ctx_init="a photo of a", csc=True)
    split = (TestSet("base"), TestSet("new", role="new", classnames=tuple(NEW)))
    with pytest.raises(ConfigValueError, match="method.csc=false for base-to-new"):
        CoOp("coop", backbone, info(test_sets=split), csc=True)


def test_custom_text_clip_is_refused_in_one_line(backbone: CLIPBackbone) -> None:
    other = CLIPBackbone("tiny_clip", tiny_clip.TINY_CLIP_ARCH)
    other.model = open_clip.model.CustomTextCLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    )
    with pytest.raises(NotImplementedError, match="supported: open_clip CLIP") as e:
        other.tokenize(["a star"])
    assert "\n" not in str(e.value)


# -- 3. only the context (and the meta-net) trains ----------------------------------------------
@pytest.mark.parametrize("kind", ["coop", "kgcoop", "cocoop"])
def test_only_prompt_parts_change_in_a_step(backbone: CLIPBackbone, kind: str) -> None:
    torch.manual_seed(0)
    if kind == "cocoop":
        m = CoCoOp(kind, backbone, info(), n_ctx=4, ctx_init=None, optimizer=sgd)
        trained = {"prompt_learner.ctx", *(f"meta_net.{k}" for k in m.meta_net.state_dict())}
    else:
        kg = 8.0 if kind == "kgcoop" else 0.0
        m = CoOp(kind, backbone, info(), n_ctx=4, kg_weight=kg, optimizer=sgd)
        trained = {"prompt_learner.ctx"}
    assert {n for n, p in m.named_parameters() if p.requires_grad} == trained
    before_clip = clip_state(backbone)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    batch = {"image": images(4), "label": torch.tensor([0, 1, 2, 3])}
    fit_batches(m, BatchData([batch]))
    after = clip_state(backbone)
    assert all(torch.equal(before_clip[k], after[k]) for k in before_clip)  # bit-identical CLIP
    for n, p in m.named_parameters():
        if n in trained:
            assert not torch.equal(before[n], p.detach()), n
    assert not backbone.training


# -- 4. CoCoOp --------------------------------------------------------------------------------
def test_cocoop_zero_meta_net_is_coop_and_per_image_prompts(backbone: CLIPBackbone) -> None:
    torch.manual_seed(0)
    coop = CoOp("coop", backbone, info(), n_ctx=4)
    co = CoCoOp("cocoop", backbone, info(), n_ctx=4, ctx_init=None, zero_init_last=True)
    with torch.no_grad():
        co.prompt_learner.ctx.copy_(coop.prompt_learner.ctx)
    x = images(5)
    feats = co.image_features(x)
    u = F.normalize(feats, dim=-1)
    assert co.meta_net(u).shape == (5, backbone.text_width)
    with torch.no_grad():
        torch.testing.assert_close(co.logits(x), coop.logits(x), atol=1e-5, rtol=0)
        # a trained meta-net: row i equals CoOp's logits with context V + π(u_i)
        torch.nn.init.normal_(co.meta_net.linear2.weight, std=0.5)
        got = co.class_logits(feats, BASE)
        for i in range(5):
            coop.prompt_learner.ctx.copy_(co.prompt_learner.ctx + co.meta_net(u[i : i + 1])[0])
            torch.testing.assert_close(
                got[i], coop.class_logits(feats[i : i + 1], BASE)[0], atol=1e-4, rtol=0
            )


def test_cocoop_encodes_all_prompts_of_a_batch_in_one_call(backbone: CLIPBackbone) -> None:
    torch.manual_seed(0)
    co = CoCoOp("cocoop", backbone, info(), eval_images_per_call=2)
    calls: list[int] = []
    hook = backbone.model.transformer.register_forward_hook(
        lambda mod, args, out: calls.append(out.shape[0])
    )
    try:
        feats = co.image_features(images(5))
        terms = co.loss_terms(feats, torch.tensor([0, 1, 2, 3, 0]))  # training: one call
        assert calls == [5 * len(BASE)]
        terms["train/loss"].backward()
        assert co.meta_net.linear1.weight.grad is not None
        calls.clear()
        with torch.no_grad():
            chunked = co.class_logits(feats, NEW)  # evaluation: chunks of 2 images
        assert calls == [2 * len(NEW), 2 * len(NEW), 1 * len(NEW)]
        co.eval_images_per_call = None
        with torch.enable_grad():
            whole = co.class_logits(feats, NEW).detach()
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    finally:
        hook.remove()


def test_cocoop_refuses_a_batch_that_cannot_fit(backbone: CLIPBackbone, monkeypatch) -> None:
    co = CoCoOp("cocoop", backbone, info(), optimizer=sgd)
    per_image = co.bytes_per_sequence() * cocoop_module.TRAIN_SAFETY * len(BASE)
    assert per_image > 0
    monkeypatch.setattr(cocoop_module, "available_memory", lambda device: int(3.5 * per_image))
    co.check_batch_fits(3)
    with pytest.raises(ConfigValueError, match=r"data\.batch_size=3\b") as e:
        co.check_batch_fits(32)
    assert "\n" not in str(e.value)
    # through the trainer: refused before the first step, the context untouched
    data = BatchData([{"image": images(4), "label": torch.tensor([0, 1, 2, 3])}])
    data.batch_size = 32
    ctx = co.prompt_learner.ctx.detach().clone()
    with pytest.raises(ConfigValueError, match=r"data\.batch_size=3\b"):
        fit_batches(co, data)
    assert torch.equal(co.prompt_learner.ctx.detach(), ctx)
    monkeypatch.setattr(cocoop_module, "available_memory", lambda device: 0)
    with pytest.raises(ConfigValueError, match="not even one image fits"):
        co.check_batch_fits(1)


# -- new classes, transfer -------------------------------------------------------------------
def test_new_classes_use_their_names_with_the_learned_context(backbone: CLIPBackbone) -> None:
    torch.manual_seed(0)
    split = (TestSet("base"), TestSet("new", role="new", classnames=tuple(NEW)))
    m = CoOp("coop", backbone, info(test_sets=split), n_ctx=4, class_token_position="middle")
    ref = CoOp("coop", backbone, info(NEW), n_ctx=4, class_token_position="middle")
    with torch.no_grad():
        m.prompt_learner.ctx.add_(0.3 * torch.randn_like(m.prompt_learner.ctx))  # "trained"
        ref.prompt_learner.ctx.copy_(m.prompt_learner.ctx)
        x = images(4)
        base_before = m.logits(x)
        new = m.new_class_logits(x, NEW)
        assert new.shape == (4, len(NEW))
        torch.testing.assert_close(new, ref.logits(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(m.logits(x), base_before, atol=0, rtol=0)
        assert m.text_cos(NEW) < 1.0


def _finished_run(method: CoOp, run_dir: Path) -> None:
    """Train one step and leave a finished run (checkpoint + record) in `run_dir`."""
    trainer = fit_batches(method, BatchData([{"image": images(4), "label": torch.arange(4)}]))
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "metrics.json").write_text(json.dumps({"model": "tiny_clip", "status": "finished"}))


def test_source_run_round_trip(backbone: CLIPBackbone, tmp_path: Path) -> None:
    torch.manual_seed(0)
    run_dir = tmp_path / "seed1"
    src = CoOp("coop", backbone, info(), n_ctx=4, optimizer=sgd)
    _finished_run(src, run_dir)
    sd = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert set(sd) == {"prompt_learner.ctx"}  # no CLIP weights, no class-name buffers
    source = {"run_dir": str(run_dir), "experiment": "coop_imagenet"}
    # cross-dataset: another data set's classes, the trained context
    other = CoOp("coop", backbone, info(NEW, name="other"), n_ctx=4, source=source)
    assert torch.equal(other.prompt_learner.ctx, src.prompt_learner.ctx)
    with torch.no_grad():
        x = images(3)
        torch.testing.assert_close(other.logits(x), src.new_class_logits(x, NEW), atol=0, rtol=0)
    with pytest.raises(SourceRunError, match="python train.py experiment=coop_imagenet seed=1"):
        CoOp(
            "coop",
            backbone,
            info(),
            n_ctx=4,
            source={**source, "run_dir": str(tmp_path / "x" / "seed1")},
        )
    with pytest.raises(SourceRunError, match="does not match"):
        CoOp("coop", backbone, info(), n_ctx=8, source=source)

    co_dir = tmp_path / "co" / "seed1"
    co = CoCoOp("cocoop", backbone, info(), optimizer=sgd)
    _finished_run(co, co_dir)
    loaded = CoCoOp("cocoop", backbone, info(NEW), source={"run_dir": str(co_dir)})
    for k, v in co.meta_net.state_dict().items():
        assert torch.equal(loaded.meta_net.state_dict()[k], v)


# -- 7. Dassl's schedule -----------------------------------------------------------------------
def _dassl_reference(base: float, epochs: int) -> list[float]:
    """Dassl's per-epoch rates: ConstantWarmupScheduler(1 epoch, 1e-5) over CosineAnnealingLR(E),
    WARMUP_RECOUNT (the cosine starts counting after the warm-up), stepped once per epoch."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    rates = [1e-5]
    for _ in range(1, epochs):
        rates.append(cosine.get_last_lr()[0])
        cosine.step()
    return rates


def test_dassl_cosine_per_epoch_rates() -> None:
    base, per_epoch, epochs = 2e-3, 3, 6
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = dassl_cosine(opt, total_steps=per_epoch * epochs, steps_per_epoch=per_epoch)
    rates = []
    for _ in range(per_epoch * epochs):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    by_epoch = [rates[e * per_epoch : (e + 1) * per_epoch] for e in range(epochs)]
    assert all(len(set(r)) == 1 for r in by_epoch)  # constant within an epoch
    got = [r[0] for r in by_epoch]
    assert got[0] == pytest.approx(1e-5) and got[1] == pytest.approx(2e-3)
    for e in range(1, epochs):
        assert got[e] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs)))
    assert got == pytest.approx(_dassl_reference(base, epochs), rel=1e-9)
    assert got[-1] > 0  # the recount leaves the last epoch above 0


def test_method_config_fills_the_schedule_per_epoch(backbone: CLIPBackbone) -> None:
    """configs/method/coop.yaml through the runner's `configure_optimizers`: per-epoch rates."""
    from hydra.utils import instantiate

    from reprolab.utils.config import compose_train

    cfg = compose_train(["method=coop", "method.n_ctx=2"])
    m = instantiate(cfg.method, _convert_="all")(model=backbone, info=info())
    rates: list[float] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    batch = {"image": images(2), "label": torch.tensor([0, 1])}
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader([batch, batch], batch_size=None))
    expected = [1e-5, 2e-3, 2e-3 * 0.5 * (1 + math.cos(math.pi / 3))]
    assert rates == pytest.approx([r for r in expected for _ in range(2)])
