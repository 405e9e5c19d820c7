"""MLflow tracking: a local sqlite store by default, a training callback, runs that never stay RUNNING.

The store is `sqlite:///<repo>/mlruns/mlflow.db` with artifacts in `<repo>/mlruns/artifacts`
(`make ui` opens it); `cfg.tracking.uri` or `$MLFLOW_TRACKING_URI` point elsewhere (a tracking
server, PostgreSQL). Everything goes through `MlflowClient` with explicit run ids, never
MLflow's global "active run", so notebooks, parallel batch jobs and tests cannot mix up runs.
Parallel jobs share one sqlite file: writes are batched and retried while it is locked.

`run_training(cfg)` is the one entry point of `recontrast train` and notebook 02;
`log_evaluation(result, checkpoint)` adds an evaluation to the run that trained the checkpoint.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import random
import re
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from recontrast.config import Config, from_dict
from recontrast.train import Callback, TrainResult

log = logging.getLogger(__name__)

DEFAULT_DB = Path("mlruns") / "mlflow.db"
RUN_ID_FILE = "mlflow_run_id"  # written next to the checkpoint: notebook 03 / `evaluate` find the run
_METRIC_KEY_BAD = re.compile(r"[^/\w.\- :]")


# ----------------------------------------------------------------------------- the store
def project_root() -> Path:
    """Returns the repository root when recontrast runs from a checkout, else the cwd."""
    repo = Path(__file__).resolve().parents[1]
    return repo if (repo / "pyproject.toml").is_file() else Path.cwd()


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


def retry(fn: Callable, *args, attempts: int = 8, **kwargs):
    """Returns fn(*args, **kwargs), retried with jittered backoff while sqlite says "locked"."""
    for k in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # MlflowException wraps sqlalchemy's OperationalError
            if k == attempts - 1 or "locked" not in str(err).lower():
                raise
            time.sleep(min(0.2 * 2**k, 5.0) * (0.5 + random.random()))


_CLIENTS: dict[str, Any] = {}


def get_client(cfg: Config | None = None, uri: str | None = None):
    """Returns a (cached) MlflowClient for tracking_uri(cfg, uri)."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, uri)
    if uri not in _CLIENTS:
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


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Returns {'a/b': value} for the finite numbers in a nested dict; other values are dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = _METRIC_KEY_BAD.sub("_", f"{prefix}{key}")
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{name}/"))
        elif isinstance(value, (int, float)) or hasattr(value, "item"):
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                out[name] = value
    return out


# ----------------------------------------------------------------------------- one run
@dataclass
class Run:
    """One MLflow run, addressed by id; every write is retried while the store is locked."""

    run_id: str
    client: Any

    def log_metrics(self, metrics: dict[str, Any], step: int = 0, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in flat_metrics(metrics, prefix).items()]
        if batch:
            retry(self.client.log_batch, self.run_id, metrics=batch)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params  # params are write-once
        new = [Param(k, str(v)) for k, v in params.items() if k not in logged]
        if new:
            retry(self.client.log_batch, self.run_id, params=new)
        changed = [f"{k}: {logged[k]} -> {v}" for k, v in params.items() if k in logged and logged[k] != str(v)[:6000]]
        if changed:  # a resumed run with other settings: the params keep the first values
            self.set_tags({"changed_params": "; ".join(changed)[:7000]})

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        fn = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        retry(fn, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        retry(self.client.log_text, self.run_id, text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        retry(self.client.set_terminated, self.run_id, status)

    @property
    def info(self):
        return self.client.get_run(self.run_id).info


def git_state(root: Path | None = None) -> tuple[str, bool]:
    """Returns (commit hash or 'unknown', dirty) of the project checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root or project_root(), capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return commit, dirty


def _process_start(pid: int) -> str:
    """Returns the process start time (clock ticks since boot) from /proc, or '' elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, start: str = "") -> bool:
    """Returns True if process `pid` exists on this host, is no zombie, and (if given) started at `start`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return fields[0] != "Z" and (not start or fields[19] == start)


def run_tags(cfg: Config) -> dict[str, str]:
    """Returns the tags every training run carries (what it ran on, which code, which process)."""
    commit, dirty = git_state()
    tags = {
        "category": cfg.data.category, "dataset": Path(cfg.data.root).name, "data_root": cfg.data.root,
        "backbone": cfg.model.backbone, "ablation": cfg.tracking.ablation, "study": cfg.tracking.study,
        "git_commit": commit, "git_dirty": str(dirty).lower(), "mlflow.source.git.commit": commit,
        **_process_tags(),
    }
    with contextlib.suppress(Exception):
        tags["mlflow.user"] = getpass.getuser()
    return {k: v for k, v in tags.items() if v != ""}


def _process_tags() -> dict[str, str]:
    """Returns what `fix_stale_runs` checks: this process's pid, host and start time."""
    return {"pid": str(os.getpid()), "hostname": socket.gethostname(),
            "process_start": _process_start(os.getpid())}


def _end_with_error(run: Run, status: str, err: BaseException) -> None:
    """Marks `run` FAILED/KILLED with the error as tag and artifact; never raises."""
    try:
        message = f"{type(err).__name__}: {err}".strip()
        run.set_tags({"error": message[:7000], "error_type": type(err).__name__})
        run.log_text("".join(traceback.format_exception(err)), "error.txt")
    except Exception as log_err:  # the original error matters more
        log.warning("could not record the error in MLflow run %s: %s", run.run_id, log_err)
    try:
        run.end(status)
    except Exception as end_err:
        log.warning("could not mark MLflow run %s %s: %s (`recontrast runs --fix-stale` will)",
                    run.run_id, status, end_err)


@contextlib.contextmanager
def start_run(cfg: Config, run_name: str | None = None, tags: dict[str, Any] | None = None,
              uri: str | None = None, run_id: str | None = None,
              parent_run_id: str | None = None) -> Iterator[Run]:
    """Yields a Run with cfg's flattened params and run_tags(cfg); ends it FINISHED, or FAILED
    (KILLED on KeyboardInterrupt) with the error as a tag if the body raises.

    `run_id` reopens an existing run (a resumed training); `parent_run_id` nests the run under
    a study's parent run.
    """
    client = get_client(cfg, uri)
    all_tags = {**run_tags(cfg), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if run_id:
        run = Run(run_id, client)
        retry(client.update_run, run_id, status="RUNNING")
        for key in ("error", "error_type"):
            with contextlib.suppress(Exception):
                client.delete_tag(run_id, key)
        run.set_tags(all_tags)
    else:
        exp = experiment_id(client, cfg.tracking.experiment)
        name = run_name or cfg.tracking.run_name or f"{cfg.tracking.ablation}-{cfg.data.category}"
        created = retry(client.create_run, exp, tags={k: str(v) for k, v in all_tags.items()}, run_name=name)
        run = Run(created.info.run_id, client)
    run.log_params(cfg.flatten())
    try:
        yield run
    except KeyboardInterrupt as err:
        _end_with_error(run, "KILLED", err)
        raise
    except SystemExit as err:
        if err.code not in (0, None):
            _end_with_error(run, "FAILED", err)
            raise
        run.end("FINISHED")
        raise
    except BaseException as err:
        _end_with_error(run, "FAILED", err)
        raise
    else:
        run.end("FINISHED")


def fix_stale_runs(older_than_s: float = 0.0, uri: str | None = None) -> list[str]:
    """Returns the ids of RUNNING runs it marked FAILED: their process is gone from this host
    (SIGKILL, OOM, power loss), or, with older_than_s > 0, they were silent that long."""
    from mlflow.entities import ViewType

    client = get_client(uri=uri)
    host, now, fixed = socket.gethostname(), time.time() * 1000, []
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    for i in range(0, len(experiments), 100):
        token = None
        while True:
            page = client.search_runs(experiments[i : i + 100], "attributes.status = 'RUNNING'",
                                      max_results=1000, page_token=token)
            for r in page:
                tags, reason = r.data.tags, None
                pid = tags.get("pid", "")
                local = tags.get("hostname") == host and pid.isdigit()
                if local and not process_alive(int(pid), tags.get("process_start", "")):
                    reason = f"its process {pid} on {host} is gone (killed?)"
                elif older_than_s > 0:
                    silent = (now - _last_activity(client, r)) / 1000
                    if silent > older_than_s:
                        reason = f"it was silent for {silent:.0f} s (> {older_than_s:.0f} s)"
                if reason:
                    run = Run(r.info.run_id, client)
                    run.set_tags({"error": f"marked FAILED by `recontrast runs --fix-stale`: {reason}",
                                  "error_type": "StaleRun"})
                    retry(client.set_terminated, r.info.run_id, "FAILED", end_time=int(_last_activity(client, r)))
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


# ----------------------------------------------------------------------------- training
class MLflowCallback(Callback):
    """Logs training to a run: loss/alpha as `train/*` metrics per log step, `eval/*` metrics
    per evaluation, warnings (divergence) as a tag plus warnings.txt, the checkpoint path as a tag.

    `run` is a Run, or a function returning one that on_start calls: the training loop has
    then passed its checks (batch size, backbone), so a config that cannot work leaves no run.
    Metrics are buffered and written in batches (every `flush_every_s` seconds, at each
    eval/checkpoint and at the end) to keep writes to a shared sqlite file few.
    """

    def __init__(self, run: Run | Callable[[], Run], flush_every_s: float = 10.0):
        self.run = run if isinstance(run, Run) else None
        self._open = None if isinstance(run, Run) else run
        self.flush_every_s = flush_every_s
        self._buffer: list = []
        self._last_flush = time.monotonic()
        self._last_step = 0
        self.warnings: list[str] = []

    def on_start(self, cfg: Config, model, start_iteration: int) -> None:
        if self.run is None:
            self.run = self._open()
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.run.set_tags({"model.parameters": n_all, "model.trainable_parameters": n_train,
                           "start_iteration": start_iteration})

    def _add(self, metrics: dict[str, Any], step: int, prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, v, now, step) for k, v in flat_metrics(metrics, prefix).items()]
        self._last_step = step

    def flush(self) -> None:
        """Writes the buffered metrics (plus a heartbeat for `fix_stale_runs`) in one batch."""
        from mlflow.entities import Metric

        if self.run is None or not self._buffer:
            return
        beat = Metric("system/heartbeat", float(self._last_step), int(time.time() * 1000), self._last_step)
        self._buffer.append(beat)
        retry(self.run.client.log_batch, self.run.run_id, metrics=self._buffer)
        self._buffer, self._last_flush = [], time.monotonic()

    def on_log(self, iteration: int, metrics: dict[str, float]) -> None:
        self._add(metrics, iteration, "train/")
        if time.monotonic() - self._last_flush > self.flush_every_s or len(self._buffer) > 900:
            self.flush()

    def on_eval(self, iteration: int, metrics: dict[str, Any]) -> None:
        self._add(metrics, iteration, "eval/")
        self.flush()

    def on_warning(self, message: str) -> None:
        self.warnings.append(message)
        tags = {"warning": message[:7000]}
        if "diverg" in message:
            tags["diverged"] = "true"
        self.run.set_tags(tags)
        self.run.log_text("\n\n".join(self.warnings) + "\n", "warnings.txt")

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        path = Path(path).resolve()
        self.run.set_tags({"checkpoint": str(path), "checkpoint_iteration": iteration})
        write_run_id(path.parent, self.run.run_id)
        self.flush()

    def on_end(self, result: TrainResult) -> None:
        self._add({"iterations": result.iterations}, result.iterations, "train/")
        self.flush()
        self.run.set_tags({"diverged": str(bool(result.diverged)).lower()})


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


def run_training(cfg: Config, resume: bool = False, track: bool = True, evaluate_at_end: bool = True,
                 callbacks: Sequence[Callback] = (), datasets=None, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, Any] | None = None,
                 log_checkpoint: bool | None = None):
    """Returns (TrainResult, EvalResult or None, run id or None): trains cfg, evaluates the
    final model with figures, and logs both (config, metrics, checkpoint, figures) to one run.

    With resume=True the run recorded in <train.out>/mlflow_run_id is reopened. The
    checkpoint is logged when evaluated here (log_checkpoint=None), so the logged copy holds
    its calibration; without evaluation, notebook 03 / log_evaluation(log_checkpoint=True) logs it.
    """
    from recontrast.data import build_datasets
    from recontrast.train import train

    # A dataset, batch size or backbone that cannot work stops here or in train()'s checks,
    # before any run or file exists; what fails later is recorded in the run (FAILED/KILLED).
    data = datasets if datasets is not None else build_datasets(cfg.data)
    eval_fn = _eval_fn(cfg, data) if cfg.train.eval_every > 0 else None
    if not (track and cfg.tracking.enabled):
        result = train(cfg, callbacks=callbacks, resume=resume, eval_fn=eval_fn, datasets=data)
        return result, (_evaluate(cfg, result, data) if evaluate_at_end else None), None

    out = Path(cfg.train.out)
    previous = read_run_id(out) if resume else None
    if previous is not None and not _run_exists(get_client(cfg), previous):
        previous = None
    with contextlib.ExitStack() as stack:
        def open_run() -> Run:
            run = stack.enter_context(start_run(cfg, run_name=run_name, run_id=previous,
                                                parent_run_id=parent_run_id, tags=tags))
            try:
                write_run_id(out, run.run_id)
            except OSError as err:
                from recontrast.checkpoint import CheckpointError

                raise CheckpointError(f"cannot write to the run folder {out} ({type(err).__name__}: {err}); "
                                      f"train.out must be a writable folder, not a file") from None
            run.log_text(cfg.to_yaml(), "config.yaml")
            _log_data(run, data)
            return run

        callback = MLflowCallback(open_run)
        try:
            result = train(cfg, callbacks=[callback, *callbacks], resume=resume, eval_fn=eval_fn, datasets=data)
        except BaseException:
            with contextlib.suppress(Exception):
                callback.flush()  # the last metrics before the crash
            raise
        run = callback.run
        _log_loss_curve(run, result, out)
        evaluation = None
        if evaluate_at_end:
            evaluation = _evaluate(cfg, result, data)
            log_evaluation(evaluation, result.checkpoint, run_id=run.run_id, step=result.iterations)
        if evaluate_at_end if log_checkpoint is None else log_checkpoint:
            run.log_artifact(result.checkpoint, "checkpoint")  # after evaluation: calibrated
    return result, evaluation, run.run_id


def _log_data(run: Run, data) -> None:
    """Logs the image counts and the files skipped as unreadable (data.skip_bad_images)."""
    splits = {"train": data.train, "val": data.val, "test": data.test}
    skipped = [entry for d in splits.values() if d is not None for entry in getattr(d, "skipped", [])]
    run.log_metrics({f"data/{name}_images": len(d) for name, d in splits.items() if d is not None}
                    | {"data/skipped_images": len(skipped)})
    if skipped:
        run.log_text("".join(f"{path}\t{reason}\n" for path, reason in skipped), "skipped_images.txt")


def _log_loss_curve(run: Run, result: TrainResult, out: Path) -> None:
    try:  # a figure is never worth failing the run
        from recontrast import plots

        plots.loss_curve(result.loss_history, out / "loss_curve.png")
        run.log_artifact(out / "loss_curve.png", "figures")
    except Exception as err:
        log.warning("no loss curve artifact: %s", err)


def _run_exists(client, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:
        return False


def _eval_fn(cfg: Config, datasets):
    from recontrast.evaluate import make_eval_fn

    return make_eval_fn(datasets.test, cfg.eval, datasets.val)


def _evaluate(cfg: Config, result: TrainResult, datasets):
    """Returns the EvalResult of the trained model (figures in <train.out>/eval), after
    storing its calibration in the checkpoint, as `recontrast evaluate` does."""
    from recontrast.checkpoint import load_checkpoint, save_checkpoint
    from recontrast.evaluate import evaluate
    from recontrast.train import pick_device

    evaluation = evaluate(result.model, datasets.test, cfg.eval, Path(cfg.train.out) / "eval",
                          pick_device(cfg.train.device), datasets.val)
    evaluation.calibration.update(category=cfg.data.category, data_root=str(cfg.data.root),
                                  iteration=int(result.iterations))
    ckpt = load_checkpoint(result.checkpoint)
    ckpt["calibration"] = evaluation.calibration
    save_checkpoint(result.checkpoint, ckpt)
    return evaluation


# ----------------------------------------------------------------------------- evaluation
def checkpoint_of(run_id: str, uri: str | None = None) -> Path:
    """Returns the checkpoint a run trained: its 'checkpoint' tag when that file exists here,
    else the run's logged checkpoint artifact, downloaded."""
    client = get_client(uri=uri)
    run = client.get_run(run_id)
    tagged = run.data.tags.get("checkpoint") or run.data.tags.get("evaluated_checkpoint")
    if tagged and Path(tagged).is_file():
        return Path(tagged)
    try:
        local = client.download_artifacts(run_id, "checkpoint")
    except Exception as err:
        raise FileNotFoundError(
            f"run {run_id} names no checkpoint on this machine ({tagged or 'no checkpoint tag'}) and "
            f"has no 'checkpoint' artifact ({err}); pass checkpoint=<path> instead") from None
    found = sorted(Path(local).glob("*.ckpt"))
    if not found:
        raise FileNotFoundError(f"run {run_id}'s 'checkpoint' artifact holds no .ckpt file")
    return found[0]


def find_run(checkpoint: str | Path, uri: str | None = None) -> str | None:
    """Returns the id of the run that trained `checkpoint` (mlflow_run_id file next to it,
    else a run tagged with its path), or None."""
    checkpoint = Path(checkpoint).resolve()
    client = get_client(uri=uri)
    stored = read_run_id(checkpoint.parent)
    if stored and _run_exists(client, stored):
        return stored
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    path = str(checkpoint).replace("'", "\\'")
    for i in range(0, len(experiments), 100):
        runs = client.search_runs(experiments[i : i + 100], f"tags.checkpoint = '{path}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0].info.run_id
    return None


def log_evaluation(result, checkpoint: str | Path, run_id: str | None = None, uri: str | None = None,
                   step: int = 0, log_checkpoint: bool = False) -> str:
    """Returns the run id after logging an EvalResult's metrics, JSON/CSV and figures to the
    run that trained `checkpoint` (`run_id`, or found by find_run; a new run if none is)."""
    client = get_client(uri=uri)
    run_id = run_id or find_run(checkpoint, uri)
    if run_id is None:
        return _log_evaluation_in_new_run(result, checkpoint, uri, step)
    run = Run(run_id, client)
    run.log_metrics(result.metrics, step=step)
    files = _result_files(result)
    if not any(p.name == "metrics.json" for p in files):
        run.log_text(json.dumps(result.metrics, indent=2, default=str) + "\n", "evaluation/metrics.json")
    for path in files:
        run.log_artifact(path, "evaluation" if path.suffix in (".json", ".csv") else "figures")
    if log_checkpoint and Path(checkpoint).is_file():
        run.log_artifact(checkpoint, "checkpoint")
    run.set_tags({"evaluated_checkpoint": str(Path(checkpoint).resolve())})
    return run_id


def _log_evaluation_in_new_run(result, checkpoint, uri, step) -> str:
    from recontrast.checkpoint import load_checkpoint

    cfg = from_dict(load_checkpoint(checkpoint)["config"])
    with start_run(cfg, run_name=f"evaluate-{cfg.data.category}", uri=uri,
                   tags={"checkpoint": str(Path(checkpoint).resolve())}) as run:
        log_evaluation(result, checkpoint, run_id=run.run_id, uri=uri, step=step)
    return run.run_id


def _result_files(result) -> list[Path]:
    """Returns the files an EvalResult wrote: its figures and everything in its out_dir."""
    paths = [Path(p) for p in (result.figures or {}).values()]
    if result.out_dir is not None and Path(result.out_dir).is_dir():
        paths += sorted(p for p in Path(result.out_dir).iterdir() if p.is_file())
    unique: dict[Path, Path] = {}
    for p in paths:
        if p.is_file():
            unique.setdefault(p.resolve(), p)
    return list(unique.values())
