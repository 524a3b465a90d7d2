"""Text group-robustness datasets, read as raw text (spec robustness_ood_prompting.md §1.5, §2.4).

The SubpopBench / group_DRO text benchmarks, served by `reprolab.data.text_groups.TextGroupDataModule`,
which tokenises them with the model's own tokenizer (`reprolab.data.tokens.TokenInput`). Every row
has y, a and `group = y * |A| + a`.

| name | folder | files | y / a | |A| | train/val/test |
|---|---|---|---|---|---|
| civilcomments | civilcomments | all_data_with_identities.csv (or civilcomments_v1.0/...) | toxicity >= 0.5 / any of 8 identities >= 0.5 | 2 | 269,038/45,180/133,782 |
| civilcomments (granularity fine) | civilcomments | as above | toxic / which identity (one row per comment and identity) | 8 | ? |
| multinli | multinli | data/metadata_random.csv + glue_data/MNLI/{train,dev_matched,dev_mismatched}.tsv | contradiction, entailment, neutral / negation in the hypothesis | 2 | 206,175/82,462/123,712 |

CivilComments (WILDS v1.0, Borkan et al. 2019; SubpopBench `subpopbench/scripts/download.py`,
`generate_metadata_civilcomments`): y = [toxicity >= 0.5]; the identities are SubpopBench's (and
WILDS') eight columns male, female, LGBTQ, christian, muslim, other_religions, black, white, each
mentioned when its score is >= 0.5 (a missing score counts as 0). Splits: the file's own `split`
column (WILDS' official split). SubpopBench's tokenizer length is 220.

- `coarse` (default): every comment once, a = 1 when it mentions any of the eight identities.
  # DEVIATION (group numbering): SubpopBench's coarse train split uses a = "no active attributes",
  # i.e. 1 - ours; the four groups are the same sets, with a and 1 - a swapped in their index.
  # DEVIATION (evaluation groups): SubpopBench's coarse *val / test* splits are not the train
  # construction: they hold one row per (comment, identity mentioned), a = the identity's index
  # (16 groups: 8 identities x toxic), and drop comments that mention none. One run here has one
  # `num_groups` for every split, so coarse val / test keep the train construction (4 groups, every
  # comment once); SubpopBench's coarse evaluation groups are `granularity: fine`'s val / test.
  # For the same reason SubpopBench's derived files (metadata_civilcomments_coarse.csv,
  # civilcomments_coarse.csv) are not read: their val / test rows cannot give the 4-group splits,
  # and the WILDS file they are built from is what SubpopBench's download leaves in the folder.
- `fine` (SubpopBench's `CivilCommentsFine`): in every split one row per (comment, identity it
  mentions), a = the identity's index in the list above, comments without one dropped; per split
  the rows are ordered by identity, then by file order, as upstream's concatenation.

MultiNLI (Williams et al. 2018) with group_DRO's annotation (`kohpangwei/group_DRO`:
`dataset_scripts/generate_multinli.py`, `data/multinli_dataset.py`): y in (contradiction 0,
entailment 1, neutral 2), upstream's label order; a = the hypothesis (sentence2) contains one of the
words nobody, no, never, nothing (punctuation removed, lower-cased, split on spaces); group = 2y + a
(6 groups). Splits: `metadata_random.csv`, a random 50/20/30 % split of train + dev_matched +
dev_mismatched drawn before the 353 unlabelled ('-') pairs were dropped, hence 206,175 / 82,462 /
123,712 (the spec's "9830" test size is dev_mismatched's size, not this split's). SubpopBench's
`metadata_multinli.csv` (id, filename, split, y, a; filename = row position) is read where group_DRO's
file is absent: the same rows in the same order.

# DEVIATION (MultiNLI input): upstream never reads MultiNLI as text: it loads BERT features
# pre-tokenised for bert-base-uncased at 128 tokens (`glue_data/MNLI/cached_{train,dev}_bert-base-
# uncased_128_mnli[-mm]`, pickled `utils_glue.InputFeatures`), built from the GLUE MNLI files whose
# rows, in order, are the metadata's rows (group_DRO asserts the labels agree row by row). Here the
# text comes from those GLUE files (`text_source: glue`), so any tokenizer and length work; with
# bert-base-uncased at 128 tokens the ids can differ from upstream's only where today's fast
# tokenizer splits a word unlike the 2019 one.

Metadata row k is row k of train.tsv + dev_matched.tsv + dev_mismatched.tsv (header skipped, read
as upstream's `utils_glue` does: tab-separated, no quoting; premise = column sentence1, hypothesis =
sentence2), checked on load: the same number of rows, the same label on every row, and the negation
attribute recomputed from the hypothesis agreeing with the metadata on at least 99.9 % of the rows
(the metadata's flag is used). The tokenizer's pair truncation (`longest_first`, one token at a
time from the longer sentence) is upstream's `_truncate_seq_pair`. `text_source: features` serves
the pre-tokenised files instead (only for `bert-base-uncased` at 128 tokens; anything else fails in
one line); `auto` (default) uses the GLUE files when present, else the features.

Preparation (`python scripts/prepare_data.py civilcomments | multinli`): CivilComments downloads the
WILDS v1.0 archive (CodaLab bundle 0x8cd3de06..., the URL WILDS and SubpopBench use) and extracts
all_data_with_identities.csv. MultiNLI downloads group_DRO's metadata_random.csv (the file SubpopBench
fetches) and the GLUE MNLI archive (MNLI.zip, from GLUE's download script) into glue_data/; with
`text_source: features`, group_DRO's multinli_bert_features.tar.gz instead of the GLUE archive.
"""

from __future__ import annotations

import csv
import logging
import pickle
import shutil
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reprolab.data.datasets._common import LocalSpec, Step
from reprolab.data.sources import CountMismatchError, Item, check_counts
from reprolab.data.spec import (
    DataNotFoundError,
    ImageSplit,
    malformed,
    regenerate_fix,
    register,
)
from reprolab.errors import ConfigValueError
from reprolab.utils.naming import unknown_name

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

CIVIL_URL = (
    "https://worksheets.codalab.org/rest/bundles/0x8cd3de0634154aeaad2ee6eb96723c6e/contents/blob/"
)
CIVIL_CSV = "all_data_with_identities.csv"
CIVIL_LAYOUTS = (CIVIL_CSV, f"civilcomments_v1.0/{CIVIL_CSV}")  # SubpopBench's, WILDS' folder
CIVIL_IDENTITIES = (
    "male",
    "female",
    "LGBTQ",
    "christian",
    "muslim",
    "other_religions",
    "black",
    "white",
)
CIVIL_GRANULARITIES = ("coarse", "fine")
CIVIL_MAX_LENGTH = 220  # SubpopBench `CivilComments.transform`

MNLI_LABELS = ("contradiction", "entailment", "neutral")  # group_DRO label_dict, utils_glue order
NEGATION_WORDS = frozenset(("nobody", "no", "never", "nothing"))
MNLI_METADATA_URL = (
    "https://raw.githubusercontent.com/kohpangwei/group_DRO/master/dataset_metadata/multinli/"
    "metadata_random.csv"
)
MNLI_FEATURES_URL = "https://nlp.stanford.edu/data/dro/multinli_bert_features.tar.gz"
GLUE_MNLI_URL = "https://dl.fbaipublicfiles.com/glue/data/MNLI.zip"
MNLI_METADATA = ("data/metadata_random.csv", "metadata_multinli.csv")  # group_DRO, SubpopBench
GLUE_DIR = "glue_data/MNLI"
GLUE_FILES = ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv")
FEATURE_FILES = (
    "cached_train_bert-base-uncased_128_mnli",
    "cached_dev_bert-base-uncased_128_mnli",
    "cached_dev_bert-base-uncased_128_mnli-mm",
)
FEATURES_TOKENIZER = "bert-base-uncased"
MNLI_MAX_LENGTH = 128  # group_DRO / SubpopBench features
MNLI_SOURCES = ("auto", "glue", "features")
NEGATION_AGREEMENT = 0.999  # recomputed vs metadata negation flags, GLUE rows (alignment check)


@dataclass
class TextSplit:
    """Raw text of one split: `text_a` (and `text_b`, the second sentence of a pair), y and a."""

    text_a: list[str]
    y: np.ndarray  # (N,) int64
    a: np.ndarray  # (N,) int64
    text_b: list[str] | None = None

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class TokenSplit:
    """One tokenised split, stored compactly: right-padded ids, the real length and where the
    second segment starts (the attention mask and token type ids follow from them)."""

    ids: Tensor  # (N, L) int16 / int32
    n_tokens: Tensor  # (N,) tokens before the padding ([CLS] and [SEP]s included)
    first_b: Tensor  # (N,) first position of segment B (L: a single sentence)
    y: Tensor  # (N,) int64
    a: Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def as_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in ("ids", "n_tokens", "first_b", "y", "a")}


def stacked_inputs(ids: Tensor, n_tokens: Tensor, first_b: Tensor) -> Tensor:
    """(B, L, 3) long: input_ids, attention_mask, token_type_ids (SubpopBench's layout)."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    mask = pos < n_tokens.long()[:, None]  # (B, L)
    types = (pos >= first_b.long()[:, None]) & mask
    return torch.stack((ids.long(), mask.long(), types.long()), dim=2)


def compact_id_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= torch.iinfo(torch.int16).max + 1 else torch.int32


# ------------------------------------------------------------------------------------------------
# The spec: a LocalSpec whose items are text rows


@dataclass
class TextGroupSpec(LocalSpec):
    """A text group dataset stored under `<root>/<folder>`; `texts(root)` gives its raw splits.

    The `LocalSpec` machinery (required files, `verify` on split sizes and classes, `prepare` with
    automatic steps and manual text, the `--list` row) is reused; items are rows, not images, so
    `load` (an `ImageSplit`) is refused in one line.
    """

    num_attrs: int = 2
    attr_names: list[str] = field(default_factory=list)
    max_length: int = 128  # the protocol's tokens per example (upstream's)

    # ---- files

    def source_files(self, root: Path) -> list[Path]:
        """The files the rows are read from (their size and mtime key the token cache)."""
        return self.required(root)

    def read_text(self, root: Path) -> dict[str, TextSplit]:
        raise NotImplementedError

    def texts(self, root: Path | str) -> dict[str, TextSplit]:
        """Every split's raw text, read once per root."""
        root = Path(root)
        self.check(root)
        key = f"text:{root.resolve()}"
        if key not in self._cache:
            self._cache[key] = self.read_text(root)
        return self._cache[key]

    def labels_and_attrs(self, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(y, a) per split; by default from the text (a spec may read them without the text)."""
        return {s: (t.y, t.a) for s, t in self.texts(root).items()}

    def pretokenized(self, root: Path, tokenizer: str, max_length: int) -> dict[str, TokenSplit]:
        """Token ids shipped with the data (none by default)."""
        raise NotImplementedError(f"{self.name}: no pre-tokenised files")

    def uses_pretokenized(self, root: Path) -> bool:
        """Whether the rows come as token ids (only a tokenizer they were made with can read them)."""
        return False

    def check_tokenizer(self, root: Path, tokenizer: str, max_length: int) -> None:
        """Raise ConfigValueError when the data cannot be served with this tokenizer / length."""

    # ---- LocalSpec contract

    def splits(self, root: Path) -> dict[str, list[Item]]:
        out: dict[str, list[Item]] = {}
        for s, (y, _) in self.labels_and_attrs(root).items():
            out[s] = [(f"{s}:{i}", int(v), self.classnames[int(v)]) for i, v in enumerate(y)]
        return out

    def groups(self, root: Path) -> dict[str, list[int]]:
        return {
            s: (y * self.num_attrs + a).tolist()
            for s, (y, a) in self.labels_and_attrs(root).items()
        }

    def load(self, root: Path | str, split: str) -> ImageSplit:
        raise ConfigValueError(
            f"{self.name} is a text dataset: it is served as token ids by "
            f"reprolab.data.text_groups.TextGroupDataModule (data={self.name}), not as images."
        )

    def verify(self, root: Path | str) -> dict[str, int]:
        """Check the prepared data: split sizes, labels in 0..C-1 with every class in train, and
        attributes in 0..|A|-1. Returns the sizes."""
        root = Path(root)
        rows = self.labels_and_attrs(root)
        found = {s: len(y) for s, (y, _) in rows.items()}
        check_counts(self.name, self.expected, found, what="rows")
        k = len(self.classnames)
        for s, (y, a) in rows.items():
            for what, v, hi in (("labels", y, k), ("attributes", a, self.num_attrs)):
                bad = sorted({int(x) for x in np.unique(v) if not 0 <= x < hi})
                if bad:
                    raise CountMismatchError(
                        f"{self.name}: split {s} has {what} {bad[:5]} outside 0..{hi - 1}"
                    )
        n_classes = len(np.unique(rows["train"][0]))
        if n_classes != k:
            raise CountMismatchError(
                f"{self.name}: wrong number of classes in train (expected {k}, found {n_classes})"
            )
        return found

    def cache_dir(self, root: Path | str) -> Path:
        """Where tokenised copies are kept (`TextGroupDataModule`'s token cache)."""
        return self.dataset_dir(root) / "tokens"


def _first_present(base: Path, candidates: tuple[str, ...]) -> Path | None:
    return next((base / c for c in candidates if (base / c).is_file()), None)


def _split_codes(values: np.ndarray, path: Path, fix: str) -> np.ndarray:
    """Split names or codes (train/val/test, 0/1/2) -> 0/1/2."""
    names = {"train": 0, "val": 1, "test": 2, "0": 0, "1": 1, "2": 2}
    out = np.empty(len(values), np.int64)
    for k, v in enumerate(values):
        code = names.get(str(v).strip().removesuffix(".0"))
        if code is None:
            raise malformed(path, f"row {k}: unknown split {v!r} (expected train/val/test)", fix)
        out[k] = code
    return out


# ------------------------------------------------------------------------------------------------
# CivilComments


@dataclass
class CivilCommentsSpec(TextGroupSpec):
    granularity: str = "coarse"

    def csv_path(self, root: Path) -> Path | None:
        return _first_present(self.dataset_dir(root), CIVIL_LAYOUTS)

    def required(self, root: Path) -> list[Path]:
        return [self.csv_path(root) or self.dataset_dir(root) / CIVIL_CSV]

    def check(self, root: Path | str) -> None:
        if self.csv_path(Path(root)) is None:
            d = self.dataset_dir(root)
            raise self.missing(Path(root), " or ".join(str(d / c) for c in CIVIL_LAYOUTS))

    def read_text(self, root: Path) -> dict[str, TextSplit]:
        import pandas as pd

        path = self.csv_path(root)
        assert path is not None  # check() ran
        fix = regenerate_fix(self.name)
        cols = ["comment_text", "split", "toxicity", *CIVIL_IDENTITIES]
        try:
            header = pd.read_csv(path, nrows=0).columns
        except (ValueError, pd.errors.ParserError) as err:
            raise malformed(path, f"is not a CSV file ({err})", fix) from None
        lacking = [c for c in cols if c not in header]
        if lacking:
            raise malformed(path, f"has no column(s) {lacking}", fix)
        log.info("%s: reading %s", self.name, path)
        df = pd.read_csv(path, usecols=cols, keep_default_na=False, na_values=[""], dtype=str)
        try:
            scores = df[["toxicity", *CIVIL_IDENTITIES]].astype(float).fillna(0.0).to_numpy()
        except ValueError as err:
            raise malformed(path, f"has a non-numeric score ({err})", fix) from None
        y = (scores[:, 0] >= 0.5).astype(np.int64)
        flags = scores[:, 1:] >= 0.5  # (N, 8)
        split = _split_codes(df["split"].to_numpy(), path, fix)
        text = df["comment_text"].fillna("").astype(str).to_numpy()
        out = {}
        for code, name in enumerate(SPLITS):
            rows = np.flatnonzero(split == code)
            if self.granularity == "coarse":
                idx, a = rows, flags[rows].any(axis=1).astype(np.int64)
            else:  # one row per (comment, identity), grouped by identity as SubpopBench
                per = [(rows[flags[rows, j]], j) for j in range(len(CIVIL_IDENTITIES))]
                idx = np.concatenate([r for r, _ in per])
                a = np.concatenate([np.full(len(r), j, np.int64) for r, j in per])
            out[name] = TextSplit(text_a=text[idx].tolist(), y=y[idx], a=a)
        return out

    def build(self, root: Path) -> None:
        """Move all_data_with_identities.csv to the folder's top when the archive nested it."""
        if self.csv_path(root) is not None:
            return
        found = sorted(self.dataset_dir(root).rglob(CIVIL_CSV))
        if not found:
            raise FileNotFoundError(f"{CIVIL_CSV} is not in the downloaded archive")
        shutil.move(str(found[0]), str(self.dataset_dir(root) / CIVIL_CSV))


@register("civilcomments")
def civilcomments(granularity: str = "coarse") -> CivilCommentsSpec:
    """CivilComments (WILDS v1.0): toxicity x identity mention, SubpopBench's coarse or fine groups."""
    if granularity not in CIVIL_GRANULARITIES:
        raise ConfigValueError(
            unknown_name("CivilComments granularity", granularity, CIVIL_GRANULARITIES)
        )
    fine = granularity == "fine"
    attrs = list(CIVIL_IDENTITIES) if fine else ["no identity", "identity"]
    return CivilCommentsSpec(
        name="civilcomments",
        classnames=["non-toxic", "toxic"],
        templates=["a {} comment."],
        source=f"CivilComments, WILDS v1.0 ({CIVIL_URL})",
        num_groups=2 * len(attrs),
        folder="civilcomments",
        expected={} if fine else {"train": 269038, "val": 45180, "test": 133782},
        disk="~0.5 GB",
        size_note="fine: one row per comment and identity" if fine else "",
        steps=[Step("url", CIVIL_URL, "civilcomments_v1.0.tar.gz", extract=True)],
        manual=f"""mkdir -p {{dir}}; download {CIVIL_URL} (a .tar.gz, the WILDS civilcomments_v1.0
archive) and extract it in {{dir}}, giving {{dir}}/{CIVIL_CSV} (or {{dir}}/{CIVIL_LAYOUTS[1]}).
A SubpopBench data root already has it (`python -m subpopbench.scripts.download`).""",
        num_attrs=len(attrs),
        attr_names=attrs,
        max_length=CIVIL_MAX_LENGTH,
        granularity=granularity,
    )


# ------------------------------------------------------------------------------------------------
# MultiNLI


def has_negation(sentence: str) -> bool:
    """group_DRO's attribute: a negation word among the punctuation-free, lower-cased, space-split
    words of the sentence."""
    words = sentence.translate(str.maketrans("", "", string.punctuation)).lower().split(" ")
    return not NEGATION_WORDS.isdisjoint(words)


def read_mnli_metadata(path: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, a, split code) per row of group_DRO's metadata_random.csv (index, gold_label,
    sentence2_has_negation, split) or SubpopBench's metadata_multinli.csv (id, filename, split, y, a;
    rows put in `filename` order)."""
    import pandas as pd

    fix = regenerate_fix(name)
    try:
        df = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as err:
        raise malformed(path, f"is not a CSV file ({err})", fix) from None
    if {"gold_label", "sentence2_has_negation", "split"} <= set(df.columns):
        y_col, a_col = "gold_label", "sentence2_has_negation"
    elif {"filename", "split", "y", "a"} <= set(df.columns):
        df = df.sort_values("filename", kind="stable")
        if not np.array_equal(df["filename"].to_numpy(), np.arange(len(df))):
            raise malformed(path, "column filename is not the row positions 0..N-1", fix)
        y_col, a_col = "y", "a"
    else:
        raise malformed(
            path,
            "has neither group_DRO's columns (gold_label, sentence2_has_negation, split) nor "
            "SubpopBench's (filename, split, y, a)",
            fix,
        )
    if len(df) == 0:
        raise malformed(path, "has no rows", fix)
    try:
        y = df[y_col].astype(np.int64).to_numpy()
        a = df[a_col].astype(np.int64).to_numpy()
    except (ValueError, TypeError) as err:
        raise malformed(path, f"has a non-integer label or attribute ({err})", fix) from None
    if y.min() < 0 or y.max() >= len(MNLI_LABELS):
        raise malformed(path, f"has labels outside 0..{len(MNLI_LABELS) - 1}", fix)
    return y, a, _split_codes(df["split"].to_numpy(), path, fix)


def read_glue_mnli(path: Path, name: str) -> tuple[list[str], list[str], list[int]]:
    """(premises, hypotheses, label indices) of a GLUE MNLI .tsv, read as upstream's utils_glue
    (tab-separated, no quote character, header skipped)."""
    fix = regenerate_fix(name)
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quotechar=None)
        header = next(reader, None)
        if header is None:
            raise malformed(path, "is empty", fix)
        try:
            i_a, i_b = header.index("sentence1"), header.index("sentence2")
        except ValueError:
            raise malformed(path, "has no sentence1 / sentence2 columns", fix) from None
        labels = {c: k for k, c in enumerate(MNLI_LABELS)}
        prem, hyp, ys = [], [], []
        for k, row in enumerate(reader, start=2):
            if len(row) <= max(i_a, i_b) or row[-1] not in labels:
                raise malformed(path, f"line {k}: not a labelled MNLI row", fix)
            prem.append(row[i_a])
            hyp.append(row[i_b])
            ys.append(labels[row[-1]])
    return prem, hyp, ys


class _InputFeatures:
    """Stands in for `utils_glue.InputFeatures` (input_ids, input_mask, segment_ids, label_id)."""


class _FeaturesUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name == "InputFeatures":  # whatever module upstream pickled it from
            return _InputFeatures
        return super().find_class(module, name)


class _FeaturesPickle:
    """A `pickle_module` for `torch.load` that reads upstream's pickled feature objects."""

    Unpickler = _FeaturesUnpickler

    @staticmethod
    def load(f: Any, **kwargs: Any) -> Any:
        return _FeaturesUnpickler(f, **kwargs).load()


def features_to_tokens(features: list[Any], path: Path, name: str) -> tuple[TokenSplit, np.ndarray]:
    """Upstream's feature objects -> a compact `TokenSplit` (y, a left empty) and the label ids.

    The compact form holds the same numbers when every mask is a prefix of ones and the segment ids
    are 1 exactly from some position to the end of the mask (right padding, BERT pairs); anything
    else is refused.
    """
    fix = regenerate_fix(name)
    try:
        ids = torch.tensor([f.input_ids for f in features], dtype=torch.long)
        mask = torch.tensor([f.input_mask for f in features], dtype=torch.long)
        seg = torch.tensor([f.segment_ids for f in features], dtype=torch.long)
        labels = np.asarray([int(f.label_id) for f in features], np.int64)
    except (AttributeError, ValueError, TypeError) as err:
        raise malformed(path, f"does not hold BERT input features ({err})", fix) from None
    n_tok = mask.sum(1)
    seq = ids.shape[1]
    first_b = torch.where(seg.any(1), seg.argmax(1), torch.full_like(n_tok, seq))
    rebuilt = stacked_inputs(ids, n_tok, first_b)
    if not (torch.equal(rebuilt[..., 1], mask) and torch.equal(rebuilt[..., 2], seg)):
        raise malformed(path, "has masks or segment ids that are not right-padded BERT pairs", fix)
    empty = torch.zeros(0, dtype=torch.long)
    dtype = compact_id_dtype(int(ids.max()) + 1)
    out = TokenSplit(ids.to(dtype), n_tok.to(torch.int16), first_b.to(torch.int16), empty, empty)
    return out, labels


@dataclass
class MultiNLISpec(TextGroupSpec):
    text_source: str = "auto"

    def metadata_path(self, root: Path) -> Path | None:
        return _first_present(self.dataset_dir(root), MNLI_METADATA)

    def _all(self, root: Path, names: tuple[str, ...]) -> bool:
        base = self.dataset_dir(root) / GLUE_DIR
        return all((base / n).is_file() for n in names)

    def active_source(self, root: Path) -> str | None:
        """`glue` or `features`: where the rows' text / tokens come from (None: neither present)."""
        order = {"auto": ("glue", "features"), "glue": ("glue",), "features": ("features",)}
        files = {"glue": GLUE_FILES, "features": FEATURE_FILES}
        return next((s for s in order[self.text_source] if self._all(root, files[s])), None)

    def required(self, root: Path) -> list[Path]:
        meta = self.metadata_path(root) or self.dataset_dir(root) / MNLI_METADATA[0]
        src = self.active_source(root) or ("features" if self.text_source == "features" else "glue")
        names = FEATURE_FILES if src == "features" else GLUE_FILES
        return [meta, *(self.dataset_dir(root) / GLUE_DIR / n for n in names)]

    def check(self, root: Path | str) -> None:
        root = Path(root)
        d = self.dataset_dir(root)
        if self.metadata_path(root) is None:
            raise self.missing(root, " or ".join(str(d / m) for m in MNLI_METADATA))
        if self.active_source(root) is None:
            want = {
                "glue": f"{d / GLUE_DIR}/{{{','.join(GLUE_FILES)}}}",
                "features": f"{d / GLUE_DIR}/{{{','.join(FEATURE_FILES)}}}",
            }
            options = (
                want if self.text_source == "auto" else {self.text_source: want[self.text_source]}
            )
            raise self.missing(root, " or ".join(options.values()))

    def uses_pretokenized(self, root: Path) -> bool:
        return self.active_source(root) == "features"

    def check_tokenizer(self, root: Path, tokenizer: str, max_length: int) -> None:
        if self.uses_pretokenized(root) and (tokenizer, max_length) != (
            FEATURES_TOKENIZER,
            MNLI_MAX_LENGTH,
        ):
            raise ConfigValueError(
                f"{self.name}: only upstream's pre-tokenised features ({FEATURES_TOKENIZER}, "
                f"{MNLI_MAX_LENGTH} tokens) are under {self.dataset_dir(root) / GLUE_DIR}, and the "
                f"model asks for tokenizer {tokenizer!r} at {max_length} tokens; add the GLUE MNLI "
                f"text files ({', '.join(GLUE_FILES)}) with `python scripts/prepare_data.py "
                f"{self.name}`, or use model=bert_base with data.max_length={MNLI_MAX_LENGTH}."
            )

    def metadata(self, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.check(root)
        key = f"meta:{root.resolve()}"
        if key not in self._cache:
            self._cache[key] = read_mnli_metadata(self.metadata_path(root), self.name)
        return self._cache[key]

    def labels_and_attrs(self, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        y, a, split = self.metadata(root)
        return {s: (y[split == k], a[split == k]) for k, s in enumerate(SPLITS)}

    def read_text(self, root: Path) -> dict[str, TextSplit]:
        if self.active_source(root) != "glue":
            raise DataNotFoundError(
                f"{self.name}: no GLUE MNLI text files under {self.dataset_dir(root) / GLUE_DIR} "
                f"(only pre-tokenised features); run `python scripts/prepare_data.py {self.name}`."
            )
        y, a, split = self.metadata(root)
        meta = self.metadata_path(root)
        prem, hyp, ys = [], [], []
        for n in GLUE_FILES:
            p, h, lab = read_glue_mnli(self.dataset_dir(root) / GLUE_DIR / n, self.name)
            prem += p
            hyp += h
            ys += lab
        fix = f"the metadata and the GLUE files must be the same rows; {regenerate_fix(self.name)}"
        if len(ys) != len(y):
            raise malformed(meta, f"has {len(y):,} rows and the GLUE MNLI files {len(ys):,}", fix)
        wrong = np.flatnonzero(np.asarray(ys, np.int64) != y)
        if len(wrong):
            raise malformed(
                meta,
                f"{len(wrong):,} rows disagree with the GLUE MNLI labels (first: row {wrong[0]})",
                fix,
            )
        neg = np.fromiter((has_negation(s) for s in hyp), bool, len(hyp))
        agree = float(np.mean(neg == a.astype(bool)))
        if agree < NEGATION_AGREEMENT:
            raise malformed(
                meta,
                f"negation flags agree with the GLUE hypotheses on only {agree:.2%} of the rows",
                fix,
            )
        if agree < 1.0:
            log.warning(
                "%s: the metadata's negation flag differs from the GLUE hypothesis on %d rows; "
                "the metadata's (upstream's) flag is used",
                self.name,
                int(round((1 - agree) * len(hyp))),
            )
        out = {}
        for k, s in enumerate(SPLITS):
            idx = np.flatnonzero(split == k)
            out[s] = TextSplit(
                text_a=[prem[i] for i in idx],
                text_b=[hyp[i] for i in idx],
                y=y[idx],
                a=a[idx],
            )
        return out

    def pretokenized(self, root: Path, tokenizer: str, max_length: int) -> dict[str, TokenSplit]:
        """Upstream's cached BERT features, checked against the metadata's labels."""
        self.check_tokenizer(root, tokenizer, max_length)
        y, a, split = self.metadata(root)
        parts, labels = [], []
        for n in FEATURE_FILES:
            path = self.dataset_dir(root) / GLUE_DIR / n
            log.info("%s: loading pre-tokenised features %s", self.name, path)
            feats = torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=_FeaturesPickle
            )
            tok, lab = features_to_tokens(list(feats), path, self.name)
            parts.append(tok)
            labels.append(lab)
        meta = self.metadata_path(root)
        lab = np.concatenate(labels)
        fix = (
            f"the metadata and the feature files must be the same rows; {regenerate_fix(self.name)}"
        )
        if len(lab) != len(y) or not np.array_equal(lab, y):
            raise malformed(meta, "rows do not match the pre-tokenised features' labels", fix)
        seq = {p.ids.shape[1] for p in parts}
        if seq != {MNLI_MAX_LENGTH}:
            raise malformed(meta.parent, f"features have {sorted(seq)} tokens, not 128", fix)
        ids = torch.cat([p.ids.to(torch.int32) for p in parts])
        ids = ids.to(compact_id_dtype(int(ids.max()) + 1))
        n_tok = torch.cat([p.n_tokens for p in parts])
        first_b = torch.cat([p.first_b for p in parts])
        out = {}
        for k, s in enumerate(SPLITS):
            idx = np.flatnonzero(split == k)
            rows = torch.from_numpy(idx)
            out[s] = TokenSplit(
                ids[rows],
                n_tok[rows],
                first_b[rows],
                torch.from_numpy(y[idx]),
                torch.from_numpy(a[idx]),
            )
        return out

    def build(self, root: Path) -> None:
        """Move the GLUE .tsv (or feature) files into glue_data/MNLI/ when an archive nested them."""
        if self.active_source(root) is not None:
            return
        base = self.dataset_dir(root) / GLUE_DIR
        for n in FEATURE_FILES if self.text_source == "features" else GLUE_FILES:
            if (base / n).is_file():
                continue
            found = sorted(p for p in self.dataset_dir(root).rglob(n) if p.is_file())
            if not found:
                raise FileNotFoundError(f"{n} is not in the downloaded archive")
            base.mkdir(parents=True, exist_ok=True)
            shutil.move(str(found[0]), str(base / n))


@register("multinli")
def multinli(text_source: str = "auto") -> MultiNLISpec:
    """MultiNLI with group_DRO's negation attribute and random split (6 groups)."""
    if text_source not in MNLI_SOURCES:
        raise ConfigValueError(unknown_name("MultiNLI text_source", text_source, MNLI_SOURCES))
    meta = Step("url", MNLI_METADATA_URL, "metadata_random.csv", dest="data")
    if text_source == "features":
        text = Step(
            "url", MNLI_FEATURES_URL, "multinli_bert_features.tar.gz", dest=GLUE_DIR, extract=True
        )
    else:
        text = Step("url", GLUE_MNLI_URL, "MNLI.zip", dest="glue_data", extract=True)
    return MultiNLISpec(
        name="multinli",
        classnames=list(MNLI_LABELS),
        templates=["a {} premise and hypothesis."],
        source=f"MultiNLI, group_DRO metadata_random.csv + GLUE MNLI ({GLUE_MNLI_URL})",
        num_groups=2 * len(MNLI_LABELS),
        folder="multinli",
        expected={"train": 206175, "val": 82462, "test": 123712},
        disk="~0.4 GB" if text_source != "features" else "~1 GB",
        size_note="group_DRO's random split",
        steps=[meta, text],
        manual=f"""mkdir -p {{dir}}/data {{dir}}/{GLUE_DIR}
download {MNLI_METADATA_URL} to {{dir}}/data/metadata_random.csv, and for the text either
  - {GLUE_MNLI_URL}, extracted in {{dir}}/glue_data (giving {{dir}}/{GLUE_DIR}/{{{",".join(GLUE_FILES)}}}), or
  - {MNLI_FEATURES_URL} (upstream's bert-base-uncased features at 128 tokens), extracted in {{dir}}/{GLUE_DIR}.
A SubpopBench data root (`python -m subpopbench.scripts.download`) has the metadata and the features.""",
        num_attrs=2,
        attr_names=["no negation", "negation"],
        max_length=MNLI_MAX_LENGTH,
        text_source=text_source,
    )
