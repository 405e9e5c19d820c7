"""The MLflow store: where runs live (sqlite by default, a server when configured) and how
runs are found again (run-id files next to checkpoints, stale RUNNING runs repaired).

Everything goes through `MlflowClient` with explicit run ids, never MLflow's global "active
run". Parallel jobs share one sqlite file: writes are retried while it is locked.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from recontrast.config import Config
from recontrast.runtime import process_alive, project_root

DEFAULT_DB = Path("mlruns") / "mlflow.db"
RUN_ID_FILE = "mlflow_run_id"  # written next to the checkpoint: notebook 03 / `evaluate` find the run
RUN_FOLDER_TAG = "run_folder"  # the absolute folder a run trains into: a copied folder is not it
PROBE_TIMEOUT_S = 3.0
DEFAULT_TIMEOUT_S = 60.0  # tracking.timeout_s's default: how long one call to a tracking server may try
# MLflow's own HTTP settings, read at each request; set from tracking.timeout_s unless the user set them.
_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
_USER_HTTP_ENV = {k for k in _HTTP_ENV if k in os.environ}


STALE_RUN = "StaleRun"  # the error_type of a run fix_stale_runs marked FAILED


class RunStatus:
    """MLflow's run statuses: what runs end with and what searches and tables compare to."""

    RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"


class Tag:
    """The names of the MLflow tags recontrast writes and reads back: one name, one place."""

    CATEGORY, VARIANT, STUDY = "category", "variant", "study"
    CHECKPOINT, EVALUATED_CHECKPOINT, RUN_FOLDER = "checkpoint", "evaluated_checkpoint", RUN_FOLDER_TAG
    HEALTH, HEALTH_REASON = "health", "health_reason"  # values: recontrast.health's statuses
    ERROR, ERROR_TYPE = "error", "error_type"
    # A study's parent run and comparison runs: ROLE tells them from the pairs' runs.
    ROLE, ROLE_STUDY, ROLE_COMPARISON = "recontrast_role", "study", "comparison"
    VARIANTS, CATEGORIES, SWITCHES, STUDY_FILE = "variants", "categories", "switches", "study_file"
    PAIRS_DONE, PAIRS_FAILED, BASELINE = "pairs_done", "pairs_failed", "baseline"
    # On a run another one replaced (a study pair run again, a training train.bn_fallback redid):
    # the new run's id and why; on the new one, with train.bn_fallback, the flagged first run's id.
    SUPERSEDED_BY, SUPERSEDED_REASON, FALLBACK_OF = "superseded_by", "superseded_reason", "fallback_of"
    # train.pool_max_spread: the training images' position spread (recontrast.layout), when measured.
    POSITION_SPREAD = "position_spread"


class StoreUnreachable(ConnectionError):
    """The MLflow tracking server does not answer; the message names it and the way out."""


# ----------------------------------------------------------------------------- the store
def tracking_uri(cfg: Config | None = None, uri: str | None = None) -> str:
    """Returns the store URI: `uri` > cfg.tracking.uri > $MLFLOW_TRACKING_URI > local sqlite.

    Relative sqlite paths and plain folders resolve against the project root (notebooks run
    from notebooks/), and a folder becomes `<folder>/mlflow.db`: the file store is deprecated.
    """
    uri = uri or (cfg.tracking.uri if cfg is not None else "") or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{project_root() / DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{project_root() / uri[len('sqlite:///'):]}"
    if "://" not in uri:  # a plain path
        path = project_root() / uri
        return f"sqlite:///{path if path.suffix == '.db' else path / 'mlflow.db'}"
    return uri


def artifact_location(uri: str) -> str | None:
    """Returns where new experiments keep artifacts: next to a sqlite file, the server's choice
    for a tracking server, <repo>/mlruns/artifacts for another database; $RECONTRAST_ARTIFACT_ROOT wins."""
    if os.environ.get("RECONTRAST_ARTIFACT_ROOT"):
        return Path(os.environ["RECONTRAST_ARTIFACT_ROOT"]).resolve().as_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    if uri.split(":", 1)[0] in ("http", "https", "databricks"):
        return None
    return (project_root() / "mlruns" / "artifacts").as_uri()


def quote(value: str) -> str:
    """Returns `value` as a string literal of an MLflow filter string ('...', or "..." when it
    holds a single quote: MLflow's parser has no escape). A value holding both quote characters
    cannot be written there: ValueError naming the characters to avoid."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value[:80]!r} holds both ' and \"; MLflow cannot search for it: rename it without one of them")


def http_limits(timeout_s: float) -> dict[str, str]:
    """Returns MLflow's HTTP settings that make one call to a tracking server give up after
    about `timeout_s` seconds: retries with backoff 0, 2, 4, 8, ... s over half of it (a short
    restart of the server is survived), each attempt waiting at most `timeout_s` for an answer."""
    retries = max(1, min(10, int(math.log2(timeout_s / 2 + 2))))
    return {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s))),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def set_timeout(timeout_s: float) -> None:
    """Bounds every later MLflow HTTP call of this process (and the processes it starts) by
    http_limits(timeout_s); MLflow's own variables win when the user set them."""
    for key, value in http_limits(timeout_s).items():
        if key not in _USER_HTTP_ENV:
            os.environ[key] = value


def retry(fn: Callable, *args, attempts: int = 8, **kwargs):
    """Returns fn(*args, **kwargs), retried with jittered backoff while sqlite says "locked"."""
    for k in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # MlflowException wraps sqlalchemy's OperationalError
            if k == attempts - 1 or "locked" not in str(err).lower():
                raise
            time.sleep(min(0.2 * 2**k, 5.0) * (0.5 + random.random()))


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raises StoreUnreachable unless a tracking server at an http(s) `uri` answers within
    `timeout` seconds (any HTTP answer will do, even an error status). MLflow itself retries
    for minutes before giving up; this says so in seconds, before any work. Other stores
    (sqlite files, databases) are not probed."""
    if uri.split(":", 1)[0].lower() not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise StoreUnreachable(
            f"the MLflow tracking server {uri} does not answer ({reason}; {timeout:g} s timeout); "
            f"start it, point tracking.uri (or $MLFLOW_TRACKING_URI) at one that runs, or run "
            f"without tracking (--no-track, tracking.enabled=false)") from None


_CLIENTS: dict[str, Any] = {}


def get_client(cfg: Config | None = None, uri: str | None = None):
    """Returns a (cached) MlflowClient for tracking_uri(cfg, uri); a tracking server that does
    not answer raises StoreUnreachable in seconds."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, uri)
    if cfg is not None:
        set_timeout(cfg.tracking.timeout_s)
    elif not any(k in os.environ for k in _HTTP_ENV):
        set_timeout(DEFAULT_TIMEOUT_S)
    if uri not in _CLIENTS:
        check_reachable(uri)
        if uri.startswith("sqlite:///"):
            with _store_lock(Path(uri[len("sqlite:///"):])):
                _CLIENTS[uri] = retry(MlflowClient, tracking_uri=uri)  # creates or migrates the tables
        else:
            _CLIENTS[uri] = MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


@contextlib.contextmanager
def _store_lock(db: Path) -> Iterator[None]:
    """Holds an exclusive lock on <db>.lock: processes that open a new store together (a shell
    loop of `recontrast train`) would otherwise race MLflow's table migrations."""
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock; `recontrast batch` creates the store before its jobs
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def experiment_id(client, name: str) -> str:
    """Returns the id of experiment `name`, created (with our artifact location) or restored."""
    from mlflow.exceptions import MlflowException

    exp = retry(client.get_experiment_by_name, name)
    if exp is None:
        try:
            location = artifact_location(client.tracking_uri)
            return retry(client.create_experiment, name, artifact_location=location)
        except MlflowException as err:  # another job created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise err
    if exp.lifecycle_stage == "deleted":
        retry(client.restore_experiment, exp.experiment_id)
    return exp.experiment_id



def fix_stale_runs(older_than_s: float = 0.0, uri: str | None = None) -> list[str]:
    """Returns the ids of RUNNING runs it marked FAILED: their process is gone from this host
    (SIGKILL, OOM, power loss), or, with older_than_s > 0, they ran elsewhere (another host,
    no process recorded) and were silent that long. A run whose process is alive on this host
    is never marked, however long it was silent (a long evaluation logs nothing)."""
    from mlflow.entities import ViewType

    client = get_client(uri=uri)
    host, now, fixed = socket.gethostname(), time.time() * 1000, []
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    for i in range(0, len(experiments), 100):
        token = None
        while True:
            page = client.search_runs(experiments[i : i + 100], f"attributes.status = '{RunStatus.RUNNING}'",
                                      max_results=1000, page_token=token)
            for r in page:
                tags, reason = r.data.tags, None
                pid = tags.get("pid", "")
                local = tags.get("hostname") == host and pid.isdigit()
                if local:
                    if not process_alive(int(pid), tags.get("process_start", "")):
                        reason = f"its process {pid} on {host} is gone (killed?)"
                elif older_than_s > 0:
                    silent = (now - _last_activity(client, r)) / 1000
                    if silent > older_than_s:
                        reason = f"it was silent for {silent:.0f} s (> {older_than_s:.0f} s)"
                if reason:
                    retry(client.set_tag, r.info.run_id, Tag.ERROR,
                          f"marked FAILED by `recontrast runs --fix-stale`: {reason}")
                    retry(client.set_tag, r.info.run_id, Tag.ERROR_TYPE, STALE_RUN)
                    retry(client.set_terminated, r.info.run_id, RunStatus.FAILED,
                          end_time=int(_last_activity(client, r)))
                    fixed.append(r.info.run_id)
            token = page.token
            if not token:
                break
    return fixed


def _last_activity(client, run) -> float:
    """Returns the time (ms) of the run's start or last heartbeat metric, whichever is later."""
    key = "system/heartbeat"
    beats = client.get_metric_history(run.info.run_id, key) if key in run.data.metrics else []
    return max([run.info.start_time or 0] + [m.timestamp for m in beats])


def write_run_id(folder: str | Path, run_id: str) -> Path:
    """Returns <folder>/mlflow_run_id after writing `run_id` there."""
    path = Path(folder) / RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return path


def read_run_id(folder: str | Path) -> str | None:
    """Returns the run id stored in <folder>/mlflow_run_id, or None."""
    path = Path(folder) / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def run_exists(client, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:
        return False


def run_of_folder(client, folder: str | Path) -> str | None:
    """Returns the run id in <folder>/mlflow_run_id when that run exists and trained in this
    very folder; None otherwise. A copied (or moved) run folder carries the original's id:
    reopening that run would mix two trainings, so the copy gets a run of its own."""
    run_id = read_run_id(folder)
    if run_id is None:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:
        return None
    if run.info.lifecycle_stage != "active":
        return None
    tags = run.data.tags
    # Runs logged before the run_folder tag existed name their folder through the checkpoint tag.
    trained_in = tags.get(Tag.RUN_FOLDER) or (str(Path(tags[Tag.CHECKPOINT]).parent) if tags.get(Tag.CHECKPOINT) else "")
    if trained_in and Path(trained_in).resolve() != Path(folder).resolve():
        return None
    return run_id


def checkpoint_of(run_id: str, uri: str | None = None) -> Path:
    """Returns the checkpoint a run trained: its 'checkpoint' tag when that file exists here,
    else the run's logged checkpoint artifact (tracking.log_full_checkpoint), else the
    inference weights of its logged MLflow model, downloaded."""
    client = get_client(uri=uri)
    run = client.get_run(run_id)
    tagged = run.data.tags.get(Tag.CHECKPOINT) or run.data.tags.get(Tag.EVALUATED_CHECKPOINT)
    if tagged and Path(tagged).is_file():
        return Path(tagged)
    try:
        local = client.download_artifacts(run_id, "checkpoint")
    except Exception as err:
        weights = _model_weights(client, run)
        if weights is not None:
            return weights
        raise FileNotFoundError(
            f"run {run_id} names no checkpoint on this machine ({tagged or 'no checkpoint tag'}), "
            f"has no 'checkpoint' artifact ({err}) and no logged model; pass checkpoint=<path> instead") from None
    found = sorted(Path(local).glob("*.ckpt"))
    if not found:
        raise FileNotFoundError(f"run {run_id}'s 'checkpoint' artifact holds no .ckpt file")
    return found[0]


def _model_weights(client, run) -> Path | None:
    """Returns the checkpoint inside the run's latest logged model (recontrast.mlflow_model:
    the inference weights), downloaded; None when the run logged no model."""
    import mlflow

    outputs = run.outputs.model_outputs if run.outputs else []
    for output in sorted(outputs, key=lambda o: o.step, reverse=True):
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{output.model_id}",
                                                        tracking_uri=client.tracking_uri)
        except Exception:
            continue
        found = sorted(Path(local).rglob("*.ckpt"))
        if found:
            return found[0]
    return None


def find_run(checkpoint: str | Path, uri: str | None = None) -> str | None:
    """Returns the id of the run that trained `checkpoint` (mlflow_run_id file next to it,
    else a run tagged with its path), or None."""
    checkpoint = Path(checkpoint).resolve()
    client = get_client(uri=uri)
    stored = run_of_folder(client, checkpoint.parent)
    if stored:
        return stored
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    try:
        path = quote(str(checkpoint))
    except ValueError:
        return None  # no run can be found by that path: the evaluation gets a run of its own
    for i in range(0, len(experiments), 100):
        runs = client.search_runs(experiments[i : i + 100], f"tags.{Tag.CHECKPOINT} = {path}",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0].info.run_id
    return None

