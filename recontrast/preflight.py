"""Checks that run before any work: a device that exists, a run folder that can be resumed
with this config, and evaluation overrides the checkpoint can honour.

`recontrast.pipeline` calls them before it decodes data, builds a model or writes anything,
so a mistake costs one line instead of a training (docs/reliability.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recontrast.checkpoint import CheckpointError, load_checkpoint
from recontrast.config import Config, ConfigError
from recontrast.runtime import autocast_dtype, pick_device

# What shapes the weights: a resume with another value cannot load the checkpoint.
SHAPE_KEYS = ("model.backbone", "model.width_mult", "model.domain_adaptation")


def check_device(cfg: Config) -> torch.device:
    """Returns the training device; raises ConfigError when it (or train.precision on it) cannot work here."""
    device = pick_device(cfg.train.device)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={cfg.train.device} but this machine has {torch.cuda.device_count()} "
                          f"CUDA device(s); use train.device=cuda:0 or auto")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps is not None and mps.is_available()):
        raise ConfigError("train.device=mps but MPS is not available here; use train.device=auto")
    autocast_dtype(cfg.train.precision, device)  # fp16 off CUDA raises, naming the fix
    return device


def check_resumable(cfg: Config) -> None:
    """Raises unless <train.out>/last.ckpt exists, was trained with cfg's model shape and
    has fewer iterations than train.iters (else resuming would train nothing)."""
    last = Path(cfg.train.out) / "last.ckpt"
    if not last.is_file():
        raise CheckpointError(f"--resume: there is no {last} to continue from; "
                              f"train without --resume to start this run")
    done, stored = checkpoint_progress(last)
    flat = cfg.flatten()
    for key in SHAPE_KEYS:
        section, name = key.split(".")
        old = stored.get(section, {}).get(name)
        if old != flat[key]:
            raise ConfigError(f"--resume: {last} was trained with {key}={old}, this config has {flat[key]}, "
                              f"so its weights cannot continue; resume with {key}={old}, or train into "
                              f"another folder (--out)")
    if done >= cfg.train.iters:  # a finished run is reopened only to continue real work
        raise ConfigError(f"--resume: {last} already holds {done} iterations and train.iters={cfg.train.iters}: "
                          f"nothing to train, nothing was changed; give train.iters > {done} to continue it, or "
                          f"evaluate it: recontrast evaluate --checkpoint {last}")


def checkpoint_progress(path: Path) -> tuple[int, dict[str, Any]]:
    """Returns (completed iterations, config dict) of a checkpoint; memory-mapped: the weights
    are not read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        state = load_checkpoint(path)  # its error message says what is wrong with the file
    return int(state.get("iteration", 0)), state["config"]


# Settings fixed by the checkpoint (the model is rebuilt from its own config).
_TRAINED = ("model.", "loss.", "train.iters", "train.batch_size", "train.lr", "train.encoder_lr",
            "train.betas", "train.weight_decay", "train.eps", "train.seed", "train.stable",
            "train.reset_every", "train.encoder_pause", "train.select", "train.drop_last")


def check_evaluation_overrides(trained: dict[str, Any], cfg: Config) -> None:
    """Raises ConfigError when cfg changes a setting of `trained` (the checkpoint's flattened
    config) that the checkpoint fixes: the rebuilt model would silently ignore it."""
    ignored = [f"{k}={v}" for k, v in cfg.flatten().items() if trained[k] != v and k.startswith(_TRAINED)]
    if ignored:
        raise ConfigError(f"evaluate cannot change {', '.join(ignored)}: the model is rebuilt from the "
                          f"checkpoint's settings; only data.*, eval.*, tracking.*, train.device, "
                          f"train.threads and train.precision can change here (train a new model for the others)")
