"""Checkpoint files: atomic writes, safe reads (`weights_only=True`), RNG and training state.

This module never imports the model: `recontrast.model.load_model` rebuilds one from a file.

Format (a `torch.save`d dict, see docs/architecture.md):
{"format": "recontrast-ckpt-v1", "model": state_dict, "optimizers": [decoder_sd, encoder_sd],
 "iteration": int, "config": cfg.to_dict(), "rng": rng_state(), "loss_history": [float],
 "calibration": {}, "scaler": GradScaler state}. Everything in it is a tensor or a plain
Python value, so it loads with `weights_only=True`: a checkpoint can never run code.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recontrast.config import PLACEMENT_KEYS

FORMAT = "recontrast-ckpt-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and the fix."""


def rng_state() -> dict[str, Any]:
    """Returns torch/CUDA/python/numpy RNG states as tensors and plain lists (weights_only-safe)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(keys), gauss],
        "numpy": [name, np_keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state()` returned (CUDA states only where the devices exist)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def training_state(cfg, model, optimizers, scaler, iteration: int, loss_history) -> dict[str, Any]:
    """Returns the checkpoint dict of a training run after `iteration` completed steps."""
    return {"format": FORMAT, "model": model.state_dict(), "iteration": iteration,
            "optimizers": [o.state_dict() for o in optimizers], "config": cfg.to_dict(),
            "rng": rng_state(), "loss_history": list(loss_history), "calibration": {},
            "scaler": scaler.state_dict()}


def restore_training_state(ckpt: dict[str, Any], model, optimizers, scaler) -> None:
    """Loads model, optimizer, grad-scaler and RNG states from `ckpt` (resume): the live weights,
    where a finished run with train.ema keeps its average as "model" and them as "live_model"."""
    model.load_state_dict(ckpt.get("live_model") or ckpt["model"])
    if len(optimizers) != len(ckpt["optimizers"]):
        raise CheckpointError(f"the checkpoint holds {len(ckpt['optimizers'])} optimizer state(s) "
                              f"but this config trains with {len(optimizers)} (model.domain_adaptation changed?)")
    for opt, state in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(state)
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])


def config_changes(stored: dict[str, Any], cfg) -> list[str]:
    """Returns 'key: old -> new' for settings that differ from a checkpoint's stored config
    (run length, logging, output, device, evaluation and tracking may change on resume)."""
    # a key newer than the checkpoint had its default value then
    old = {**type(cfg)().flatten(), **{f"{s}.{k}": v for s, sub in stored.items() for k, v in sub.items()}}
    free = (*PLACEMENT_KEYS, "train.iters", "train.log_every", "train.eval_every", "train.checkpoint_every",
            "train.divergence_window", "train.bn_fallback", "train.pool_fallback", "train.pool_max_spread",
            "eval.", "tracking.")  # the fallbacks: after the end; the spread: bottleneck_pool says what it chose
    return [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in cfg.flatten().items()
            if not k.startswith(free) and old.get(k) != v]


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Returns `path` after writing `ckpt` atomically (temp file, fsync, rename).

    A crash, a full disk or a read-only folder leaves the previous file at `path` intact.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except Exception as err:
        kept = " (the previous checkpoint there is unchanged)" if path.exists() else ""
        raise CheckpointError(
            f"could not write checkpoint {path}: {type(err).__name__}: {err}. "
            f"Check that the folder {path.parent} is writable and the disk has space{kept}"
        ) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """Returns torch.load(path) with weights_only=True; refuses anything that would run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError,
            AttributeError, ImportError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        # torch's message ends by suggesting weights_only=False: bad advice for an untrusted file.
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation",
                       "(1) ", "In PyTorch 2.6", "WeightsUnpickler", "Re-running")
        lines = [s.strip() for s in str(err).splitlines() if s.strip() and not s.strip().startswith(boilerplate)]
        reason = " ".join(lines) or type(err).__name__
        raise CheckpointError(
            f"refused to load '{path}': it is not a recontrast checkpoint or state_dict that "
            f"loads with weights_only=True (files that would run code when unpickled are "
            f"never loaded). Only recontrast checkpoints/state_dicts are accepted. "
            f"Reason: {reason}"
        ) from None


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Returns the checkpoint dict at `path`, read with `weights_only=True` (never runs code)."""
    path = Path(path)
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
        hint = f"; found: {', '.join(found)}" if found else ""
        raise CheckpointError(f"no checkpoint file '{path}'{hint}")
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = ckpt.get("format", "a dict without 'format'") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"'{path}' is not a recontrast checkpoint (expected format '{FORMAT}', got {what!r}); "
            f"a plain backbone state_dict goes to model.pretrained=<path> instead"
        )
    return ckpt


def final_checkpoint(folder: str | Path) -> Path:
    """Returns the checkpoint a training run in `folder` ended with: best.ckpt when it chose its
    weights by proxy metric (train.select=proxy), else last.ckpt."""
    folder = Path(folder)
    return folder / "best.ckpt" if (folder / "best.ckpt").is_file() else folder / "last.ckpt"
