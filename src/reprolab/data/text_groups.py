"""Text group-robustness data: CivilComments, MultiNLI and a synthetic text task, as token ids.

Spec robustness_ood_prompting.md §1.5 (SubpopBench's text benchmarks, SCER), §1.3 (text rows:
batch 32, lengths 220 / 128) and §2.4 (ASGDRO / SIL's WILDS CivilComments). A text backbone
(`model=tiny_bert`, `model=bert_base`) publishes `preprocess = TokenInput(tokenizer, max_length)`
(`reprolab.data.tokens`); this data module tokenises the raw text with exactly that tokenizer at
`setup`, so any tokenizer works, and publishes an `ImageClassificationInfo` (class names, one
template, the `test` set, `num_groups`). Batches are

- `image`: LongTensor (B, L, 3): input_ids, attention_mask, token_type_ids stacked on the last
  axis (SubpopBench's layout; every classification method reads its inputs from `image`);
- `label`: y (B,) long; `group`: y * |A| + a (B,) long; `index`: row within its split (B,) long.

| data config | rows | y / a | groups | train / val / test | L |
|---|---|---|---|---|---|
| civilcomments | WILDS v1.0 comments | toxic / mentions one of 8 identities | 4 | 269,038 / 45,180 / 133,782 | 220 |
| multinli | premise + hypothesis pairs | contradiction, entailment, neutral / negation word in the hypothesis | 6 | 206,175 / 82,462 / 123,712 | 128 |
| group_text_synth | generated sentences | sentiment word / topic word (cat, dog) | 4 | 2,000 / 500 / 1,000 | 16 |

The real datasets' files, split rules, upstream sources and DEVIATIONs (CivilComments' coarse
evaluation groups, MultiNLI read as text instead of upstream's pre-tokenised features) are in
`reprolab.data.datasets.text_groups`; `python scripts/prepare_data.py civilcomments | multinli`
prepares them.

Sequence length: `L = data.max_length` when the data config sets it (SubpopBench's protocol:
220 for CivilComments, 128 for MultiNLI), else the model's `TokenInput.max_length`. The model's
value is an upper bound (its position embeddings): a data length above it fails at build time, in
one line. Truncation is the tokenizer's `longest_first` (pairs lose tokens from the longer side,
upstream's `_truncate_seq_pair`); padding is `max_length` on the right.

Token cache: tokenising CivilComments (448k comments) takes about a minute on a CPU (progress is
logged), so the token ids of a file-backed dataset are saved once (by `prepare_data`, once per
node, or by `setup`) to `<root>/<folder>/tokens/<dataset>[-<kwargs hash>]-<tokenizer>-L<L>.pt`
(ids int16 where the vocabulary fits, plus per row its length and where its second segment
starts: the mask and token types follow from them) and reused while its key holds: the dataset and its
arguments, the size and mtime of every source file, the tokenizer's name and content (a hash of its
serialised vocabulary and normaliser), L and a format version. Anything else re-tokenises and
overwrites the file; `token_cache: false` never reads or writes it. A warm start reads no text.

`group_text_synth`, the offline Waterbirds-like text task (CPU tests, miniatures), every word in the
embedded tiny vocabulary (`data/assets/tiny_bert/vocab.txt`). One row:

    "<opener> <topic> <is|was> [adverb] <core> [tail] ."   or   "<opener> [adverb] <core> <topic> [tail] ."

- y (class negative 0 / positive 1): the core word, from {bad, worst, worse, stupid, dumb} for y 0
  and {good, great, nice, best, smart} for y 1;
- a (the spurious attribute): the topic word, cat (a 0) or dog (a 1), with P(a = y) = `train_corr`
  (0.95) in train and `eval_corr` (0.5) in val and test; g = 2y + a; group sizes exact
  (`vector_groups.group_counts`): each minority group holds 2.5 % of train;
- `core_neutral` (0.3) of the rows of every group get a neutral core word {big, small, old, new,
  young} instead, and `core_flip` (0.0) the other class's word (label noise); the rest (opener, verb,
  adverb, tail, template) is uniform filler.

# DEVIATION: as in `vector_groups` (noisy core), the core must not decide the label on its own, or
# the training Bayes classifier would ignore the topic and ERM would not be hurt. On a neutral row
# the training distribution's best guess is the topic (P(y = a) = 0.95), so ERM classifies those
# rows of the minority groups wrong (worst-group accuracy about 1 - core_neutral), while a
# group-balanced learner is at chance on them (about 1 - core_neutral / 2). Measured once with a
# bag-of-words logistic regression on the tiny tokenizer's ids (full batch, Adam 0.05, 300 steps,
# data seeds 0-2): test worst-group accuracy ERM ~70 %, group-balanced loss weights ~79 % (average
# accuracy ~85 % for both). With model=tiny_bert through train.py (15 epochs, Adam 1e-3, seed 1):
# ERM 70.0 %, GroupDRO (eta 0.01) 72.0 %, ERM with sampler=group_balanced 78.0 %.

Every split of `group_text_synth` is a function of (`data_seed`, its size and parameters) only:
`numpy.random.default_rng([data_seed, k])`, k = 0, 1, 2 for train, val, test; the run seed changes
the model and the batch order (`shuffle_seed`), not the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reprolab.data.datamodule import check_sampler, report_missing_groups
from reprolab.data.datasets.text_groups import (
    SPLITS,
    TextGroupSpec,
    TextSplit,
    TokenSplit,
    compact_id_dtype,
    stacked_inputs,
)
from reprolab.data.info import ImageClassificationInfo, TestSet
from reprolab.data.spec import available, get_spec
from reprolab.data.tabular import Rows, RowsDataModule
from reprolab.data.tokens import TokenInput, load_tokenizer
from reprolab.data.vector_groups import group_counts
from reprolab.errors import ConfigValueError
from reprolab.utils.naming import unknown_name

log = logging.getLogger(__name__)

CACHE_VERSION = 1
TOKENIZE_CHUNK = 8192  # rows per tokenizer call (progress is logged per chunk)

# ------------------------------------------------------------------------------------------------
# group_text_synth

SYNTH_CORE = (
    ("bad", "worst", "worse", "stupid", "dumb"),  # y = 0, negative
    ("good", "great", "nice", "best", "smart"),  # y = 1, positive
)
SYNTH_NEUTRAL = ("big", "small", "old", "new", "young")
SYNTH_TOPICS = ("cat", "dog")  # a = 0, 1
SYNTH_OPENERS = ("the", "this", "that", "my", "our", "your")
SYNTH_VERBS = ("is", "was")
SYNTH_ADVERBS = ("", "very", "so", "too", "always", "sometimes")
SYNTH_TAILS = ("", "at night", "at home", "this week", "last year", "in the morning", "every day")
CORE_CLEAN, CORE_NEUTRAL, CORE_FLIPPED = 0, 1, 2


@dataclass
class TextGroupData:
    """A generated text group dataset: raw splits and what the task info needs."""

    splits: dict[str, TextSplit]
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    attr_names: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    core: dict[str, np.ndarray] = field(default_factory=dict)  # split -> CORE_* per row

    @property
    def num_attrs(self) -> int:
        return len(self.attr_names)


def synth_text_split(
    n: int,
    spurious_corr: float,
    rng: np.random.Generator,
    core_neutral: float = 0.3,
    core_flip: float = 0.0,
) -> dict[str, Any]:
    """One split of `group_text_synth` (module docstring).

    Returns `text` (n strings), `y`, `a`, `g` and `core` (CORE_CLEAN / CORE_NEUTRAL / CORE_FLIPPED)
    (n,) int64, rows in random order. Group sizes are `group_counts(n, spurious_corr)`, and within
    each group exactly round(core_neutral * n_g) rows are neutral, round(core_flip * n_g) flipped.
    """
    g_parts, c_parts = [], []
    for g, n_g in enumerate(group_counts(n, spurious_corr)):
        n_neutral = int(round(core_neutral * n_g))
        n_flip = min(int(round(core_flip * n_g)), n_g - n_neutral)
        kinds = [CORE_NEUTRAL] * n_neutral + [CORE_FLIPPED] * n_flip
        c_parts.append(np.array(kinds + [CORE_CLEAN] * (n_g - len(kinds)), np.int64))
        g_parts.append(np.full(n_g, g, np.int64))
    order = rng.permutation(n)
    g, core = np.concatenate(g_parts)[order], np.concatenate(c_parts)[order]
    y, a = g // 2, g % 2

    def pick(options: Sequence[str], size: int) -> list[str]:
        return [options[i] for i in rng.integers(0, len(options), size)]

    core_words = []
    for k in range(n):
        pool = {CORE_CLEAN: SYNTH_CORE[y[k]], CORE_FLIPPED: SYNTH_CORE[1 - y[k]]}
        core_words.append(pool.get(int(core[k]), SYNTH_NEUTRAL))
    draws = rng.integers(0, 1 << 30, n)
    core_pick = [w[int(i) % len(w)] for w, i in zip(core_words, draws, strict=True)]
    openers, verbs = pick(SYNTH_OPENERS, n), pick(SYNTH_VERBS, n)
    adverbs, tails = pick(SYNTH_ADVERBS, n), pick(SYNTH_TAILS, n)
    template = rng.integers(0, 2, n)
    text = []
    for k in range(n):
        topic = SYNTH_TOPICS[a[k]]
        if template[k] == 0:
            words = [openers[k], topic, verbs[k], adverbs[k], core_pick[k], tails[k]]
        else:
            words = [openers[k], adverbs[k], core_pick[k], topic, tails[k]]
        text.append(" ".join(w for w in words if w) + " .")
    return {"text": text, "y": y, "a": a, "g": g, "core": core}


def load_group_text_synth(
    n_train: int = 2000,
    n_val: int = 500,
    n_test: int = 1000,
    train_corr: float = 0.95,
    eval_corr: float = 0.5,
    core_neutral: float = 0.3,
    core_flip: float = 0.0,
    data_seed: int = 0,
) -> TextGroupData:
    """The synthetic Waterbirds-like text splits (module docstring)."""
    for key, v in (("core_neutral", core_neutral), ("core_flip", core_flip)):
        if not 0.0 <= float(v) <= 1.0:
            raise ConfigValueError(f"group_text_synth: {key} must be in [0, 1], got {v}.")
    if float(core_neutral) + float(core_flip) > 1.0:
        raise ConfigValueError(
            f"group_text_synth: core_neutral + core_flip must be <= 1, got {core_neutral} + "
            f"{core_flip}."
        )
    for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if int(n) < 1:
            raise ConfigValueError(f"group_text_synth: {key} must be >= 1, got {n}.")
    plan = (("train", n_train, train_corr), ("val", n_val, eval_corr), ("test", n_test, eval_corr))
    splits, core = {}, {}
    for k, (name, n, p) in enumerate(plan):
        rng = np.random.default_rng([int(data_seed), k])
        s = synth_text_split(int(n), float(p), rng, float(core_neutral), float(core_flip))
        splits[name] = TextSplit(text_a=s["text"], y=s["y"], a=s["a"])
        core[name] = s["core"]
    params = dict(
        train_corr=train_corr,
        eval_corr=eval_corr,
        core_neutral=core_neutral,
        core_flip=core_flip,
        data_seed=data_seed,
    )
    return TextGroupData(
        splits=splits,
        classnames=("negative", "positive"),
        templates=("a {} sentence.",),
        attr_names=SYNTH_TOPICS,
        params=params,
        core=core,
    )


SYNTH_DATASETS: dict[str, Callable[..., TextGroupData]] = {
    "group_text_synth": load_group_text_synth,
}


# ------------------------------------------------------------------------------------------------
# Tokenisation and its cache


def tokenize_split(tokenizer: Any, split: TextSplit, max_length: int, desc: str = "") -> TokenSplit:
    """Tokenise one split (pairs when `text_b` is set), truncated and right-padded to `max_length`.

    The result holds what `padding='max_length', truncation=True` gives, compactly (`TokenSplit`).
    """
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ConfigValueError(
            f"{desc or 'text data'}: tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no "
            "padding token; use a BERT-style tokenizer (model=tiny_bert or model=bert_base)."
        )
    n, seq = len(split), int(max_length)
    np_dtype = np.int16 if compact_id_dtype(len(tokenizer)) == torch.int16 else np.int32
    ids = np.full((n, seq), pad, np_dtype)
    n_tok = np.zeros(n, np.int16)
    first_b = np.full(n, seq, np.int16)
    t0 = time.perf_counter()
    for s in range(0, n, TOKENIZE_CHUNK):
        e = min(n, s + TOKENIZE_CHUNK)
        enc = tokenizer(
            text=split.text_a[s:e],
            text_pair=None if split.text_b is None else split.text_b[s:e],
            truncation=True,
            max_length=seq,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=True,
        )
        for j, row in enumerate(enc["input_ids"]):
            ids[s + j, : len(row)] = row
            n_tok[s + j] = len(row)
        types = enc.get("token_type_ids")
        if split.text_b is not None and types is not None:
            for j, tt in enumerate(types):
                if 1 in tt:
                    first_b[s + j] = tt.index(1)
        if n > TOKENIZE_CHUNK:
            log.info(
                "%s: tokenised %s / %s rows (%.0f s)",
                desc,
                f"{e:,}",
                f"{n:,}",
                time.perf_counter() - t0,
            )
    return TokenSplit(
        ids=torch.from_numpy(ids),
        n_tokens=torch.from_numpy(n_tok),
        first_b=torch.from_numpy(first_b),
        y=torch.as_tensor(np.asarray(split.y, np.int64)),
        a=torch.as_tensor(np.asarray(split.a, np.int64)),
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the token ids: the serialised vocabulary, normaliser and
    pre-tokeniser (a fast tokenizer's JSON without its call-time truncation / padding state)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        payload = json.dumps(spec, sort_keys=True)
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items())) + type(tokenizer).__name__
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _slug(name: str) -> str:
    """A file-name-safe form of a tokenizer name / path (a hash keeps distinct names apart)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-40:] or "tok"
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def read_token_cache(path: Path, key: dict[str, Any]) -> dict[str, TokenSplit] | None:
    """The cached splits when `path` exists and was written for `key`, else None."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
        log.warning("token cache %s is unreadable (%s); tokenising again", path, err)
        return None
    if not isinstance(blob, dict) or blob.get("key") != key:
        log.info("token cache %s was made for other data or another tokenizer; rebuilding", path)
        return None
    return {s: TokenSplit(**t) for s, t in blob["splits"].items()}


def write_token_cache(path: Path, key: dict[str, Any], splits: dict[str, TokenSplit]) -> bool:
    """Save the splits atomically; a read-only data dir only logs a warning."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: ranks may race
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "splits": {s: t.as_dict() for s, t in splits.items()}}, tmp)
        tmp.replace(path)
    except OSError as err:
        log.warning("could not write the token cache %s (%s); continuing without it", path, err)
        tmp.unlink(missing_ok=True)
        return False
    return True


class TokenRows(Rows):
    """A tokenised split in memory; an item (a list of row indices) is a whole batch with
    `image` (B, L, 3) long built from the compact ids."""

    def __getitem__(self, idx: list[int]) -> dict[str, Tensor]:
        i = torch.as_tensor(idx)
        t = self.tensors
        return {
            "image": stacked_inputs(t["ids"][i], t["n_tokens"][i], t["first_b"][i]),  # (B, L, 3)
            "label": t["label"][i],
            "group": t["group"][i],
            "index": t["index"][i],
        }


def text_datasets() -> list[str]:
    """Names `TextGroupDataModule` serves: the generated ones and the registered text specs."""
    names = list(SYNTH_DATASETS)
    for n in available():
        try:
            if isinstance(get_spec(n), TextGroupSpec):
                names.append(n)
        except Exception:  # noqa: BLE001 - a spec that cannot be built is not offered
            continue
    return names


# ------------------------------------------------------------------------------------------------
# The data module


class TextGroupDataModule(RowsDataModule):
    """Train / val / test splits of a text group dataset as token ids; publishes an
    `ImageClassificationInfo` (class names, templates, the `test` set, `num_groups`).

    The method's `preprocess` requirement must be a `TokenInput` (a text model: `model=tiny_bert`,
    `model=bert_base`); an image or vector model fails at build time, in one line. A missing
    dataset fails at construction, naming `python scripts/prepare_data.py <name>`.

    Args:
        name: data config name.
        dataset: `civilcomments`, `multinli` (files under `root`) or `group_text_synth`.
        root: data root (`paths.data_dir`); unused by the generated datasets.
        dataset_kwargs: the dataset's own arguments (`granularity` for CivilComments, `text_source`
            for MultiNLI, sizes / correlations / `data_seed` for `group_text_synth`).
        max_length: tokens per example (the protocol's: 220 CivilComments, 128 MultiNLI), or null
            for the model's `TokenInput.max_length`; never above the model's.
        token_cache: keep the token ids of a file-backed dataset under `<root>/<folder>/tokens/`.
        batch_size: training batch size (the last incomplete batch is dropped with `drop_last`).
        eval_batch_size: val / test batch size.
        shuffle_seed: seed of the per-epoch training order (`${seed}`).
        sampler: null (a permutation per epoch), `group_balanced` (rows drawn with replacement,
            weight 1 / size of their group: group_DRO's `--reweight_groups`, SubpopBench's
            ReSample) or `class_balanced` (the same with classes).
        val: serve the validation split (`val/*` metrics, model selection).
        test_sets: test splits to evaluate (only `test`).
        num_workers: DataLoader workers (0: the token ids are in memory).
        drop_last: drop the last incomplete training batch.
    """

    accepts = ("preprocess",)

    def __init__(
        self,
        name: str,
        dataset: str,
        root: str | None = None,
        dataset_kwargs: dict[str, Any] | None = None,
        max_length: int | None = None,
        token_cache: bool = True,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        shuffle_seed: int = 1,
        sampler: str | None = None,
        val: bool = True,
        test_sets: Sequence[str] | None = None,
        num_workers: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        check_sampler(name, sampler)
        if max_length is not None and int(max_length) < 4:
            raise ConfigValueError(f"data={name}: max_length must be >= 4, got {max_length}.")
        self.name = name
        self.dataset = dataset
        self.root = Path(root) if root else Path("data")
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.data: TextGroupData | None = None
        self.spec: TextGroupSpec | None = None
        if dataset in SYNTH_DATASETS:
            self.data = SYNTH_DATASETS[dataset](**self.dataset_kwargs)
        else:
            try:
                spec = get_spec(dataset, **self.dataset_kwargs)
            except KeyError:
                spec = None
            if not isinstance(spec, TextGroupSpec):
                raise ConfigValueError(
                    f"data={name}: " + unknown_name("text dataset", dataset, text_datasets())
                )
            self.spec = spec
            self.spec.check(self.root)  # a missing dataset fails before any model is built
        self.test_sets = list(test_sets or ["test"])
        for t in self.test_sets:
            if t != "test":
                raise ConfigValueError(f"data={name}: " + unknown_name("test set", t, ["test"]))
        self.max_length = None if max_length is None else int(max_length)
        self.token_cache = bool(token_cache)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.shuffle_seed = int(shuffle_seed)
        self.sampler = sampler
        self.use_val = bool(val)
        self.num_workers = int(num_workers)
        self.drop_last = bool(drop_last)
        self.preprocess: TokenInput | None = None
        self.seq_len: int | None = None
        self.cache_path: Path | None = None  # the token cache this setup used (file-backed data)
        self.cache_hit = False
        self.missing_groups: dict[str, list[int]] = {}  # split -> groups absent from it (setup)
        self._splits: dict[str, TokenRows] = {}
        self._prepared: dict[str, TokenSplit] | None = None  # prepare_data's tokens, for setup

    # ---- task description

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(self.spec.classnames) if self.spec else self.data.classnames

    @property
    def templates(self) -> tuple[str, ...]:
        return tuple(self.spec.templates) if self.spec else self.data.templates

    @property
    def num_attrs(self) -> int:
        return self.spec.num_attrs if self.spec else self.data.num_attrs

    @property
    def num_groups(self) -> int:
        return len(self.classnames) * self.num_attrs

    @property
    def info(self) -> ImageClassificationInfo:
        return ImageClassificationInfo(
            name=self.name,
            classnames=self.classnames,
            templates=self.templates,
            test_sets=tuple(TestSet(t, "id") for t in self.test_sets),
            num_groups=self.num_groups,
        )

    # ---- requirements

    def set_preprocess(self, preprocess: Any) -> None:
        if not isinstance(preprocess, TokenInput):
            raise ConfigValueError(
                f"data={self.name} serves token ids (text), but the model asks for "
                f"{type(preprocess).__name__} inputs; use a text model (model=tiny_bert or "
                "model=bert_base)."
            )
        seq = self.max_length or int(preprocess.max_length)
        if seq > int(preprocess.max_length):
            raise ConfigValueError(
                f"data={self.name} uses {seq} tokens per example (data.max_length), more than the "
                f"model takes ({preprocess.max_length}); set data.max_length<={preprocess.max_length} "
                "or a model with longer inputs."
            )
        if self.spec is not None:
            self.spec.check_tokenizer(self.root, preprocess.tokenizer, seq)
        self.preprocess = preprocess
        self.seq_len = seq
        self._splits.clear()
        self._prepared = None

    # ---- splits

    def _cache_key(self, source: str, fingerprint: str | None) -> dict[str, Any]:
        assert self.spec is not None and self.preprocess is not None
        ddir = self.spec.dataset_dir(self.root)
        files = []
        for p in self.spec.source_files(self.root):
            st = p.stat()
            files.append([str(p.relative_to(ddir)), int(st.st_size), int(st.st_mtime_ns)])
        return {
            "version": CACHE_VERSION,
            "dataset": self.spec.name,
            "kwargs": json.loads(json.dumps(self.dataset_kwargs, sort_keys=True, default=str)),
            "source": source,
            "files": files,
            "tokenizer": self.preprocess.tokenizer,
            "tokenizer_sha": fingerprint,
            "max_length": self.seq_len,
        }

    def _cache_file(self) -> Path:
        assert self.spec is not None and self.preprocess is not None
        kw = json.dumps(self.dataset_kwargs, sort_keys=True, default=str)
        tag = self.spec.name + (
            f"-{hashlib.sha1(kw.encode()).hexdigest()[:8]}" if self.dataset_kwargs else ""
        )
        return (
            self.spec.cache_dir(self.root)
            / f"{tag}-{_slug(self.preprocess.tokenizer)}-L{self.seq_len}.pt"
        )

    def _tokens(self) -> dict[str, TokenSplit]:
        """Every split's token ids: generated and tokenised, read from the cache, or tokenised and
        cached."""
        p = self.preprocess
        assert p is not None and self.seq_len is not None
        if self.data is not None:
            tok = load_tokenizer(p.tokenizer, p.cache_dir)
            return {
                s: tokenize_split(tok, t, self.seq_len, f"{self.name}/{s}")
                for s, t in self.data.splits.items()
            }
        spec = self.spec
        assert spec is not None
        pretok = spec.uses_pretokenized(self.root)
        tok = None if pretok else load_tokenizer(p.tokenizer, p.cache_dir)
        key = self._cache_key(
            "features" if pretok else "text", None if pretok else tokenizer_fingerprint(tok)
        )
        self.cache_path = self._cache_file() if self.token_cache else None
        self.cache_hit = False
        if self.cache_path is not None:
            cached = read_token_cache(self.cache_path, key)
            if cached is not None:
                self.cache_hit = True
                log.info("%s: token ids from the cache %s", self.name, self.cache_path)
                return cached
        t0 = time.perf_counter()
        if pretok:
            out = spec.pretokenized(self.root, p.tokenizer, self.seq_len)
        else:
            texts = spec.texts(self.root)
            out = {
                s: tokenize_split(tok, texts[s], self.seq_len, f"{self.name}/{s}") for s in SPLITS
            }
        log.info(
            "%s: tokenised %s rows with %s at %d tokens in %.0f s",
            self.name,
            f"{sum(len(t) for t in out.values()):,}",
            p.tokenizer,
            self.seq_len,
            time.perf_counter() - t0,
        )
        if self.cache_path is not None and write_token_cache(self.cache_path, key, out):
            log.info("%s: token ids cached in %s", self.name, self.cache_path)
        return out

    def prepare_data(self) -> None:
        """Lightning runs this on one process per node before `setup`: a file-backed dataset is
        tokenised (and cached) there once, and the other processes read the cache."""
        if self.spec is not None and self.token_cache and self.preprocess is not None:
            if not self._splits and self._prepared is None:
                self._prepared = self._tokens()

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        if self.preprocess is None:
            raise RuntimeError(
                f"data={self.name}: configure(preprocess=...) must run before the loaders are used."
            )
        tokens, self._prepared = self._prepared or self._tokens(), None
        for split in ["train", *(["val"] if self.use_val else []), *self.test_sets]:
            t = tokens[split]
            self._splits[split] = TokenRows(
                {
                    "ids": t.ids,
                    "n_tokens": t.n_tokens,
                    "first_b": t.first_b,
                    "label": t.y.long(),
                    "group": (t.y * self.num_attrs + t.a).long(),
                    "index": torch.arange(len(t)),
                }
            )
        self._check_groups()
        log.info(
            "%s: %d tokens per example, %d groups, split sizes %s",
            self.name,
            self.seq_len,
            self.num_groups,
            {k: len(v) for k, v in self._splits.items()},
        )

    def _check_groups(self) -> None:
        """Log, and record in `missing_groups`, each split that lacks some of the data's groups."""
        self.missing_groups = {}
        for split, ds in self._splits.items():
            present = torch.unique(ds.tensors["group"]).tolist()
            missing = report_missing_groups(
                self.name, split, present, self.num_groups, self.num_attrs
            )
            if missing:
                self.missing_groups[split] = missing

    def train_group_counts(self) -> Tensor:
        """Rows per group in the train split (float64, (G,)); GroupDRO's adjustment, ReWeight."""
        self.setup()
        g = self._splits["train"].tensors["group"]
        return torch.bincount(g, minlength=self.num_groups).double()
