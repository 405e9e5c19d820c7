"""Reliability, third pass (issue 21): each class of fault made to happen for real, its
one-line outcome, and that no earlier record, file or checkpoint changed (hashes before and
after). Tiny models only (resnet18 from scratch, 64 px, 2 iterations, one thread).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import REPO, empty_store, run_cli, write_config
from recontrast import batch
from recontrast.batch import PairResult
from recontrast.config import ConfigError

CATEGORY = "weave"


# ----------------------------------------------------------------------------- helpers
def digest(path: Path) -> str:
    """Returns a hash of a file, or of every file under a folder (names and bytes; no lock files)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".lock")
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def mlflow_client(uri: str | None = None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri or os.environ["MLFLOW_TRACKING_URI"])


def records(client) -> dict:
    """Returns every run of the store: status, end time, tags, metrics and logged models."""
    out = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            models = [o.model_id for o in run.outputs.model_outputs] if run.outputs else []
            out[run.info.run_id] = (run.info.status, run.info.end_time, dict(run.data.tags), dict(run.data.metrics),
                                    models)
    return out


def closed_port() -> int:
    with socket.socket() as s:  # bound, then released: nobody listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(error: str | None) -> str:
    assert error is not None and "\n" not in error and "Traceback" not in error, error
    return error


@pytest.fixture()
def root(tmp_path, tmp_path_factory, monkeypatch) -> Path:
    """Returns a project root of the test's own ($RECONTRAST_ROOT) with a fresh MLflow store."""
    monkeypatch.setenv("RECONTRAST_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store(tmp_path_factory, tmp_path / "mlruns"))
    return tmp_path


def study_file(folder: Path, name: str = "mini", variants: dict | None = None) -> Path:
    (folder / "data" / CATEGORY / "train").mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"root": str(folder / "data"), "image_size": 64},
        "model": {"backbone": "resnet18", "pretrained": "none"},
        "train": {"iters": 2, "batch_size": 2}, "tracking": {"experiment": "third"},
        "study": {"name": name, "categories": [CATEGORY], "variants": variants or {"full": {}}}}))
    return path


class RealRuns:
    """A stand-in for execute_pair that logs a real finished child run per pair."""

    def __init__(self):
        self.jobs = []

    def __call__(self, job):
        from recontrast.mlflow_store import experiment_id, get_client

        client = get_client(uri=job.uri)
        run = client.create_run(experiment_id(client, "third"), run_name=f"{job.variant}-{job.category}",
                                tags={"mlflow.parentRunId": job.parent_run_id or "", "study": job.study,
                                      "variant": job.variant, "category": job.category})
        client.set_terminated(run.info.run_id, "FINISHED")
        self.jobs.append(job)
        return PairResult(job.variant, job.category, "done", run.info.run_id, "", 0.0, job.folder)


# ----------------------------------------------------------------------------- 1. names in filters
def test_names_with_quotes_are_refused_at_load_or_quoted_in_every_mlflow_filter(root, tmp_path):
    from recontrast.mlflow_store import find_run, quote
    from recontrast.study_results import study_results

    path = study_file(tmp_path, name="o'brien")
    error = one_line(run_cli(["batch", "--study", str(path)]))
    assert re.search(r"study\.name \"o'brien\" is not a valid name: use letters, digits, '_', '-' and '\.'", error)
    assert not (root / "experiments" / "runs").exists() and records(mlflow_client()) == {}
    with pytest.raises(ConfigError, match="the study name \"o'brien\" is not a valid name"):
        batch.run_study(study_file(tmp_path / "valid"), name="o'brien", executor=RealRuns())
    assert not (root / "experiments" / "runs").exists() and records(mlflow_client()) == {}

    # Names that reach MLflow from elsewhere (runs logged before, a checkpoint path, a model
    # name) are quoted: found, not an "Invalid clause(s) in filter string".
    client = mlflow_client()
    exp = client.create_experiment("quotes")
    checkpoint = tmp_path / "o'brien" / "last.ckpt"
    run = client.create_run(exp, tags={"study": "o'brien", "variant": "full", "category": CATEGORY,
                                       "checkpoint": str(checkpoint)}).info.run_id
    client.set_terminated(run, "FINISHED")
    assert list(study_results("o'brien")["run_id"]) == [run]
    assert find_run(checkpoint) == run
    client.create_registered_model("o'brien")
    client.create_model_version("o'brien", str(tmp_path), run_id=run)
    name = "o'brien"
    assert len(client.search_model_versions(f"name = {quote(name)} and run_id = {quote(run)}")) == 1
    before = records(client)
    error = one_line(run_cli(["register", "--run", run, "--name", "o'brien \"the\" second"]))
    assert "holds both ' and \"" in error and "rename it without one of them" in error
    assert records(client) == before


# ----------------------------------------------------------------------------- 2 and 3. before any record; deadlines
@pytest.mark.slow
def test_a_batch_whose_executor_cannot_start_or_that_has_nothing_to_do_changes_no_record(root, tmp_path, capsys):
    path = study_file(tmp_path)
    assert batch.run_study(path, executor=RealRuns(), compare=False).ok
    client, runs = mlflow_client(), root / "experiments" / "runs"
    before = records(client), digest(runs)
    parent = next(r for r, record in before[0].items() if record[2].get("recontrast_role") == "study")
    assert before[0][parent][0] == "FINISHED"
    capsys.readouterr()

    nothing = RealRuns()  # every pair finished: a no-op says so and reopens nothing
    batch.run_study(path, executor=nothing)
    assert nothing.jobs == [] and "nothing to run, every pair finished earlier" in capsys.readouterr().out
    assert (records(client), digest(runs)) == before

    error = one_line(run_cli(["batch", "--study", str(path), "--force", "--executor", "ray", "--address", "head node"]))
    assert re.search(r"--address 'head node' is not a Ray address; use auto .*host:port", error)
    assert (records(client), digest(runs)) == before

    start = time.monotonic()  # a cluster that is not there: one line within the deadline, not minutes
    port = closed_port()
    error = one_line(run_cli(["batch", "--study", str(path), "--force", "--executor", "ray",
                              "--address", f"127.0.0.1:{port}", "--ray-timeout", "5"]))
    assert time.monotonic() - start < 60
    assert re.search(rf"the Ray cluster at 127\.0\.0\.1:{port} does not answer .*no earlier run was changed", error)
    assert (records(client), digest(runs)) == before
    assert one_line(run_cli(["batch", "--study", str(path), "--executor", "ray", "--ray-timeout", "0"]))


def test_resume_with_no_iterations_left_is_one_line_and_touches_neither_run_nor_checkpoint(
        synthetic_root, store, tmp_path):
    config = write_config(tmp_path, synthetic_root, CATEGORY, train={"iters": 2, "checkpoint_every": 2})
    out = tmp_path / "run"
    assert run_cli(["train", "--config", str(config), "--out", str(out)]) is None
    client = mlflow_client(store)
    before = records(client), digest(out)
    for iters in (2, 1):  # as many as the checkpoint holds, or fewer: nothing to train
        error = one_line(run_cli(["train", "--config", str(config), "--out", str(out), "--resume",
                                  "--set", f"train.iters={iters}"]))
        assert re.search(rf"--resume: .*last\.ckpt already holds 2 iterations and train\.iters={iters}: nothing to "
                         rf"train, nothing was changed; give train\.iters > 2 .*recontrast evaluate", error), error
        assert (records(client), digest(out)) == before


def test_a_batch_pair_whose_training_finished_is_evaluated_without_training_again(tmp_path, monkeypatch):
    from recontrast import checkpoint
    from recontrast.study import Job

    path = study_file(tmp_path)
    train = tmp_path / "pair" / "train"
    train.mkdir(parents=True)
    checkpoint.save_checkpoint(train / "last.ckpt", {"iteration": 2, "config": {}})
    job = Job("mini", "full", CATEGORY, str(path), [], str(tmp_path / "pair"), "f", track=False, resume=True)
    executed = []

    class FakePapermill:
        @staticmethod
        def execute_notebook(notebook, output, **kwargs):
            executed.append(Path(notebook).name)
            Path(output).write_text("{}")

    monkeypatch.setitem(sys.modules, "papermill", FakePapermill)
    assert batch.execute_pair(job).status == "done"
    assert executed == ["03_evaluate.ipynb"]


def test_mlflow_calls_give_up_after_tracking_timeout_s(monkeypatch):
    from mlflow import MlflowClient

    from recontrast.mlflow_store import set_timeout

    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(key, raising=False)
    set_timeout(4)
    start = time.monotonic()
    with pytest.raises(Exception, match="127.0.0.1"):
        MlflowClient(f"http://127.0.0.1:{closed_port()}").search_experiments()
    assert time.monotonic() - start < 15  # MLflow's own default: 7 retries over minutes


class MlflowServer:
    """`mlflow server` on a loopback port with a sqlite store: started, stopped, restarted."""

    def __init__(self, folder: Path, db_uri: str):
        self.port = closed_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                        "--port", str(self.port), "--workers", "1", "--backend-store-uri", db_uri,
                        "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts")]
        self.log, self.proc = folder / "server.log", None

    def start(self, timeout: float = 120) -> None:
        self.proc = subprocess.Popen(self.command, start_new_session=True, stdout=self.log.open("a"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server did not answer: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # dies, as a crashed server does
            self.proc.wait(30)


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_training_and_comes_back_loses_no_metric(
        synthetic_root, tmp_path, tmp_path_factory, capsys):
    from recontrast.pipeline import main_train
    from recontrast.train import Callback

    server = MlflowServer(tmp_path, empty_store(tmp_path_factory, tmp_path / "db"))
    server.start()

    class Outage(Callback):
        def on_log(self, iteration, metrics):
            if iteration == 2:
                server.stop()
            if iteration == 4:
                server.start()

    config = write_config(tmp_path, synthetic_root, CATEGORY, train={"iters": 6, "checkpoint_every": 2},
                          tracking={"uri": server.uri, "timeout_s": 4})
    try:
        result = main_train(config, out=tmp_path / "run", callbacks=[Outage()])
        err = capsys.readouterr().err
        down = [line for line in err.splitlines() if "does not answer" in line]
        back = [line for line in err.splitlines() if "answers again after" in line]
        assert len(down) == 1 and re.search(rf"MLflow tracking server {server.uri} does not answer \(since iteration 2, "
                                            r"tracking\.timeout_s=4\): training continues.* checkpoint in .*run "
                                            r"\(recontrast evaluate", down[0]), err
        assert len(back) == 1 and "the metrics held meanwhile are logged" in back[0], err
        client = mlflow_client(server.uri)
        run = client.get_run((tmp_path / "run" / "mlflow_run_id").read_text().strip())
        assert run.info.status == "FINISHED" and result.iterations == 6
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3, 4, 5, 6]
        assert run.data.tags["checkpoint_iteration"] == "6"
    finally:
        server.stop()


# ----------------------------------------------------------------------------- 4. interrupted writers
def _kill_while_writing(out: Path, categories: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "recontrast", "synth", "--out", str(out), "--size", "256",
                             "--n-train", "400", "--categories", *categories], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.parent.glob(f".{out.name}.synth-*/*/train/good/*.png")):
            assert proc.poll() is None and time.monotonic() < deadline, "synth ended before it could be killed"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()


def test_a_synth_killed_part_way_leaves_nothing_that_blocks_the_next(tmp_path):
    root, fresh = tmp_path / "data", tmp_path / "fresh"
    small = ["--size", "64", "--n-train", "4"]
    assert run_cli(["synth", "--out", str(root), *small, "--categories", "disc"]) is None
    before, disc = digest(root), digest(root / "disc")
    _kill_while_writing(root, ["weave", "disc"])  # replacing a category of an existing dataset
    _kill_while_writing(fresh, ["weave"])  # a first dataset
    assert digest(root) == before and not fresh.exists()
    assert run_cli(["synth", "--out", str(fresh), *small, "--categories", "weave"]) is None
    assert run_cli(["synth", "--out", str(root), *small, "--categories", "weave"]) is None
    assert not list(tmp_path.glob(".*synth-*"))  # the killed runs' staging folders are gone
    assert digest(root / "disc") == disc
    assert len(list((fresh / "weave" / "train" / "good").glob("*.png"))) == 4


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> Path:
    """Returns a calibrated checkpoint of a 2-iteration model (trained once for the module)."""
    from conftest import one_thread

    folder = tmp_path_factory.mktemp("trained")
    config = write_config(folder, synthetic_root, CATEGORY, train={"iters": 2, "checkpoint_every": 2})
    with one_thread():
        assert run_cli(["train", "--config", str(config), "--out", str(folder / "run"), "--no-track"]) is None
    return folder / "run" / "last.ckpt"


def test_a_corrupt_exported_model_beside_the_checkpoint_is_rebuilt_with_a_notice(trained, synthetic_root, tmp_path):
    ckpt = Path(shutil.copy(trained, tmp_path / "last.ckpt"))
    image = str(synthetic_root / CATEGORY / "test" / "good" / "000.png")
    predict = ["predict", "--checkpoint", str(ckpt), image, "--runtime", "onnx", "--out"]
    assert run_cli([*predict, str(tmp_path / "p1")]) is None
    good = (tmp_path / "p1" / "predictions.csv").read_text()
    onnx = tmp_path / "last.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])  # an export cut short
    before = digest(ckpt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli([*predict, str(tmp_path / "p2")]) is None
    notices = [str(w.message) for w in caught if "cannot be loaded" in str(w.message)]
    assert len(notices) == 1 and re.search(r"last\.onnx cannot be loaded \(.*\); exporting it again from", notices[0])
    assert (tmp_path / "p2" / "predictions.csv").read_text().replace("p2", "p1") == good
    assert digest(ckpt) == before
    broken = tmp_path / "given.onnx"
    broken.write_bytes(b"not a model")
    error = one_line(run_cli([*predict, str(tmp_path / "p3"), "--model", str(broken)]))
    assert re.search(r"given\.onnx cannot be loaded .*; export it again: recontrast export", error)
    assert broken.read_bytes() == b"not a model"


# ----------------------------------------------------------------------------- 5. bounded error messages
def test_a_yaml_alias_structure_in_a_config_costs_bounded_work(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]  # 10^7 leaves in full
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    tracemalloc.start()
    start = time.monotonic()
    try:
        error = one_line(run_cli(["train", "--config", str(tmp_path / "bomb.yaml")]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert re.search(r"section 'a0' must be a mapping of keys to values, got \['x', 'x'", error)
    assert time.monotonic() - start < 10 and peak < 5e6, (time.monotonic() - start, peak)


# ----------------------------------------------------------------------------- 6. Ctrl-C on batch
@pytest.mark.slow
def test_ctrl_c_on_batch_prints_one_line_and_no_kernel_traceback(synthetic_root, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"root": str(synthetic_root), "image_size": 64, "val_fraction": 0.0},
        "model": {"backbone": "resnet18", "pretrained": "none"},
        "train": {"iters": 5000, "batch_size": 2, "log_every": 20, "checkpoint_every": 5000, "threads": 1},
        "eval": {"figures": False, "gif": False}, "tracking": {"enabled": False},
        "study": {"name": "ctrl_c", "categories": [CATEGORY], "variants": {"full": {}}}}))
    log = tmp_path / "batch.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RECONTRAST_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    # As a terminal does: SIGINT to the batch's process group (its own session here).
    proc = subprocess.Popen([sys.executable, "-m", "recontrast", "batch", "--study", str(path)], cwd=tmp_path,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while "train 20/" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    assert output.strip().splitlines()[-1] == "recontrast batch: interrupted", output[-3000:]
    assert "Traceback" not in output and "ZMQError" not in output and "[IPKernelApp]" not in output, output[-3000:]
    assert (tmp_path / "experiments" / "runs" / "ctrl_c" / "full" / CATEGORY / "kernel.log").is_file()


# ----------------------------------------------------------------------------- 7. the project root
@pytest.mark.slow
def test_the_project_root_is_where_the_user_works_and_a_differing_checkout_is_said(tmp_path, monkeypatch):
    code = ("from recontrast.mlflow_store import get_client, tracking_uri\n"
            "from recontrast.runtime import project_root\n"
            "print(project_root()); print(tracking_uri()); get_client().search_experiments()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RECONTRAST_ROOT", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    clone = tmp_path / "clone"  # a second checkout sharing the environment, worked in from its notebooks/
    (clone / "recontrast").mkdir(parents=True)
    (clone / "notebooks").mkdir()
    (clone / "pyproject.toml").write_text("[project]\nname = 'recontrast'\n")
    # The package runs from a copy of this checkout, so that what it must not get is visible
    # there whatever other tests (other pytest workers) do in this checkout meanwhile.
    package = tmp_path / "package"
    shutil.copytree(REPO / "recontrast", package / "recontrast", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", package / "pyproject.toml")
    done = subprocess.run([sys.executable, "-c", code], cwd=clone / "notebooks", capture_output=True,
                          env={**env, "PYTHONPATH": str(package)}, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(clone), f"sqlite:///{clone}/mlruns/mlflow.db"]
    said = [line for line in done.stderr.splitlines() if line.startswith("recontrast: project root")]
    assert len(said) == 1 and f"project root {clone} (the working directory); the package runs from {package}" in said[0]
    assert (clone / "mlruns" / "mlflow.db").is_file()
    assert not (package / "mlruns").exists()  # the package's checkout got nothing

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-c", code.splitlines()[1] + "\nprint(project_root())"],
                          cwd=clone / "notebooks", env={**env, "RECONTRAST_ROOT": str(elsewhere)},
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == str(elsewhere) and "($RECONTRAST_ROOT)" in done.stderr
    done = subprocess.run([sys.executable, "-c", code.splitlines()[1] + "\nprint(project_root())"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == str(REPO) and "project root" not in done.stderr  # the checkout itself: silent

    monkeypatch.delenv("RECONTRAST_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert run_cli(["--root", str(elsewhere), "runs", "--fix-stale"]) is None
    assert (elsewhere / "mlruns" / "mlflow.db").is_file()
    assert "is not a folder" in one_line(run_cli(["--root", str(tmp_path / "missing"), "runs", "--fix-stale"]))


# ----------------------------------------------------------------------------- 8. the fingerprint
@pytest.mark.slow
def test_a_logging_only_change_reruns_nothing_and_a_rerun_says_why_and_supersedes_the_old_run(
        root, tmp_path, capsys):
    from recontrast.config import NON_RESULT_KEYS
    from recontrast.study_results import study_results

    assert {"train.log_every", "eval.figures", "tracking.experiment"} <= NON_RESULT_KEYS
    path = study_file(tmp_path)
    # compare=False: notebook 04 after each batch is not what is tested here (test_notebooks)
    old = batch.run_study(path, executor=RealRuns(), compare=False).results[0].run_id
    client, runs = mlflow_client(), root / "experiments" / "runs"
    before = records(client), digest(runs)
    for change in ("train.log_every=7", "eval.figures=false", "eval.gif=false", "train.checkpoint_every=9",
                   "tracking.timeout_s=5", "data.cache=false"):
        again = RealRuns()
        batch.run_study(path, overrides=[change], executor=again, compare=False)
        assert again.jobs == [], change
    assert (records(client), digest(runs)) == before
    capsys.readouterr()

    rerun = RealRuns()
    report = batch.run_study(path, overrides=["train.iters=3", "train.log_every=7"], executor=rerun,
                             compare=False)
    out = capsys.readouterr().out
    assert "full/weave: running it again: its settings changed since it finished (train.iters: 2 -> 3)" in out
    new = report.results[0].run_id
    old_run = client.get_run(old)
    assert old_run.data.tags["superseded_by"] == new and "train.iters: 2 -> 3" in old_run.data.tags["superseded_reason"]
    assert "superseded_by" not in client.get_run(new).data.tags
    assert list(study_results("mini")["run_id"]) == [new]  # the replaced run is no duplicate pair

    forced = RealRuns()
    report = batch.run_study(path, overrides=["train.iters=3"], force=True, executor=forced, compare=False)
    assert "full/weave: running it again: --force" in capsys.readouterr().out
    assert client.get_run(new).data.tags["superseded_by"] == report.results[0].run_id


# ----------------------------------------------------------------------------- also seen
def test_the_seed_limit_is_the_same_in_every_message(synthetic_root, tmp_path):
    config = write_config(tmp_path, synthetic_root, CATEGORY)
    for key in ("train.seed", "eval.proxy_seed"):
        low = one_line(run_cli(["train", "--config", str(config), "--set", f"{key}=-1"]))
        high = one_line(run_cli(["train", "--config", str(config), "--set", f"{key}={2**32}"]))
        assert low.endswith(f"{key}=-1: must be in [0, 2147483648)"), low
        assert high.endswith(f"{key}={2**32}: must be below 2147483648"), high
    assert not (tmp_path / "runs").exists()


def test_int8_calibration_on_few_images_warns(synthetic_root):
    from recontrast.config import DataConfig
    from recontrast.infer import MIN_CALIBRATION_IMAGES, normal_batches

    cfg = DataConfig(root=str(synthetic_root), category=CATEGORY, image_size=64)
    with pytest.warns(RuntimeWarning, match=r"int8 calibration on 1 image\(s\) \(of 12 training images, 1 asked\)"):
        assert len(normal_batches(cfg, 64, n=1)) == 1
    with pytest.warns(RuntimeWarning, match=r"on 12 image\(s\) \(of 12 training images, 64 asked\): .*fewer than "
                                            rf"{MIN_CALIBRATION_IMAGES} images"):
        normal_batches(cfg, 64, n=64)  # the whole training set is too small


def test_a_train_folder_of_non_image_files_says_what_it_holds(synthetic_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root / CATEGORY, data / CATEGORY)
    good = data / CATEGORY / "train" / "good"
    shutil.rmtree(good)
    good.mkdir()
    for name in ("notes.txt", "labels.json", "scan.tiff.bak"):
        (good / name).write_text("x")
    config = write_config(tmp_path, data, CATEGORY)
    error = one_line(run_cli(["train", "--config", str(config), "--no-track"]))
    assert re.search(r"training folder '.*good' holds no image but 3 other entries \(labels\.json, notes\.txt, "
                     r"scan\.tiff\.bak\); it needs images", error), error
