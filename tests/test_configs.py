"""Every experiment and table config composes, and bad configs fail with a useful message.

Experiments are the files of configs/experiment/ and the cells the paper grids of configs/cells/
generate (hydra_plugins.reprolab_cells); both are listed the way Hydra lists them.
"""

import shutil
import textwrap
from pathlib import Path

import pytest
from _slow import PAPER_SCALE_TABLES
from hydra.errors import HydraException
from omegaconf import OmegaConf

from reprolab.tables.schema import experiment_names, table_errors
from reprolab.utils.config import CONFIG_DIR, compose_train, validate_config

EXPERIMENTS = experiment_names(CONFIG_DIR)
TABLES = sorted(p.stem for p in (CONFIG_DIR / "table").glob("*.yaml"))
#: Grids whose cells have a config test file of their own (one column in the fast suite) and whose
#: tables compose every cell in `test_table_composes`: here they run with `slow` only.
SLOW_GRIDS = {
    "scer_iclr26",
    "asgdro_cvpr25",
    "group_tiny",
    "cdesc_wacv25",
    "npc_icml22",
    "mixdiff_ecai24",
    "coop_b2n",
    "coop_fewshot",
    "coop_xd",
}


def _grid_of(name: str) -> str | None:
    from hydra_plugins.reprolab_cells.grid import load

    cell = load(CONFIG_DIR / "cells").cells.get(name)
    return None if cell is None else cell.grid


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if _grid_of(n) in SLOW_GRIDS else n
        for n in EXPERIMENTS
    ],
)
def test_experiment_composes(name: str, tmp_path: Path) -> None:
    cfg = compose_train([f"experiment={name}", f"paths.log_dir={tmp_path}"])
    assert cfg.experiment_name == name
    OmegaConf.resolve(cfg)  # every interpolation resolves
    validate_config(cfg)
    assert cfg.paper.id != "dev", f"{name}: experiment must set its paper block"
    assert str(tmp_path) in cfg.paths.run_dir and cfg.cell in cfg.paths.run_dir


#: Tables of those grids, validated in the fast suite by their own tests (test_group_configs,
#: test_table_schema): composed here with `slow` only.
SLOW_TABLES = {"scer_main", "asgdro_main", "group_tiny", *PAPER_SCALE_TABLES}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TABLES else n for n in TABLES]
)
def test_table_composes(name: str, tmp_path: Path) -> None:
    cfg = compose_train([f"table={name}", f"paths.log_dir={tmp_path}"])
    validate_config(cfg)


def test_default_config_is_the_offline_demo() -> None:
    cfg = compose_train([])
    assert cfg.model.name == "tiny_clip" and cfg.data.name == "shapes"
    assert cfg.trainer.accelerator == "cpu"


def test_bad_metric_key_is_rejected() -> None:
    cfg = compose_train(["paper.metric=test/accuracy"])
    with pytest.raises(ValueError, match="paper.metric 'test/accuracy' is not a key"):
        validate_config(cfg)


def test_post_hoc_method_refuses_training() -> None:
    cfg = compose_train(["method=zeroshot", "train=true"])
    with pytest.raises(ValueError, match="post-hoc"):
        validate_config(cfg)


def test_hand_written_and_generated_experiments_are_listed() -> None:
    files = {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")}
    assert {"zeroshot_shapes", "linear_probe_shapes"} <= files <= set(EXPERIMENTS)
    assert {"blackvip_caltech", "vp_spsa_locmnist_1to4_32shot", "bar_loc_mirror_2to3"} <= set(
        EXPERIMENTS
    )
    assert not (CONFIG_DIR / "experiment" / "blackvip_caltech.yaml").exists()


# -- paper grids (configs/cells/<grid>/): a copy of configs/ edited per test ---------------------


def _configs(tmp_path: Path) -> Path:
    config_dir = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, config_dir, ignore=shutil.ignore_patterns("local"))
    return config_dir


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())


def _compose(config_dir: Path, *overrides: str):
    return compose_train([*overrides, "paths.log_dir=/tmp/unused"], config_dir=config_dir)


def test_glob_sweeps_see_generated_cells() -> None:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONFIG_DIR)))
    (sweep,) = OverridesParser.create(config_loader=loader).parse_overrides(
        ["experiment=glob(blackvip_*,exclude=blackvip_loc_mirror_*)"]
    )
    got = list(sweep.sweep_string_iterator())
    assert len(got) == 22 and "blackvip_caltech" in got and "blackvip_sun" in got


def test_a_new_column_is_one_file(tmp_path: Path) -> None:
    config_dir = _configs(tmp_path)
    _write(
        config_dir / "cells" / "blackvip_cvpr23" / "cols" / "shapes.yaml",
        """
        data: shapes
        table: tab2
        rows:
          blackvip:
            method: {eps: 0.7}
            trainer: {max_epochs: 7}
          vp: {method: {lr: 3.0}}
        reported: {blackvip: 12.5}
        """,
    )
    assert {f"{r}_shapes" for r in ("zeroshot", "vp", "bar", "vp_spsa", "blackvip")} <= set(
        experiment_names(config_dir)
    )
    cfg = _compose(config_dir, "experiment=blackvip_shapes")
    assert (cfg.data.name, cfg.method.name, cfg.model.name) == (
        "shapes",
        "blackvip",
        "clip_vit_b16",
    )
    assert (cfg.method.eps, cfg.trainer.max_epochs, cfg.method.spsa.n_perturb) == (0.7, 7, 5)
    assert (cfg.paper.row, cfg.paper.col, cfg.paper.reported) == ("blackvip", "shapes", 12.5)
    assert cfg.cell == "blackvip_cvpr23.tab2.blackvip.shapes" and list(cfg.tags)[1] == "tab2"
    vp = _compose(config_dir, "experiment=vp_shapes")
    assert (vp.method.lr, vp.data.batch_size, vp.paper.reported) == (3.0, 64, None)


def test_a_new_row_is_one_file(tmp_path: Path) -> None:
    config_dir = _configs(tmp_path)
    _write(
        config_dir / "cells" / "blackvip_tiny" / "rows" / "linear_probe.yaml",
        """
        # @package _global_
        defaults:
          - override /method: linear_probe
        trainer: {max_epochs: 3}
        """,
    )
    for col in ("loc_mirror_1to1", "loc_mirror_2to3"):
        cfg = _compose(config_dir, f"experiment=linear_probe_{col}")
        assert (cfg.method.name, cfg.model.name, cfg.data.name) == (
            "linear_probe",
            "tiny_clip",
            col,
        )
        assert (
            cfg.trainer.max_epochs == 3 and cfg.cell == f"blackvip_cvpr23.tiny.linear_probe.{col}"
        )


def test_a_real_experiment_file_wins_over_a_generated_cell(tmp_path: Path) -> None:
    config_dir = _configs(tmp_path)
    _write(
        config_dir / "experiment" / "blackvip_caltech.yaml",
        """
        # @package _global_
        defaults:
          - override /method: blackvip
          - override /data: caltech101
        paper: {id: special, table: t, row: blackvip, col: caltech}
        method: {eps: 0.01}
        """,
    )
    cfg = _compose(config_dir, "experiment=blackvip_caltech")
    assert (cfg.paper.id, cfg.method.eps, cfg.model.name) == ("special", 0.01, "tiny_clip")
    assert experiment_names(config_dir).count("blackvip_caltech") == 1


def test_command_line_groups_beat_the_grid() -> None:
    cfg = compose_train(["experiment=blackvip_caltech", "model=tiny_clip", "data=shapes",
                         "trainer=cpu", "method=zeroshot"])  # fmt: skip
    assert (cfg.model.name, cfg.data.name, cfg.trainer.accelerator) == (
        "tiny_clip",
        "shapes",
        "cpu",
    )
    assert cfg.method.name == "zeroshot" and cfg.paper.col == "caltech"


def test_extends_inherits_values_but_not_reported(tmp_path: Path) -> None:
    config_dir = _configs(tmp_path)
    cols = config_dir / "cells" / "blackvip_cvpr23" / "cols"
    _write(cols / "caltech_8shot.yaml", "extends: caltech\ncommon: {data: {num_shots: 8}}\n")
    cfg = _compose(config_dir, "experiment=blackvip_caltech_8shot")
    base = _compose(config_dir, "experiment=blackvip_caltech")
    assert cfg.method == base.method and cfg.data.name == base.data.name == "caltech101"
    assert (cfg.data.num_shots, cfg.paper.table, cfg.paper.reported) == (8, "tab2", None)
    assert base.paper.reported == 93.7


@pytest.mark.parametrize(
    ("path", "text", "message"),
    [
        ("cols/caltech.yaml", "data: caltech101\nrow: {}\n", "unknown key 'row'"),
        ("cols/caltech.yaml", "rows: {blackvp: {}}\n", "unknown row 'blackvp'"),
        ("cols/caltech.yaml", "extends: pet\n", "extends unknown column 'pet'"),
        ("cols/spsa_caltech.yaml", "data: caltech101\n", "is generated twice"),
        (
            "cols/caltech.yaml",
            "data: caltech101\ndefaults: [{override /method: vp}]\n",
            "`defaults` must list single group choices",
        ),
    ],
)
def test_grid_mistakes_fail_with_the_file_and_the_fix(
    tmp_path: Path, path: str, text: str, message: str
) -> None:
    config_dir = _configs(tmp_path)
    _write(config_dir / "cells" / "blackvip_cvpr23" / path, text)
    with pytest.raises((HydraException, ValueError), match=message):
        _compose(config_dir, "experiment=blackvip_caltech_missing")


def test_tables_validate_against_generated_cells(tmp_path: Path) -> None:
    config_dir = _configs(tmp_path)
    shutil.rmtree(config_dir / "cells" / "blackvip_tiny")
    errors = table_errors("blackvip_tiny", config_dir)
    assert errors and "Unknown experiment 'zeroshot_loc_mirror_1to1'" in errors[0]
