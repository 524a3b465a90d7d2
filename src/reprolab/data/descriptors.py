"""Class descriptor files: per class, short visual features that DCLIP-style prompts describe.

Used by the comparative-descriptor classifier (Comparative-CLIP: "Enhancing Visual Classification
using Comparative Descriptors", WACV 2025, arXiv 2411.05357; spec robustness_ood_prompting.md §7) and
its DCLIP baseline (Menon & Vondrick, "Visual Classification via Description from Large Language
Models", ICLR 2023). Descriptors are data, like class names and templates.

File layout (the upstream release's, `hk1ee/Comparative-CLIP: descriptors/*_descriptors/*.json`):
one JSON object per dataset and kind, `{class name: [descriptor, ...]}`, e.g.

    {"square": ["four corner", "a corner in the top left corner"], "triangle": ["three corner"]}

- `kind` is `comparative` (features that tell class c from each of its most similar classes c',
  concatenated over c', duplicates kept) or `plain` (DCLIP: features of c alone).
- Keys are matched to the task's class names case-insensitively, with `_` read as a space and, failing
  that, ignoring word order ("AM General Hummer SUV 2000" = "2000 AM General Hummer SUV"). A file may
  hold more classes than the task (a class subset, a base/new split); every class of the task must
  be there. An empty list is allowed: that class is classified by its class-name prompt alone.
- Where: `<data_root>/descriptors/<dataset>/<kind>.json` (written by `scripts/generate_descriptors.py`:
  `--fetch <dataset>` downloads the released files, or an LLM generates them), else the packaged
  `reprolab/data/assets/<dataset>/descriptors/<kind>.json` (the hand-written shapes files). The data
  root wins, so a generated file replaces a packaged one.
- `similar_classes.json` next to them: `{class name: [its n most similar class names]}` (step 1).

A descriptor d of class c becomes the sentence s(c, d) = `{prefix}{c}, {make_descriptor_sentence(d)}.`
with the prefix "A photo of a " (`upstream tools.load_gpt_descriptions`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reprolab.data.spec import DataNotFoundError, assets_dir, malformed

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("comparative", "plain")
DEFAULT_PREFIX = "A photo of a "  # upstream `--label_before_text` default
SUFFIX = "."  # upstream `--label_after_text`
SIMILAR_FILE = "similar_classes.json"
MAX_NAMED = 3  # missing classes named in an error before the count

# Descriptor openings after which "which" alone reads as a sentence (DCLIP's rule, kept upstream).
_VERB_OPENINGS = ("has", "often", "typically", "may", "can")


def wordify(name: str) -> str:
    """A class name as prompt text (`sea_lion` -> "sea lion")."""
    return name.replace("_", " ")


def make_descriptor_sentence(descriptor: str) -> str:
    """The relative clause a descriptor becomes (DCLIP / Comparative-CLIP `make_descriptor_sentence`).

    Rules, checked in this order, on the raw string (case-sensitive character prefixes, as upstream,
    so "angular wings" also counts as starting with "a" and "cane" with "can"):
    - starts with "a" (covers "a ..." and "an ..."): "which is {d}";
    - starts with "has", "often", "typically", "may" or "can": "which {d}";
    - starts with "used": "which is {d}";
    - empty: "" (the caller then uses the bare class prompt);
    - otherwise: "which has {d}".
    """
    if descriptor.startswith("a"):
        return f"which is {descriptor}"
    if descriptor.startswith(_VERB_OPENINGS):
        return f"which {descriptor}"
    if descriptor.startswith("used"):
        return f"which is {descriptor}"
    if descriptor == "":
        return ""
    return f"which has {descriptor}"


def class_sentence(classname: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The class-name prompt: "A photo of a {c}." (CLIP's row, and s(c, "") )."""
    return f"{prefix}{wordify(classname)}{SUFFIX}"


def descriptor_sentence(classname: str, descriptor: str, prefix: str = DEFAULT_PREFIX) -> str:
    """s(c, d) = "{prefix}{c}, {make_descriptor_sentence(d)}." (the class prompt when d is empty)."""
    clause = make_descriptor_sentence(descriptor)
    if not clause:
        return class_sentence(classname, prefix)
    return f"{prefix}{wordify(classname)}, {clause}{SUFFIX}"


# -- files ------------------------------------------------------------------------------------


def descriptor_dir(dataset: str, root: str | Path) -> Path:
    """`<root>/<dataset>/`: where generated descriptor files of `dataset` go (`root` =
    `<data_root>/descriptors`)."""
    return Path(root) / dataset


def packaged_path(dataset: str, kind: str) -> Any:
    """The packaged descriptor file of `dataset` (a `Traversable`; it may not exist)."""
    return assets_dir().joinpath(dataset, "descriptors", f"{kind}.json")


def make_command(dataset: str, kind: str) -> str:
    """The command that writes `<data_root>/descriptors/<dataset>/<kind>.json`."""
    return (
        f"`python scripts/generate_descriptors.py --fetch {dataset}` (the released files) or "
        f"`python scripts/generate_descriptors.py {dataset} --kind {kind} ...` (generate them)"
    )


def find_descriptor_file(dataset: str, kind: str, root: str | Path | None) -> Any:
    """The descriptor file to read: the data root's, else the packaged one.

    Raises:
        DataNotFoundError: neither exists (one line naming both places and the command).
    """
    if kind not in KINDS:
        raise ValueError(f"descriptor kind must be one of {KINDS}, got {kind!r}")
    looked = []
    if root is not None:
        path = descriptor_dir(dataset, root) / f"{kind}.json"
        if path.is_file():
            return path
        looked.append(str(path))
    packaged = packaged_path(dataset, kind)
    if packaged.is_file():
        return packaged
    looked.append(f"reprolab/data/assets/{dataset}/descriptors/{kind}.json")
    raise DataNotFoundError(
        f"No {kind} descriptors for dataset {dataset} (looked in {' and '.join(looked)}); make "
        f"them with {make_command(dataset, kind)}."
    )


def read_descriptor_file(path: Any) -> dict[str, list[str]]:
    """A descriptor file as `{class name: [descriptor, ...]}`, in file order, schema checked."""
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise malformed(path, f"is not readable JSON ({e})", "regenerate it") from e
    if not isinstance(table, dict) or not table:
        raise malformed(
            path, "must be a non-empty JSON object {class name: [descriptor, ...]}", "regenerate it"
        )
    for key, value in table.items():
        if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
            raise malformed(
                path, f"class {key!r} must map to a list of strings, got {value!r:.60}", "fix it"
            )
    return {str(k): list(v) for k, v in table.items()}


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").casefold().split())


def _bag(name: str) -> str:
    return " ".join(sorted(_norm(name).split()))


def match_keys(classnames: Sequence[str], keys: Sequence[str]) -> list[str | None]:
    """For each class name, the key of a descriptor table it matches (None when none does).

    Exact first, then case / underscore / spacing-insensitive, then also word-order-insensitive. A
    normalised form shared by two keys is ambiguous and only matches exactly.
    """
    exact = set(keys)
    by: list[dict[str, str | None]] = [{}, {}]
    for k in keys:
        for table, form in zip(by, (_norm(k), _bag(k)), strict=True):
            table[form] = None if form in table else k  # None marks an ambiguous form
    out: list[str | None] = []
    for c in classnames:
        if c in exact:
            out.append(c)
            continue
        out.append(by[0].get(_norm(c)) or by[1].get(_bag(c)))
    return out


def missing_message(missing: Sequence[str], total: int, where: str, dataset: str, kind: str) -> str:
    """One line: which classes (a few, then a count) a descriptor file lacks, and the fix."""
    named = ", ".join(repr(m) for m in missing[:MAX_NAMED])
    more = f" and {len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else ""
    return (
        f"{where} lacks {len(missing)} of the task's {total} classes ({named}{more}); make a "
        f"file for this dataset's class names with {make_command(dataset, kind)}."
    )


def descriptors_for(
    classnames: Sequence[str],
    table: Mapping[str, Sequence[str]],
    where: str = "the descriptor file",
    dataset: str = "<dataset>",
    kind: str = "comparative",
) -> list[list[str]]:
    """Per class of the task (in its order), that class's descriptors from `table`.

    Raises:
        DataNotFoundError: some classes are not in the table (one line: a few names, then a count,
            and the command that makes the file).
    """
    keys = match_keys(classnames, list(table))
    missing = [c for c, k in zip(classnames, keys, strict=True) if k is None]
    if missing:
        raise DataNotFoundError(missing_message(missing, len(classnames), where, dataset, kind))
    return [list(table[k]) for k in keys]  # type: ignore[index]


def load_descriptors(
    dataset: str,
    kind: str,
    classnames: Sequence[str],
    root: str | Path | None = None,
    path: str | Path | None = None,
) -> list[list[str]]:
    """The descriptors of every class of a task, in its class order.

    Args:
        dataset: name the files are kept under (`<root>/<dataset>/<kind>.json`).
        kind: `comparative` or `plain`.
        classnames: the task's class names.
        root: `<data_root>/descriptors` (None: packaged files only).
        path: an explicit file, instead of the lookup.
    """
    if path is not None:
        file: Any = Path(path)
        if not file.is_file():
            raise DataNotFoundError(
                f"Descriptor file {file} does not exist; point method.descriptor_file at a JSON "
                f"{{class name: [descriptor, ...]}} or make one with {make_command(dataset, kind)}."
            )
    else:
        file = find_descriptor_file(dataset, kind, root)
    table = read_descriptor_file(file)
    out = descriptors_for(classnames, table, str(file), dataset, kind)
    n = sum(len(d) for d in out)
    log.info("%s descriptors for %d classes from %s (%d in all)", kind, len(out), file, n)
    return out


def write_descriptor_file(path: str | Path, table: Mapping[str, Sequence[str]]) -> Path:
    """Write `{class name: [descriptor, ...]}` as indented UTF-8 JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(
        json.dumps({k: list(v) for k, v in table.items()}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    tmp.replace(path)
    return path
