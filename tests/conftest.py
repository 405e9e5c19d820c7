"""Shared fixtures and helpers: a tiny synthetic dataset, the real MVTec AD copy (when
present), one torch thread per test, MLflow stores and the reliability tests' CLI helpers.

Test modules import the plain helpers and constants with `from conftest import ...`.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from recontrast import synthetic

REPO = Path(__file__).resolve().parents[1]

# What `synthetic_root` holds: every category at 64 px.
SYNTH = dict(size=64, n_train=12, n_test_good=6, n_test_defect=3, seed=0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Returns the root of a tiny synthetic MVTec-layout dataset (all categories, see SYNTH).

    Shared by the whole session: tests must not write into it (copy it first).
    """
    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), **SYNTH)


class TinyModel(NamedTuple):
    checkpoint: Path  # calibrated (evaluated once); copy it before writing into it
    evaluation: Any  # the EvalResult that calibrated it
    datasets: Any  # data.Datasets: train, val, test


@pytest.fixture(scope="session")
def tiny_model(synthetic_root, tmp_path_factory) -> TinyModel:
    """Returns one tiny trained and calibrated model for the whole session: resnet18 from
    scratch, 64 px, synthetic 'disc', 2 iterations of batch 4, a quarter of train/good held
    out. Trained once, not once per test module: tests must not write into its folder."""
    import warnings

    from recontrast.config import Config, apply_overrides
    from recontrast.data import build_datasets
    from recontrast.pipeline import run_evaluation
    from recontrast.train import train

    run = tmp_path_factory.mktemp("tiny_model")
    cfg = apply_overrides(Config(), {
        "data.root": str(synthetic_root), "data.category": "disc", "data.image_size": 64,
        "data.val_fraction": 0.25, "model.backbone": "resnet18", "model.pretrained": "none",
        "train.iters": 2, "train.batch_size": 4, "train.log_every": 0, "train.threads": 0,
        "train.out": str(run), "tracking.enabled": False, "eval.figures": False, "eval.gif": False,
    })
    datasets = build_datasets(cfg.data)
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two iterations do not converge, and say so
        ckpt = train(cfg, datasets=datasets).checkpoint
        evaluation = run_evaluation(ckpt, out=run / "eval", track=False)
    return TinyModel(ckpt, evaluation, datasets)


@pytest.fixture(scope="session")
def real_mvtec_root() -> Path:
    """Returns ../shared/data/mvtec_ad_256 (MVTec AD resized to 256 px) or skips."""
    root = (REPO / ".." / "shared" / "data" / "mvtec_ad_256").resolve()
    if not root.is_dir():
        pytest.skip(f"real MVTec AD copy not found at {root}")
    return root


# ----------------------------------------------------------------------------- threads
@contextlib.contextmanager
def one_thread():
    """Runs the block on one torch thread, then restores the process-wide thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    """Runs each test on one torch thread and restores the count afterwards.

    Tiny 64 px models run as fast on one thread, without oversubscribing shared CPUs;
    train.threads changes the process-wide count, so restore it. Module-scoped fixtures
    are set up before this one: the ones that train wrap their work in `one_thread()`.
    """
    with one_thread():
        yield


# ----------------------------------------------------------------------------- MLflow
def empty_store(tmp_path_factory, folder: Path) -> str:
    """Returns the URI of a fresh sqlite store in `folder`: a copy of one made per session
    (MLflow takes seconds to create its tables, a copy takes none)."""
    template = tmp_path_factory.getbasetemp() / "mlflow_template.db"
    if not template.exists():
        from mlflow import MlflowClient

        MlflowClient(f"sqlite:///{template}").search_experiments()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, folder / "mlflow.db")
    return f"sqlite:///{folder}/mlflow.db"


@pytest.fixture(scope="module")
def _store_uri(tmp_path_factory) -> str:
    """Returns one sqlite MLflow store for the module: a copy of the session's empty store."""
    return empty_store(tmp_path_factory, tmp_path_factory.mktemp("mlruns"))


@pytest.fixture
def store(_store_uri, monkeypatch) -> str:
    """Returns the URI of the module's sqlite MLflow store, which the CLI (and its children)
    use in this test; tests tell their runs apart by the run folder (param train.out).

    tests/test_batch.py overrides it with a fresh store per test.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _store_uri)
    return _store_uri


# ----------------------------------------------------------------------------- CLI
def write_config(folder: Path, root: Path, category: str, **sections) -> Path:
    """Writes `folder`/config.yaml, a tiny training config (resnet18 from scratch, 64 px,
    batch 2, 2 iterations, one thread) updated section by section, and returns its path."""
    data = {
        "data": {"root": str(root), "category": category, "image_size": 64, "val_fraction": 0.0},
        "model": {"backbone": "resnet18", "pretrained": "none"},
        "train": {"iters": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "threads": 1},
        "eval": {"figures": False, "gif": False},
        "tracking": {"experiment": "reliability"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(argv: list[str]) -> str | None:
    """Returns the message `recontrast ...` exits with (None when it succeeds)."""
    from recontrast import cli

    try:
        cli.main(argv)
    except SystemExit as exit_:
        assert isinstance(exit_.code, str), f"exit code {exit_.code!r}, not a message"
        return exit_.code
    return None


def killed_run(experiment: str) -> str:
    """Returns the id of a run whose process was SIGKILLed while it ran (left RUNNING), logged
    to the store $MLFLOW_TRACKING_URI names: what `recontrast runs --fix-stale` must repair."""
    import os
    import signal
    import subprocess
    import sys

    code = ("from recontrast import tracking; from recontrast.config import load_config\n"
            f"ctx = tracking.start_run(load_config(None, ['tracking.experiment={experiment}']))\n"
            "print(ctx.__enter__().run_id, flush=True)\n"
            "import time; time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    run_id = proc.stdout.readline().strip()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return run_id
