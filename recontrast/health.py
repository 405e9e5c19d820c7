"""Training health: did this run learn anything? Judged from what a user has without test
labels: the loss history and the proxy metrics (synthetic defects on held-out good images).

A run is `not_converged` when its loss did not fall after the hard-mining warm-up (the
reconstruction stalled), or when its proxy metrics sit clearly below what a learning run
reaches on that kind of synthetic defect (`proxy_below_floor`: the maps do not single out
defects that any model which learned the normal images finds). The thresholds are
deliberately loose: they flag runs that failed, not runs that could be better; the evidence
is in docs/method.md and at PROXY_FLOORS.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from recontrast.defects import STRUCTURAL_KINDS, SURFACE_KINDS

OK, NOT_CONVERGED, UNKNOWN = "ok", "not_converged", "unknown"
MIN_LOSS_DROP = 0.15  # the post-warm-up loss must fall by this fraction of its level
# Floors on the mean proxy pixel AUROC of each family of synthetic defect kinds
# (defects.SURFACE_KINDS, defects.STRUCTURAL_KINDS; proxy/<kind>/pixel_auroc): a learning run
# is above them, a failed one below. Pixel AUROC, not image AUROC: with ~3 defect images per
# kind on a 10 % held-out split, a per-kind image AUROC moves by 0.1-0.3 with one image, while
# the pixel AUROC ranks thousands of pixels.
# How they were chosen (synthetic mesh, board, weave, bar; 35 % held out; one thread):
# - learning runs (EfficientNet-Lite0 offline, 40 iterations at 96 px, and the cpu_default
#   settings at 128 px for 80 iterations; real pixel AUROC 0.78-0.99): surface 0.93-1.00,
#   structural 0.83-1.00;
# - failed runs (an untrained decoder; resnet18 from scratch, 60 iterations; real pixel
#   AUROC 0.17-0.63): surface 0.13-0.80, structural 0.17-0.58.
# Each floor sits between the two groups: it flags failures, not runs that could be better.
# The per-run numbers are in docs/recipe.md ("Proxy defect kinds").
PROXY_FLOORS = {"surface": 0.85, "structural": 0.70}
MIN_JUDGED_ITERS = 20  # fewer iterations after the warm-up: the loss trend is not judged


@dataclass
class Health:
    status: str  # OK, NOT_CONVERGED or UNKNOWN (too short to judge, no proxy metrics)
    reasons: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        """Returns one line for the console, the notebook and the MLflow tag."""
        if self.status == NOT_CONVERGED:
            return ("training did not converge: " + "; ".join(self.reasons) +
                    ". Its scores are not to be trusted: see README 'How to tell whether your model is good'")
        return f"training health {self.status}" + (f" ({'; '.join(self.reasons)})" if self.reasons else "")


def loss_stall(history: Sequence[float], warmup_iters: int) -> str | None:
    """Returns why the loss stalled after the warm-up (None when it fell, or the run is too short).

    Compares the mean loss over the first and the last tenth (at least 5 iterations) of the
    iterations after the warm-up.
    """
    post = np.asarray(history[warmup_iters:], dtype=np.float64)
    if len(post) < MIN_JUDGED_ITERS or not np.isfinite(post).all():
        return None
    w = max(5, len(post) // 10)
    first, last = float(post[:w].mean()), float(post[-w:].mean())
    if last <= first * (1 - MIN_LOSS_DROP):
        return None
    end = warmup_iters + len(post)
    return (f"the loss did not fall after the warm-up ({first:.3f} over iterations {warmup_iters}.."
            f"{warmup_iters + w}, {last:.3f} over {end - w}..{end}; a learning run falls by "
            f">= {MIN_LOSS_DROP:.0%})")


def proxy_below_floor(metrics: dict[str, float]) -> list[str]:
    """Returns a reason per family of synthetic defect kinds whose mean proxy pixel AUROC is
    below its PROXY_FLOORS entry, naming the number, the floor and the weakest kind (none when
    the metrics hold no per-kind proxy metrics)."""
    reasons = []
    for family, floor in PROXY_FLOORS.items():
        values = _family_values(metrics, family)
        if not values:
            continue
        mean = float(np.mean(list(values.values())))
        if mean < floor:
            weakest = min(values, key=values.get)
            reasons.append(f"proxy pixel AUROC on {family} synthetic defects = {mean:.3f} (< {floor}, which "
                           f"learning runs clear; chance is 0.5; weakest kind {weakest}: {values[weakest]:.3f}): "
                           f"the maps do not single out defects that a model which learned the normal images finds")
    return reasons


def _family_values(metrics: dict[str, float], family: str) -> dict[str, float]:
    """Returns {kind: proxy/<kind>/pixel_auroc} for the family's kinds present and finite."""
    kinds = SURFACE_KINDS if family == "surface" else STRUCTURAL_KINDS
    found = {k: metrics.get(f"proxy/{k}/pixel_auroc") for k in kinds}
    return {k: float(v) for k, v in found.items() if v is not None and math.isfinite(v)}


def assess(history: Sequence[float], warmup_iters: int, metrics: dict[str, float]) -> Health:
    """Returns the Health of a finished run from its loss history and its (proxy) metrics."""
    reasons = [r for r in [loss_stall(history, warmup_iters)] if r] + proxy_below_floor(metrics)
    if reasons:
        return Health(NOT_CONVERGED, reasons)
    judged = (len(history) - warmup_iters >= MIN_JUDGED_ITERS
              or any(_family_values(metrics, family) for family in PROXY_FLOORS))
    return Health(OK if judged else UNKNOWN, [] if judged else ["too short to judge and no proxy metrics"])
