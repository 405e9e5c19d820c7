"""Image metrics (exact, torchmetrics) and streaming pixel metrics (histograms) incl. AUPRO.

Image level: ~100 scores per test set, so AUROC / AP / F1-max are exact (every distinct
score is a threshold). Pixel level: millions of pixels, so `PixelMetrics` keeps three
histograms over adaptive bins instead of the pixels; method.md's AUPRO is the standard
dataset-level one (MVTec AD paper), not the reference code's per-image variant.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
)

NAN = float("nan")
# 8-connectivity, as the MVTec AD evaluation code (scipy.ndimage.label, 3x3 ones) and
# anomalib (OpenCV) label ground-truth regions; scipy's default would be 4-connectivity.
REGION_STRUCTURE = np.ones((3, 3), dtype=int)


def _unit_ranks(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (scores mapped into [0, 1] by dense rank, the sorted distinct raw scores).

    torchmetrics reads floats outside [0, 1] as logits and applies a sigmoid, which
    saturates raw scores > ~10 into ties. Ranks keep the order and the ties exactly, so
    every ranking metric is unchanged, and unit value u maps back to values[u * (n - 1)].
    """
    values, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    return inverse.double() / max(len(values) - 1, 1), values


def _as_scores_labels(scores, labels) -> tuple[Tensor, Tensor]:
    scores = torch.as_tensor(scores).detach().flatten().cpu().double()
    labels = torch.as_tensor(labels).detach().flatten().cpu().long()
    if scores.shape != labels.shape:
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    if not torch.isfinite(scores).all():
        raise ValueError("image scores contain NaN or inf; check the model's outputs")
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defect)")
    return scores, labels


def image_metrics(scores, labels) -> dict[str, float]:
    """Returns image_auroc, image_ap, image_f1max and image_f1_threshold (raw score units).

    scores: (N,) raw image scores (any range); labels: (N,) 0 good / 1 defect. Predicting
    "defect" for score >= image_f1_threshold reaches image_f1max. All NaN when the labels
    hold a single class (the metrics are undefined).
    """
    scores, labels = _as_scores_labels(scores, labels)
    if labels.min() == labels.max():
        warnings.warn("image metrics need both good and defect images; returning NaN")
        return {"image_auroc": NAN, "image_ap": NAN, "image_f1max": NAN, "image_f1_threshold": NAN}
    unit, values = _unit_ranks(scores)
    precision, recall, thresholds = binary_precision_recall_curve(unit, labels)
    f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0.0)[:-1]  # last: no threshold
    best = int(f1.argmax())
    threshold = values[int(round(float(thresholds[best]) * (len(values) - 1)))]
    return {
        "image_auroc": float(binary_auroc(unit, labels)),
        "image_ap": float(binary_average_precision(unit, labels)),
        "image_f1max": float(f1[best]),
        "image_f1_threshold": float(threshold),
    }


def per_defect_auroc(scores, labels, defect_types: Sequence[str]) -> dict[str, float]:
    """Returns {defect type: image AUROC of that type's images against all good images}.

    defect_types: one name per image (good images' names are ignored: label 0 = good).
    """
    scores, labels = _as_scores_labels(scores, labels)
    types = np.asarray(list(defect_types), dtype=object)
    if len(types) != len(scores):
        raise ValueError(f"{len(types)} defect types but {len(scores)} scores")
    good = labels == 0
    out: dict[str, float] = {}
    for name in sorted(set(types[labels.numpy() == 1])):
        keep = good | torch.from_numpy(types == name)
        auroc = binary_auroc(_unit_ranks(scores[keep])[0], labels[keep]) if good.any() else NAN
        out[name] = float(auroc)
    return out


class PixelMetrics:
    """Streams pixel AUROC, AP, F1-max and AUPRO over a test set in O(num_bins) memory.

    State (on the CPU: tiny, and CPU bincount with weights is deterministic):
      pos, neg: (num_bins,) int64, counts of defect / normal pixels per bin;
      pro: (num_bins,) float64, each defect pixel weighted by 1 / (size of its region);
      n_regions: ground-truth regions seen (8-connected components of each mask).
    Bin i holds values in [i*w, (i+1)*w), with w = 2**exponent the smallest power of two
    such that num_bins * w exceeds the largest value seen. A larger value doubles w by
    merging bin pairs (2j, 2j+1) -> j, which equals binning afresh (power-of-two scaling
    is exact), so the final bins do not depend on the order the maps arrive in, and
    w <= 2 * max / num_bins (maps up to 6, 16384 bins: w = 2**-11 ~ 4.9e-4).

    Metrics use the bin edges as thresholds (pixel positive when value >= edge). The
    counts above an edge are exact, so each streamed curve point IS a point of the exact
    curve; only thresholds inside a bin are missed. Error bounds (`error_bounds()` gives
    them for the data seen; below 1e-3 at 16384 bins on realistic maps, where the tests
    measure deviations from sklearn / an exact AUPRO of at most 2e-7 AUROC, 6e-5 AP,
    4.4e-4 F1-max, 4e-6 AUPRO):
      AUROC: |err| <= 1/2 sum_i p_i n_i (p_i, n_i: fraction of defect / normal pixels in
        bin i), half the fraction of (defect, normal) pairs that share a bin;
      AP: |err| <= sum_i dRecall_i * (spread of precision over thresholds inside bin i);
      F1-max: 0 <= exact - streamed <= max_i (best F1 reachable inside bin i) - streamed;
      AUPRO: |err| <= sum_i dFPR_i * dPRO_i / 2 over the bins below the FPR limit (plus
        (limit - FPR_i) * dPRO_i for the bin straddling it), divided by the limit.
    AUPRO: PRO(t) = mean over ALL regions of the dataset of the fraction of the region's
    pixels >= t; FPR(t) over all normal pixels of all images; PRO integrated over FPR in
    [0, pro_fpr_limit] (interpolated at the limit), divided by the limit.
    """

    def __init__(self, num_bins: int = 16384, pro_fpr_limit: float = 0.3):
        if num_bins < 2 or num_bins % 2:
            raise ValueError(f"num_bins must be an even number >= 2, got {num_bins}")
        if not 0.0 < pro_fpr_limit <= 1.0:
            raise ValueError(f"pro_fpr_limit must be in (0, 1], got {pro_fpr_limit}")
        self.num_bins = num_bins
        self.pro_fpr_limit = pro_fpr_limit
        self.reset()

    def reset(self) -> None:
        """Forgets every update."""
        self.exponent: int | None = None  # bin width = 2 ** exponent; set by the first update
        self.pos = torch.zeros(self.num_bins, dtype=torch.int64)
        self.neg = torch.zeros(self.num_bins, dtype=torch.int64)
        self.pro = torch.zeros(self.num_bins, dtype=torch.float64)
        self.n_regions = 0

    @property
    def bin_width(self) -> float:
        return NAN if self.exponent is None else 2.0**self.exponent

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Adds a batch. maps: (B, 1, H, W) or (B, H, W), values >= 0; masks: same shape,
        ground truth (binarised as > 0.5)."""
        if maps.shape[-2:] != masks.shape[-2:] or maps.numel() != masks.numel():
            raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ")
        maps = maps.detach().float().cpu().reshape(-1, *maps.shape[-2:])  # (B, H, W)
        masks = masks.detach().cpu().reshape(maps.shape) > 0.5  # (B, H, W) bool
        if not torch.isfinite(maps).all():
            raise ValueError("anomaly maps contain NaN or inf; check the model's outputs")
        if maps.numel() == 0:
            return
        if maps.min() < 0:
            raise ValueError("anomaly maps must be >= 0 (1 - cosine is); shift them first")
        self._fit_range(float(maps.max()))
        # Exact: scaling by a power of two, so floor() puts a value in its true bin.
        idx = (maps * 2.0 ** -self.exponent).floor().long().clamp_(max=self.num_bins - 1)
        weights, n_regions = _region_weights(masks)  # (defect pixels,) float64
        self.neg += torch.bincount(idx[~masks], minlength=self.num_bins)
        self.pos += torch.bincount(idx[masks], minlength=self.num_bins)
        self.pro += torch.bincount(idx[masks], weights=weights, minlength=self.num_bins)
        self.n_regions += n_regions

    def _fit_range(self, vmax: float) -> None:
        """Widens the bins until num_bins * width > vmax."""
        if self.exponent is None:
            top = math.frexp(vmax)[1] if vmax > 0 else 0  # vmax < 2**top
            self.exponent = top - int(math.log2(self.num_bins))
        half = self.num_bins // 2
        while vmax >= self.num_bins * 2.0**self.exponent:
            for name in ("pos", "neg", "pro"):
                h = getattr(self, name)  # (num_bins,) -> pairs summed (half,) + empty (half,)
                setattr(self, name, torch.cat([h.view(half, 2).sum(1), torch.zeros_like(h[:half])]))
            self.exponent += 1

    def _curves(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Returns float64 (num_bins + 1,) tp, fp, pro sums from the highest threshold down
        (index 0: above every value; k: at the lower edge of bin num_bins - k), and the
        (num_bins,) per-bin pos, neg, pro in the same descending order."""
        pos, neg, pro = (h.flip(0).double() for h in (self.pos, self.neg, self.pro))
        zero = torch.zeros(1, dtype=torch.float64)
        cum = [torch.cat([zero, h.cumsum(0)]) for h in (pos, neg, pro)]
        return (*cum, pos, neg, pro)

    def compute(self) -> dict[str, float]:
        """Returns pixel_auroc, pixel_ap, pixel_f1max and aupro (NaN when undefined)."""
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            warnings.warn("pixel metrics need both defect and normal pixels; returning NaN")
            return {"pixel_auroc": NAN, "pixel_ap": NAN, "pixel_f1max": NAN, "aupro": NAN}
        tp, fp, pro, *_ = self._curves()
        tpr, fpr = tp / n_pos, fp / n_neg
        precision = (tp / (tp + fp)).nan_to_num(1.0)
        limit = self.pro_fpr_limit
        return {
            "pixel_auroc": float(torch.trapezoid(tpr, fpr)),
            "pixel_ap": float((tpr.diff() * precision[1:]).sum()),
            "pixel_f1max": float((2 * tp / (tp + fp + n_pos)).max()),
            "aupro": _area_up_to(fpr, pro / self.n_regions, limit) / limit,
        }

    def error_bounds(self) -> dict[str, float]:
        """Returns the largest possible |streamed - exact| per metric for the data seen."""
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            return {"pixel_auroc": NAN, "pixel_ap": NAN, "pixel_f1max": NAN, "aupro": NAN}
        tp, fp, pro, pos, neg, _ = self._curves()
        above_tp, above = tp[:-1], tp[:-1] + fp[:-1]  # (num_bins,) counts above each bin
        # Precision at a threshold inside bin i that adds defect pixels (so recall moves):
        # between 1 defect + all normal pixels of the bin and all defect + no normal pixels.
        p_hi = ((above_tp + pos) / (above + pos)).nan_to_num(0.0)
        p_lo = (above_tp + 1) / (above + 1 + neg)
        f1_hi = 2 * (above_tp + pos) / (above + pos + n_pos)
        fpr, pro = fp / n_neg, pro / self.n_regions
        x0, x1, limit = fpr[:-1], fpr[1:], self.pro_fpr_limit
        width = torch.where(x1 <= limit, (x1 - x0) / 2, (limit - x0).clamp_min(0.0))
        return {
            "pixel_auroc": float(0.5 * (pos / n_pos * neg / n_neg).sum()),
            "pixel_ap": float((pos / n_pos * (p_hi - p_lo)).sum()),
            "pixel_f1max": float(f1_hi.max()) - self.compute()["pixel_f1max"],
            "aupro": float((width * pro.diff()).sum()) / limit,
        }


def _region_weights(masks: Tensor) -> tuple[Tensor, int]:
    """Returns (1 / size of its region for each True pixel of masks (B, H, W), in
    masks[masks] order, as float64; the number of regions)."""
    weights, n_regions = [], 0
    for mask in masks.numpy():
        labels, n = ndimage.label(mask, structure=REGION_STRUCTURE)  # (H, W) int, 0 = normal
        sizes = np.bincount(labels.ravel())
        weights.append(1.0 / sizes[labels[mask]])
        n_regions += n
    return torch.from_numpy(np.concatenate(weights)).double(), n_regions


def _area_up_to(x: Tensor, y: Tensor, limit: float) -> float:
    """Returns the trapezoid area under y(x) for x in [0, limit], x nondecreasing from 0,
    interpolating y linearly at x = limit."""
    k = int(torch.searchsorted(x, torch.tensor([limit], dtype=x.dtype), right=True))
    xs, ys = x[:k], y[:k]
    if k < len(x):  # x[k - 1] <= limit < x[k]
        y_at = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        xs = torch.cat([xs, xs.new_tensor([limit])])
        ys = torch.cat([ys, y_at.reshape(1)])
    return float(torch.trapezoid(ys, xs))


def compute_all(
    scores, labels, defect_types: Sequence[str] | None = None, pixel: PixelMetrics | None = None
) -> dict[str, float]:
    """Returns one flat dict: image metrics, image_auroc_<type> per defect type, and the
    pixel metrics of `pixel` when given (keys as in image_metrics / PixelMetrics.compute)."""
    out = image_metrics(scores, labels)
    if defect_types is not None:
        for name, value in per_defect_auroc(scores, labels, defect_types).items():
            out[f"image_auroc_{name}"] = value
    if pixel is not None:
        out.update(pixel.compute())
    return out
