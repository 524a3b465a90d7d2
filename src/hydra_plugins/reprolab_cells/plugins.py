"""Hydra wiring of the paper grids: a search-path plugin and the config source it points at.

Hydra finds both through its plugin discovery (`hydra_plugins.*` is scanned on first use), so every
Hydra entry point sees the generated cells: `python train.py experiment=blackvip_caltech`,
`glob(blackvip_*)` sweeps, `--cfg job`, `--info defaults-tree`, and `hydra.compose`.

- `ReprolabCellsSearchPath` appends `reprolab-cells://<main config dir>/cells` right after the
  primary config dir when that dir has a `cells/` folder (any other Hydra app is left alone).
- `CellsConfigSource` serves one group, `experiment`, holding the generated cells. Being after the
  primary dir on the search path, a real `configs/experiment/<name>.yaml` always wins.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin

SCHEME = "reprolab-cells"
PROVIDER = "reprolab-cells"


def _main_dir(search_path: ConfigSearchPath) -> str | None:
    for element in search_path.get_path():
        if element.provider != "main" or element.path is None:
            continue
        path = str(element.path)
        if path.startswith("file://"):
            path = path[len("file://") :]
        elif "://" in path:
            return None  # pkg:// or structured:// primary configs hold no cells folder
        return path
    return None


class ReprolabCellsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        main = _main_dir(search_path)
        if main is None:
            return
        cells = os.path.join(os.path.abspath(main), "cells")
        if os.path.isdir(cells):
            search_path.append(PROVIDER, f"{SCHEME}://{cells}", anchor=SearchPathQuery("main"))


class CellsConfigSource(ConfigSource):
    """`experiment/<row>_<col>` for every cell of every grid under the cells dir."""

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _grids(self) -> Any:
        from hydra_plugins.reprolab_cells.grid import load

        return load(self.path)

    @staticmethod
    def _name(config_path: str) -> str | None:
        config_path = config_path.strip("/")
        if config_path.endswith(".yaml"):
            config_path = config_path[: -len(".yaml")]
        group, _, name = config_path.rpartition("/")
        return name if group == "experiment" and name else None

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", "experiment") and self.available()

    def is_config(self, config_path: str) -> bool:
        name = self._name(config_path)
        return name is not None and self.available() and name in self._grids().cells

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        config_path = config_path.strip("/")
        if config_path == "" and results_filter in (None, ObjectType.GROUP):
            return ["experiment"]
        if config_path == "experiment" and results_filter in (None, ObjectType.CONFIG):
            return self._grids().names()
        return []

    def load_config(self, config_path: str) -> ConfigResult:
        name = self._name(config_path)
        grids = self._grids()
        if name is None or name not in grids.cells:
            raise ConfigLoadError(f"Config not found: {self.full_path()}/{config_path}")
        return ConfigResult(
            config=grids.experiment(name),
            path=self.full_path(),
            provider=self.provider,
            header={"package": "_global_"},
        )
