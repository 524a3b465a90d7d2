"""Knowledge-graph prompt banks as data: ConceptNet triples and descriptions, verbalised per class.

EPLKG (formerly RPLKG: "Robust Prompt Learning with Knowledge Graph", arXiv 2304.10805; v3
"Efficient Prompt Learning with Knowledge Graph") classifies with one prompt per image-class pair,
picked from a per-class bank of sentences built from ConceptNet (robustness_ood_prompting.md §5.1).
This module holds the bank as data: the files, their verbalisation, and the loader. No model here;
the method (`reprolab.methods.prompting.eplkg`) encodes the sentences with the frozen text tower.

Files, per dataset, in one folder (`knowledge_dir`): `<data_root>/knowledge/<dataset>/` for real
datasets (written by `python scripts/prepare_data.py --knowledge <dataset>`), or the packaged
`reprolab/data/assets/<dataset>/knowledge/` (the synthetic worlds, hand-written):

- `conceptnet.tsv` (required): UTF-8, tab-separated. Lines starting with `#` are comments
  (provenance: source, search level, date). The first other line is the header
  `class<TAB>head<TAB>relation<TAB>tail<TAB>hop`; then one triple per line:
  - `class`: the dataset class the triple was found for (matched case-insensitively, `_` = space);
  - `head`, `tail`: the two concepts as ConceptNet labels ("tench", "a feather");
  - `relation`: a ConceptNet relation id (`/r/IsA`); a cross-language `/r/Synonym` is written as
    `/r/TranslationOf` (ConceptNet's surface text for it is "is a translation of");
  - `hop`: 0 for an edge of the class concept itself, h for an edge of a concept h hops away.
- `descriptions.json` (optional): `{"<class>": ["<sentence>", ...], ...}`, visual descriptions (an
  LLM's in EPLKG v3, hand-written stand-ins for the synthetic worlds). v3 adds them where the graph
  has little coverage (`descriptions: sparse`); its prompt wording is not published.

Verbalisation (`verbalise`): "<head> <relation words> <tail>. a photo of a <class>.", e.g.
"tench is a type of cyprinid. a photo of a tench.". The relation words are those of ConceptNet's
own surface texts, the form RPLKG's bank (`MLAI-Yonsei/RPLKG@main: sents.csv`, the edges'
`surfaceText` with the brackets removed) holds them in; `RELATION_TEMPLATES` lists the most frequent
ones of that file and of ConceptNet's WordNet / Wiktionary readers. A description d becomes
"<d>. a photo of a <class>." (our choice). Per class the prompts are deduplicated, in file order
(triples, then descriptions), and only triples with `hop <= search_level` are used.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprolab.data.spec import DataNotFoundError, assets_dir, malformed

TRIPLES_FILE = "conceptnet.tsv"
DESCRIPTIONS_FILE = "descriptions.json"
HEADER: tuple[str, ...] = ("class", "head", "relation", "tail", "hop")
SOURCES: tuple[str, ...] = ("auto", "packaged", "data")  # or a folder path
DESCRIPTION_MODES: tuple[str, ...] = ("never", "sparse", "always")
PHOTO = "a photo of a {}."  # RPLKG's suffix: "<triple>. a photo of a <class>."

#: Relation id -> sentence template. The wording is ConceptNet's surface text; the comment gives
#: its count among the 27,101 sentences of RPLKG's `sents.csv` where it occurs there.
RELATION_TEMPLATES: dict[str, str] = {
    "/r/RelatedTo": "{head} is related to {tail}",  # 8,787
    "/r/TranslationOf": "{head} is a translation of {tail}",  # 8,687 (cross-language Synonym)
    "/r/IsA": "{head} is a type of {tail}",  # 1,861 (WordNet's; crowd edges say "is a", "is a kind of")
    "/r/AtLocation": "You are likely to find {head} in {tail}",  # 1,658
    "/r/CapableOf": "{head} can {tail}",  # 935 "can" (with ReceivesAction's "can be")
    "/r/Synonym": "{head} is a synonym of {tail}",  # 808
    "/r/UsedFor": "{head} is used for {tail}",  # 341
    "/r/PartOf": "{head} is a part of {tail}",  # 287 (+ 47 "is part of")
    "/r/Antonym": "{head} is the opposite of {tail}",  # 169
    "/r/HasA": "{head} has {tail}",  # 84
    "/r/SimilarTo": "{head} is similar to {tail}",  # 27
    "/r/Desires": "{head} wants {tail}",  # 15
    "/r/HasProperty": "{head} is {tail}",
    "/r/ReceivesAction": "{head} can be {tail}",
    "/r/Causes": "{head} causes {tail}",
    "/r/Entails": "{head} entails {tail}",
    "/r/HasPrerequisite": "{head} requires {tail}",
    "/r/MadeOf": "{head} is made of {tail}",
    "/r/CreatedBy": "{head} is created by {tail}",
    "/r/HasContext": "{head} is used in the context of {tail}",
    "/r/DerivedFrom": "{head} is derived from {tail}",
    "/r/FormOf": "{head} is a form of {tail}",
    "/r/InstanceOf": "{head} is an instance of {tail}",
    "/r/DistinctFrom": "{head} is distinct from {tail}",
    "/r/LocatedNear": "{head} is located near {tail}",
    "/r/DefinedAs": "{head} is defined as {tail}",
    "/r/SymbolOf": "{head} is a symbol of {tail}",
    "/r/MannerOf": "{head} is a way of {tail}",
}


def relation_template(relation: str) -> str:
    """The sentence template of a relation id; an unknown one reads as its words.

    `/r/HasFirstSubevent` -> "{head} has first subevent {tail}"; `/r/dbpedia/genre` -> "{head}
    genre {tail}".
    """
    if relation in RELATION_TEMPLATES:
        return RELATION_TEMPLATES[relation]
    name = relation.rstrip("/").rsplit("/", 1)[-1]
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).replace("_", " ").lower()
    return "{head} " + " ".join(words.split()) + " {tail}"


def display_name(classname: str) -> str:
    """A class name as prompts spell it (`sea_lion` -> "sea lion", as the zero-shot head does)."""
    return " ".join(classname.replace("_", " ").split())


def class_key(classname: str) -> str:
    """The key classes are matched on between a file and a dataset (case and `_` ignored)."""
    return display_name(classname).lower()


def _sentence(text: str, classname: str) -> str:
    text = " ".join(text.split()).rstrip(". ")
    return f"{text}. {PHOTO.format(display_name(classname))}"


def verbalise(head: str, relation: str, tail: str, classname: str) -> str:
    """ "<head> <relation words> <tail>. a photo of a <class>." (one line, single spaces)."""
    return _sentence(relation_template(relation).format(head=head, tail=tail), classname)


def describe(description: str, classname: str) -> str:
    """A description as a prompt: "<description>. a photo of a <class>."."""
    return _sentence(description, classname)


@dataclass(frozen=True)
class Triple:
    """One knowledge-graph edge found for a class, `hop` edges away from it."""

    cls: str
    head: str
    relation: str
    tail: str
    hop: int

    def sentence(self) -> str:
        return verbalise(self.head, self.relation, self.tail, self.cls)


# ---------------------------------------------------------------------------------------- files


def read_triples(path: str | os.PathLike[str]) -> list[Triple]:
    """The triples of a `conceptnet.tsv` file, in file order (format: module docstring)."""
    path = Path(path)
    fix = "rebuild it with `python scripts/prepare_data.py --knowledge <dataset>`"
    lines = [
        (n, line)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if line.strip() and not line.startswith("#")
    ]
    if not lines or tuple(c.strip() for c in lines[0][1].split("\t")) != HEADER:
        raise malformed(path, f"the first row must be the header {' '.join(HEADER)} (tabs)", fix)
    out = []
    for n, line in lines[1:]:
        cells = line.split("\t")
        if len(cells) != len(HEADER) or not all(c.strip() for c in cells[:4]):
            raise malformed(path, f"line {n} has not 5 non-empty tab-separated fields", fix)
        cls, head, rel, tail, hop = (c.strip() for c in cells)
        if not hop.isdigit():
            raise malformed(path, f"line {n}: hop {hop!r} is not a non-negative integer", fix)
        out.append(Triple(cls, head, rel, tail, int(hop)))
    return out


def write_triples(
    path: str | os.PathLike[str], triples: Iterable[Triple], comments: Sequence[str] = ()
) -> Path:
    """Write triples atomically (temp file + rename), one per line after the header.

    Tabs and newlines inside a field are replaced by spaces (they would break the format).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    for c in comments:
        buf.write(f"# {' '.join(str(c).split())}\n")
    buf.write("\t".join(HEADER) + "\n")
    for t in triples:
        cells = [t.cls, t.head, t.relation, t.tail, str(int(t.hop))]
        buf.write("\t".join(" ".join(c.split()) for c in cells) + "\n")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(buf.getvalue())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def read_descriptions(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """`{class: [description, ...]}` from a `descriptions.json` file."""
    path = Path(path)
    fix = 'write it as {"<class>": ["<sentence>", ...]}'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise malformed(path, f"is not valid JSON ({err.msg}, line {err.lineno})", fix) from err
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()
    ):
        raise malformed(path, "must map each class name to a list of strings", fix)
    return {str(k): [s for s in v if s.strip()] for k, v in data.items()}


def packaged_dir(dataset: str) -> Path:
    """`reprolab/data/assets/<dataset>/knowledge` (may not exist)."""
    return Path(str(assets_dir().joinpath(dataset, "knowledge")))


def knowledge_dir(source: str, root: str | os.PathLike[str] | None, dataset: str) -> Path:
    """The folder holding a dataset's knowledge files.

    Args:
        source: `auto` (the packaged assets when the dataset has them, else the data root),
            `packaged`, `data` (`<root>/knowledge/<dataset>`), or a folder path.
        root: the data root (`paths.data_dir`).
        dataset: the dataset name (`data.dataset`).
    """
    if source == "packaged" or (source == "auto" and packaged_dir(dataset).is_dir()):
        return packaged_dir(dataset)
    if source in ("auto", "data"):
        return Path(root if root is not None else "data") / "knowledge" / dataset
    return Path(source)


def build_command(dataset: str) -> str:
    return f"python scripts/prepare_data.py --knowledge {dataset}"


# ----------------------------------------------------------------------------------------- bank


@dataclass(frozen=True)
class PromptBank:
    """Per class (in label order), the sentences of its bank."""

    classnames: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    source: str = ""

    @property
    def sizes(self) -> list[int]:
        return [len(p) for p in self.prompts]

    def flat(self) -> list[str]:
        """Every sentence, class after class (the order the sizes split)."""
        return [s for p in self.prompts for s in p]


def build_bank(
    classnames: Sequence[str],
    triples: Iterable[Triple],
    descriptions: Mapping[str, Sequence[str]] | None = None,
    search_level: int = 1,
    mode: str = "sparse",
    min_kg_prompts: int = 1,
) -> tuple[tuple[str, ...], ...]:
    """Per class: its deduplicated prompts (triples with hop <= search_level, then descriptions).

    Args:
        classnames: the classes, in label order.
        triples: triples of any classes (others are ignored).
        descriptions: `{class: [sentence, ...]}`, or None.
        search_level: the largest hop used (RPLKG's `SEARCH_LEVEL`, 1 in the headline runs).
        mode: `never`, `sparse` (descriptions only for classes with fewer than `min_kg_prompts`
            prompts from the graph: EPLKG v3's "where the KG has little coverage") or `always`.
        min_kg_prompts: the `sparse` threshold.
    """
    if mode not in DESCRIPTION_MODES:
        raise ValueError(f"descriptions mode {mode!r} is not one of {DESCRIPTION_MODES}")
    keys = [class_key(c) for c in classnames]
    name_of = dict(zip(keys, classnames, strict=True))  # the dataset's spelling in the suffix
    kg: dict[str, list[str]] = {k: [] for k in keys}
    for t in triples:
        k = class_key(t.cls)
        if k in kg and t.hop <= search_level:
            kg[k].append(verbalise(t.head, t.relation, t.tail, name_of[k]))
    desc = {class_key(c): list(v) for c, v in (descriptions or {}).items()}
    out = []
    for c, k in zip(classnames, keys, strict=True):
        prompts = kg[k]
        if mode == "always" or (mode == "sparse" and len(set(prompts)) < min_kg_prompts):
            prompts = prompts + [describe(d, c) for d in desc.get(k, [])]
        out.append(tuple(dict.fromkeys(prompts)))  # dedup, first occurrence kept
    return tuple(out)


def load_prompt_bank(
    classnames: Sequence[str],
    directory: str | os.PathLike[str],
    dataset: str,
    search_level: int = 1,
    descriptions: str = "sparse",
    min_kg_prompts: int = 1,
) -> PromptBank:
    """The prompt bank of `classnames` from the knowledge files in `directory`.

    Raises `DataNotFoundError` in one line when the triples file is missing or a class ends up
    without a prompt (naming the classes and the command that builds the file).
    """
    directory = Path(directory)
    triples_path = directory / TRIPLES_FILE
    if not triples_path.is_file():
        raise DataNotFoundError(
            f"EPLKG prompt bank for {dataset}: no knowledge triples at {triples_path}; build them "
            f"with `{build_command(dataset)}` (or set method.knowledge_source to a folder that has "
            f"{TRIPLES_FILE})."
        )
    desc_path = directory / DESCRIPTIONS_FILE
    desc = None
    if descriptions != "never" and desc_path.is_file():
        desc = read_descriptions(desc_path)
    elif descriptions == "always":
        raise DataNotFoundError(
            f"EPLKG prompt bank for {dataset}: descriptions=always, but {desc_path} does not "
            "exist; add it (class -> list of sentences) or set method.descriptions=sparse."
        )
    prompts = build_bank(
        classnames, read_triples(triples_path), desc, search_level, descriptions, min_kg_prompts
    )
    empty = [c for c, p in zip(classnames, prompts, strict=True) if not p]
    if empty:
        shown = ", ".join(repr(c) for c in empty[:5]) + (
            f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        )
        raise DataNotFoundError(
            f"EPLKG prompt bank for {dataset}: {len(empty)} of {len(classnames)} classes have no "
            f"prompt in {directory} (hop <= {search_level}, descriptions={descriptions}): {shown}; "
            f"rebuild the triples with `{build_command(dataset)}`, raise method.search_level, or "
            f"add their descriptions to {desc_path}."
        )
    return PromptBank(tuple(classnames), prompts, str(directory))


# ------------------------------------------------------------------ building from ConceptNet
# The pure part of `scripts/prepare_data.py --knowledge`: given a way to list the edges of some
# concepts (the web API, or a pass over the assertions dump), walk `search_level` hops out from
# each class. The network lives in the script.

Edge = Mapping[str, Any]  # a ConceptNet 5 edge as the API serves it (`rel`, `start`, `end`, ...)
_PLAIN = re.compile(r"^[a-zA-Z0-9 ]*$")  # RPLKG's filter on the surface text (brackets removed)


def concept_term(uri: str) -> str:
    """`/c/en/tench/n/wn/animal` -> `/c/en/tench` (language and term, without the sense)."""
    parts = uri.split("/")
    return "/".join(parts[:4]) if len(parts) >= 4 and parts[1] == "c" else uri


def class_term(classname: str, language: str = "en") -> str:
    """The ConceptNet concept of a class name: lower case, no parenthetical, `_` between words.

    "kite (bird of prey)" -> `/c/en/kite`; "Sea_Lion" -> `/c/en/sea_lion`.
    """
    name = re.sub(r"\([^)]*\)", " ", display_name(classname)).lower()
    return f"/c/{language}/" + "_".join(name.split())


def _label(node: Any, surface: Any) -> str:
    if isinstance(surface, str) and surface.strip():
        return " ".join(surface.split())
    if isinstance(node, Mapping) and str(node.get("label", "")).strip():
        return " ".join(str(node["label"]).split())
    uri = node.get("@id", "") if isinstance(node, Mapping) else str(node)
    parts = str(uri).split("/")
    return parts[3].replace("_", " ") if len(parts) >= 4 else str(uri)


def _uri(node: Any) -> str:
    return str(node.get("@id", "")) if isinstance(node, Mapping) else str(node)


def edge_triple(edge: Edge, require_surface_text: bool = True) -> tuple[str, str, str] | None:
    """`(head, relation, tail)` of an edge, or None when RPLKG would drop it.

    RPLKG keeps an edge when it has a surface text made of ASCII letters, digits and spaces only
    (brackets removed). `/r/ExternalURL` links are never triples. A `/r/Synonym` between two
    languages is a translation (`/r/TranslationOf`).
    """
    rel = edge.get("rel")
    rel = str(rel.get("@id", "")) if isinstance(rel, Mapping) else str(rel or "")
    if not rel or rel == "/r/ExternalURL":
        return None
    start, end = edge.get("start"), edge.get("end")
    surface = edge.get("surfaceText")
    if surface is None and require_surface_text:
        return None
    text = surface if surface is not None else ""
    head = _label(start, edge.get("surfaceStart"))
    tail = _label(end, edge.get("surfaceEnd"))
    if not _PLAIN.match(str(text).replace("[", "").replace("]", "")) or not (
        _PLAIN.match(head) and _PLAIN.match(tail) and head.strip() and tail.strip()
    ):
        return None
    if rel == "/r/Synonym" and _uri(start).split("/")[2:3] != _uri(end).split("/")[2:3]:
        rel = "/r/TranslationOf"
    return head, rel, tail


def collect_triples(
    classnames: Sequence[str],
    edges_of: Callable[[set[str]], Iterable[Edge]],
    search_level: int = 1,
    language: str = "en",
    require_surface_text: bool = True,
) -> list[Triple]:
    """Triples within `search_level` hops of each class, deduplicated, in a stable order.

    Hop 0 holds the edges of the class concept; hop h the edges of the concepts (in `language`)
    reached after h edges. A triple found at several hops keeps the smallest.

    Args:
        classnames: the dataset's classes (their concepts: `class_term`).
        edges_of: concepts -> every edge with one of them as start or end.
        search_level: the largest hop.
        language: the language of the concepts walked through.
        require_surface_text: drop edges without a surface text (RPLKG's crawl did).
    """
    frontier = {c: {class_term(c, language)} for c in classnames}
    visited = {c: set(f) for c, f in frontier.items()}
    found: dict[tuple[str, str, str, str], int] = {}
    prefix = f"/c/{language}/"
    for hop in range(search_level + 1):
        wanted = set().union(*frontier.values()) if frontier else set()
        if not wanted:
            break
        by_term: dict[str, list[Edge]] = {}
        for edge in edges_of(wanted):
            for uri in (_uri(edge.get("start")), _uri(edge.get("end"))):
                term = concept_term(uri)
                if term in wanted:
                    by_term.setdefault(term, []).append(edge)
        nxt: dict[str, set[str]] = {}
        for c, terms in frontier.items():
            nxt[c] = set()
            for term in sorted(terms):
                for edge in by_term.get(term, []):
                    triple = edge_triple(edge, require_surface_text)
                    if triple is None:
                        continue
                    key = (c, *triple)
                    found[key] = min(found.get(key, hop), hop)
                    for uri in (_uri(edge.get("start")), _uri(edge.get("end"))):
                        t = concept_term(uri)
                        if t.startswith(prefix) and t not in visited[c]:
                            nxt[c].add(t)
            visited[c] |= nxt[c]
        frontier = nxt
    order = {c: i for i, c in enumerate(classnames)}
    return [
        Triple(c, h, r, t, hop)
        for (c, h, r, t), hop in sorted(
            found.items(), key=lambda kv: (order[kv[0][0]], kv[1], kv[0][2], kv[0][1], kv[0][3])
        )
    ]


def dump_row_edge(row: Sequence[str]) -> Edge | None:
    """An edge from a row of ConceptNet's assertions dump (`conceptnet-assertions-5.7.0.csv`).

    Rows are tab-separated: assertion URI, relation, start, end, JSON info (`surfaceText`,
    `surfaceStart`, `surfaceEnd`, `weight`, ...). Returns None for a malformed row.
    """
    if len(row) < 5:
        return None
    try:
        info = json.loads(row[4])
    except json.JSONDecodeError:
        return None
    return {
        "rel": {"@id": row[1]},
        "start": {"@id": row[2]},
        "end": {"@id": row[3]},
        "surfaceText": info.get("surfaceText"),
        "surfaceStart": info.get("surfaceStart"),
        "surfaceEnd": info.get("surfaceEnd"),
    }


def dump_edges(lines: Iterable[str], terms: set[str]) -> Iterable[Edge]:
    """The edges of a dump (text lines) with a start or end concept in `terms`."""
    for line in lines:
        row = line.rstrip("\r\n").split("\t")  # JSON escapes tabs, so a field never holds one
        if len(row) >= 4 and (concept_term(row[2]) in terms or concept_term(row[3]) in terms):
            edge = dump_row_edge(row)
            if edge is not None:
                yield edge
