"""recontrast/mlflow_model.py and recontrast/pyfunc_model.py: every evaluated training run
logs an MLflow model that loads without unpickling anything and predicts what `recontrast
predict` does; it can be registered per category. The run also carries its datasets, system
metrics and MLflow's own source tags."""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, empty_store, one_thread, run_cli
from recontrast import mlflow_model, pipeline
from recontrast.checkpoint import load_checkpoint, save_checkpoint
from recontrast.config import Config, apply_overrides


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = empty_store(tmp_path_factory, tmp_path_factory.mktemp("mlruns"))
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the CLI and load_model("models:/...") read it
    yield uri
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="module")
def trained(synthetic_root, store, tmp_path_factory):
    """A tiny tracked run (resnet18 from scratch, 64 px, 2 iterations), evaluated: (cfg, result, run_id)."""
    cfg = apply_overrides(Config(), {
        "data.root": str(synthetic_root), "data.category": "weave", "data.image_size": 64, "data.val_fraction": 0.25,
        "model.backbone": "resnet18", "model.pretrained": "none", "train.iters": 2, "train.batch_size": 2,
        "train.threads": 1, "train.checkpoint_every": 0, "train.log_every": 1,
        "train.out": str(tmp_path_factory.mktemp("run")), "tracking.experiment": "mlflow_model",
        "eval.figures": False, "eval.gif": False})
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.2"  # samples within a few seconds' run
    try:
        with one_thread(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # two iterations do not converge, and say so
            result, evaluation, run_id = pipeline.run_training(cfg)
    finally:
        os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", None)
    return cfg, result, run_id


def test_a_training_run_logs_a_model_that_predicts_what_recontrast_predict_does(trained, tmp_path):
    import mlflow

    cfg, result, run_id = trained
    folder = Path(cfg.data.root) / "weave" / "test"
    with one_thread():
        assert run_cli(["predict", "--checkpoint", str(result.checkpoint), str(folder), "--out", str(tmp_path)]) is None
        rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
        model = mlflow.pyfunc.load_model(f"models:/{mlflow_model.find_model(run_id)}")
        images = np.stack([np.asarray(Image.open(r["path"]).convert("RGB")) for r in rows])
        out = model.predict(images)
    assert len(rows) == len(images) >= 9
    np.testing.assert_allclose(out["score"], [float(r["score"]) for r in rows], rtol=1e-6)
    np.testing.assert_allclose(out["raw_score"], [float(r["raw_score"]) for r in rows], rtol=1e-6)
    assert out["decision"].tolist() == [r["anomalous"] == "True" for r in rows]
    assert out["map"].shape == (len(rows), 64, 64) and out["map"].dtype == np.float32


def test_the_model_loads_without_unpickling_anything(trained, monkeypatch):
    import cloudpickle
    import mlflow

    _, _, run_id = trained
    model_id = mlflow_model.find_model(run_id)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}"))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth")]
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in (local / "MLmodel").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (cloudpickle, "load"), (cloudpickle, "loads")]:
        monkeypatch.setattr(module, name, refuse)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: real_load(*a, **{**k, "weights_only": True})
                        if k.get("weights_only") else refuse())
    with one_thread():
        out = mlflow.pyfunc.load_model(f"models:/{model_id}").predict(np.zeros((1, 80, 96, 3), np.uint8))
    assert np.isfinite(out["raw_score"]).all()


def test_the_model_has_a_signature_an_input_example_and_weights_without_optimizer_state(trained):
    import mlflow
    from mlflow.models import Model

    cfg, result, run_id = trained
    uri = f"models:/{mlflow_model.find_model(run_id)}"
    info = Model.load(uri)
    outputs = info.signature.outputs.to_dict()
    assert info.signature.inputs is None  # arrays and base64 strings: no one schema admits both
    assert [o["name"] for o in outputs] == ["score", "raw_score", "decision", "map"]
    example = info.load_input_example(mlflow.artifacts.download_artifacts(uri))
    # Stored as JSON (no input schema to type it): integers 0-255, which the model takes as uint8.
    assert example.shape == (1, 64, 64, 3) and example.dtype.kind in "iu" and 0 <= example.min() <= example.max() <= 255

    weights = next(Path(mlflow.artifacts.download_artifacts(uri)).rglob("weights.ckpt"))
    full, inference = load_checkpoint(result.checkpoint), load_checkpoint(weights)
    assert set(inference) == {"format", "model", "config", "iteration", "calibration"}
    assert inference["calibration"] == full["calibration"] and full["optimizers"]
    assert weights.stat().st_size < 0.6 * Path(result.checkpoint).stat().st_size
    from mlflow import MlflowClient

    logged = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert "checkpoint" not in logged  # tracking.log_full_checkpoint=true logs the full one


def test_register_names_one_model_per_category_and_is_idempotent(trained, capsys):
    import mlflow

    cfg, _, run_id = trained
    assert run_cli(["register", "--run", run_id, "--name", "weave"]) is None
    assert "models:/weave/1" in capsys.readouterr().out
    again = mlflow_model.register(run_id, "weave")
    assert again.version in (1, "1") and again.tags["category"] == "weave" and again.tags["variant"] == "full"
    images = mlflow_model.example_images(cfg, 2)
    with one_thread():
        by_name = mlflow.pyfunc.load_model("models:/weave/1").predict(images)
        by_id = mlflow.pyfunc.load_model(f"models:/{mlflow_model.find_model(run_id)}").predict(images)
    np.testing.assert_array_equal(by_name["raw_score"], by_id["raw_score"])
    message = run_cli(["register", "--run", "0" * 32, "--name", "weave"])
    assert message and "recontrast register" in message


def test_an_uncalibrated_checkpoint_logs_no_model(trained, tmp_path, caplog):
    _, result, run_id = trained
    ckpt = load_checkpoint(result.checkpoint)
    ckpt["calibration"] = {}
    save_checkpoint(tmp_path / "raw.ckpt", ckpt)
    assert mlflow_model.log_detector(run_id, tmp_path / "raw.ckpt") is None
    assert "recontrast evaluate" in caplog.text


def test_the_run_carries_its_datasets_system_metrics_and_mlflows_source_tags(trained):
    from mlflow import MlflowClient

    _, _, run_id = trained
    run = MlflowClient().get_run(run_id)
    inputs = {d.dataset.name: [t.value for t in d.tags] for d in run.inputs.dataset_inputs}
    assert inputs == {"weave/train": ["train"], "weave/val": ["val"], "weave/test": ["test"]}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    tags = run.data.tags
    assert tags["mlflow.source.type"] in ("LOCAL", "NOTEBOOK") and tags["mlflow.source.name"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if head:
        assert tags["mlflow.source.git.commit"] == head
    assert (tags["variant"], tags["category"]) == ("full", "weave") and "ablation" not in tags


def test_the_model_is_named_for_its_run_and_carries_the_test_metrics_linked_to_the_test_dataset(trained):
    from mlflow import MlflowClient

    _, _, run_id = trained
    client = MlflowClient()
    run = client.get_run(run_id)
    model = client.get_logged_model(mlflow_model.find_model(run_id))
    assert model.name == run.info.run_name == "full-weave"  # <variant>-<category>
    linked = {m.key: m for m in model.metrics}
    assert {"image_auroc", "pixel_auroc", "aupro"} <= set(linked)
    assert not [k for k in linked if "/" in k]  # no train/, proxy/ or system/ curves
    test = next(d.dataset for d in run.inputs.dataset_inputs if d.dataset.name == "weave/test")
    for key in ("image_auroc", "aupro"):
        assert linked[key].value == pytest.approx(run.data.metrics[key])
        assert (linked[key].dataset_name, linked[key].dataset_digest) == ("weave/test", test.digest)
        # Linked, not repeated: the run's history keeps one point (the chart view draws a bar per run).
        assert len(client.get_metric_history(run_id, key)) == 1


def test_predict_and_evaluate_take_a_registered_model_or_a_run_id(trained, tmp_path):
    cfg, result, run_id = trained
    version = mlflow_model.register(run_id, "weave_ref")
    folder = Path(cfg.data.root) / "weave" / "test" / "good"
    scores = {}
    with one_thread():
        for name, source in [("ckpt", ["--checkpoint", str(result.checkpoint)]),
                             ("registry", ["--model", f"models:/weave_ref/{version.version}"]),
                             ("run", ["--model", run_id])]:
            assert run_cli(["predict", *source, str(folder), "--out", str(tmp_path / name)]) is None
            scores[name] = [float(r["raw_score"]) for r in csv.DictReader(open(tmp_path / name / "predictions.csv"))]
        assert run_cli(["evaluate", "--model", f"models:/weave_ref/{version.version}", "--no-track",
                        "--out", str(tmp_path / "eval")]) is None
    assert scores["registry"] == pytest.approx(scores["ckpt"]) and scores["run"] == pytest.approx(scores["ckpt"])
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    run_metrics = __import__("mlflow").MlflowClient().get_run(run_id).data.metrics
    assert evaluated["image_auroc"] == pytest.approx(run_metrics["image_auroc"])
    message = run_cli(["predict", str(folder), "--out", str(tmp_path / "none")])
    assert "--model models:/" in message
    assert "models:/nope/1" in run_cli(["predict", "--model", "models:/nope/1", str(folder), "--out", str(tmp_path)])


def test_register_takes_a_run_name_within_a_study(trained, capsys):
    _, _, run_id = trained
    assert run_cli(["register", "--run", "full-weave", "--name", "by_name"]) is None
    assert f"registered run {run_id}'s model as models:/by_name/1" in capsys.readouterr().out
    message = run_cli(["register", "--run", "nope-weave", "--name", "by_name"])
    assert "no finished run named 'nope-weave'" in message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e  # a real `mlflow models serve`
def test_mlflow_models_serve_scores_a_posted_png(trained, store, tmp_path):
    """`make serve MODEL=models:/weave/1`: MLflow's scoring server on loopback, one base64 PNG
    posted as README "Serve a model" shows; its score is the Python API's."""
    import mlflow

    cfg, _, run_id = trained
    version = mlflow_model.register(run_id, "weave_served")
    image = mlflow_model.example_images(cfg, 1)[0]
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png.getvalue()).decode()]]}})
    port = free_port()
    # MLflow starts `uvicorn` by name: the venv's scripts must be on PATH (as `make serve` puts them).
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/weave_served/{version.version}",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 120 s"
                time.sleep(0.5)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            served = json.loads(answer.read())["predictions"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    with one_thread():
        local = mlflow.pyfunc.load_model(f"models:/weave_served/{version.version}").predict(image[None])
    assert served["raw_score"] == pytest.approx(local["raw_score"].tolist(), rel=1e-5)
    assert served["decision"] == local["decision"].tolist()
    assert np.asarray(served["map"]).shape == (1, 64, 64)
