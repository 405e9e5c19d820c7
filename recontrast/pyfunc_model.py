"""The MLflow model of a trained detector, logged as code (MLflow's models-from-code).

MLflow runs this file to load a logged model: nothing is unpickled. The weights come from
the model's `weights` artifact, an inference checkpoint read with torch.load(weights_only=True)
by `recontrast.infer.Detector`, so scores are exactly those of `recontrast predict`.

    model = mlflow.pyfunc.load_model("models:/bottle/1")
    out = model.predict(images)  # images: uint8 RGB, (B, H, W, 3), any H and W

out["score"] (B,) float64: the calibrated score, 0.5 = threshold; out["raw_score"] (B,);
out["decision"] (B,) bool: anomalous or not; out["map"] (B, S, S) float32 on [0, 1].
`recontrast.mlflow_model.log_detector` logs it; model_config {"threshold": ..., "device": ...}.
"""
from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from recontrast.infer import Detector
from recontrast.runtime import pick_device


class DetectorModel(PythonModel):
    """A pyfunc wrapper around `Detector`: an image batch in, scores, decisions and maps out."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        # "normal" as `recontrast predict`: the threshold from held-out good images only.
        self.detector = Detector.load(context.artifacts["weights"], device=pick_device(config.get("device", "auto")),
                                      threshold=config.get("threshold", "normal"))

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> dict[str, np.ndarray]:
        images = np.asarray(model_input)
        if images.ndim == 3:  # one (H, W, 3) image
            images = images[None]
        preds = self.detector.predict_batch(list(images))
        size = self.detector.image_size
        nan = float("nan")
        return {
            "score": np.array([nan if p.score is None else p.score for p in preds], np.float64),
            "raw_score": np.array([p.raw_score for p in preds], np.float64),
            "decision": np.array([bool(p.is_anomalous) for p in preds], bool),
            "map": np.array([p.anomaly_map for p in preds], np.float32).reshape(-1, size, size),
        }


mlflow.models.set_model(DetectorModel())
