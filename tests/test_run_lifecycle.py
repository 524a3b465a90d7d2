"""Runs that never lie (issue 11): identity, honest outcomes, damaged records and checkpoints,
signals, one writer per run dir, cells that cannot start, group-readable records."""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from reprolab.errors import ConfigValueError
from reprolab.runguard import (
    ConfigChanged,
    NonFiniteLoss,
    NoTrainingSteps,
    RunDirError,
    RunInterrupted,
    RunLock,
    RunLocked,
    signal_name,
)
from reprolab.train import run
from reprolab.utils.config import PROJECT_ROOT, compose_train
from reprolab.utils.run_record import (
    config_diff,
    config_fingerprint,
    fingerprint_config,
    record_cannot_start,
)

TESTS = Path(__file__).resolve().parent
# Tiny and fast: 2 shots per class, one test set, one test batch, one thread.
FAST = [
    "threads=1",
    "data.num_shots=2",
    "+data.test_sets=[test]",
    "+trainer.limit_test_batches=1",
    "data.eval_batch_size=32",
]
# linear_probe with batches of 4: 5 steps per epoch on 20 images.
PROBE = ["method=linear_probe", "data.batch_size=4"]
STEPS_PER_EPOCH = 5


@pytest.fixture(autouse=True)
def _usual_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def fast(tiny_overrides: list[str]) -> list[str]:
    return [*tiny_overrides, *FAST]


def _run_dir(overrides: list[str]) -> Path:
    return Path(compose_train(overrides).paths.run_dir)


def _json(path: Path) -> dict | list:
    return json.loads(path.read_text())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _crash(epoch: int) -> list[str]:
    return [
        "+callbacks.crash._target_=_lifecycle_helpers.CrashAtEpoch",
        f"+callbacks.crash.epoch={epoch}",
    ]


# ---------------------------------------------------------------------------------- identity


def test_fingerprint_ignores_what_cannot_change_results(tmp_path: Path) -> None:
    base = ["model=tiny_clip_random", "data=shapes", "method=linear_probe", *FAST]
    a = compose_train([*base, f"paths.log_dir={tmp_path / 'a'}"])
    b = compose_train(
        [*base, f"paths.log_dir={tmp_path / 'b'}", "threads=2", "tags=[x]", "paper.reported=1.0"]
    )
    b.callbacks.extra = {"_target_": "x.Y"}
    assert config_fingerprint(a) == config_fingerprint(b)
    assert len(config_fingerprint(a)) == 12
    assert fingerprint_config(a)["data"]["root"] == "<paths.data_dir>"  # machine-independent
    c = compose_train(
        [*base, f"paths.log_dir={tmp_path}", "data.num_shots=4", "method.optimizer.lr=0.5"]
    )
    assert config_fingerprint(c) != config_fingerprint(a)
    diff = config_diff(fingerprint_config(a), fingerprint_config(c))
    assert "data.num_shots: 2 -> 4" in diff and "method.optimizer.lr: 0.001 -> 0.5" in diff


def test_optional_keys_count_only_when_set() -> None:
    """`NULL_AS_ABSENT_KEYS` (trial, method.simat): a null value reads as absent, so runs made before
    such a key existed keep their fingerprint; a set value changes it."""
    plain = OmegaConf.create({"seed": 1, "method": {"name": "m", "lr": 0.1}})
    with_nulls = OmegaConf.create(
        {"seed": 1, "trial": None, "method": {"name": "m", "lr": 0.1, "simat": None}}
    )
    assert config_fingerprint(plain) == config_fingerprint(with_nulls)
    assert "simat" not in fingerprint_config(with_nulls)["method"]
    with_nulls.method.simat = {"root": "/data/simat"}
    assert config_fingerprint(plain) != config_fingerprint(with_nulls)


def test_changed_config_is_refused_naming_what_differs_then_replace_starts_fresh(
    fast: list[str],
) -> None:
    base = [*fast, *PROBE, "trainer.max_epochs=1"]
    first = run(compose_train(base))
    run_dir = _run_dir(base)
    assert first["fingerprint"] == _json(run_dir / "fingerprint.json")["fingerprint"]
    # threads / tags cannot change results: the finished record is reused
    assert (
        run(compose_train([*base, "threads=2", "tags=[other]"]))["finished_at"]
        == first["finished_at"]
    )

    changed = [*base, "data.num_shots=4"]
    t = time.time()
    with pytest.raises(ConfigChanged) as err:  # before: "already finished; skipping"
        run(compose_train(changed))
    assert time.time() - t < 5.0
    msg = str(err.value)
    assert "\n" not in msg and "data.num_shots: 2 -> 4" in msg
    assert "on_config_change=replace" in msg and str(run_dir) in msg
    assert _json(run_dir / "metrics.json") == json.loads(json.dumps(first, default=str))
    assert not (run_dir / "failed.json").exists()  # a refusal changes nothing

    second = run(compose_train([*changed, "on_config_change=replace"]))
    assert second["fingerprint"] != first["fingerprint"]
    assert second["global_step"] == 2 * STEPS_PER_EPOCH  # 40 images, fresh: not resumed
    old = run_dir.with_name(f"seed1.replaced-{first['fingerprint']}")
    assert _json(old / "metrics.json")["fingerprint"] == first["fingerprint"]  # kept, readable
    assert (old / "checkpoints" / "last.ckpt").is_file()
    assert _json(run_dir / "metrics.json")["fingerprint"] == second["fingerprint"]


def test_unfinished_run_of_another_config_is_not_resumed(fast: list[str]) -> None:
    base = [*fast, *PROBE, "trainer.max_epochs=2"]
    with pytest.raises(RuntimeError, match="simulated preemption"):
        run(compose_train([*base, *_crash(1)]))
    run_dir = _run_dir(base)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.resolve().read_bytes()
    with pytest.raises(ConfigChanged, match=r"unfinished run .*optimizer\.lr: 0\.001 -> 0\.5"):
        run(compose_train([*base, "method.optimizer.lr=0.5"]))
    assert last.resolve().read_bytes() == before  # before: resumed under the new settings
    record = run(compose_train(base))  # the same config resumes as before
    assert record["global_step"] == 2 * STEPS_PER_EPOCH


def test_record_without_fingerprint_counts_as_matching_and_says_so(
    fast: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    base = [*fast, "method=zeroshot"]
    first = run(compose_train(base))
    run_dir = _run_dir(base)
    legacy = {k: v for k, v in _json(run_dir / "metrics.json").items() if k != "fingerprint"}
    (run_dir / "metrics.json").write_text(json.dumps(legacy))
    (run_dir / "fingerprint.json").unlink()
    with caplog.at_level(logging.INFO, logger="reprolab"):
        again = run(compose_train(base))
    assert again["finished_at"] == first["finished_at"]
    assert "records no config fingerprint" in caplog.text


# ------------------------------------------------------------------------------ honest outcomes


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        # white-box VP with a huge LR (automatic optimisation: the step's returned loss)
        ("vp", ["method.lr=1e30", "method.warmup_epochs=0", "trainer.max_epochs=3"]),
        # a black-box method (manual optimisation: the logged train/loss)
        ("vp_spsa", ["method.init_std=1e38", "trainer.max_epochs=2"]),
    ],
)
def test_nan_loss_fails_the_run_naming_the_step(
    method: str, overrides: list[str], fast: list[str]
) -> None:
    cfg = [*fast, f"method={method}", *overrides]
    with pytest.raises(NonFiniteLoss, match=r"training loss is nan at step \d+ \(epoch \d+"):
        run(compose_train(cfg))  # before: recorded as finished, test acc at chance
    run_dir = _run_dir(cfg)
    assert not (run_dir / "metrics.json").exists()
    failed = _json(run_dir / "failed.json")
    assert failed["status"] == "failed" and "NonFiniteLoss" in failed["error"]
    assert failed["fingerprint"] == _json(run_dir / "fingerprint.json")["fingerprint"]


def test_zero_training_steps_is_an_error(fast: list[str]) -> None:
    cfg = [*fast, *PROBE, "trainer.max_epochs=1", "+trainer.limit_train_batches=0"]
    with pytest.raises(NoTrainingSteps, match="trained 0 steps"):
        run(compose_train(cfg))
    run_dir = _run_dir(cfg)
    assert not (run_dir / "metrics.json").exists()
    assert "trained 0 steps" in _json(run_dir / "failed.json")["error"]


# ---------------------------------------------------------------------------- damaged records


@pytest.mark.parametrize("skip_if_done", ["true", "false"])
@pytest.mark.parametrize("content", ["", '{"cell": "dev.none.zeroshot.shapes", "metr', "[1, 2]"])
def test_damaged_metrics_json_is_moved_aside_and_the_cell_reruns(
    content: str, skip_if_done: str, fast: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = [*fast, "method=zeroshot", f"skip_if_done={skip_if_done}"]
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(content)
    (run_dir / "failed.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="reprolab"):
        record = run(compose_train(cfg))  # before: a bare JSONDecodeError, forever
    assert record["status"] == "finished"
    assert _json(run_dir / "metrics.json")["fingerprint"] == record["fingerprint"]
    for name in ("metrics.json", "failed.json"):
        aside = list(run_dir.glob(f"{name}.damaged-*"))
        assert len(aside) == 1 and aside[0].read_text() == content  # kept as it was
        assert str(run_dir / name) in caplog.text  # the warning names the file


# ---------------------------------------------------------------------------- checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_last_ckpt_resumes_from_the_newest_readable_checkpoint(
    fast: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    base = [*fast, *PROBE, "trainer.max_epochs=3", "callbacks.checkpoint.save_top_k=-1"]
    with pytest.raises(RuntimeError, match="simulated preemption"):
        run(compose_train([*base, *_crash(2)]))
    ckpts = _run_dir(base) / "checkpoints"
    assert (ckpts / "last.ckpt").resolve().name == "epoch0001.ckpt"
    _truncate(ckpts / "last.ckpt")  # before: every ckpt_path=auto rerun failed on it
    with caplog.at_level(logging.WARNING, logger="reprolab"):
        record = run(compose_train(base))
    assert "epoch0001.ckpt is unreadable" in caplog.text
    assert "Resuming from the newest readable checkpoint" in caplog.text
    assert record["global_step"] == 3 * STEPS_PER_EPOCH
    assert len(list(ckpts.glob("epoch0001.ckpt.corrupt-*"))) == 1  # kept, named


def test_corrupt_last_ckpt_with_nothing_readable_starts_over_and_null_clears_links(
    fast: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    base = [*fast, *PROBE, "trainer.max_epochs=2"]
    with pytest.raises(RuntimeError, match="simulated preemption"):
        run(compose_train([*base, *_crash(1)]))
    ckpts = _run_dir(base) / "checkpoints"
    _truncate(ckpts / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="reprolab"):
        record = run(compose_train(base))
    assert "starting over" in caplog.text
    assert record["global_step"] == 2 * STEPS_PER_EPOCH
    assert sorted(p.name for p in ckpts.glob("last*")) == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 10

    # ckpt_path=null: the old checkpoints are moved aside first, so no last-v1.ckpt beside them
    again = run(compose_train([*base, "ckpt_path=null", "skip_if_done=false"]))
    assert again["global_step"] == 2 * STEPS_PER_EPOCH
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch0001.ckpt", "last.ckpt"]
    assert len(list(ckpts.parent.glob("checkpoints.old-*/last.ckpt"))) == 1


# ----------------------------------------------------------------------------------- signals


def test_sigusr2_checkpoints_in_process_and_a_second_sigint_aborts_at_once(
    fast: list[str],
) -> None:
    base = [*fast, *PROBE, "trainer.max_epochs=1"]
    sig = "+callbacks.sig._target_=_lifecycle_helpers.SignalSelf"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted, match=r"interrupted by SIGUSR2 at step 2;") as err:
        run(
            compose_train(
                [
                    *base,
                    sig,
                    f"+callbacks.sig.signum={int(signal.SIGUSR2)}",
                    "+callbacks.sig.at_step=2",
                ]
            )
        )
    assert err.value.exit_code == err.value.code == 128 + signal.SIGUSR2
    run_dir = _run_dir(base)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # the run's handlers are restored

    with pytest.raises(RunInterrupted, match="aborted by a second SIGINT") as err:
        run(
            compose_train(
                [
                    *base,
                    sig,
                    f"+callbacks.sig.signum={int(signal.SIGINT)}",
                    "+callbacks.sig.times=2",
                ]
            )
        )
    assert err.value.exit_code == 130
    assert "aborted by a second SIGINT" in _json(run_dir / "failed.json")["error"]


# ------------------------------------------------------------------------------------- lock


def _hold_lock(run_dir: str, ready, release) -> None:  # noqa: ANN001 - runs in a forked child
    lock = RunLock(Path(run_dir)).acquire()
    ready.set()
    release.wait(60)
    lock.release()


def test_second_process_on_a_running_cell_stops_at_once_naming_the_holder(
    fast: list[str],
) -> None:
    cfg = [*fast, "method=zeroshot"]
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(run_dir), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        assert _mode(run_dir / ".lock") == 0o644
        t = time.time()
        with pytest.raises(RunLocked) as err:  # before: both ran, CSV rows doubled
            run(compose_train(cfg))
        assert time.time() - t < 5.0
        msg = str(err.value)
        assert "\n" not in msg and f"pid {holder.pid} on {socket.gethostname()} since" in msg
        assert not (run_dir / "failed.json").exists()  # the holder's files are not touched
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # kill -9: the kernel drops its lock
        holder.join(30)
    assert (run_dir / ".lock").is_file()  # the file stays, naming a dead pid
    assert run(compose_train(cfg))["status"] == "finished"
    assert not (run_dir / ".lock").exists()

    # a lock still held (here by an open file of ours) whose pid is dead on this host is stale
    stale = {"host": socket.gethostname(), "pid": holder.pid, "since": "then"}
    (run_dir / ".lock").write_text(json.dumps(stale))
    with open(run_dir / ".lock") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run(compose_train([*cfg, "skip_if_done=false"]))["status"] == "finished"


# ------------------------------------------------------------------------- cannot start / modes


def test_cell_that_cannot_start_leaves_failed_json(fast: list[str], tmp_path: Path) -> None:
    cfg = [*fast, "method=zeroshot", "train=true"]  # zero-shot is post-hoc: a validation error
    with pytest.raises(ValueError, match="post-hoc"):
        run(compose_train(cfg))
    failed = _json(_run_dir(cfg) / "failed.json")  # before: none, the cell looked "missing"
    assert failed["cell"] == "dev.none.zeroshot.shapes" and failed["seed"] == 1
    assert len(failed["fingerprint"]) == 12 and "post-hoc" in failed["error"]
    assert "\n" not in failed["error"] and "Traceback" in failed["traceback"]

    with pytest.raises(ConfigValueError, match="on_config_change='keep'"):
        run(compose_train([*fast, "method=zeroshot", "on_config_change=keep"]))

    # the entry point's checks run before run(): record_cannot_start leaves the same record
    early = compose_train([*fast, "method=vp", "seed=7"])
    path = record_cannot_start(early, ConfigValueError("data.num_shots=-1 must be >= 1"))
    assert path == _run_dir([*fast, "method=vp", "seed=7"]) / "failed.json"
    failed = _json(path)
    assert (failed["cell"], failed["seed"]) == ("dev.none.vp.shapes", 7)
    assert failed["fingerprint"] == config_fingerprint(early)
    assert failed["error"] == "ConfigValueError: data.num_shots=-1 must be >= 1"

    (tmp_path / "a_file").write_text("")
    bad = [*fast, "method=zeroshot", f"paths.log_dir={tmp_path / 'a_file'}"]
    with pytest.raises(RunDirError, match="cannot create the run dir .*paths.log_dir"):
        run(compose_train(bad))


def test_record_files_are_group_readable(fast: list[str]) -> None:
    cfg = [*fast, "method=zeroshot"]
    run(compose_train(cfg))
    run_dir = _run_dir(cfg)
    for name in ("metrics.json", "fingerprint.json", "config.yaml"):
        assert _mode(run_dir / name) == 0o644, name  # before: metrics.json was 0600
    with pytest.raises(ValueError):
        run(compose_train([*cfg, "train=true"]))
    assert _mode(run_dir / "failed.json") == 0o644


# ------------------------------------------------------------------- signals, via python train.py


def _spawn(overrides: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "train.py", *overrides],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, timeout: float = 180.0) -> None:
    marker = run_dir / "steps.txt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1][-3000:])
        if (run_dir / ".lock").exists() and marker.is_file() and marker.read_text().strip():
            return
        time.sleep(0.1)
    raise AssertionError("the run made no step in time")


@pytest.fixture(scope="module", autouse=True)
def _launched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Starts the `python train.py` runs of the signal tests before the other tests, so that their
    start-up (imports, ~10 s) overlaps them: one run per signal, each held after its first step
    while the file `hold` exists."""
    if not any("signalled" in item.fixturenames for item in request.session.items):
        yield {}
        return
    runs: dict = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        log_dir = tmp_path_factory.mktemp(signal_name(signum))
        base = [
            "model=tiny_clip_random",
            "data=shapes",
            "trainer=cpu",
            "logger=csv",
            f"paths.log_dir={log_dir}",
            "progress_bar=false",
            *FAST,
            *PROBE,
            "trainer.max_epochs=2",
        ]
        hold = log_dir / "hold"
        hold.touch()
        slow = [
            "+callbacks.slow._target_=_lifecycle_helpers.SlowSteps",
            "+callbacks.slow.seconds=0",
            "+callbacks.slow.marker=${paths.run_dir}/steps.txt",
            f"+callbacks.slow.hold={hold}",
        ]
        run_dir = _run_dir(base)
        runs[signum] = {"proc": _spawn([*base, *slow]), "run_dir": run_dir, "base": base}
        runs[signum]["hold"] = hold
    yield runs
    for r in runs.values():
        if r["proc"].poll() is None:
            r["proc"].kill()
            r["proc"].communicate()


@pytest.fixture(scope="module")
def signalled(_launched: dict) -> dict:
    """The launched runs, signalled after their first step: per signal, (exit status, stderr,
    run dir, overrides)."""
    out: dict = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        r = _launched[signum]
        _wait_for_step(r["proc"], r["run_dir"])
        r["proc"].send_signal(signum)
        r["hold"].unlink()  # the run goes on to the step boundary, where it checkpoints
    for signum in (signal.SIGTERM, signal.SIGINT):
        r = _launched[signum]
        _, err = r["proc"].communicate(timeout=120)
        out[signum] = (r["proc"].returncode, err, r["run_dir"], r["base"])
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=signal_name)
def test_signal_checkpoints_records_and_exits_128_plus_signum(signum: int, signalled: dict) -> None:
    code, err, run_dir, base = signalled[signum]
    name = signal_name(signum)
    assert code == 128 + signum, err[-3000:]  # before: 0 (SIGTERM), 1 (SIGINT)
    failed = _json(run_dir / "failed.json")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert failed["error"] == (
        f"RunInterrupted: interrupted by {name} at step 1; checkpoint {last}; "
        "rerun the same command to resume."
    )  # before: "SIGTERMException: " / "SystemExit: 1"
    assert err.strip().splitlines()[-1] == f"error: {failed['error'].split(': ', 1)[1]}"
    assert torch.load(last, weights_only=False)["global_step"] == 1
    assert not (run_dir / ".lock").exists()
    # the same command resumes (callbacks are not part of the run's identity)
    record = run(compose_train(base))
    assert record["status"] == "finished" and record["global_step"] == 2 * STEPS_PER_EPOCH
    assert not (run_dir / "failed.json").exists()
