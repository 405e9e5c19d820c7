"""Global cosine loss with hard mining (method.md, "Loss"), and its alpha warm-up schedule.

Per (target t, prediction p) pair, each (B, C, H, W):
- d = 1 - cos(t, p) along channels, per pixel, without gradient: (B, H, W);
- thr = mean(d) + alpha * std(d) over the batch and all pixels of the level;
- value = mean over samples of 1 - cos(t_b, p_b), t_b and p_b flattened to C*H*W ("global"),
  or the mean of d ("regional"); the logged value is never masked;
- hard mining: a gradient hook on p multiplies the gradient by `factor` where d < thr.
Total: 0.5 * (sum over head-0 levels) + 0.5 * (sum over head-1 levels) for the 6 pairs of the
full model. With 3 pairs (domain adaptation off) the total is the plain sum over the 3 levels,
so one head's reconstruction carries the same weight in both settings (RD4AD's loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from recontrast.config import LossConfig

Pairs = list[tuple[Tensor, Tensor]]


def alpha_at(iteration: int, total_iters: int, alpha_start: float = -3.0, alpha_end: float = 1.0,
             warmup_fraction: float = 0.1, warmup_min_iters: int = 0) -> float:
    """Returns alpha at `iteration`: linear from alpha_start to alpha_end over the warm-up
    (max(warmup_fraction * total_iters, warmup_min_iters) iterations), then alpha_end."""
    warmup = max(warmup_fraction * total_iters, warmup_min_iters)
    if warmup <= 0:
        return float(alpha_end)
    return float(min(alpha_start + (alpha_end - alpha_start) * iteration / warmup, alpha_end))


def point_distance(target: Tensor, pred: Tensor) -> Tensor:
    """Returns 1 - cos(target, pred) along channels: (B, C, H, W) x2 -> (B, H, W)."""
    return 1 - F.cosine_similarity(target, pred, dim=1)


def global_distance(target: Tensor, pred: Tensor) -> Tensor:
    """Returns 1 - cos over each sample's whole C*H*W vector: (B, C, H, W) x2 -> (B,)."""
    t = rearrange(target, "b c h w -> b (c h w)")
    p = rearrange(pred, "b c h w -> b (c h w)")
    return 1 - F.cosine_similarity(t, p, dim=1)


def batch_moments(d: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (mean, unbiased std) of the batch's point distances `d`."""
    return d.mean(), d.std()


def hard_mining_mask(target: Tensor, pred: Tensor, alpha: float, moments=batch_moments) -> Tensor:
    """Returns the (B, 1, H, W) bool mask of well-reconstructed points: d < mean + alpha*std,
    mean and std as `moments(d)` gives them (distributed.global_moments: over all ranks)."""
    with torch.no_grad():
        d = point_distance(target.float(), pred.float())
        mean, std = moments(d)
        return rearrange(d < mean + alpha * std, "b h w -> b 1 h w")


class ReContrastLoss:
    """Callable loss: `loss(pairs, iteration) -> (total, info)`; see the module docstring."""

    # The hard-mining threshold's statistics of the point distances (a subclass may take them
    # over more than this process's batch: distributed.GlobalBatchLoss).
    moments = staticmethod(batch_moments)

    def __init__(self, cfg: LossConfig, total_iters: int) -> None:
        if cfg.kind not in ("global", "regional"):
            raise ValueError(f"loss.kind must be 'global' or 'regional', got {cfg.kind!r}")
        self.cfg = cfg
        self.total_iters = total_iters

    def alpha_at(self, iteration: int) -> float:
        """Returns the hard-mining alpha at `iteration` for this run's length."""
        c = self.cfg
        return alpha_at(iteration, self.total_iters, c.alpha_start, c.alpha_end,
                        c.warmup_fraction, c.warmup_min_iters)

    def __call__(self, pairs: Pairs, iteration: int) -> tuple[Tensor, dict]:
        """Returns (total loss, {'alpha': float, 'pair_losses': detached (n_pairs,) tensor})."""
        if len(pairs) not in (3, 6):
            raise ValueError(f"expected 3 or 6 (target, prediction) pairs, got {len(pairs)}")
        alpha = self.alpha_at(iteration)
        values = [self._pair_loss(t, p, alpha) for t, p in pairs]
        weight = 0.5 if len(pairs) == 6 else 1.0
        total = weight * torch.stack(values).sum()
        return total, {"alpha": alpha, "pair_losses": torch.stack(values).detach()}

    def _pair_loss(self, target: Tensor, pred: Tensor, alpha: float) -> Tensor:
        if self.cfg.stop_grad:
            target = target.detach()
        if self.cfg.hard_mining and pred.requires_grad:
            easy = hard_mining_mask(target, pred, alpha, self.moments)
            factor = self.cfg.factor
            pred.register_hook(lambda g: torch.where(easy, g * factor, g))
        if self.cfg.kind == "global":
            return global_distance(target, pred).mean()
        return point_distance(target, pred).mean()
