"""BERT text featurizer for the group-robustness methods on CivilComments and MultiNLI.

Spec robustness_ood_prompting.md §1.4: SubpopBench (`YyzHarry/SubpopBench`, which SCER forks) trains
`bert-base-uncased` with a fresh linear head on its pooled [CLS] output, with dropout before the head
(`subpopbench/models/networks.py`, `BertFeatureWrapper`). `BertFeaturizer` stands in for an image
backbone in the fine-tuning methods (`reprolab.methods.finetuning`, `reprolab.methods.group`), like
`MLPFeaturizer`: it publishes `preprocess`, `encode_image(x) -> (B, feature_dim)`, `feature_dim`,
`trainable` and `parts()`.

- Inputs: what `TokenInput` makes the data module serve, a LongTensor (B, L, 3) of input_ids,
  attention_mask and token_type_ids stacked on the last axis (SubpopBench's layout; (B, L, 2)
  without token types is read too, as upstream does).
- Output: BERT's pooler output (tanh of a dense layer on the final [CLS] state), then dropout with
  probability `dropout`; `feature_dim` = hidden size (768 for bert-base).
- Weights: a Hugging Face id (`bert-base-uncased`, cached under `cache_dir`) or a local folder
  written by `save_pretrained`, or `pretrained: null` for a random init of the sizes in `config`
  (`tiny_bert`: the embedded `tiny` WordPiece vocabulary, for tests and CPU runs). The random init is
  `transformers`' own (normal(0, initializer_range)), drawn from torch's global generator, so the
  runner's `seed_everything` makes it deterministic.
- `trainable: true | false` (as `TimmBackbone`: SubpopBench fine-tunes the whole network; the group
  methods accept booleans). False: eval mode (dropout off), no gradients, out of checkpoints.

It has no text tower in the CLIP sense (no zero-shot head): `zeroshot_weights` returns a NaN
placeholder of the head's shape, and `logit_scale` / `encode_text` / `logits` raise a one-line
`ConfigValueError` naming `head_init=random` (the `MLPFeaturizer` convention).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from reprolab.data.tokens import TINY, TokenInput, load_tokenizer
from reprolab.errors import ConfigValueError
from reprolab.models.no_text import NoTextTower
from reprolab.utils.naming import unknown_name

log = logging.getLogger(__name__)

DEFAULT_DROPOUT_KEYS = ("classifier_dropout", "hidden_dropout_prob")


class BertFeaturizer(NoTextTower, nn.Module):
    """Token ids (B, L, 3) -> dropout(pooled [CLS]) (B, hidden_size).

    Args:
        name: config name (lands in hparams and metrics.json).
        pretrained: a Hugging Face id (`bert-base-uncased`) or a local `save_pretrained` folder; None:
            random init of a `transformers.BertConfig` built from `config`.
        tokenizer: the tokenizer the data module must use (`TokenInput`); None: `pretrained`.
            `tiny` is the embedded WordPiece vocabulary (`reprolab.data.tokens`).
        max_length: tokens per example, [CLS] / [SEP] included, at most the model's
            `max_position_embeddings`; `TextGroupDataModule` takes it as the upper bound and default
            of its own `data.max_length` (SubpopBench: CivilComments 220, MultiNLI 128).
        dropout: dropout on the pooled output before the head (SubpopBench `last_layer_dropout`,
            0.5 for text). None: the BERT config's `classifier_dropout`, else `hidden_dropout_prob`
            (0.1), which is what SubpopBench uses when `last_layer_dropout` is 0.
        trainable: train every parameter (False: eval mode, no gradients, not in checkpoints).
        cache_dir: Hugging Face download cache (`paths.weights_dir`; None: the HF default).
        config: `BertConfig` fields. With `pretrained: null` the sizes of the random init
            (`hidden_size`, `num_hidden_layers`, `num_attention_heads`, `intermediate_size`,
            `max_position_embeddings`, ...); with a pretrained model, overrides of its config that
            do not change shapes (`hidden_dropout_prob`, `attention_probs_dropout_prob`).
        vocab_size: embedding rows of a random init (None: the tokenizer's vocabulary size).
    """

    what_it_is = "a BERT featurizer without a CLIP-style text tower"

    def __init__(
        self,
        name: str,
        pretrained: str | None = "bert-base-uncased",
        tokenizer: str | None = None,
        max_length: int = 128,
        dropout: float | None = None,
        trainable: bool = True,
        cache_dir: str | None = None,
        config: Mapping[str, Any] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(trainable, bool):
            raise ConfigValueError(
                f"model={name}: trainable must be true or false (a BERT featurizer trains as a "
                f"whole or not at all), got {trainable!r}."
            )
        if pretrained is None and tokenizer is None:
            raise ConfigValueError(
                f"model={name}: a random init (pretrained: null) needs model.tokenizer (e.g. "
                f"`{TINY}`, the embedded vocabulary) to size its embeddings and tokenise the data."
            )
        self.name = name
        self.pretrained = pretrained
        self.trainable = trainable
        self.tokenizer_name = str(tokenizer if tokenizer is not None else pretrained)
        overrides = _config_fields(name, config)
        if pretrained is None:
            self.model = _random_bert(name, overrides, vocab_size, self.tokenizer_name, cache_dir)
            self.weights = "random init"
        else:
            self.model = _load_bert(name, str(pretrained), overrides, cache_dir)
            self.weights = str(pretrained)
        cfg = self.model.config
        max_positions = int(cfg.max_position_embeddings)
        if not 2 <= int(max_length) <= max_positions:
            raise ConfigValueError(
                f"model={name}: max_length must lie in [2, {max_positions}] (the model's "
                f"max_position_embeddings), got {max_length}."
            )
        self._check_vocabulary(cache_dir)
        if dropout is None:
            dropout = next(
                (
                    getattr(cfg, k)
                    for k in DEFAULT_DROPOUT_KEYS
                    if getattr(cfg, k, None) is not None
                ),
                0.0,
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigValueError(f"model={name}: dropout must lie in [0, 1), got {dropout}.")
        self.dropout = nn.Dropout(float(dropout))
        self.feature_dim = int(cfg.hidden_size)
        self.preprocess = TokenInput(self.tokenizer_name, int(max_length), cache_dir)
        self.requires_grad_(trainable)
        if not trainable:
            self.eval()
        log.info(
            "Backbone %s (BERT %s, %d layers, hidden %d, dropout %.2f, tokenizer %s, max_length "
            "%d): trainable=%s, %.2fM parameters",
            name,
            self.weights,
            cfg.num_hidden_layers,
            self.feature_dim,
            self.dropout.p,
            self.tokenizer_name,
            self.preprocess.max_length,
            trainable,
            sum(p.numel() for p in self.parameters()) / 1e6,
        )

    def _check_vocabulary(self, cache_dir: str | None) -> None:
        """Every id the tokenizer can emit must index the embedding (fails before any data work)."""
        n_tok = len(load_tokenizer(self.tokenizer_name, cache_dir))
        n_emb = int(self.model.config.vocab_size)
        if n_tok > n_emb:
            raise ConfigValueError(
                f"model={self.name}: tokenizer {self.tokenizer_name!r} has {n_tok} entries but the "
                f"model embeds only {n_emb}; use the model's own tokenizer (model.tokenizer=null)."
            )

    def train(self, mode: bool = True) -> BertFeaturizer:
        # Frozen: eval mode (dropout off) whatever the parent module does.
        return super().train(mode and self.trainable)

    def frozen_state_prefixes(self) -> list[str]:
        """`[""]` (everything: rebuilt from `cfg.model`) when frozen, `[]` when it trains."""
        return [] if self.trainable else [""]

    def parts(self) -> dict[str, list[tuple[str, nn.Module]]]:
        """`image`: the BERT encoder (the input tower); `text` and `scale` are empty."""
        return {"image": [("model.", self.model)], "text": [], "scale": []}

    def encode_image(self, images: Tensor) -> Tensor:
        """Pooled [CLS] features of token inputs (B, L, 3) after dropout. (B, feature_dim)"""
        if images.dim() != 3 or images.shape[-1] not in (2, 3):
            raise ValueError(
                f"model={self.name} reads token inputs (B, L, 3): input_ids, attention_mask, "
                f"token_type_ids; got shape {tuple(images.shape)}. Serve the data tokenised with "
                "the model's preprocess (reprolab.data.tokens.TokenInput)."
            )
        if images.is_floating_point():
            raise TypeError(
                f"model={self.name} reads integer token ids, got a {images.dtype} tensor (inputs "
                "must not be cast to a float dtype)."
            )
        ids = images.long()
        kwargs = {"input_ids": ids[..., 0], "attention_mask": ids[..., 1]}
        if ids.shape[-1] == 3:
            kwargs["token_type_ids"] = ids[..., 2]
        return self.dropout(self.model(**kwargs).pooler_output)

    def forward(self, images: Tensor) -> Tensor:
        return self.encode_image(images)


def _config_fields(name: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """`model.config` as a dict, every key a `BertConfig` field (BertConfig keeps unknown keys
    silently, so a misspelt size would otherwise be ignored)."""
    from transformers import BertConfig

    fields = dict(config or {})
    known = set(BertConfig().to_dict()) - {"vocab_size"}  # vocab_size: its own argument
    for key in fields:
        if key not in known:
            raise ConfigValueError(
                f"model={name}: " + unknown_name("BertConfig field in model.config", key, known)
            )
    return fields


def _random_bert(
    name: str,
    fields: dict[str, Any],
    vocab_size: int | None,
    tokenizer: str,
    cache_dir: str | None,
) -> nn.Module:
    """A randomly initialised `BertModel` (with its pooler) of the sizes in `fields`."""
    from transformers import BertConfig, BertModel

    if vocab_size is None:
        vocab_size = len(load_tokenizer(tokenizer, cache_dir))
    try:
        config = BertConfig(vocab_size=int(vocab_size), **fields)
        return BertModel(config, add_pooling_layer=True)
    except (TypeError, ValueError) as e:  # bad sizes (hidden not divisible by heads, ...)
        msg = " ".join(str(e).split())
        raise ConfigValueError(f"model={name}: invalid BERT sizes in model.config: {msg}") from e


def _load_bert(
    name: str, pretrained: str, fields: dict[str, Any], cache_dir: str | None
) -> nn.Module:
    """`BertModel.from_pretrained` from a local folder or the cache (or the Hub when online)."""
    from transformers import BertModel

    local = _is_path(pretrained)
    if local and not (Path(pretrained).expanduser() / "config.json").is_file():
        raise ConfigValueError(
            f"model={name}: {pretrained} is not a saved model folder (no config.json); point "
            "model.pretrained at a folder written by `save_pretrained`, or at a Hugging Face id "
            "such as bert-base-uncased."
        )
    path = str(Path(pretrained).expanduser()) if local else pretrained
    try:
        model = BertModel.from_pretrained(
            path,
            cache_dir=cache_dir,
            local_files_only=local or _offline(),
            add_pooling_layer=True,
            **fields,
        )
    except OSError as e:  # not cached and no network, or an unknown id
        where = cache_dir or "the Hugging Face cache"
        raise ConfigValueError(
            f"model={name}: weights {pretrained} are not in {where} and cannot be downloaded here "
            f"({type(e).__name__}); on a machine with internet run `python "
            f"scripts/download_weights.py --hf {pretrained}` (with WEIGHTS_ROOT set as for this "
            "run), or set model.pretrained to a local save_pretrained folder."
        ) from e
    return (
        model.float()
    )  # transformers 5 may keep a checkpoint's half dtype; the methods train fp32


def _is_path(s: str) -> bool:
    """A filesystem path rather than a Hub id (`namespace/name` has one slash, no leading `./`)."""
    return s.startswith((".", "~", os.sep)) or s.count("/") > 1 or Path(s).expanduser().is_dir()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
