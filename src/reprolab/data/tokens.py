"""Token inputs for text classifiers: what a text model asks its data for, and the tokenizer itself.

The text counterpart of `reprolab.data.transforms.Preprocess` (images) and
`reprolab.data.vector_groups.VectorInput` (feature vectors): a text backbone (`models/bert.py`)
publishes `preprocess = TokenInput(tokenizer, max_length)`, and a text data module
(`data/text_groups.py`) tokenises with exactly that tokenizer, so model and data can never disagree
about the vocabulary.

Batches carry `image` = LongTensor (B, max_length, 3): input_ids, attention_mask, token_type_ids
stacked on the last axis, SubpopBench's layout for BERT inputs (`subpopbench/dataset/datasets.py`,
`CivilComments` / `MultiNLI`; its `BertFeaturizer` unstacks them). Every classification method reads
its inputs from `batch["image"]`, so the group methods run on text unchanged.

Tokenizers:
- `tiny` — the embedded WordPiece vocabulary (`data/assets/tiny_bert/vocab.txt`: BERT's specials,
  characters, their `##` continuations and a few hundred English words; lower-cased), loaded with
  `transformers.BertTokenizerFast`. It runs anywhere, offline; `model=tiny_bert` matches it.
- any Hugging Face id or local folder (`bert-base-uncased`), through `AutoTokenizer.from_pretrained`
  with `cache_dir`; offline (`HF_HUB_OFFLINE=1`) only a cached copy loads, else one line names
  `python scripts/download_weights.py --hf <id>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from reprolab.errors import ConfigValueError

TINY = "tiny"
INPUT_CHANNELS = 3  # input_ids, attention_mask, token_type_ids


@dataclass(frozen=True)
class TokenInput:
    """What a text model expects: text tokenised by `tokenizer`, padded / truncated to `max_length`.

    Args:
        tokenizer: `tiny` (embedded) or a Hugging Face id / local folder (`bert-base-uncased`).
        max_length: tokens per example, [CLS] and [SEP] included (SubpopBench: 220 for
            CivilComments, 128 for MultiNLI).
        cache_dir: where Hugging Face files are cached (`paths.weights_dir`), or None (HF default).
    """

    tokenizer: str
    max_length: int
    cache_dir: str | None = None


def tiny_vocab_path() -> str:
    """Path of the embedded WordPiece vocabulary."""
    return str(resources.files("reprolab.data").joinpath("assets/tiny_bert/vocab.txt"))


@lru_cache(maxsize=8)
def load_tokenizer(name: str, cache_dir: str | None = None) -> Any:
    """A `transformers` fast tokenizer: the embedded `tiny` one or `AutoTokenizer(name)`.

    Raises:
        ConfigValueError: the tokenizer is neither embedded nor cached / a local folder, in one
            line naming the command that fetches it.
    """
    from transformers import AutoTokenizer, BertTokenizerFast

    if name == TINY:
        return BertTokenizerFast(
            tiny_vocab_path(), do_lower_case=True
        )  # vocab_file (4.x) / vocab (5.x)
    try:
        return AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise ConfigValueError(
            f"tokenizer {name!r} is not cached under {cache_dir or 'the Hugging Face cache'} and "
            f"cannot be downloaded here ({type(e).__name__}); fetch it with `python "
            f"scripts/download_weights.py --hf {name}` or point model.tokenizer at a local folder."
        ) from e


def vocab_size(name: str, cache_dir: str | None = None) -> int:
    """Entries of the tokenizer's vocabulary (the embedding rows a model needs)."""
    return len(load_tokenizer(name, cache_dir))
