"""Whether a category's training images share one layout (train.pool_max_spread).

The coarse bottleneck code (model.bottleneck_pool > 1) rebuilds an object's normal layout, so a
part that is missing or moved shows in the map; where the pose varies from image to image it
rebuilds badly everywhere (screw lost 17 I-AUROC points with it and converged: the health check
cannot see that). The position spread tells the two apart before training, from the training
images alone (label-free): of the frozen encoder's feature variance at stride 8 (averaged to an
8 x 8 grid) over all images and positions, the share that lies within each position across the
images.

- 0: every image has the same feature at each position (an object held in one place);
- 1: a position says nothing about the feature (a texture, an object in any pose).

Measured on the dev categories (docs/recipe.md, "Choosing the code from the training images"):
bottle 0.03, disc 0.17, board 0.27 share a layout; screw 0.78, bar 0.79, mesh 0.88, weave 0.89,
grain 0.91 do not (256 px; at 320 px within 0.02 of these).
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from .config import Config, apply_overrides, fine_config
from .model import build_model
from .runtime import pick_device

log = logging.getLogger(__name__)

LEVEL = 1  # the frozen encoder's level at stride 8: its parts, not its pixels, not the whole object
# Its map is averaged down to GRID x GRID positions first: a layout is a matter of where the parts
# are, not of their finest detail, and the spread then hardly moves with the image size (board
# 0.27 at 256 px, 0.25 at 128; unpooled 0.59 and 0.36), while the textures stay above 0.7.
GRID = 8


@torch.no_grad()
def position_spread(model, dataset, batch_size: int = 16, device: str | torch.device = "cpu") -> float:
    """Returns the share of the frozen features' variance (level LEVEL averaged to a GRID x GRID
    map, every training image) that lies within a position across the images: sum_p sum_i |f_i(p) - m(p)|^2 over
    sum_p sum_i |f_i(p) - m|^2, m(p) the mean at position p, m the mean over all; in [0, 1]
    (0 for a single image or a constant one).
    Streams the images in batches (two sums, float64), so memory does not grow with the set."""
    per_position, squares, count = None, 0.0, 0
    for start in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[i]["image"] for i in range(start, min(len(dataset), start + batch_size))])
        f = model.frozen_features(x.to(device))[LEVEL].float()  # (B, C, H, W)
        f = F.adaptive_avg_pool2d(f, (min(GRID, f.shape[2]), min(GRID, f.shape[3]))).double()
        per_position = f.sum(0) if per_position is None else per_position + f.sum(0)
        squares += float((f * f).sum())
        count += f.shape[0]
    mean_at = per_position / count  # (C, H, W)
    positions = mean_at.shape[1] * mean_at.shape[2]
    within = squares - count * float((mean_at * mean_at).sum())
    total = squares - count * positions * float((mean_at.mean((1, 2)) ** 2).sum())
    return 0.0 if total <= 0 else min(max(within / total, 0.0), 1.0)


def choose_bottleneck_pool(cfg: Config, train_set) -> tuple[Config, float | None]:
    """Returns (cfg to train, position spread or None): with model.bottleneck_pool > 1 and
    train.pool_max_spread < 1, the training images' position spread is measured and, above the
    limit, cfg comes back with bottleneck_pool 1 and without train.pool_fallback (nothing
    coarse to fall back from). Otherwise cfg itself, unmeasured."""
    if cfg.model.bottleneck_pool <= 1 or cfg.train.pool_max_spread >= 1:
        return cfg, None
    # In fp32 whatever train.precision: the same number on every CPU and GPU.
    probe = apply_overrides(copy.deepcopy(cfg), {"train.precision": "fp32", "model.compile": False})
    device = pick_device(cfg.train.device)
    model = build_model(probe).to(device).eval()
    spread = position_spread(model, train_set, cfg.eval.batch_size, device)
    del model
    chosen = cfg if spread <= cfg.train.pool_max_spread else fine_config(cfg)
    log.info(verdict(spread, cfg))
    return chosen, spread


def verdict(spread: float, cfg: Config) -> str:
    """Returns the sentence that says which code the position spread chose for cfg (the config as
    asked, before the choice): logs, CLI, notebook 02. A later train.pool_fallback says its own."""
    limit = cfg.train.pool_max_spread
    if spread <= limit:
        return (f"position spread {spread:.3f} <= train.pool_max_spread {limit:g}: the training images share "
                f"a layout, model.bottleneck_pool={cfg.model.bottleneck_pool}")
    return (f"position spread {spread:.3f} > train.pool_max_spread {limit:g}: no layout shared by the "
            f"training images (a texture, or a pose that varies), model.bottleneck_pool=1")
