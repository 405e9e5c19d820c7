"""Behaviour of recontrast/metrics.py: image metrics equal sklearn's for any score range;
streamed pixel metrics equal the exact ones within the documented bound; AUPRO follows the
standard dataset-level definition."""
import numpy as np
import pytest
import torch
from skimage.measure import label as sk_label
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
)
from torchmetrics.functional.classification import binary_auroc

from recontrast.metrics import PixelMetrics, compute_all, image_metrics, per_defect_auroc

TOL = 1e-3  # the accuracy promised at 16384 bins on realistic maps


def _f1max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    return f1.max()


def _image_set(lo, hi, seed=0, n=100):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.6).astype(int)
    scores = lo + (hi - lo) * np.clip(rng.normal(0.45 + 0.2 * labels, 0.2), 0, 1)
    scores[:5] = scores[5]  # ties
    return scores, labels


@pytest.mark.parametrize("lo, hi", [(5.0, 12.0), (20.0, 60.0), (0.1, 0.4)])
def test_image_metrics_equal_sklearn_for_raw_scores_above_one(lo, hi):
    scores, labels = _image_set(lo, hi)
    m = image_metrics(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels))
    scores = np.float32(scores).astype(np.float64)  # what the function saw
    # torchmetrics returns float32: equal up to its rounding.
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert m["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert m["image_f1max"] == pytest.approx(_f1max(labels, scores), abs=1e-6)
    # The threshold is in raw units and reproduces F1-max with score >= threshold.
    assert lo <= m["image_f1_threshold"] <= hi
    predicted = (scores >= m["image_f1_threshold"]).astype(int)
    assert f1_score(labels, predicted) == pytest.approx(m["image_f1max"], abs=1e-6)


def test_raw_scores_would_hit_the_sigmoid_trap():
    # Why image_metrics maps scores into [0, 1]: torchmetrics reads them as logits.
    scores, labels = _image_set(20.0, 60.0)
    raw = float(binary_auroc(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels)))
    assert abs(raw - roc_auc_score(labels, scores)) > 0.05


def test_single_class_gives_nan_with_a_warning():
    with pytest.warns(UserWarning, match="both good and defect"):
        m = image_metrics([1.0, 2.0, 3.0], [0, 0, 0])
    assert all(np.isnan(v) for v in m.values())


def test_per_defect_auroc_is_each_type_against_all_good():
    scores, labels = _image_set(5.0, 12.0, seed=1, n=60)
    rng = np.random.default_rng(1)
    types = np.where(labels == 1, rng.choice(["crack", "hole", "scratch"], len(labels)), "good")
    out = per_defect_auroc(scores, labels, list(types))
    assert sorted(out) == ["crack", "hole", "scratch"]
    for name, value in out.items():
        keep = (labels == 0) | (types == name)
        assert value == pytest.approx(roc_auc_score(labels[keep], scores[keep]), abs=1e-6)
    flat = compute_all(scores, labels, list(types))
    assert flat["image_auroc_hole"] == out["hole"] and "image_f1max" in flat


# ---------------------------------------------------------------- pixel metrics


def _realistic(n=8, size=64, seed=0):
    """Returns maps (n, 1, size, size) in ~[0, 6] and masks: elliptic defects (none in
    the first two images) under Gaussian bumps that spill over, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    maps = rng.uniform(0.0, 1.0, (n, size, size)) + 0.3 * rng.random((n, 1, 1))
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(2, n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(8, size - 8, 2)
            ry, rx = rng.uniform(2, 8, 2)
            d2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            masks[i][d2 <= 1] = 1
            maps[i] += rng.uniform(0.5, 4.5) * np.exp(-d2 / 2.5)
    return torch.tensor(maps, dtype=torch.float32).unsqueeze(1), torch.tensor(masks).unsqueeze(1)


def _exact_pixel(maps, masks):
    v = maps.flatten().double().numpy()
    y = masks.flatten().numpy().astype(int)
    return {
        "pixel_auroc": roc_auc_score(y, v),
        "pixel_ap": average_precision_score(y, v),
        "pixel_f1max": _f1max(y, v),
    }


def _exact_aupro(maps, masks, limit):
    """Per-threshold loop over every distinct value (MVTec AD definition, skimage labels)."""
    maps = maps[:, 0].double().numpy()
    masks = masks[:, 0].numpy().astype(bool)
    regions = []
    for m, mask in zip(maps, masks):
        lab = sk_label(mask, connectivity=2)  # 8-connectivity
        regions += [m[lab == k] for k in range(1, lab.max() + 1)]
    normal = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append((normal >= t).mean())
        pros.append(np.mean([(r >= t).mean() for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    x = np.append(fprs[keep], limit)
    y = np.append(pros[keep], np.interp(limit, fprs, pros))
    return np.trapezoid(y, x) / limit


def test_streamed_pixel_metrics_match_sklearn_within_the_bound():
    maps, masks = _realistic()
    order = maps.amax(dim=(1, 2, 3)).argsort()  # increasing range: the bins must widen
    metrics = PixelMetrics()
    widths = []
    for idx in order.split(2):
        metrics.update(maps[idx], masks[idx])
        widths.append(metrics.bin_width)
    assert widths[-1] > widths[0]  # adaptive rebinning happened
    assert metrics.bin_width <= 2 * float(maps.max()) / metrics.num_bins
    got, bounds, exact = metrics.compute(), metrics.error_bounds(), _exact_pixel(maps, masks)
    for key, value in exact.items():
        deviation = abs(got[key] - value)
        assert deviation <= bounds[key] + 1e-12, (key, deviation, bounds[key])
        assert deviation < TOL and bounds[key] < TOL
    assert got["pixel_f1max"] <= exact["pixel_f1max"] + 1e-12  # a subset of thresholds

    # The final bins do not depend on the arrival order: one update gives the same state.
    once = PixelMetrics()
    once.update(maps, masks)
    assert once.exponent == metrics.exponent
    assert torch.equal(once.pos, metrics.pos) and torch.equal(once.neg, metrics.neg)
    assert torch.allclose(once.pro, metrics.pro, rtol=1e-12)


def test_streamed_aupro_matches_an_exact_reference():
    maps, masks = _realistic(n=5, size=32, seed=4)
    for limit in (0.3, 0.05):
        metrics = PixelMetrics(pro_fpr_limit=limit)
        for idx in torch.arange(5).split(2):
            metrics.update(maps[idx, 0], masks[idx, 0])  # (B, H, W) works too
        deviation = abs(metrics.compute()["aupro"] - _exact_aupro(maps, masks, limit))
        assert deviation <= metrics.error_bounds()["aupro"] + 1e-12
        assert deviation < TOL


def _hand_made():
    """Two 2x7 images, one region of 4 pixels each; 20 normal pixels.

    Region A: two pixels at 3, two at 1. Region B: all four at 2. Normal: two at 2 (tied
    with B), four at 1.5, the rest 0. Exact curve (FPR, PRO), threshold high to low:
    (0, 0) -> t=3 (0, .25) -> t=2 (.1, .75) -> t=1.5 (.3, .75) -> t=1 (.3, 1) -> (1, 1).
    AUPRO to 0.3: [.1 * (.25 + .75) / 2 + .2 * .75] / .3 = 2/3.
    AUPRO to 0.05: PRO(.05) = .5, [.05 * (.25 + .5) / 2] / .05 = .375.
    """
    maps = torch.zeros(2, 2, 7)
    masks = torch.zeros(2, 2, 7)
    masks[0, :, :2] = 1
    maps[0, :, 0], maps[0, :, 1] = 3.0, 1.0
    masks[1, :, 5:] = 1
    maps[1, :, 5:] = 2.0
    maps[0, 0, 4] = maps[1, 0, 2] = 2.0
    maps[0, 1, 3:5] = maps[1, 1, 2:4] = 1.5
    return maps, masks


@pytest.mark.parametrize("num_bins", [8, 16384])
def test_aupro_of_a_hand_made_case(num_bins):
    maps, masks = _hand_made()
    for limit, expected in ((0.3, 2 / 3), (0.05, 0.375)):
        metrics = PixelMetrics(num_bins=num_bins, pro_fpr_limit=limit)
        metrics.update(maps[:1], masks[:1])
        metrics.update(maps[1:], masks[1:])
        assert metrics.n_regions == 2
        # Values sit on bin edges, so even 8 bins are exact.
        assert metrics.compute()["aupro"] == pytest.approx(expected, abs=1e-12)
        assert metrics.compute()["aupro"] == pytest.approx(_exact_aupro(
            maps.unsqueeze(1), masks.unsqueeze(1), limit), abs=1e-12)


def test_regions_are_8_connected():
    masks = torch.zeros(1, 1, 6, 6)
    masks[0, 0, 1, 1] = masks[0, 0, 2, 2] = 1  # diagonal neighbours: one region
    masks[0, 0, 4, 4] = 1  # a second region
    metrics = PixelMetrics()
    metrics.update(torch.rand(1, 1, 6, 6), masks)
    assert metrics.n_regions == 2


def test_memory_stays_at_the_histograms_after_many_updates():
    maps, masks = _realistic(n=4, size=32, seed=2)
    metrics = PixelMetrics(num_bins=4096)

    def footprint():
        tensors = [v for v in vars(metrics).values() if isinstance(v, torch.Tensor)]
        assert not any(isinstance(v, (list, dict)) for v in vars(metrics).values())
        return sum(t.numel() * t.element_size() for t in tensors)

    metrics.update(maps, masks)
    before = footprint()
    for i in range(50):
        metrics.update(maps * (1 + i / 10), masks)  # growing values rebin on the way
    assert footprint() == before == 4096 * 3 * 8
    assert int(metrics.pos.sum() + metrics.neg.sum()) == 51 * maps.numel()


def test_bad_maps_are_refused_and_missing_classes_give_nan():
    metrics = PixelMetrics()
    with pytest.raises(ValueError, match=">= 0"):
        metrics.update(-torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        metrics.update(torch.full((1, 1, 4, 4), float("nan")), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="differ"):
        metrics.update(torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="even"):
        PixelMetrics(num_bins=7)
    metrics.update(torch.rand(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))  # good images only
    with pytest.warns(UserWarning, match="defect and normal"):
        assert np.isnan(metrics.compute()["aupro"])
