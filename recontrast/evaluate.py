"""Evaluation: metrics, per-image scores and the calibration of a model on a test split.

`evaluate(model, dataset, cfg.eval)` runs batched inference once over the test set. Pixel
metrics are streamed into `metrics.PixelMetrics` (no map is kept); besides the image scores
only a bounded sample survives, when asked for (`keep_samples`, for `report.write_outputs`):
the K worst-ranked images (highest-scoring good, lowest-scoring defects) and at most
`MAX_FRAMES` down-sampled GIF frames. Thresholds and the display scale: `calibration`.
"""
from __future__ import annotations

import heapq
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from recontrast.anomaly_map import maps_and_scores, separate_score
from recontrast.calibration import calibrate, display_scales, midpoint_below, pick_threshold, threshold_scale
from recontrast.config import EvalConfig
from recontrast.defects import KINDS
from recontrast.images import denormalize
from recontrast.metrics import PixelMetrics, compute_all, image_metrics, per_defect_auroc
from recontrast.runtime import progress_bar

log = logging.getLogger(__name__)

GALLERY_K = 4  # worst-ranked good and defect images each
MAX_FRAMES = 24  # GIF frames per category
PANEL = 128  # side of a GIF panel / gallery image, pixels
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
NO_MASKS = ("pixel metrics are n/a: the test split has no ground-truth masks (image-level labels "
            "only, e.g. no ground_truth/ folder); image metrics are complete")
PROXY_KEYS = ("image_auroc", "pixel_auroc", "aupro")
PROXY_PREFIX = "proxy/"  # every proxy metric's name starts so
PROXY_SCORE = "proxy/score"  # the mean of the proxy metrics: what train.select=proxy maximises


@dataclass
class EvalResult:
    metrics: dict[str, float]  # flat; image_*, pixel_*, aupro, image_auroc_<defect type>
    records: list[dict[str, Any]]  # one per image: path, defect_type, label, score
    figures: dict[str, Path] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None  # where report.write_outputs wrote the files
    pixel_error_bounds: dict[str, float] = field(default_factory=dict)
    samples: FigureSamples | None = None  # kept with evaluate(..., keep_samples=True)
    scale: tuple[str, float] | None = None  # (threshold name, raw threshold) of the display scale
    notes: list[str] = field(default_factory=list)  # what a reader must know (e.g. no masks)

    def table(self) -> str:
        """Returns the metrics as an aligned two-column text table (values in %)."""
        width = max(map(len, self.metrics), default=6)
        rows = [f"{'metric':<{width}}  value"]
        for k, v in self.metrics.items():
            rows.append(f"{k:<{width}}  {'n/a' if v is None or math.isnan(v) else f'{100 * v:6.2f}'}")
        return "\n".join(rows + [f"note: {n}" for n in self.notes])


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
    with torch.inference_mode(), progress_bar(len(dataset), "evaluate", "img", leave=False) as bar:
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            maps, scores = maps_and_scores(pairs_of(x), x.shape[-2:], eval_cfg)
            yield batch, maps, scores
            bar.update(len(x))


def map_summaries(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Returns each (B, 1, H, W) map's mean and largest value, (B,) float64 on the CPU (calibration reads both)."""
    maps = maps.double()
    return maps.mean(dim=(1, 2, 3)).cpu(), maps.amax(dim=(1, 2, 3)).cpu()


def score_dataset(model: nn.Module, dataset, eval_cfg: EvalConfig,
                  device=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (image scores, per-image mean map value, per-image largest map value), each (N,) float64."""
    scores, means, maxima = [], [], []
    for _, maps, s in iterate_maps(model, dataset, eval_cfg, device):
        mean, largest = map_summaries(maps)
        scores.append(s.double().cpu())
        means.append(mean)
        maxima.append(largest)
    if not scores:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return tuple(torch.cat(v).numpy() for v in (scores, means, maxima))


class FigureSamples:
    """Keeps, in bounded memory, what the figures need: worst-ranked images and GIF frames."""

    def __init__(self, n_images: int, k: int = GALLERY_K, max_frames: int = MAX_FRAMES):
        self.k, self.stride = k, max(1, math.ceil(n_images / max_frames))
        self.good: list = []  # min-heap of (score, i, sample): the k highest-scoring good
        self.defect: list = []  # min-heap of (-score, i, sample): the k lowest-scoring defects
        self.frames: list[dict[str, Any]] = []

    @staticmethod
    def _sample(image, raw_map, mask, score, label, defect_type, path) -> dict[str, Any]:
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
    device: str | torch.device | None = None,
    val_dataset=None,
    keep_samples: bool = False,
) -> EvalResult:
    """Returns metrics, per-image scores and calibration for `dataset`.

    dataset: test split (items image (3,S,S), mask (1,S,S), label, defect_type, path);
    val_dataset: held-out good images for threshold_normal (None: the test set's good
    images stand in, flagged as normal_source="test_good"). keep_samples: keep what
    report.write_outputs draws (worst-ranked images, GIF frames) in result.samples.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    has_masks = bool(getattr(dataset, "has_masks", True))
    figures_wanted = keep_samples and (eval_cfg.figures or eval_cfg.gif)
    pixel = PixelMetrics(eval_cfg.num_bins, eval_cfg.pro_fpr_limit) if has_masks else None
    samples = FigureSamples(len(dataset)) if figures_wanted else None

    records: list[dict[str, Any]] = []
    map_means: list[float] = []
    map_maxima: list[float] = []
    image_size = 0
    for batch, maps, scores in iterate_maps(model, dataset, eval_cfg, device):
        image_size = maps.shape[-1]
        masks = batch["mask"] if has_masks else None
        if pixel is not None:
            pixel.update(maps, masks)
        means, maxima = (v.tolist() for v in map_summaries(maps))
        for j, score in enumerate(scores.double().cpu().tolist()):
            rec = {"path": str(batch["path"][j]), "defect_type": str(batch["defect_type"][j]),
                   "label": int(batch["label"][j]), "score": score}
            if samples is not None:
                samples.add(len(records), batch["image"][j], maps[j],
                            None if masks is None else masks[j], score, rec["label"],
                            rec["defect_type"], rec["path"])
            records.append(rec)
            map_means.append(means[j])
            map_maxima.append(maxima[j])
    if not records:
        raise ValueError("the test dataset is empty: nothing to evaluate")

    scores = np.asarray([r["score"] for r in records])
    labels = np.asarray([r["label"] for r in records])
    types = [r["defect_type"] for r in records]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*need both.*")
        metrics = compute_all(scores, labels, types, pixel)
    notes = []
    if pixel is None:  # n/a, not 0: absent masks say nothing about localisation
        metrics.update({k: math.nan for k in PIXEL_KEYS})
        notes.append(NO_MASKS)

    if val_dataset is not None and len(val_dataset) > 0:
        normal_scores, normal_means, normal_maxima = score_dataset(model, val_dataset, eval_cfg, device)
        source = "val"
    else:
        good = labels == 0
        normal_scores, normal_means, normal_maxima = scores[good], np.asarray(map_means)[good], np.asarray(map_maxima)[good]
        source = "test_good"
        # Said once per `recontrast evaluate`, not at every evaluation during training.
        (log.warning if keep_samples else log.debug)(
            "no held-out good images (data.val_fraction=0?): threshold_normal comes from the "
            "test set's good images, which makes it optimistic")
    threshold_f1 = midpoint_below(metrics.pop("image_f1_threshold"), scores)
    calibration = calibrate(threshold_f1, normal_scores, normal_means, eval_cfg, source, image_size, normal_maxima)
    if calibration["threshold_normal"] is not None and len(set(labels.tolist())) == 2:
        pred = scores > calibration["threshold_normal"]
        tp = float((pred & (labels == 1)).sum())
        metrics["image_f1_at_normal"] = float(2 * tp / max(pred.sum() + (labels == 1).sum(), 1))

    try:
        (name, threshold), calibrated = pick_threshold(calibration), True
    except ValueError:  # e.g. a test set of one class and no held-out good images:
        # the figures still need one fixed scale; the records say "not calibrated".
        name, threshold, calibrated = "uncalibrated (max score)", float(np.max(scores)), False
        if separate_score(eval_cfg) and calibration.get("map_threshold") is None:  # no good image at all
            calibration["map_threshold"] = float(np.max(map_maxima))
    (_, score_offset), _ = display_scales(calibration, threshold)
    for r in records:
        r["score_normalised"] = threshold_scale(r["score"], threshold, score_offset) if calibrated else math.nan
        r["anomalous"] = int(r["score"] > threshold) if calibrated else -1

    return EvalResult(metrics=metrics, records=records, calibration=calibration,
                      pixel_error_bounds=pixel.error_bounds() if pixel is not None else {},
                      samples=samples, scale=(name, threshold), notes=notes)


def proxy_metrics(model: nn.Module, proxy_dataset, eval_cfg: EvalConfig, device=None) -> dict[str, float]:
    """Returns proxy/image_auroc, proxy/pixel_auroc, proxy/aupro and proxy/score (their mean):
    the model's metrics on synthetic defects made from held-out normal images (defects.ProxyDataset),
    which needs no test label; and the same four per defect kind, proxy/<kind>/<metric> (that
    kind's defects against all the good images), for every kind the set holds.

    One pass of the model: each batch's maps go to the overall pixel metrics and, good images
    to every kind's, defects to their own kind's.
    """
    pixel = PixelMetrics(eval_cfg.num_bins, eval_cfg.pro_fpr_limit)
    by_kind = {k: PixelMetrics(eval_cfg.num_bins, eval_cfg.pro_fpr_limit) for k in KINDS}
    scores, labels, kinds = [], [], []
    for batch, maps, batch_scores in iterate_maps(model, proxy_dataset, eval_cfg, device):
        pixel.update(maps, batch["mask"])
        batch_kinds = [str(t).removeprefix("synthetic_") for t in batch["defect_type"]]
        good = [j for j, label in enumerate(batch["label"].tolist()) if label == 0]
        for kind, metrics in by_kind.items():
            rows = good + [j for j, k in enumerate(batch_kinds) if k == kind]
            if rows:
                metrics.update(maps[rows], batch["mask"][rows])
        scores += batch_scores.double().cpu().tolist()
        labels += batch["label"].tolist()
        kinds += batch_kinds
    if not scores:
        raise ValueError("the proxy dataset is empty: nothing to evaluate")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*need both.*")
        out = _proxy_entry("proxy", image_metrics(scores, labels), pixel)
        aurocs = per_defect_auroc(scores, labels, kinds)
        for kind, pixel_of_kind in by_kind.items():  # in KINDS order, the kinds the set holds
            if kind in aurocs:
                out |= _proxy_entry(f"proxy/{kind}", {"image_auroc": aurocs[kind]}, pixel_of_kind)
    return out


def _proxy_entry(prefix: str, image: dict[str, float], pixel: PixelMetrics) -> dict[str, float]:
    """Returns {prefix/k: value for k in PROXY_KEYS} and prefix/score, their mean."""
    values = {**image, **pixel.compute()}
    out = {f"{prefix}/{k}": float(values[k]) for k in PROXY_KEYS}
    return out | {f"{prefix}/score": float(np.mean(list(out.values())))}


def make_eval_fn(dataset, eval_cfg: EvalConfig, val_dataset=None, proxy_dataset=None
                 ) -> Callable[[nn.Module, int], dict]:
    """Returns eval_fn(model, iteration) -> metrics dict, for evaluation during training (no
    files, no figures; the training loop restores train mode afterwards): the test metrics
    when `dataset` is given, and the proxy/* metrics when `proxy_dataset` is.
    """

    def eval_fn(model: nn.Module, iteration: int) -> dict[str, float]:
        metrics = {}
        if dataset is not None:
            metrics.update(evaluate(model, dataset, eval_cfg, val_dataset=val_dataset).metrics)
        if proxy_dataset is not None:
            metrics.update(proxy_metrics(model, proxy_dataset, eval_cfg))
        return metrics

    return eval_fn
