"""The MLflow model of a training run: the detector logged as a pyfunc model, and registered.

    log_detector(run_id, "runs/bottle/last.ckpt")   # model "<variant>-<category>" of the run
    register(run_id, "bottle")                      # models:/bottle/<version>
    mlflow.pyfunc.load_model("models:/bottle/1").predict(images)  # = `recontrast predict`

The model is logged as code (`recontrast/pyfunc_model.py`, MLflow's models-from-code) with
the inference weights as its one artifact: the checkpoint's model, config and calibration,
without the optimizer state, RNG state and loss history a resume needs (the optimizer state
alone is about 60 % of a checkpoint: 30.6 of 48.7 MiB for experiments/cpu_bottle.yaml).
Loading it unpickles nothing: the code is run, the weights are read with
torch.load(weights_only=True). It carries a signature and an input example (one test image).
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from recontrast.calibration import is_calibrated
from recontrast.checkpoint import load_checkpoint, save_checkpoint
from recontrast.config import from_dict
from recontrast.images import IMAGE_EXTENSIONS, load_rgb, resize_rgb
from recontrast.mlflow_store import Tag, get_client, quote, retry, tracking_uri

log = logging.getLogger(__name__)

MODEL_NAME = "detector"  # the logged model's name when its run has no name to give it
# What MLflow refuses in a logged model's name (mlflow.utils.validation._validate_logged_model_name).
_NAME_BAD = re.compile(r"[/:.%\"']")
CODE = Path(__file__).with_name("pyfunc_model.py")
WEIGHTS = "weights.ckpt"
# What inference needs of a checkpoint; the rest (optimizers, scaler, rng, loss_history) is
# training state for a resume.
INFERENCE_KEYS = ("format", "model", "config", "iteration", "calibration", "selection")


def inference_checkpoint(checkpoint: str | Path, out: str | Path, ckpt: dict[str, Any] | None = None) -> Path:
    """Returns `out` after writing the checkpoint's inference part to it (a checkpoint that
    `Detector.load`, `recontrast predict` and `recontrast evaluate` read like the full one);
    `ckpt`: its contents when already read."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    save_checkpoint(Path(out), {k: ckpt[k] for k in INFERENCE_KEYS if k in ckpt})
    return Path(out)


def example_images(cfg, n: int = 1) -> np.ndarray:
    """Returns the first `n` readable test images of cfg's dataset as uint8 (n, S, S, 3),
    S = image_size (mid-gray images when none can be read here). Reads only those files: the
    dataset was decode-verified for training already."""
    size = cfg.data.image_size
    base = Path(cfg.data.root) / (cfg.data.category if cfg.data.format in ("mvtec", "visa", "btad") else "")
    pattern = "Data/Images/*/*" if cfg.data.format == "visa" else "test/*/*"
    found = []
    for path in sorted(p for p in base.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS):
        try:
            found.append(resize_rgb(load_rgb(path), size).permute(1, 2, 0).numpy())
        except Exception:  # noqa: BLE001 - a bad file: the next one will do
            continue
        if len(found) == n:
            return np.stack(found)
    log.warning("no readable test image under %s for the model's input example; using a gray image", base)
    return np.full((n, size, size, 3), 128, np.uint8)


def signature(image_size: int):
    """Returns the ModelSignature: pyfunc_model.DetectorModel.predict's arrays out, and no input
    schema: the model takes two kinds of input, uint8 RGB images (B, H, W, 3) of any size (resized
    to image_size as `recontrast predict` does; the input example) or base64 PNG/JPEG strings
    (a column 'image'), and MLflow would refuse one of them against a schema of the other."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        outputs=Schema([TensorSpec(np.dtype(np.float64), (-1,), "score"),
                        TensorSpec(np.dtype(np.float64), (-1,), "raw_score"),
                        TensorSpec(np.dtype(bool), (-1,), "decision"),
                        TensorSpec(np.dtype(np.float32), (-1, image_size, image_size), "map")]))


def requirements() -> list[str]:
    """Returns the pip requirements of the model's code (recontrast travels with the model
    as code): the installed versions of what `recontrast.infer` imports, and MLflow."""
    found = []
    for name in ("mlflow", "torch", "torchvision", "timm", "einops", "kornia", "numpy", "pillow", "pyyaml",
                 "matplotlib", "psutil"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name}=={metadata.version(name)}")
    return found


def model_name(run) -> str:
    """Returns the name a run's logged model gets: the run's name ('<variant>-<category>' in a
    study), else '<variant>-<category>' from its tags, else 'detector'."""
    tags = run.data.tags
    name = run.info.run_name or "-".join(filter(None, (tags.get(Tag.VARIANT), tags.get(Tag.CATEGORY))))
    return _NAME_BAD.sub("_", name) or MODEL_NAME


# The evaluation's metrics that the Models tab compares (EvalResult.metrics' top-level keys).
def evaluation_metrics(run) -> dict[str, float]:
    """Returns the run's test metrics: its metrics without a '/' (train/, eval/, proxy/,
    system/, delta/ ... are the loop's, the proxy's and the study's)."""
    return {k: v for k, v in run.data.metrics.items() if "/" not in k}


def test_dataset(run):
    """Returns the run's test-split dataset input (context 'test'; tracking.log_datasets), or None."""
    for item in (run.inputs.dataset_inputs if run.inputs else []):
        if any(t.key == "mlflow.data.context" and t.value == "test" for t in item.tags):
            return item.dataset
    return None


def link_metrics(client, run, model_id: str) -> int:
    """Returns how many of the run's evaluation metrics were linked to model `model_id` and to
    the run's test dataset (MLflow 3's model metrics: the Models tab shows and compares them).

    Each is logged again as it was (same value, step and timestamp) with the links added: the
    store keeps one copy in the run's history, so the chart view still draws one bar per run."""
    from mlflow.entities import Metric

    dataset = test_dataset(run)
    link = dict(dataset_name=dataset.name, dataset_digest=dataset.digest) if dataset else {}
    metrics = []
    for key in evaluation_metrics(run):
        history = retry(client.get_metric_history, run.info.run_id, key)
        last = max(history, key=lambda m: (m.step, m.timestamp))
        metrics.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id, **link))
    if metrics:
        retry(client.log_batch, run.info.run_id, metrics=metrics)
    return len(metrics)


def log_detector(run_id: str, checkpoint: str | Path, uri: str | None = None, step: int = 0,
                 threshold: str = "normal", ckpt: dict[str, Any] | None = None):
    """Returns the LoggedModel logged to run `run_id` from `checkpoint` (None, with a warning,
    when the checkpoint holds no calibration: evaluate it first), named model_name(run)
    ('<variant>-<category>'), with the run's evaluation metrics linked to it and to the test
    dataset.

    `step`: the run's step the model belongs to (the evaluation's). Every call goes through
    the store's client: MLflow's global tracking URI and active run are left alone. `ckpt`:
    the checkpoint's contents when the caller holds them (the file is not read again).
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    if not is_calibrated(ckpt.get("calibration")):
        log.warning("no MLflow model logged for %s: it holds no calibration (run `recontrast "
                    "evaluate --checkpoint %s` first)", checkpoint, checkpoint)
        return None
    client = get_client(uri=uri)
    run = client.get_run(run_id)
    cfg = from_dict(ckpt["config"])
    tags = {Tag.CATEGORY: cfg.data.category, "iteration": str(ckpt.get("iteration", ""))}
    tags |= {k: run.data.tags[k] for k in (Tag.VARIANT, Tag.STUDY) if run.data.tags.get(k)}
    model = retry(client.create_logged_model, run.info.experiment_id, model_name(run), source_run_id=run_id,
                  tags=tags, params={k: v[:6000] for k, v in run.data.params.items()})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            weights = inference_checkpoint(checkpoint, Path(tmp) / WEIGHTS, ckpt)
            meta = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                         model_id=model.model_id)
            mlflow.pyfunc.save_model(Path(tmp) / "model", mlflow_model=meta, python_model=str(CODE),
                                     code_paths=[str(CODE.parent)], artifacts={"weights": str(weights)},
                                     model_config={"threshold": threshold}, signature=signature(cfg.data.image_size),
                                     input_example=example_images(cfg), pip_requirements=requirements())
            for cache in (Path(tmp) / "model").rglob("__pycache__"):
                shutil.rmtree(cache, ignore_errors=True)
            retry(client.log_model_artifacts, model.model_id, str(Path(tmp) / "model"))
        retry(client.log_outputs, run_id, [LoggedModelOutput(model.model_id, step)])
        link_metrics(client, run, model.model_id)
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    return retry(client.finalize_logged_model, model.model_id, LoggedModelStatus.READY)


def find_model(run_id: str, uri: str | None = None) -> str:
    """Returns the id of the latest model logged by run `run_id`; raises LookupError."""
    client = get_client(uri=uri)
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    ids = [o.model_id for o in sorted(outputs, key=lambda o: o.step)]
    if ids:
        return ids[-1]
    raise LookupError(f"run {run_id} logged no model: a training run logs it once evaluated (at the "
                      f"end of `recontrast train`, in notebook 03 of a batch); for an older run, "
                      f"recontrast.mlflow_model.log_detector(run_id, checkpoint) logs it")


RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def is_model_reference(text: str | None) -> bool:
    """Returns True for what model_checkpoint resolves: a models:/ URI or an MLflow run id."""
    return bool(text) and (str(text).startswith("models:/") or bool(RUN_ID.match(str(text))))


def model_checkpoint(ref: str, dst: str | Path, uri: str | None = None) -> Path:
    """Returns the inference checkpoint (weights.ckpt) of a logged model, downloaded under
    `dst`: `ref` is models:/<name>/<version>, models:/<name>@<alias>, models:/<model id>, or a
    run id (the latest model it logged). `recontrast predict/evaluate --model` read it."""
    import mlflow

    uri = tracking_uri(uri=uri)
    if not ref.startswith("models:/"):
        ref = f"models:/{find_model(ref, uri)}"
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(ref, dst_path=str(dst), tracking_uri=uri)
    except Exception as err:
        raise LookupError(f"cannot load {ref} from {uri}: {err}; a registered model reads models:/<name>/<version> "
                          f"(`recontrast register` prints it), or give the training run's id") from err
    found = sorted(Path(local).rglob(WEIGHTS))
    if not found:
        raise LookupError(f"{ref} holds no {WEIGHTS}: it is not a model `recontrast` logged")
    return found[0]


def find_run_by_name(name: str, study: str | None = None, uri: str | None = None) -> str:
    """Returns the id of the latest FINISHED run named `name` ('<variant>-<category>'), within
    study `study` when given; raises LookupError naming the runs it could have meant."""
    client = get_client(uri=uri)
    query = f"attributes.run_name = '{name}'" + (f" and tags.study = '{study}'" if study else "")
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, query, max_results=50, order_by=["attributes.start_time DESC"]) \
        if experiments else []
    finished = [r for r in found if r.info.status == "FINISHED"]
    if finished:
        return finished[0].info.run_id
    where = f" in study '{study}'" if study else ""
    names = sorted({r.info.run_name for r in client.search_runs(experiments, f"tags.study = '{study}'", max_results=200)}
                   ) if study and experiments else []
    raise LookupError(f"no finished run named '{name}'{where}" +
                      (f"; its runs: {', '.join(names)}" if names else "; give the run id (the MLflow UI shows it)"))


def register(run_id: str, name: str, uri: str | None = None, tags: dict[str, Any] | None = None):
    """Returns the ModelVersion of registered model `name` (created when new) that holds the
    model run `run_id` logged: `models:/<name>/<version>` loads it. Registering the same
    model again returns its existing version."""
    from mlflow.exceptions import MlflowException

    search = f"name = {quote(name)} and run_id = {quote(run_id)}"  # a name MLflow cannot search stops here
    client = get_client(uri=uri)
    model_id = find_model(run_id, uri)
    # The model's own artifact location, not models:/<id>: MLflow would resolve that through its
    # global tracking URI, which need not be this store's.
    source = client.get_logged_model(model_id).artifact_location
    for existing in client.search_model_versions(search):
        if existing.source == source:
            return existing
    try:
        retry(client.create_registered_model, name,
              description="ReContrast anomaly detector: uint8 RGB images (B, H, W, 3), or base64 PNG/JPEG "
                          "strings in a column 'image', in; score (0.5 = threshold), raw_score, decision, map out")
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    run_tags = client.get_run(run_id).data.tags
    version_tags = {k: run_tags[k] for k in (Tag.CATEGORY, Tag.VARIANT, Tag.STUDY) if run_tags.get(k)}
    return retry(client.create_model_version, name, source, run_id=run_id, model_id=model_id,
                 tags={**version_tags, **{k: str(v) for k, v in (tags or {}).items()}})
