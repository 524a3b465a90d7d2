"""Ordinary mistakes fail fast in one line; inputs that would make a run lie are refused or logged.

Issue 11 ("Runs that never lie"), the parts about errors before work, honest data inputs, query
counting and log noise. Each test reproduces a case of the issue as a new user would meet it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from reprolab.data.spec import MalformedDataError, get_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from make_data_tree import make_coop_tree  # noqa: E402

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
ENV.pop("REPROLAB_DEBUG", None)
TINY_COORDINATOR = ["method.coordinator.encoder=tiny", "method.coordinator.pretrained=false"]
HEAVY = ("torch", "lightning", "open_clip")


def _train(*overrides: str, env: dict[str, str] | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
    )


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------------
# Errors before work: one line, status 2, before torch / Lightning is imported


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed=abc", "error: seed='abc' is not an integer"),
        ("data.num_shots=-1", "error: data.num_shots=-1 must be >= 1"),
        ("ckpt_path=/nope/last.ckpt", "error: ckpt_path='/nope/last.ckpt' is not an existing file"),
    ],
)
def test_bad_value_fails_in_one_line_with_status_2(
    override: str, expected: str, tmp_path: Path
) -> None:
    t = time.time()
    out = _train(override, f"paths.log_dir={tmp_path}")
    elapsed = time.time() - t
    assert out.returncode == 2, out.stderr
    assert len(_lines(out.stderr)) == 1 and out.stderr.startswith(expected)
    assert "Traceback" not in out.stderr + out.stdout
    assert elapsed < 10.0  # was 14-35 s: the check now runs before data, model and heavy imports
    assert not list(tmp_path.glob("**/metrics.json"))  # a rejected config is never "finished"


@pytest.mark.parametrize("override", ["seed=abc", "data.num_shots=-1"])
def test_bad_value_fails_before_torch_or_lightning_is_imported(override: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", override],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert proc.returncode == 2
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if "|" in ln}
    assert "reprolab.utils.checks" in imported  # the check ran in this process
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not heavy, heavy
    assert proc.stderr.splitlines()[-1].startswith("error: ")


def test_checks_and_the_package_import_no_torch() -> None:
    code = (
        "import sys, reprolab, reprolab.errors, reprolab.utils.checks\n"
        "from reprolab.utils.config import compose_train\n"
        "from reprolab.utils.checks import ConfigValueError, check_values\n"
        "cfg = compose_train(['seed=abc'])\n"
        "try:\n"
        "    check_values(cfg)\n"
        "except ConfigValueError as e:\n"
        "    print('ERR', e)\n"
        f"print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERR seed='abc' is not an integer" in proc.stdout
    assert "HEAVY []" in proc.stdout


def test_debug_flag_shows_the_traceback() -> None:
    out = _train("seed=abc", env={"REPROLAB_DEBUG": "1"})
    assert out.returncode == 2
    assert "Traceback (most recent call last)" in out.stderr and "ConfigValueError" in out.stderr
    assert _lines(out.stderr)[-1].startswith("error: seed='abc'")


@pytest.mark.parametrize("budget", ["0", "-5"])
def test_query_budget_of_zero_or_less_is_refused(budget: str) -> None:
    out = _train("method=blackvip", f"method.budget={budget}", *TINY_COORDINATOR)
    assert out.returncode == 2
    assert _lines(out.stderr) == [
        f"error: method.budget={budget} leaves no query for training (config key method.budget); "
        "give a positive number of training images, or method.budget=null for no limit."
    ]


@pytest.mark.parametrize("budget", [0, -5])
def test_query_budget_of_zero_or_less_is_refused_at_build_time(budget: int) -> None:
    """Also without the entry point (a method or oracle built from Python)."""
    from reprolab.errors import ConfigValueError
    from reprolab.methods.prompting.vp import VPSPSA
    from reprolab.models.blackbox import BlackBox

    with pytest.raises(ConfigValueError, match=f"budget={budget} leaves no query") as e:
        VPSPSA(name="vp_spsa", model=None, info=None, budget=budget)
    assert "\n" not in str(e.value) and "method=vp_spsa" in str(e.value)
    with pytest.raises(ConfigValueError, match="method.budget=null"):
        BlackBox(object(), ["a"], ["{}"], budget=budget)  # type: ignore[arg-type]


def test_check_values_accepts_the_defaults_and_rejects_wrong_types() -> None:
    from reprolab.utils.checks import ConfigValueError, check_values
    from reprolab.utils.config import compose_train

    check_values(compose_train([]))  # the demo config is valid
    check_values(compose_train(["data.num_shots=null", "threads=2", "method=blackvip"]))
    for bad, key in [
        (["data.batch_size=0"], "data.batch_size"),
        (["threads=0"], "threads"),
        (["trainer.max_epochs=0"], "trainer.max_epochs"),
        (["data.num_shots=2.5"], "data.num_shots"),
        (["method=bar", "method.budget=abc"], "method.budget"),
        (["skip_if_done=maybe"], "skip_if_done"),
        (["on_config_change=keep"], "on_config_change"),
    ]:
        with pytest.raises(ConfigValueError, match=f"config key {key}"):
            check_values(compose_train(bad))


# ------------------------------------------------------------------------------------------------
# Malformed split / metadata files name the file, the problem and the fix


SPLIT = "split_zhou_DescribableTextures.json"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "is not valid JSON"),
        ("{}", "has no train/val/test split (found: nothing)"),
        ('{"train": [], "val": []}', "has no test split (found: train, val)"),
        ("[1, 2]", "holds a JSON list, not a split object"),
        ('{"train": [["a.jpg"]], "val": [], "test": []}', "entry 0 of split 'train'"),
        ('{"train": [["a.jpg", "x", "c"]], "val": [], "test": []}', "not [relpath, label >= 0"),
        ('{"train": [], "val": [], "test": []}', "has no items in any split"),
    ],
)
def test_malformed_split_file_is_named_with_the_fix(
    content: str, problem: str, tmp_path: Path
) -> None:
    make_coop_tree(tmp_path, "dtd", per_class=(1, 1, 1), size=8)
    path = tmp_path / "dtd" / SPLIT
    path.write_text(content)
    with pytest.raises(MalformedDataError) as e:
        get_spec("dtd").check(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and problem in msg
    assert "run `python scripts/prepare_data.py dtd`" in msg


def test_malformed_split_file_through_train_py_is_one_line(tmp_path: Path) -> None:
    make_coop_tree(tmp_path, "dtd", per_class=(1, 1, 1), size=8)
    (tmp_path / "dtd" / SPLIT).write_text("{}")
    out = _train(
        "data=dtd",
        "model=tiny_clip_random",
        f"paths.data_dir={tmp_path}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "threads=1",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [
        f"error: {tmp_path / 'dtd' / SPLIT}: has no train/val/test split (found: nothing); "
        "delete it and run `python scripts/prepare_data.py dtd` to regenerate it."
    ]
    assert "Traceback" not in out.stderr


def test_malformed_fewshot_cache_is_named_and_resampled(tmp_path: Path, caplog) -> None:
    import json

    from reprolab.data.fewshot import cached_fewshot_indices, fewshot_indices, labels_fingerprint

    labels = [y for y in range(3) for _ in range(5)]
    path = tmp_path / "shot_2-seed_1.json"
    fp = {"train": labels_fingerprint(labels), "val": None}
    for content in (
        "{not json",
        "[]",
        json.dumps({"train": [999], "val": None, "fingerprint": fp}),
    ):
        path.write_text(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="reprolab.data.fewshot"):
            out = cached_fewshot_indices(labels, None, 2, 1, tmp_path)
        assert out == fewshot_indices(labels, None, 2, 1)
        assert f"malformed few-shot cache {path}" in caplog.text, content
        assert json.loads(path.read_text())["train"] == out["train"]  # rewritten


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )


def test_prepare_data_list_reports_a_malformed_split_as_bad(tmp_path: Path) -> None:
    make_coop_tree(tmp_path, "caltech101", per_class=(1, 1, 1), size=8)
    split = tmp_path / "caltech-101" / "split_zhou_Caltech101.json"
    split.write_text('{"train": [')
    out = _cli("--list", "--root", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("caltech101 "))
    assert " bad " in line
    assert f"caltech101: {split}: is not valid JSON" in out.stdout
    check = _cli("--check", "caltech101", "--root", str(tmp_path))
    assert check.returncode == 1 and f"caltech101: bad: {split}: is not valid JSON" in check.stderr


def test_list_and_check_share_one_verdict(tmp_path: Path, monkeypatch) -> None:
    """`--list` says ready exactly where `--check` accepts the tree (one function decides)."""
    import importlib.util

    from reprolab.data.datasets._common import LocalSpec

    spec = importlib.util.spec_from_file_location("_prepare_data", ROOT / "scripts/prepare_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    make_coop_tree(tmp_path, "caltech101", per_class=(1, 1, 1), size=8)
    rows = {r["name"]: r for r in cli.rows(tmp_path)}
    assert rows["caltech101"]["status"] == "bad" and "expected 4128" in rows["caltech101"]["reason"]
    assert cli.main(["--check", "caltech101", "--root", str(tmp_path)]) == 1
    monkeypatch.setattr(LocalSpec, "verify", lambda self, root: {"train": 100})  # sizes accepted
    assert {r["name"]: r for r in cli.rows(tmp_path)}["caltech101"]["status"] == "ready"
    assert cli.main(["--check", "caltech101", "--root", str(tmp_path)]) == 0


# ------------------------------------------------------------------------------------------------
# Honest inputs: empty asset files, shot counts


@pytest.mark.parametrize(
    ("file", "content", "problem"),
    [
        ("templates.txt", "", "is empty"),
        ("templates.txt", "\n  \n", "is empty"),
        ("classnames.txt", "", "is empty"),
        ("templates.txt", "a photo\n", "has no '{}' for the class name"),
    ],
)
def test_empty_templates_or_class_names_fail_at_spec_load(
    file: str, content: str, problem: str, tmp_path: Path, monkeypatch
) -> None:
    from reprolab.data import spec as spec_module

    assets = tmp_path / "assets"
    (assets / "shapes").mkdir(parents=True)
    real = spec_module.assets_dir()
    for name in ("classnames.txt", "templates.txt"):
        (assets / "shapes" / name).write_text(real.joinpath("shapes", name).read_text())
    (assets / "shapes" / file).write_text(content)
    monkeypatch.setattr(spec_module, "assets_dir", lambda: assets)
    with pytest.raises(MalformedDataError) as e:
        get_spec("shapes")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(assets / "shapes" / file)) and problem in msg


def _shapes_dm(tmp_path: Path, num_shots: int | None):
    from reprolab.data.datamodule import ClassificationDataModule
    from reprolab.data.transforms import Preprocess

    dm = ClassificationDataModule("shapes", "shapes", root=str(tmp_path), num_shots=num_shots)
    dm.set_preprocess(Preprocess(image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3))
    dm.setup("fit")
    return dm


def test_num_shots_above_the_largest_class_is_an_error(tmp_path: Path) -> None:
    from reprolab.data.fewshot import FewShotError

    dm = _shapes_dm(tmp_path, 100000)
    with pytest.raises(FewShotError) as e:
        dm.train_dataloader()  # asked for by training only: refused before the first step
    msg = str(e.value)
    assert "\n" not in msg and "data.num_shots=100000 exceeds the largest class" in msg
    assert "shapes train (100 images)" in msg and "data.num_shots=null" in msg
    assert len(_shapes_dm(tmp_path, None).train_dataloader().dataset) == 1000  # null: all images


def test_num_shots_above_the_largest_class_fails_the_run(tmp_path: Path) -> None:
    from reprolab.data.fewshot import FewShotError
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            "model=tiny_clip_random",
            "data=shapes",
            "method=linear_probe",
            "logger=csv",
            "progress_bar=false",
            "threads=1",
            f"paths.log_dir={tmp_path}",
            "data.num_shots=100000",
        ]
    )
    with pytest.raises(FewShotError, match="data.num_shots=null for all images"):
        run(cfg)
    assert not list(tmp_path.glob("**/metrics.json"))  # never recorded as finished


def test_class_smaller_than_k_is_capped_and_logged(caplog) -> None:
    """Dassl's sampler: a class with fewer than k items keeps all of them, without repeats."""
    from reprolab.data.fewshot import check_shots, sample_fewshot

    labels = [0] * 3 + [1] * 10 + [2] * 2 + [3] * 10
    names = ["ant", "bee", "cat", "dog"]
    with caplog.at_level(logging.WARNING, logger="reprolab.data.fewshot"):
        capped = check_shots(labels, 4, "toy", "train", names)
    assert capped == [0, 2]
    assert "toy train: 2 of 4 classes have fewer than 4 images" in caplog.text
    assert "ant (3), cat (2)" in caplog.text
    idx = sample_fewshot(labels, 4, seed=1)
    assert len(set(idx)) == len(idx)  # no repeats
    assert Counter(labels[i] for i in idx) == {0: 3, 1: 4, 2: 2, 3: 4}


# ------------------------------------------------------------------------------------------------
# Query counting: training apart from test


def test_black_box_counts_training_and_test_queries_apart(tmp_path: Path) -> None:
    from reprolab.train import run
    from reprolab.utils.config import compose_train

    cfg = compose_train(
        [
            "model=tiny_clip_random",
            "data=shapes",
            "method=blackvip",
            *TINY_COORDINATOR,
            "logger=csv",
            "progress_bar=false",
            "threads=1",
            f"paths.log_dir={tmp_path}",
            "data.num_shots=2",
            "data.batch_size=20",
            "trainer.max_epochs=2",
        ]
    )
    m = run(cfg)["metrics"]
    shapes = get_spec("shapes")
    test_images = sum(len(shapes.load(None, s)) for s in shapes.test_sets)
    per_step = m["train/queries_per_step"]
    steps = 2  # 20 images = one batch of 20 per epoch
    assert m["train/queries"] == per_step * steps
    assert m["train/images"] == per_step * steps * 20  # what training sent, nothing else
    assert m["test/images"] == test_images == 2000
    assert m["test/queries"] == 2 * 4  # two test sets, ceil(1000 / 256) batches each
    assert "val/images" not in m  # shapes has no val split here


def test_eval_queries_are_not_limited_by_the_training_budget() -> None:
    import torch

    from reprolab.models.blackbox import BlackBox, QueryBudgetExceeded

    class Backbone(torch.nn.Module):
        logit_scale = 1.0

        def encode_image(self, images):  # (B, 3, H, W) -> (B, 2)
            return images.flatten(1)[:, :2]

        def zeroshot_weights(self, classnames, templates):  # (C, 2)
            return torch.eye(2)

    bb = BlackBox(Backbone(), ["a", "b"], ["{}"], budget=4)
    bb(torch.randn(4, 3, 2, 2))
    with pytest.raises(QueryBudgetExceeded):
        bb(torch.randn(1, 3, 2, 2))
    bb(torch.randn(8, 3, 2, 2), phase="test")
    bb(torch.randn(3, 3, 2, 2), phase="val")
    assert (bb.queries, bb.images) == (1, 4) and bb.state() == {"queries": 1, "images": 4}
    assert bb.eval_counts == {
        "val": {"queries": 1, "images": 3},
        "test": {"queries": 1, "images": 8},
    }
    bb.reset_eval("test")
    assert bb.eval_counts["test"] == {"queries": 0, "images": 0}


# ------------------------------------------------------------------------------------------------
# Noise: no open_clip INFO lines, no Lightning line twice, W&B "offline" in every job


def test_multirun_logs_once_without_library_noise_and_survives_a_bad_job(tmp_path: Path) -> None:
    out = _train(
        "-m",
        "seed=abc,1,2",
        "model=tiny_clip_random",
        "data=shapes",
        "method=linear_probe",
        "data.num_shots=2",
        "trainer.max_epochs=1",
        "threads=1",
        "progress_bar=false",
        f"paths.log_dir={tmp_path}",
        timeout=600,
    )
    text = out.stdout + out.stderr
    # the bad job is one line; the other jobs ran
    assert [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")] == [
        "error: seed='abc' is not an integer (config key seed); pass an integer, e.g. seed=1."
    ]
    assert len(list(tmp_path.glob("*/seed[12]/metrics.json"))) == 2, text[-3000:]
    # no open_clip INFO chatter; its warning about random weights still shows
    assert "Parsing model identifier" not in text and "Loaded built-in" not in text
    assert "No pretrained weights loaded" in text
    # every Lightning INFO line once per job, in Hydra's format only (no bare "INFO: ..." copy)
    assert text.count("GPU available: False") == 2 and "INFO: GPU available" not in text
    assert "litlogger" not in text
    # W&B says offline in both jobs (Lightning used to set WANDB_MODE=dryrun for the next one)
    assert text.count("(offline mode)") == 2 and "dryrun" not in text
    # reprolab's own INFO lines stay
    assert text.count("Run record:") == 2 and "Backbone tiny_clip_random" in text


def test_wandb_mode_reports_dryrun_as_offline(monkeypatch) -> None:
    from reprolab.utils.loggers import wandb_mode

    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
