"""Runtime helpers every layer may use: the torch device, seeding, the project root, processes.

Nothing here knows about models, data or MLflow; `config` is the only package import.
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm.auto import tqdm  # a widget in notebooks, a text bar on a TTY

from recontrast.config import ConfigError


def pick_device(name: str) -> torch.device:
    """Returns the torch device for train.device ('auto' = cuda > mps > cpu)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; use train.device=auto")
    return device


def cpu_has_bf16() -> bool:
    """Returns whether this CPU runs bf16 matrix work natively (avx512_bf16 or AMX, as oneDNN sees it)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and torch.backends.mkldnn.is_available() and check())


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """Returns the autocast dtype of train.precision on `device` (None: fp32, no autocast);
    'auto' is bf16 where the device runs it natively, fp32 elsewhere."""
    kind = torch.device(device).type
    if precision == "auto":
        native = (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if kind == "cuda" else (
            kind == "cpu" and cpu_has_bf16())
        precision = "bf16" if native else "fp32"
    if precision == "fp16" and kind != "cuda":
        raise ConfigError(f"train.precision=fp16 needs CUDA (a gradient scaler keeps its small gradients); "
                          f"use train.precision=bf16, auto or fp32 on {kind}")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(precision: str, device: torch.device | str):
    """Returns the autocast context of train.precision on `device` (a no-op for fp32)."""
    dtype = autocast_dtype(precision, device)
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype, enabled=dtype is not None)


def seed_everything(seed: int) -> None:
    """Seeds python's random, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


ROOT_ENV = "RECONTRAST_ROOT"  # the project root, when given (`recontrast --root`)
_told: set[tuple[str, str]] = set()


def package_checkout() -> Path | None:
    """Returns the checkout the running package comes from, or None for an installed wheel."""
    repo = Path(__file__).resolve().parents[1]
    return repo if (repo / "pyproject.toml").is_file() else None


def project_root() -> Path:
    """Returns where runs, the MLflow store and relative data paths live: $RECONTRAST_ROOT,
    else the recontrast checkout that holds the working directory (a notebook runs from its
    notebooks/ folder), else the working directory itself. Never the package's own checkout
    for its own sake: a second clone (or worktree) sharing a virtual environment keeps its
    runs. Says so in one line (stderr, once) when this root is not the package's checkout."""
    given = os.environ.get(ROOT_ENV, "").strip()
    if given:
        root, why = Path(given).expanduser().resolve(), f"${ROOT_ENV}"
    else:
        cwd = Path.cwd().resolve()
        root = next((p for p in (cwd, *cwd.parents) if (p / "pyproject.toml").is_file() and (p / "recontrast").is_dir()),
                    cwd)
        why = "the working directory"
    package = package_checkout()
    if package is not None and package != root and (str(root), str(package)) not in _told:
        _told.add((str(root), str(package)))
        print(f"recontrast: project root {root} ({why}); the package runs from {package}: runs, the MLflow "
              f"store and artifacts go under {root} (--root or ${ROOT_ENV} to choose)", file=sys.stderr, flush=True)
    return root


def notebook_folder() -> Path:
    """Returns the notebooks/ the batch executes: the project root's, else the package checkout's."""
    here = project_root() / "notebooks"
    package = package_checkout()
    return here if here.is_dir() or package is None else package / "notebooks"


def process_start(pid: int) -> str:
    """Returns the process's start time as a string (psutil's create_time), or '' if it is gone."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def process_identity() -> dict[str, str]:
    """Returns this process's pid, host and start time: what a stale-run check compares."""
    return {"pid": str(os.getpid()), "hostname": socket.gethostname(), "process_start": process_start(os.getpid())}


def process_alive(pid: int, start: str = "") -> bool:
    """Returns True if process `pid` runs on this host, is no zombie, and (if given) started at `start`.

    The start time tells a reused pid from the original process.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not start or process_start(pid) == start
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # another user's process: alive


@contextlib.contextmanager
def environment(**values: str | None):
    """Sets environment variables (None: removes one) while the block runs, then restores
    them; a process started in the block (a notebook kernel, a spawned worker) inherits them."""
    before = {k: os.environ.get(k) for k in values}

    def put(items) -> None:
        for k, v in items:
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        put(values.items())
        yield
    finally:
        put(before.items())


# Set by `recontrast batch` for the notebooks it executes: their widgets never reach the
# console, so training prints its progress lines there too (progress_lines).
PROGRESS_LINES_ENV = "RECONTRAST_PROGRESS_LINES"


def progress_lines(bar) -> bool:
    """Returns whether a loop should print its own progress lines besides `bar`: when the bar
    shows nothing (no terminal, no notebook) or the output is read elsewhere (batch)."""
    return bool(bar.disable) or os.environ.get(PROGRESS_LINES_ENV) == "1"


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, shown: bool = True, leave: bool = True):
    """Returns a tqdm bar: a live widget in a notebook (papermill included), a text bar on a
    terminal, disabled otherwise (a log file, nohup; `bar.disable` then tells the caller to
    print its own lines) or when not `shown`."""
    in_notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                disable=True if not shown else False if in_notebook else None)
