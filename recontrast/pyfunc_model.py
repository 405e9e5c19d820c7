"""The MLflow model of a trained detector, logged as code (MLflow's models-from-code).

MLflow runs this file to load a logged model: nothing is unpickled. The weights come from
the model's `weights` artifact, an inference checkpoint read with torch.load(weights_only=True)
by `recontrast.infer.Detector`, so scores are exactly those of `recontrast predict`.

    model = mlflow.pyfunc.load_model("models:/bottle/1")
    out = model.predict(images)  # images: uint8 RGB, (B, H, W, 3), any H and W
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(png_bytes).decode()]}))

The compact input (what `mlflow models serve` is posted, README "Serve a model"): encoded
PNG/JPEG files, base64, in a string column `image` (or a list/array of such strings).

out["score"] (B,) float64: the calibrated score, 0.5 = threshold; out["raw_score"] (B,);
out["decision"] (B,) bool: anomalous or not; out["map"] (B, S, S) float32 on [0, 1].
`recontrast.mlflow_model.log_detector` logs it; model_config {"threshold": ..., "device": ...}.
"""
from __future__ import annotations

import base64
import binascii
import io

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel
from PIL import Image

from recontrast.infer import Detector
from recontrast.runtime import pick_device


class DetectorModel(PythonModel):
    """A pyfunc wrapper around `Detector`: an image batch in, scores, decisions and maps out."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        # "normal" as `recontrast predict`: the threshold from held-out good images only.
        self.detector = Detector.load(context.artifacts["weights"], device=pick_device(config.get("device", "auto")),
                                      threshold=config.get("threshold", "normal"))

    def predict(self, context, model_input, params: dict | None = None) -> dict[str, np.ndarray]:
        images = as_images(model_input)
        preds = self.detector.predict_batch(images)
        size = self.detector.image_size
        nan = float("nan")
        return {
            "score": np.array([nan if p.score is None else p.score for p in preds], np.float64),
            "raw_score": np.array([p.raw_score for p in preds], np.float64),
            "decision": np.array([bool(p.is_anomalous) for p in preds], bool),
            "map": np.array([p.anomaly_map for p in preds], np.float32).reshape(-1, size, size),
        }


def as_images(model_input) -> list[np.ndarray]:
    """Returns the input as uint8 RGB images (H, W, 3): from a uint8 array (B, H, W, 3) or
    (H, W, 3), or from base64 PNG/JPEG strings (a DataFrame column 'image', its only column,
    or a list/array of strings)."""
    if hasattr(model_input, "columns"):  # a DataFrame: the served JSON's dataframe_split/records
        columns = list(model_input.columns)
        if "image" not in columns and len(columns) != 1:
            raise ValueError(f"a table input needs a column 'image' of base64 PNG/JPEG strings; got {columns}")
        model_input = model_input["image" if "image" in columns else columns[0]].tolist()
    if isinstance(model_input, (str, bytes)):
        model_input = [model_input]
    array = np.asarray(model_input) if not isinstance(model_input, list) else None
    if array is not None and array.dtype.kind in "uif":
        images = array.astype(np.uint8) if array.dtype != np.uint8 else array
        return list(images[None] if images.ndim == 3 else images)  # (H, W, 3): one image
    return [_decode(item, i) for i, item in enumerate(model_input)]


def _decode(item, index: int) -> np.ndarray:
    if isinstance(item, np.ndarray) and item.dtype.kind in "uif":  # a list of arrays
        return item.astype(np.uint8)
    try:
        data = base64.b64decode(item, validate=True) if isinstance(item, str) else bytes(item)
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (binascii.Error, OSError, ValueError, TypeError) as err:
        raise ValueError(f"input {index} is neither a uint8 image array nor a base64 PNG/JPEG string: "
                         f"{type(err).__name__}: {err}") from err


mlflow.models.set_model(DetectorModel())
