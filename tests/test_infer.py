"""Behaviour of inference: calibrated scores, dataset-identical preprocessing, robust batch
prediction, an ONNX graph that matches PyTorch, and the same predictions from every runtime
(ONNX Runtime, OpenVINO; fp32 and int8), whose exported files are reused until stale."""
from __future__ import annotations

import csv
import re
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from recontrast import export, infer, runtimes
from recontrast.checkpoint import load_checkpoint, save_checkpoint
from recontrast.config import EvalConfig
from recontrast.model import load_model
from recontrast.anomaly_map import anomaly_map
from recontrast.calibration import threshold_scale
from recontrast.evaluate import score_dataset
from recontrast.pipeline import run_evaluation


@pytest.fixture(scope="module")
def calibrated(tiny_model):
    """Returns (checkpoint with calibration, EvalResult, test dataset) of the session's tiny model."""
    return tiny_model.checkpoint, tiny_model.evaluation, tiny_model.datasets.test


@pytest.fixture(scope="module")
def detector(calibrated) -> infer.Detector:
    return infer.Detector.load(calibrated[0])


def test_predict_scores_are_normalised_to_the_threshold(calibrated, detector):
    ckpt, result, test = calibrated
    det = detector
    cal = load_checkpoint(ckpt)["calibration"]
    assert det.threshold_name == "normal" and det.threshold == cal["threshold_normal"]
    paths = [s.path for s in test.samples]
    with Image.open(paths[0]) as im:
        pred = det.predict(im.copy())  # a PIL image
    assert isinstance(pred, infer.Prediction)
    assert pred.anomaly_map.shape == (64, 64) and pred.anomaly_map.dtype == np.float32
    assert 0.0 <= pred.anomaly_map.min() and pred.anomaly_map.max() <= 1.0
    # Same preprocessing as the dataset: raw scores equal evaluation's per-image scores.
    by_path = {r["path"]: r["score"] for r in result.records}
    preds = det.predict_batch([str(p) for p in paths])
    for p, pr in zip(paths, preds):
        assert pr.raw_score == pytest.approx(by_path[str(p)], rel=1e-5, abs=1e-6)
        assert (pr.score > 0.5) == (pr.raw_score > det.threshold) == pr.is_anomalous
        assert pr.score == pytest.approx(max(0.0, threshold_scale(pr.raw_score, det.threshold, cal["map_offset"])))
    # A custom threshold between two images' raw scores splits them, and reads 0.5.
    raws = sorted(pr.raw_score for pr in preds)
    middle = (raws[len(raws) // 2 - 1] + raws[len(raws) // 2]) / 2
    custom = infer.Detector(det.model, 64, det.eval_cfg, cal, threshold=str(middle))
    flags = [pr.is_anomalous for pr in custom.predict_batch([str(p) for p in paths])]
    assert custom.threshold_name == "custom" and sum(flags) == sum(r > middle for r in raws)
    assert infer.Detector(det.model, 64, det.eval_cfg, cal, threshold="f1").threshold == cal["threshold_f1"]


def test_heatmaps_share_one_scale(calibrated, detector):
    """Every map is threshold_scale(raw map) with the same constants: with score = max, a normal
    image below the threshold shows a map whose maximum IS its score (< 0.5), not 1."""
    ckpt, _, test = calibrated
    det = detector
    preds = det.predict_batch([str(s.path) for s in test.samples])
    x = torch.stack([test[i]["image"] for i in range(len(test))])
    raw_maps, _ = det.raw(x)
    for pr, raw in zip(preds, raw_maps):
        expected = np.clip(threshold_scale(raw[0].numpy(), det.threshold, det.offset), 0, 1)
        assert np.allclose(pr.anomaly_map, expected, atol=1e-5)
        if pr.score < 1.0:
            assert pr.anomaly_map.max() == pytest.approx(pr.score, abs=1e-5)


def test_grayscale_rgba_and_arrays_are_converted_like_the_dataset(calibrated, detector):
    ckpt, _, test = calibrated
    det = detector
    with Image.open(test.samples[-1].path) as im:
        rgb = im.convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(200)
    base = det.predict(rgb).raw_score
    assert det.predict(rgba).raw_score == pytest.approx(base, rel=1e-6)  # alpha dropped
    assert det.predict(np.asarray(rgb)).raw_score == pytest.approx(base, rel=1e-6)
    gray = det.predict(rgb.convert("L"))
    assert gray.raw_score == pytest.approx(det.predict(rgb.convert("L").convert("RGB")).raw_score, rel=1e-6)


def test_uncalibrated_checkpoint_gives_raw_scores_and_says_how_to_calibrate(calibrated, tmp_path):
    ckpt, _, test = calibrated
    state = load_checkpoint(ckpt)
    state["calibration"] = {}
    bare = save_checkpoint(tmp_path / "bare.ckpt", state)
    with pytest.warns(UserWarning, match="run `recontrast evaluate"):
        det = infer.Detector.load(bare)
    pred = det.predict(str(test.samples[0].path))
    assert pred.score is None and pred.is_anomalous is None and pred.threshold_name == "uncalibrated"
    assert pred.raw_score > 0
    # A number still works without calibration (on the 0.5 * raw / threshold scale).
    custom = infer.Detector(det.model, 64, det.eval_cfg, {}, threshold="0.1")
    pred = custom.predict(str(test.samples[0].path))
    assert pred.is_anomalous is True and pred.score == pytest.approx(0.5 * pred.raw_score / 0.1)


def test_main_predict_skips_a_corrupt_file_and_reports_it(calibrated, tmp_path, capsys):
    ckpt, _, test = calibrated
    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    good = [s.path for s in test.samples[:3]]
    shutil.copy(good[0], folder / "a.png")
    shutil.copy(good[1], folder / "sub" / "a.png")  # same file name in another folder
    shutil.copy(good[2], folder / "c.jpg.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "preds"
    with pytest.warns(infer.UnreadableImageWarning, match="broken.png"):
        rows = infer.main_predict(ckpt, [str(folder)], out=out, threshold="normal")
    assert len(rows) == 4
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.png")
    with open(out / "predictions.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and sum(bool(r["error"]) for r in table) == 1
    heatmaps = sorted(p.name for p in out.glob("*_heatmap.png"))
    assert heatmaps == ["a_heatmap.png", "c.jpg_heatmap.png", "sub__a_heatmap.png"]
    for name in heatmaps:
        with Image.open(out / name) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
    printed = capsys.readouterr().out
    assert "broken.png" in printed and "UNREADABLE" in printed and "3 scored, 1 unreadable" in printed


def test_main_predict_missing_input_is_a_clear_error(calibrated, tmp_path):
    ckpt, _, _ = calibrated
    with pytest.raises(FileNotFoundError, match="nope.png' does not exist"):
        infer.main_predict(ckpt, [str(tmp_path / "nope.png")], out=tmp_path / "p")


def test_onnx_export_matches_pytorch(calibrated, tmp_path):
    import onnxruntime as ort

    ckpt, _, test = calibrated
    path = export.export(ckpt, out=tmp_path / "model.onnx")
    model, cfg, state = load_model(ckpt)
    graph = export.InferenceGraph(model, cfg.eval, 64).eval()
    x = torch.stack([test[i]["image"] for i in range(3)])
    with torch.no_grad():
        maps, scores = graph(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with warnings.catch_warnings():
        onnx_maps, onnx_scores = session.run(None, {"image": x.numpy()})
    assert onnx_maps.shape == (3, 1, 64, 64) and onnx_scores.shape == (3,)
    np.testing.assert_allclose(onnx_maps, maps.numpy(), atol=1e-4)
    np.testing.assert_allclose(onnx_scores, scores.numpy(), atol=1e-4)
    meta = session.get_modelmeta().custom_metadata_map
    assert '"threshold_normal"' in meta["recontrast.calibration"] and meta["recontrast.image_size"] == "64"
    with pytest.raises(ValueError, match="multiple of 32"):
        export.export(ckpt, out=tmp_path / "bad.onnx", image_size=50)


@pytest.fixture(scope="module")
def product_scored(calibrated, tmp_path_factory):
    """Returns (checkpoint, EvalResult) of a copy of the tiny model evaluated with
    eval.score_combine=product (calibrated with it)."""
    ckpt = _copy_checkpoint(calibrated[0], tmp_path_factory.mktemp("product"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_evaluation(ckpt, out=ckpt.parent / "eval", overrides={"eval.score_combine": "product"}, track=False)
    return ckpt, result


def test_a_product_image_score_keeps_the_map_and_gives_it_its_own_threshold(calibrated, product_scored, tiny_model):
    """eval.score_combine=product: the pixel metrics are the map's (the sum), the image scores
    the product map's maxima; the map is shown on its own threshold (the same quantile of the
    held-out good images' map maxima), the score on the image threshold, each reading 0.5 there."""
    _, default, test = calibrated
    ckpt, result = product_scored
    for key in ("pixel_auroc", "aupro", "pixel_f1max"):
        assert result.metrics[key] == pytest.approx(default.metrics[key], rel=1e-5)  # the same maps
    model, cfg, _ = load_model(ckpt)
    cal = load_checkpoint(ckpt)["calibration"]
    assert cal["eval"]["score_combine"] == "product"  # the calibration keeps what it was made with
    eval_cfg, _ = infer.calibrated_settings(cal, cfg.eval, str(ckpt))
    x = torch.stack([test[i]["image"] for i in range(len(test))])
    pairs = model.anomaly_pairs(x)
    product = anomaly_map(pairs, 64, "product", eval_cfg.sigma, eval_cfg.level_weights).amax(dim=(1, 2, 3))
    np.testing.assert_allclose([r["score"] for r in result.records], product.double().numpy(), rtol=1e-5)
    assert not np.allclose([r["score"] for r in result.records], [r["score"] for r in default.records])

    val_scores, _, val_maxima = score_dataset(model, tiny_model.datasets.val, eval_cfg)
    q = eval_cfg.threshold_quantile
    assert cal["threshold_normal"] == pytest.approx(np.quantile(val_scores, q), rel=1e-5)
    assert cal["map_threshold"] == pytest.approx(np.quantile(val_maxima, q), rel=1e-5)
    assert 0.0 <= cal["map_offset"] < cal["map_threshold"]
    for r in result.records:
        assert (r["score_normalised"] > 0.5) == bool(r["anomalous"]) == (r["score"] > cal["threshold_normal"])

    det = infer.Detector.load(ckpt)
    assert det.eval_cfg.score_combine == "product"
    preds = det.predict_batch([str(s.path) for s in test.samples])
    raw_maps, _ = det.raw(x)
    for pr, r, raw in zip(preds, result.records, raw_maps):
        assert pr.raw_score == pytest.approx(r["score"], rel=1e-5)
        assert (pr.score > 0.5) == pr.is_anomalous == (pr.raw_score > det.threshold)
        assert pr.score == pytest.approx(max(0.0, threshold_scale(pr.raw_score, det.threshold, 0.0)))
        shown = np.clip(threshold_scale(raw[0].numpy(), cal["map_threshold"], cal["map_offset"]), 0, 1)
        np.testing.assert_allclose(pr.anomaly_map, shown, atol=1e-5)


def test_a_calibration_made_before_score_combine_scores_from_the_map(calibrated):
    """A calibration that does not record eval.score_combine was made when the score was the
    map's maximum: it still applies, scoring so."""
    cal = dict(load_checkpoint(calibrated[0])["calibration"])
    cal["eval"] = {k: v for k, v in cal["eval"].items() if k != "score_combine"}
    settings, _ = infer.calibrated_settings(cal, EvalConfig(score_combine="product"), "old.ckpt")
    assert settings.score_combine == "map"


@pytest.mark.slow
def test_an_exported_model_scores_with_the_product_as_pytorch_does(product_scored, calibrated, tmp_path):
    ckpt = _copy_checkpoint(product_scored[0], tmp_path / "run")
    paths = [str(s.path) for s in calibrated[2].samples]
    want = infer.Detector.load(ckpt).predict_batch(paths)
    got = infer.Detector.load(ckpt, runtime="onnx", threads=1).predict_batch(paths)
    np.testing.assert_allclose([p.raw_score for p in got], [p.raw_score for p in want], rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.stack([p.anomaly_map for p in got]), np.stack([p.anomaly_map for p in want]),
                               rtol=0, atol=1e-4)
    assert [p.is_anomalous for p in got] == [p.is_anomalous for p in want]


# int8 tolerance on raw scores (tests/test_runtimes.py measures the model-level error; these
# tiny models were measured at 0.3 % of the score)
INT8_SCORE_RTOL = 0.01


def _copy_checkpoint(ckpt, folder):
    """Returns a copy of `ckpt` in `folder`: exports land beside it, not in the shared fixture."""
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.copy(ckpt, folder / "last.ckpt")


def _runtimes() -> list[tuple[str, bool]]:
    pytest.importorskip("onnxruntime")
    found = [("onnx", False), ("onnx", True)]
    try:
        import openvino  # noqa: F401
    except ImportError:
        return found
    return found + [("openvino", False), ("openvino", True)]


@pytest.mark.slow
def test_every_runtime_predicts_what_pytorch_predicts(calibrated, detector, tmp_path):
    ckpt = _copy_checkpoint(calibrated[0], tmp_path / "run")
    paths = [str(s.path) for s in calibrated[2].samples]
    want = detector.predict_batch(paths)
    for runtime, int8 in _runtimes():
        det = infer.Detector.load(ckpt, runtime=runtime, int8=int8, threads=1)
        name = f"{runtime}{' int8' if int8 else ''}"
        assert det.runtime == name and det.model is None
        assert ((det.threshold_name, det.threshold, det.offset, det.image_size)
                == (detector.threshold_name, detector.threshold, detector.offset, detector.image_size))
        got = det.predict_batch(paths)
        raw = np.array([p.raw_score for p in got])
        ref = np.array([p.raw_score for p in want])
        if int8:
            np.testing.assert_array_less(np.abs(raw - ref), INT8_SCORE_RTOL * ref, err_msg=name)
            sure = np.abs(ref - det.threshold) > INT8_SCORE_RTOL * ref  # decisions away from the threshold
            assert [p.is_anomalous for p, s in zip(got, sure) if s] == [p.is_anomalous for p, s in zip(want, sure) if s]
        else:
            np.testing.assert_allclose(raw, ref, rtol=0, atol=1e-4, err_msg=name)
            np.testing.assert_allclose([p.score for p in got], [p.score for p in want], rtol=0, atol=1e-4)
            np.testing.assert_allclose(np.stack([p.anomaly_map for p in got]), np.stack([p.anomaly_map for p in want]),
                                       rtol=0, atol=1e-4, err_msg=name)
            assert [p.is_anomalous for p in got] == [p.is_anomalous for p in want]
    assert {"last.onnx", "last.int8.onnx"} <= {p.name for p in ckpt.parent.iterdir()}


@pytest.mark.slow
def test_an_exported_model_is_reused_until_the_checkpoint_changes(calibrated, tmp_path):
    pytest.importorskip("onnxruntime")
    ckpt = _copy_checkpoint(calibrated[0], tmp_path / "run")
    infer.Detector.load(ckpt, runtime="onnx", threads=1)
    onnx_file = ckpt.with_suffix(".onnx")
    stamp = lambda: (onnx_file.stat().st_ino, onnx_file.stat().st_mtime_ns)  # noqa: E731
    first = stamp()
    infer.Detector.load(ckpt, runtime="onnx", threads=1)
    assert stamp() == first  # reused
    with pytest.MonkeyPatch.context() as patch:  # made by an older recipe: written again
        patch.setattr(runtimes, "RECIPE", "an older recipe")
        infer.Detector.load(ckpt, runtime="onnx", threads=1)
    assert stamp() != first
    first = stamp()
    state = load_checkpoint(ckpt)
    state["calibration"]["threshold_normal"] *= 1.5  # recalibrated: the file's calibration is stale
    save_checkpoint(ckpt, state)
    det = infer.Detector.load(ckpt, runtime="onnx", threads=1)
    assert stamp() != first and det.threshold == state["calibration"]["threshold_normal"]
    # A file given explicitly is never overwritten: one from other weights is refused.
    other = _copy_checkpoint(calibrated[0], tmp_path / "other")
    foreign = export.export(other, out=tmp_path / "foreign.onnx")
    with pytest.raises(infer.StaleModel, match=r"foreign\.onnx was not exported from .*export it again: recontrast export"):
        infer.Detector.load(ckpt, runtime="onnx", model_path=foreign)
    assert infer.Detector.load(other, runtime="onnx", model_path=foreign).runtime == "onnx"


def test_predict_and_export_commands_take_the_runtime(calibrated, tmp_path):
    pytest.importorskip("onnxruntime")
    ckpt = _copy_checkpoint(calibrated[0], tmp_path / "run")
    images = [str(s.path) for s in calibrated[2].samples[:4]]
    assert run_cli(["predict", "--checkpoint", str(ckpt), *images, "--out", str(tmp_path / "torch")]) is None
    assert run_cli(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) is None
    assert run_cli(["predict", "--checkpoint", str(ckpt), *images, "--out", str(tmp_path / "onnx"),
                    "--runtime", "onnx", "--model", str(tmp_path / "m.onnx"), "--threads", "1"]) is None
    for want, got in zip(*(list(csv.DictReader(open(tmp_path / d / "predictions.csv"))) for d in ("torch", "onnx"))):
        assert float(got["raw_score"]) == pytest.approx(float(want["raw_score"]), abs=1e-4)
        assert got["anomalous"] == want["anomalous"]
    error = run_cli(["predict", "--checkpoint", str(ckpt), images[0], "--out", str(tmp_path / "p"), "--int8"])
    assert error is not None and "int8 and model_path apply to exported models" in error, error


def test_a_missing_runtime_is_one_line_naming_the_extra(calibrated, tmp_path, monkeypatch):
    ckpt = _copy_checkpoint(calibrated[0], tmp_path / "run")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    image = str(calibrated[2].samples[0].path)
    for argv in (["predict", "--checkpoint", str(ckpt), image, "--out", str(tmp_path / "p"), "--runtime", "openvino"],
                 ["export", "--checkpoint", str(ckpt), "--runtime", "openvino"]):
        error = run_cli(argv)
        assert error is not None and "\n" not in error, argv
        assert re.search(r"openvino is not installed .*pip install -e '\.\[openvino\]'", error), error
    assert not list(ckpt.parent.glob("last.*xml"))
