"""`recontrast batch --executor ray`: the same study on a local Ray instance ends with the same
MLflow runs and numbers as the local executor; a pair whose Ray worker is killed is retried
(resuming its checkpoint) or reported failed, never left RUNNING; Ray stays optional.

Tiny studies only (resnet18 from scratch, 64 px, 2 CPUs for Ray's workers), without the
comparison that ends a batch (notebook 04 runs in the driver, whichever the executor:
tests/test_notebooks.py and tests/test_mlflow_ui.py cover it)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import empty_store, run_cli
from recontrast import batch, mlflow_store, synthetic
from recontrast.ray_executor import RayOptions, WorkerSetupError, _check_paths
from recontrast.study import load_study, plan

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = list(synthetic.CATEGORIES[:1])  # two variants of one category: two pairs at a time
TIMED = ("per_s", "seconds", "heartbeat", "system/")  # metrics that measure time or the machine, not the model
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed: pip install -e '.[cluster]' (the dev extra has it)")


@pytest.fixture(autouse=True)
def _no_ray_memory_monitor(monkeypatch):
    """Ray kills workers when the machine's memory is nearly full, whoever fills it; on a
    shared test machine that is other processes: the tests kill workers themselves."""
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")


def study_file(folder: Path, root: Path, categories: list[str], variants: dict, **train) -> Path:
    config = {
        "data": {"root": str(root), "image_size": 64, "val_fraction": 0.0},
        "model": {"backbone": "resnet18", "pretrained": "none"},
        "train": {"iters": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "threads": 1, **train},
        "eval": {"figures": False, "gif": False},
        "tracking": {"experiment": "ray_test"},
        "study": {"name": "tiny", "categories": categories, "variants": variants},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def use_store(tmp_path_factory, folder: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store(tmp_path_factory, folder))
    return mlflow_store.get_client()


def runs_of(client, experiment: str = "ray_test") -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100)


def summary(client) -> dict:
    """Returns the study's MLflow structure and numbers, free of paths, ids and timings."""
    runs = runs_of(client)
    parents = [r for r in runs if r.data.tags.get("recontrast_role") == "study"]
    assert len(parents) == 1
    children = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") != parents[0].info.run_id:
            continue
        artifacts = sorted(a.path for a in client.list_artifacts(r.info.run_id))
        notebooks = sorted(a.path for a in client.list_artifacts(r.info.run_id, "notebooks"))
        children[r.info.run_name] = {
            "status": r.info.status,
            "metrics": {k: round(v, 6) for k, v in r.data.metrics.items() if not any(t in k for t in TIMED)},
            "params": {k: v for k, v in r.data.params.items() if k != "train.out"},
            "tags": {k: r.data.tags.get(k) for k in ("study", "variant", "category", "health")},
            "artifacts": artifacts, "notebooks": notebooks,
            "loss": [m.value for m in sorted(client.get_metric_history(r.info.run_id, "train/loss"),
                                             key=lambda m: m.step)],
        }
    tags = parents[0].data.tags
    return {"parent": (parents[0].info.status, tags["pairs_done"], tags["pairs_failed"],
                       sorted(tags["variants"].split(",")), sorted(tags["categories"].split(","))),
            "children": children}


@needs_ray
@pytest.mark.e2e
@pytest.mark.xdist_group("ray")  # one Ray instance at a time (make test: -n 2 --dist loadgroup)
def test_a_tiny_study_on_ray_logs_what_the_local_executor_logs(synthetic_root, tmp_path, tmp_path_factory,
                                                                monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = study_file(tmp_path, synthetic_root, CATEGORIES, {"full": {}, "no_da": {"model.domain_adaptation": False}})
    seconds = {}
    for executor in ("local", "ray"):
        client = use_store(tmp_path_factory, tmp_path / executor / "mlruns", monkeypatch)
        t0 = time.perf_counter()
        report = batch.run_study(path, jobs=2, runs_dir=tmp_path / executor / "runs",
                                 ray=RayOptions() if executor == "ray" else None, compare=False)
        seconds[executor] = time.perf_counter() - t0
        assert report.ok, report.summary()
        assert (sorted((r.variant, r.category, r.status) for r in report.results)
                == sorted((v, c, "done") for v in ("full", "no_da") for c in CATEGORIES))
        if executor == "local":
            local = summary(client)
        else:
            on_ray = summary(client)
    print(f"tiny study, 2 pairs, 2 at a time: local {seconds['local']:.1f} s, ray {seconds['ray']:.1f} s")
    assert on_ray["parent"] == local["parent"] == ("FINISHED", "2", "0", ["full", "no_da"], sorted(CATEGORIES))
    assert (sorted(on_ray["children"]) == sorted(local["children"])
            == sorted(f"{v}-{c}" for v in ("full", "no_da") for c in CATEGORIES))
    for name, expected in local["children"].items():
        assert expected["status"] == "FINISHED" and expected["metrics"], name
        assert on_ray["children"][name] == expected, name
    assert (tmp_path / "ray" / "runs" / "tiny" / "no_da" / CATEGORIES[0] / "done.json").is_file()


def _kill_when_checkpointed(folder: Path, ckpt_before: float, deadline_s: float = 240) -> int:
    """Waits until the pair's training wrote a checkpoint (newer than `ckpt_before`), then
    SIGKILLs the Ray worker running it (named in ray_attempt.json); returns its pid."""
    deadline = time.monotonic() + deadline_s
    attempt, ckpt = folder / "ray_attempt.json", folder / "train" / "last.ckpt"
    while time.monotonic() < deadline:
        if attempt.is_file() and ckpt.is_file() and ckpt.stat().st_mtime > ckpt_before:
            pid = json.loads(attempt.read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.1)
    state = {p.name: p.stat().st_mtime for p in [*folder.iterdir(), *folder.glob("train/*")]}
    raise AssertionError(f"no checkpoint newer than {ckpt_before} in {folder / 'train'} within {deadline_s} s: {state}")


def _run_and_kill(path: Path, runs: Path, retries: int):
    """Returns (report, killed pid): the study runs in a thread while this one kills its worker."""
    folder = runs / "tiny" / "full" / CATEGORIES[0]
    (folder / "ray_attempt.json").unlink(missing_ok=True)  # the worker of an earlier batch is gone
    ckpt = folder / "train" / "last.ckpt"
    ckpt_before = ckpt.stat().st_mtime if ckpt.is_file() else 0.0
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault(
        "report", batch.run_study(path, runs_dir=runs, ray=RayOptions(max_retries=retries), compare=False)))
    thread.start()
    try:
        pid = _kill_when_checkpointed(folder, ckpt_before)
    finally:
        thread.join(300)
    assert not thread.is_alive(), "the batch did not end after its worker was killed"
    return outcome["report"], pid


@pytest.fixture()
def ray_instance():
    """A local Ray instance of 2 CPUs for a test that runs several batches (one start, not one each)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@needs_ray
@pytest.mark.e2e
@pytest.mark.xdist_group("ray")  # one Ray instance at a time (make test: -n 2 --dist loadgroup)
def test_a_killed_worker_is_reported_failed_or_retried_and_no_run_stays_running(
        synthetic_root, tmp_path, tmp_path_factory, monkeypatch, ray_instance):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = use_store(tmp_path_factory, tmp_path / "mlruns", monkeypatch)
    # Slow enough to be killed mid-training: 40 iterations, a checkpoint every 4.
    path = study_file(tmp_path, synthetic_root, CATEGORIES, {"full": {}}, iters=40, checkpoint_every=4)
    runs = tmp_path / "runs"
    folder = runs / "tiny" / "full" / CATEGORIES[0]

    # No retries: the pair is reported failed and its run ends FAILED, not RUNNING.
    report, _ = _run_and_kill(path, runs, retries=0)
    assert not report.ok and "the Ray worker running this pair died" in report.failed[0].error
    killed_run = mlflow_store.read_run_id(folder / "train")
    assert client.get_run(killed_run).info.status == "FAILED"
    assert client.get_run(killed_run).data.tags["error_type"] == "WorkerDied"

    # One retry (the batch resumes the pair's checkpoint, its worker is killed again): the
    # second attempt resumes the newer checkpoint in the same run, which finishes.
    report, _ = _run_and_kill(path, runs, retries=1)
    assert report.ok, report.summary()
    assert json.loads((folder / "ray_attempt.json").read_text())["attempt"] == 2
    assert report.results[0].run_id == killed_run
    children = [r for r in runs_of(client) if r.data.tags.get("recontrast_role") != "study"]
    assert [r.info.run_id for r in children] == [killed_run]
    assert all(r.info.status != "RUNNING" for r in runs_of(client))
    assert client.get_run(killed_run).info.status == "FINISHED"
    history = client.get_metric_history(killed_run, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, 41))  # every step, once resumed

    again = batch.run_study(path, runs_dir=runs, ray=RayOptions(), compare=False)  # finished pairs are not redone
    assert [r.status for r in again.results] == ["skipped"]


def test_a_worker_that_cannot_see_the_data_names_the_path(synthetic_root, tmp_path):
    path = study_file(tmp_path, tmp_path / "data_elsewhere", ["disc"], {"full": {}})
    (tmp_path / "data_elsewhere").mkdir()
    job = plan(load_study(path), runs_dir=tmp_path / "runs")[0]
    Path(job.folder).mkdir(parents=True)
    (tmp_path / "data_elsewhere").rmdir()  # planned on the driver, gone on the "worker"
    with pytest.raises(WorkerSetupError, match="cannot see data.root .*data_elsewhere.*shared filesystem"):
        _check_paths(job)


@pytest.mark.slow
def test_ray_is_optional(synthetic_root, tmp_path, monkeypatch):
    code = "import sys; sys.modules['ray'] = None; import recontrast.batch, recontrast.cli, recontrast.ray_executor"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    path = study_file(tmp_path, synthetic_root, CATEGORIES, {"full": {}})
    message = run_cli(["batch", "--study", str(path), "--executor", "ray"])
    assert "\n" not in message and "pip install -e '.[cluster]'" in message, message
