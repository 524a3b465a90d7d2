"""BERT featurizer (`reprolab.models.bert`) and SubpopBench's text optimisation (AdamW with
decay groups, linear decay to 0, gradient clipping at 1.0: `configs/method/optim/bert_adamw.yaml`,
`reprolab.optim.param_groups`), checked on the random-init `tiny_bert` and on token batches through
the group methods (spec robustness_ood_prompting.md §1.3-§1.4)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from _group_helpers import BatchData, fit_batches
from torch import nn
from torch.utils.data import DataLoader

from reprolab.data.info import ImageClassificationInfo
from reprolab.data.tokens import TokenInput, load_tokenizer
from reprolab.errors import ConfigValueError, find_user_error
from reprolab.models.bert import BertFeaturizer
from reprolab.optim.param_groups import adamw, decay_groups, linear_lr
from reprolab.utils.config import CONFIG_DIR, PROJECT_ROOT, compose_train

VOCAB = 387  # the embedded `tiny` vocabulary
TINY_SIZES = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
)


def _compose(*overrides: str, config_dir: Path = CONFIG_DIR):
    return compose_train(["data=group_synth", "paths.log_dir=/logs", *overrides], config_dir)


def _tiny(**kw) -> BertFeaturizer:
    """`configs/model/tiny_bert.yaml` as composed, with `kw` on top."""
    cfg = _compose("model=tiny_bert").model
    for k, v in kw.items():
        cfg[k] = v
    return hydra.utils.instantiate(cfg)


def _tokens(b: int = 4, length: int = 16, seed: int = 0, pad_from: int = 10) -> torch.Tensor:
    """Random token inputs (B, L, 3): [CLS] ids [SEP], padding (id 0, mask 0) from `pad_from`, the
    second half of the real tokens in segment 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    ids[:, 0], ids[:, pad_from - 1], ids[:, pad_from:] = 2, 3, 0
    mask = torch.zeros(b, length, dtype=torch.long)
    mask[:, :pad_from] = 1
    types = torch.zeros(b, length, dtype=torch.long)
    types[:, pad_from // 2 : pad_from] = 1
    return torch.stack([ids, mask, types], dim=-1)


# ------------------------------------------------------------------------------------------------
# The featurizer


def test_tiny_bert_config_builds_the_embedded_model() -> None:
    m = _tiny()
    assert m.preprocess == TokenInput("tiny", 64, None)
    assert m.feature_dim == 32 and m.trainable is True
    assert m.model.config.vocab_size == len(load_tokenizer("tiny")) == VOCAB
    assert m.dropout.p == pytest.approx(0.1)  # null: hidden_dropout_prob
    assert m.model.pooler is not None
    placeholder = m.zeroshot_weights(["a", "b", "c"], ["{}"])
    assert placeholder.shape == (3, 32) and placeholder.isnan().all()
    with pytest.raises(ConfigValueError, match="head_init=random") as e:
        _ = m.logit_scale
    assert "\n" not in str(e.value)


def test_output_is_the_pooled_cls_state_after_dropout() -> None:
    m = _tiny().eval()
    x = _tokens()
    out = m.encode_image(x)
    assert out.shape == (4, 32) and out.dtype == torch.float32
    ref = m.model(input_ids=x[..., 0], attention_mask=x[..., 1], token_type_ids=x[..., 2])
    torch.testing.assert_close(out, ref.pooler_output)
    torch.testing.assert_close(m(x), out)


def test_reads_ids_mask_and_token_types() -> None:
    m = _tiny().eval()
    x = _tokens()
    with torch.no_grad():
        base = m.encode_image(x)
        padded = x.clone()
        padded[:, 12, 0] = 77  # a padded position (mask 0): attended by nobody
        torch.testing.assert_close(m.encode_image(padded), base)
        real = x.clone()
        real[:, 4, 0] = 77  # a real token
        assert not torch.allclose(m.encode_image(real), base)
        types = x.clone()
        types[..., 2] = 0  # one segment instead of two
        assert not torch.allclose(m.encode_image(types), base)
        unmasked = x.clone()
        unmasked[:, 10:, 1] = 1  # the padding becomes visible
        assert not torch.allclose(m.encode_image(unmasked), base)
        # SubpopBench also feeds (B, L, 2): no token types = all segment 0
        torch.testing.assert_close(m.encode_image(types[..., :2]), m.encode_image(types))


def test_rejects_images_and_float_inputs_in_one_line() -> None:
    m = _tiny()
    with pytest.raises(ValueError, match="token inputs") as e:
        m.encode_image(torch.zeros(2, 3, 8, 8))
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="integer token ids"):
        m.encode_image(_tokens().float())


def test_dropout_is_active_only_in_train_mode() -> None:
    m = _tiny(dropout=0.5)
    x = _tokens()
    m.train()
    assert m.training and m.dropout.training
    a, b = m.encode_image(x), m.encode_image(x)
    assert not torch.allclose(a, b)
    assert (a == 0).float().mean() > 0.2  # about half the features dropped (scaled by 2 otherwise)
    m.eval()
    torch.testing.assert_close(m.encode_image(x), m.encode_image(x))


def test_seeded_random_init_is_deterministic() -> None:
    L.seed_everything(3, verbose=False)
    a = _tiny().state_dict()
    L.seed_everything(3, verbose=False)
    b = _tiny().state_dict()
    L.seed_everything(4, verbose=False)
    c = _tiny().state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["model.embeddings.word_embeddings.weight"], c["model.embeddings.word_embeddings.weight"]
    )


def test_frozen_featurizer_has_no_gradients_stays_in_eval_and_leaves_checkpoints() -> None:
    from reprolab.methods.group.erm import ERM

    m = _tiny(trainable=False)
    assert not any(p.requires_grad for p in m.parameters())
    m.train()
    assert not m.training and not m.dropout.training
    assert m.frozen_state_prefixes() == [""]
    method = ERM(name="erm", model=m, info=_info(), optimizer=torch.optim.SGD)
    method.setup("fit")
    method.train()
    assert not method.backbone.training
    assert method.frozen_state_prefixes() == ["backbone."]
    ckpt = {"state_dict": method.state_dict()}
    method.on_save_checkpoint(ckpt)
    assert sorted(ckpt["state_dict"]) == ["head.bias", "head.weight"]
    assert method.param_counts()["params/trainable"] == 32 * 2 + 2
    assert _tiny().frozen_state_prefixes() == []


@pytest.mark.parametrize("value", ["image", "none", 1])
def test_trainable_takes_booleans_only(value) -> None:
    with pytest.raises(ConfigValueError, match="trainable must be true or false") as e:
        BertFeaturizer("x", pretrained=None, tokenizer="tiny", config=TINY_SIZES, trainable=value)
    assert "\n" not in str(e.value)


def test_bad_sizes_and_lengths_fail_in_one_line() -> None:
    with pytest.raises(ConfigValueError, match="max_length") as e:
        BertFeaturizer("x", pretrained=None, tokenizer="tiny", config=TINY_SIZES, max_length=300)
    assert "\n" not in str(e.value)
    bad = {**TINY_SIZES, "num_attention_heads": 3}  # 32 is not a multiple of 3
    with pytest.raises(ConfigValueError, match="invalid BERT sizes") as e:
        BertFeaturizer("x", pretrained=None, tokenizer="tiny", config=bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigValueError, match="did you mean 'num_hidden_layers'") as e:
        BertFeaturizer("x", pretrained=None, tokenizer="tiny", config={"num_hidden_layer": 1})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigValueError, match="model.tokenizer"):
        BertFeaturizer("x", pretrained=None, config=TINY_SIZES)


def test_offline_uncached_bert_base_names_the_download_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _compose("model=bert_base", f"paths.weights_dir={tmp_path}").model
    assert cfg.pretrained == "bert-base-uncased" and cfg.cache_dir == str(tmp_path)
    with pytest.raises(Exception) as e:  # Hydra wraps it; the runner prints the user error
        hydra.utils.instantiate(cfg)
    err = find_user_error(e.value)
    assert isinstance(err, ConfigValueError)
    msg = str(err)
    assert "\n" not in msg
    assert "python scripts/download_weights.py --hf bert-base-uncased" in msg
    assert str(tmp_path) in msg


def _save_tiny_pretrained(folder: Path, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=VOCAB, **TINY_SIZES))
    model.save_pretrained(folder)
    load_tokenizer("tiny").save_pretrained(folder)
    return model


def test_loads_a_local_save_pretrained_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-bert"
    saved = _save_tiny_pretrained(folder)
    m = BertFeaturizer(
        "local", pretrained=str(folder), max_length=32, config={"hidden_dropout_prob": 0.2}
    )
    assert m.weights == str(folder) and m.feature_dim == 32
    assert m.preprocess == TokenInput(str(folder), 32, None)  # its own tokenizer
    assert m.model.config.hidden_dropout_prob == pytest.approx(0.2)  # a config override
    assert m.dropout.p == pytest.approx(0.2)
    ref = saved.state_dict()
    got = m.model.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # the saved weights, pooler included
    saved.eval()
    m.eval()
    x = _tokens(length=32)
    out = saved(input_ids=x[..., 0], attention_mask=x[..., 1], token_type_ids=x[..., 2])
    torch.testing.assert_close(m.encode_image(x), out.pooler_output)


def test_missing_local_folder_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigValueError, match="save_pretrained") as e:
        BertFeaturizer("local", pretrained=str(tmp_path / "nothing"))
    assert "\n" not in str(e.value)


def test_a_tokenizer_larger_than_the_embedding_fails() -> None:
    with pytest.raises(ConfigValueError, match="embeds only") as e:
        BertFeaturizer("x", pretrained=None, tokenizer="tiny", config=TINY_SIZES, vocab_size=100)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# SubpopBench's text optimisation


def test_the_fragment_replaces_the_method_optimizer() -> None:
    for method in ("erm", "groupdro", "scer"):
        cfg = _compose("model=tiny_bert", f"method={method}", "+method/optim=bert_adamw").method
        opt, sched = cfg.optimizer, cfg.scheduler
        assert opt._target_ == "reprolab.optim.param_groups.adamw"
        assert "momentum" not in opt  # replaced, not merged over SGD
        assert (opt.lr, opt.weight_decay, opt.eps, opt.decay) == (1e-5, 1e-4, 1e-8, "vectors")
        assert sched._target_ == "reprolab.optim.param_groups.linear_lr"
        assert (sched.warmup_steps, sched.total_steps) == (0, None)
        assert cfg.grad_clip == 1.0
    plain = _compose("method=erm").method  # unchanged without the fragment
    assert plain.optimizer._target_ == "torch.optim.SGD" and plain.scheduler is None


def test_the_fragment_composes_from_an_experiment_defaults_list(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    (configs / "experiment" / "text_probe.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n"
        "  - /method/optim: bert_adamw\n"  # before the overrides (Hydra's rule); merged after
        "  - override /model: tiny_bert\n"  # the method config all the same
        "  - override /method: groupdro\n"
        "method:\n"
        "  optimizer: {lr: 2.0e-5}\n"  # a cell's own value still lands on top
    )
    cfg = _compose("experiment=text_probe", config_dir=configs)
    assert cfg.method.name == "groupdro" and cfg.model.name == "tiny_bert"
    assert cfg.method.optimizer._target_.endswith("param_groups.adamw")
    assert "momentum" not in cfg.method.optimizer
    assert cfg.method.optimizer.lr == 2e-5 and cfg.method.grad_clip == 1.0


def _subpopbench_decayed_names(named: list[tuple[str, nn.Parameter]]) -> set[str]:
    """`get_bert_optim` as released: names with `bias` / `LayerNorm.weight` get the decay."""
    return {n for n, _ in named if any(nd in n for nd in ("bias", "LayerNorm.weight"))}


def test_decay_groups_match_subpopbench_name_filter_on_bert_and_head() -> None:
    from reprolab.methods.group.erm import ERM

    method = ERM(name="erm", model=_tiny(), info=_info(), optimizer=torch.optim.SGD)
    method.setup("fit")
    named = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    names = {id(p): n for n, p in named}
    expected = _subpopbench_decayed_names(named)
    assert "head.bias" in expected and "backbone.model.pooler.dense.weight" not in expected
    for rule, decayed in (
        ("vectors", expected),
        ("matrices", {n for n, _ in named} - expected),
        ("all", {n for n, _ in named}),
    ):
        groups = decay_groups(params, 0.1, rule)
        got = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
        assert got == decayed, rule
        assert sum(len(g["params"]) for g in groups) == len(params)
    with pytest.raises(ConfigValueError, match="decay must be one of"):
        decay_groups(params, 0.1, "bias")


def test_adamw_linear_decay_matches_the_hand_formula() -> None:
    cfg = _compose("model=tiny_bert", "method=erm", "+method/optim=bert_adamw").method
    w = nn.Parameter(torch.ones(3, 2))
    b = nn.Parameter(torch.ones(2))
    opt = hydra.utils.instantiate(cfg.optimizer)([w, b])
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]  # b decays, w does not
    assert all(g["eps"] == 1e-8 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    total, lr = 10, 1e-5
    sched = hydra.utils.instantiate(cfg.scheduler)(opt, total_steps=total)
    seen = []
    for _ in range(total + 1):
        seen.append(opt.param_groups[0]["lr"])
        (w.sum() + b.sum()).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    expected = [lr * (total - s) / total for s in range(total + 1)]  # no warmup, 0 at T
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert (seen[0], seen[total // 2], seen[total]) == pytest.approx((lr, lr / 2, 0.0))
    warm = linear_lr(adamw([nn.Parameter(torch.ones(1))], lr=1.0), warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(7):
        lrs.append(warm.get_last_lr()[0])
        warm.optimizer.step()
        warm.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_linear_lr_needs_a_length() -> None:
    opt = adamw([nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(ConfigValueError, match="total_steps"):
        linear_lr(opt)
    with pytest.raises(ConfigValueError, match="warmup_steps < total_steps") as e:
        linear_lr(opt, warmup_steps=5, total_steps=5)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# End to end: group methods on token batches


def _info(num_groups: int = 4) -> ImageClassificationInfo:
    return ImageClassificationInfo(
        name="tokens", classnames=("no", "yes"), templates=("{}",), num_groups=num_groups
    )


def _batch(seed: int, b: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    labels = torch.randint(0, 2, (b,), generator=g)
    attrs = torch.randint(0, 2, (b,), generator=g)
    return {"image": _tokens(b, 16, seed), "label": labels, "group": labels * 2 + attrs}


class TokenBatchData(BatchData):
    """Token batches {image: (B, L, 3) long, label, group}, served as they are; a test split too."""

    def __init__(self, n_train: int = 4, n_test: int = 3) -> None:
        super().__init__([_batch(i) for i in range(n_train)])
        self.test = [_batch(1000 + i) for i in range(n_test)]

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=None)


def _text_method(name: str, *extra: str, model: nn.Module | None = None):
    cfg = _compose("model=tiny_bert", f"method={name}", "+method/optim=bert_adamw", *extra)
    model = model if model is not None else hydra.utils.instantiate(cfg.model)
    return hydra.utils.instantiate(cfg.method, _convert_="all")(model=model, info=_info())


@pytest.mark.parametrize("name", ["erm", "groupdro"])
def test_group_methods_fit_and_evaluate_on_tokens(name: str) -> None:
    L.seed_everything(0, verbose=False)
    method = _text_method(name, "method.sigma_min=true")
    assert method.data_requirements() == {"preprocess": TokenInput("tiny", 64, None)}
    dm = TokenBatchData()
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    trainer = fit_batches(method, dm)
    assert trainer.global_step == 4
    conf = trainer.lr_scheduler_configs[0]
    assert conf.interval == "step" and conf.scheduler.last_epoch == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # decayed to 0 over the 4 steps
    after = method.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # BERT itself trained
    (metrics,) = trainer.test(method, datamodule=dm, verbose=False)
    assert 0.0 <= metrics["test/worst_group_acc"] <= metrics["test/avg_group_acc"] <= 100.0
    assert 0.0 <= metrics["test/acc"] <= 100.0
    assert metrics["test/sigma_min"] >= 0.0
    if name == "groupdro":
        assert torch.isclose(method.dro.q.sum(), torch.tensor(1.0))


def test_frozen_bert_trains_the_head_only_on_tokens() -> None:
    L.seed_everything(0, verbose=False)
    cfg = _compose("model=tiny_bert", "model.trainable=false").model
    method = _text_method("groupdro", model=hydra.utils.instantiate(cfg))
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    trainer = fit_batches(method, TokenBatchData())
    after = method.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.global_step == 4
    assert method.param_counts()["params/trainable"] == 32 * 2 + 2


class _GradNorms(L.Callback):
    """Global gradient norm before clipping (`on_before_optimizer_step`, which Lightning calls just
    before it clips) and after it (read at the next step's zero_grad: the step leaves grads as is)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.after: list[float] = []

    @staticmethod
    def _norm(module: nn.Module) -> float | None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return (
            float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            if grads
            else None
        )

    def on_train_start(self, trainer, pl_module) -> None:
        with torch.no_grad():
            pl_module.head.weight.mul_(1e3)  # large logits: gradient norms well above 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(self._norm(pl_module))

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        norm = self._norm(pl_module)
        if norm is not None:
            self.after.append(norm)


@pytest.mark.parametrize("clip", [1.0, None])
def test_gradient_norm_is_clipped_at_one(clip: float | None) -> None:
    L.seed_everything(0, verbose=False)
    method = _text_method("erm", f"method.grad_clip={'null' if clip is None else clip}")
    norms = _GradNorms()
    dm = TokenBatchData(n_train=3)
    fit_batches(method, dm, callbacks=[norms])
    assert len(norms.after) == 2 and all(n > 5.0 for n in norms.before)
    if clip is None:
        assert norms.after == pytest.approx(norms.before[:2])
    else:
        assert norms.after == pytest.approx([1.0, 1.0], rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Weights download


def _download_script():
    spec = importlib.util.spec_from_file_location(
        "download_weights", PROJECT_ROOT / "scripts" / "download_weights.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv",
    [["--model", "bert_base"], ["--hf", "bert-base-uncased"], ["bert-base-uncased"]],
)
def test_download_weights_fetches_bert_through_hugging_face(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = _download_script()
    assert script.model_configs()["bert_base"] == ("hf", "bert-base-uncased", "bert-base-uncased")
    assert "tiny_bert" not in script.model_configs()  # random init: nothing to fetch
    calls = []
    monkeypatch.setattr(script, "fetch_hf", lambda name, cache: calls.append((name, cache)))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    script.main([*argv, "--cache-dir", str(tmp_path)])
    assert calls == [("bert-base-uncased", str(tmp_path))]
