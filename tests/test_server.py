"""One tracking server for a team: `make server` (MLflow on PostgreSQL, artifacts proxied by the
server) under real load and real faults: 8 jobs logging at once lose no step and no artifact; a
job started while the server is down fails in seconds with a clear error and leaves no run, one
whose server goes down and comes back finishes; `recontrast runs --fix-stale` works on it.

PostgreSQL: $RECONTRAST_TEST_POSTGRES (a postgresql:// URI whose role may create databases;
.ci/run starts one with .ci/postgres and sets it), else .ci/postgres starts one here; the tests
skip, saying why, only when no PostgreSQL can be started. Each session gets a fresh database.
The MLflow server is started by a fixture with the command `make server` runs (printed by
`make -n`), because one test stops and restarts it.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import killed_run, run_cli, write_config

# A real server: make test runs it, make test-fast does not. One pytest worker runs them all
# (make test: -n 2 --dist loadgroup), so the PostgreSQL this module may start is its own.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("postgres")]

REPO = Path(__file__).resolve().parents[1]
JOBS, STEPS, ARTIFACT_BYTES = 8, 100, 200_000


# ----------------------------------------------------------------------------- PostgreSQL + server
def _postgres(action: str, own: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / ".ci" / "postgres"), action], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **own})


@pytest.fixture(scope="session")
def database():
    """Returns the URI of a fresh PostgreSQL database for this session (dropped at the end), on
    $RECONTRAST_TEST_POSTGRES's server or on one started here (and stopped at the end)."""
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install -e '.[dev]'")
    server_uri = os.environ.get("RECONTRAST_TEST_POSTGRES", "")
    own = not server_uri
    if own:  # a cluster of this session's own (folder, port): two test sessions at once do not share one
        # under /tmp itself, not pytest's 0700 folders: as root the server runs as `postgres`, which must reach it
        own = {"PGPORT": str(_free_port()), "PGDATA": tempfile.mkdtemp(prefix="recontrast-postgres-tests-", dir="/tmp")}
        started = _postgres("start", own)
        if started.returncode != 0:
            shutil.rmtree(own["PGDATA"], ignore_errors=True)
            pytest.skip(f"PostgreSQL cannot be started here ({(started.stderr or started.stdout).strip()[-300:]}); "
                        f"apt-get install postgresql, or set RECONTRAST_TEST_POSTGRES=postgresql://...")
        server_uri = started.stdout.strip().splitlines()[-1]
    base, _, _ = server_uri.rpartition("/")
    name = f"mlflow_test_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(server_uri, autocommit=True)
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
        if own:
            _postgres("stop", own)
            shutil.rmtree(own["PGDATA"], ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`make server` on a free loopback port, against `database`, artifacts in `artifacts`."""

    def __init__(self, database: str, artifacts: Path, log: Path):
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        printed = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed", "server",
                                  f"MLFLOW_PORT={self.port}", f"MLFLOW_BACKEND={database}",
                                  f"MLFLOW_ARTIFACTS={artifacts}", "MLFLOW_WORKERS=1"],
                                 cwd=REPO, capture_output=True, text=True, check=True).stdout
        self.command = shlex.split(printed.replace("\\\n", " "))
        self.command[0] = str(Path(sys.executable).with_name("mlflow"))  # this interpreter's venv
        self.log, self.proc = log, None

    def start(self, timeout: float = 180) -> None:
        self.proc = subprocess.Popen(self.command, cwd=REPO, start_new_session=True,
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout  # the first start creates the tables
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server did not answer within {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None


@pytest.fixture(scope="module")
def server(database, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow_server")
    srv = Server(database, folder / "artifacts", folder / "server.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    if server.proc is None:
        server.start()
    return MlflowClient(server.uri)


# ----------------------------------------------------------------------------- jobs
CHILD = textwrap.dedent("""
    import hashlib, random, sys, time
    from pathlib import Path
    uri, folder, i, steps, pause = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    from recontrast import tracking
    from recontrast.config import Config, apply_overrides
    cfg = apply_overrides(Config(), {"tracking.uri": uri, "tracking.experiment": folder.name,
                                     "data.category": f"job{i}"})
    files = folder / f"job{i}"
    (files / "folder").mkdir(parents=True, exist_ok=True)
    (files / "note.txt").write_text(f"job {i}\\n")
    (files / "blob.bin").write_bytes(random.Random(i).randbytes(%d))
    (files / "folder" / "a.txt").write_text("a" * (i + 1))
    (files / "folder" / "b.txt").write_text("b" * (i + 2))
    (folder / f"ready{i}").touch()
    while not (folder / "go").exists():  # all jobs start writing at once
        time.sleep(0.01)
    with tracking.start_run(cfg, run_name=f"job{i}") as run:
        print(run.run_id, flush=True)
        cb = tracking.MLflowCallback(run, flush_every_s=3600)
        for step in range(1, steps + 1):
            cb.on_log(step, {"loss": 1.0 / step, "job": float(i)})
            if step %% 5 == 0:
                cb.flush()
                time.sleep(pause)
        run.log_artifact(files / "note.txt")
        run.log_artifact(files / "blob.bin", "blobs")
        run.log_artifact(files / "folder", "folder")
        cb.on_end(type("R", (), {"iterations": steps, "loss_rising": False})())
""" % ARTIFACT_BYTES)


def _start_jobs(uri: str, folder: Path, jobs: int, steps: int, pause: float = 0.0) -> list[subprocess.Popen]:
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, uri, str(folder), str(i), str(steps), str(pause)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(jobs)]
    deadline = time.monotonic() + 180
    while not all((folder / f"ready{i}").exists() for i in range(jobs)) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    (folder / "go").touch()
    return procs


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    """Returns the jobs' run ids once all of them ended; fails naming the ones that failed."""
    outs = [p.communicate(timeout=300) for p in procs]
    failed = [err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}"
              for p, (_, err) in zip(procs, outs) if p.returncode != 0]
    assert not failed, f"{len(failed)} of {len(procs)} jobs failed: {failed}"
    return [out.strip().splitlines()[0] for out, _ in outs]


def _check_jobs(client, folder: Path, run_ids: list[str], steps: int) -> None:
    """Every run FINISHED with every step and every artifact, byte for byte."""
    runs = client.search_runs([client.get_experiment_by_name(folder.name).experiment_id], max_results=100)
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids)
    for run in runs:
        i = int(run.info.run_name.removeprefix("job"))
        assert run.info.status == "FINISHED", run.info.run_name
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1)), run.info.run_name
        assert all(abs(m.value - 1.0 / m.step) < 1e-12 for m in history)
        local = Path(client.download_artifacts(run.info.run_id, "", str(folder / f"download{i}")))
        for name in ("note.txt", "blobs/blob.bin", "folder/a.txt", "folder/b.txt"):
            source = folder / f"job{i}" / name.removeprefix("blobs/")
            assert (hashlib.sha256((local / name).read_bytes()).digest()
                    == hashlib.sha256(source.read_bytes()).digest()), (run.info.run_name, name)


def test_eight_jobs_at_once_lose_no_step_and_no_artifact(client, server, tmp_path):
    folder = tmp_path / "parallel8"
    run_ids = _finish(_start_jobs(server.uri, folder, JOBS, STEPS))
    _check_jobs(client, folder, run_ids, STEPS)
    artifact_uri = client.get_run(run_ids[0]).info.artifact_uri
    assert artifact_uri.startswith("mlflow-artifacts:"), artifact_uri  # proxied by the server


def test_a_job_while_the_server_is_down_fails_clearly_and_one_it_outlives_finishes(
        client, server, synthetic_root, tmp_path):
    # A job logging when the server stops (and starts again a few seconds later).
    folder = tmp_path / "restart"
    procs = _start_jobs(server.uri, folder, jobs=1, steps=60, pause=0.5)
    deadline = time.monotonic() + 120
    while client.get_experiment_by_name(folder.name) is None or not client.search_runs(
            [client.get_experiment_by_name(folder.name).experiment_id]):
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.2)
    server.stop()

    # A training started while the server is down stops in seconds, naming it, before any run.
    config = write_config(tmp_path, synthetic_root, "weave", tracking={"experiment": "server_down"})
    t0 = time.monotonic()
    message = run_cli(["train", "--config", str(config), "--out", str(tmp_path / "down")])
    assert message and "does not answer" in message and server.uri in message, message
    assert time.monotonic() - t0 < 60  # seconds, not MLflow's minutes of retries
    server.start()
    assert client.get_experiment_by_name("server_down") is None  # no run, not even its experiment

    # The job that outlived the outage: MLflow's client retried, nothing was lost, it finished.
    _check_jobs(client, folder, _finish(procs), steps=60)

    # `recontrast train` logs to the server, its MLflow model's files through the server's proxy.
    assert run_cli(["train", "--config", str(config), "--out", str(tmp_path / "up")]) is None
    (run,) = client.search_runs([client.get_experiment_by_name("server_down").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["train/iterations"] == 2
    import mlflow

    (output,) = run.outputs.model_outputs
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{output.model_id}", tracking_uri=server.uri,
                                                     dst_path=str(tmp_path / "model")))
    assert [p.name for p in local.rglob("*.ckpt")] == ["weights.ckpt"] and (local / "MLmodel").is_file()


def test_fix_stale_marks_a_killed_jobs_run_failed_on_the_server(client, server, tmp_path):
    orphan = killed_run("stale_server")
    assert client.get_run(orphan).info.status == "RUNNING"
    assert run_cli(["runs", "--fix-stale"]) is None
    run = client.get_run(orphan)
    assert run.info.status == "FAILED" and run.data.tags["error_type"] == "StaleRun"
