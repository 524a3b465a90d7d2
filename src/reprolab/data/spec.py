"""Dataset specs: where a dataset comes from, its class names, templates and splits.

A spec is the single description of one dataset. `ClassificationDataModule` asks it for splits;
`scripts/prepare_data.py` asks it to materialise the data under `paths.data_dir`. Loading never
touches the network: `load` reads local files only and `check` fails fast, naming the command that
prepares the data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from reprolab.errors import ReprolabError
from reprolab.utils.naming import unknown_name


class DataNotFoundError(ReprolabError, FileNotFoundError):
    """A dataset is missing or incomplete under the data root."""


class MalformedDataError(DataNotFoundError):
    """A data or metadata file exists but cannot be used (bad JSON, wrong schema, empty list).

    A subclass of `DataNotFoundError`: the data is not ready, and code that already reports a
    missing dataset in one line (the runner, `prepare_data.py`) reports this one as well. The
    message names the file, the problem and the fix.
    """


def malformed(path: str | Path, problem: str, fix: str) -> MalformedDataError:
    """`MalformedDataError` with the one-line message `<path>: <problem>; <fix>.`"""
    return MalformedDataError(f"{path}: {problem}; {fix}.")


def regenerate_fix(name: str | None) -> str:
    """How to rebuild a prepared file of dataset `name`: delete it and prepare again."""
    cmd = f"python scripts/prepare_data.py {name}" if name else "python scripts/prepare_data.py"
    return f"delete it and run `{cmd}` to regenerate it"


class ImageSplit(torch.utils.data.Dataset):
    """One split of an image classification dataset.

    Items are dicts `{"image": PIL.Image (RGB), "label": int}` plus `"group": int` where the data has
    groups. `labels` is available without decoding any image (the few-shot sampler needs it).
    """

    def __init__(
        self,
        loader: Callable[[int], Image.Image],
        labels: Sequence[int],
        groups: Sequence[int] | None = None,
    ) -> None:
        self._loader = loader
        self.labels = [int(y) for y in labels]
        self.groups = None if groups is None else [int(g) for g in groups]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"image": self._loader(i), "label": self.labels[i]}
        if self.groups is not None:
            item["group"] = self.groups[i]
        return item

    def subset(self, indices: Sequence[int]) -> ImageSplit:
        idx = list(indices)
        groups = None if self.groups is None else [self.groups[i] for i in idx]
        return ImageSplit(lambda j: self._loader(idx[j]), [self.labels[i] for i in idx], groups)


@dataclass
class DatasetSpec:
    """Everything the framework knows about one dataset.

    Subclasses implement `load` (and `check`, `prepare` for real data). `test_sets` names the
    evaluation splits; the first one is the primary test set (`test/acc`) and has role `id`;
    `ood_sets` (a subset of `test_sets`) hold inputs from outside the label space (role `ood`),
    every other test set is a `shift`. `classnames` and `templates` may be empty for a dataset
    without them (a method that needs them says so at build time).
    """

    name: str
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    test_sets: list[str] = field(default_factory=lambda: ["test"])
    source: str = ""  # human-readable origin (HF id + revision, URL, "synthetic")
    num_groups: int | None = None  # group-robustness data emits "group"
    ood_sets: list[str] = field(default_factory=list)  # test sets from outside the label space

    def test_roles(self) -> dict[str, str]:
        """Role of each test set: the first is `id`, `ood_sets` are `ood`, the others `shift`."""
        return {
            n: "id" if i == 0 else "ood" if n in self.ood_sets else "shift"
            for i, n in enumerate(self.test_sets)
        }

    def check(self, root: Path) -> None:
        """Raise DataNotFoundError (with the command that fixes it) if the data is not ready."""

    def load(self, root: Path, split: str) -> ImageSplit:
        raise NotImplementedError

    def prepare(self, root: Path) -> None:
        """Download / build the data under `root` (network allowed here only)."""
        raise NotImplementedError(f"{self.name}: no automatic preparation")

    def missing(self, root: Path, expected: str) -> DataNotFoundError:
        return DataNotFoundError(
            f"{self.name} not found under {root} (expected {expected}). Set DATA_ROOT or run "
            f"`python scripts/prepare_data.py {self.name}`."
        )


_REGISTRY: dict[str, Callable[..., DatasetSpec]] = {}


def register(name: str) -> Callable:
    """Register a spec factory under `name` (a class or a function returning a DatasetSpec)."""

    def deco(factory: Callable[..., DatasetSpec]) -> Callable[..., DatasetSpec]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_spec(name: str, **kwargs: Any) -> DatasetSpec:
    """Build the spec registered as `name`; unknown names list the choices and a close match."""
    _import_all()
    if name not in _REGISTRY:
        raise KeyError(unknown_name("dataset", name, _REGISTRY))
    return _REGISTRY[name](**kwargs)


def _import_all() -> None:
    # Importing the modules runs their @register decorators.
    import importlib
    import pkgutil

    from reprolab.data import datasets

    for mod in pkgutil.iter_modules(datasets.__path__):
        importlib.import_module(f"reprolab.data.datasets.{mod.name}")


def assets_dir() -> Any:
    """The packaged assets folder (`reprolab/data/assets`), a `Traversable`."""
    return resources.files("reprolab.data").joinpath("assets")


def read_lines(asset: str) -> list[str]:
    """Read a packaged text asset (`data/assets/<asset>`), one entry per non-empty line.

    An empty class-name or template list would give a run at chance that is recorded as finished,
    so an asset without entries is an error naming the file, and so is a template without `{}`
    (every class would get the same prompt).
    """
    path = assets_dir().joinpath(asset)
    text = path.read_text(encoding="utf-8")
    lines = [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    fix = "restore it from git (`git checkout -- <file>`), one entry per line"
    if not lines:
        raise malformed(path, "is empty (no class names / templates)", fix)
    if Path(asset).name.startswith("templates"):
        bad = [t for t in lines if "{}" not in t]
        if bad:
            raise malformed(path, f"template {bad[0]!r} has no '{{}}' for the class name", fix)
    return lines
