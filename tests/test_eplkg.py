"""EPLKG (robustness_ood_prompting.md §5.4): the selector on tensors, the prompt bank as data, the
ConceptNet builder, and the method on tiny_clip.

References are independent of the code under test: a synthetic world whose aligned prompt is known
by construction, hand-written bank sentences (RPLKG's `sents.csv` strings), logits recomputed from
the text tower directly, and fixture edges whose expected triples are listed by hand.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reprolab.data.info import ImageClassificationInfo
from reprolab.data.info import TestSet as Set
from reprolab.data.knowledge import (
    PromptBank,
    Triple,
    build_bank,
    class_term,
    collect_triples,
    describe,
    knowledge_dir,
    load_prompt_bank,
    read_triples,
    verbalise,
    write_triples,
)
from reprolab.data.spec import DataNotFoundError, MalformedDataError, read_lines
from reprolab.methods.prompting.eplkg import (
    EPLKG,
    MASK_VALUE,
    PromptSelector,
    pad_bank,
    tau_at,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = read_lines("shapes/classnames.txt")


# ------------------------------------------------------------------------------------------------
# The selector on a synthetic world (spec §5.4)


def _world(seed: int, classes: int = 5, dim: int = 32, prompts: int = 10, sigma: float = 0.3):
    """Unit class centres; per class one prompt at cos 0.9 to its centre, the rest random unit
    vectors; images = centre + N(0, sigma² I). Returns bank, aligned index, train and test sets."""
    g = torch.Generator().manual_seed(seed)
    mu = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    bank = F.normalize(torch.randn(classes, prompts, dim, generator=g), dim=-1)
    aligned = torch.randint(prompts, (classes,), generator=g)
    for c in range(classes):
        n = torch.randn(dim, generator=g)
        n = F.normalize(n - (n @ mu[c]) * mu[c], dim=0)
        bank[c, aligned[c]] = 0.9 * mu[c] + math.sqrt(1 - 0.81) * n

    def images(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(classes).repeat_interleave(per_class)
        return mu[y] + sigma * torch.randn(len(y), dim, generator=g), y

    return bank, aligned, images(40), images(200)


def _train_selector(seed: int, identity_values: bool, steps: int = 300):
    """Fit a PromptSelector with RPLKG's values (dropout 0.4, noise 0.2, α 0.2, S 100, annealed τ
    from 2 to 0.1 over the run); return (aligned-pick rate, accuracy, bank-mean zero-shot accuracy)
    on the held-out images."""
    torch.manual_seed(seed)
    bank, aligned, (xtr, ytr), (xte, yte) = _world(seed)
    c, j, d = bank.shape
    padded, mask, zs = pad_bank(bank.reshape(c * j, d), [j] * c)
    sel = PromptSelector(d, dropout=0.4, alpha=0.2, num_select=1, feature_noise=0.2)
    if identity_values:
        with torch.no_grad():
            sel.w_v[1].weight.copy_(torch.eye(d))
            sel.w_v[1].bias.zero_()
        sel.w_v.requires_grad_(False)
    opt = torch.optim.Adam([p for p in sel.parameters() if p.requires_grad], lr=1e-2)
    sel.train()
    for step in range(steps):
        idx = torch.randint(len(ytr), (64,))
        tau = tau_at(100 * step / steps, 2.0, 0.1, 100)
        loss = F.cross_entropy(100 * sel(xtr[idx], padded, mask, zs, tau), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    sel.eval()
    with torch.no_grad():
        pick = sel.selected_indices(xte, padded, mask)[torch.arange(len(yte)), yte]
        hit = (pick == aligned[yte]).float().mean().item()
        acc = (sel(xte, padded, mask, zs, tau=0.1).argmax(-1) == yte).float().mean().item()
        zs_acc = ((F.normalize(xte, dim=-1) @ zs.t()).argmax(-1) == yte).float().mean().item()
    return hit, acc, zs_acc


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_selector_learns_to_pick_the_aligned_prompt(seed: int) -> None:
    """The spec's pass criterion: the aligned prompt is selected for >= 90 % of (image, true class)
    pairs, and accuracy beats the bank-mean zero-shot head.

    W_v is fixed at the identity here, so a prompt's value is the prompt itself. With W_v trained
    from its random init a learnt map can send any prompt to the class centre, and which prompt is
    picked is not identifiable (measured: at most 0.2 % aligned picks at these seeds, with
    accuracy still above zero-shot: the next test).
    """
    hit, acc, zs_acc = _train_selector(seed, identity_values=True)
    assert hit >= 0.9, (hit, acc, zs_acc)
    assert acc > zs_acc + 0.03, (acc, zs_acc)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_full_selector_beats_the_bank_mean_zero_shot(seed: int) -> None:
    _, acc, zs_acc = _train_selector(seed, identity_values=False)
    assert acc > zs_acc + 0.03, (acc, zs_acc)


def test_straight_through_gumbel_is_one_hot_forward_with_gradients() -> None:
    torch.manual_seed(0)
    sel = PromptSelector(4, num_select=1)
    scores = torch.randn(6, 3, 5, requires_grad=True)
    m = sel.select(scores, tau=0.7, sample=True)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m.sum(-1), torch.ones(6, 3))
    (m * torch.randn_like(m)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    # the hard pick is argmax(s + g): the same draw at any temperature
    s = torch.randn(2000, 4)
    torch.manual_seed(1)
    a = sel.select(s, tau=2.0, sample=True).argmax(-1)
    torch.manual_seed(1)
    b = sel.select(s, tau=0.005, sample=True).argmax(-1)
    assert torch.equal(a, b)
    # Gumbel-max: pick frequencies follow softmax(s); argmax mode picks the most likely one
    s = torch.tensor([[1.0, 0.0, -1.0]]).expand(20000, 3)
    freq = sel.select(s, tau=1.0, sample=True).mean(0)
    assert torch.allclose(freq, s[0].softmax(-1), atol=0.02)
    assert sel.select(s[:1], tau=1.0, sample=False).argmax().item() == 0


@pytest.mark.parametrize("num_select", [1, 2])
def test_padded_prompts_are_never_selected(num_select: int) -> None:
    torch.manual_seed(0)
    sizes = [1, 3, 6, 2]
    emb = torch.randn(sum(sizes), 8) * 5
    bank, mask, _ = pad_bank(emb, sizes)
    sel = PromptSelector(8, dropout=0.4, num_select=num_select).train()
    with torch.no_grad():  # large padding keys: without the mask they would win every draw
        sel.w_k[1].bias.fill_(50.0)
    feats = torch.randn(500, 8)
    for sample in (True, False):
        m = sel.select(sel.scores(sel.image_query(feats), bank, mask), tau=2.0, sample=sample)
        pad = torch.arange(bank.shape[1])[None, :] >= torch.tensor(sizes)[:, None]  # (C, J)
        assert m[:, pad].abs().sum() == 0
        assert torch.equal(m.sum(-1), torch.full((500, len(sizes)), float(num_select)))


def test_two_selections_follow_the_released_code() -> None:
    """num_select=2: M = pick(s) + pick(s − M₁). Two distinct prompts when the runner-up is within 1
    of the first pick; the same prompt twice when the first leads by more than 1 (RPLKG does not
    exclude the first pick: `M2 = M - M1.detach()`)."""
    sel = PromptSelector(4, num_select=2)
    close = torch.tensor([[[3.0, 2.5, 0.0, MASK_VALUE]]])
    far = torch.tensor([[[5.0, 2.5, 0.0, MASK_VALUE]]])
    assert sel.select(close, tau=1.0, sample=False).tolist() == [[[1.0, 1.0, 0.0, 0.0]]]
    assert sel.select(far, tau=1.0, sample=False).tolist() == [[[2.0, 0.0, 0.0, 0.0]]]
    torch.manual_seed(0)
    tied = torch.zeros(4000, 1, 4)  # all equal: the second draw avoids the first pick mostly
    m = sel.select(tied, tau=1.0, sample=True)
    distinct = (m.amax(-1) == 1).float().mean().item()
    assert abs(distinct - (1 - math.exp(-1) / (math.exp(-1) + 3))) < 0.03


def test_pad_bank_mask_and_zero_shot_weights() -> None:
    emb = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, -5.0], [2.0, 0.0]])
    bank, mask, zs = pad_bank(emb, [2, 1, 2])
    assert bank.shape == (3, 2, 2) and torch.equal(bank[1, 1], torch.zeros(2))
    assert mask.tolist() == [[0.0, 0.0], [0.0, MASK_VALUE], [0.0, 0.0]]
    # by hand: class 0 = normalise((0.6, 0.8) + (1, 0)); class 1 = (0, 1); class 2 = normalise((0,-1)+(1,0))
    expect = torch.tensor([[1.6, 0.8], [0.0, 1.0], [1.0, -1.0]])
    assert torch.allclose(zs, expect / expect.norm(dim=-1, keepdim=True))


def test_temperature_schedules() -> None:
    assert tau_at(0, 2.0, 0.1, 100) == pytest.approx(2.0)
    assert tau_at(50, 2.0, 0.1, 100) == pytest.approx(math.sqrt(2.0 * 0.1))
    assert tau_at(100, 2.0, 0.1, 100) == pytest.approx(0.1)
    assert tau_at(200, 2.0, 0.1, 100) == pytest.approx(0.005)  # RPLKG's hard-coded t = 200


# ------------------------------------------------------------------------------------------------
# The prompt bank as data


@pytest.mark.parametrize(
    "triple, expected",
    [
        # RPLKG's sents.csv rows, verbatim
        (
            ("tench", "/r/IsA", "cyprinid", "tench"),
            "tench is a type of cyprinid. a photo of a tench.",
        ),
        (
            ("tenca", "/r/TranslationOf", "tench", "tench"),
            "tenca is a translation of tench. a photo of a tench.",
        ),
        (
            ("carp", "/r/RelatedTo", "goldfish", "goldfish"),
            "carp is related to goldfish. a photo of a goldfish.",
        ),
        (
            ("Tinca tinca", "/r/Synonym", "tench", "tench"),
            "Tinca tinca is a synonym of tench. a photo of a tench.",
        ),
        (("feather", "/r/PartOf", "bird", "bird"), "feather is a part of bird. a photo of a bird."),
        (
            ("a feather", "/r/AtLocation", "bird", "kite"),
            "You are likely to find a feather in bird. a photo of a kite.",
        ),
        (
            ("chicken", "/r/Antonym", "rooster", "rooster"),
            "chicken is the opposite of rooster. a photo of a rooster.",
        ),
        # ours: unknown relations read as words; class names as the zero-shot head spells them
        (
            ("walk", "/r/HasFirstSubevent", "stand up", "sea_lion"),
            "walk has first subevent stand up. a photo of a sea lion.",
        ),
        ((" big  cat ", "/r/IsA", "cat.", "lion"), "big cat is a type of cat. a photo of a lion."),
    ],
)
def test_verbalisation(triple: tuple[str, str, str, str], expected: str) -> None:
    assert verbalise(*triple) == expected


def test_bank_hops_dedup_and_descriptions() -> None:
    triples = [
        Triple("Sea_Lion", "sea lion", "/r/IsA", "seal", 0),
        Triple("sea lion", "sea lion", "/r/IsA", "seal", 0),  # same sentence: kept once
        Triple("sea lion", "seal", "/r/AtLocation", "the sea", 1),
        Triple("sea lion", "sea", "/r/RelatedTo", "water", 2),
        Triple("other", "x", "/r/IsA", "y", 0),
    ]
    desc = {"sea lion": ["a dark animal on rocks."], "cat": ["a small furry pet"]}
    names = ["sea_lion", "cat"]
    bank = build_bank(names, triples, desc, search_level=1, mode="sparse")
    assert bank == (
        (
            "sea lion is a type of seal. a photo of a sea lion.",
            "You are likely to find seal in the sea. a photo of a sea lion.",
        ),
        ("a small furry pet. a photo of a cat.",),  # no graph prompt: descriptions fill it
    )
    assert len(build_bank(names, triples, desc, search_level=0, mode="sparse")[0]) == 1
    assert len(build_bank(names, triples, desc, search_level=2, mode="sparse")[0]) == 3
    always = build_bank(names, triples, desc, search_level=0, mode="always")
    assert always[0][-1] == describe("a dark animal on rocks.", "sea_lion")
    assert always[0][-1] == "a dark animal on rocks. a photo of a sea lion."
    assert build_bank(names, triples, desc, 1, mode="never")[1] == ()
    assert build_bank(names, triples, desc, 1, mode="sparse", min_kg_prompts=3)[0][-1].startswith(
        "a dark animal"
    )


def test_loader_names_classes_without_prompts_and_the_command(tmp_path: Path) -> None:
    d = tmp_path / "knowledge" / "dtd"
    write_triples(d / "conceptnet.tsv", [Triple("banded", "band", "/r/RelatedTo", "stripe", 0)])
    assert read_triples(d / "conceptnet.tsv") == [
        Triple("banded", "band", "/r/RelatedTo", "stripe", 0)
    ]
    with pytest.raises(DataNotFoundError) as err:
        load_prompt_bank(["banded", "blotchy", "braided"], d, "dtd", descriptions="never")
    msg = str(err.value)
    assert "\n" not in msg and "2 of 3 classes" in msg and "'blotchy', 'braided'" in msg
    assert "python scripts/prepare_data.py --knowledge dtd" in msg
    with pytest.raises(DataNotFoundError, match=r"no knowledge triples at .*--knowledge eurosat"):
        load_prompt_bank(["forest"], tmp_path / "knowledge" / "eurosat", "eurosat")
    (d / "conceptnet.tsv").write_text("class\thead\trelation\ttail\thop\nbanded\tb\t/r/IsA\tc\tx\n")
    with pytest.raises(MalformedDataError, match=r"line 2: hop 'x'"):
        load_prompt_bank(["banded"], d, "dtd")
    (d / "conceptnet.tsv").write_text("banded\tb\t/r/IsA\tc\t0\n")
    with pytest.raises(MalformedDataError, match="header"):
        load_prompt_bank(["banded"], d, "dtd")
    assert knowledge_dir("auto", tmp_path, "dtd") == d  # no packaged assets for dtd
    assert knowledge_dir("auto", tmp_path, "shapes").parts[-3:] == ("assets", "shapes", "knowledge")


def test_shapes_assets_cover_every_class_in_tiny_clip_words() -> None:
    from open_clip.tokenizer import _tokenizer

    from reprolab.models.tiny_clip import weights_path

    bank = load_prompt_bank(SHAPES, knowledge_dir("auto", None, "shapes"), "shapes")
    assert all(2 <= n <= 8 for n in bank.sizes), bank.sizes
    assert bank.prompts[SHAPES.index("crescent")][0].startswith("a drawing of a crescent")
    known = set(torch.load(weights_path(), weights_only=True)["token_ids"].tolist())
    triples = read_triples(knowledge_dir("auto", None, "shapes") / "conceptnet.tsv")
    # the words that carry the information: classes and both ends of every triple
    words = {w for t in triples for w in f"{t.cls} {t.head} {t.tail}".split()} | set(SHAPES)
    unknown = sorted(w for w in words if any(i not in known for i in _tokenizer.encode(w)))
    assert not unknown, f"tiny_clip has zero embeddings for {unknown}"


# ------------------------------------------------------------------------------------------------
# Building the triples from ConceptNet (scripts/prepare_data.py --knowledge)


def _edge(rel: str, start: str, end: str, surface: str | None, **extra) -> dict:
    return {
        "rel": {"@id": rel},
        "start": {"@id": start},
        "end": {"@id": end},
        "surfaceText": surface,
        **extra,
    }


FIXTURE_EDGES = [
    _edge("/r/IsA", "/c/en/circle/n", "/c/en/shape", "[[circle]] is a type of [[shape]]"),
    _edge("/r/RelatedTo", "/c/en/ring", "/c/en/circle", "[[ring]] is related to [[circle]]"),
    _edge(
        "/r/Synonym", "/c/fr/cercle", "/c/en/circle", "[[cercle]] is a translation of [[circle]]"
    ),
    _edge(
        "/r/Synonym", "/c/ja/円", "/c/en/circle", "[[円]] is a translation of [[circle]]"
    ),  # not ASCII
    _edge("/r/ExternalURL", "/c/en/circle", "http://dbpedia.org/resource/Circle", None),
    _edge("/r/FormOf", "/c/en/circles", "/c/en/circle", None),  # RPLKG drops edges without text
    _edge(
        "/r/HasA",
        "/c/en/shape",
        "/c/en/corner",
        "[[a shape]] has [[a corner]]",
        surfaceStart="a shape",
        surfaceEnd="a corner",
    ),  # hop 1 (via shape)
    _edge("/r/IsA", "/c/en/corner", "/c/en/point", "[[corner]] is a type of [[point]]"),  # hop 2
    _edge(
        "/r/PartOf", "/c/en/point", "/c/en/star", "[[point]] is a part of [[star]]"
    ),  # star, hop 0
]
FIXTURE_EXPECTED = [
    ("circle", "circle", "/r/IsA", "shape", 0),
    ("circle", "ring", "/r/RelatedTo", "circle", 0),
    ("circle", "cercle", "/r/TranslationOf", "circle", 0),
    ("circle", "a shape", "/r/HasA", "a corner", 1),
    ("circle", "ring", "/r/RelatedTo", "circle", 1),  # a triple seen at hop 0 keeps hop 0 ...
    ("star", "point", "/r/PartOf", "star", 0),
    ("star", "corner", "/r/IsA", "point", 1),
    ("ring", "ring", "/r/RelatedTo", "circle", 0),
    ("ring", "circle", "/r/IsA", "shape", 1),  # via circle; the French node is not walked
    ("ring", "cercle", "/r/TranslationOf", "circle", 1),
]


def _expected(level: int, classes: tuple[str, ...] = ("circle", "star", "ring")) -> list[Triple]:
    seen, out = set(), []
    for c, h, r, t, hop in FIXTURE_EXPECTED:
        if c in classes and hop <= level and (c, h, r, t) not in seen:  # ... so it appears once
            seen.add((c, h, r, t))
            out.append(Triple(c, h, r, t, hop))
    return sorted(out, key=repr)


def _fake_edges_of(terms: set[str]):
    from reprolab.data.knowledge import concept_term

    return [
        e
        for e in FIXTURE_EDGES
        if concept_term(e["start"]["@id"]) in terms or concept_term(e["end"]["@id"]) in terms
    ]


def _prepare_data():
    spec = importlib.util.spec_from_file_location(
        "_prepare_data", ROOT / "scripts" / "prepare_data.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_collect_triples_walks_hops_and_filters_like_rplkg() -> None:
    assert class_term("kite (bird of prey)") == "/c/en/kite"
    assert class_term("Sea_Lion") == "/c/en/sea_lion"
    two = ("circle", "star")
    got = collect_triples(list(two), _fake_edges_of, search_level=1)
    assert sorted(got, key=repr) == _expected(1, two)
    assert [(t.cls, t.hop) for t in got] == sorted(  # class order, then hop
        [(t.cls, t.hop) for t in got], key=lambda x: (two.index(x[0]), x[1])
    )
    got = collect_triples(list(two), _fake_edges_of, search_level=0)
    assert sorted(got, key=repr) == _expected(0, two)


def test_prepare_data_builds_triples_from_the_api(tmp_path: Path, monkeypatch, capsys) -> None:
    cli = _prepare_data()
    urls: list[str] = []

    def fetch_json(url: str, timeout: float = 60.0) -> dict:
        urls.append(url)
        term = url.split("api.conceptnet.io")[1].split("?")[0]
        return {"edges": _fake_edges_of({term})}

    monkeypatch.setattr(cli, "fetch_json", fetch_json)
    args = [
        "--knowledge",
        "shapes",
        "--root",
        str(tmp_path),
        "--api-delay",
        "0",
        "--search-level",
        "1",
    ]
    assert cli.main(args) == 0
    path = tmp_path / "knowledge" / "shapes" / "conceptnet.tsv"
    assert sorted(read_triples(path), key=repr) == _expected(1)
    assert "https://api.conceptnet.io/c/en/circle?offset=0&limit=1000" in urls
    err = capsys.readouterr().err
    assert "7 classes without a triple (square, triangle, cross," in err  # 10 shapes, 3 found
    bank = load_prompt_bank(["circle", "star"], path.parent, "shapes", descriptions="never")
    assert "a shape has a corner. a photo of a circle." in bank.prompts[0]


def test_prepare_data_reads_the_assertions_dump_by_url(tmp_path: Path) -> None:
    cli = _prepare_data()
    dump = tmp_path / "conceptnet-assertions-5.7.0.csv.gz"
    with gzip.open(dump, "wt", encoding="utf-8") as f:
        for e in FIXTURE_EDGES:
            info = {k: e[k] for k in ("surfaceText", "surfaceStart", "surfaceEnd") if k in e}
            uri = f"/a/[{e['rel']['@id']}/,{e['start']['@id']}/,{e['end']['@id']}/]"
            f.write(
                "\t".join(
                    [uri, e["rel"]["@id"], e["start"]["@id"], e["end"]["@id"], json.dumps(info)]
                )
                + "\n"
            )
    root = tmp_path / "data"
    args = ["--knowledge", "shapes", "--root", str(root), "--conceptnet", dump.as_uri()]
    assert cli.main([*args, "--search-level", "0"]) == 0
    path = root / "knowledge" / "shapes" / "conceptnet.tsv"
    assert sorted(read_triples(path), key=repr) == _expected(0)
    assert cli.main(args) == 0  # default search level 1, rewritten in place
    assert sorted(read_triples(path), key=repr) == _expected(1)


def test_prepare_data_offline_fails_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import urllib.error

    cli = _prepare_data()

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cli.urllib.request, "urlopen", offline)
    assert cli.main(["--knowledge", "shapes", "--root", str(tmp_path), "--api-delay", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("shapes: ConceptNet: cannot read")
    assert "name resolution" in err and "--conceptnet" in err
    assert not (tmp_path / "knowledge").exists()


# ------------------------------------------------------------------------------------------------
# The method on tiny_clip


@pytest.fixture(scope="module")
def tiny_clip():
    from reprolab.models import tiny_clip as tc
    from reprolab.models.clip import CLIPBackbone

    return CLIPBackbone("tiny_clip", tc.TINY_CLIP_ARCH, pretrained=str(tc.weights_path()))


def _method(backbone, **kw) -> EPLKG:
    names = tuple(SHAPES[:6])
    info = ImageClassificationInfo(
        name="shapes",
        classnames=names,
        templates=("a photo of a {}.",),
        test_sets=(Set("base", "id"), Set("new", "new", classnames=tuple(SHAPES[6:]))),
    )
    opt = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    return EPLKG("eplkg", backbone, info, optimizer=opt, **kw)


def test_eval_logits_with_alpha_zero_are_the_bank_ensemble(tiny_clip) -> None:
    m = _method(tiny_clip, alpha=0.0).eval()
    feats = torch.randn(7, 128)
    bank: PromptBank = m.prompt_bank(m.classnames)
    with torch.no_grad():
        heads = [
            F.normalize(tiny_clip.encode_text(list(p)).float(), dim=-1).mean(0)
            for p in bank.prompts
        ]
        ref = (
            tiny_clip.logit_scale
            * F.normalize(feats, dim=-1)
            @ F.normalize(torch.stack(heads), dim=-1).t()
        )
        assert torch.allclose(m.class_logits(feats, m.classnames), ref, atol=1e-4)
        new = list(SHAPES[6:])  # the new classes' bank (crescent from its descriptions)
        assert m.new_class_logits(feats, new).shape == (7, 4)
        first = m.bank_tensors(new)
        assert m.bank_tensors(new)[0] is first[0]  # encoded once
    assert m.prompt_bank(new).prompts[-1][0] == "a drawing of a crescent. a photo of a crescent."
    picks = m.selected_prompts(feats, m.classnames)
    assert picks.shape == (7, 6) and bool((picks < torch.tensor(bank.sizes)).all())


def test_only_the_three_maps_train_and_train_terms_are_logged(tiny_clip) -> None:
    from _group_helpers import BatchData, fit_batches

    m = _method(tiny_clip)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"selector.w_{x}.1.{w}" for x in "qkv" for w in ("weight", "bias")}
    assert m.data_requirements()["features"].backbone == "tiny_clip"  # cached features by default
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    torch.manual_seed(0)
    batches = [{"image": torch.randn(8, 128), "label": torch.randint(6, (8,))} for _ in range(3)]
    trainer = fit_batches(m, BatchData(batches))
    after = dict(m.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    # W_k's bias adds q·b to every prompt of a class alike, which the softmax ignores: no gradient
    assert changed <= trainable and {n for n in trainable if n != "selector.w_k.1.bias"} <= changed
    logged = trainer.callback_metrics
    assert math.isfinite(float(logged["train/loss"])) and float(
        logged["train/tau"]
    ) == pytest.approx(2.0)
    assert "train/tau" in EPLKG.metric_keys()


def test_bad_options_fail_in_one_line(tiny_clip, tmp_path: Path) -> None:
    from reprolab.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match="num_select must be 1"):
        _method(tiny_clip, num_select=3)
    with pytest.raises(ConfigValueError, match="tau_schedule must be one of"):
        _method(tiny_clip, tau_schedule="linear")
    with pytest.raises(DataNotFoundError, match="--knowledge shapes"):
        _method(tiny_clip, knowledge_source="data", knowledge_root=str(tmp_path))


def test_tiny_clip_base_to_new_smoke_run(tmp_path: Path) -> None:
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            "model=tiny_clip",
            "data=shapes",
            "method=eplkg",
            "trainer=cpu",
            "logger=csv",
            "debug=fdr",
            "progress_bar=false",
            "threads=1",
            "data.num_shots=4",
            "data.subsample_classes=base_to_new",
            f"paths.log_dir={tmp_path}",
            f"paths.data_dir={tmp_path / 'data'}",
        ]
    )
    metrics = run(cfg)["metrics"]
    assert metrics["params/trainable"] == 3 * (128 * 128 + 128)
    for key in ("test/base_acc", "test/new_acc", "test/hm"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["test/new_acc"] > 50.0  # tiny_clip knows the shapes; chance is 25 %
    assert any((tmp_path / "data" / "features").rglob("*.pt"))  # trained on cached features
