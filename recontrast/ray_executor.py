"""Study fan-out on Ray: `recontrast batch --executor ray` runs each (variant, category) pair
as one Ray task that executes the same notebooks as the local executor (batch.execute_pair).

The driver (the `recontrast batch` process) keeps what it does locally: planning, skipping
finished pairs, the parent MLflow run, done.json and the report. A task runs on whichever
node Ray picks, so every node must see the same paths (docs/scaling.md): the repository
(study file, notebooks), data.root and experiments/runs/ on a shared filesystem, and the
MLflow store as a server (`make server`), whose URI reaches the workers in their environment.
A worker that cannot see them fails its pair at once, naming the path. A worker that dies
is retried by Ray (`max_retries`); the retry first marks the dead attempt's MLflow run FAILED
and resumes from its checkpoint when there is one. A pair whose retries are spent is reported
failed, its run marked FAILED: no run stays RUNNING.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from recontrast.config import ConfigError, load_config
from recontrast.mlflow_store import RunStatus, Tag, get_client, read_run_id, retry
from recontrast.runtime import ROOT_ENV, notebook_folder, process_alive, project_root
from recontrast.study import Job, PairStatus, study_status

log = logging.getLogger(__name__)

CLUSTER_EXTRA = "pip install -e '.[cluster]'"
ATTEMPT_FILE = "ray_attempt.json"  # in the pair's folder: which attempt, on which worker process


@dataclass
class RayOptions:
    """`recontrast batch --executor ray`'s settings."""

    address: str | None = None  # "auto" or host:port joins a cluster; None starts a local instance
    cpus: float | None = None  # per pair; None: the study's study.resources.cpus, else 1
    gpus: float | None = None  # per pair; None: study.resources.gpus, else 1 where the cluster has GPUs
    max_retries: int = 1  # Ray's retries of a pair whose worker died
    timeout_s: float = 60.0  # joining the cluster (or starting the local instance) gives up after this


# What --address takes: "auto", "local", or [ray://]host:port.
_ADDRESS = re.compile(r"(?:ray://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})")


def check_options(options: RayOptions) -> None:
    """Raises ConfigError naming the first setting of `recontrast batch --executor ray` that
    cannot work (an address that does not parse, a negative count): before anything is touched."""
    address = options.address
    if address and address not in ("auto", "local"):
        match = _ADDRESS.fullmatch(address)
        if not match or not 0 < int(match["port"]) < 65536:
            raise ConfigError(f"--address {address[:80]!r} is not a Ray address; use auto (the cluster `ray start` "
                              f"runs here), host:port (e.g. 10.0.0.5:6379) or ray://host:10001")
    if options.max_retries < 0:
        raise ConfigError(f"--max-retries {options.max_retries}: must be >= 0")
    if options.cpus is not None and not options.cpus > 0:
        raise ConfigError(f"--cpus-per-pair {options.cpus}: must be > 0")
    if options.gpus is not None and not options.gpus >= 0:
        raise ConfigError(f"--gpus-per-pair {options.gpus}: must be >= 0")
    if not options.timeout_s > 0:
        raise ConfigError(f"--ray-timeout {options.timeout_s}: must be a number of seconds > 0")


class WorkerSetupError(RuntimeError):
    """A Ray worker cannot see a path the pair needs; the message names it and the setup."""


def import_ray():
    """Returns the ray module, or raises ConfigError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed: {CLUSTER_EXTRA}") from None
    return ray


def task_resources(job: Job, cpus: float | None = None, gpus: float | None = None,
                   cluster_gpus: float = 0.0) -> dict[str, float]:
    """Returns a task's Ray resources: the CLI's, else the study file's `study.resources`
    ({cpus, gpus}), else 1 CPU and, where the cluster has GPUs, 1 GPU."""
    block = (yaml.safe_load(Path(job.config).read_text()) or {}).get("study") or {}
    given = block.get("resources") or {}
    unknown = set(given) - {"cpus", "gpus"}
    if unknown:
        raise ConfigError(f"{job.config}: study.resources takes cpus and gpus, not {', '.join(sorted(unknown))}")
    cpus = float(cpus if cpus is not None else given.get("cpus", 1))
    gpus = float(gpus if gpus is not None else given.get("gpus", 1 if cluster_gpus > 0 else 0))
    if cpus <= 0 or gpus < 0:
        raise ConfigError(f"a Ray task needs cpus > 0 and gpus >= 0, got cpus={cpus}, gpus={gpus}")
    return {"num_cpus": cpus, "num_gpus": gpus}


def worker_env(jobs: Sequence[Job]) -> dict[str, str]:
    """Returns the environment every worker gets: the MLflow store the driver resolved (and
    the artifact root when set), so notebooks on any node log where the driver does."""
    env = {}
    uris = {job.uri for job in jobs if job.track and job.uri}
    if len(uris) == 1:
        env["MLFLOW_TRACKING_URI"] = uris.pop()
    env[ROOT_ENV] = str(project_root())  # the driver's project, wherever a worker starts
    for name in ("RECONTRAST_ARTIFACT_ROOT", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def run_pairs(jobs: Sequence[Job], execute: Callable[[Job], Any], options: RayOptions | None = None,
              local_pairs: int = 1) -> Iterator[tuple[Job, Any]]:
    """Yields (job, execute(job)'s result, or a one-line error) as each pair's Ray task ends.

    Without options.address a local Ray instance starts with the CPUs of `local_pairs` pairs
    at once (as `--jobs` does for the local executor) and stops at the end; a Ray already
    initialised in this process (ray.init) is used as it is.
    """
    ray, options = import_ray(), options or RayOptions()
    if not jobs:
        return
    env, address = worker_env(jobs), options.address
    if address and env.get("MLFLOW_TRACKING_URI", "").startswith("sqlite:"):
        log.warning("the MLflow store is a sqlite file on this machine (%s): workers on other nodes cannot "
                    "log to it; start a tracking server (make server) and set MLFLOW_TRACKING_URI",
                    env["MLFLOW_TRACKING_URI"])
    started = not ray.is_initialized()
    if started:
        _init(ray, options, jobs, local_pairs)
    try:
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
        task = ray.remote(_run_pair)
        token = uuid.uuid4().hex  # tells a retry of this batch's task from an earlier batch's run
        pending = {}
        for job in jobs:
            resources = task_resources(job, options.cpus, options.gpus, cluster_gpus)
            pending[task.options(**resources, max_retries=options.max_retries, runtime_env={"env_vars": env})
                    .remote(execute, job, token)] = job
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                yield job, ray.get(done[0])
            except Exception as err:  # the task raised, or its worker died and the retries are spent
                message = _describe(ray, err, options.max_retries)
                _end_dead_attempt(job, message)
                yield job, message
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def connected(options: RayOptions, jobs: Sequence[Job], local_pairs: int = 1):
    """Runs the block joined to Ray (options.address, or a local instance with the CPUs of
    `local_pairs` pairs), within options.timeout_s; shuts Ray down after it. A cluster that
    does not answer raises ConfigError before the block (no record is opened)."""
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    _init(ray, options, jobs, local_pairs)
    try:
        yield
    finally:
        ray.shutdown()


def _init(ray, options: RayOptions, jobs: Sequence[Job], local_pairs: int) -> None:
    """Calls ray.init with a deadline: a host:port nobody listens on is refused in seconds,
    and joining a cluster that does not return within options.timeout_s raises ConfigError."""
    address, timeout = options.address, options.timeout_s
    fix = ("start it (`ray start --head` on that node), check --address, or run without --address "
           "(a local Ray instance); nothing was run and no earlier run was changed")
    match = _ADDRESS.fullmatch(address or "")
    if match:  # Ray itself retries an absent cluster for minutes, repeating its warnings
        host, port = match["host"].strip("[]"), int(match["port"])
        try:
            socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()
        except OSError as err:
            raise ConfigError(f"the Ray cluster at {address} does not answer ({err.strerror or err}); {fix}") from None
    per_pair = task_resources(jobs[0], options.cpus, options.gpus)["num_cpus"] if jobs else 1
    kwargs = dict(address=address or None, num_cpus=None if address else max(1, round(local_pairs * per_pair)),
                  include_dashboard=False, configure_logging=False)
    if not address:  # a local instance starts its own processes: in the main thread (Ray's signal handlers)
        ray.init(**kwargs)
        return
    outcome: dict[str, BaseException | None] = {}

    def join() -> None:
        try:
            ray.init(**kwargs)
            outcome["error"] = None
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=join, name="ray-init", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ConfigError(f"Ray did not start or join {address or 'a local instance'} within {timeout:g} s "
                          f"(--ray-timeout); {fix}")
    if outcome["error"] is not None:
        err = outcome["error"]
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"Ray could not join {address or 'a local instance'} ({type(err).__name__}: "
                          f"{first[:300]}); {fix}") from None


def _describe(ray, err: Exception, max_retries: int) -> str:
    """Returns one line for a task that failed: the pair's own error, or its dead worker."""
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if err.cause is not None else err
        text = f"{type(cause).__name__}: {cause}"
    elif isinstance(err, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                          ray.exceptions.TaskUnschedulableError, ray.exceptions.OutOfMemoryError)):
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        text = (f"{type(err).__name__}: the Ray worker running this pair died "
                f"({1 + max_retries} attempt(s)); {first}")
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:500]


# ----------------------------------------------------------------------------- on a worker
def _run_pair(execute: Callable[[Job], Any], job: Job, token: str):
    """Returns execute(job) on a Ray worker, after checking that this node sees the paths the
    pair needs and, on a retry, cleaning up after the attempt whose worker died."""
    _check_paths(job)
    attempt = _record_attempt(Path(job.folder), token)
    if attempt > 1:
        _end_dead_attempt(job, f"its Ray worker died; Ray retried the pair (attempt {attempt})")
        job.resume = study_status(job, force=False) == PairStatus.RESUME
        log.warning("%s/%s: attempt %d on %s, %s", job.variant, job.category, attempt, socket.gethostname(),
                    "resuming from its checkpoint" if job.resume else "starting over")
    return execute(job)


def _check_paths(job: Job) -> None:
    """Raises WorkerSetupError naming the first path the pair needs that this node lacks."""
    host = socket.gethostname()
    setup = "every Ray node must see the same paths (a shared filesystem, docs/scaling.md)"
    for what, path in (("the study file", Path(job.config)), ("the pair's folder", Path(job.folder)),
                       ("the notebooks", notebook_folder())):
        if not path.exists():
            raise WorkerSetupError(f"Ray worker on {host} cannot see {what} {path}: {setup}")
    data = project_root() / load_config(job.config, job.overrides).data.root
    if not data.is_dir():
        raise WorkerSetupError(f"Ray worker on {host} cannot see data.root {data}: {setup}; "
                               f"or pass --set data.root=<the path every node mounts>")


def _record_attempt(folder: Path, token: str) -> int:
    """Returns this task's attempt number (1 unless an attempt of the same batch ran here before),
    after writing it with this worker's pid and host to <folder>/ray_attempt.json."""
    path = folder / ATTEMPT_FILE
    try:
        earlier = json.loads(path.read_text())
        attempt = earlier["attempt"] + 1 if earlier.get("token") == token else 1
    except (OSError, ValueError, KeyError):
        attempt = 1
    path.write_text(json.dumps({"token": token, "attempt": attempt, "pid": os.getpid(),
                                "hostname": socket.gethostname()}) + "\n")
    return attempt


def _end_dead_attempt(job: Job, reason: str, wait_s: float = 60.0) -> None:
    """Marks the pair's MLflow run FAILED when it is still RUNNING (its worker died), once
    the notebook kernel that ran it is gone from this host (it exits when its worker dies)."""
    if not job.track:
        return
    run_id = read_run_id(Path(job.folder) / "train")
    if run_id is None:
        return
    try:
        client = get_client(uri=job.uri or None)
        run = client.get_run(run_id)
        if run.info.status != RunStatus.RUNNING:
            return
        tags = run.data.tags
        pid, start = tags.get("pid", ""), tags.get("process_start", "")
        deadline = time.monotonic() + wait_s
        while (tags.get("hostname") == socket.gethostname() and pid.isdigit() and process_alive(int(pid), start)
               and time.monotonic() < deadline):
            time.sleep(0.2)
        retry(client.set_tag, run_id, Tag.ERROR, reason)
        retry(client.set_tag, run_id, Tag.ERROR_TYPE, "WorkerDied")
        retry(client.set_terminated, run_id, RunStatus.FAILED)
    except Exception as err:  # the pair's outcome is reported either way
        log.warning("could not mark run %s of %s/%s FAILED: %s (`recontrast runs --fix-stale` will)",
                    run_id, job.variant, job.category, err)
