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
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'recontrast[export]'") from None
    model, cfg, state = load_model(checkpoint, "cpu")
    size = int(image_size or cfg.data.image_size)
    if size <= 0 or size % 32:
        raise ValueError(f"image_size={size} must be a positive multiple of 32 "
                         "(the encoder downsamples by 32)")
    calibration = state.get("calibration") or {}
    eval_cfg = EvalConfig(**{**vars(cfg.eval), **(calibration.get("eval") or {})})
    out = Path(out) if out is not None else Path(checkpoint).with_suffix(".onnx")
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
