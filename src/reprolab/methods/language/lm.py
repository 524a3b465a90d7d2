"""Next-token language models of a `TokenInfo` task: a causal transformer and a unigram baseline.

Both score held-out text the same way (`TokenLM`): every target token of a window (position t + 1
given positions <= t; targets equal to `info.pad_id` are padding and not scored) adds its negative
log-likelihood in nats to a `reprolab.metrics.likelihood.TokenNLL`, which gives per split

    loss = total NLL / targets,   perplexity = exp(loss),   bits_per_token = loss / ln 2.

`val/loss`, `val/perplexity` after each validation; `test/<set>/{loss,perplexity,bits_per_token}`
for every test set of the task, the first also as `test/*` (what tables read). Lower is better.
Perplexities are over the data module's vocabulary (`<unk>` included; see `reprolab.data.text`),
so they compare models sharing it, not other papers' numbers.

- `CausalLM`: a network mapping ids (B, T) to next-token logits (B, T, V), e.g. the pre-LN tiny
  transformer of `reprolab.models.lm`, trained by maximum likelihood (mean NLL per target token =
  `train/loss`) with the optimiser and LR schedule of its config (AdamW, `warmup_cosine`).
- `UnigramLM`: p(w) = (count_train(w) + alpha) / (N + alpha V') over the V' = V - 1 non-padding
  entries (alpha = 1: add-one / Laplace smoothing), counted from the targets of the whole train
  split, read once through the data module's `split_dataloader("train")` when the method is set up;
  nothing is trained (`post_hoc`, runs with `train=false`). The floor every context model must beat.

Tokens per second (`extra_metrics`): `throughput/train_tokens_per_s` counts target tokens over the
wall time spent inside training batches (forward, backward, optimiser step; validation and
checkpointing left out), `throughput/test_tokens_per_s` target tokens over the whole test loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from reprolab.data.info import TokenInfo
from reprolab.methods.base import Method
from reprolab.metrics.likelihood import TokenNLL

TERMS = {"nll": "loss", "perplexity": "perplexity", "bits_per_token": "bits_per_token"}


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
) -> LRScheduler:
    """Linear warmup from ~0 to the optimiser's LR over `warmup_steps`, then a cosine decay to
    `min_lr_ratio` times it at `total_steps` (stepped once per optimiser step).

    Torch's `LinearLR` and `CosineAnnealingLR` chained by `SequentialLR`; a partial factory in
    `configs/method/lm.yaml`, where `total_steps: null` becomes the run's length (`Method`).
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_cosine needs 0 <= warmup_steps < total_steps (got {warmup_steps}, "
            f"{total_steps}); set trainer.max_steps or trainer.max_epochs to the run's length."
        )
    # eta_min is absolute in torch: the floor of the first (here the only) parameter group.
    eta_min = min_lr_ratio * optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=eta_min)
    if warmup_steps == 0:
        return cosine
    warm = LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warm, cosine], milestones=[warmup_steps])


class TokenLM(Method):
    """Base of next-token models: held-out NLL, perplexity and bits per token, tokens per second.

    Subclasses implement `token_nll(tokens) -> (B, T)`, the NLL (nats) of each target of the
    windows `tokens` (B, T + 1); padded targets may hold anything (they are masked here).

    Args:
        name: method config name.
        model: what `cfg.model` built (subclasses say what they accept).
        info: a `TokenInfo`.
        **kwargs: see `Method`.
    """

    info_type = TokenInfo
    requires: tuple[str, ...] = ("vocab_size",)
    primary_metric = "test/perplexity"

    def __init__(
        self,
        name: str,
        model: Any = None,
        info: TokenInfo | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, model, info, **kwargs)
        info = self.info
        self.vocab_size = int(info.vocab_size)
        self.pad_id = info.pad_id
        self.test_specs = list(info.test_sets)
        self.val_nll = TokenNLL()
        self.test_nll = nn.ModuleList(TokenNLL() for _ in self.test_specs)
        self._tokens = {"train": 0, "test": 0}
        self._seconds = {"train": 0.0, "test": 0.0}
        self._t0 = 0.0

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (
            *super().metric_keys(),
            "val/loss",
            "val/perplexity",
            *(f"test/{k}" for k in TERMS.values()),
            *(f"test/*/{k}" for k in TERMS.values()),
        )

    def token_nll(self, tokens: Tensor) -> Tensor:  # (B, T + 1) -> (B, T)
        raise NotImplementedError

    def target_mask(self, tokens: Tensor) -> Tensor:
        """Which targets of `tokens` (B, T + 1) are scored: (B, T) bool, False on padding."""
        targets = tokens[:, 1:]
        if self.pad_id is None:
            return torch.ones_like(targets, dtype=torch.bool)
        return targets != self.pad_id

    def nll_sum(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Summed NLL (nats) of the scored targets and their number."""
        mask = self.target_mask(tokens)
        nll = self.token_nll(tokens)
        return torch.where(mask, nll, torch.zeros_like(nll)).sum(), mask.sum()

    # -- evaluation -----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        with torch.no_grad():
            self.val_nll.update(*self.nll_sum(batch["tokens"]))

    def on_validation_epoch_end(self) -> None:
        out = self.val_nll.compute()
        self.log_dict({"val/loss": out["nll"], "val/perplexity": out["perplexity"]})
        self.val_nll.reset()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        with torch.no_grad():
            nll, n = self.nll_sum(batch["tokens"])
        self.test_nll[dataloader_idx].update(nll, n)
        self._tokens["test"] += int(n)

    def on_test_epoch_end(self) -> None:
        out: dict[str, Tensor] = {}
        for i, (spec, metric) in enumerate(zip(self.test_specs, self.test_nll, strict=True)):
            for k, v in metric.compute().items():
                out[f"test/{spec.name}/{TERMS[k]}"] = v
                if i == 0:
                    out[f"test/{TERMS[k]}"] = v
            metric.reset()
        self.log_dict(out, add_dataloader_idx=False)

    # -- tokens per second ----------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning calls this after the optimiser step: the interval is one full update.
        self._seconds["train"] += time.perf_counter() - self._t0
        self._tokens["train"] += int(self.target_mask(batch["tokens"]).sum())

    def on_test_start(self) -> None:
        self._t0 = time.perf_counter()

    def on_test_end(self) -> None:
        self._seconds["test"] += time.perf_counter() - self._t0

    def extra_metrics(self) -> dict[str, float]:
        """`throughput/{train,test}_tokens_per_s` of the stages that ran."""
        return {
            f"throughput/{stage}_tokens_per_s": round(self._tokens[stage] / self._seconds[stage], 1)
            for stage in ("train", "test")
            if self._tokens[stage] and self._seconds[stage] > 0
        }


class CausalLM(TokenLM):
    """A causal network trained by next-token maximum likelihood.

    Args:
        model: a factory for the network (`configs/model/tiny_lm.yaml`, `_partial_: true`), called
            here as `model(vocab_size=..., seq_len=...)`; an `nn.Module` already built for the
            task's sizes is used as is. It maps ids (B, T) to logits (B, T, vocab_size) and must
            not look ahead (position t sees positions <= t only).
        **kwargs: see `TokenLM` and `Method` (`optimizer`, `scheduler`, ...).
    """

    requires = ("vocab_size", "seq_len")

    def __init__(
        self,
        name: str,
        model: Callable[..., nn.Module] | nn.Module | None = None,
        info: TokenInfo | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, model, info, **kwargs)
        if model is None:
            raise ValueError(
                f"method={name} needs a network from cfg.model (e.g. model=tiny_lm), got none."
            )
        info = self.info
        if isinstance(model, nn.Module):
            self.lm = model
        else:
            self.lm = model(vocab_size=info.vocab_size, seq_len=info.seq_len)

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits (B, T, V) of ids (B, T)."""
        return self.lm(tokens)

    def token_nll(self, tokens: Tensor) -> Tensor:
        logits = self.lm(tokens[:, :-1]).float()  # (B, T, V); float: the softmax in full precision
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"method={self.name}: the network returns {logits.shape[-1]} logits per position "
                f"but the vocabulary has {self.vocab_size}; build it with vocab_size from the data."
            )
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        nll, n = self.nll_sum(batch["tokens"])
        loss = nll / n.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["tokens"]))
        return loss


class UnigramLM(TokenLM):
    """Add-alpha smoothed unigram counts of the train split; no gradient training (`post_hoc`).

    Args:
        model: unused (a unigram has no network); accepted so any `cfg.model` composes.
        smoothing: alpha, the pseudo-count of every non-padding entry (1 = add-one / Laplace).
        post_hoc: True: nothing to train, the runner only tests (`train=false`).
        **kwargs: see `TokenLM` and `Method`.
    """

    def __init__(
        self,
        name: str,
        model: Any = None,
        info: TokenInfo | None = None,
        smoothing: float = 1.0,
        post_hoc: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, model, info, post_hoc=post_hoc, **kwargs)
        if smoothing <= 0:
            raise ValueError(f"method={name}: smoothing must be > 0 (got {smoothing}).")
        self.smoothing = float(smoothing)
        # float64 counts: exact integers well past any corpus here; part of the checkpoint.
        self.register_buffer("counts", torch.zeros(self.vocab_size, dtype=torch.float64))
        self.fitted = False

    def fit(self, batches: Iterable[dict[str, Tensor]]) -> None:
        """Count the scored targets of `batches` (windows covering the train split once)."""
        counts = torch.zeros_like(self.counts)
        for batch in batches:
            tokens = batch["tokens"].to(counts.device)
            targets = tokens[:, 1:][self.target_mask(tokens)]
            counts += torch.bincount(targets, minlength=self.vocab_size).to(counts.dtype)
        self.counts.copy_(counts)
        self.fitted = True

    def log_probs(self) -> Tensor:
        """log p(w) for every entry (V,); `-inf` for padding, which is never a target."""
        pseudo = torch.full_like(self.counts, self.smoothing)
        if self.pad_id is not None:
            pseudo[self.pad_id] = 0.0
        counts = self.counts + pseudo
        return (counts / counts.sum()).log()

    def setup(self, stage: str) -> None:
        if self.fitted:
            return
        dm = getattr(self.trainer, "datamodule", None)
        split_loader = getattr(dm, "split_dataloader", None)
        if not callable(split_loader):
            raise ValueError(
                f"method={self.name} counts the train split through the data module's "
                f"split_dataloader('train'), which data={self.info.name} does not have "
                "(use a reprolab.data.text.TokenDataModule)."
            )
        self.fit(split_loader("train"))

    def token_nll(self, tokens: Tensor) -> Tensor:
        return -self.log_probs().float()[tokens[:, 1:]]

    def configure_optimizers(self) -> Any:
        raise RuntimeError(
            f"method={self.name} is fitted by counting, not trained; set train=false."
        )

    def extra_metrics(self) -> dict[str, float]:
        """Tokens per second, and how many train targets the counts hold."""
        return {**super().extra_metrics(), "model/train_tokens": float(self.counts.sum())}

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return (*super().metric_keys(), "model/train_tokens")
