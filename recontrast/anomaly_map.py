"""Anomaly maps and image scores from the model's (target, prediction) feature pairs.

method.md: per pair 1 - cosine similarity along channels, bilinear upsampling to the image
size, SUM over the pairs, Gaussian smoothing with sigma 4; the image score is the map's
maximum (option: the mean of the top 1 % pixels).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from kornia.filters import gaussian_blur2d
from torch import Tensor

from recontrast.config import EvalConfig, check_level_weights

COMBINES = ("sum", "mean", "product")
SCORES = ("max", "topk_mean")


def kernel_size_for(sigma: float) -> int:
    """Returns the odd Gaussian kernel size 2 * int(4 * sigma + 0.5) + 1 (scipy's truncate=4)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


@torch.no_grad()
def anomaly_map(
    pairs: Sequence[tuple[Tensor, Tensor]],
    size: int | tuple[int, int],
    combine: str = "sum",
    sigma: float = 4.0,
    level_weights: Sequence[float] | None = None,
) -> Tensor:
    """Returns the (B, 1, H, W) float32 anomaly maps, on the pairs' device.

    pairs: (target, prediction) tensors, each (B, C_l, h_l, w_l); any float dtype (AMP
    outputs are promoted to float32 before the cosine). size: H or (H, W).
    combine: "sum" (the paper's), "mean" or "product" over the pairs.
    sigma: Gaussian smoothing; 0 turns it off. The border is kornia's "reflect" (mirror
    without repeating the edge pixel), where the reference's scipy.ndimage.gaussian_filter
    repeats it: the two differ only within 4 * sigma pixels of the border, and little.
    level_weights: one weight per encoder level (shallow to deep); pair i gets
    level_weights[i % len(level_weights)], so (1, 1, 0) drops level 3 of both heads. None
    (or all ones) is the paper's map. Sum and mean weight each distance map, product raises
    it to the weight's power; mean divides by the sum of the weights.
    """
    _check(combine, sigma)
    return _map(_distances(pairs, size), combine, sigma, pair_weights(len(pairs), level_weights))


def _check(combine: str, sigma: float) -> None:
    """Raises ValueError for a combine or sigma _map cannot use: before any work, so a bad option is said at once."""
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is not one of {', '.join(COMBINES)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")


def _distances(pairs: Sequence[tuple[Tensor, Tensor]], size: int | tuple[int, int]) -> list[Tensor]:
    """Returns each pair's (B, 1, H, W) float32 map of 1 - cosine along channels, upsampled to `size`."""
    if not pairs:
        raise ValueError("anomaly_map needs at least one (target, prediction) pair")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    dists = []
    for target, prediction in pairs:
        # (B, C, h, w) x2 -> (B, 1, h, w); clamp: float error can make cos exceed 1 slightly.
        dist = 1.0 - F.cosine_similarity(target.float(), prediction.float(), dim=1)
        dist = rearrange(dist.clamp_min(0.0), "b h w -> b 1 h w")
        # align_corners=True as in the ReContrast / RD4AD reference code.
        dists.append(F.interpolate(dist, size=hw, mode="bilinear", align_corners=True))
    return dists


def _map(dists: list[Tensor], combine: str, sigma: float, weights: list[float]) -> Tensor:
    """Returns the smoothed map of the pairs' distance maps, weighted and combined as `combine`
    says (options checked by _check)."""
    total: Tensor | None = None
    for dist, weight in zip(dists, weights):
        if weight != 1.0:
            dist = dist.pow(weight) if combine == "product" else dist * weight
        if total is None:
            total = dist
        elif combine == "product":
            total = total * dist
        else:
            total = total + dist
    assert total is not None
    if combine == "mean":
        total = total / sum(weights)
    return smooth(total, sigma)


def pair_weights(n_pairs: int, level_weights: Sequence[float] | None = None) -> list[float]:
    """Returns the weight of each of `n_pairs` pairs: level_weights repeated over the heads."""
    if not level_weights:
        return [1.0] * n_pairs
    check_level_weights(level_weights)
    return [float(level_weights[i % len(level_weights)]) for i in range(n_pairs)]


def maps_for(pairs: Sequence[tuple[Tensor, Tensor]], size: int | tuple[int, int], eval_cfg: EvalConfig) -> Tensor:
    """Returns anomaly_map(pairs, size) with the combine, sigma and level weights of `eval_cfg`."""
    return anomaly_map(pairs, size, eval_cfg.combine, eval_cfg.sigma, eval_cfg.level_weights)


def separate_score(eval_cfg: EvalConfig) -> bool:
    """Returns whether the image score comes from another map than the anomaly map (eval.score_combine)."""
    return eval_cfg.score_combine not in ("map", eval_cfg.combine)


@torch.no_grad()
def maps_and_scores(pairs: Sequence[tuple[Tensor, Tensor]], size: int | tuple[int, int],
                    eval_cfg: EvalConfig) -> tuple[Tensor, Tensor]:
    """Returns the (B, 1, H, W) anomaly maps of `pairs` (maps_for) and their (B,) image scores:
    the maps' maximum (or top-k mean) or, with eval.score_combine naming another combine, that
    of the pairs' map of that combine (same sigma and level weights)."""
    if not separate_score(eval_cfg):
        maps = maps_for(pairs, size, eval_cfg)
        return maps, image_score(maps, eval_cfg.score, eval_cfg.topk)
    _check(eval_cfg.combine, eval_cfg.sigma)
    _check(eval_cfg.score_combine, eval_cfg.sigma)
    dists = _distances(pairs, size)  # once, for both maps
    weights = pair_weights(len(pairs), eval_cfg.level_weights)
    maps = _map(dists, eval_cfg.combine, eval_cfg.sigma, weights)
    scored = _map(dists, eval_cfg.score_combine, eval_cfg.sigma, weights)
    return maps, image_score(scored, eval_cfg.score, eval_cfg.topk)


def smooth(maps: Tensor, sigma: float) -> Tensor:
    """Returns (B, 1, H, W) maps blurred by a Gaussian of std `sigma` (0: unchanged)."""
    if sigma <= 0:
        return maps
    ksize = kernel_size_for(sigma)
    # Reflect padding needs pad < side: tiny maps get a truncated (renormalised) kernel.
    ksize = min(ksize, 2 * (min(maps.shape[-2:]) - 1) + 1)
    if ksize < 3:
        return maps
    return gaussian_blur2d(maps, (ksize, ksize), (sigma, sigma), border_type="reflect")


def image_score(maps: Tensor, mode: str = "max", topk: float = 0.01) -> Tensor:
    """Returns the (B,) image scores: each map's maximum, or ("topk_mean") the mean of its
    top `topk` fraction of pixels (at least one pixel).

    maps: (B, 1, H, W) or (B, H, W).
    """
    if mode not in SCORES:
        raise ValueError(f"score mode {mode!r} is not one of {', '.join(SCORES)}")
    flat = maps.reshape(maps.shape[0], -1)  # (B, H*W)
    if mode == "max":
        return flat.amax(dim=1)
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be in (0, 1], got {topk}")
    k = max(1, int(topk * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def max_map_value(n_pairs: int, combine: str = "sum", level_weights: Sequence[float] | None = None) -> float:
    """Returns the largest value an anomaly map can take (1 - cos lies in [0, 2]).

    K pairs with weights w_i (all 1 by default): sum <= 2 * sum(w), mean <= 2,
    product <= 2^sum(w). Smoothing (a weighted average) and the max / top-k mean scores keep
    the bound, so scores / bound lie in [0, 1].
    """
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is not one of {', '.join(COMBINES)}")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    total = sum(pair_weights(n_pairs, level_weights))
    return {"sum": 2.0 * total, "mean": 2.0, "product": 2.0**total}[combine]
