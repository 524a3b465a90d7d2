"""MixDiff: perturb-and-compare OOD detection through a query-only model.

Yang et al., "Perturb-and-Compare Approach for Detecting Out-of-Distribution Samples in Constrained
Access Environments", ECAI 2024, arXiv 2408.10107 (robustness_ood_prompting.md §3; official code
`hy18284/mixdiff` @ f64f2d0: `mixup/mixup_eval_text.py`, `mixup/ood_score_calculators/mixdiff_*.py`,
`mixup/mixup_operators/interpolation_mixup.py`). Reproduced: the score of §3.2 in every access
setting of §3.3 (logits, probabilities, label-only one-hot, last-layer embeddings), the three
auxiliary modes, and its query cost.

For a target x_t with oracle answer o_t = f(x_t) and predicted class k = argmax o_t:
- oracles O_k: M ID train images of class k, sampled once per class with the seed;
- auxiliary samples x_i, i = 1..P: `in_batch` the other targets of its test batch of N (P = N - 1),
  `rand_id` P random ID train images (not oracles), `oracle` the M oracles of class k (P = M);
- rates λ_r = r / (R + 1), r = 1..R; mixes in pixel space (after the normaliser: the same, it is
  affine) or, with `output: embedding`, of the L2-normalised embeddings (not renormalised);
- Ō_{i,r} = mean over the oracles m of f(λ_r x*_m + (1 - λ_r) x_i) (raw outputs: logits, probs or
  one-hot; `oracle` aux averages over the M - 1 oracles m != i);
- MixDiff_t = mean_i mean_r [h(f(λ_r x_t + (1 - λ_r) x_i)) - h(Ō_{i,r})] (label-only: the one-hot
  form -<onehot_t, Ō> / C, with a base score of 0);
- score_t = h(o_t) + γ MixDiff_t, larger = more OOD (`add_base_score=false`: the MixDiff term
  alone). The method returns its negation: STYLE's higher = more in-distribution.

Query cost per test batch of n targets (each image forward is one query of the spec; §3.1, §3.5;
`expected_cost` computes it, the tests check the oracle's counters against it):

| aux | per batch | once per test pass (oracle side, precomputed per class) |
|---|---|---|
| `in_batch` | n (1 + (n-1) R) + n M (n-1) R | 0 |
| `rand_id` | n (1 + P R) | K M P R |
| `oracle` | n (1 + M R) | K M (M-1) R |

so per sample 1 + P R + M P R (`in_batch`, P = N - 1), 1 + P R + K M P R / n_total (`rand_id`),
1 + M R + K M (M-1) R / n_total (`oracle`), with K the number of ID classes. In the embedding
setting the mixes and the base logits are head evaluations (`BlackBox.head`, cheap) and the image
forwards are n per batch plus K M oracle (+ P auxiliary) embeddings once.

DEVIATION (cost only, scores identical): upstream also queries the diagonal mixes it then masks
(a target with itself in `in_batch`, N (1 + N R) + N M N R per batch; an oracle with itself in
`oracle`, K M M R); they are skipped here (`score_batch`, `set_references`).

The `in_batch` mode needs test batches that mix ID and OOD targets as upstream's shuffled open-set
test loader does (ID and OOD test sets are separate loaders here, and a batch of one kind only
would tell its targets' kind through their auxiliaries). So in that mode the method only queries
each target in its test step, and at the end of the test pass scores one stream of all scored
targets (the first `id` test set and every `ood` set), shuffled with the seed and cut into batches
of N, re-reading the images from the test loaders by position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import SequentialSampler

from reprolab.data.info import ImageClassificationInfo
from reprolab.data.transforms import build_transforms
from reprolab.errors import ConfigValueError
from reprolab.methods.ood.scores import (
    POST_HOC_SCORES,
    PostHocOOD,
    oodness,
    output_kind,
)
from reprolab.metrics.ood import ScoreCollector, ood_metrics
from reprolab.models.blackbox import BlackBox, Phase

log = logging.getLogger(__name__)

AUX_MODES: tuple[str, ...] = ("in_batch", "rand_id", "oracle")


def mixing_rates(r: int) -> Tensor:
    """λ_r = r / (R + 1), r = 1..R: R evenly spaced rates strictly inside (0, 1). (R,)"""
    return torch.arange(1, r + 1, dtype=torch.float32) / (r + 1)


def stream_batches(total: int, n: int) -> list[int]:
    """Sizes of the `in_batch` stream's batches: chunks of n, a last chunk of 1 joining the one
    before (a single target has no auxiliary sample)."""
    # DEVIATION: upstream pads the last batch to N with copies of its first image, which then mix
    # with every target of that batch as extra auxiliaries; here the last batch is just smaller.
    sizes = [min(n, total - s) for s in range(0, total, n)]
    if len(sizes) > 1 and sizes[-1] == 1:
        last = sizes.pop()
        sizes[-1] += last
    return sizes


def expected_cost(
    aux: str,
    output: str,
    batch_sizes: Sequence[int],
    m: int,
    r: int,
    num_classes: int,
    p: int | None = None,
) -> dict[str, int]:
    """Oracle answers that scoring `batch_sizes` targets costs, oracle side included (module table).

    Returns `images` (full forwards) and `head` (embedding-setting head evaluations).
    """
    k, emb = num_classes, output == "embedding"
    images = head = 0
    for n in batch_sizes:
        p_t = {"in_batch": n - 1, "rand_id": p or 0, "oracle": m}[aux]
        mixes = n * p_t * r + (n * m * p_t * r if aux == "in_batch" else 0)
        images += n
        if emb:
            head += n + mixes
        else:
            images += mixes
    once = {"in_batch": 0, "rand_id": k * m * (p or 0) * r, "oracle": k * m * (m - 1) * r}[aux]
    if emb:
        images += k * m + ((p or 0) if aux == "rand_id" else 0)
        head += once
    else:
        images += once
    return {"images": images, "head": head}


@dataclass(frozen=True)
class MixDiffScores:
    """Per-target parts of the score, all OOD-ness (larger = more OOD). Each (N,)."""

    base: Tensor  # h(o_t), or 0 without the base score
    term: Tensor  # MixDiff_t
    total: Tensor  # base + γ term


class MixDiffScorer:
    """MixDiff's score (§3.2) through a `BlackBox`, independent of any data module or trainer.

    Args:
        oracle: the query-only target (`output` logits, probs, label or embedding).
        score: h, the output-based score (`scores.SCORE_KINDS`); `onehot` for label outputs.
        aux: `in_batch`, `rand_id` or `oracle`.
        m: M, oracles per class.
        r: R, mixing rates.
        p: P, auxiliary samples (`rand_id` only; the other modes fix it).
        gamma: γ, the weight of the MixDiff term.
        add_base_score: add h(o_t) (false: the MixDiff term alone, upstream's `add_base_score`).
        temperature: MCM's T.
        phase: the oracle counter the queries are charged to.
    """

    def __init__(
        self,
        oracle: BlackBox,
        score: str = "entropy",
        aux: str = "in_batch",
        m: int = 15,
        r: int = 7,
        p: int | None = None,
        gamma: float = 2.0,
        add_base_score: bool = True,
        temperature: float = 1.0,
        phase: Phase = "test",
    ) -> None:
        self.oracle = oracle
        self.score = score
        self.aux = aux
        self.m, self.r, self.p = int(m), int(r), p
        self.gamma = float(gamma)
        self.add_base_score = bool(add_base_score)
        self.temperature = float(temperature)
        self.phase: Phase = phase
        self.kind = output_kind(oracle.output)
        self.embedding = oracle.output == "embedding"
        self.rates = mixing_rates(self.r)
        self.refs: Tensor | None = None  # oracle images / embeddings (K * M, ...)
        self.aux_z: Tensor | None = None  # rand_id auxiliaries (P, ...)
        self.oracle_side: Tensor | None = None  # Ō per class (K, P, R, C), rand_id / oracle
        self.cost = {"images": 0, "head": 0}

    # -- the oracle ---------------------------------------------------------------------------
    def _encode(self, x: Tensor) -> Tensor:
        """What is mixed: the inputs (pixels), or their embeddings (one image query each)."""
        if not self.embedding:
            return x
        self.cost["images"] += int(x.shape[0])
        return self.oracle(x, phase=self.phase)

    def _readout(self, z: Tensor) -> Tensor:
        """The oracle's outputs of (mixed) inputs or embeddings. (L, C)"""
        self.cost["head" if self.embedding else "images"] += int(z.shape[0])
        if self.embedding:
            return self.oracle.head(z, phase=self.phase)
        return self.oracle(z, phase=self.phase)

    def query(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, outputs) of targets: z is what gets mixed. ((N, ...), (N, C))"""
        z = self._encode(x)
        return z, self._readout(z)

    def _mixed(self, a: Tensor, ia: Tensor, b: Tensor, ib: Tensor, lam: Tensor) -> Tensor:
        """Outputs of lam * a[ia] + (1 - lam) * b[ib], flat index vectors (L,), in oracle calls of
        at most `max_batch` inputs (the mixes are built per call, never all at once). (L, C)"""
        outs = []
        shape = (-1,) + (1,) * (a.dim() - 1)
        step = self.oracle.max_batch
        for s in range(0, ia.numel(), step):
            w = lam[s : s + step].view(shape)
            outs.append(self._readout(w * a[ia[s : s + step]] + (1 - w) * b[ib[s : s + step]]))
        if not outs:
            return a.new_zeros(0, self.oracle.num_classes or 0)
        return torch.cat(outs).float()

    # -- the oracle side ------------------------------------------------------------------------
    def set_references(self, oracle_images: Tensor, aux_images: Tensor | None = None) -> None:
        """Oracle images (K, M, ...) and, for `rand_id`, the P auxiliary images (P, ...); for
        `rand_id` and `oracle` the oracle side Ō is computed here, once per class."""
        k, m = int(oracle_images.shape[0]), int(oracle_images.shape[1])
        if m != self.m:
            raise ValueError(f"MixDiff: got {m} oracles per class, M = {self.m}.")
        self.refs = self._encode(oracle_images.flatten(0, 1))  # (K * M, ...)
        if self.aux == "rand_id":
            if aux_images is None or int(aux_images.shape[0]) != self.p:
                raise ValueError(f"MixDiff: aux=rand_id needs P = {self.p} auxiliary images.")
            self.aux_z = self._encode(aux_images)
        self.oracle_side = None
        if self.aux == "in_batch":
            return
        dev = self.refs.device
        rates = self.rates.to(dev)
        mm, rr = self.m, self.r
        cls = torch.arange(k, device=dev).view(k, 1, 1, 1)
        first = cls * mm + torch.arange(mm, device=dev).view(1, mm, 1, 1)  # oracle x*_m
        if self.aux == "rand_id":
            pp = self.p
            second = torch.arange(pp, device=dev).view(1, 1, pp, 1)  # auxiliary x_i
            shape = (k, mm, pp, rr)
            keep = torch.ones(shape, dtype=torch.bool, device=dev)
            b = self.aux_z
        else:  # oracle: x_i = the oracles themselves, without the diagonal m == i
            # DEVIATION (cost only): upstream queries the M x M mixes and masks the diagonal.
            pp = mm
            second = cls * mm + torch.arange(mm, device=dev).view(1, 1, mm, 1)
            shape = (k, mm, mm, rr)
            eye = torch.eye(mm, dtype=torch.bool, device=dev).view(1, mm, mm, 1)
            keep = (~eye).expand(shape)
            b = self.refs
        ia = first.expand(shape)[keep]
        ib = second.expand(shape)[keep]
        lam = rates.view(1, 1, 1, rr).expand(shape)[keep]
        out = self._mixed(self.refs, ia, b, ib, lam)
        full = out.new_zeros(*shape, out.shape[-1])
        full[keep] = out
        # Mean of the raw outputs over the oracles (upstream: `torch.mean(known_logits, dim=1)`;
        # `oracle`: the sum over m != i divided by M - 1).
        self.oracle_side = full.sum(1) / (mm - 1 if self.aux == "oracle" else mm)  # (K, P, R, C)

    # -- the score ------------------------------------------------------------------------------
    def h(self, out: Tensor) -> Tensor:
        """The base score's OOD-ness of outputs. (...,)"""
        return oodness(self.score, out, self.kind, self.oracle.logit_scale, self.temperature)

    def diff(self, target: Tensor, oracle: Tensor) -> Tensor:
        """Per (target, aux, rate): h(target mix) - h(oracle mean); the one-hot form for labels."""
        if self.score == "onehot":
            return -(target * oracle).mean(-1)  # MixDiffOneHot: mean over the classes
        return self.h(target) - self.h(oracle)

    def score_batch(self, z: Tensor, out: Tensor) -> MixDiffScores:
        """MixDiff scores of one test batch: z what `query` returned (mixable), out the outputs.

        With `in_batch` the batch is the auxiliary pool (its other targets). ((N,), ...)
        """
        if self.refs is None:
            raise RuntimeError("MixDiff: set_references(...) must run before scoring.")
        dev, n = z.device, int(z.shape[0])
        out = out.float()
        base = self.h(out) if self.add_base_score else out.new_zeros(n)
        pred = out.argmax(-1)  # selection_mode=argmax
        rates = self.rates.to(dev)
        rr, mm = self.r, self.m
        t = torch.arange(n, device=dev)
        if self.aux == "in_batch":
            # DEVIATION (cost only): upstream also queries each target mixed with itself (masked).
            pp = n - 1
            others = t.expand(n, n)[~torch.eye(n, dtype=torch.bool, device=dev)].view(n, pp)
            shape = (n, pp, rr)
            tgt = self._mixed(
                z,
                t.view(n, 1, 1).expand(shape).flatten(),
                z,
                others.view(n, pp, 1).expand(shape).flatten(),
                rates.view(1, 1, rr).expand(shape).flatten(),
            )
            shape_o = (n, mm, pp, rr)
            first = pred.view(n, 1, 1, 1) * mm + torch.arange(mm, device=dev).view(1, mm, 1, 1)
            orc = self._mixed(
                self.refs.to(dev),
                first.expand(shape_o).flatten(),
                z,
                others.view(n, 1, pp, 1).expand(shape_o).flatten(),
                rates.view(1, 1, 1, rr).expand(shape_o).flatten(),
            )
            oracle_mean = orc.view(*shape_o, -1).mean(1)  # (N, P, R, C)
        else:
            if self.aux == "rand_id":
                pp, b = self.p, self.aux_z.to(dev)
                second = torch.arange(pp, device=dev).view(1, pp, 1).expand(n, pp, rr)
            else:  # oracle: the M oracles of the predicted class
                pp, b = mm, self.refs.to(dev)
                second = pred.view(n, 1, 1) * mm + torch.arange(mm, device=dev).view(1, mm, 1)
                second = second.expand(n, pp, rr)
            shape = (n, pp, rr)
            tgt = self._mixed(
                z,
                t.view(n, 1, 1).expand(shape).flatten(),
                b,
                second.flatten(),
                rates.view(1, 1, rr).expand(shape).flatten(),
            )
            oracle_mean = self.oracle_side.to(dev)[pred]  # (N, P, R, C)
        if pp == 0:  # a lone target has no auxiliary sample (the stream never makes one)
            term = out.new_zeros(n)
        else:
            d = self.diff(tgt.view(n, pp, rr, -1), oracle_mean)  # (N, P, R)
            term = d.mean(-1).mean(-1)
        return MixDiffScores(base=base, term=term, total=base + self.gamma * term)


class MixDiff(PostHocOOD):
    """MixDiff on top of an output-based score, through the oracle; nothing trains.

    Args:
        name: method config name.
        model: the target CLIP backbone (wrapped in a `BlackBox`, not kept).
        info: image classification task info with an `ood` test set.
        base_score: h: `msp`, `maxlogit`, `energy`, `entropy`, `mcm` (logits / embedding; msp and
            entropy also probs) or `onehot` (label outputs only).
        add_base_score: add h(o_t) to the MixDiff term (false: the term alone, the γ -> ∞ limit).
        gamma: γ, the MixDiff term's weight.
        aux: auxiliary samples: `in_batch` | `rand_id` | `oracle`.
        n: N, the test batch (the auxiliary pool of `in_batch`; elsewhere it only sizes the work).
        m: M, oracle images per ID class (from the ID train split).
        r: R, mixing rates λ_r = r / (R + 1).
        p: P, random ID auxiliaries (`rand_id` only; null otherwise: N - 1 or M).
        seed: draws the oracles, the `rand_id` auxiliaries and the `in_batch` stream order.
        output: the access setting (`logits`, `probs`, `label`, `embedding`).
        log_parts: also log AUROC of the base score and of the MixDiff term alone per OOD set
            (`test/<set>/base_auroc`, `test/<set>/term_auroc`).
        **kwargs: see `PostHocOOD` (temperature, templates, normalize, max_batch) and
            `ClassificationMethod`.
    """

    score_choices: ClassVar[tuple[str, ...]] = (*POST_HOC_SCORES, "onehot")

    def __init__(
        self,
        name: str,
        model: nn.Module | None = None,
        info: ImageClassificationInfo | None = None,
        base_score: str = "entropy",
        add_base_score: bool = True,
        gamma: float = 2.0,
        aux: str = "in_batch",
        n: int = 15,
        m: int = 15,
        r: int = 7,
        p: int | None = None,
        seed: int = 0,
        output: str = "logits",
        log_parts: bool = True,
        **kwargs: Any,
    ) -> None:
        _check_mixdiff(name, aux, n, m, r, p, gamma)
        super().__init__(name, model, info, score=base_score, output=output, **kwargs)
        self.aux, self.n, self.m, self.r, self.p = aux, int(n), int(m), int(r), p
        self.seed = int(seed)
        self.gamma = float(gamma)
        self.add_base_score = bool(add_base_score)
        self.log_parts = bool(log_parts)
        self.scorer = MixDiffScorer(
            self.oracle,
            score=base_score,
            aux=aux,
            m=m,
            r=r,
            p=p,
            gamma=gamma,
            add_base_score=add_base_score,
            temperature=self.temperature,
        )
        k = len(self.test_specs)
        self.base_parts = nn.ModuleList(ScoreCollector() for _ in range(k))
        self.term_parts = nn.ModuleList(ScoreCollector() for _ in range(k))
        self._cur: tuple[int, int] | None = None  # (test set, position of the batch's first item)
        self._pos: dict[int, int] = {}
        self._pending: list[tuple[int, int, Tensor, Tensor | None]] = []
        self._scored = 0

    # -- references from the ID train split ----------------------------------------------------
    def on_test_start(self) -> None:
        super().on_test_start()  # zeroes the oracle's test counters: the oracle side counts
        trainer = self._trainer
        if self.aux == "in_batch" and trainer is not None and trainer.world_size > 1:
            raise ConfigValueError(
                f"method={self.name}: aux=in_batch re-streams the test sets in one process; run "
                "with trainer.devices=1, or use aux=oracle / rand_id."
            )
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None:
            raise RuntimeError(
                f"method={self.name} samples its oracles from the data module's ID train split; "
                "test it with `trainer.test(method, datamodule=dm)`."
            )
        oracles, aux = self.references_from(dm)
        self.set_references(oracles, aux)
        self._pos, self._pending, self._scored = {}, [], 0

    def references_from(self, dm: Any) -> tuple[Tensor, Tensor | None]:
        """M oracle images per ID class (K, M, 3, S, S) and the `rand_id` auxiliaries (P, ...),
        drawn with the seed from the data module's train split, with the test transform."""
        ds = dm.train_dataloader().dataset
        split = getattr(ds, "split", None)
        if split is not None:
            labels = list(split.labels)
            tf = build_transforms(self.input_preprocess(), False, False)

            def image(i: int) -> Tensor:
                return tf(split[i]["image"].convert("RGB"))

        else:  # a data module without an ImageSplit view: its own (deterministic) train items
            labels = [int(ds[i]["label"]) for i in range(len(ds))]

            def image(i: int) -> Tensor:
                return ds[i]["image"]

        p = self.p if self.aux == "rand_id" else None
        k = len(self.classnames)
        oracle_idx, aux_idx = sample_references(
            labels, k, self.m, p, self.seed, self.classnames, self.name
        )
        oracles = torch.stack([image(i) for i in oracle_idx.flatten().tolist()])
        oracles = oracles.view(*oracle_idx.shape, *oracles.shape[1:])
        aux = None if aux_idx is None else torch.stack([image(i) for i in aux_idx.tolist()])
        log.info(
            "%s: %d oracle images per class from the ID train split (%d items)%s, seed %d",
            self.name,
            self.m,
            len(labels),
            "" if aux is None else f", {len(aux)} random ID auxiliaries",
            self.seed,
        )
        return oracles, aux

    def set_references(self, oracles: Tensor, aux: Tensor | None = None) -> None:
        """Give the scorer its oracle images (K, M, ...) (and auxiliaries), on this device."""
        self.scorer.set_references(
            oracles.to(self.device), None if aux is None else aux.to(self.device)
        )

    # -- scoring --------------------------------------------------------------------------------
    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        start = self._pos.get(dataloader_idx, 0)
        self._cur = (dataloader_idx, start)
        try:
            super().test_step(batch, batch_idx, dataloader_idx)
        finally:
            self._cur = None
        self._pos[dataloader_idx] = start + int(batch["image"].shape[0])

    def ood_scores(self, logits: Tensor, images: Tensor) -> Tensor:  # (B,)
        z, out = self.answer(images)
        n = int(out.shape[0])
        self.scorer.cost["images"] += n  # the target's own query (its base outputs)
        if self.output == "embedding":
            self.scorer.cost["head"] += n
        self._scored += n
        if self.aux == "in_batch" and self._cur is not None:
            # Scored at the end of the pass, in a shuffled stream of ID and OOD targets.
            set_idx, start = self._cur
            self._pending.append(
                (
                    set_idx,
                    start,
                    out.detach().cpu(),
                    z.cpu() if self.output == "embedding" else None,
                )
            )
            return out.new_empty(0)
        parts = self.scorer.score_batch(z, out)
        if self._cur is not None:
            self._record(self._cur[0], parts)
        return -parts.total  # MixDiff's OOD-ness, negated once: higher = more in-distribution

    def _record(self, set_idx: int, parts: MixDiffScores, mask: Tensor | None = None) -> None:
        sel = (lambda x: x) if mask is None else (lambda x: x[mask])
        self.base_parts[set_idx].update(-sel(parts.base))
        self.term_parts[set_idx].update(-sel(parts.term))

    def _test_loader(self, set_idx: int) -> Any:
        loaders = self.trainer.test_dataloaders
        loader = loaders[set_idx] if isinstance(loaders, (list, tuple)) else loaders
        if not isinstance(getattr(loader, "sampler", None), SequentialSampler):
            raise RuntimeError(
                f"method={self.name}: aux=in_batch re-reads test items by position and needs "
                "sequential test loaders (no shuffling, one process)."
            )
        return loader

    def _score_stream(self) -> None:
        """`in_batch`: score all pending targets in one seeded shuffled stream of batches of N."""
        # DEVIATION: data with several `ood` test sets put them all in one stream with the ID set
        # (upstream's benchmarks have one OOD set each); per-set streams would score ID per set.
        if not self._pending:
            return
        items = [
            (s, start + j, out[j], None if z is None else z[j])
            for s, start, out, z in self._pending
            for j in range(out.shape[0])
        ]
        self._pending = []
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(items), generator=g).tolist()
        datasets: dict[int, Any] = {}
        begin = 0
        for size in stream_batches(len(items), self.n):
            chunk = [items[i] for i in order[begin : begin + size]]
            begin += size
            sets = torch.tensor([c[0] for c in chunk])
            out = torch.stack([c[2] for c in chunk]).to(self.device)
            if self.output == "embedding":
                z = torch.stack([c[3] for c in chunk]).to(self.device)
            else:
                for s in set(sets.tolist()):
                    if s not in datasets:
                        datasets[s] = self._test_loader(s).dataset
                z = torch.stack([datasets[c[0]][c[1]]["image"] for c in chunk]).to(self.device)
            parts = self.scorer.score_batch(z, out)
            scores = -parts.total.detach()  # higher = more in-distribution
            for s in sets.unique().tolist():
                mask = (sets == s).to(self.device)
                target = self.id_scores if s == self._id_ref else self.test_metrics[s]
                target.update(scores[mask])
                self._record(s, parts, mask)

    def on_test_epoch_end(self) -> None:
        if self.aux == "in_batch":
            self._score_stream()
        parts: dict[str, float] = {}
        if self.log_parts:
            for name, store in (("base", self.base_parts), ("term", self.term_parts)):
                id_s = store[self._id_ref].compute()
                for i, spec in enumerate(self.test_specs):
                    ood_s = store[i].compute() if spec.role == "ood" else None
                    if ood_s is not None and id_s.numel() and ood_s.numel():
                        value = ood_metrics(id_s, ood_s)["auroc"]
                        parts[f"test/{spec.name}/{name}_auroc"] = value
        for store in (*self.base_parts, *self.term_parts):
            store.reset()
        super().on_test_epoch_end()
        if parts:
            self.log_dict(parts, add_dataloader_idx=False)

    # -- the record -----------------------------------------------------------------------------
    def extra_metrics(self) -> dict[str, float]:
        out = super().extra_metrics()
        n = max(self._scored, 1)
        cost = self.scorer.cost
        out.update(
            {
                "test/scored_samples": float(self._scored),
                "test/queries_per_sample": (cost["images"] + cost["head"]) / n,
                "test/images_per_sample": cost["images"] / n,
            }
        )
        return out

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (
            *super().metric_keys(),
            "test/*/base_auroc",
            "test/*/term_auroc",
            "test/scored_samples",
            "test/queries_per_sample",
            "test/images_per_sample",
        )


def sample_references(
    labels: Sequence[int],
    num_classes: int,
    m: int,
    p: int | None,
    seed: int,
    classnames: Sequence[str] | None = None,
    method: str = "mixdiff",
) -> tuple[Tensor, Tensor | None]:
    """Indices of M oracles per class (K, M) and of P auxiliaries (P,) among the other items.

    One generator seeded with `seed`: per class in label order a permutation of its items (the
    first M), then a permutation of the items no class drew.
    """
    # DEVIATION: upstream draws with `random.Random(seed).choices` (with replacement, per class M + P
    # items, the `rand_id` auxiliaries from the P extras of every class); here without replacement.
    g = torch.Generator().manual_seed(int(seed))
    y = torch.as_tensor(list(labels), dtype=torch.long)
    rows = []
    for k in range(num_classes):
        pool = (y == k).nonzero().flatten()
        if len(pool) < m:
            name = classnames[k] if classnames is not None else str(k)
            raise ConfigValueError(
                f"method={method}: class '{name}' has {len(pool)} ID train images and M={m} oracles "
                "are drawn per class; lower method.m or raise data.num_shots (null: all)."
            )
        rows.append(pool[torch.randperm(len(pool), generator=g)[:m]])
    oracle_idx = torch.stack(rows)  # (K, M)
    if not p:
        return oracle_idx, None
    taken = torch.zeros(len(y), dtype=torch.bool)
    taken[oracle_idx.flatten()] = True
    rest = (~taken).nonzero().flatten()
    if len(rest) < p:
        raise ConfigValueError(
            f"method={method}: aux=rand_id draws P={p} ID train images besides the oracles and "
            f"only {len(rest)} are left; lower method.p or method.m, or raise data.num_shots."
        )
    return oracle_idx, rest[torch.randperm(len(rest), generator=g)[:p]]


def _check_mixdiff(
    name: str, aux: str, n: int, m: int, r: int, p: int | None, gamma: float
) -> None:
    """One-line errors for MixDiff's hyperparameters."""
    from reprolab.utils.naming import unknown_name

    if aux not in AUX_MODES:
        raise ConfigValueError(f"method={name}: {unknown_name('aux mode', aux, AUX_MODES)}.")
    for key, value, low in (("n", n, 2 if aux == "in_batch" else 1), ("m", m, 1), ("r", r, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigValueError(
                f"method={name}: method.{key} must be an int >= {low}, got {value!r}."
            )
    if aux == "oracle" and m < 2:
        raise ConfigValueError(
            f"method={name}: aux=oracle mixes each oracle with the other M - 1; use method.m >= 2."
        )
    if aux == "rand_id" and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
        raise ConfigValueError(
            f"method={name}: aux=rand_id draws P random ID train images; set method.p >= 1, got {p!r}."
        )
    if aux != "rand_id" and p is not None:
        fixed = "N - 1 (the other targets of the batch)" if aux == "in_batch" else "M (the oracles)"
        raise ConfigValueError(
            f"method={name}: with aux={aux}, P is {fixed}; set method.p=null (p is rand_id's)."
        )
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool):
        raise ConfigValueError(f"method={name}: method.gamma must be a number, got {gamma!r}.")
