"""Training health: did this run learn anything? Judged from what a user has without test
labels: the loss history and the proxy metrics (synthetic defects on held-out good images).

A run is `not_converged` when its loss did not fall after the hard-mining warm-up (the
reconstruction stalled), or when its proxy metrics sit near chance (the maps do not single
out even obvious synthetic defects). The thresholds are deliberately loose: they flag runs
that failed, not runs that could be better; the evidence is in docs/method.md.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

OK, NOT_CONVERGED, UNKNOWN = "ok", "not_converged", "unknown"
MIN_LOSS_DROP = 0.15  # the post-warm-up loss must fall by this fraction of its level
MIN_PROXY = {"proxy/image_auroc": 0.70, "proxy/aupro": 0.50}  # below: near chance (0.5 / ~0.15)
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


def proxy_near_chance(metrics: dict[str, float]) -> list[str]:
    """Returns a reason per proxy metric below its floor (none when there are no proxy metrics)."""
    return [f"{key} = {metrics[key]:.3f} on synthetic defects (< {floor}{'; chance is 0.5' if 'auroc' in key else ''})"
            for key, floor in MIN_PROXY.items()
            if key in metrics and math.isfinite(metrics[key]) and metrics[key] < floor]


def assess(history: Sequence[float], warmup_iters: int, metrics: dict[str, float]) -> Health:
    """Returns the Health of a finished run from its loss history and its (proxy) metrics."""
    reasons = [r for r in [loss_stall(history, warmup_iters)] if r] + proxy_near_chance(metrics)
    if reasons:
        return Health(NOT_CONVERGED, reasons)
    judged = len(history) - warmup_iters >= MIN_JUDGED_ITERS or any(k in metrics for k in MIN_PROXY)
    return Health(OK if judged else UNKNOWN, [] if judged else ["too short to judge and no proxy metrics"])
