"""Prepare, check and list the real datasets (the one place that may use the network).

    python scripts/prepare_data.py caltech101 [dtd ...] [--root DIR]   # download / build, then verify
    python scripts/prepare_data.py --list [--root DIR]                  # every dataset: source, sizes, status
    python scripts/prepare_data.py --check caltech101 [--root DIR]      # verify a prepared dataset
    python scripts/prepare_data.py --manual objectnet                   # print the manual steps
    python scripts/prepare_data.py --knowledge dtd [--conceptnet SRC]   # EPLKG's ConceptNet triples

NAME is a data config (`configs/data/<NAME>.yaml`, whose `dataset` and `dataset_kwargs` are used, e.g.
`loc_mnist_f4`) or a registered dataset name. The root defaults to $DATA_ROOT, else ./data. `--list`
and `--check` never touch the network, and both judge a tree with the same check (`tree_status`):
`ready` (files present, split files readable, sizes and classes as expected), `missing`, or `bad`
(present but wrong: a malformed split file, wrong sizes), with the reason below the table.

`--knowledge` writes EPLKG's prompt-bank triples, `<root>/knowledge/<dataset>/conceptnet.tsv`
(`reprolab.data.knowledge`): every ConceptNet edge within `--search-level` hops of each class. The
source is the ConceptNet 5 web API (default; RPLKG's own crawl, one request per concept and page) or
the assertions dump (`conceptnet-assertions-5.7.0.csv.gz`, a path or URL; one pass per hop), which
is faster for hop >= 1 on large label sets. The network is used here only.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))

from reprolab.data.spec import (  # noqa: E402
    DataNotFoundError,
    DatasetSpec,
    MalformedDataError,
    available,
    get_spec,
)

CONFIG_DIR = PROJECT_ROOT / "configs" / "data"
CONCEPTNET_API = "https://api.conceptnet.io"
API_PAGE = 1000  # edges per API request (RPLKG's `limit=1000`)


def resolve(name: str) -> tuple[str, dict]:
    """(registry name, kwargs) for a data config name or a registry name."""
    cfg_path = CONFIG_DIR / f"{name}.yaml"
    if cfg_path.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(cfg_path)
        kw = cfg.get("dataset_kwargs")
        kwargs = OmegaConf.to_container(kw, resolve=False) if kw else {}
        return str(cfg.get("dataset", name)), dict(kwargs)
    return name, {}


def spec_for(name: str) -> DatasetSpec:
    dataset, kwargs = resolve(name)
    return get_spec(dataset, **kwargs)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return (
        text
        if isinstance(err, (DataNotFoundError, ValueError))
        else f"{type(err).__name__}: {text}"
    )


def tree_status(spec: DatasetSpec, root: Path) -> tuple[str, str, dict[str, int]]:
    """(status, reason, split sizes) of `spec`'s tree under `root`: what `--check` and `--list` say.

    `ready` needs the files (`check`) and the prepared data to verify (`verify`: readable split
    files, split sizes, class count); `missing` means files are absent; `bad` means the tree is
    there but wrong (the reason, one line, names the file). Never raises for a damaged tree.
    """
    try:
        spec.check(root)
        found = spec.verify(root) if hasattr(spec, "verify") else {}
    except MalformedDataError as err:
        return "bad", _one_line(err), {}
    except DataNotFoundError as err:
        return "missing", _one_line(err), {}
    except Exception as err:  # noqa: BLE001 - a damaged tree is reported, never a traceback
        return "bad", _one_line(err), {}
    return "ready", "", dict(found)


def _n(v: int | None) -> str:
    return "?" if v is None else f"{v:,}"


def rows(root: Path) -> list[dict[str, str]]:
    """One row per data config of a real dataset, plus registered datasets without a config.

    A `bad` row carries its reason in `reason` (printed below the table).
    """
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    covered = {resolve(n)[0] for n in names}
    names += [n for n in available() if n not in covered]
    out = []
    for name in names:
        try:
            spec = spec_for(name)
        except KeyError:
            continue
        except Exception as err:  # noqa: BLE001 - e.g. an empty class-names asset: report, go on
            out.append(
                {
                    **dict.fromkeys(("classes", "train", "val", "test", "disk"), "-"),
                    "name": name,
                    "status": "bad",
                    "source": "-",
                    "reason": _one_line(err),
                }
            )
            continue
        info = spec.info() if hasattr(spec, "info") else None
        if info is None:
            out.append(
                {
                    "name": name,
                    "classes": str(len(spec.classnames)) if spec.classnames else "-",
                    "train": "-",
                    "val": "-",
                    "test": "-",
                    "disk": "-",
                    "status": "generated",
                    "source": spec.source or "synthetic (generated on the fly)",
                }
            )
            continue
        exp = info["expected"]
        total = info.get("total")
        status, reason, _ = tree_status(spec, root)
        row = {
            "name": name,
            "classes": str(info["classes"]) if info.get("classes") else "-",
            "train": _n(exp.get("train")),
            "val": _n(exp.get("val")),
            "test": _n(exp.get("test")),
            "disk": info["disk"],
            "status": status,
            "source": info["source"]
            + (f" [{total:,} images in all]" if total else "")
            + (f" [{info['note']}]" if info.get("note") else ""),
        }
        if status == "bad":
            row["reason"] = reason
        out.append(row)
    return out


# ---------------------------------------------------------------- EPLKG knowledge (ConceptNet)


class KnowledgeSourceError(OSError):
    """ConceptNet cannot be read (offline, bad URL, not a dump)."""


def fetch_json(url: str, timeout: float = 60.0) -> dict:
    """GET a JSON document (the ConceptNet API); the one network call of the API source."""
    req = urllib.request.Request(url, headers={"User-Agent": "reprolab-prepare-data"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) or file
        return json.load(resp)


def api_edges(
    base: str, delay: float = 1.0, max_pages: int = 100
) -> Callable[[set[str]], Iterator[dict]]:
    """`edges_of` over the ConceptNet 5 web API: every edge of each concept, page by page.

    RPLKG's crawl (`load_worst_group_sents.ipynb`): `GET /c/en/<word>?offset=<k*1000>&limit=1000`
    until a page comes back short. `delay` seconds between requests (the API allows about one per
    second sustained).
    """

    def edges_of(terms: set[str]) -> Iterator[dict]:
        for term in sorted(terms):
            for page in range(max_pages):
                query = urllib.parse.urlencode({"offset": page * API_PAGE, "limit": API_PAGE})
                url = f"{base.rstrip('/')}{urllib.parse.quote(term)}?{query}"
                try:
                    edges = fetch_json(url).get("edges", [])
                except (urllib.error.URLError, OSError, ValueError) as err:
                    reason = getattr(err, "reason", None) or err
                    raise KnowledgeSourceError(f"cannot read {url} ({reason})") from err
                yield from edges
                if delay > 0:
                    time.sleep(delay)
                if len(edges) < API_PAGE:
                    break

    return edges_of


def _open_text(source: str) -> io.TextIOBase:
    """A dump (path or URL, gzip when it ends in .gz) as text lines."""
    try:
        if "://" in source:
            raw = urllib.request.urlopen(source, timeout=60)  # noqa: S310 - http(s) or file
        else:
            raw = open(source, "rb")  # noqa: SIM115 - closed by the caller's `with`
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise KnowledgeSourceError(f"cannot read {source} ({reason})") from err
    stream = gzip.GzipFile(fileobj=raw) if source.split("?")[0].endswith(".gz") else raw
    return io.TextIOWrapper(stream, encoding="utf-8")


def dump_edges_of(source: str) -> Callable[[set[str]], Iterator[dict]]:
    """`edges_of` over ConceptNet's assertions dump: one pass over the file per call (per hop)."""
    from reprolab.data.knowledge import dump_edges

    def edges_of(terms: set[str]) -> Iterator[dict]:
        with _open_text(source) as lines:
            try:
                yield from dump_edges(lines, terms)
            except (OSError, EOFError, UnicodeDecodeError) as err:
                raise KnowledgeSourceError(f"cannot read {source} as a dump ({err})") from err

    return edges_of


def build_knowledge(
    name: str, root: Path, source: str, search_level: int, delay: float = 1.0
) -> tuple[Path, int, list[str]]:
    """Write `<root>/knowledge/<dataset>/conceptnet.tsv` for a dataset's classes.

    Returns the file, the number of triples and the classes left without any.
    """
    from reprolab.data.knowledge import (
        TRIPLES_FILE,
        class_term,
        collect_triples,
        knowledge_dir,
        write_triples,
    )

    dataset, _ = resolve(name)
    classnames = list(spec_for(name).classnames)
    if not classnames:
        raise ValueError(f"dataset {dataset} has no class names to look up")
    is_dump = ".csv" in Path(source.split("?")[0]).name
    edges_of: Callable[[set[str]], Iterable[dict]] = (
        dump_edges_of(source) if is_dump else api_edges(source, delay=delay)
    )
    triples = collect_triples(classnames, edges_of, search_level=search_level)
    out = knowledge_dir("data", root, dataset) / TRIPLES_FILE
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    write_triples(
        out,
        triples,
        comments=[
            f"EPLKG prompt-bank triples of {dataset} ({len(classnames)} classes), built {stamp} "
            f"by `python scripts/prepare_data.py --knowledge {name}`",
            f"source: {source}; search_level: {search_level}; concepts: "
            f"{class_term(classnames[0])}, ...",
        ],
    )
    covered = {t.cls for t in triples}
    return out, len(triples), [c for c in classnames if c not in covered]


def print_table(table: list[dict[str, str]]) -> None:
    cols = ["name", "classes", "train", "val", "test", "disk", "status", "source"]
    right = {"classes", "train", "val", "test"}
    width = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols[:-1]}
    head = (
        "  ".join(c.rjust(width[c]) if c in right else c.ljust(width[c]) for c in cols[:-1])
        + "  source"
    )
    print(head)
    print("-" * len(head))
    for r in table:
        cells = [r[c].rjust(width[c]) if c in right else r[c].ljust(width[c]) for c in cols[:-1]]
        print("  ".join(cells) + "  " + r["source"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("names", nargs="*", help="data config or dataset names")
    p.add_argument("--root", type=Path, default=Path(os.environ.get("DATA_ROOT", "data")))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="list every dataset (offline)")
    mode.add_argument("--check", action="store_true", help="verify prepared datasets (offline)")
    mode.add_argument("--manual", action="store_true", help="print the manual preparation steps")
    mode.add_argument(
        "--knowledge",
        action="store_true",
        help="build EPLKG's ConceptNet triples (<root>/knowledge/<dataset>/conceptnet.tsv)",
    )
    p.add_argument(
        "--conceptnet",
        default=CONCEPTNET_API,
        help="--knowledge source: the ConceptNet 5 API URL, or the assertions dump "
        "(conceptnet-assertions-5.7.0.csv[.gz], a path or URL)",
    )
    p.add_argument("--search-level", type=int, default=1, help="--knowledge: largest hop (1)")
    p.add_argument(
        "--api-delay", type=float, default=1.0, help="--knowledge: seconds between API requests"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )

    if a.list:
        print(f"data root: {a.root.resolve()}  (set DATA_ROOT or --root)\n")
        table = rows(a.root)
        print_table(table)
        print(
            "\nSizes are train/val/test images after preparation ('?' = set by the split file); "
            "disk sizes are approximate."
        )
        bad = [r for r in table if r["status"] == "bad"]
        if bad:
            print("\nbad trees (the same check as --check):")
            for r in bad:
                print(f"  {r['name']}: {r['reason']}")
        return 0
    if not a.names:
        p.error("give dataset names, or --list")
    failed = 0
    for name in a.names:
        try:
            spec = spec_for(name)
        except KeyError as err:
            print(err.args[0], file=sys.stderr)
            failed += 1
            continue
        try:
            if a.knowledge:
                try:
                    out, n, empty = build_knowledge(
                        name, a.root, a.conceptnet, a.search_level, a.api_delay
                    )
                except KnowledgeSourceError as err:
                    print(
                        f"{name}: ConceptNet: {err}; run this where the network is reachable, or "
                        "pass --conceptnet <path to conceptnet-assertions-5.7.0.csv.gz>",
                        file=sys.stderr,
                    )
                    failed += 1
                    continue
                print(f"{name}: {n:,} triples (hop <= {a.search_level}) -> {out}")
                if empty:
                    shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
                    print(
                        f"{name}: {len(empty)} classes without a triple ({shown}): add their "
                        f"descriptions to {out.parent / 'descriptions.json'}",
                        file=sys.stderr,
                    )
            elif a.manual:
                print(
                    spec.manual_text(a.root)
                    if hasattr(spec, "manual_text")
                    else f"{name}: nothing to do"
                )
            elif a.check:
                status, reason, found = tree_status(spec, a.root)
                if status != "ready":
                    print(f"{name}: {status}: {reason}", file=sys.stderr)
                    failed += 1
                    continue
                print(f"{name}: ok {found}")
            else:
                spec.prepare(a.root)
        except (DataNotFoundError, ValueError, NotImplementedError) as err:
            print(f"{name}: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
