"""A small MLP featurizer for vector-input group data (the SCER / ASGDRO specs' synthetic checks).

Spec robustness_ood_prompting.md §1.8: "Featurizer: 2-layer MLP, 16-d". `MLPFeaturizer` stands in
for an image backbone in the fine-tuning methods (`reprolab.methods.finetuning`): it publishes a
`preprocess` (`VectorInput`: the data module serves rows of `input_dim` floats as they are),
`encode_image(x) -> (B, feature_dim)`, `feature_dim`, `trainable` (`none | image`) and `parts()`,
as `CLIPBackbone` / `TimmBackbone` do. The layout follows SubpopBench's / DomainBed's MLP
featurizer: Linear -> activation (-> dropout) -> Linear, no activation on the output.

It has no text tower: no zero-shot head, logit scale or text encoder. `zeroshot_weights` returns a
NaN placeholder of the head's shape (C, feature_dim), because the fine-tuning methods size a fresh
head from it (`FineTune.build_head`, `LinearProbe.setup`); every use of its values goes through
`logit_scale` or `logits`, which raise a one-line `ConfigValueError` naming `head_init=random`.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from reprolab.data.vector_groups import VectorInput
from reprolab.errors import ConfigValueError
from reprolab.models.no_text import NoTextTower
from reprolab.utils.naming import unknown_name

log = logging.getLogger(__name__)

TRAINABLE: tuple[str, ...] = ("none", "image")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLPFeaturizer(NoTextTower, nn.Module):
    """x (B, input_dim) -> h (B, feature_dim): Linear, activation, dropout, Linear.

    Initialised by PyTorch's default (the runner seeds it with `seed` before building the model).

    Args:
        name: config name (lands in hparams and metrics.json).
        input_dim: width of the data's feature vectors (16 for `group_synth*`).
        hidden_dim: hidden width; 0 = no layers at all: the featurizer is the identity and the
            method's head a linear model on the raw inputs (spec §2.5's cheap variant: ASGDRO's ρ
            then acts on the head alone); `feature_dim` must equal `input_dim` then.
        feature_dim: output width, the embedding a head and SCER's regulariser read (16).
        activation: `relu`, `gelu`, `elu`, `tanh` or `silu`.
        dropout: dropout after the hidden activation (0: none).
        trainable: `image` (trained with the method) or `none` (frozen: eval mode, no gradients,
            out of checkpoints). There is no text tower, so `text` / `both` do not apply.
    """

    what_it_is = "an MLP featurizer without a text tower"

    def __init__(
        self,
        name: str,
        input_dim: int = 16,
        hidden_dim: int = 64,
        feature_dim: int = 16,
        activation: str = "relu",
        dropout: float = 0.0,
        trainable: str = "image",
    ) -> None:
        super().__init__()
        if trainable not in TRAINABLE:
            raise ConfigValueError(
                f"model={name}: {unknown_name('trainable mode', trainable, TRAINABLE)} (an MLP "
                "featurizer has no text tower). Set model.trainable=image or none."
            )
        if activation not in ACTIVATIONS:
            raise ConfigValueError(
                f"model={name}: " + unknown_name("activation", activation, ACTIVATIONS)
            )
        for key, v in (
            ("input_dim", input_dim),
            ("hidden_dim", int(hidden_dim) + 1),  # 0 allowed: the identity
            ("feature_dim", feature_dim),
        ):
            if int(v) < 1:
                raise ConfigValueError(f"model={name}: {key} must be >= 1, got {v}.")
        if int(hidden_dim) == 0 and int(feature_dim) != int(input_dim):
            raise ConfigValueError(
                f"model={name}: hidden_dim=0 is the identity featurizer, so feature_dim must equal "
                f"input_dim ({input_dim}), got {feature_dim}."
            )
        self.name = name
        self.input_dim, self.feature_dim = int(input_dim), int(feature_dim)
        self.trainable = trainable
        self.net: nn.Module = (
            nn.Sequential(
                nn.Linear(self.input_dim, int(hidden_dim)),
                ACTIVATIONS[activation](),
                nn.Dropout(float(dropout)),
                nn.Linear(int(hidden_dim), self.feature_dim),
            )
            if int(hidden_dim) > 0
            else nn.Identity()
        )
        self.preprocess = VectorInput(self.input_dim)
        self.requires_grad_(trainable != "none")
        if trainable == "none":
            self.eval()
        log.info(
            "Backbone %s (MLP %d-%d-%d, %s): trainable=%s, %d parameters",
            name,
            self.input_dim,
            hidden_dim,
            self.feature_dim,
            activation,
            trainable,
            sum(p.numel() for p in self.parameters()),
        )

    def train(self, mode: bool = True) -> MLPFeaturizer:
        # Frozen: eval mode (dropout off) whatever the parent module does.
        return super().train(mode and self.trainable != "none")

    def frozen_state_prefixes(self) -> list[str]:
        """`[""]` (everything: rebuilt from `cfg.model`) when frozen, `[]` when it trains."""
        return [""] if self.trainable == "none" else []

    def parts(self) -> dict[str, list[tuple[str, nn.Module]]]:
        """`image`: the MLP; `text` and `scale` are empty (the `CLIPBackbone.parts` layout)."""
        return {"image": [("net.", self.net)], "text": [], "scale": []}

    def encode_image(self, images: Tensor) -> Tensor:
        """Embeddings of feature vectors (B, input_dim). (B, feature_dim)"""
        return self.net(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)
