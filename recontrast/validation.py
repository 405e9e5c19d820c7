"""Validation of a configuration: every key's type was checked when it was set (config.py);
here every value's range, every choice and the combinations that cannot work.

`validate(cfg)` runs when a config is loaded, so a bad value stops with one line naming the
key, the value and the fix, before any data is read or any model built.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts; the message names the fix."""


# The repr an error echoes is built by a bounded walk: a YAML alias structure (a list of
# lists of the same list, ...) has a full repr that grows tenfold per level; this one stops
# after 3 levels and 6 items per container, so its cost is bounded whatever the value.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 3, 60, 60
for _kind in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_SHOWN, _kind, 6)


def show(value: Any, limit: int = 60) -> str:
    """Returns repr(value), cut to `limit` characters: errors echo what was given, never all of
    it, and a container's repr is built by the bounded walk _SHOWN, never in full."""
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        text = _SHOWN.repr(value)
        return text if len(text) <= limit else f"{text[:limit]}..."
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def choices(cfg: Any) -> dict[str, tuple[str, ...]]:
    """Returns {dotted key: its choices} for every key of the config tree typed `Literal[...]`:
    the choices live on the config field (config.py), nowhere else. train.device is free-form."""
    return {f"{section.name}.{name}": typing.get_args(tp)
            for section in dataclasses.fields(cfg)
            for name, tp in typing.get_type_hints(type(getattr(cfg, section.name))).items()
            if typing.get_origin(tp) is Literal}


def check_level_weights(weights, name: str = "level_weights") -> None:
    """Raises ConfigError unless every weight is finite and >= 0 and at least one is > 0."""
    if any(not math.isfinite(w) or w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ConfigError(f"{name} must be >= 0 and not all 0, got {list(weights)}")


MAX_INT = 2**31 - 1  # every integer key (torch and numpy take it), the seeds included

# Ranges of the numeric keys: (low, high, low included, high included); None = unbounded.
# validate() checks every one, so nothing out of range reaches training or evaluation.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "data.val_fraction": (0, 1, True, False),
    "model.width_mult": (0, None, False, False),
    "model.bottleneck_pool": (1, 8, True, True),
    "loss.factor": (0, None, True, False),
    "loss.warmup_fraction": (0, 1, True, True),
    "loss.warmup_min_iters": (0, None, True, False),
    "train.iters": (1, None, True, False),
    "train.batch_size": (1, None, True, False),
    "train.lr": (0, None, False, False),
    "train.encoder_lr": (0, None, True, False),
    "train.betas": (0, 1, True, False),
    "train.weight_decay": (0, None, True, False),
    "train.eps": (0, None, False, False),
    "train.seed": (0, MAX_INT + 1, True, False),
    "train.threads": (0, None, True, False),
    "train.cache_features_gb": (0, None, False, False),
    "train.reset_every": (1, None, True, False),
    "train.encoder_pause": (0, None, True, False),
    "train.log_every": (0, None, True, False),
    "train.eval_every": (0, None, True, False),
    "train.checkpoint_every": (0, None, True, False),
    "train.divergence_window": (0, None, True, False),
    "train.pool_max_spread": (0, 1, True, True),
    "eval.sigma": (0, 64, True, True),
    "eval.topk": (0, 1, False, True),
    "eval.batch_size": (1, None, True, False),
    "eval.num_bins": (2, 2**24, True, True),
    "eval.pro_fpr_limit": (0, 1, False, True),
    "eval.threshold_quantile": (0, 1, True, True),
    "eval.proxy_seed": (0, MAX_INT + 1, True, False),
    "eval.proxy_copies": (1, 64, True, True),
    "tracking.timeout_s": (0, 86400, False, True),
}
# Keys that must not be empty: each names a file, a folder, a model or an MLflow experiment.
_REQUIRED = ("data.root", "data.category", "model.backbone", "model.pretrained", "train.out",
             "tracking.experiment")
_DEVICE = re.compile(r"(auto|cpu|mps|cuda|xpu)(:\d+)?")
MAX_IMAGE_SIZE = 4096


def _range_text(low, high, low_in: bool, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _in_range(value: float, low, high, low_in: bool, high_in: bool) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    above = value >= low if low_in else value > low
    below = high is None or (value <= high if high_in else value < high)
    return above and below


def validate(cfg: Any) -> Any:
    """Returns cfg (a config.Config) if every value is usable; raises ConfigError naming the
    key, the value and the fix otherwise. Covers every key, so a bad value stops here."""
    flat = cfg.flatten()
    for key, options in choices(cfg).items():
        if flat[key] not in options:
            raise ConfigError(f"{key}={show(flat[key])} is not one of {', '.join(options)}")
    for key in _REQUIRED:
        if not str(flat[key]).strip():
            raise ConfigError(f"{key} is empty; give it a value, or leave the key out for its default")
    for key, value in flat.items():  # integers fit torch and numpy; NaN/inf never train
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise ConfigError(f"{key}={show(value)}: must be below {MAX_INT + 1}")
    for key, value in flat.items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{key}={value}: must be a finite number")
    for key, (low, high, low_in, high_in) in _RANGES.items():
        values = flat[key] if isinstance(flat[key], (list, tuple)) else [flat[key]]
        for value in values:
            if not _in_range(value, low, high, low_in, high_in):
                shown = list(flat[key]) if isinstance(flat[key], (list, tuple)) else value
                each = "each value " if len(values) > 1 else ""
                raise ConfigError(f"{key}={shown}: {each}must be {_range_text(low, high, low_in, high_in)}")
    size = cfg.data.image_size
    if size <= 0 or size % 32 or size > MAX_IMAGE_SIZE:
        lo = min(max(32, size // 32 * 32), MAX_IMAGE_SIZE - 32)
        raise ConfigError(
            f"data.image_size={size} must be a positive multiple of 32 up to {MAX_IMAGE_SIZE} "
            f"(the encoder downsamples by 32); try {lo} or {lo + 32}"
        )
    if cfg.eval.num_bins % 2:
        raise ConfigError(f"eval.num_bins={cfg.eval.num_bins} must be even (the histogram doubles its "
                          f"bin width in halves); try {cfg.eval.num_bins + 1}")
    if not _DEVICE.fullmatch(cfg.train.device):
        raise ConfigError(f"train.device={show(cfg.train.device)} is not a device; use auto, cpu, cuda, "
                          f"cuda:<index> or mps")
    check_level_weights(cfg.eval.level_weights, "eval.level_weights")
    if cfg.train.select == "proxy":
        missing = [fix for bad, fix in ((cfg.train.eval_every <= 0, "train.eval_every > 0"),
                                        (cfg.data.val_fraction <= 0, "data.val_fraction > 0"),
                                        (not cfg.eval.proxy, "eval.proxy=true")) if bad]
        if missing:
            raise ConfigError(f"train.select=proxy chooses among evaluations of held-out images with "
                              f"synthetic defects: it needs {', '.join(missing)}")
    return cfg
