"""Export: the inference graph (image batch -> anomaly map and raw score) as an ONNX file.

The checkpoint's calibration travels in the file's metadata, so a deployment applies the
same threshold and display scale as `recontrast predict`.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from recontrast.anomaly_map import image_score, maps_for
from recontrast.config import EvalConfig
from recontrast.infer import calibrated_settings
from recontrast.model import load_model


class InferenceGraph(nn.Module):
    """image (B, 3, S, S) ImageNet-normalised -> (anomaly map (B, 1, S, S), raw score (B,))."""

    def __init__(self, model: nn.Module, eval_cfg: EvalConfig, image_size: int):
        super().__init__()
        self.model, self.eval_cfg, self.image_size = model.eval(), eval_cfg, image_size

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        e = self.eval_cfg
        maps = maps_for(self.model(x), (self.image_size, self.image_size), e)
        return maps, image_score(maps, e.score, e.topk)


def export(checkpoint: str | Path, out: str | Path | None = None, fmt: str = "onnx",
           image_size: int | None = None) -> Path:
    """Returns the path of the exported inference graph (ONNX, dynamic batch axis).

    Inputs "image" (B, 3, S, S); outputs "anomaly_map" (B, 1, S, S) and "score" (B,), both
    raw. The checkpoint's calibration is stored as JSON in the model's metadata
    ("recontrast.calibration") so a deployment can apply the same normalisation.
    """
    if fmt != "onnx":
        raise ValueError(f"export format {fmt!r} is not supported; use 'onnx'")
    if image_size is not None and (image_size <= 0 or image_size % 32):
        raise ValueError(f"image_size={image_size} must be a positive multiple of 32 "
                         f"(the encoder downsamples by 32); try {max(32, image_size // 32 * 32)}")
    out = Path(out) if out is not None else Path(checkpoint).with_suffix(".onnx")
    if out.is_dir():
        raise IsADirectoryError(f"--out '{out}' is a folder; give the file to write, e.g. {out / 'model.onnx'}")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'recontrast[export]'") from None
    model, cfg, state = load_model(checkpoint, "cpu")
    calibration = state.get("calibration") or {}
    eval_cfg, size = cfg.eval, int(image_size or cfg.data.image_size)
    if any(calibration.get(k) is not None for k in ("threshold_f1", "threshold_normal")):
        # The thresholds in the metadata apply only to scores computed as they were calibrated.
        eval_cfg, calibrated_size = calibrated_settings(calibration, cfg.eval, str(checkpoint))
        if image_size is not None and image_size != calibrated_size:
            raise ValueError(f"image_size={image_size}, but the checkpoint's thresholds were calibrated at "
                             f"{calibrated_size} px and do not apply to other sizes; export at {calibrated_size}, "
                             f"or recalibrate first: recontrast evaluate --checkpoint {checkpoint} "
                             f"--set data.image_size={image_size}")
        size = calibrated_size
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = InferenceGraph(model, eval_cfg, size).eval()
    dummy = torch.zeros(1, 3, size, size)
    kwargs = dict(input_names=["image"], output_names=["anomaly_map", "score"], opset_version=17,
                  dynamic_axes={"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # The dynamo exporter needs onnxscript (not a dependency); the TorchScript one
        # exports kornia's blur (reflect pad + conv) and timm/torchvision encoders as is.
        torch.onnx.export(graph, (dummy,), str(out), dynamo=False, **kwargs)
    _add_metadata(out, {"recontrast.calibration": json.dumps(calibration),
                        "recontrast.eval": json.dumps(vars(eval_cfg)),
                        "recontrast.image_size": str(size),
                        "recontrast.normalisation": "ImageNet mean/std on RGB in [0, 1]"})
    return out


def _add_metadata(path: Path, entries: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(proto, str(path))
