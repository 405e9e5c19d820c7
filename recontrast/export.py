"""Export: the inference graph (image batch -> anomaly map and raw score) as a file a CPU
runtime loads: ONNX (ONNX Runtime), or OpenVINO IR; fp32, or int8 calibrated on the
checkpoint's own normal training images.

    export("runs/bottle/last.ckpt")                                 # runs/bottle/last.onnx
    export("runs/bottle/last.ckpt", runtime="openvino", int8=True)  # runs/bottle/last.int8.xml

The checkpoint's calibration travels in the file's metadata, so a deployment applies the
same threshold and display scale as `recontrast predict`, which reuses these files
(`recontrast predict --runtime openvino --int8`).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from recontrast.calibration import is_calibrated
from recontrast.config import ONNX, TORCH
from recontrast.infer import Detector, calibrated_settings, normal_batches
from recontrast.model import load_model
from recontrast.runtimes import InferenceGraph, check_runtime, model_path, require_packages

__all__ = ["InferenceGraph", "export"]


def export(checkpoint: str | Path, out: str | Path | None = None,
           image_size: int | None = None, runtime: str = ONNX, int8: bool = False,
           calibration_images: int = 64, data_root: str | Path | None = None) -> Path:
    """Returns the path of the exported inference graph (dynamic batch axis).

    runtime "onnx" writes an .onnx file, "openvino" an IR (.xml + .bin); default `out`
    beside the checkpoint (runtimes.model_path: last.onnx, last.int8.onnx, last.xml,
    last.int8.xml). int8: static quantization calibrated on `calibration_images` of the
    checkpoint's training images (under `data_root`, default its data.root). Inputs "image"
    (B, 3, S, S); outputs "anomaly_map" (B, 1, S, S) and "score" (B,), both raw. The checkpoint's calibration is stored as JSON
    in the metadata ("recontrast.calibration") so a deployment can apply the same
    normalisation.
    """
    if check_runtime(runtime) == TORCH:
        raise ValueError("runtime 'torch' is the checkpoint itself; export to 'onnx' or 'openvino'")
    if image_size is not None and (image_size <= 0 or image_size % 32):
        raise ValueError(f"image_size={image_size} must be a positive multiple of 32 "
                         f"(the encoder downsamples by 32); try {max(32, image_size // 32 * 32)}")
    out = Path(out) if out is not None else model_path(checkpoint, runtime, int8)
    if out.is_dir():
        example = out / model_path("model.ckpt", runtime, int8).name
        raise IsADirectoryError(f"--out '{out}' is a folder; give the file to write, e.g. {example}")
    require_packages(runtime, int8)
    model, cfg, state = load_model(checkpoint, "cpu")
    calibration = state.get("calibration") or {}
    size = int(image_size or cfg.data.image_size)
    if is_calibrated(calibration):
        # The thresholds in the metadata apply only to scores computed as they were calibrated.
        _, calibrated_size = calibrated_settings(calibration, cfg.eval, str(checkpoint))
        if image_size is not None and image_size != calibrated_size:
            raise ValueError(f"image_size={image_size}, but the checkpoint's thresholds were calibrated at "
                             f"{calibrated_size} px and do not apply to other sizes; export at {calibrated_size}, "
                             f"or recalibrate first: recontrast evaluate --checkpoint {checkpoint} "
                             f"--set data.image_size={image_size}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # uncalibrated: the file carries raw scores
        detector = Detector(model, size, cfg.eval, calibration, source=str(checkpoint))
    batches = normal_batches(cfg.data, detector.image_size, calibration_images, data_root) if int8 else None
    return detector.export(out, runtime, batches)
