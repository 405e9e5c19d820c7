"""Evaluation: metrics, per-image scores, figures and the calibration a checkpoint keeps.

`evaluate(model, dataset, cfg.eval, out_dir)` runs batched inference once over the test set.
Pixel metrics are streamed into `metrics.PixelMetrics` (no map is kept); besides the image
scores only a bounded sample survives for the figures: the K worst-ranked images (highest-
scoring good, lowest-scoring defects) and at most `max_frames` down-sampled GIF frames.

Calibration: `threshold_f1` (F1-optimal on the test set: optimistic, it has seen the
defects) and `threshold_normal` (a quantile of the held-out good images' scores: what a
deployment without defect examples can do). Scores and maps are shown on ONE fixed scale,

    normalised = 0.5 * (raw - map_offset) / (threshold - map_offset)

so the threshold reads 0.5 and map_offset (the typical raw level of a normal image's map)
reads 0. Never per-image min-max: that stretches a calm normal image to full alarm.
"""
from __future__ import annotations

import heapq
import json
import logging
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from recontrast.anomaly_map import image_score, maps_for
from recontrast.config import EvalConfig
from recontrast.metrics import PixelMetrics, compute_all

log = logging.getLogger(__name__)

FORMULA = "normalised = 0.5 * (raw - map_offset) / (threshold - map_offset); displays clip to [0, 1]"
GALLERY_K = 4  # worst-ranked good and defect images each
MAX_FRAMES = 24  # GIF frames per category
PANEL = 128  # side of a GIF panel / gallery image, pixels


@dataclass
class EvalResult:
    metrics: dict[str, float]  # flat; image_*, pixel_*, aupro, image_auroc_<defect type>
    records: list[dict[str, Any]]  # one per image: path, defect_type, label, score
    figures: dict[str, Path] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    pixel_error_bounds: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """Returns the metrics as an aligned two-column text table (values in %)."""
        width = max(map(len, self.metrics), default=6)
        rows = [f"{'metric':<{width}}  value"]
        for k, v in self.metrics.items():
            rows.append(f"{k:<{width}}  {'n/a' if v is None or math.isnan(v) else f'{100 * v:6.2f}'}")
        return "\n".join(rows)


# --- calibration ---------------------------------------------------------------------------

def normalise(raw, threshold: float, offset: float = 0.0):
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


def calibrate(threshold_f1: float, normal_scores, normal_map_means, eval_cfg: EvalConfig,
              normal_source: str, image_size: int) -> dict[str, Any]:
    """Returns the calibration dict stored in the checkpoint (plain floats and strings).

    threshold_f1: from metrics.image_metrics (NaN when undefined); normal_scores and
    normal_map_means: image scores and mean map values of good images.
    """
    f1 = float(threshold_f1)
    normal = np.asarray(normal_scores, np.float64)
    t_normal = float(np.quantile(normal, eval_cfg.threshold_quantile)) if len(normal) else math.nan
    thresholds = {"f1": None if math.isnan(f1) else float(f1),
                  "normal": None if math.isnan(t_normal) else t_normal}
    # The typical level of a normal map reads 0; kept well below every threshold.
    positive = [t for t in thresholds.values() if t is not None and t > 0]
    offset = float(np.median(normal_map_means)) if len(normal_map_means) else 0.0
    offset = max(0.0, min(offset, 0.5 * min(positive))) if positive else 0.0
    return {
        "threshold_f1": thresholds["f1"],
        "threshold_normal": thresholds["normal"],
        "default": "normal" if thresholds["normal"] is not None else "f1",
        "map_offset": offset,
        "formula": FORMULA,
        "quantile": float(eval_cfg.threshold_quantile),
        "normal_source": normal_source,
        "n_normal": int(len(normal)),
        "image_size": int(image_size),
        "eval": {"combine": eval_cfg.combine, "sigma": float(eval_cfg.sigma),
                 "score": eval_cfg.score, "topk": float(eval_cfg.topk)},
    }


# --- inference loop ------------------------------------------------------------------------

def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def iterate_maps(model: nn.Module, dataset, eval_cfg: EvalConfig, device: torch.device | None = None):
    """Yields (batch dict, maps (B, 1, S, S), scores (B,)) over `dataset`, on the model's device."""
    device = torch.device(device) if device is not None else _device_of(model)
    model.eval()
    loader = DataLoader(dataset, batch_size=eval_cfg.batch_size, shuffle=False, num_workers=0,
                        pin_memory=device.type == "cuda")
    pairs_of = getattr(model, "anomaly_pairs", model)  # ReContrast's eval-mode, no-grad forward
    with torch.inference_mode():
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            maps = maps_for(pairs_of(x), x.shape[-2:], eval_cfg)
            yield batch, maps, image_score(maps, eval_cfg.score, eval_cfg.topk)


def score_dataset(model: nn.Module, dataset, eval_cfg: EvalConfig,
                  device=None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image scores, per-image mean map value), each (N,) float64."""
    scores, means = [], []
    for _, maps, s in iterate_maps(model, dataset, eval_cfg, device):
        scores.append(s.double().cpu())
        means.append(maps.double().mean(dim=(1, 2, 3)).cpu())
    if not scores:
        return np.zeros(0), np.zeros(0)
    return torch.cat(scores).numpy(), torch.cat(means).numpy()


class _FigureSamples:
    """Keeps, in bounded memory, what the figures need: worst-ranked images and GIF frames."""

    def __init__(self, n_images: int, k: int = GALLERY_K, max_frames: int = MAX_FRAMES):
        self.k, self.stride = k, max(1, math.ceil(n_images / max_frames))
        self.good: list = []  # min-heap of (score, i, sample): the k highest-scoring good
        self.defect: list = []  # min-heap of (-score, i, sample): the k lowest-scoring defects
        self.frames: list[dict[str, Any]] = []

    @staticmethod
    def _sample(image, raw_map, mask, score, label, defect_type, path) -> dict[str, Any]:
        import torch.nn.functional as F

        from recontrast.plots import denormalize

        side = min(PANEL, image.shape[-1])
        small = lambda t, mode: F.interpolate(t[None].float(), size=(side, side), mode=mode)[0]  # noqa: E731
        return {"image": denormalize(small(image, "bilinear")),
                "map": small(raw_map, "bilinear")[0].cpu().numpy().astype(np.float32),
                "mask": None if mask is None else small(mask, "nearest")[0].cpu().numpy() > 0.5,
                "score": score, "label": label, "defect_type": defect_type, "path": path}

    def add(self, i: int, image, raw_map, mask, score: float, label: int, defect_type: str,
            path: str) -> None:
        make = lambda: self._sample(image, raw_map, mask, score, label, defect_type, path)  # noqa: E731
        heap, key = (self.good, score) if label == 0 else (self.defect, -score)
        if len(heap) < self.k:
            heapq.heappush(heap, (key, i, make()))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, i, make()))
        if i % self.stride == 0:
            self.frames.append(make())

    def worst(self) -> list[dict[str, Any]]:
        """Returns the worst good images (highest first), then the worst defects (lowest first)."""
        good = [s for _, _, s in sorted(self.good, key=lambda e: -e[0])]
        defect = [s for _, _, s in sorted(self.defect, key=lambda e: -e[0])]
        return good + defect


# --- evaluate ------------------------------------------------------------------------------

def evaluate(
    model: nn.Module,
    dataset,
    eval_cfg: EvalConfig,
    out_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    val_dataset=None,
) -> EvalResult:
    """Returns metrics, per-image scores, figure paths and calibration for `dataset`.

    dataset: test split (items image (3,S,S), mask (1,S,S), label, defect_type, path);
    val_dataset: held-out good images for threshold_normal (None: the test set's good
    images stand in, flagged as normal_source="test_good"). With `out_dir`, writes
    metrics.json, per_image.csv, calibration.json and (per eval_cfg) figures and a GIF.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    has_masks = bool(getattr(dataset, "has_masks", True))
    figures_wanted = out_dir is not None and (eval_cfg.figures or eval_cfg.gif)
    pixel = PixelMetrics(eval_cfg.num_bins, eval_cfg.pro_fpr_limit) if has_masks else None
    samples = _FigureSamples(len(dataset)) if figures_wanted else None

    records: list[dict[str, Any]] = []
    map_means: list[float] = []
    image_size = 0
    for batch, maps, scores in iterate_maps(model, dataset, eval_cfg, device):
        image_size = maps.shape[-1]
        masks = batch["mask"] if has_masks else None
        if pixel is not None:
            pixel.update(maps, masks)
        means = maps.mean(dim=(1, 2, 3)).double().cpu().tolist()
        for j, score in enumerate(scores.double().cpu().tolist()):
            rec = {"path": str(batch["path"][j]), "defect_type": str(batch["defect_type"][j]),
                   "label": int(batch["label"][j]), "score": score}
            if samples is not None:
                samples.add(len(records), batch["image"][j], maps[j],
                            None if masks is None else masks[j], score, rec["label"],
                            rec["defect_type"], rec["path"])
            records.append(rec)
            map_means.append(means[j])
    if not records:
        raise ValueError("the test dataset is empty: nothing to evaluate")

    scores = np.asarray([r["score"] for r in records])
    labels = np.asarray([r["label"] for r in records])
    types = [r["defect_type"] for r in records]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*need both.*")
        metrics = compute_all(scores, labels, types, pixel)

    if val_dataset is not None and len(val_dataset) > 0:
        normal_scores, normal_means = score_dataset(model, val_dataset, eval_cfg, device)
        source = "val"
    else:
        good = labels == 0
        normal_scores, normal_means = scores[good], np.asarray(map_means)[good]
        source = "test_good"
        # Said once per `recontrast evaluate`, not at every evaluation during training.
        (log.warning if out_dir is not None else log.debug)(
            "no held-out good images (data.val_fraction=0?): threshold_normal comes from the "
            "test set's good images, which makes it optimistic")
    threshold_f1 = _midpoint_below(metrics.pop("image_f1_threshold"), scores)
    calibration = calibrate(threshold_f1, normal_scores, normal_means, eval_cfg, source, image_size)
    if calibration["threshold_normal"] is not None and len(set(labels.tolist())) == 2:
        pred = scores > calibration["threshold_normal"]
        tp = float((pred & (labels == 1)).sum())
        metrics["image_f1_at_normal"] = 2 * tp / max(pred.sum() + (labels == 1).sum(), 1)

    try:
        (name, threshold), calibrated = pick_threshold(calibration), True
    except ValueError:  # e.g. a test set of one class and no held-out good images:
        # the figures still need one fixed scale; the records say "not calibrated".
        name, threshold, calibrated = "uncalibrated (max score)", float(np.max(scores)), False
    for r in records:
        r["score_normalised"] = normalise(r["score"], threshold, calibration["map_offset"]) if calibrated else math.nan
        r["anomalous"] = int(r["score"] > threshold) if calibrated else -1

    result = EvalResult(metrics=metrics, records=records, calibration=calibration,
                        pixel_error_bounds=pixel.error_bounds() if pixel is not None else {})
    if out_dir is not None:
        result.out_dir = Path(out_dir)
        _write_outputs(result, samples, eval_cfg, getattr(dataset, "category", None) or "dataset",
                       (name, threshold))
    return result


def _midpoint_below(threshold: float, scores: np.ndarray) -> float:
    """Returns the midpoint between `threshold` (a test score; image_metrics flags score >=
    it) and the next lower score: the same test-set F1 under the strict `score > t` rule
    used everywhere here, with a margin on both sides for unseen images."""
    if math.isnan(threshold):
        return threshold
    below = scores[scores < threshold]
    return float((threshold + below.max()) / 2) if len(below) else float(np.nextafter(threshold, -np.inf))


def _write_outputs(result: EvalResult, samples: _FigureSamples | None, eval_cfg: EvalConfig,
                   category: str, chosen: tuple[str, float]) -> None:
    """Writes metrics.json, calibration.json, per_image.csv and the figures to result.out_dir."""
    import csv

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
             for k, v in result.metrics.items()}
    (out / "metrics.json").write_text(json.dumps(clean, indent=2) + "\n")
    (out / "calibration.json").write_text(json.dumps(result.calibration, indent=2) + "\n")
    with open(out / "per_image.csv", "w", newline="") as f:
        cols = ["path", "defect_type", "label", "score", "score_normalised", "anomalous"]
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.records)
    if samples is None:
        return
    from recontrast import plots

    name, threshold = chosen
    offset = result.calibration["map_offset"]
    scale = lambda m: np.clip(normalise(m, threshold, offset), 0.0, 1.0)  # noqa: E731
    scores = [r["score"] for r in result.records]
    labels = [r["label"] for r in result.records]
    types = [r["defect_type"] for r in result.records]
    figs = result.figures
    if eval_cfg.figures:
        figs["roc_pr"] = out / "roc_pr.png"
        plots.roc_pr_curves(scores, labels, figs["roc_pr"], title=category, metrics=result.metrics)
        figs["histogram"] = out / "score_histogram.png"
        thresholds = {f"{k} threshold": result.calibration[f"threshold_{k}"] for k in ("f1", "normal")}
        plots.score_histograms(scores, labels, types, figs["histogram"], thresholds=thresholds,
                               title=f"{category}: image scores")
        worst = samples.worst()
        figs["gallery"] = out / "worst_gallery.png"
        plots.heatmap_gallery(
            [s["image"] for s in worst], [scale(s["map"]) for s in worst], [s["mask"] for s in worst],
            [f"{s['defect_type']} score {normalise(s['score'], threshold, offset):.2f}\n"
             f"{Path(s['path']).name}" for s in worst],
            figs["gallery"], suptitle=f"{category}: worst-ranked ({name} threshold = 0.5)")
    if eval_cfg.gif and samples.frames:
        frames = [plots.triptych(s["image"], scale(s["map"]), s["mask"],
                                 f"{s['defect_type']} {normalise(s['score'], threshold, offset):.2f}")
                  for s in samples.frames]
        figs["gif"] = plots.make_gif(frames, out / f"{category}.gif")


def make_eval_fn(dataset, eval_cfg: EvalConfig, val_dataset=None) -> Callable[[nn.Module, int], dict]:
    """Returns eval_fn(model, iteration) -> metrics dict, for evaluation during training
    (no files, no figures; the training loop restores train mode afterwards).
    """

    def eval_fn(model: nn.Module, iteration: int) -> dict[str, float]:
        result = evaluate(model, dataset, eval_cfg, out_dir=None, val_dataset=val_dataset)
        return dict(result.metrics)

    return eval_fn


# --- the `recontrast evaluate` command -----------------------------------------------------

def main_evaluate(
    checkpoint: str | Path,
    data_root: str | None = None,
    category: str | None = None,
    out: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    track: bool = True,
) -> EvalResult:
    """Returns the EvalResult of `recontrast evaluate`; stores the calibration in the checkpoint.

    The test (and held-out val) datasets are rebuilt from the checkpoint's config, with
    data.root / data.category replaced when given. Calibration is written back (atomically)
    only when the category is the one the model was trained on.
    """
    from recontrast.checkpoint import load_model, save_checkpoint
    from recontrast.config import apply_overrides, validate
    from recontrast.data import build_datasets
    from recontrast.train import pick_device

    checkpoint = Path(checkpoint)
    model, cfg, ckpt = load_model(checkpoint, "cpu")
    trained_category = cfg.data.category
    apply_overrides(cfg, overrides)
    if data_root is not None:
        cfg.data.root = str(data_root)
    if category is not None:
        cfg.data.category = category
    validate(cfg)
    device = pick_device(cfg.train.device)
    model.to(device).eval()
    datasets = build_datasets(cfg.data)
    out = Path(out) if out is not None else checkpoint.parent / f"eval_{cfg.data.category}"

    result = evaluate(model, datasets.test, cfg.eval, out_dir=out, device=device,
                      val_dataset=datasets.val)
    result.calibration.update(category=cfg.data.category, data_root=str(cfg.data.root),
                              iteration=int(ckpt.get("iteration", 0)))
    (out / "calibration.json").write_text(json.dumps(result.calibration, indent=2) + "\n")
    if cfg.data.category == trained_category:
        ckpt["calibration"] = result.calibration
        save_checkpoint(checkpoint, ckpt)
        stored = f"calibration stored in {checkpoint}"
    else:
        stored = (f"calibration NOT stored: the model was trained on '{trained_category}', "
                  f"evaluated on '{cfg.data.category}'")

    cal = result.calibration
    print(f"{cfg.data.category}: {len(result.records)} test images, iteration {cal['iteration']}")
    print(result.table())
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    print(f"thresholds (raw score): f1={fmt(cal['threshold_f1'])} "
          f"normal={fmt(cal['threshold_normal'])} (q={cal['quantile']} of {cal['n_normal']} "
          f"{cal['normal_source']} images); {stored}")
    print(f"outputs in {out}")
    sys.stdout.flush()

    if track and cfg.tracking.enabled:
        _log_to_tracking(result, checkpoint)
    return result


def _log_to_tracking(result: EvalResult, checkpoint: Path) -> None:
    """Calls recontrast.tracking.log_evaluation when that module offers it; never fails the
    evaluation itself (its outputs are already written)."""
    try:
        from recontrast import tracking
    except ImportError:
        return
    log_evaluation = getattr(tracking, "log_evaluation", None)
    if log_evaluation is None:
        return
    try:
        log_evaluation(result, checkpoint)
    except Exception as err:  # noqa: BLE001 - tracking is best effort here
        msg = f"could not log the evaluation to MLflow: {type(err).__name__}: {err}"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


__all__ = ["EvalResult", "evaluate", "make_eval_fn", "main_evaluate", "normalise",
           "pick_threshold", "calibrate", "iterate_maps", "score_dataset"]
