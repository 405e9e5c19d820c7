"""Behaviour of evaluation: outputs on disk, exact pixel metrics, stored calibration, one scale."""
from __future__ import annotations

import csv
import math
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_thread
from recontrast import evaluate as E
from recontrast import pipeline, report
from recontrast.calibration import threshold_scale
from recontrast.checkpoint import load_checkpoint
from recontrast.model import load_model
from recontrast.config import Config, apply_overrides

CATEGORY = "weave"


def tiny_cfg(root, out) -> Config:
    """resnet18 from scratch at 64 px, 3 iterations: seconds on a CPU."""
    return apply_overrides(Config(), {
        "data.root": str(root), "data.category": CATEGORY, "data.image_size": 64,
        "data.val_fraction": 0.25, "model.backbone": "resnet18", "model.pretrained": "none",
        "train.iters": 3, "train.batch_size": 4, "train.log_every": 0, "train.threads": 0,
        "train.out": str(out), "tracking.enabled": False, "eval.batch_size": 8,
    })


@pytest.fixture(scope="module")
def evaluated(synthetic_root, tmp_path_factory):
    """Returns (checkpoint, EvalResult, out dir, datasets) after `main_evaluate` on a tiny model."""
    from recontrast.data import build_datasets
    from recontrast.train import train

    run = tmp_path_factory.mktemp("eval_run")
    cfg = tiny_cfg(synthetic_root, run)
    datasets = build_datasets(cfg.data)
    with one_thread():
        ckpt = train(cfg, datasets=datasets).checkpoint
        result = pipeline.run_evaluation(ckpt, out=run / "eval", track=False)
    return ckpt, result, run / "eval", datasets


def test_main_evaluate_writes_metrics_csv_and_figures(evaluated, capsys):
    ckpt, result, out, datasets = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    expected = {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"}
    assert expected <= set(metrics)
    assert {f"image_auroc_{t}" for t in datasets.test.defect_types} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "notes"), metrics

    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(datasets.test)
    assert {"path", "defect_type", "label", "score"} <= set(rows[0])
    assert sorted(r["path"] for r in rows) == sorted(s.path.as_posix() for s in datasets.test.samples)

    for key in ("roc_pr", "histogram", "gallery"):
        with Image.open(result.figures[key]) as im:
            im.verify()
    with Image.open(result.figures["gif"]) as im:
        assert result.figures["gif"].name == f"{CATEGORY}.gif"
        assert im.is_animated and im.n_frames >= 2
        assert im.size[0] >= 3 * 64  # input | overlay | ground truth


def test_pixel_metrics_equal_an_exact_computation(evaluated):
    """The streamed pixel metrics match sklearn on the same maps within metrics.py's bounds."""
    from scipy import ndimage
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    ckpt, result, _, datasets = evaluated
    model, cfg, _ = load_model(ckpt)
    maps, masks = [], []
    for batch, m, _ in E.iterate_maps(model, datasets.test, cfg.eval):
        maps.append(m[:, 0].numpy())
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
    maps, masks = np.concatenate(maps), np.concatenate(masks)  # (N, S, S)
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    precision, recall, _ = precision_recall_curve(y, s)
    exact = {
        "pixel_auroc": roc_auc_score(y, s),
        "pixel_ap": average_precision_score(y, s),
        "pixel_f1max": np.max(2 * precision * recall / np.maximum(precision + recall, 1e-300)),
        "aupro": _exact_aupro(maps, masks, cfg.eval.pro_fpr_limit, ndimage),
    }
    for key, value in exact.items():
        bound = result.pixel_error_bounds[key]
        assert abs(result.metrics[key] - value) <= bound + 1e-9, (key, result.metrics[key], value, bound)
        assert bound < 5e-3


def _exact_aupro(maps, masks, limit, ndimage) -> float:
    """Standard AUPRO: every distinct map value a threshold, 8-connected regions, FPR <= limit."""
    weights_pro = np.zeros(masks.shape)
    n_regions = 0
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel())
        weights_pro[i][mask] = 1.0 / sizes[labels[mask]]
        n_regions += n
    values, normal, pro_w = maps.ravel(), ~masks.ravel(), weights_pro.ravel() / n_regions
    order = np.argsort(-values, kind="mergesort")
    values, normal, pro_w = values[order], normal[order], pro_w[order]
    ends = np.r_[np.flatnonzero(np.diff(values)), len(values) - 1]  # last index of each tie group
    fpr = np.r_[0.0, np.cumsum(normal)[ends] / normal.sum()]
    pro = np.r_[0.0, np.cumsum(pro_w)[ends]]
    k = np.searchsorted(fpr, limit, side="right")
    x, y = fpr[:k], pro[:k]
    if k < len(fpr):
        y_at = pro[k - 1] + (pro[k] - pro[k - 1]) * (limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        x, y = np.r_[x, limit], np.r_[y, y_at]
    return float(np.trapezoid(y, x) / limit)


def test_calibration_is_stored_and_checkpoint_loads_with_weights_only(evaluated):
    ckpt, result, out, datasets = evaluated
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    cal = raw["calibration"]
    assert cal == load_checkpoint(ckpt)["calibration"] == result.calibration
    assert cal["threshold_f1"] is not None and cal["threshold_normal"] is not None
    assert cal["normal_source"] == "val" and cal["n_normal"] == len(datasets.val)
    assert cal["default"] == "normal" and cal["category"] == CATEGORY
    # threshold_normal is the configured quantile of the held-out good images' scores.
    model, cfg, _ = load_model(ckpt)
    val_scores, _, _ = E.score_dataset(model, datasets.val, cfg.eval)
    quantile = np.quantile(val_scores, cfg.eval.threshold_quantile)
    assert cal["threshold_normal"] == pytest.approx(quantile, rel=1e-5)
    assert 0.0 <= cal["map_offset"] < min(cal["threshold_f1"], cal["threshold_normal"])
    assert json.loads((out / "calibration.json").read_text()) == cal
    # threshold_f1 sits between two test scores and reaches the F1-max under score > t.
    scores = np.array([r["score"] for r in result.records])
    labels = np.array([r["label"] for r in result.records])
    assert not np.any(scores == cal["threshold_f1"])
    pred = scores > cal["threshold_f1"]
    f1 = 2 * (pred & (labels == 1)).sum() / (pred.sum() + labels.sum())
    assert f1 == pytest.approx(result.metrics["image_f1max"], abs=1e-6)
    # per_image.csv's normalised score reads 0.5 at the default threshold.
    for r in result.records:
        assert (r["score_normalised"] > 0.5) == (r["score"] > cal["threshold_normal"]) == bool(r["anomalous"])


def test_normalisation_is_one_fixed_map_not_per_image_min_max():
    cal = {"threshold_f1": 2.0, "threshold_normal": 3.0, "default": "normal", "map_offset": 1.0}
    name, threshold = E.pick_threshold(cal)
    assert (name, threshold) == ("normal", 3.0)
    assert threshold_scale(3.0, threshold, 1.0) == pytest.approx(0.5)
    constant = np.full((8, 8), 1.4)  # a calm map: same value everywhere, below the threshold
    shown = threshold_scale(constant, threshold, 1.0)
    assert np.allclose(shown, 0.1)  # stays low (per-image min-max would give 0/0 or stretch)
    varied = constant + np.linspace(0, 0.01, 64).reshape(8, 8)
    assert threshold_scale(varied, threshold, 1.0).max() < 0.11
    assert E.pick_threshold(cal, "f1") == ("f1", 2.0)
    assert E.pick_threshold(cal, "2.5") == ("custom", 2.5)
    with pytest.raises(ValueError, match="recontrast evaluate"):
        E.pick_threshold({}, "normal")
    with pytest.raises(ValueError, match="'normal', 'f1' or a number"):
        E.pick_threshold(cal, "median")


def test_make_eval_fn_returns_metrics_only(evaluated, tmp_path):
    ckpt, result, _, datasets = evaluated
    model, cfg, _ = load_model(ckpt)
    eval_fn = E.make_eval_fn(datasets.test, cfg.eval)
    metrics = eval_fn(model, 3)
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert metrics[key] == pytest.approx(result.metrics[key], abs=1e-9)
    assert "image_f1_threshold" not in metrics
    # Without masks (a user's folder of images): image metrics, pixel metrics n/a with a note.
    no_masks = datasets.test.subset(range(len(datasets.test)))
    no_masks.has_masks = False
    unmasked = E.evaluate(model, no_masks, cfg.eval)
    assert "image_auroc" in unmasked.metrics and math.isnan(unmasked.metrics["pixel_auroc"])
    assert unmasked.notes == [E.NO_MASKS]
    assert unmasked.calibration["normal_source"] == "test_good"


def test_proxy_metrics_per_kind_equal_evaluating_that_kind_alone(evaluated, tmp_path):
    """proxy/<kind>/* are the metrics of that kind's defects against all good images, as if
    evaluated alone; proxy/* the whole set's, as evaluate() gives; the report lists both."""
    from torch.utils.data import Subset

    from recontrast.defects import KINDS, ProxyDataset

    ckpt, _, _, datasets = evaluated
    model, cfg, _ = load_model(ckpt)
    proxy = ProxyDataset(datasets.test, seed=0)  # 15 base images: every kind at least twice
    metrics = E.proxy_metrics(model, proxy, cfg.eval)
    whole = E.evaluate(model, proxy, cfg.eval).metrics
    for key in E.PROXY_KEYS:
        assert metrics[f"proxy/{key}"] == pytest.approx(whole[key], abs=1e-12)
    n = len(datasets.test)
    kinds = [proxy[n + i]["defect_type"].removeprefix("synthetic_") for i in range(n)]
    assert set(kinds) == set(KINDS)
    for kind in KINDS:
        alone = E.evaluate(model, Subset(proxy, [*range(n), *(n + i for i, k in enumerate(kinds) if k == kind)]),
                           cfg.eval).metrics
        # Other batches: the maps differ in the last bits, a pixel may fall into the next bin.
        for key in E.PROXY_KEYS:
            assert metrics[f"proxy/{kind}/{key}"] == pytest.approx(alone[key], abs=1e-5), (kind, key)
        assert metrics[f"proxy/{kind}/score"] == pytest.approx(np.mean([alone[k] for k in E.PROXY_KEYS]), abs=1e-5)
    result = E.EvalResult(metrics=metrics, records=[], calibration={})
    report.write_outputs(result, cfg.eval, tmp_path, "proxy")
    with open(tmp_path / "proxy_kinds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == [*KINDS, "all"]
    assert float(rows[-1]["aupro"]) == pytest.approx(metrics["proxy/aupro"])
    table = report.proxy_table(metrics).splitlines()
    assert len(table) == len(KINDS) + 2 and table[-1].split()[0] == "all"
    assert table[-1].split()[-1] == f"{100 * metrics['proxy/score']:.2f}"


def test_main_evaluate_logs_to_tracking_when_asked(evaluated, tmp_path, monkeypatch):
    import shutil

    from recontrast import tracking

    ckpt = shutil.copy(evaluated[0], tmp_path / "copy.ckpt")
    calls = []
    monkeypatch.setattr(tracking, "log_evaluation", lambda result, checkpoint: calls.append(checkpoint))
    quick = ["eval.figures=false", "eval.gif=false", "tracking.enabled=true"]
    result = pipeline.run_evaluation(ckpt, out=tmp_path / "e", overrides=quick, track=True)
    assert calls == [ckpt] and not result.figures
    # Evaluating another category never overwrites the model's own calibration.
    before = load_checkpoint(ckpt)["calibration"]
    other = pipeline.run_evaluation(ckpt, category="grain", out=tmp_path / "g", overrides=quick, track=False)
    assert other.calibration["category"] == "grain" and len(calls) == 1
    assert load_checkpoint(ckpt)["calibration"] == before

    def broken(result, checkpoint):
        raise ConnectionError("tracking server down")

    monkeypatch.setattr(tracking, "log_evaluation", broken)
    with pytest.warns(RuntimeWarning, match="tracking server down"):  # outputs are kept
        assert pipeline.run_evaluation(ckpt, out=tmp_path / "e", overrides=quick, track=True).metrics


def test_a_test_set_of_one_class_evaluates_without_calibration(evaluated, tmp_path):
    """Only defect images and no held-out good ones: metrics are NaN, nothing crashes, and the
    per-image records say they are not calibrated instead of inventing a threshold."""
    from recontrast.model import load_model

    ckpt, _, _, datasets = evaluated
    model, cfg, _ = load_model(ckpt)
    defects = [i for i, s in enumerate(datasets.test.samples) if s.label == 1]
    result = E.evaluate(model, datasets.test.subset(defects), cfg.eval, keep_samples=True)
    report.write_outputs(result, cfg.eval, tmp_path, "defects only")
    assert math.isnan(result.metrics["image_auroc"])
    assert all(r["anomalous"] == -1 and math.isnan(r["score_normalised"]) for r in result.records)
    assert (tmp_path / "per_image.csv").is_file()
