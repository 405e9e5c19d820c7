"""Inference on new images: `Detector`, the `recontrast predict` command, ONNX export.

    det = Detector.load("runs/bottle/last.ckpt")
    pred = det.predict(Image.open("x.png"))  # pred.score > 0.5  <=>  pred.is_anomalous

Scores and maps use the checkpoint's calibration (written by `recontrast evaluate`): one
fixed scale for every image on which the chosen threshold reads 0.5 (calibration.FORMULA).
Without a calibration the detector still gives raw scores and raw maps, and says so.
"""
from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from recontrast import plots
from recontrast.anomaly_map import image_score, maps_for, max_map_value
from recontrast.calibration import pick_threshold, threshold_scale
from recontrast.config import EvalConfig
from recontrast.images import (IMAGE_EXTENSIONS, SIXTEEN_BIT_MODES, decode_image, imagenet_normalise,
                               resize_rgb)
from recontrast.model import load_model
from recontrast.runtime import pick_device

UNCALIBRATED = ("the checkpoint holds no calibration: run `recontrast evaluate --checkpoint {ckpt}` "
                "first to calibrate a threshold; until then predictions carry raw scores only")


# What changes a raw score besides the weights: a threshold applies only to scores computed
# with the settings it was calibrated with (calibration["eval"] and calibration["image_size"]).
SCORE_SETTINGS = ("combine", "sigma", "level_weights", "score", "topk")


class UnreadableImageWarning(UserWarning):
    """An input image could not be decoded; it was skipped."""


class CalibrationMismatch(ValueError):
    """A calibration that does not record every setting its thresholds depend on."""


def calibrated_settings(calibration: dict[str, Any], eval_cfg: EvalConfig, source: str) -> tuple[EvalConfig, int]:
    """Returns (eval settings, image size) that the calibration's thresholds were computed
    with: scoring with anything else would compare scores and thresholds of different scales.

    Raises CalibrationMismatch when the calibration does not record all of them (one made
    before they were stored): its thresholds cannot be trusted, so nothing is decided.
    """
    stored = calibration.get("eval") or {}
    missing = [f"eval.{k}" for k in SCORE_SETTINGS if k not in stored]
    missing += [] if calibration.get("image_size") else ["data.image_size"]
    if missing:
        raise CalibrationMismatch(
            f"the calibration in {source} does not record {', '.join(missing)}, so its thresholds may "
            f"not fit the scores computed now; recalibrate with `recontrast evaluate --checkpoint {source}`")
    settings = {k: tuple(stored[k]) if k == "level_weights" else stored[k] for k in SCORE_SETTINGS}
    return replace(eval_cfg, **settings), int(calibration["image_size"])


@dataclass
class Prediction:
    score: float | None  # normalised: threshold = 0.5 (None when uncalibrated)
    raw_score: float
    is_anomalous: bool | None  # None when uncalibrated
    anomaly_map: np.ndarray  # (S, S) float32 on the fixed scale, clipped to [0, 1]; raw if uncalibrated
    threshold_name: str  # "normal", "f1", "custom" or "uncalibrated"
    threshold: float | None  # raw-score threshold
    path: str | None = None


# --- preprocessing -------------------------------------------------------------------------

def to_pil(image: Any) -> Image.Image:
    """Returns a PIL image from a PIL image, a file path, or a uint8/float array (H, W[, C]).

    Raises images.BadImage (a ValueError) naming the file when a path cannot be decoded.
    """
    if isinstance(image, (str, Path)):
        return decode_image(Path(image))  # the dataset's decoder and error messages
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = np.asarray(arr, np.float64)
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr  # [0, 1] floats
            arr = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ValueError(f"expected an image array (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
        return Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot read an image from {type(image).__name__}; "
                        "pass a PIL image, a numpy array or a file path")
    return image


def rgb_array(im: Image.Image) -> np.ndarray:
    """Returns float32 (H, W, 3) on [0, 255], converted exactly as images.load_rgb does for files
    (16-bit scaled by 1/257, float images, palette transparency, RGBA/CMYK/L via PIL)."""
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "F":
        gray = np.asarray(im, dtype=np.float32)
        if im.mode in SIXTEEN_BIT_MODES:
            gray = gray / 257.0
        elif gray.max(initial=0) <= 1.0:
            gray = gray * 255.0
        return np.repeat(np.clip(gray, 0, 255)[..., None], 3, axis=-1)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"), dtype=np.float32)


def preprocess(image: Any, image_size: int) -> Tensor:
    """Returns the (3, S, S) ImageNet-normalised float tensor the dataset gives for `image`
    (same decoding, antialiased bilinear resize to uint8, normalisation: recontrast.images).

    A torch tensor of shape (3, S, S) is taken as already preprocessed (a dataset item).
    """
    if isinstance(image, Tensor):
        if tuple(image.shape) != (3, image_size, image_size):
            raise ValueError(f"a tensor input must be a preprocessed (3, {image_size}, {image_size}) "
                             f"image, got {tuple(image.shape)}")
        return image.float()
    return imagenet_normalise(resize_rgb(rgb_array(to_pil(image)), image_size))


# --- the detector --------------------------------------------------------------------------

class Detector:
    """A trained model plus its calibration: images in, normalised scores and maps out."""

    def __init__(self, model: nn.Module, image_size: int, eval_cfg: EvalConfig,
                 calibration: dict[str, Any] | None = None, threshold: str | float | None = None,
                 device: str | torch.device = "cpu", source: str = "the checkpoint"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.image_size, self.eval_cfg = int(image_size), eval_cfg
        self.calibration = dict(calibration or {})
        if self.calibrated:
            # Score exactly as the calibration did (image size included), or its thresholds
            # and display scale would not apply.
            self.eval_cfg, self.image_size = calibrated_settings(self.calibration, eval_cfg, source)
        self.threshold_name, self.threshold = "uncalibrated", None
        self.map_max = 1.0  # largest possible raw map value, set by raw()
        self.offset = float(self.calibration.get("map_offset", 0.0))
        custom = threshold is not None and threshold not in ("normal", "f1")
        if self.calibrated or custom:
            self.threshold_name, self.threshold = pick_threshold(self.calibration, threshold)
            if not math.isfinite(self.threshold):  # NaN flags nothing, inf nothing, -inf everything
                raise ValueError(f"threshold must be a finite number, 'normal' or 'f1', got {threshold!r}")
        else:
            msg = UNCALIBRATED.format(ckpt=source)
            warnings.warn(msg, UserWarning, stacklevel=3)

    @property
    def calibrated(self) -> bool:
        return any(self.calibration.get(k) is not None for k in ("threshold_f1", "threshold_normal"))

    @classmethod
    def load(cls, ckpt: str | Path, device: str | torch.device = "cpu",
             threshold: str | float | None = None) -> Detector:
        """Returns the Detector of a checkpoint (read with weights_only=True).

        threshold: "normal" (quantile of held-out good scores), "f1" (F1-optimal on the
        test set), a raw-score number, or None for the calibration's default.
        """
        model, cfg, state = load_model(ckpt, device)
        return cls(model, cfg.data.image_size, cfg.eval, state.get("calibration"), threshold,
                   device, source=str(ckpt))

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns raw (B, 1, S, S) maps and (B,) scores for a preprocessed (B, 3, S, S) batch."""
        e = self.eval_cfg
        pairs_of = getattr(self.model, "anomaly_pairs", self.model)
        with torch.inference_mode():
            pairs = pairs_of(x.to(self.device))
            self.map_max = max_map_value(len(pairs), e.combine, e.level_weights)
            maps = maps_for(pairs, x.shape[-2:], e)
            return maps, image_score(maps, e.score, e.topk)

    def _prediction(self, raw_map: Tensor, raw_score: float, path: str | None) -> Prediction:
        m = raw_map.squeeze(0).float().cpu().numpy()  # (1, S, S) -> (S, S)
        if self.threshold is None:
            return Prediction(None, raw_score, None, m, "uncalibrated", None, path)
        score = max(0.0, threshold_scale(raw_score, self.threshold, self.offset))
        shown = np.clip(threshold_scale(m, self.threshold, self.offset), 0.0, 1.0).astype(np.float32)
        return Prediction(score, raw_score, raw_score > self.threshold, shown,
                          self.threshold_name, self.threshold, path)

    def predict(self, image: Any) -> Prediction:
        """Returns the Prediction for one PIL image, array, file path or preprocessed tensor."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[Any], batch_size: int | None = None) -> list[Prediction]:
        """Returns one Prediction per image, inferred in batches of eval.batch_size."""
        bs = batch_size or self.eval_cfg.batch_size
        out: list[Prediction] = []
        for start in range(0, len(images), bs):
            chunk = images[start:start + bs]
            x = torch.stack([preprocess(im, self.image_size) for im in chunk])
            maps, scores = self.raw(x)
            for im, m, s in zip(chunk, maps, scores.double().cpu().tolist()):
                out.append(self._prediction(m, s, str(im) if isinstance(im, (str, Path)) else None))
        return out


# --- `recontrast predict` ------------------------------------------------------------------

def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Returns the image files among `inputs` (files as given, folders searched recursively)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                warnings.warn(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}",
                              UserWarning, stacklevel=2)
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            parent = p.parent if p.parent.is_dir() else Path(".")
            near = sorted(x.name for x in parent.iterdir())[:8] if parent.is_dir() else []
            hint = f"; {parent} holds: {', '.join(near)}" if near else ""
            raise FileNotFoundError(f"input '{p}' does not exist (expected an image file or a folder){hint}")
    return files


def short_names(files: Sequence[Path]) -> dict[Path, str]:
    """Returns each file's path relative to the folder all of them share ('broken/000.png')."""
    parents = [str(f.resolve().parent) for f in files]
    common = Path(os.path.commonpath(parents)) if parents else Path(".")
    return {f: f.resolve().relative_to(common).as_posix() for f in files}


def _heatmap_name(short: str, used: set[str]) -> str:
    """Returns '<short name with / as __>_heatmap.png', unique among `used`."""
    base = Path(short).with_suffix("").as_posix().replace("/", "__")
    name, n = f"{base}_heatmap.png", 1
    while name in used:
        n += 1
        name = f"{base}_{n}_heatmap.png"
    used.add(name)
    return name


def main_predict(checkpoint: str | Path, inputs: Sequence[str | Path], out: str | Path = "preds",
                 threshold: str = "normal") -> list[dict[str, Any]]:
    """Returns one row per input image (path, score, raw_score, anomalous, ..., error) after
    writing a heatmap overlay per image and predictions.csv to `out`; unreadable images are
    skipped with a warning and an error row."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out '{out}' is a file; predictions (heatmaps and predictions.csv) "
                                 f"go into a folder: give a folder path")
    files = collect_images(inputs)
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    det = Detector.load(checkpoint, device=pick_device("auto"),
                        threshold=None if threshold in (None, "") else threshold)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    names = short_names(files)
    bs = det.eval_cfg.batch_size
    for start in range(0, len(files), bs):
        batch, images = [], []
        for f in files[start:start + bs]:
            try:
                images.append(to_pil(f))
                batch.append(f)
            except (OSError, ValueError, SyntaxError) as err:  # images.BadImage is a ValueError
                msg = f"skipping unreadable image {f}: {type(err).__name__}: {err}"
                warnings.warn(msg, UnreadableImageWarning, stacklevel=2)
                rows.append({"path": str(f), "name": names[f], "error": f"{type(err).__name__}: {err}"})
        for f, im, pred in zip(batch, images, det.predict_batch(images) if images else []):
            view = _display_image(im)
            # Uncalibrated: raw maps over their largest possible value (fixed, never per image).
            heat = pred.anomaly_map if det.threshold is not None else pred.anomaly_map / det.map_max
            heatmap = out / _heatmap_name(names[f], used)
            Image.fromarray(plots.overlay(view, heat)).save(heatmap)
            rows.append({"path": str(f), "name": names[f], "score": pred.score, "raw_score": pred.raw_score,
                         "anomalous": pred.is_anomalous, "threshold_name": pred.threshold_name,
                         "threshold": pred.threshold, "heatmap": str(heatmap), "error": ""})
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order[r["path"]])
    cols = ["path", "score", "raw_score", "anomalous", "threshold_name", "threshold", "heatmap", "error"]
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    _print_table(rows, det, out)
    return rows


def _display_image(im: Image.Image, max_side: int = 512) -> np.ndarray:
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    return np.asarray(im)


def _print_table(rows: list[dict[str, Any]], det: Detector, out: Path) -> None:
    width = max([len(r["name"]) for r in rows] + [5])
    print(f"{'image':<{width}}  {'score':>7}  {'raw':>9}  decision")
    fmt = lambda v: "   n/a" if v is None else f"{v:7.3f}"  # noqa: E731
    for r in rows:
        name = r["name"]
        if r.get("error"):
            print(f"{name:<{width}}  {'':>7}  {'':>9}  UNREADABLE ({r['error']})")
            continue
        decision = {True: "ANOMALOUS", False: "normal", None: "(uncalibrated)"}[r["anomalous"]]
        print(f"{name:<{width}}  {fmt(r['score'])}  {r['raw_score']:9.4f}  {decision}")
    bad = sum(1 for r in rows if r.get("error"))
    th = ("none (uncalibrated)" if det.threshold is None
          else f"{det.threshold_name} = {det.threshold:.4g} (raw)")
    print(f"{len(rows) - bad} scored, {bad} unreadable; threshold {th}; score 0.5 = threshold; "
          f"{det.image_size} px; results in {out / 'predictions.csv'}")
