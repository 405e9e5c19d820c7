"""Reliability, runs: a killed process, a full disk, parallel jobs on one MLflow store,
untrusted files, exposed servers and determinism, each fault made to happen for real.

Tiny models only (resnet18 from scratch, 64 px, batch 2, a few iterations, one thread).
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_cli
from conftest import write_config as shared_write_config
from recontrast.checkpoint import CheckpointError, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
CATEGORY = "weave"


def write_config(folder: Path, root: Path, **train) -> Path:
    """Writes a tiny training config of 6 iterations (train keys override) and returns it."""
    return shared_write_config(folder, root, CATEGORY, train={"iters": 6, **train})


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- SIGKILL
CHILD_TRAIN = textwrap.dedent("""
    import sys, time
    import recontrast.train as T
    plain = T.TrainBatches.__call__
    def slow(self, iteration):  # leaves time to kill mid-run; the numbers do not change
        time.sleep(0.25)
        return plain(self, iteration)
    T.TrainBatches.__call__ = slow
    from recontrast import cli
    cli.main(sys.argv[1:])
""")


@pytest.mark.slow
def test_sigkill_mid_training_resume_is_exact_and_the_run_is_not_left_running(synthetic_root, store, tmp_path):
    config = write_config(tmp_path, synthetic_root, iters=8, checkpoint_every=2)
    out, log = tmp_path / "killed", (tmp_path / "child.log").open("w")
    child = subprocess.Popen([sys.executable, "-c", CHILD_TRAIN, "train", "--config", str(config),
                              "--out", str(out)], stdout=log, stderr=subprocess.STDOUT)
    delay = random.Random().uniform(0.0, 0.6)  # after the first checkpoint: iteration 2, 4 or 6
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.ckpt").is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        assert child.poll() is None, f"the child ended before the kill: {(tmp_path / 'child.log').read_text()[-2000:]}"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()

    ckpt = load_checkpoint(out / "last.ckpt")  # the last complete checkpoint loads
    killed_at = ckpt["iteration"]
    assert killed_at in (2, 4, 6) and len(ckpt["loss_history"]) == killed_at, (killed_at, delay)

    from recontrast.mlflow_store import read_run_id

    run_id = read_run_id(out)
    assert client(store).get_run(run_id).info.status == "RUNNING"
    assert run_cli(["runs", "--fix-stale"]) is None  # `recontrast runs --fix-stale`
    run = client(store).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["error_type"] == "StaleRun"

    assert run_cli(["train", "--config", str(config), "--out", str(out), "--resume"]) is None
    assert client(store).get_run(run_id).info.status == "FINISHED"  # the same run, reopened
    assert run_cli(["train", "--config", str(config), "--out", str(tmp_path / "ref"), "--no-track"]) is None
    resumed, ref = load_checkpoint(out / "last.ckpt"), load_checkpoint(tmp_path / "ref" / "last.ckpt")
    assert resumed["iteration"] == ref["iteration"] == 8
    assert resumed["loss_history"] == ref["loss_history"], f"killed at {killed_at}"
    assert same_weights(resumed["model"], ref["model"]), f"killed at {killed_at}"


# ----------------------------------------------------------------------------- disk full / read-only
def test_disk_full_at_a_checkpoint_keeps_the_previous_one(synthetic_root, store, tmp_path, monkeypatch):
    import recontrast.checkpoint as C

    config, out = write_config(tmp_path, synthetic_root, iters=4), tmp_path / "run"
    real_save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(obj.get("iteration"))
        if len(calls) == 2:  # the checkpoint of iteration 4: half written, then ENOSPC
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(C.torch, "save", save_until_full)
    error = run_cli(["train", "--config", str(config), "--out", str(out)])
    monkeypatch.setattr(C.torch, "save", real_save)
    assert error is not None and "CheckpointError" in error and "No space left on device" in error, error
    assert str(out / "last.ckpt") in error and "previous checkpoint there is unchanged" in error
    assert load_checkpoint(out / "last.ckpt")["iteration"] == 2
    assert sorted(p.name for p in out.iterdir()) == [".lock", "last.ckpt", "mlflow_run_id"]  # no temp file left

    (run,) = [r for r in client(store).search_runs([client(store).get_experiment_by_name("reliability").experiment_id])
              if r.data.params.get("train.out") == str(out)]
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["error"]
    assert run_cli(["train", "--config", str(config), "--out", str(out), "--resume"]) is None
    assert load_checkpoint(out / "last.ckpt")["iteration"] == 4
    assert client(store).get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("track", [True, False])
def test_an_unwritable_output_folder_is_a_clear_error(synthetic_root, store, tmp_path, track):
    """Tests run as root (chmod does not stop root): the output's parent is a file instead."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the run folder should be")
    out = blocker / "run"
    argv = ["train", "--config", str(write_config(tmp_path, synthetic_root)), "--out", str(out)]
    try:
        error = run_cli(argv + ([] if track else ["--no-track"]))
    except OSError as err:  # what the user would see as a traceback
        pytest.fail(f"a traceback instead of a message: {type(err).__name__}: {err}")
    assert error is not None and str(out) in error and "writable" in error, error
    assert blocker.read_text().startswith("a file")


# ----------------------------------------------------------------------------- parallel jobs
CHILD_LOG = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    uri, folder, i, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    from recontrast import tracking
    from recontrast.config import Config, apply_overrides
    cfg = apply_overrides(Config(), {"tracking.uri": uri, "tracking.experiment": "parallel",
                                     "data.category": f"job{i}", "tracking.study": "par"})
    (folder / f"ready{i}").touch()
    while not (folder / "go").exists():  # all four start writing at once
        time.sleep(0.01)
    with tracking.start_run(cfg, run_name=f"job{i}") as run:
        cb = tracking.MLflowCallback(run, flush_every_s=3600)
        for step in range(1, steps + 1):
            cb.on_log(step, {"loss": 1.0 / step, "job": float(i)})
            if step % 4 == 0:
                cb.flush()  # one sqlite write per 4 steps (the callback flushes every 10 s)
        cb.on_end(type("R", (), {"iterations": steps, "loss_rising": False})())
    print(run.run_id)
""")


def _parallel_jobs(folder: Path, uri: str, steps: int, jobs: int = 4) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_LOG, uri, str(folder), str(i), str(steps)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(jobs)]
    deadline = time.monotonic() + 120
    while not all((folder / f"ready{i}").exists() for i in range(jobs)) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    (folder / "go").touch()
    return [subprocess.CompletedProcess(p.args, p.wait(240), *p.communicate()) for p in procs]


def _check_runs(uri: str, results, steps: int, jobs: int = 4) -> None:
    failures = [r.stderr.strip().splitlines()[-1] for r in results if r.returncode != 0]
    assert not failures, f"{len(failures)} of {jobs} jobs failed: {failures}"
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("parallel").experiment_id], max_results=100)
    assert sorted(r.info.run_id for r in runs) == sorted(r.stdout.strip() for r in results)
    for run in runs:
        assert run.info.status == "FINISHED"
        history = c.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1)), run.info.run_name
        assert all(abs(m.value - 1.0 / m.step) < 1e-12 for m in history)
        assert run.data.metrics["train/iterations"] == steps


@pytest.mark.slow
def test_four_parallel_jobs_on_one_fresh_sqlite_store(tmp_path):
    """Four jobs start together on a store that does not exist yet (four `recontrast train`
    from a shell loop; `recontrast batch --jobs 4` creates the store first, a subset of this)
    and each logs 200 steps: no "database is locked", no lost step, every run FINISHED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _check_runs(uri, _parallel_jobs(tmp_path, uri, steps=200), steps=200)


# ----------------------------------------------------------------------------- untrusted files
class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(folder: Path) -> tuple[Path, list[Path]]:
    marker = folder / "code_ran"
    zipped, legacy = folder / "evil_zip.ckpt", folder / "evil_legacy.pth"
    payload = {"format": "recontrast-ckpt-v1", "model": {"w": torch.zeros(1)}, "extra": Evil(marker)}
    torch.save(payload, zipped)
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    return marker, [zipped, legacy]


def test_malicious_checkpoints_are_refused_by_evaluate_and_predict(synthetic_root, tmp_path):
    from recontrast.infer import Detector

    marker, files = _evil_files(tmp_path)
    image = next((synthetic_root / CATEGORY / "test" / "good").iterdir())
    for path in files:
        for argv in (["evaluate", "--checkpoint", str(path), "--no-track"],
                     ["predict", "--checkpoint", str(path), str(image), "--out", str(tmp_path / "preds")]):
            error = run_cli(argv)
            assert error is not None and f"refused to load '{path}'" in error, error
            assert "weights_only=True" in error and "never loaded" in error
        with pytest.raises(CheckpointError, match="refused"):
            Detector.load(path)
    assert not marker.exists(), "unpickling ran the attacker's code"


def test_malicious_pretrained_weights_are_refused(synthetic_root, tmp_path):
    from recontrast.backbones import BackboneError, create_encoder

    marker, files = _evil_files(tmp_path)
    config = write_config(tmp_path, synthetic_root)
    for path in files:
        with pytest.raises(BackboneError, match=rf"(?s)cannot read weights file '{path}'.*weights_only"):
            create_encoder("resnet18", str(path))
        assert not marker.exists(), "unpickling ran the attacker's code"
        error = run_cli(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-track",
                         "--set", f"model.pretrained={path}"])
        assert not marker.exists(), "unpickling ran the attacker's code"
        assert error is not None and str(path) in error and "BackboneError" in error, error
        assert "posix.system" in error  # says what the file tried to run
        # ... and never advises what torch's own message does for an untrusted file:
        assert "will likely succeed" not in error and "set to `False`" not in error, error
    assert not (tmp_path / "run" / "last.ckpt").exists()


def _make_n(target: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "MAKEFLAGS", "MFLAGS")}
    proc = subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_lab_and_ui_bind_to_loopback_and_lab_keeps_its_token():
    lab = [line for line in _make_n("lab").splitlines() if "jupyter" in line and " lab" in line]
    ui = [line for line in _make_n("ui").splitlines() if "mlflow" in line and " ui" in line]
    assert len(lab) == 1 and len(ui) == 1, (lab, ui)
    assert "--ip 127.0.0.1" in lab[0], lab[0]
    assert "token" not in lab[0].lower() and "password" not in lab[0].lower(), lab[0]
    assert "--host 127.0.0.1" in ui[0], ui[0]
    assert "0.0.0.0" not in lab[0] + ui[0]


# ----------------------------------------------------------------------------- determinism
def test_same_config_and_seed_give_the_same_metrics_on_cpu(synthetic_root, tmp_path):
    from recontrast.config import load_config
    from recontrast.data import build_datasets
    from recontrast.evaluate import evaluate
    from recontrast.train import train

    results = []
    for name in ("first", "second"):
        cfg = load_config(write_config(tmp_path / name, synthetic_root, iters=4, checkpoint_every=0),
                          [f"train.out={tmp_path / name}", "tracking.enabled=false", "train.device=cpu"])
        datasets = build_datasets(cfg.data)  # decoded from disk again, like a second run
        trained = train(cfg, datasets=datasets)
        results.append((trained, evaluate(trained.model, datasets.test, cfg.eval).metrics))
    (a, ma), (b, mb) = results
    assert a.loss_history == b.loss_history
    assert same_weights(a.model.state_dict(), b.model.state_dict())
    assert ma.keys() == mb.keys() and len(ma) > 5
    for key in ma:
        assert np.isclose(float(ma[key]), float(mb[key]), rtol=0, atol=1e-6, equal_nan=True), key


# ----------------------------------------------------------------------------- one owner per folder
def _wait_for(predicate, child, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert child.poll() is None, f"the child ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _artifact_checkpoint(uri: str, run_id: str, folder: Path) -> dict:
    """Returns the checkpoint inside the run's logged MLflow model (its inference weights)."""
    import mlflow

    from recontrast.mlflow_model import find_model

    local = mlflow.artifacts.download_artifacts(f"models:/{find_model(run_id, uri)}", dst_path=str(folder),
                                                tracking_uri=uri)
    (path,) = Path(local).rglob("*.ckpt")
    return load_checkpoint(path)


@pytest.mark.slow
def test_a_second_train_on_a_busy_run_folder_refuses_naming_the_holder(synthetic_root, store, tmp_path):
    """Two `recontrast train --out X` at once used to both finish, the first run's logged
    checkpoint holding the second's weights. Now the second refuses before any work, and
    the first run logs exactly what it trained."""
    config = write_config(tmp_path, synthetic_root, iters=16, checkpoint_every=4)
    out, log = tmp_path / "run", (tmp_path / "child.log").open("w")
    child = subprocess.Popen([sys.executable, "-c", CHILD_TRAIN, "train", "--config", str(config), "--out", str(out)],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: f'"pid": "{child.pid}"' in ((out / ".lock").read_text() if (out / ".lock").is_file() else ""),
                  child, "the child held the run folder")
        error = run_cli(["train", "--config", str(config), "--out", str(out), "--set", "train.iters=2"])
        assert error is not None and "\n" not in error, error
        assert re.search(rf"FolderBusy: the run folder {re.escape(str(out))} is in use by process {child.pid} on "
                         rf"{re.escape(socket.gethostname())} .*train into another folder", error), error
        assert child.wait(240) == 0, (tmp_path / "child.log").read_text()[-2000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()
    from recontrast.mlflow_store import read_run_id

    on_disk = load_checkpoint(out / "last.ckpt")
    logged = _artifact_checkpoint(store, read_run_id(out), tmp_path / "download")
    assert on_disk["iteration"] == logged["iteration"] == 16 and on_disk["calibration"]
    assert same_weights(on_disk["model"], logged["model"]) and logged["calibration"] == on_disk["calibration"]
    # The lock went with its process: the folder is free again.
    assert run_cli(["train", "--config", str(config), "--out", str(out), "--set", "train.iters=2", "--no-track"]) is None


def test_a_second_batch_of_a_running_study_refuses_and_a_killed_one_frees_it(store, tmp_path):
    from recontrast import batch
    from recontrast.batch import PairResult

    (tmp_path / "data" / "weave" / "train").mkdir(parents=True)
    study = tmp_path / "mini.yaml"
    study.write_text(yaml.safe_dump({
        "data": {"root": str(tmp_path / "data"), "image_size": 64},
        "model": {"backbone": "resnet18", "pretrained": "none"}, "tracking": {"experiment": "study_lock"},
        "study": {"name": "mini", "categories": ["weave"],
                  "variants": {"full": {}, "no_da": {"model.domain_adaptation": False}}}}))
    runs, jobs = tmp_path / "runs", []

    def executor(job):
        jobs.append(job)
        return PairResult(job.variant, job.category, "done", f"run-{job.variant}", "", 0.0, job.folder)

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom recontrast.locks import folder_lock\n"
                               "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)",
                               str(runs / "mini")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"study 'mini', folder .*mini is in use by process {holder.pid} "
                                               r".*stop it first \(a rerun skips the pairs it finished\)"):
            batch.run_study(study, runs_dir=runs, executor=executor)
        assert jobs == []
        experiment = client(store).get_experiment_by_name("study_lock")
        assert experiment is None or client(store).search_runs([experiment.experiment_id]) == []
    finally:
        holder.kill()  # SIGKILL: the operating system releases the lock
        holder.wait()
    assert batch.run_study(study, runs_dir=runs, executor=executor).ok and len(jobs) == 2


def test_fix_stale_never_fails_a_live_run_and_a_finished_run_loses_the_stale_mark(store, tmp_path):
    from recontrast import tracking
    from recontrast.config import Config, apply_overrides

    cfg = apply_overrides(Config(), {"tracking.experiment": "stale", "train.out": str(tmp_path / "x")})
    c = client(store)
    with tracking.start_run(cfg, run_name="alive-here") as here:
        with tracking.start_run(cfg, run_name="elsewhere", tags={"hostname": "another-host"}) as there:
            time.sleep(1.5)  # both silent for longer than --older-than
            assert run_cli(["runs", "--fix-stale", "--older-than", "1"]) is None
            assert c.get_run(here.run_id).info.status == "RUNNING"  # its process (this one) is alive
            marked = c.get_run(there.run_id)
            assert marked.info.status == "FAILED" and marked.data.tags["error_type"] == "StaleRun"
        finished = c.get_run(there.run_id)  # it was working after all, and ended normally
        assert finished.info.status == "FINISHED"
        assert "error_type" not in finished.data.tags and "error" not in finished.data.tags
    assert c.get_run(here.run_id).info.status == "FINISHED"


def test_resume_in_a_copied_run_folder_gets_its_own_run(synthetic_root, store, tmp_path):
    from recontrast.mlflow_store import read_run_id

    config = write_config(tmp_path, synthetic_root, iters=2, checkpoint_every=2)
    original, copy = tmp_path / "original", tmp_path / "copy"
    assert run_cli(["train", "--config", str(config), "--out", str(original)]) is None
    shutil.copytree(original, copy)
    first = read_run_id(original)
    assert read_run_id(copy) == first  # the copy carries the original's run id ...
    assert run_cli(["train", "--config", str(config), "--out", str(copy), "--resume", "--set", "train.iters=4"]) is None
    second = read_run_id(copy)
    assert second != first  # ... but resuming there opened a run of its own
    c = client(store)
    assert c.get_run(first).data.metrics["train/iterations"] == 2 and c.get_run(first).info.status == "FINISHED"
    assert c.get_run(second).data.metrics["train/iterations"] == 4
    assert c.get_run(second).data.tags["run_folder"] == str(copy.resolve())
    # ... and an evaluation of the copy's checkpoint is logged to the copy's run.
    assert run_cli(["evaluate", "--checkpoint", str(copy / "last.ckpt"), "--out", str(tmp_path / "e")]) is None
    assert c.get_run(second).data.tags["evaluated_checkpoint"] == str((copy / "last.ckpt").resolve())
    assert c.get_run(first).data.tags["evaluated_checkpoint"] == str((original / "last.ckpt").resolve())


@pytest.mark.parametrize("change", ["model.width_mult=2", "model.domain_adaptation=false", "model.backbone=resnet34"])
def test_resume_with_another_model_shape_is_one_line_and_touches_nothing(synthetic_root, store, tmp_path, change):
    config = write_config(tmp_path, synthetic_root, iters=2, checkpoint_every=2)
    out = tmp_path / "run"
    assert run_cli(["train", "--config", str(config), "--out", str(out), "--no-track"]) is None
    before = (out / "last.ckpt").stat().st_mtime_ns
    error = run_cli(["train", "--config", str(config), "--out", str(out), "--resume", "--set", change, "train.iters=4"])
    key = change.split("=")[0]
    assert error is not None and "\n" not in error, error
    assert re.search(rf"--resume: .*last\.ckpt was trained with {re.escape(key)}=.*resume with {re.escape(key)}=", error)
    assert (out / "last.ckpt").stat().st_mtime_ns == before
    assert [r for r in client(store).search_runs([e.experiment_id for e in client(store).search_experiments()])
            if r.data.params.get("train.out") == str(out)] == []


# ----------------------------------------------------------------------------- unreachable services
def test_an_unreachable_tracking_server_fails_in_seconds_before_any_work(synthetic_root, tmp_path, monkeypatch):
    import recontrast.train as T

    monkeypatch.setattr(T, "build_model", lambda cfg: pytest.fail("training started"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config, out = write_config(tmp_path, synthetic_root), tmp_path / "run"
    start = time.monotonic()
    error = run_cli(["train", "--config", str(config), "--out", str(out), "--set", f"tracking.uri=http://127.0.0.1:{port}"])
    assert time.monotonic() - start < 15
    assert error is not None and "\n" not in error, error
    assert re.search(rf"the MLflow tracking server http://127\.0\.0\.1:{port} does not answer .*--no-track", error), error
    assert not out.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    error = run_cli(["evaluate", "--checkpoint", str(tmp_path / "x.ckpt")])  # a missing file is said first
    assert error is not None and "no checkpoint file" in error
    assert "does not answer" in run_cli(["runs", "--fix-stale"])


def test_a_server_that_accepts_but_never_answers_times_out(tmp_path):
    from recontrast.mlflow_store import StoreUnreachable, check_reachable

    with socket.socket() as server:  # listens (the kernel accepts connections) but never replies
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        start = time.monotonic()
        with pytest.raises(StoreUnreachable, match="does not answer .*1 s timeout"):
            check_reachable(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=1.0)
        assert time.monotonic() - start < 5
    check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")  # files and databases are not probed


# ----------------------------------------------------------------------------- no silent wrong decision
@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> Path:
    """Returns a calibrated checkpoint of a 2-iteration model (trained once for the module)."""
    from conftest import one_thread

    folder = tmp_path_factory.mktemp("trained")
    config = write_config(folder, synthetic_root, iters=2, checkpoint_every=2)
    with one_thread():
        assert run_cli(["train", "--config", str(config), "--out", str(folder / "run"), "--no-track"]) is None
    return folder / "run" / "last.ckpt"


def _copy(ckpt: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(ckpt, folder / "last.ckpt"))


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("change", ["eval.level_weights=[0,0,1]", "data.image_size=128", "eval.score=topk_mean",
                                    "eval.sigma=1"])
def test_predict_scores_as_the_calibration_was_made_after_evaluate_with_other_settings(
        trained, synthetic_root, tmp_path, change):
    """`evaluate --set <a setting that changes scores>` stores a calibration made with it;
    predict used to apply that calibration to scores computed with the checkpoint's own
    settings (50/50 or 1/50 images flagged instead of 42/50). Now predict scores every image
    exactly as the evaluation did: same raw scores, so the same decisions."""
    ckpt = _copy(trained, tmp_path / "run")
    assert run_cli(["evaluate", "--checkpoint", str(ckpt), "--no-track", "--out", str(tmp_path / "e"),
                    "--set", change]) is None
    evaluated = {r["path"]: float(r["score"]) for r in _csv(tmp_path / "e" / "per_image.csv")}
    calibration = load_checkpoint(ckpt)["calibration"]
    assert run_cli(["predict", "--checkpoint", str(ckpt), *evaluated, "--out", str(tmp_path / "p")]) is None
    predicted = _csv(tmp_path / "p" / "predictions.csv")
    assert len(predicted) == len(evaluated) == 15
    for row in predicted:
        assert float(row["raw_score"]) == pytest.approx(evaluated[row["path"]], rel=1e-4, abs=1e-6), row["path"]
        assert (row["anomalous"] == "True") == (float(row["raw_score"]) > calibration["threshold_normal"])
    assert float(predicted[0]["threshold"]) == pytest.approx(calibration["threshold_normal"])


def test_a_calibration_that_does_not_record_its_settings_is_refused(trained, synthetic_root, tmp_path):
    from recontrast.checkpoint import save_checkpoint

    ckpt = _copy(trained, tmp_path / "run")
    state = load_checkpoint(ckpt)
    del state["calibration"]["eval"]["level_weights"]  # as calibrations made before it was stored
    save_checkpoint(ckpt, state)
    image = next((synthetic_root / CATEGORY / "test" / "good").iterdir())
    error = run_cli(["predict", "--checkpoint", str(ckpt), str(image), "--out", str(tmp_path / "p")])
    assert error is not None and re.search(r"does not record eval\.level_weights, so its thresholds may not fit "
                                           r".*recalibrate with `recontrast evaluate --checkpoint", error), error
    assert not (tmp_path / "p").exists()
    error = run_cli(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")])
    assert error is not None and "does not record eval.level_weights" in error


def test_export_uses_the_calibrated_image_size_and_refuses_another(trained, tmp_path):
    pytest.importorskip("onnx")
    ckpt = _copy(trained, tmp_path / "run")
    assert run_cli(["evaluate", "--checkpoint", str(ckpt), "--no-track", "--out", str(tmp_path / "e"),
                    "--set", "data.image_size=96"]) is None
    error = run_cli(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--image-size", "64"])
    assert error is not None and re.search(r"calibrated at 96 px .*export at 96", error), error
    import onnx

    assert run_cli(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) is None
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["recontrast.image_size"] == "96"


def test_predict_exit_status_says_when_nothing_was_scored(trained, synthetic_root, tmp_path):
    from recontrast.infer import Detector

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (broken / "b.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        error = run_cli(["predict", "--checkpoint", str(trained), str(broken), "--out", str(tmp_path / "p")])
    assert error is not None and "none of the 2 input image(s) could be read, nothing was scored" in error
    good = next((synthetic_root / CATEGORY / "test" / "good").iterdir())
    with pytest.warns(UserWarning, match="skipping unreadable image"):  # one of two scored: exit 0
        assert run_cli(["predict", "--checkpoint", str(trained), str(broken / "a.png"), str(good),
                        "--out", str(tmp_path / "q")]) is None
    for bad in (float("nan"), float("inf"), "nan"):
        with pytest.raises(ValueError, match="threshold must be a finite number"):
            Detector.load(trained, threshold=bad)


def test_evaluate_refuses_settings_the_checkpoint_fixes(trained, tmp_path):
    ckpt = _copy(trained, tmp_path / "run")
    before = load_checkpoint(ckpt)["calibration"]
    for change in ("model.width_mult=2", "train.lr=0.1", "loss.kind=regional"):
        error = run_cli(["evaluate", "--checkpoint", str(ckpt), "--no-track", "--set", change])
        assert error is not None and f"evaluate cannot change {change.split('=')[0]}" in error, error
    assert load_checkpoint(ckpt)["calibration"] == before
