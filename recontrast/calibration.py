"""Calibration: thresholds from scores, and the one display scale every map and score uses.

`threshold_f1` is F1-optimal on the test set (optimistic: it has seen the defects);
`threshold_normal` is a quantile of held-out good images' scores (what a deployment without
defect examples can do). Scores and maps are shown on ONE fixed scale,

    scaled = 0.5 * (raw - map_offset) / (threshold - map_offset)

so the threshold reads 0.5 and map_offset (the typical raw level of a normal image's map)
reads 0. Never per-image min-max: that stretches a calm normal image to full alarm.
Where the image score comes from another map than the one shown (eval.score_combine), the two
are on different scales: the map gets its own threshold, map_threshold (the same quantile of
the held-out good images' map maxima), and scores are scaled without an offset
(`display_scales`).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from recontrast.anomaly_map import separate_score
from recontrast.config import EvalConfig

FORMULA = "normalised = 0.5 * (raw - map_offset) / (threshold - map_offset); displays clip to [0, 1]"


THRESHOLD_KEYS = ("threshold_f1", "threshold_normal")


def is_calibrated(calibration: dict[str, Any] | None) -> bool:
    """Returns whether a checkpoint's calibration holds a threshold (it was evaluated)."""
    return any((calibration or {}).get(k) is not None for k in THRESHOLD_KEYS)


def threshold_scale(raw, threshold: float, offset: float = 0.0):
    """Returns `raw` (score, map; array or tensor) on the fixed scale where threshold -> 0.5.

    Monotone, so normalised > 0.5 iff raw > threshold. An offset at or above the threshold
    (a user's custom low threshold) is dropped: the scale becomes 0.5 * raw / threshold.
    """
    if not threshold > offset:
        offset = 0.0
    return 0.5 * (raw - offset) / max(threshold - offset, 1e-12)


def pick_threshold(calibration: dict[str, Any], choice: str | float | None = None) -> tuple[str, float]:
    """Returns (name, raw threshold) for choice "normal", "f1", a number, or None (default)."""
    if isinstance(choice, (int, float)) and not isinstance(choice, bool):
        return "custom", float(choice)
    if isinstance(choice, str) and choice not in ("normal", "f1"):
        try:
            return "custom", float(choice)
        except ValueError:
            raise ValueError(f"threshold must be 'normal', 'f1' or a number, got {choice!r}") from None
    name = choice or calibration.get("default", "normal")
    value = calibration.get(f"threshold_{name}")
    if value is None:
        other = "f1" if name == "normal" else "normal"
        if calibration.get(f"threshold_{other}") is None:
            raise ValueError("the checkpoint holds no calibrated threshold; run `recontrast "
                             "evaluate` first to calibrate a threshold, or pass a number")
        warnings.warn(f"no '{name}' threshold in the calibration; using '{other}' instead", stacklevel=2)
        name, value = other, calibration[f"threshold_{other}"]
    return name, float(value)


def _quantile(values, q: float) -> float | None:
    values = np.asarray(values, np.float64)
    return float(np.quantile(values, q)) if len(values) else None


def calibrate(threshold_f1: float, normal_scores, normal_map_means, eval_cfg: EvalConfig,
              normal_source: str, image_size: int, normal_map_maxima=None) -> dict[str, Any]:
    """Returns the calibration dict stored in the checkpoint (plain floats and strings).

    threshold_f1: from metrics.image_metrics (NaN when undefined); normal_scores,
    normal_map_means and normal_map_maxima: image scores, mean and largest map values of good
    images (the maxima are read only where the score comes from another map, eval.score_combine:
    they give the map its own threshold, "map_threshold").
    """
    f1 = float(threshold_f1)
    t_normal = _quantile(normal_scores, eval_cfg.threshold_quantile)
    thresholds = {"f1": None if math.isnan(f1) else float(f1), "normal": t_normal}
    # The typical level of a normal map reads 0; kept well below every threshold of the map.
    separate = separate_score(eval_cfg)
    map_threshold = _quantile(normal_map_maxima if normal_map_maxima is not None else [],
                              eval_cfg.threshold_quantile) if separate else None
    positive = [t for t in ([map_threshold] if separate else thresholds.values()) if t is not None and t > 0]
    offset = float(np.median(normal_map_means)) if len(normal_map_means) else 0.0
    offset = max(0.0, min(offset, 0.5 * min(positive))) if positive else 0.0
    return {
        "threshold_f1": thresholds["f1"],
        "threshold_normal": thresholds["normal"],
        "default": "normal" if thresholds["normal"] is not None else "f1",
        "map_offset": offset,
        **({"map_threshold": map_threshold} if separate else {}),
        "formula": FORMULA,
        "quantile": float(eval_cfg.threshold_quantile),
        "normal_source": normal_source,
        "n_normal": int(len(np.asarray(normal_scores))),
        "image_size": int(image_size),
        "eval": {"combine": eval_cfg.combine, "score_combine": eval_cfg.score_combine,
                 "sigma": float(eval_cfg.sigma), "score": eval_cfg.score, "topk": float(eval_cfg.topk),
                 "level_weights": [float(w) for w in eval_cfg.level_weights]},
    }


def display_scales(calibration: dict[str, Any], threshold: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Returns ((threshold, offset) of the scores, (threshold, offset) of the maps) for
    threshold_scale, given the image-score `threshold` in use. One and the same pair where the
    score is the map's maximum; with a calibration's own "map_threshold" (eval.score_combine),
    the map is scaled by it and the scores, on another scale than map_offset, by no offset."""
    offset = float(calibration.get("map_offset", 0.0))
    map_threshold = calibration.get("map_threshold")
    if map_threshold is None:
        return (threshold, offset), (threshold, offset)
    return (threshold, 0.0), (float(map_threshold), offset)


def midpoint_below(threshold: float, scores: np.ndarray) -> float:
    """Returns the midpoint between `threshold` (a test score; image_metrics flags score >=
    it) and the next lower score: the same test-set F1 under the strict `score > t` rule
    used everywhere here, with a margin on both sides for unseen images."""
    if math.isnan(threshold):
        return threshold
    below = scores[scores < threshold]
    return float((threshold + below.max()) / 2) if len(below) else float(np.nextafter(threshold, -np.inf))
