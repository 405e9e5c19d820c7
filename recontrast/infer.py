"""Inference on new images: `Detector` and the `recontrast predict` command, in PyTorch,
ONNX Runtime or OpenVINO.

    det = Detector.load("runs/bottle/last.ckpt")
    pred = det.predict(Image.open("x.png"))  # pred.score > 0.5  <=>  pred.is_anomalous
    fast = Detector.load("runs/bottle/last.ckpt", runtime="openvino", int8=True)

Scores and maps use the checkpoint's calibration (written by `recontrast evaluate`): one
fixed scale for every image on which the chosen threshold reads 0.5 (calibration.FORMULA).
Without a calibration the detector still gives raw scores and raw maps, and says so.
Every runtime gives the same raw maps and scores (`Detector.raw`), so thresholds, display
scale and outputs are one code; the exported model is written beside the checkpoint
(runtimes.model_path) on first use and reused while it matches the weights and calibration.
"""
from __future__ import annotations

import csv
import hashlib
import json
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

from recontrast import plots, runtimes
from recontrast.anomaly_map import maps_and_scores, max_map_value
from recontrast.calibration import display_scales, is_calibrated, pick_threshold, threshold_scale
from recontrast.checkpoint import load_checkpoint
from recontrast.config import ONNX, TORCH, DataConfig, EvalConfig, from_dict
from recontrast.data import BTADDataset, FolderDataset, MVTecDataset, VisADataset
from recontrast.images import (IMAGE_EXTENSIONS, SIXTEEN_BIT_MODES, DataError, decode_image,
                               imagenet_normalise, resize_rgb)
from recontrast.model import load_model
from recontrast.runtime import pick_device

UNCALIBRATED = ("the checkpoint holds no calibration: run `recontrast evaluate --checkpoint {ckpt}` "
                "first to calibrate a threshold; until then predictions carry raw scores only")


# What changes a raw score besides the weights: a threshold applies only to scores computed
# with the settings it was calibrated with (calibration["eval"] and calibration["image_size"]).
SCORE_SETTINGS = ("combine", "score_combine", "sigma", "level_weights", "score", "topk")
# Settings a calibration made before they existed does not record, with the value it was made with.
SCORE_DEFAULTS = {"score_combine": "map"}


def stored_settings(stored: dict[str, Any]) -> dict[str, Any]:
    """Returns the scoring settings a calibration or an exported model records, SCORE_DEFAULTS
    filling in those made before they existed."""
    return {**SCORE_DEFAULTS, **(stored or {})}


class UnreadableImageWarning(UserWarning):
    """An input image could not be decoded; it was skipped."""


class CalibrationMismatch(ValueError):
    """A calibration that does not record every setting its thresholds depend on."""


class StaleModel(ValueError):
    """An exported model made from other weights, calibration or scoring settings than the
    checkpoint's: its scores would not fit the checkpoint's thresholds."""


def calibrated_settings(calibration: dict[str, Any], eval_cfg: EvalConfig, source: str) -> tuple[EvalConfig, int]:
    """Returns (eval settings, image size) that the calibration's thresholds were computed
    with: scoring with anything else would compare scores and thresholds of different scales.

    Raises CalibrationMismatch when the calibration does not record all of them (one made
    before they were stored): its thresholds cannot be trusted, so nothing is decided.
    """
    stored = stored_settings(calibration.get("eval"))
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
    """A trained model plus its calibration: images in, normalised scores and maps out.

    The model runs in PyTorch (`model`) or exported, in ONNX Runtime or OpenVINO (`session`,
    a runtimes.Session); either gives raw maps and scores (`raw`) to the same thresholding.
    """

    def __init__(self, model: nn.Module | None, image_size: int, eval_cfg: EvalConfig,
                 calibration: dict[str, Any] | None = None, threshold: str | float | None = None,
                 device: str | torch.device = "cpu", source: str = "the checkpoint",
                 session: runtimes.Session | None = None):
        if (model is None) == (session is None):
            raise ValueError("a Detector runs either a torch model or an exported model's session: give one")
        self.model = None if model is None else model.to(device).eval()
        self.session = session
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
        if session is not None:
            self._check_session(session, source)
            self.map_max = float(session.metadata.get("recontrast.map_max", 1.0))

    @property
    def calibrated(self) -> bool:
        return is_calibrated(self.calibration)

    @property
    def runtime(self) -> str:
        """Returns what runs the model: "torch", "onnx", "onnx int8", "openvino" or "openvino int8"."""
        if self.session is None:
            return TORCH
        int8 = self.session.metadata.get("recontrast.precision") == "int8"
        return f"{self.session.runtime} int8" if int8 else self.session.runtime

    @classmethod
    def load(cls, ckpt: str | Path, device: str | torch.device = "cpu", threshold: str | float | None = None,
             runtime: str = TORCH, int8: bool = False, model_path: str | Path | None = None,
             threads: int | None = None, calibration_images: int = 64,
             data_root: str | Path | None = None) -> Detector:
        """Returns the Detector of a checkpoint (read with weights_only=True).

        threshold: "normal" (quantile of held-out good scores), "f1" (F1-optimal on the
        test set), a raw-score number, or None for the calibration's default.
        runtime: "torch" (the checkpoint in PyTorch on `device`), "onnx" (ONNX Runtime) or
        "openvino", on the CPU with `threads` threads (None: all cores); int8 for their
        statically quantized model. These run `model_path` when given, else the model
        beside the checkpoint (runtimes.model_path: last.onnx, last.int8.xml, ...), exported
        first when it is missing or was made from other weights or calibration; int8
        calibrates on `calibration_images` of the checkpoint's training images, found under
        `data_root` (default: the checkpoint's data.root).
        """
        if runtimes.check_runtime(runtime) == TORCH:
            if int8 or model_path is not None:
                raise ValueError("int8 and model_path apply to exported models: runtime 'onnx' or 'openvino'")
            model, cfg, state = load_model(ckpt, device)
            return cls(model, cfg.data.image_size, cfg.eval, state.get("calibration"), threshold,
                       device, source=str(ckpt))
        if torch.device(device).type != "cpu":
            raise ValueError(f"the {runtime} runtime runs on the CPU, not {device}; use runtime 'torch' there")
        runtimes.require_packages(runtime, int8, write=False)  # before any loading
        state = load_checkpoint(ckpt)
        cfg, calibration = from_dict(state["config"]), state.get("calibration") or {}
        session = exported_session(ckpt, model_id(state["model"], calibration), cfg.data, runtime, int8,
                                   model_path, threads, calibration_images, data_root)
        del state  # the weights live in the session now
        return cls(None, cfg.data.image_size, cfg.eval, calibration, threshold, source=str(ckpt), session=session)

    def _check_session(self, session: runtimes.Session, source: str) -> None:
        """Raises StaleModel when the exported model scores at another size or with other
        settings than this detector (its scores would not fit the thresholds)."""
        stored = stored_settings(json.loads(session.metadata.get("recontrast.eval", "{}")))
        differ = [k for k in SCORE_SETTINGS if k not in stored or
                  (tuple(stored[k]) if k == "level_weights" else stored[k]) != getattr(self.eval_cfg, k)]
        if session.image_size != self.image_size:
            differ.append(f"image size {session.image_size} (not {self.image_size})")
        if differ:
            raise StaleModel(f"the exported model {session.path} scores with other settings than {source} "
                             f"({', '.join(differ)}); export it again: recontrast export --checkpoint {source} "
                             f"--runtime {session.runtime} --out {session.path}")

    def export(self, out: str | Path, runtime: str = ONNX,
               int8_batches: Sequence[np.ndarray] | None = None) -> Path:
        """Returns `out`, this detector's torch model written for `runtime` (runtimes.write_model:
        fp32, or int8 calibrated on `int8_batches`), scoring as the detector does, with its
        calibration and the weights' model_id in the file's metadata."""
        if self.model is None:
            raise ValueError(f"this detector runs an exported {self.runtime} model; export from the checkpoint")
        graph = runtimes.InferenceGraph(self.model, self.eval_cfg, self.image_size)
        metadata = {"recontrast.calibration": json.dumps(self.calibration),
                    "recontrast.model_id": model_id(self.model.state_dict(), self.calibration),
                    "recontrast.normalisation": "ImageNet mean/std on RGB in [0, 1]"}
        if int8_batches is not None:
            metadata["recontrast.int8_calibration"] = f"{sum(len(b) for b in int8_batches)} normal images"
        return runtimes.write_model(graph, out, runtime, int8_batches, metadata)

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns raw (B, 1, S, S) maps and (B,) scores for a preprocessed (B, 3, S, S) batch."""
        if self.session is not None:
            maps, scores = self.session.run(x.detach().float().cpu().numpy())
            return torch.from_numpy(maps), torch.from_numpy(scores)
        e = self.eval_cfg
        pairs_of = getattr(self.model, "anomaly_pairs", self.model)
        with torch.inference_mode():
            pairs = pairs_of(x.to(self.device))
            self.map_max = max_map_value(len(pairs), e.combine, e.level_weights)
            return maps_and_scores(pairs, x.shape[-2:], e)

    def _prediction(self, raw_map: Tensor, raw_score: float, path: str | None) -> Prediction:
        m = raw_map.squeeze(0).float().cpu().numpy()  # (1, S, S) -> (S, S)
        if self.threshold is None:
            return Prediction(None, raw_score, None, m, "uncalibrated", None, path)
        (threshold, offset), (map_threshold, map_offset) = display_scales(self.calibration, self.threshold)
        score = max(0.0, threshold_scale(raw_score, threshold, offset))
        shown = np.clip(threshold_scale(m, map_threshold, map_offset), 0.0, 1.0).astype(np.float32)
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


# --- exported models -----------------------------------------------------------------------

def model_id(weights: dict[str, Tensor], calibration: dict[str, Any]) -> str:
    """Returns a short hash of the weights (values, whatever their memory layout) and of the
    calibration: an exported model with another id was made from another model."""
    h = hashlib.sha256(json.dumps(calibration, sort_keys=True, default=str).encode())
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


MIN_CALIBRATION_IMAGES = 16  # fewer int8 calibration images: a warning (min-max ranges of a handful of images)


def normal_batches(data_cfg: DataConfig, image_size: int, n: int = 64, data_root: str | Path | None = None,
                   batch_size: int = 1) -> list[np.ndarray]:
    """Returns up to `n` training (normal) images, evenly spread over the training split, as
    (B, 3, S, S) float32 batches preprocessed as the model's input: int8 calibration data.

    The split is the checkpoint's: data_cfg (its category and format) under `data_root`
    (default: data_cfg.root). One image per batch by default: the calibration's memory grows
    with the batch, not with the number of batches (WRN50 at 256 px: 3.2 GB peak with
    batches of 1, 6.1 GB with batches of 8).
    """
    if n < 1:
        raise ValueError(f"int8 calibration needs at least one image, got n={n}")
    root = data_root or data_cfg.root
    try:
        if data_cfg.format == "folder":
            train = FolderDataset(root, "train", image_size)
        elif data_cfg.format == "visa":
            train = VisADataset(root, data_cfg.category, "train", image_size)
        elif data_cfg.format == "btad":
            train = BTADDataset(root, data_cfg.category, "train", image_size)
        else:
            train = MVTecDataset(root, data_cfg.category, "train", image_size)
    except DataError as err:
        raise DataError(f"int8 calibration reads the model's normal training images: {err}. Point to them "
                        f"(--data / data_root), or export where they are (recontrast export --int8) and "
                        f"give that file (--model / model_path)") from err
    picks = sorted(set(np.linspace(0, len(train) - 1, min(n, len(train))).round().astype(int).tolist()))
    if len(picks) < MIN_CALIBRATION_IMAGES:
        warnings.warn(f"int8 calibration on {len(picks)} image(s) (of {len(train)} training images, {n} asked): "
                      f"activation ranges from fewer than {MIN_CALIBRATION_IMAGES} images may clip real ones; give "
                      f"--calibration-images {MIN_CALIBRATION_IMAGES} or more (and as many training images)",
                      RuntimeWarning, stacklevel=2)
    images = torch.stack([train[i]["image"] for i in picks]).numpy()
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


def exported_session(checkpoint: str | Path, wanted_id: str, data_cfg: DataConfig, runtime: str, int8: bool = False,
                     model_path: str | Path | None = None, threads: int | None = None,
                     calibration_images: int = 64, data_root: str | Path | None = None) -> runtimes.Session:
    """Returns the session of the checkpoint's model in `runtime` (see Detector.load).

    model_path, when given, must come from the checkpoint (model id `wanted_id`) or
    StaleModel is raised; the default file beside the checkpoint is exported again instead,
    and also when an older recipe made it (runtimes.RECIPE).
    """
    path = Path(model_path) if model_path is not None else runtimes.model_path(checkpoint, runtime, int8)
    if model_path is not None or path.is_file():
        try:
            session = runtimes.Session(path, runtime, threads)
        except (runtimes.RuntimeMissing, FileNotFoundError):
            raise
        except Exception as err:  # a truncated or corrupt file (an export killed before the atomic write existed)
            reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
            if model_path is not None:
                raise StaleModel(f"{path} cannot be loaded ({reason}); export it again: recontrast export "
                                 f"--checkpoint {checkpoint} --runtime {runtime}{' --int8' if int8 else ''} "
                                 f"--out {path}") from None
            warnings.warn(f"{path} cannot be loaded ({reason}); exporting it again from {checkpoint}",
                          RuntimeWarning, stacklevel=2)
            return _export_beside(checkpoint, path, data_cfg, runtime, int8, threads, calibration_images, data_root)
        same = session.metadata.get("recontrast.model_id") == wanted_id
        if same and (model_path is not None or session.metadata.get("recontrast.recipe") == runtimes.RECIPE):
            return session
        if model_path is not None:
            flag = " --int8" if session.metadata.get("recontrast.precision") == "int8" else ""
            raise StaleModel(f"{path} was not exported from {checkpoint} (other weights or calibration); "
                             f"export it again: recontrast export --checkpoint {checkpoint} --runtime {runtime}"
                             f"{flag} --out {path}")
        del session
    return _export_beside(checkpoint, path, data_cfg, runtime, int8, threads, calibration_images, data_root)


def _export_beside(checkpoint, path: Path, data_cfg: DataConfig, runtime: str, int8: bool, threads: int | None,
                   calibration_images: int, data_root) -> runtimes.Session:
    """Returns the session of the checkpoint's model exported (again) to `path`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an uncalibrated checkpoint: the caller warns once
        torch_detector = Detector.load(checkpoint)
    batches = None
    if int8:
        batches = normal_batches(data_cfg, torch_detector.image_size, calibration_images, data_root)
    try:
        torch_detector.export(path, runtime, batches)
    except PermissionError as err:
        raise PermissionError(f"cannot write the {runtime} model beside the checkpoint ({err}); export it "
                              f"elsewhere (recontrast export --checkpoint {checkpoint} --runtime {runtime}"
                              f"{' --int8' if int8 else ''} --out FILE) and give that file (--model FILE)") from err
    return runtimes.Session(path, runtime, threads)


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
                 threshold: str = "normal", runtime: str = TORCH, int8: bool = False,
                 model_path: str | Path | None = None, threads: int | None = None,
                 data_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Returns one row per input image (path, score, raw_score, anomalous, ..., error) after
    writing a heatmap overlay per image and predictions.csv to `out`; unreadable images are
    skipped with a warning and an error row. runtime, int8, model_path, threads, data_root:
    as Detector.load (the torch runtime on the GPU when there is one)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out '{out}' is a file; predictions (heatmaps and predictions.csv) "
                                 f"go into a folder: give a folder path")
    files = collect_images(inputs)
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    device = pick_device("auto") if runtime == TORCH else "cpu"
    det = Detector.load(checkpoint, device=device, threshold=None if threshold in (None, "") else threshold,
                        runtime=runtime, int8=int8, model_path=model_path, threads=threads, data_root=data_root)
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
          f"{det.image_size} px; runtime {det.runtime}; results in {out / 'predictions.csv'}")
