"""MLflow tracking: run status on success/crash/interrupt/SIGKILL, the training callback,
and one run holding a training, its resumption and its evaluation."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

from conftest import killed_run, empty_store
from recontrast import mlflow_store, pipeline, tracking
from recontrast.config import load_config
from recontrast.train import LOSS_RISING, Callback, TrainResult

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """Returns an MlflowClient on a fresh sqlite store that tracking uses for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", empty_store(tmp_path_factory, tmp_path_factory.mktemp("mlruns")))
        yield mlflow_store.get_client()


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for f in client.list_artifacts(run_id, path):
        found |= artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return found


def test_tracking_uri_defaults_to_sqlite_in_the_repo_and_follows_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RECONTRAST_ROOT", raising=False)  # the root is where the user works: here, the repo
    monkeypatch.chdir(REPO)
    assert mlflow_store.tracking_uri() == f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}"
    assert mlflow_store.artifact_location(mlflow_store.tracking_uri()) == (REPO / "mlruns" / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert mlflow_store.tracking_uri() == "http://tracking:5000"
    assert mlflow_store.artifact_location("http://tracking:5000") is None  # the server decides
    cfg = load_config(None, [f"tracking.uri={tmp_path}"])  # a folder: sqlite inside, not the file store
    assert mlflow_store.tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_retry_waits_out_a_locked_database():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    def broken():
        calls.append(1)
        raise ValueError("not a lock")

    assert mlflow_store.retry(flaky) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        mlflow_store.retry(broken)
    assert len(calls) == 4  # other errors are not retried


def test_runs_end_finished_failed_with_the_error_or_killed(client):
    cfg = load_config(None, ["tracking.experiment=status", "data.category=bottle", "tracking.study=s1"])
    with tracking.start_run(cfg) as ok:
        pass
    with pytest.raises(ValueError), tracking.start_run(cfg) as failed:
        raise ValueError("no such defect folder")
    with pytest.raises(KeyboardInterrupt), tracking.start_run(cfg) as killed:
        raise KeyboardInterrupt
    runs = {name: client.get_run(r.run_id) for name, r in [("ok", ok), ("failed", failed), ("killed", killed)]}
    assert {k: r.info.status for k, r in runs.items()} == {"ok": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
    assert runs["failed"].data.tags["error"] == "ValueError: no such defect folder"
    assert "error.txt" in artifacts(client, failed.run_id)
    tags, params = runs["ok"].data.tags, runs["ok"].data.params
    assert (tags["category"], tags["study"], tags["variant"]) == ("bottle", "s1", "full")
    assert {"mlflow.source.name", "mlflow.source.type", "mlflow.user"} <= set(tags)  # MLflow's context resolution
    assert tags["pid"] == str(os.getpid())
    assert {"git_commit", "git_dirty", "hostname", "backbone", "dataset"} <= set(tags)
    assert params["data.category"] == "bottle" and params["train.iters"] == "2000"


@pytest.mark.slow
def test_fix_stale_runs_fails_the_run_of_a_killed_process(client):
    orphan = killed_run("stale")
    exp = mlflow_store.experiment_id(client, "stale")
    alive = client.create_run(exp, tags={"pid": str(os.getpid()), "hostname": socket.gethostname()}).info.run_id
    elsewhere = client.create_run(exp, start_time=int((time.time() - 3600) * 1000),
                                  tags={"pid": "1", "hostname": "another-host"}).info.run_id
    assert client.get_run(orphan).info.status == "RUNNING"

    fixed = mlflow_store.fix_stale_runs()
    assert orphan in fixed and alive not in fixed and elsewhere not in fixed
    run = client.get_run(orphan)
    assert run.info.status == "FAILED" and "gone" in run.data.tags["error"]
    assert client.get_run(alive).info.status == "RUNNING"
    assert mlflow_store.fix_stale_runs(older_than_s=600) == [elsewhere]  # silent for an hour
    client.set_terminated(alive)


def test_callback_logs_steps_evaluations_warnings_and_the_checkpoint(client, tmp_path):
    cfg = load_config(None, ["tracking.experiment=callback"])
    model = torch.nn.Linear(2, 2)
    with tracking.start_run(cfg) as run:
        cb = tracking.MLflowCallback(run)
        cb.on_start(cfg, model, 0)
        for it in (10, 20, 30):
            cb.on_log(it, {"loss": 1.0 / it, "alpha": -3.0 + it / 10})
        cb.on_eval(20, {"image_auroc": 0.75, "pixel_auroc": float("nan")})
        cb.on_warning("training may be diverging: the loss rose over iterations 10..30", LOSS_RISING)
        cb.on_checkpoint(30, tmp_path / "last.ckpt")
        cb.on_end(TrainResult(model, tmp_path / "last.ckpt", 30, [], loss_rising=True))
    history = client.get_metric_history(run.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.05), (30, pytest.approx(1 / 30))]
    assert [m.step for m in client.get_metric_history(run.run_id, "train/alpha")] == [10, 20, 30]
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "eval/image_auroc")] == [(20, 0.75)]
    data = client.get_run(run.run_id).data
    assert "eval/pixel_auroc" not in data.metrics  # NaN is left out
    assert data.tags[LOSS_RISING] == "true" and "diverging" in data.tags["warning"]
    assert data.tags["checkpoint"] == str((tmp_path / "last.ckpt").resolve())
    assert "warnings.txt" in artifacts(client, run.run_id)
    assert mlflow_store.read_run_id(tmp_path) == run.run_id


def tiny(root: Path, out: Path, experiment: str) -> list[str]:
    return [f"data.root={root}", "data.category=disc", "data.image_size=64", "model.backbone=resnet18",
            "model.pretrained=none", "train.iters=2", "train.batch_size=2", "train.log_every=1", "train.threads=1",
            f"train.out={out}", f"tracking.experiment={experiment}", "eval.gif=false"]


def test_a_config_that_cannot_work_stops_before_any_run_or_file(client, synthetic_root, tmp_path):
    from recontrast.config import ConfigError

    cfg = load_config(None, [*tiny(synthetic_root, tmp_path / "run", "cannot"), "train.batch_size=100"])
    with pytest.raises(ConfigError, match="train.batch_size=100 but only"):
        pipeline.run_training(cfg)
    assert client.get_experiment_by_name("cannot") is None and not (tmp_path / "run").exists()


class Interrupt(Callback):
    def on_log(self, iteration, metrics):
        if iteration == 2:
            raise KeyboardInterrupt


def test_an_interrupted_training_ends_killed_with_its_last_metrics(client, synthetic_root, tmp_path):
    cfg = load_config(None, [*tiny(synthetic_root, tmp_path / "run", "interrupted"), "train.iters=5"])
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_training(cfg, callbacks=[Interrupt()])
    run_id = mlflow_store.read_run_id(tmp_path / "run")
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]


def test_the_metrics_up_to_a_checkpoint_are_stored_before_it_is_written(client, synthetic_root, tmp_path, monkeypatch):
    # A kill right after a checkpoint resumes from it: the steps before it are never logged again.
    from recontrast import train

    seen, write = {}, train.save_checkpoint

    def watched(path, state):
        run_id = mlflow_store.read_run_id(tmp_path / "run")
        seen[state["iteration"]] = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        write(path, state)

    monkeypatch.setattr(train, "save_checkpoint", watched)
    cfg = load_config(None, [*tiny(synthetic_root, tmp_path / "run", "flushed"), "train.iters=4",
                             "train.checkpoint_every=2"])
    pipeline.run_training(cfg, evaluate_at_end=False)
    assert seen == {2: [1, 2], 4: [1, 2, 3, 4]}


@pytest.mark.slow
def test_training_its_resumption_and_its_evaluation_share_one_run(client, synthetic_root, tmp_path):
    overrides = tiny(synthetic_root, tmp_path / "run", "train")
    _, evaluation, run_id = pipeline.run_training(load_config(None, overrides), evaluate_at_end=False)
    assert evaluation is None and client.get_run(run_id).info.status == "FINISHED"

    result, evaluation, resumed = pipeline.run_training(load_config(None, [*overrides, "train.iters=3"]), resume=True)
    assert resumed == run_id and result.iterations == 3
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.backbone"] == "resnet18"
    assert run.data.tags["changed_params"] == "train.iters: 2 -> 3"
    assert {"image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_f1max"} <= set(run.data.metrics)
    assert run.data.metrics["data/train_images"] > 0 and run.data.metrics["data/skipped_images"] == 0
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert {"config.yaml", "evaluation/metrics.json", "evaluation/per_image.csv",
            "figures/roc_pr.png", "figures/worst_gallery.png", "figures/loss_curve.png"} <= artifacts(client, run_id)
    assert run.outputs.model_outputs  # the MLflow model 'detector' (the full checkpoint: tracking.log_full_checkpoint)

    # `recontrast evaluate` (main_evaluate) logs without a run id: the run is found through
    # <train.out>/mlflow_run_id, and again through the checkpoint tag when that file is gone.
    assert tracking.log_evaluation(evaluation, result.checkpoint) == run_id
    (tmp_path / "run" / mlflow_store.RUN_ID_FILE).unlink()
    assert mlflow_store.find_run(result.checkpoint) == run_id
    assert client.get_run(run_id).data.tags["evaluated_checkpoint"] == str(result.checkpoint.resolve())
    assert len(client.search_runs([run.info.experiment_id])) == 1
