"""MLflow tracking: one run's params, tags, metrics and artifacts; runs that never stay RUNNING.

The store is `sqlite:///<repo>/mlruns/mlflow.db` with artifacts in `<repo>/mlruns/artifacts`
(`make ui` opens it); `cfg.tracking.uri` or `$MLFLOW_TRACKING_URI` point elsewhere (a tracking
server, PostgreSQL): see `recontrast.mlflow_store`. Everything goes through `MlflowClient`
with explicit run ids, never MLflow's global "active run", so notebooks, parallel batch jobs
and tests cannot mix up runs. Metrics are batched to keep writes to a shared sqlite file few.

This module only talks to MLflow; `recontrast.pipeline` decides what to log and when.
`log_evaluation(result, checkpoint)` adds an evaluation to the run that trained the checkpoint;
`log_trained_model(run, checkpoint)` logs the MLflow model (recontrast.mlflow_model).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from recontrast import mlflow_model
from recontrast.checkpoint import load_checkpoint
from recontrast.config import Config, from_dict
from recontrast.mlflow_store import (STALE_RUN, RunStatus, StoreUnreachable, Tag, check_reachable, experiment_id,
                                     find_run, get_client, retry, write_run_id)
from recontrast.runtime import process_identity, project_root
from recontrast.train import DIVERGED, LOSS_RISING, Callback, TrainResult

log = logging.getLogger(__name__)
_METRIC_KEY_BAD = re.compile(r"[^/\w.\- :]")


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

    def end(self, status: str = RunStatus.FINISHED) -> None:
        if status == RunStatus.FINISHED:
            self._clear_stale_mark()
        retry(self.client.set_terminated, self.run_id, status)

    def _clear_stale_mark(self) -> None:
        """A run `recontrast runs --fix-stale` marked FAILED while it was in fact still working
        (another host, silent too long) and that then finished must not keep the mark."""
        tags = self.client.get_run(self.run_id).data.tags
        if tags.get(Tag.ERROR_TYPE) == STALE_RUN:
            for key in (Tag.ERROR, Tag.ERROR_TYPE):
                with contextlib.suppress(Exception):
                    retry(self.client.delete_tag, self.run_id, key)

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


def run_tags(cfg: Config) -> dict[str, str]:
    """Returns the tags every training run carries (what it ran on, which code, which process)."""
    commit, dirty = git_state()
    tags = {
        Tag.CATEGORY: cfg.data.category, "dataset": Path(cfg.data.root).name, "data_root": cfg.data.root,
        "backbone": cfg.model.backbone, Tag.VARIANT: cfg.tracking.ablation, Tag.STUDY: cfg.tracking.study,
        "git_commit": commit, "git_dirty": str(dirty).lower(), **process_identity(),
    }
    return {k: v for k, v in tags.items() if v != ""}


def source_tags() -> dict[str, str]:
    """Returns MLflow's own context tags: mlflow.user, mlflow.source.name and .type (the
    notebook under Jupyter, $IPYNB_FILE under papermill), mlflow.source.git.* of the entry
    point's checkout. MLflow finds no commit for an entry point in an ignored folder (the
    venv's `recontrast`, pytest, ipykernel): then the project checkout's commit is used."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = resolve_tags()
    if not tags.get("mlflow.source.git.commit"):
        commit, _ = git_state()
        if commit != "unknown":
            tags["mlflow.source.git.commit"] = commit
    return tags


@contextlib.contextmanager
def system_metrics(run: Run, enabled: bool = True) -> Iterator[None]:
    """Logs MLflow's system metrics (system/cpu_utilization_percentage, system memory, disk,
    network; GPU utilisation and memory with nvidia-ml-py) to `run` while the block runs, every
    $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10 by default)."""
    monitor = None
    if enabled:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run.run_id, resume_logging=True, tracking_uri=run.client.tracking_uri)
            monitor.start()
        except Exception as err:  # psutil missing: the run matters more than its system metrics
            log.warning("no system metrics for run %s: %s", run.run_id, err)
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def log_datasets(run: Run, splits: dict[str, Any], name: str, root: str | Path) -> None:
    """Logs each split (train, val, test: datasets with `.samples`) as an MLflow dataset input
    of the run, named '<name>/<split>', with context tag <split>: a table of its files (path
    relative to `root`, anomalous, defect type, mask), whose digest changes when the list does."""
    import mlflow
    import pandas as pd
    from mlflow.entities import Dataset, DatasetInput, InputTag

    root = Path(root).resolve()

    def relative(path) -> str:
        return "" if path is None else Path(os.path.relpath(Path(path).resolve(), root)).as_posix()

    inputs = []
    for split, dataset in splits.items():
        if dataset is None or not hasattr(dataset, "samples"):
            continue
        files = pd.DataFrame([{"path": relative(s.path), "anomalous": bool(s.label), "defect_type": s.defect_type,
                               "mask": relative(s.mask_path)} for s in dataset.samples],
                             columns=["path", "anomalous", "defect_type", "mask"])
        with warnings.catch_warnings():  # MLflow's own noise: two source types claim a local path
            warnings.simplefilter("ignore")
            logged = mlflow.data.from_pandas(files, source=str(root), name=f"{name}/{split}")
        inputs.append(DatasetInput(Dataset(**logged.to_dict()), [InputTag("mlflow.data.context", split)]))
    if inputs:
        retry(run.client.log_inputs, run.run_id, datasets=inputs)


def _end_with_error(run: Run, status: str, err: BaseException) -> None:
    """Marks `run` FAILED/KILLED with the error as tag and artifact; never raises."""
    try:
        message = f"{type(err).__name__}: {err}".strip()
        run.set_tags({Tag.ERROR: message[:7000], Tag.ERROR_TYPE: type(err).__name__})
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
              parent_run_id: str | None = None, params: dict[str, Any] | None = None,
              log_system_metrics: bool = False) -> Iterator[Run]:
    """Yields a Run with `params` (default: cfg's flattened params), MLflow's source_tags(),
    run_tags(cfg) and `tags` (a None value removes that tag); ends it FINISHED, or FAILED
    (KILLED on KeyboardInterrupt) with the error as a tag if the body raises.

    `run_id` reopens an existing run (a resumed training); `parent_run_id` nests the run under
    a study's parent run; `log_system_metrics` samples CPU, memory (and GPU) while it runs.
    """
    client = get_client(cfg, uri)
    all_tags = {**source_tags(), **run_tags(cfg), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    removed = [k for k, v in all_tags.items() if v is None]
    all_tags = {k: v for k, v in all_tags.items() if v is not None}
    if run_id:
        run = Run(run_id, client)
        retry(client.update_run, run_id, status=RunStatus.RUNNING)
        for key in (Tag.ERROR, Tag.ERROR_TYPE, *removed):
            with contextlib.suppress(Exception):
                client.delete_tag(run_id, key)
        run.set_tags(all_tags)
    else:
        exp = experiment_id(client, cfg.tracking.experiment)
        name = run_name or cfg.tracking.run_name or f"{cfg.tracking.ablation}-{cfg.data.category}"
        created = retry(client.create_run, exp, tags={k: str(v) for k, v in all_tags.items()}, run_name=name)
        run = Run(created.info.run_id, client)
    run.log_params(cfg.flatten() if params is None else params)
    try:
        with system_metrics(run, log_system_metrics):
            yield run
    except KeyboardInterrupt as err:
        _end_with_error(run, RunStatus.KILLED, err)
        raise
    except SystemExit as err:
        if err.code not in (0, None):
            _end_with_error(run, RunStatus.FAILED, err)
            raise
        run.end(RunStatus.FINISHED)
        raise
    except BaseException as err:
        _end_with_error(run, RunStatus.FAILED, err)
        raise
    else:
        run.end(RunStatus.FINISHED)

# ----------------------------------------------------------------------------- training
class MLflowCallback(Callback):
    """Logs training to a run: loss/alpha as `train/*` metrics per log step, `eval/*` metrics
    per evaluation, warnings (divergence) as a tag plus warnings.txt, the checkpoint path as a tag.

    `run` is a Run, or a function returning one that on_start calls: the training loop has
    then passed its checks (batch size, backbone), so a config that cannot work leaves no run.
    Metrics are buffered and written in batches (every `flush_every_s` seconds, at each
    eval/checkpoint and at the end) to keep writes to a shared sqlite file few.

    A tracking server that stops answering (MLflow's retries spent: tracking.timeout_s) does
    not stop training: the writes are held, one line says so, and they are written in order
    once the server answers again (a second line says so). If it is still down when training
    ends, StoreUnreachable names the checkpoint and how to go on.
    """

    def __init__(self, run: Run | Callable[[], Run], flush_every_s: float = 10.0):
        self.run = run if isinstance(run, Run) else None
        self._open = None if isinstance(run, Run) else run
        self.flush_every_s = flush_every_s
        self._buffer: list = []
        self._last_flush = time.monotonic()
        self._last_step = 0
        self.warnings: list[str] = []
        self._held: list[Callable[[], Any]] = []  # writes held while the tracking server does not answer
        self._down_since: float | None = None
        self._timeout_s, self._folder = 60.0, Path("train.out")

    def on_start(self, cfg: Config, model, start_iteration: int) -> None:
        if self.run is None:
            self.run = self._open()
        self._timeout_s, self._folder = cfg.tracking.timeout_s, Path(cfg.train.out)
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._write(self.run.set_tags, {"model.parameters": n_all, "model.trainable_parameters": n_train,
                                        "start_iteration": start_iteration})

    def _add(self, metrics: dict[str, Any], step: int, prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, v, now, step) for k, v in flat_metrics(metrics, prefix).items()]
        self._last_step = step

    # -- writes that survive a tracking server going away
    def _write(self, fn: Callable, *args, **kwargs) -> None:
        """Does one write to the run, after the ones held back; holds it while the server is down."""
        self._held.append(functools.partial(fn, *args, **kwargs))
        self._drain()

    def _drain(self) -> bool:
        """Writes the held writes in order; returns False (and keeps them) while the server is down."""
        uri = self.run.client.tracking_uri
        if self._down_since is not None:
            try:  # seconds, not MLflow's retries, to learn it is still down
                check_reachable(uri)
            except StoreUnreachable:
                return False
        while self._held:
            try:
                with _quiet_retries():
                    self._held[0]()
            except Exception:
                try:
                    check_reachable(uri)
                except StoreUnreachable:
                    self._went_down(uri)
                    return False
                raise  # the server answers: a real error
            self._held.pop(0)
        if self._down_since is not None:
            print(f"MLflow tracking server {uri} answers again after {time.monotonic() - self._down_since:.0f} s: "
                  f"the metrics held meanwhile are logged to run {self.run.run_id}", file=sys.stderr, flush=True)
            self._down_since = None
        return True

    def _went_down(self, uri: str) -> None:
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        folder = self._folder
        print(f"MLflow tracking server {uri} does not answer (since iteration {self._last_step}, "
              f"tracking.timeout_s={self._timeout_s:g}): training continues, its metrics are held and logged "
              f"when the server answers again; if it is still down when training ends, the run stops with its "
              f"checkpoint in {folder} (recontrast evaluate --checkpoint {folder}/last.ckpt logs it later)",
              file=sys.stderr, flush=True)

    def flush(self) -> None:
        """Writes the buffered metrics (plus a heartbeat for `fix_stale_runs`) in one batch."""
        from mlflow.entities import Metric

        if self.run is None or not (self._buffer or self._held):
            return
        if self._buffer:
            beat = Metric("system/heartbeat", float(self._last_step), int(time.time() * 1000), self._last_step)
            batch, self._buffer = [*self._buffer, beat], []
            self._held.append(functools.partial(retry, self.run.client.log_batch, self.run.run_id, metrics=batch))
        self._drain()
        self._last_flush = time.monotonic()

    def on_log(self, iteration: int, metrics: dict[str, float]) -> None:
        self._add(metrics, iteration, "train/")
        if time.monotonic() - self._last_flush > self.flush_every_s or len(self._buffer) > 900:
            self.flush()

    def on_eval(self, iteration: int, metrics: dict[str, Any]) -> None:
        self._add(metrics, iteration, "eval/")
        self.flush()

    def on_warning(self, message: str, kind: str) -> None:
        self.warnings.append(message)
        tags = {"warning": message[:7000]}
        if kind in (LOSS_RISING, DIVERGED):
            tags[kind] = "true"
        self._write(self.run.set_tags, tags)
        self._write(self.run.log_text, "\n\n".join(self.warnings) + "\n", "warnings.txt")

    def before_checkpoint(self, iteration: int) -> None:
        # A kill right after the checkpoint is written resumes from it: the metrics up to it
        # must already be in the store, or they are never logged (tests/test_ray.py kills there).
        self.flush()

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        path = Path(path).resolve()
        self._write(self.run.set_tags, {Tag.CHECKPOINT: str(path), "checkpoint_iteration": iteration})
        write_run_id(path.parent, self.run.run_id)
        self.flush()

    def on_end(self, result: TrainResult) -> None:
        self._add({"iterations": result.iterations}, result.iterations, "train/")
        self._write(self.run.set_tags, {LOSS_RISING: str(bool(result.loss_rising)).lower()})
        self.flush()
        deadline = time.monotonic() + self._timeout_s
        while self._held and time.monotonic() < deadline:  # a restart in progress: wait for it a little
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            self._drain()
        if self._held:
            raise StoreUnreachable(
                f"the MLflow tracking server {self.run.client.tracking_uri} has not answered for "
                f"{time.monotonic() - (self._down_since or time.monotonic()):.0f} s: training finished "
                f"({result.iterations} iterations, checkpoint {result.checkpoint}) but the metrics since "
                f"it went down are not logged; start the server, then evaluate and log the model: "
                f"recontrast evaluate --checkpoint {result.checkpoint}")


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """Hides urllib3's line per retried request while a write is tried: the callback says in
    one line when the server is down, not in one per attempt."""
    logger = logging.getLogger("urllib3.connectionpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
        log_trained_model(run, checkpoint, step=step)
    run.set_tags({Tag.EVALUATED_CHECKPOINT: str(Path(checkpoint).resolve())})
    return run_id


def log_trained_model(run: Run, checkpoint: str | Path, step: int = 0, ckpt: dict | None = None) -> None:
    """Logs a calibrated checkpoint to `run` as its MLflow model (named for the run; a pyfunc model
    with the inference weights, no optimizer state: mlflow_model.log_detector) and, with
    tracking.log_full_checkpoint, the whole checkpoint under checkpoint/ (to resume elsewhere).
    `ckpt`: the checkpoint's contents when the caller holds them (the file is not read again)."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    if from_dict(ckpt["config"]).tracking.log_full_checkpoint:
        run.log_artifact(checkpoint, "checkpoint")
    mlflow_model.log_detector(run.run_id, checkpoint, uri=run.client.tracking_uri, step=step, ckpt=ckpt)


def _log_evaluation_in_new_run(result, checkpoint, uri, step) -> str:
    cfg = from_dict(load_checkpoint(checkpoint)["config"])
    with start_run(cfg, run_name=f"evaluate-{cfg.data.category}", uri=uri,
                   tags={Tag.CHECKPOINT: str(Path(checkpoint).resolve())}) as run:
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
