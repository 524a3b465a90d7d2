"""Token streams for language-model baselines: CPython's pydoc help topics, CLIP-BPE tokenised.

The corpus (`dataset=pydoc_topics`) is `pydoc_data.topics.topics`, the text behind `help("if")`,
`help("LOOPING")`, ...: a dict of help topics (79 on CPython 3.11, about 465K characters of English
documentation of the language) that ships with every CPython, so it exists offline on every
machine. Its content follows the interpreter's version: a table's numbers hold for the Python that
ran it (the numbers quoted here: CPython 3.11.7).

Split by document, never inside one, so held-out text is unseen: the topic names are sorted,
permuted with `numpy.random.default_rng(split_seed)` (split_seed 0), and the first 80% of the topics
(rounded down) are train, the next 10% val, the rest test (63 / 7 / 9 topics on 3.11; 91,807 /
7,367 / 8,190 targets, i.e. tokens plus one `<eos>` per topic). Each split is one stream: `<eos>`,
then every topic of the split in that permuted order, each followed by `<eos>` (the document
separator), so evaluation predicts every token of the split and one `<eos>` per document exactly
once, the first token of a document from the `<eos>` before it.

Tokeniser: open_clip's CLIP BPE (`open_clip.tokenizer.SimpleTokenizer`; Radford et al., ICML 2021),
which ships its merges with the package (no download). It lowercases and normalises whitespace.

DEVIATION (vocabulary): CLIP's 49,408 entries are far too many for a CPU model trained on 92K
tokens (at d_model 128 the embedding alone would hold 6.3M parameters, against 0.71M for the whole
network over the compacted vocabulary). The vocabulary is compacted to the BPE tokens seen at least
`min_count` times in the TRAIN split (ordered by BPE id) plus three specials: `<pad>` (0; fills the
last held-out window, never a target), `<unk>` (1) and `<eos>` (2). Every other token (train tokens
rarer than `min_count` included) maps to `<unk>`. With `min_count: 2` the model sees `<unk>` in
training (0.8% of the train targets), so held-out unknowns are predictable instead of
near-impossible; val / test tokens outside the vocabulary (2.5% / 5.6% of the targets with
split_seed 0) count as `<unk>`. Every model of a table shares the vocabulary, so their perplexities
compare with each other, not with numbers over CLIP's full vocabulary. The rate per split is logged
at setup and kept in `TokenDataModule.unk_rate`.

Batches are dicts: `tokens`, a LongTensor (B, seq_len + 1); position t predicts position t + 1.
- train: full windows of the train stream starting at `offset + i * seq_len`, for a per-epoch
  random `offset` in [0, seq_len), in a per-epoch random order; both drawn from (shuffle_seed,
  epoch) only, so a resumed run sees the order an uninterrupted one would. Neighbouring windows
  share one token (the last input of one is the first of the next), so every token between the
  first and the last window is a target once per epoch (fewer than 2 * seq_len at the ends are not,
  differently each epoch).
- val / test: the same windows from offset 0, in order, covering the whole split; the last window
  is padded with `<pad>` (a target equal to `pad_id` is not scored).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from reprolab.data.base import TaskDataModule
from reprolab.data.info import TestSet, TokenInfo
from reprolab.utils.naming import unknown_name

log = logging.getLogger(__name__)

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
SPECIALS: tuple[str, ...] = (PAD, UNK, EOS)  # ids 0, 1, 2 of every compacted vocabulary
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1)  # train, val; the rest is test


@lru_cache(maxsize=1)
def clip_tokenizer() -> Any:
    """open_clip's CLIP BPE tokenizer (built once per process: loading its merges takes seconds)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@lru_cache(maxsize=1)
def pydoc_topics() -> dict[str, tuple[int, ...]]:
    """Every pydoc help topic, CLIP-BPE tokenised: topic name -> BPE ids (no specials)."""
    from pydoc_data.topics import topics  # ships with CPython: no download

    tok = clip_tokenizer()
    return {k: tuple(tok.encode(topics[k])) for k in sorted(topics)}


def split_documents(
    names: Sequence[str], split_seed: int = 0, fractions: tuple[float, float] = SPLIT_FRACTIONS
) -> dict[str, list[str]]:
    """Document-level train / val / test split of `names`: a function of (the set of names, seed).

    Args:
        names: document names (order does not matter; they are sorted first).
        split_seed: seed of the `numpy.random.default_rng` permutation.
        fractions: train and val fractions of the documents (rounded down); the rest is test.
    """
    keys = sorted(names)
    order = np.random.default_rng(split_seed).permutation(len(keys))
    n_train = int(fractions[0] * len(keys))
    n_val = int(fractions[1] * len(keys))
    if n_train < 1 or n_val < 1 or len(keys) - n_train - n_val < 1:
        raise ValueError(f"{len(keys)} documents are too few for a {fractions} split.")
    parts = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    return {s: [keys[i] for i in idx] for s, idx in parts.items()}


class Vocabulary:
    """A compacted vocabulary: the specials, then the source ids kept, in ascending source id.

    Args:
        source_ids: ids of the source tokenizer to keep (those seen often enough in train).
        source_size: size of the source vocabulary (49,408 for CLIP's BPE).
    """

    def __init__(self, source_ids: Sequence[int], source_size: int) -> None:
        self.source_ids = np.asarray(sorted(set(int(i) for i in source_ids)), dtype=np.int64)
        self.pad_id, self.unk_id, self.eos_id = (SPECIALS.index(s) for s in (PAD, UNK, EOS))
        # A dense lookup table: mapping a stream is one indexing op, not a dict lookup per token.
        self.lookup = np.full(source_size, self.unk_id, dtype=np.int64)
        self.lookup[self.source_ids] = np.arange(len(SPECIALS), len(self))

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.source_ids)

    def encode(self, source: Sequence[int]) -> np.ndarray:
        """Source token ids -> compacted ids (unknown ones -> `unk_id`)."""
        return self.lookup[np.asarray(source, dtype=np.int64)]

    def to_source(self, ids: Sequence[int]) -> list[int | str]:
        """Compacted ids -> source ids, the specials as their names (for decoding)."""
        out: list[int | str] = []
        for i in ids:
            i = int(i)
            out.append(
                SPECIALS[i] if i < len(SPECIALS) else int(self.source_ids[i - len(SPECIALS)])
            )
        return out


def build_vocabulary(
    documents: Sequence[Sequence[int]], min_count: int, source_size: int
) -> Vocabulary:
    """The vocabulary of source tokens occurring at least `min_count` times in `documents`."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}.")
    counts = Counter(i for doc in documents for i in doc)
    return Vocabulary([i for i, c in counts.items() if c >= min_count], source_size)


def token_stream(documents: Sequence[Sequence[int]], vocab: Vocabulary) -> np.ndarray:
    """`<eos>`, then each document followed by `<eos>`, in compacted ids: (sum(len + 1) + 1,)."""
    parts = [np.asarray([vocab.eos_id], dtype=np.int64)]
    for doc in documents:
        parts += [vocab.encode(doc), np.asarray([vocab.eos_id], dtype=np.int64)]
    return np.concatenate(parts)


class _Chunks(Dataset):
    """Windows of `seq_len + 1` tokens of one stream; indexed with a list of window starts (one
    batch per item). Windows running past the end are padded with `pad_id`."""

    def __init__(self, stream: Tensor, seq_len: int, pad_id: int) -> None:
        self.stream = stream
        self.seq_len = seq_len
        self.padded = torch.cat([stream, torch.full((seq_len,), pad_id, dtype=stream.dtype)])

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, starts: list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(starts)[:, None] + torch.arange(self.seq_len + 1)  # (B, T + 1)
        return {"tokens": self.padded[idx]}


class _ChunkStarts(Sampler[list[int]]):
    """Batches of window starts over a stream of `n` tokens (`n - 1` targets).

    Training (`shuffle`): full windows from a per-epoch offset in [0, seq_len), in a per-epoch
    order, both from (seed, epoch) only (Lightning calls `set_epoch`); the last incomplete batch is
    dropped. Evaluation: windows from 0 in order until every target is covered, the last one padded.
    """

    def __init__(self, n: int, seq_len: int, batch_size: int, shuffle: bool, seed: int) -> None:
        self.n, self.seq_len, self.batch_size = n, seq_len, batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        if shuffle and self._num_windows(seq_len - 1) < batch_size:
            raise ValueError(
                f"a stream of {n} tokens holds fewer than batch_size={batch_size} training windows "
                f"of {seq_len + 1} tokens; lower batch_size or seq_len."
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_windows(self, offset: int) -> int:
        if self.shuffle:  # full windows only: [offset + i T, offset + i T + T] inside the stream
            return max(0, (self.n - 1 - offset) // self.seq_len)
        return -(-(self.n - 1) // self.seq_len)  # ceil: the last window may be padded

    def _starts(self) -> list[int]:
        if not self.shuffle:
            return [i * self.seq_len for i in range(self._num_windows(0))]
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        offset = int(torch.randint(self.seq_len, (1,), generator=g))
        k = self._num_windows(offset)
        return [offset + int(i) * self.seq_len for i in torch.randperm(k, generator=g)]

    def __len__(self) -> int:
        if self.shuffle:  # the smallest count over offsets, so the length is epoch-independent
            return self._num_windows(self.seq_len - 1) // self.batch_size
        return -(-self._num_windows(0) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        starts = self._starts()
        for b in range(len(self)):
            yield starts[b * self.batch_size : (b + 1) * self.batch_size]


CORPORA = {"pydoc_topics": pydoc_topics}


class TokenDataModule(TaskDataModule):
    """Train / val / test token streams of a document corpus; publishes `TokenInfo`.

    Args:
        name: data config name.
        dataset: corpus name (`pydoc_topics`).
        seq_len: tokens a model sees per window (windows are `seq_len + 1` long).
        min_count: train occurrences a BPE token needs to enter the vocabulary (else `<unk>`).
        split_seed: seed of the document-level split.
        batch_size: training windows per batch (the last incomplete batch is dropped).
        eval_batch_size: val / test windows per batch.
        shuffle_seed: seed of the per-epoch training offset and order.
        num_workers: DataLoader workers (0: the streams are held in memory).
    """

    def __init__(
        self,
        name: str,
        dataset: str = "pydoc_topics",
        seq_len: int = 64,
        min_count: int = 2,
        split_seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        shuffle_seed: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in CORPORA:
            raise ValueError(f"data={name}: " + unknown_name("text corpus", dataset, CORPORA))
        if seq_len < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError(
                f"data={name}: seq_len, batch_size and eval_batch_size must be >= 1 "
                f"(got {seq_len}, {batch_size}, {eval_batch_size})."
            )
        self.name = name
        self.dataset = dataset
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.shuffle_seed = int(shuffle_seed)
        self.num_workers = int(num_workers)
        docs = CORPORA[dataset]()
        self.documents = split_documents(list(docs), split_seed)
        self.vocab = build_vocabulary(
            [docs[k] for k in self.documents["train"]],
            min_count,
            len(clip_tokenizer().encoder),
        )
        self.streams = {
            s: torch.as_tensor(token_stream([docs[k] for k in ks], self.vocab))
            for s, ks in self.documents.items()
        }
        self.unk_rate = {s: self._unk_rate(s) for s in SPLITS}
        self._splits: dict[str, _Chunks] = {}

    @property
    def info(self) -> TokenInfo:
        return TokenInfo(
            name=self.name,
            vocab_size=len(self.vocab),
            seq_len=self.seq_len,
            tokenizer=(
                f"open_clip CLIP BPE, compacted to {len(self.vocab.source_ids)} train tokens "
                f"+ {len(SPECIALS)} specials"
            ),
            pad_id=self.vocab.pad_id,
            test_sets=(TestSet("test", "id"),),
        )

    def _unk_rate(self, split: str) -> float:
        """Fraction of the split's targets (its tokens and `<eos>`s) that are `<unk>`."""
        targets = self.streams[split][1:]
        return float((targets == self.vocab.unk_id).float().mean())

    def decode(self, ids: Sequence[int]) -> str:
        """Compacted ids -> text (specials kept as `<unk>`, `<eos>`; padding dropped)."""
        tok = clip_tokenizer()
        words, run = [], []
        for i in self.vocab.to_source([i for i in ids if int(i) != self.vocab.pad_id]):
            if isinstance(i, str):
                words += [tok.decode(run).strip(), i] if run else [i]
                run = []
            else:
                run.append(i)
        if run:
            words.append(tok.decode(run).strip())
        return " ".join(w for w in words if w)

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        for split in SPLITS:
            self._splits[split] = _Chunks(self.streams[split], self.seq_len, self.vocab.pad_id)
        log.info(
            "%s: vocabulary %d (CLIP BPE tokens seen in train + %s), tokens %s, unk rate %s",
            self.name,
            len(self.vocab),
            "/".join(SPECIALS),
            {s: len(t) - 1 for s, t in self.streams.items()},
            {s: round(r, 4) for s, r in self.unk_rate.items()},
        )

    def split_dataloader(self, split: str, train: bool = False) -> DataLoader:
        """Windows of one split: training windows (`train`) or evaluation windows covering it."""
        if split not in SPLITS:
            raise ValueError(f"data={self.name}: " + unknown_name("split", split, SPLITS))
        self.setup()
        ds = self._splits[split]
        starts = _ChunkStarts(
            len(ds),
            self.seq_len,
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.shuffle_seed,
        )
        return DataLoader(
            ds,
            sampler=starts,
            batch_size=None,  # the sampler yields whole batches of window starts
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.split_dataloader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.split_dataloader("val")

    def test_dataloader(self) -> list[DataLoader]:
        return [self.split_dataloader("test")]
