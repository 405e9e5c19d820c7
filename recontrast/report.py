"""Evaluation reports on disk: metrics.json, calibration.json, per_image.csv and figures.

`write_outputs(result, eval_cfg, out_dir, category)` turns an EvalResult (with the figure
samples `evaluate(..., keep_samples=True)` kept) into the files a user opens; with proxy
metrics, `proxy_kinds.csv` and `proxy_table(metrics)` show them per synthetic defect kind.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from recontrast import plots
from recontrast.calibration import display_scales, threshold_scale
from recontrast.config import EvalConfig
from recontrast.evaluate import PROXY_KEYS, EvalResult

PROXY_COLUMNS = (*PROXY_KEYS, "score")


def proxy_rows(metrics: dict[str, float]) -> list[dict]:
    """Returns one row per synthetic defect kind found in `metrics` (proxy/<kind>/<metric> keys),
    in the order they appear, then the overall row ("all", the proxy/<metric> keys):
    {"kind": ..., "image_auroc": ..., "pixel_auroc": ..., "aupro": ..., "score": ...}."""
    kinds = dict.fromkeys(k.split("/")[1] for k in metrics if k.startswith("proxy/") and k.count("/") == 2)
    rows = [{"kind": kind, **{c: metrics.get(f"proxy/{kind}/{c}") for c in PROXY_COLUMNS}} for kind in kinds]
    if any(f"proxy/{c}" in metrics for c in PROXY_COLUMNS):
        rows.append({"kind": "all", **{c: metrics.get(f"proxy/{c}") for c in PROXY_COLUMNS}})
    return rows


def proxy_table(metrics: dict[str, float]) -> str:
    """Returns the proxy metrics as an aligned text table, a row per defect kind (values in %);
    "" without proxy metrics."""
    rows = proxy_rows(metrics)
    if not rows:
        return ""
    cell = lambda v: "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"  # noqa: E731
    width = max(len("proxy kind"), *(len(r["kind"]) for r in rows))
    lines = [f"{'proxy kind':<{width}}" + "".join(f"  {c:>11}" for c in PROXY_COLUMNS)]
    lines += [f"{r['kind']:<{width}}" + "".join(f"  {cell(r[c]):>11}" for c in PROXY_COLUMNS) for r in rows]
    return "\n".join(lines)


def write_outputs(result: EvalResult, eval_cfg: EvalConfig, out_dir: str | Path, category: str) -> Path:
    """Returns out_dir after writing metrics.json, calibration.json, per_image.csv, with proxy
    metrics proxy_kinds.csv (a row per synthetic defect kind, then "all"), and (with
    result.samples) the figures and GIF there; sets result.out_dir and result.figures."""
    out = result.out_dir = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
             for k, v in result.metrics.items()}
    if result.notes:
        clean["notes"] = list(result.notes)
    (out / "metrics.json").write_text(json.dumps(clean, indent=2) + "\n")
    (out / "calibration.json").write_text(json.dumps(result.calibration, indent=2) + "\n")
    rows = proxy_rows(clean)
    if rows:
        with open(out / "proxy_kinds.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["kind", *PROXY_COLUMNS])
            writer.writeheader()
            writer.writerows(rows)
    with open(out / "per_image.csv", "w", newline="") as f:
        cols = ["path", "defect_type", "label", "score", "score_normalised", "anomalous"]
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.records)
    samples = result.samples
    if samples is None:
        return out
    name, threshold = result.scale
    (threshold, offset), (map_threshold, map_offset) = display_scales(result.calibration, threshold)
    scale = lambda m: np.clip(threshold_scale(m, map_threshold, map_offset), 0.0, 1.0)  # noqa: E731
    scores = [r["score"] for r in result.records]
    labels = [r["label"] for r in result.records]
    types = [r["defect_type"] for r in result.records]
    figs = result.figures
    if eval_cfg.figures:
        figs["roc_pr"] = out / "roc_pr.png"
        plots.roc_pr_curves(scores, labels, figs["roc_pr"], title=category, metrics=result.metrics)
        figs["histogram"] = out / "score_histogram.png"
        thresholds = {f"{k} threshold": result.calibration[f"threshold_{k}"] for k in ("f1", "normal")}
        plots.score_histograms(scores, labels, types, figs["histogram"], thresholds=thresholds,
                               title=f"{category}: image scores")
        worst = samples.worst()
        figs["gallery"] = out / "worst_gallery.png"
        plots.heatmap_gallery(
            [s["image"] for s in worst], [scale(s["map"]) for s in worst], [s["mask"] for s in worst],
            [f"{s['defect_type']} score {threshold_scale(s['score'], threshold, offset):.2f}\n"
             f"{Path(s['path']).name}" for s in worst],
            figs["gallery"], suptitle=f"{category}: worst-ranked ({name} threshold = 0.5)")
    if eval_cfg.gif and samples.frames:
        frames = [plots.triptych(s["image"], scale(s["map"]), s["mask"],
                                 f"{s['defect_type']} {threshold_scale(s['score'], threshold, offset):.2f}")
                  for s in samples.frames]
        figs["gif"] = plots.make_gif(frames, out / f"{category}.gif")
    return out
