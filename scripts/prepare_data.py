"""Prepare, check and list the real datasets (the one place that may use the network).

    python scripts/prepare_data.py caltech101 [dtd ...] [--root DIR]   # download / build, then verify
    python scripts/prepare_data.py --list [--root DIR]                  # every dataset: source, sizes, status
    python scripts/prepare_data.py --check caltech101 [--root DIR]      # verify a prepared dataset
    python scripts/prepare_data.py --manual objectnet                   # print the manual steps

NAME is a data config (`configs/data/<NAME>.yaml`, whose `dataset` and `dataset_kwargs` are used, e.g.
`loc_mnist_f4`) or a registered dataset name. The root defaults to $DATA_ROOT, else ./data. `--list`
and `--check` never touch the network, and both judge a tree with the same check (`tree_status`):
`ready` (files present, split files readable, sizes and classes as expected), `missing`, or `bad`
(present but wrong: a malformed split file, wrong sizes), with the reason below the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
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
            if a.manual:
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
