"""Tiny causal LM: the task contract on a token family (data -> TokenInfo -> network -> ppl)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reprolab.data.info import Column, TabularInfo, TaskInfoError, TokenInfo
from reprolab.data.text import (
    SPECIALS,
    TokenDataModule,
    build_vocabulary,
    pydoc_topics,
    split_documents,
    token_stream,
)
from reprolab.methods.language.lm import CausalLM, UnigramLM, warmup_cosine
from reprolab.metrics.likelihood import perplexity
from reprolab.models.lm import TinyCausalLM
from reprolab.utils.config import (
    CONFIG_DIR,
    method_primary_metric,
    metric_is_logged,
)

TEST_STEPS = 150  # of the experiment's 400: the margin holds (see the claim test)


@pytest.fixture(scope="module")
def dm() -> TokenDataModule:
    return TokenDataModule("pydoc_text", "pydoc_topics", seq_len=64, min_count=2, split_seed=0)


def test_trained_lm_beats_the_unigram_model_on_held_out_topics(
    run_experiment, dm, tmp_path: Path
) -> None:
    """Test-split perplexity of the LM (pre-LN, TEST_STEPS steps) vs the add-one unigram model.

    Measured (CPU, seeds 1 / 2 / 3, 150 steps): 198.6 / 196.7 / 199.9 against the unigram's 461.0
    (no seed dependence), a ratio of 0.43; the 400-step table cells reach 100.0-102.3 (0.22).
    The test asks for a ratio below 0.6. The unigram row is also recomputed here from the raw
    streams (numpy counts), which checks that the evaluation windows score every test target
    exactly once and padding never.
    """
    unigram = run_experiment("unigram_pydoc")
    lm = run_experiment("lm_layernorm_pydoc", f"trainer.max_steps={TEST_STEPS}")
    for m in (unigram, lm):
        assert m["test/perplexity"] == pytest.approx(math.exp(m["test/loss"]), rel=1e-5)
        assert m["test/bits_per_token"] == pytest.approx(m["test/loss"] / math.log(2), rel=1e-5)
        assert m["test/perplexity"] == m["test/test/perplexity"]
        assert m["throughput/test_tokens_per_s"] > 0
    assert lm["throughput/train_tokens_per_s"] > 0
    (log,) = tmp_path.glob("*.layernorm.pydoc/seed1/csv/metrics.csv")
    assert {"train/loss", "val/loss", "val/perplexity"} <= set(
        log.read_text().splitlines()[0].split(",")
    )
    assert lm["test/perplexity"] < 0.6 * unigram["test/perplexity"], (lm, unigram)

    v = len(dm.vocab)
    train, test = dm.streams["train"][1:].numpy(), dm.streams["test"][1:].numpy()
    counts = np.bincount(train, minlength=v).astype(np.float64) + 1.0
    counts[dm.vocab.pad_id] = 0.0  # padding is never a target
    want = perplexity(float(-np.log((counts / counts.sum())[test]).sum()), len(test))
    assert unigram["test/perplexity"] == pytest.approx(want, rel=1e-4)
    assert unigram["model/train_tokens"] == len(train)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_the_model_is_causal(norm: str) -> None:
    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=50, seq_len=16, d_model=32, n_layers=2, n_heads=4, norm=norm)
    model.eval()
    x = torch.randint(0, 50, (3, 16))
    t = 9
    y = x.clone()
    y[:, t + 1 :] = (y[:, t + 1 :] + 1 + torch.randint(0, 48, (3, 6))) % 50  # every later token
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (3, 16, 50)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])  # the past does not see the future
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax() > 1e-3  # ... and the future sees itself


def test_both_norms_build_and_rmsnorm_neither_centres_nor_shifts() -> None:
    ln = TinyCausalLM(vocab_size=50, seq_len=8, d_model=32, n_layers=3, norm="layernorm")
    rms = TinyCausalLM(vocab_size=50, seq_len=8, d_model=32, n_layers=3, norm="rmsnorm")
    kinds = lambda m, k: [x for x in m.modules() if isinstance(x, k)]  # noqa: E731
    assert len(kinds(ln, nn.LayerNorm)) == 2 * 3 + 1 and not kinds(ln, nn.RMSNorm)
    assert len(kinds(rms, nn.RMSNorm)) == 2 * 3 + 1 and not kinds(rms, nn.LayerNorm)
    assert all(n.bias is not None for n in kinds(ln, nn.LayerNorm))
    assert all([k for k, _ in n.named_parameters()] == ["weight"] for n in kinds(rms, nn.RMSNorm))
    # Same parameters but for the norm biases: the rows of the table differ only in the norm.
    n_ln_bias = sum(n.bias.numel() for n in kinds(ln, nn.LayerNorm))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ln) - count(rms) == n_ln_bias
    # LayerNorm removes the mean (a constant shift of the input does nothing); RMSNorm does not.
    x = torch.randn(4, 32)
    for norm, centred in ((kinds(ln, nn.LayerNorm)[0], True), (kinds(rms, nn.RMSNorm)[0], False)):
        same = torch.allclose(norm(x), norm(x + 3.0), atol=1e-5)
        assert same is centred
    rms_out = kinds(rms, nn.RMSNorm)[0](x)
    torch.testing.assert_close(rms_out, x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())
    assert ln.head.weight is ln.tok_emb.weight  # tied
    with pytest.raises(ValueError, match="Unknown norm 'rms'.*did you mean 'rmsnorm'"):
        TinyCausalLM(vocab_size=50, seq_len=8, norm="rms")


def test_split_is_by_document_disjoint_and_deterministic(dm) -> None:
    topics = set(pydoc_topics())
    parts = {s: set(v) for s, v in dm.documents.items()}
    assert parts["train"] | parts["val"] | parts["test"] == topics
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"])
    assert not parts["val"] & parts["test"]
    n = len(topics)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [
        int(0.8 * n),
        int(0.1 * n),
        n - int(0.8 * n) - int(0.1 * n),
    ]
    names = list(topics)
    assert split_documents(names[::-1], 0) == split_documents(names, 0) == dm.documents
    assert split_documents(names, 1)["test"] != dm.documents["test"]
    # One <eos> before the first document and after each: every document delimited.
    for split, docs in dm.documents.items():
        stream = dm.streams[split]
        assert int((stream == dm.vocab.eos_id).sum()) == len(docs) + 1
        assert len(stream) == 1 + sum(len(pydoc_topics()[k]) + 1 for k in docs)


def test_vocabulary_comes_from_train_and_maps_the_rest_to_unk(dm) -> None:
    vocab = build_vocabulary([[5, 5, 7], [9, 5]], min_count=2, source_size=20)
    assert len(vocab) == len(SPECIALS) + 1 and (vocab.pad_id, vocab.unk_id, vocab.eos_id) == (
        0,
        1,
        2,
    )
    assert vocab.encode([5, 7, 9, 11]).tolist() == [3, 1, 1, 1]
    assert build_vocabulary([[5, 5, 7], [9]], 1, 20).encode([9, 7, 5, 4]).tolist() == [5, 4, 3, 1]
    assert token_stream([[5, 7], [5]], vocab).tolist() == [2, 3, 1, 2, 3, 2]
    assert vocab.to_source([0, 1, 2, 3]) == ["<pad>", "<unk>", "<eos>", 5]
    with pytest.raises(ValueError, match="min_count"):
        build_vocabulary([[1]], 0, 20)

    # On the corpus: the vocabulary is exactly the BPE tokens seen twice in train.
    docs = pydoc_topics()
    train_ids = [i for k in dm.documents["train"] for i in docs[k]]
    counts = np.bincount(train_ids)
    assert set(dm.vocab.source_ids.tolist()) == set(np.flatnonzero(counts >= 2).tolist())
    kept = set(dm.vocab.source_ids.tolist())
    unseen = sum(i not in kept for k in dm.documents["test"] for i in docs[k])
    assert dm.unk_rate["test"] == pytest.approx(unseen / (len(dm.streams["test"]) - 1))
    assert 0.01 < dm.unk_rate["test"] < 0.2 and dm.unk_rate["train"] < dm.unk_rate["test"]
    assert dm.info.vocab_size == len(dm.vocab) and dm.info.pad_id == 0
    text = dm.decode(dm.streams["test"][:40])
    assert text.startswith("<eos> ") and text == text.lower()


def test_training_windows_are_full_seeded_and_evaluation_covers_every_target(dm) -> None:
    dm.setup()
    loader = dm.train_dataloader()
    first = next(iter(loader))["tokens"]
    assert first.shape == (dm.batch_size, 65) and not (first == dm.vocab.pad_id).any()
    again = next(iter(dm.train_dataloader()))["tokens"]
    torch.testing.assert_close(first, again)  # a function of (shuffle_seed, epoch)
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))["tokens"], first)
    # Every window is a contiguous piece of the train stream.
    stream = dm.streams["train"].tolist()
    row = first[0].tolist()
    starts = [i for i in range(len(stream) - 64) if stream[i : i + 65] == row]
    assert starts

    windows = torch.cat([b["tokens"] for b in dm.test_dataloader()[0]])
    scored = windows[:, 1:][windows[:, 1:] != dm.vocab.pad_id]
    torch.testing.assert_close(scored, dm.streams["test"][1:])  # each target once, in order


def test_unigram_perplexity_equals_a_hand_computation() -> None:
    info = TokenInfo(name="toy", vocab_size=5, seq_len=4, pad_id=0)
    uni = UnigramLM(name="unigram", info=info, smoothing=1.0)
    uni.fit([{"tokens": torch.tensor([[2, 3, 3, 4, 0]])}])  # targets 3, 3, 4; the pad is not one
    assert uni.counts.tolist() == [0, 0, 0, 2, 1]
    # add-one over the 4 non-pad entries: p = (1, 1, 3, 2) / 7 for ids 1..4
    torch.testing.assert_close(
        uni.log_probs()[1:].exp(), torch.tensor([1, 1, 3, 2], dtype=torch.float64) / 7
    )
    nll, n = uni.nll_sum(torch.tensor([[2, 4, 1, 0, 0]]))  # scores 4 and 1 only
    assert int(n) == 2
    assert perplexity(float(nll), int(n)) == pytest.approx(7 / math.sqrt(2), rel=1e-6)


def test_causal_lm_loss_is_the_mean_nll_of_unpadded_targets() -> None:
    torch.manual_seed(0)
    info = TokenInfo(name="toy", vocab_size=11, seq_len=6, pad_id=0)
    lm = CausalLM(name="lm", model=TinyCausalLM(11, 6, d_model=16, n_heads=2), info=info).eval()
    tokens = torch.tensor([[2, 5, 6, 7, 8, 9, 3], [2, 4, 4, 10, 0, 0, 0]])
    with torch.no_grad():
        nll, n = lm.nll_sum(tokens)
        logp = lm(tokens[:, :-1]).log_softmax(-1)
    want = -sum(float(logp[b, t, tokens[b, t + 1]]) for b, t in [(0, i) for i in range(6)])
    want -= sum(float(logp[1, t, tokens[1, t + 1]]) for t in range(3))
    assert int(n) == 9 and float(nll) == pytest.approx(want, rel=1e-5)


def test_token_methods_fail_in_one_line_on_other_tasks() -> None:
    tab = TabularInfo(name="diabetes", columns=(Column("age"),))
    for cls in (CausalLM, UnigramLM):
        with pytest.raises(TaskInfoError) as e:
            cls(name="lm", model=None, info=tab)
        msg = str(e.value)
        assert "\n" not in msg and "needs a token sequence task" in msg and "data=diabetes" in msg
    with pytest.raises(TaskInfoError, match="method=lm needs 'vocab_size'.*data=empty"):
        CausalLM(name="lm", model=None, info=TokenInfo(name="empty"))
    with pytest.raises(TaskInfoError, match="needs 'seq_len'"):
        CausalLM(name="lm", model=None, info=TokenInfo(name="t", vocab_size=9))
    with pytest.raises(ValueError, match="needs a network from cfg.model"):
        CausalLM(name="lm", model=None, info=TokenInfo(name="t", vocab_size=9, seq_len=4))


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # linear warmup
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)  # cosine to 0.1
    with pytest.raises(ValueError, match="trainer.max_steps"):
        warmup_cosine(opt, warmup_steps=10, total_steps=-1)


def test_the_table_and_its_metric_are_declared() -> None:
    from reprolab.tables.schema import table_errors

    assert table_errors("lm_tiny", CONFIG_DIR) == []
    for cls in ("CausalLM", "UnigramLM"):
        target = f"reprolab.methods.language.lm.{cls}"
        assert metric_is_logged(target, "test/perplexity")
        assert metric_is_logged(target, "test/test/bits_per_token")
        assert not metric_is_logged(target, "test/acc")
        assert method_primary_metric(target) == "test/perplexity"  # paper.metric: null


def test_plain_command_runs_with_the_schedule_sized_to_the_run(tmp_path: Path) -> None:
    """`python train.py model=tiny_lm data=pydoc_text method=lm` needs no experiment file: the
    cosine's `total_steps: null` becomes the run's length (here 1 epoch of 89 steps; the warmup
    shortened to fit in it)."""
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            "model=tiny_lm",
            "data=pydoc_text",
            "method=lm",
            "trainer.max_epochs=1",
            "method.scheduler.warmup_steps=10",
            "threads=1",
            "logger=csv",
            "progress_bar=false",
            f"paths.log_dir={tmp_path}",
        ]
    )
    assert cfg.method.scheduler.total_steps is None
    record = run(cfg)
    assert record["paper"]["metric"] == "test/perplexity" and record["global_step"] == 89
    (log,) = tmp_path.glob("*/seed1/csv/metrics.csv")
    header = log.read_text().splitlines()[0].split(",")
    assert "train/loss" in header
