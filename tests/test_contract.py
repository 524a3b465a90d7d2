"""The task contract: import rules, task info checks, the generic Method, rounds, run records."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from reprolab.data.info import (
    Column,
    ImageClassificationInfo,
    TabularInfo,
    TaskInfoError,
)
from reprolab.train import run
from reprolab.utils.config import compose_train, metric_is_logged

SRC = Path(__file__).resolve().parents[1] / "src" / "reprolab"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


FORBIDDEN = {
    "data": ("reprolab.models", "reprolab.methods"),
    "models": ("reprolab.methods",),
    "optim": ("reprolab.methods",),
    "metrics": ("reprolab.methods",),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_rules(package: str) -> None:
    """data knows no model or method; models, optim, metrics know no method."""
    bad = []
    for f in sorted((SRC / package).rglob("*.py")):
        for mod in _imports(f):
            if mod.startswith(FORBIDDEN[package]):
                bad.append(f"{f.relative_to(SRC)} imports {mod}")
    assert not bad, bad


def test_library_imports_no_script() -> None:
    bad = [
        f"{f.relative_to(SRC)} imports {m}"
        for f in sorted(SRC.rglob("*.py"))
        for m in _imports(f)
        if m == "scripts" or m.startswith("scripts.")
    ]
    assert not bad, bad


def test_import_rule_checker_sees_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("from reprolab.methods.base import Method\nimport reprolab.models.clip\n")
    assert {"reprolab.methods.base", "reprolab.models.clip"} <= _imports(f)


def test_method_needing_class_names_fails_in_one_line_on_a_tabular_task() -> None:
    from reprolab.methods.zeroshot import ZeroShot

    info = TabularInfo(name="adult", columns=(Column("age"),), sensitive="sex")
    with pytest.raises(TaskInfoError) as e:
        ZeroShot(name="zeroshot", model=None, info=info)
    msg = str(e.value)
    assert "\n" not in msg and "method=zeroshot" in msg and "image classification" in msg


def test_method_names_the_missing_piece() -> None:
    from reprolab.methods.zeroshot import ZeroShot

    info = ImageClassificationInfo(name="mine", classnames=("a", "b"), templates=())
    with pytest.raises(TaskInfoError, match="needs 'templates'.*data=mine"):
        ZeroShot(name="zeroshot", model=None, info=info)


def test_metric_keys_are_declared_per_method() -> None:
    zs = "reprolab.methods.zeroshot.ZeroShot"
    assert metric_is_logged(zs, "test/acc")
    assert metric_is_logged(zs, "test/imagenet_r/ece")
    assert metric_is_logged(zs, "test/ood_digits/auroc")
    assert not metric_is_logged(zs, "train/queries")
    assert not metric_is_logged(zs, "test/elbo")
    assert metric_is_logged("reprolab.methods.prompting.blackvip.BlackVIP", "train/queries")


def test_a_table_metric_no_method_logs_fails_before_anything_is_built(tiny_overrides) -> None:
    cfg = compose_train([*tiny_overrides, "paper.metric=test/elbo"])
    with pytest.raises(ValueError, match="test/elbo") as e:
        run(cfg)
    assert "zeroshot" in str(e.value)
    assert not (Path(cfg.paths.run_dir) / "metrics.json").exists()


def test_ood_routine_scores_against_the_id_set(tiny_overrides) -> None:
    """OOD metrics of the run equal sklearn's on the per-sample MSP scores of the same model."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from reprolab.data.datamodule import ClassificationDataModule
    from reprolab.methods.zeroshot import ZeroShot
    from reprolab.models.clip import CLIPBackbone

    torch.manual_seed(0)
    dm = ClassificationDataModule(
        "shapes_ood", "shapes", dataset_kwargs={"ood": True}, eval_batch_size=500, val=False
    )
    roles = {t.name: t.role for t in dm.info.test_sets}
    assert roles == {"test": "id", "test_clutter": "shift", "ood_digits": "ood"}
    bb = CLIPBackbone("tiny", "reprolab-tiny-clip", pretrained=None)
    method = ZeroShot(name="zeroshot", model=bb, info=dm.info)
    dm.configure(**method.data_requirements())
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_test_batches=1,
    )
    out = trainer.test(method, datamodule=dm, verbose=False)[0]
    dm.setup("test")
    method.setup("test")
    with torch.no_grad():
        x_id = torch.stack([dm._splits["test:test"][i]["image"] for i in range(500)])
        x_ood = torch.stack([dm._splits["test:ood_digits"][i]["image"] for i in range(500)])
        s_id = method.logits(x_id).softmax(-1).max(-1).values
        s_ood = method.logits(x_ood).softmax(-1).max(-1).values
    y = [1] * 500 + [0] * 500
    s = torch.cat([s_id, s_ood]).numpy()
    assert out["test/ood_digits/auroc"] == pytest.approx(100 * roc_auc_score(y, s), abs=1e-3)
    assert out["test/ood_digits/aupr_in"] == pytest.approx(
        100 * average_precision_score(y, s), abs=1e-3
    )
    assert "test/ood_digits/acc" not in out and "test/test_clutter/acc" in out


def test_run_record_holds_parameter_counts_and_throughput(tiny_overrides) -> None:
    cfg = compose_train(
        [
            *tiny_overrides,
            "method=vp_spsa",
            "data.num_shots=2",
            "trainer.max_epochs=1",
            "data.batch_size=10",
        ]
    )
    m = run(cfg)["metrics"]
    assert m["params/trainable"] > 0 and m["params/total"] > m["params/trainable"]
    assert m["throughput/train_samples_per_s"] > 0 and m["throughput/test_samples_per_s"] > 0
    assert (
        m["throughput/queried_images_per_s"] > m["throughput/train_samples_per_s"]
    )  # 2q per image


def test_rounds_resume_in_the_round_a_run_died_in(tiny_overrides, monkeypatch) -> None:
    import _round_method as rm

    over = [
        *tiny_overrides,
        "method=linear_probe",
        "method._target_=_round_method.RoundProbe",
        "+method.rounds=3",
        "trainer.max_epochs=1",
        "data.num_shots=2",
        "data.batch_size=10",
    ]
    cfg = compose_train(over)
    monkeypatch.setenv("ROUND_PROBE_DIE_AT", "2")
    rm.CALLS.clear()
    with pytest.raises(RuntimeError, match="killed in round 2"):
        run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    assert [r["round"] for r in json.loads((run_dir / "rounds.json").read_text())["rounds"]] == [
        0,
        1,
    ]
    assert (run_dir / "failed.json").is_file() and not (run_dir / "metrics.json").exists()
    monkeypatch.delenv("ROUND_PROBE_DIE_AT")
    rm.CALLS.clear()
    record = run(compose_train(over))
    assert rm.CALLS == [2]  # rounds 0 and 1 were not refitted
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2]
    assert record["rounds"][-1]["state"] == {"seen": [0, 1, 2]}
    assert record["metrics"]["test/acc"] == record["rounds"][-1]["metrics"]["test/acc"]
    assert all("test/acc" in r["metrics"] for r in record["rounds"])
    assert (run_dir / "checkpoints" / "round2" / "last.ckpt").exists()


def test_a_plain_non_clip_run_gets_its_methods_headline_metric(tmp_path: Path) -> None:
    """`python train.py model=tabular_vae data=diabetes method=vae` needs no experiment file."""
    cfg = compose_train(
        [
            "model=tabular_vae",
            "data=diabetes",
            "method=vae",
            "trainer=cpu",
            "logger=csv",
            f"paths.log_dir={tmp_path}",
            "progress_bar=false",
            "trainer.max_epochs=1",
            "threads=1",
        ]
    )
    assert cfg.paper.metric is None
    record = run(cfg)
    assert record["paper"]["metric"] == "test/elbo" and record["task"] == "tabular"
    assert record["metrics"]["test/elbo"] < 0 and record["metrics"]["params/trainable"] > 0
