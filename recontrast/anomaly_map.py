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
) -> Tensor:
    """Returns the (B, 1, H, W) float32 anomaly maps, on the pairs' device.

    pairs: (target, prediction) tensors, each (B, C_l, h_l, w_l); any float dtype (AMP
    outputs are promoted to float32 before the cosine). size: H or (H, W).
    combine: "sum" (the paper's), "mean" or "product" over the pairs.
    sigma: Gaussian smoothing; 0 turns it off. The border is kornia's "reflect" (mirror
    without repeating the edge pixel), where the reference's scipy.ndimage.gaussian_filter
    repeats it: the two differ only within 4 * sigma pixels of the border, and little.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is not one of {', '.join(COMBINES)}")
    if not pairs:
        raise ValueError("anomaly_map needs at least one (target, prediction) pair")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    hw = (size, size) if isinstance(size, int) else tuple(size)

    total: Tensor | None = None
    for target, prediction in pairs:
        # (B, C, h, w) x2 -> (B, 1, h, w); clamp: float error can make cos exceed 1 slightly.
        dist = 1.0 - F.cosine_similarity(target.float(), prediction.float(), dim=1)
        dist = rearrange(dist.clamp_min(0.0), "b h w -> b 1 h w")
        # align_corners=True as in the ReContrast / RD4AD reference code.
        dist = F.interpolate(dist, size=hw, mode="bilinear", align_corners=True)
        if total is None:
            total = dist
        elif combine == "product":
            total = total * dist
        else:
            total = total + dist
    assert total is not None
    if combine == "mean":
        total = total / len(pairs)
    return smooth(total, sigma)


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


def max_map_value(n_pairs: int, combine: str = "sum") -> float:
    """Returns the largest value an anomaly map can take (1 - cos lies in [0, 2]).

    K pairs: sum <= 2K, mean <= 2, product <= 2^K. Smoothing (a weighted average) and the
    max / top-k mean scores keep the bound, so scores / bound lie in [0, 1].
    """
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is not one of {', '.join(COMBINES)}")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    return {"sum": 2.0 * n_pairs, "mean": 2.0, "product": 2.0**n_pairs}[combine]
