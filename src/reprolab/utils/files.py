"""Small file helpers shared by config readers (stdlib only: the Hydra plugin imports them)."""

from __future__ import annotations

import os
from pathlib import Path


def yaml_tree_stamp(root: str | Path) -> tuple:
    """Every YAML file under `root` with its mtime and size: a changed file, a new config."""
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".yaml"):
                st = os.stat(os.path.join(dirpath, f))
                out.append((dirpath, f, st.st_mtime_ns, st.st_size))
    return tuple(sorted(out))
