"""FT and LP-FT: cross-entropy fine-tuning of CLIP's image tower with a linear head.

FT (robust_finetuning.md §2.3; WiSE-FT's and CaRot's released `ft` recipe): the image tower and a
linear head on L2-normalised image features, the head initialised from the zero-shot head (weights
exp(logit_scale) · w_c, bias 0), both trained with CE; AdamW lr 3e-5, wd 0.1, gradient norm clipped at
1.0, warmup-cosine schedule. The text tower is not trained (`model.trainable=image`).

LP-FT (Kumar et al., "Fine-tuning can distort pretrained features and underperform out-of-
distribution", ICLR 2022; spec §2.4): a linear probe first (the image tower frozen, a freshly
initialised head), then FT from that head. One command runs both stages as two rounds of the runner
(`rounds`: a killed run resumes in the stage it died in; the LP stage's test metrics stay in
`metrics.json` under `rounds`); or `source` names a finished `lp` run whose head starts FT.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprolab.errors import ConfigValueError
from reprolab.methods.base import OptimFactory
from reprolab.methods.finetuning.base import FineTuningMethod, normalized
from reprolab.methods.finetuning.source import SourceRun, SourceRunError

HEAD_INITS = ("zeroshot", "random")


class FineTune(FineTuningMethod):
    """FT: CE through the image tower; a linear head on normalised features.

    Args:
        head_init: `zeroshot` (the papers' FT) or `random` (PyTorch's default init, bias 0: Kumar et
            al.'s FT baseline that LP-FT is compared with).
        label_smoothing: CE label smoothing (0 in every recipe).
        **kwargs: see `FineTuningMethod`.
    """

    def __init__(
        self, *args: Any, head_init: str = "zeroshot", label_smoothing: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if head_init not in HEAD_INITS:
            raise ConfigValueError(
                f"method={self.name}: head_init must be one of {list(HEAD_INITS)}, got {head_init!r}."
            )
        self.head_init = head_init
        self.label_smoothing = float(label_smoothing)
        self.head: nn.Linear | None = None

    def setup(self, stage: str) -> None:
        if self.head is None:
            self.head = self.build_head(self.head_init)

    def build_head(self, init: str) -> nn.Linear:
        w = self.backbone.zeroshot_weights(self.classnames, self.templates)  # (C, D)
        head = nn.Linear(w.shape[1], w.shape[0]).to(w.device)
        with torch.no_grad():
            head.bias.zero_()
            if init == "zeroshot":
                head.weight.copy_(w * self.backbone.logit_scale)
        return head

    def head_logits(self, features: Tensor) -> Tensor:
        return self.head(normalized(features))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.logits(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss


class LPFT(FineTune):
    """LP-FT: round 0 trains a fresh head on the frozen image tower, round 1 fine-tunes from it.

    Args:
        lp_epochs: epochs of the LP stage (None: the trainer's `max_epochs`).
        lp_optimizer: optimizer factory of the LP stage (None: `optimizer`).
        source: a finished `lp` run (`{run_dir, experiment}`) whose head starts FT; then there is one
            round (FT) and no LP stage here.
        **kwargs: see `FineTune` (`head_init` is the LP stage's head init, `random` by default).
    """

    def __init__(
        self,
        *args: Any,
        lp_epochs: int | None = None,
        lp_optimizer: OptimFactory | None = None,
        source: Any = None,
        head_init: str = "random",
        **kwargs: Any,
    ) -> None:
        src = None if source is None else SourceRun.parse(kwargs.get("name", "lp_ft"), source)
        kwargs["rounds"] = 1 if src is not None else 2
        super().__init__(*args, head_init=head_init, **kwargs)
        self.source = src
        self.lp_epochs = lp_epochs
        self.lp_optimizer = lp_optimizer
        self.stage = "ft"
        self._source_head: dict[str, Tensor] | None = None
        if self.source is not None:  # checked now: a missing run fails before any training
            state = self.source.load(self.name, getattr(self.backbone, "name", None))
            if "head.weight" not in state:
                raise SourceRunError(
                    f"method={self.name}: the run {self.source.run_dir} has no linear head "
                    f"(head.weight); point method.source at an `lp` run: {self.source.command()}"
                )
            self._source_head = {"weight": state["head.weight"], "bias": state["head.bias"]}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._source_head is not None:
            with torch.no_grad():
                if self.head.weight.shape != self._source_head["weight"].shape:
                    raise SourceRunError(
                        f"method={self.name}: the head of {self.source.run_dir} has shape "
                        f"{tuple(self._source_head['weight'].shape)}, this task needs "
                        f"{tuple(self.head.weight.shape)}; {self.source.command()}"
                    )
                self.head.weight.copy_(self._source_head["weight"])
                self.head.bias.copy_(self._source_head["bias"])
            self._source_head = None

    def start_round(self, round_idx: int, datamodule: L.LightningDataModule) -> None:
        self.stage = "lp" if (self.num_rounds == 2 and round_idx == 0) else "ft"
        for p in self._image_params():
            p.requires_grad_(self.stage == "ft")
        self.train(self.training)

    def _image_params(self) -> list[nn.Parameter]:
        return [p for _, obj in self.backbone.parts()["image"] for p in obj.parameters()]

    def train(self, mode: bool = True) -> LPFT:
        super().train(mode)
        if getattr(self, "stage", "ft") == "lp":
            self.backbone.eval()  # a linear probe reads frozen features (BatchNorm included)
        return self

    def round_trainer_overrides(self, round_idx: int) -> dict[str, Any]:
        if self.stage == "lp" and self.lp_epochs is not None:
            return {"max_epochs": int(self.lp_epochs)}
        return {}

    def configure_optimizers(self) -> Any:
        if self.stage == "lp" and self.lp_optimizer is not None:
            factory, self.optimizer_factory = self.optimizer_factory, self.lp_optimizer
            try:
                return super().configure_optimizers()
            finally:
                self.optimizer_factory = factory
        return super().configure_optimizers()
