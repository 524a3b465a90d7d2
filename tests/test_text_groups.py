"""Text group-robustness data: CivilComments, MultiNLI, group_text_synth (reprolab.data.text_groups).

Fixtures are tiny files in the upstream formats (WILDS' all_data_with_identities.csv, group_DRO's
metadata_random.csv, SubpopBench's metadata_multinli.csv, GLUE's MNLI .tsv files, upstream's
pickled BERT features), written to tmp_path; the tokenizer is the embedded `tiny` one.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from reprolab.data.datasets import text_groups as tg
from reprolab.data.datasets._common import Step
from reprolab.data.spec import DataNotFoundError, MalformedDataError, get_spec
from reprolab.data.text_groups import (
    CORE_FLIPPED,
    CORE_NEUTRAL,
    SYNTH_CORE,
    SYNTH_NEUTRAL,
    TextGroupDataModule,
    load_group_text_synth,
)
from reprolab.data.tokens import TokenInput, load_tokenizer, tiny_vocab_path
from reprolab.errors import ConfigValueError

ROOT = Path(__file__).resolve().parents[1]
TINY = TokenInput("tiny", 64)

# ------------------------------------------------------------------------------------------------
# Fixtures in the upstream formats

WILDS_COLUMNS = [
    "",
    "id",
    "comment_text",
    "split",
    "created_date",
    "toxicity",
    "severe_toxicity",
    "male",
    "female",
    "transgender",
    "LGBTQ",
    "christian",
    "jewish",
    "muslim",
    "other_religion",
    "other_religions",
    "black",
    "white",
    "identity_any",
]
# (split, text, toxicity, identity scores); "" is a missing score (counts as 0)
CIVIL_ROWS = [
    ("train", "you are a good person", "0.0", {}),
    ("train", 'what an idiot, "really"\nsecond line', "0.8", {"male": "0.6"}),
    ("train", "the muslim man was nice", "0.2", {"muslim": "0.9", "male": "0.5"}),
    ("train", "stupid", "0.5", {"white": "0.4"}),
    ("train", "", "0.1", {"black": ""}),
    ("val", "gay people are fine", "0.1", {"LGBTQ": "1.0"}),
    ("val", "this is bad", "0.9", {}),
    ("val", "christian and black", "0.7", {"christian": "0.5", "black": "0.6"}),
    ("test", "hello", "0.0", {"other_religion": "0.9"}),  # not one of SubpopBench's eight
    ("test", "white women", "0.6", {"female": "0.7", "white": "0.8"}),
    ("test", "ok", "0.3", {"jewish": "1.0"}),  # not one of the eight either
]
CIVIL_COARSE = {  # split -> (y, a), by hand
    "train": ([0, 1, 0, 1, 0], [0, 1, 1, 0, 0]),
    "val": ([0, 1, 1], [1, 0, 1]),
    "test": ([0, 1, 0], [0, 1, 0]),
}
CIVIL_FINE = {  # one row per (comment, identity), ordered by identity: (y, a, text)
    "train": ([1, 0, 0], [0, 0, 4], [1, 2, 2]),
    "val": ([0, 1, 1], [2, 3, 6], [5, 7, 7]),
    "test": ([1, 1], [1, 7], [9, 9]),
}


def write_civil(root: Path, nested: bool = False) -> Path:
    d = root / "civilcomments" / ("civilcomments_v1.0" if nested else "")
    d.mkdir(parents=True, exist_ok=True)
    path = d / "all_data_with_identities.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(WILDS_COLUMNS)
        for k, (split, text, tox, ids) in enumerate(CIVIL_ROWS):
            row = {"": str(k), "id": str(1000 + k), "comment_text": text, "split": split}
            row.update(created_date="2017-01-01", toxicity=tox, severe_toxicity="0.0")
            row.update(ids)
            w.writerow([row.get(c, "0.0") for c in WILDS_COLUMNS])
    return path


GLUE_TRAIN_HEADER = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
]
GLUE_DEV_HEADER = [*GLUE_TRAIN_HEADER[:-1], "label2", "label3", "label4", "label5", "gold_label"]
# (GLUE file, premise, hypothesis, gold label, metadata split); group_DRO's concatenation order
MNLI_ROWS = [
    ("train.tsv", "The cat sat on the mat.", "Nobody sat on the mat.", "contradiction", 0),
    ("train.tsv", "A man plays a guitar.", "A man plays music.", "entailment", 2),
    ("train.tsv", 'He said "yes" twice.', 'He never said "yes".', "contradiction", 1),
    ("train.tsv", "The sky is blue.", "The sky is blue today.", "neutral", 0),
    ("dev_matched.tsv", "Kids are playing.", "No kids are playing.", "contradiction", 0),
    ("dev_matched.tsv", "She reads a book.", "She reads something, nothing else.", "entailment", 1),
    ("dev_mismatched.tsv", "It rains.", "There is no-one outside.", "neutral", 2),
    ("dev_mismatched.tsv", "Two dogs run.", "Dogs run.", "entailment", 0),
]
MNLI_NEGATION = [1, 0, 1, 0, 1, 1, 0, 0]  # "no-one" is "noone" once punctuation goes
MNLI_EXPECTED = {  # split -> (y, a, row)
    "train": ([0, 2, 0, 1], [1, 0, 1, 0], [0, 3, 4, 7]),
    "val": ([0, 1], [1, 1], [2, 5]),
    "test": ([1, 2], [0, 0], [1, 6]),
}
MNLI_LABEL = {"contradiction": 0, "entailment": 1, "neutral": 2}


def write_glue(glue_dir: Path) -> None:
    glue_dir.mkdir(parents=True, exist_ok=True)
    for name in tg.GLUE_FILES:
        header = GLUE_TRAIN_HEADER if name == "train.tsv" else GLUE_DEV_HEADER
        lines = ["\t".join(header)]
        for k, (f, prem, hyp, gold, _) in enumerate(MNLI_ROWS):
            if f != name:
                continue
            parse = ["( x )", "( y )", "(ROOT x)", "(ROOT y)"]
            labels = [gold] * (len(header) - 10)
            lines.append(
                "\t".join([str(k), f"{k}1", f"{k}1e", "fiction", *parse, prem, hyp, *labels])
            )
        (glue_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_metadata(root: Path, kind: str = "group_dro", labels: list[int] | None = None) -> Path:
    y = labels if labels is not None else [MNLI_LABEL[r[3]] for r in MNLI_ROWS]
    splits = [r[4] for r in MNLI_ROWS]
    d = root / "multinli"
    if kind == "group_dro":  # pandas' to_csv of the filtered frame: index with gaps ('-' dropped)
        path = d / "data" / "metadata_random.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        index = [0, 1, 2, 3, 4, 6, 7, 9]
        rows = [",gold_label,sentence2_has_negation,split"]
        rows += [
            f"{i},{yy},{a},{s}" for i, yy, a, s in zip(index, y, MNLI_NEGATION, splits, strict=True)
        ]
    else:  # SubpopBench: id, filename (row position), split, y, a; written shuffled here
        path = d / "metadata_multinli.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = ["id,filename,split,y,a"]
        for k in (3, 0, 7, 1, 6, 2, 5, 4):
            rows.append(f"{k},{k},{splits[k]},{y[k]},{MNLI_NEGATION[k]}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_multinli(root: Path, kind: str = "group_dro") -> None:
    write_metadata(root, kind)
    write_glue(root / "multinli" / tg.GLUE_DIR)


def small(spec, expected: dict[str, int]):
    """The spec with the fixture's split sizes."""
    spec.expected = expected
    return spec


def text_dm(root: Path, dataset: str, **kw) -> TextGroupDataModule:
    kw.setdefault("max_length", 32)
    return TextGroupDataModule(name=dataset, dataset=dataset, root=str(root), **kw)


def batches(dm: TextGroupDataModule, split: str = "test") -> dict[str, torch.Tensor]:
    """The whole split, in order, as one batch dict."""
    dm.setup()
    loader = dm.test_dataloader()[0] if split == "test" else dm.val_dataloader()
    parts = list(loader)
    return {k: torch.cat([b[k] for b in parts]) for k in parts[0]}


# ------------------------------------------------------------------------------------------------
# CivilComments


@pytest.mark.parametrize("nested", [False, True])
def test_civilcomments_coarse_y_a_split(tmp_path, nested):
    write_civil(tmp_path, nested)
    texts = get_spec("civilcomments").texts(tmp_path)
    for split, (y, a) in CIVIL_COARSE.items():
        assert texts[split].y.tolist() == y and texts[split].a.tolist() == a, split
    assert texts["train"].text_a[1] == 'what an idiot, "really"\nsecond line'
    assert texts["train"].text_a[4] == "" and texts["train"].text_b is None


def test_civilcomments_fine_one_row_per_identity(tmp_path):
    write_civil(tmp_path)
    spec = get_spec("civilcomments", granularity="fine")
    assert spec.num_groups == 16 and spec.num_attrs == 8
    texts = spec.texts(tmp_path)
    for split, (y, a, rows) in CIVIL_FINE.items():
        assert texts[split].y.tolist() == y and texts[split].a.tolist() == a, split
        assert texts[split].text_a == [CIVIL_ROWS[r][1] for r in rows], split
    with pytest.raises(ConfigValueError, match="granularity.*did you mean 'fine'"):
        get_spec("civilcomments", granularity="fin")


def test_civilcomments_groups_in_batches(tmp_path):
    write_civil(tmp_path)
    dm = text_dm(tmp_path, "civilcomments")
    dm.configure(preprocess=TINY)
    info = dm.info
    assert info.num_groups == 4 and info.classnames == ("non-toxic", "toxic")
    assert [t.name for t in info.test_sets] == ["test"] and info.templates
    b = batches(dm, "val")
    y, a = CIVIL_COARSE["val"]
    assert b["label"].tolist() == y and b["group"].tolist() == [
        2 * yy + aa for yy, aa in zip(y, a, strict=True)
    ]
    assert b["index"].tolist() == [0, 1, 2]
    assert dm.train_group_counts().tolist() == [2.0, 1.0, 1.0, 1.0]


def test_civilcomments_bad_file_is_one_line(tmp_path):
    path = write_civil(tmp_path)
    text = path.read_text(encoding="utf-8").replace(",LGBTQ,", ",lgbt,", 1)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(
        MalformedDataError, match=r"no column\(s\) \['LGBTQ'\].*prepare_data.py civilcomments"
    ) as e:
        get_spec("civilcomments").texts(tmp_path)
    assert "\n" not in str(e.value)
    write_civil(tmp_path)
    text = path.read_text(encoding="utf-8").replace(",train,", ",dev,", 1)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MalformedDataError, match="unknown split 'dev'"):
        get_spec("civilcomments").texts(tmp_path)


# ------------------------------------------------------------------------------------------------
# MultiNLI


@pytest.mark.parametrize("kind", ["group_dro", "subpopbench"])
def test_multinli_rows_match_metadata(tmp_path, kind):
    write_multinli(tmp_path, kind)
    spec = get_spec("multinli")
    assert spec.active_source(tmp_path) == "glue" and spec.num_groups == 6
    texts = spec.texts(tmp_path)
    for split, (y, a, rows) in MNLI_EXPECTED.items():
        t = texts[split]
        assert t.y.tolist() == y and t.a.tolist() == a, split
        assert t.text_a == [MNLI_ROWS[r][1] for r in rows]
        assert t.text_b == [MNLI_ROWS[r][2] for r in rows]
    assert texts["val"].text_a[0] == 'He said "yes" twice.'  # no quote character, as utils_glue


def test_negation_rule_is_group_dros():
    assert [tg.has_negation(r[2]) for r in MNLI_ROWS] == [bool(v) for v in MNLI_NEGATION]
    assert tg.has_negation("NOTHING.") and not tg.has_negation("not at all")
    assert tg.MNLI_LABELS == ("contradiction", "entailment", "neutral")


def test_multinli_misaligned_metadata_is_one_line(tmp_path):
    write_multinli(tmp_path)
    y = [MNLI_LABEL[r[3]] for r in MNLI_ROWS]
    write_metadata(tmp_path, labels=[y[1], y[0], *y[2:]])
    with pytest.raises(MalformedDataError, match="2 rows disagree with the GLUE MNLI labels") as e:
        get_spec("multinli").texts(tmp_path)
    assert "\n" not in str(e.value) and "prepare_data.py multinli" in str(e.value)
    glue = tmp_path / "multinli" / tg.GLUE_DIR / "dev_mismatched.tsv"
    write_metadata(tmp_path)
    glue.write_text(glue.read_text().rsplit("\n", 2)[0] + "\n")  # drop the last row
    with pytest.raises(MalformedDataError, match="has 8 rows and the GLUE MNLI files 7"):
        get_spec("multinli").texts(tmp_path)


def test_sentence_pairs_cls_sep_and_token_types(tmp_path):
    write_multinli(tmp_path)
    dm = text_dm(tmp_path, "multinli", max_length=32)
    dm.configure(preprocess=TINY)
    b = batches(dm, "val")
    x = b["image"]
    assert x.shape == (2, 32, 3) and x.dtype == torch.long
    tok = load_tokenizer("tiny")
    words = tok.convert_ids_to_tokens(x[0, :, 0].tolist())
    n = int(x[0, :, 1].sum())
    first_sep = words.index("[SEP]")
    assert words[0] == "[CLS]" and words[n - 1] == "[SEP]" and words[n:] == ["[PAD]"] * (32 - n)
    assert x[0, :, 1].tolist() == [1] * n + [0] * (32 - n)
    assert x[0, :, 2].tolist() == [0] * (first_sep + 1) + [1] * (n - first_sep - 1) + [0] * (32 - n)
    assert tok.decode(x[0, 1:first_sep, 0].tolist()) == 'he said " yes " twice.'
    # exactly what the tokenizer gives with padding='max_length' and truncation, for all rows
    texts = get_spec("multinli").texts(tmp_path)["val"]
    ref = tok(texts.text_a, texts.text_b, padding="max_length", truncation=True, max_length=32)
    want = torch.stack(
        [torch.tensor(ref[k]) for k in ("input_ids", "attention_mask", "token_type_ids")], 2
    )
    assert torch.equal(x, want)
    assert b["group"].tolist() == [1, 3] and b["label"].tolist() == [0, 1]


def test_pair_truncation_matches_the_tokenizer(tmp_path):
    write_multinli(tmp_path)
    dm = text_dm(tmp_path, "multinli", max_length=8)  # every pair is cut, longest first
    dm.configure(preprocess=TINY)
    x = batches(dm, "test")["image"]
    texts = get_spec("multinli").texts(tmp_path)["test"]
    tok = load_tokenizer("tiny")
    ref = tok(texts.text_a, texts.text_b, padding="max_length", truncation=True, max_length=8)
    assert torch.equal(x[..., 0], torch.tensor(ref["input_ids"]))
    assert torch.equal(x[..., 2], torch.tensor(ref["token_type_ids"]))
    assert bool(x[:, :, 1].all())


class _UpstreamFeatures:
    def __init__(self, input_ids, input_mask, segment_ids, label_id):
        self.input_ids = input_ids
        self.input_mask = input_mask
        self.segment_ids = segment_ids
        self.label_id = label_id


def write_features(root: Path, monkeypatch) -> dict[str, torch.Tensor]:
    """Upstream's cached_* files: pickled utils_glue.InputFeatures (legacy torch format)."""
    module = types.ModuleType("utils_glue")
    module.InputFeatures = _UpstreamFeatures
    _UpstreamFeatures.__module__, _UpstreamFeatures.__qualname__ = "utils_glue", "InputFeatures"
    monkeypatch.setitem(sys.modules, "utils_glue", module)
    tok = load_tokenizer("tiny")
    glue = root / "multinli" / tg.GLUE_DIR
    glue.mkdir(parents=True, exist_ok=True)
    stacked = []
    for name, feature_file in zip(tg.GLUE_FILES, tg.FEATURE_FILES, strict=True):
        rows = [r for r in MNLI_ROWS if r[0] == name]
        enc = tok([r[1] for r in rows], [r[2] for r in rows], padding="max_length", max_length=128)
        feats = [
            _UpstreamFeatures(i, m, s, MNLI_LABEL[r[3]])
            for i, m, s, r in zip(
                enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], rows, strict=True
            )
        ]
        torch.save(feats, glue / feature_file, _use_new_zipfile_serialization=False)
        stacked.append(
            torch.stack(
                [torch.tensor(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")], 2
            )
        )
    monkeypatch.delitem(sys.modules, "utils_glue")  # loading must not need upstream's module
    return torch.cat(stacked)


def test_multinli_pretokenised_features(tmp_path, monkeypatch):
    write_metadata(tmp_path)
    every_row = write_features(tmp_path, monkeypatch)
    spec = get_spec("multinli")
    assert spec.active_source(tmp_path) == "features"
    dm = text_dm(tmp_path, "multinli", max_length=128)
    dm.configure(preprocess=TokenInput("bert-base-uncased", 512))  # never loaded: ids are given
    b = batches(dm, "test")
    assert torch.equal(b["image"], every_row[MNLI_EXPECTED["test"][2]])
    assert b["label"].tolist() == MNLI_EXPECTED["test"][0]
    dm = text_dm(tmp_path, "multinli", max_length=64)
    with pytest.raises(
        ConfigValueError, match="bert-base-uncased, 128 tokens.*'bert-base-uncased' at 64"
    ) as e:
        dm.configure(preprocess=TokenInput("bert-base-uncased", 512))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigValueError, match="tokenizer 'tiny'.*prepare_data.py multinli"):
        text_dm(tmp_path, "multinli", max_length=128).configure(preprocess=TokenInput("tiny", 128))
    with pytest.raises(DataNotFoundError, match="glue_data/MNLI/.*train.tsv"):
        text_dm(tmp_path, "multinli", dataset_kwargs={"text_source": "glue"})


# ------------------------------------------------------------------------------------------------
# Errors: missing data, wrong model inputs


@pytest.mark.parametrize("dataset", ["civilcomments", "multinli"])
def test_missing_data_names_the_prepare_command(tmp_path, dataset):
    with pytest.raises(DataNotFoundError, match=f"python scripts/prepare_data.py {dataset}") as e:
        text_dm(tmp_path, dataset)
    assert "\n" not in str(e.value)


def test_multinli_metadata_without_text_is_missing(tmp_path):
    write_metadata(tmp_path)
    with pytest.raises(DataNotFoundError, match="train.tsv.*prepare_data.py multinli") as e:
        text_dm(tmp_path, "multinli")
    assert "\n" not in str(e.value)


def test_non_token_preprocess_is_one_line(tmp_path):
    from reprolab.data.transforms import Preprocess
    from reprolab.data.vector_groups import VectorInput

    dm = TextGroupDataModule("group_text_synth", "group_text_synth", max_length=16)
    for bad in (VectorInput(16), Preprocess(224, (0.5,) * 3, (0.5,) * 3)):
        with pytest.raises(ConfigValueError, match="model=tiny_bert or model=bert_base") as e:
            dm.configure(preprocess=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigValueError, match=r"data.max_length<=8"):
        dm.configure(preprocess=TokenInput("tiny", 8))
    with pytest.raises(RuntimeError, match="configure\\(preprocess"):
        dm.setup()
    with pytest.raises(ConfigValueError, match="did you mean 'civilcomments'"):
        TextGroupDataModule("x", "civilcoments", root=str(tmp_path))
    with pytest.raises(ConfigValueError, match="text dataset 'caltech101'"):
        TextGroupDataModule("x", "caltech101", root=str(tmp_path))
    with pytest.raises(ConfigValueError, match="is a text dataset"):
        get_spec("civilcomments").load(tmp_path, "test")


# ------------------------------------------------------------------------------------------------
# group_text_synth


def test_synth_group_and_core_counts_are_exact():
    d = load_group_text_synth(core_neutral=0.3, core_flip=0.1)
    expected = {"train": [950, 50, 50, 950], "val": [125] * 4, "test": [250] * 4}
    for split, counts in expected.items():
        t = d.splits[split]
        g = t.y * 2 + t.a
        assert np.bincount(g, minlength=4).tolist() == counts, split
        for k, n_g in enumerate(counts):
            core = d.core[split][g == k]
            assert (core == CORE_NEUTRAL).sum() == round(0.3 * n_g)
            assert (core == CORE_FLIPPED).sum() == round(0.1 * n_g)
    # the words say what the labels say
    t, core = d.splits["train"], d.core["train"]
    for text, y, a, c in zip(t.text_a[:200], t.y[:200], t.a[:200], core[:200], strict=True):
        words = text.split()
        assert ("cat", "dog")[a] in words and ("cat", "dog")[1 - a] not in words
        pool = SYNTH_NEUTRAL if c == CORE_NEUTRAL else SYNTH_CORE[1 - y if c == CORE_FLIPPED else y]
        assert sum(w in pool for w in words) == 1


def test_synth_depends_on_data_seed_only_and_fits_the_tiny_vocab():
    a, b = load_group_text_synth(data_seed=3), load_group_text_synth(data_seed=3)
    assert a.splits["test"].text_a == b.splits["test"].text_a
    assert load_group_text_synth(data_seed=4).splits["test"].text_a != a.splits["test"].text_a
    tok = load_tokenizer("tiny")
    enc = tok(a.splits["train"].text_a + a.splits["test"].text_a)["input_ids"]
    assert tok.unk_token_id not in {i for row in enc for i in row}
    assert max(len(r) for r in enc) <= 16  # the config's max_length: nothing is cut
    with pytest.raises(ConfigValueError, match="core_neutral \\+ core_flip"):
        load_group_text_synth(core_neutral=0.7, core_flip=0.4)


def test_synth_batches_and_info():
    dm = TextGroupDataModule("group_text_synth", "group_text_synth", max_length=16, batch_size=50)
    dm.configure(preprocess=TINY)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (50, 16, 3) and b["image"].dtype == torch.long
    assert (b["image"][:, 0, 0] == load_tokenizer("tiny").cls_token_id).all()
    assert not b["image"][..., 2].any()  # single sentences: every token type is 0
    assert {k: v.dtype for k, v in b.items() if k != "image"} == dict.fromkeys(
        ("label", "group", "index"), torch.long
    )
    assert torch.equal(b["group"], 2 * b["label"] + b["group"] % 2)
    assert dm.info.num_groups == 4 and dm.train_group_counts().tolist() == [950, 50, 50, 950]
    assert len(dm.val_dataloader()) == 4  # 500 rows, eval batch 128
    assert TextGroupDataModule("g", "group_text_synth", val=False).val_dataloader() == []


@pytest.mark.parametrize("sampler", ["group_balanced", "class_balanced"])
def test_samplers_draw_balanced(sampler):
    dm = TextGroupDataModule(
        "g",
        "group_text_synth",
        dataset_kwargs={"train_corr": 0.9, "n_train": 4000},
        max_length=16,
        batch_size=100,
        sampler=sampler,
        shuffle_seed=0,
    )
    dm.configure(preprocess=TINY)
    dm.setup()
    loader = dm.train_dataloader()
    drawn = torch.cat([b["group"] for b in loader])
    assert len(drawn) == 4000
    share = torch.bincount(drawn, minlength=4).double() / len(drawn)
    if sampler == "group_balanced":
        assert torch.allclose(share, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)
    else:  # classes balanced; groups within a class keep their 90 / 10 split
        assert (
            abs(share[0] + share[1] - 0.5) < 0.03
            and abs(share[1] / (share[0] + share[1]) - 0.1) < 0.03
        )
    loader.sampler.set_epoch(1)
    assert not torch.equal(
        torch.cat([b["index"] for b in loader]),
        torch.cat([b["index"] for b in dm.train_dataloader()]),
    )


def test_missing_groups_are_logged(tmp_path, caplog):
    write_civil(tmp_path)
    dm = text_dm(tmp_path, "civilcomments", dataset_kwargs={"granularity": "fine"})
    dm.configure(preprocess=TINY)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert dm.missing_groups["train"] == [1, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15]
    assert "group = 8*y + a" in caplog.text


# ------------------------------------------------------------------------------------------------
# Token cache


def _no_tokenising(monkeypatch):
    import reprolab.data.text_groups as mod

    def boom(*a, **k):
        raise AssertionError("tokenised although the cache holds the ids")

    monkeypatch.setattr(mod, "tokenize_split", boom)
    monkeypatch.setattr(tg.CivilCommentsSpec, "read_text", boom)


def local_tokenizer(path: Path, extra: list[str]) -> str:
    """A tokenizer folder: the tiny vocabulary plus `extra` words (AutoTokenizer loads it offline)."""
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = Path(tiny_vocab_path()).read_text(encoding="utf-8").splitlines() + extra
    (path / "vocab_src.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(str(path / "vocab_src.txt"), do_lower_case=True).save_pretrained(str(path))
    load_tokenizer.cache_clear()
    return str(path)


def test_token_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    write_civil(tmp_path)
    first = text_dm(tmp_path, "civilcomments")
    first.configure(preprocess=TINY)
    want = batches(first)
    assert not first.cache_hit and first.cache_path.is_file()
    assert first.cache_path.parent == tmp_path / "civilcomments" / "tokens"

    with monkeypatch.context() as m:  # a second run reads neither the CSV nor the tokenizer output
        _no_tokenising(m)
        again = text_dm(tmp_path, "civilcomments")
        again.configure(preprocess=TINY)
        got = batches(again)
        assert again.cache_hit and again.cache_path == first.cache_path
        assert all(torch.equal(got[k], want[k]) for k in want)

    shorter = text_dm(tmp_path, "civilcomments", max_length=24)  # another length: its own file
    shorter.configure(preprocess=TINY)
    assert batches(shorter)["image"].shape[1] == 24 and not shorter.cache_hit
    assert shorter.cache_path != first.cache_path

    other = local_tokenizer(tmp_path / "tok", ["toxicity"])  # another tokenizer: its own file
    dm = text_dm(tmp_path, "civilcomments")
    dm.configure(preprocess=TokenInput(other, 64))
    dm.setup()
    assert not dm.cache_hit and dm.cache_path != first.cache_path

    dm = text_dm(tmp_path, "civilcomments")
    dm.configure(preprocess=TokenInput(other, 64))
    dm.setup()
    assert dm.cache_hit
    local_tokenizer(tmp_path / "tok", ["toxicity", "comments"])  # same name, new vocabulary
    dm = text_dm(tmp_path, "civilcomments")
    dm.configure(preprocess=TokenInput(other, 64))
    dm.setup()
    assert not dm.cache_hit

    fine = text_dm(tmp_path, "civilcomments", dataset_kwargs={"granularity": "fine"})
    fine.configure(preprocess=TINY)
    fine.setup()
    assert not fine.cache_hit and fine.cache_path != first.cache_path

    csv_path = tmp_path / "civilcomments" / "all_data_with_identities.csv"  # the data changes
    os.utime(csv_path, ns=(csv_path.stat().st_atime_ns, csv_path.stat().st_mtime_ns + 10**9))
    dm = text_dm(tmp_path, "civilcomments")
    dm.configure(preprocess=TINY)
    dm.setup()
    assert not dm.cache_hit and dm.cache_path == first.cache_path
    off = text_dm(tmp_path, "civilcomments", token_cache=False)
    off.configure(preprocess=TINY)
    off.setup()
    assert off.cache_path is None and not off.cache_hit


def test_prepare_data_tokenises_once_for_setup(tmp_path, monkeypatch):
    write_civil(tmp_path)
    dm = text_dm(tmp_path, "civilcomments")
    dm.configure(preprocess=TINY)
    dm.prepare_data()  # Lightning: once per node, before setup
    assert dm.cache_path.is_file() and not dm.cache_hit
    _no_tokenising(monkeypatch)
    dm.setup()  # uses what prepare_data made
    other_rank = text_dm(tmp_path, "civilcomments")
    other_rank.configure(preprocess=TINY)
    other_rank.setup()
    assert other_rank.cache_hit
    assert torch.equal(batches(dm)["image"], batches(other_rank)["image"])


def test_damaged_token_cache_is_rebuilt(tmp_path, caplog):
    write_civil(tmp_path)
    dm = text_dm(tmp_path, "civilcomments")
    dm.configure(preprocess=TINY)
    dm.setup()
    dm.cache_path.write_bytes(b"not a torch file")
    again = text_dm(tmp_path, "civilcomments")
    again.configure(preprocess=TINY)
    with caplog.at_level("WARNING"):
        again.setup()
    assert not again.cache_hit and "unreadable" in caplog.text


# ------------------------------------------------------------------------------------------------
# Data zoo: prepare_data.py


def _cli():
    spec = importlib.util.spec_from_file_location(
        "_prepare_data", ROOT / "scripts" / "prepare_data.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prepare_data_lists_and_checks_text_datasets(tmp_path, capsys):
    cli = _cli()
    rows = {r["name"]: r for r in cli.rows(tmp_path)}
    civil, mnli = rows["civilcomments"], rows["multinli"]
    assert (civil["classes"], civil["train"], civil["val"], civil["test"]) == (
        "2",
        "269,038",
        "45,180",
        "133,782",
    )
    assert (mnli["classes"], mnli["train"], mnli["val"], mnli["test"]) == (
        "3",
        "206,175",
        "82,462",
        "123,712",
    )
    assert civil["status"] == mnli["status"] == "missing"
    assert "group_text_synth" not in rows  # generated in memory, nothing to prepare
    write_civil(tmp_path)
    rows = {r["name"]: r for r in cli.rows(tmp_path)}
    assert rows["civilcomments"]["status"] == "bad"
    assert (
        "wrong number of rows (train: expected 269038, found 5" in rows["civilcomments"]["reason"]
    )
    assert cli.main(["--check", "multinli", "--root", str(tmp_path)]) == 1
    assert "python scripts/prepare_data.py multinli" in capsys.readouterr().err
    assert cli.main(["--manual", "multinli"]) == 0
    out = capsys.readouterr().out
    assert tg.MNLI_METADATA_URL in out and tg.GLUE_MNLI_URL in out and tg.MNLI_FEATURES_URL in out


def test_verify_accepts_the_fixture_sizes(tmp_path):
    write_civil(tmp_path)
    write_multinli(tmp_path)
    assert small(get_spec("civilcomments"), {"train": 5, "val": 3, "test": 3}).verify(tmp_path) == {
        "train": 5,
        "val": 3,
        "test": 3,
    }
    assert (
        small(get_spec("multinli"), {"train": 4, "val": 2, "test": 2}).verify(tmp_path)["train"]
        == 4
    )


def test_prepare_downloads_extracts_builds_and_verifies(tmp_path, capsys):
    """The real preparation path with file:// sources shaped like the upstream archives."""
    src = tmp_path / "src"
    write_civil(
        src, nested=True
    )  # the archive holds civilcomments_v1.0/all_data_with_identities.csv
    archive = tmp_path / "civilcomments_v1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src / "civilcomments" / "civilcomments_v1.0", arcname="civilcomments_v1.0")
    root = tmp_path / "root"
    spec = small(get_spec("civilcomments"), {"train": 5, "val": 3, "test": 3})
    spec.steps = [Step("url", archive.as_uri(), "civilcomments_v1.0.tar.gz", extract=True)]
    spec.prepare(root)
    assert "civilcomments: ready under" in capsys.readouterr().out

    write_multinli(src)
    mnli_zip = tmp_path / "MNLI.zip"
    with zipfile.ZipFile(mnli_zip, "w") as z:
        for name in tg.GLUE_FILES:
            z.write(
                src / "multinli" / tg.GLUE_DIR / name, f"glue/MNLI/{name}"
            )  # nested: build moves
    spec = small(get_spec("multinli"), {"train": 4, "val": 2, "test": 2})
    meta = src / "multinli" / "data" / "metadata_random.csv"
    assert [s.dest for s in spec.steps] == ["data", "glue_data"]
    spec.steps = [
        Step("url", meta.as_uri(), "metadata_random.csv", dest="data"),
        Step("url", mnli_zip.as_uri(), "MNLI.zip", dest="glue_data", extract=True),
    ]
    spec.prepare(root)
    assert "multinli: ready under" in capsys.readouterr().out
    assert (root / "multinli" / tg.GLUE_DIR / "dev_mismatched.tsv").is_file()
    assert get_spec("multinli").texts(root)["test"].y.tolist() == MNLI_EXPECTED["test"][0]


# ------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name", ["civilcomments", "multinli", "group_text_synth"])
def test_data_configs_build(name, tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "data" / f"{name}.yaml"))
    assert cfg.pop("_target_") == "reprolab.data.text_groups.TextGroupDataModule"
    assert cfg["name"] == name and cfg["shuffle_seed"] == "${seed}"
    cfg["shuffle_seed"] = 1
    if "root" in cfg:
        assert cfg["root"] == "${paths.data_dir}"
        cfg["root"] = str(tmp_path)
    write_civil(tmp_path)
    write_multinli(tmp_path)
    dm = TextGroupDataModule(**cfg)
    expected = {"civilcomments": (220, 4), "multinli": (128, 6), "group_text_synth": (16, 4)}[name]
    assert (dm.max_length, dm.info.num_groups) == expected and dm.batch_size == 32


def test_group_methods_run_on_text_through_the_runner(tmp_path: Path) -> None:
    """groupdro + SubpopBench's text optimisation on group_text_synth with tiny_bert, end to end."""
    import json

    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            "method=groupdro",
            "+method/optim=bert_adamw",
            "method.optimizer.lr=1e-3",
            "data=group_text_synth",
            "data.dataset_kwargs.n_train=256",
            "data.dataset_kwargs.n_val=64",
            "data.dataset_kwargs.n_test=128",
            "model=tiny_bert",
            "trainer=cpu",
            "trainer.max_epochs=-1",
            "+trainer.max_steps=8",
            "data.val=false",
            "logger=csv",
            f"paths.log_dir={tmp_path}",
            "progress_bar=false",
            "threads=1",
        ]
    )
    record = run(cfg)
    assert record["global_step"] == 8
    saved = json.loads(next(tmp_path.rglob("metrics.json")).read_text())["metrics"]
    assert 0.0 <= saved["test/test/worst_group_acc"] <= saved["test/test/avg_group_acc"] <= 100.0
    assert saved["params/trainable"] > 10_000  # BERT trains, not only the head
