"""How the anomaly map is built, measured on trained models (issue 20, part 1): evaluation only.

For each category folder under --runs (what `benchmarks/run.py --sections categories` trains:
<out>/recontrast/<category>/last.ckpt), the network runs once over the test set; its
(target, prediction) pairs are kept and every map setting below is scored from them by the
project's own `evaluate` (anomaly_map, image_score, PixelMetrics): level weights, Gaussian
sigma, image score, how the pairs combine. The paper's setting (the model's own map, the image
score its maximum) reproduces `recontrast evaluate` exactly where the model was evaluated so;
`score_product` does where it was evaluated with eval.score_combine=product (the CPU recipes):
the category's own evaluation (metrics.json) is printed beside it.
A model trained with train.ema keeps its last iteration's weights beside the average
(`live_model`): they are scored too, as `last_weights` (the paper's map and score) and
`last_weights_score_product`, a paired comparison of the average against the last weights.

    python benchmarks/map_study.py --runs bench_out/cat3/recontrast --out bench_out/maps

Writes <out>/maps.json (every setting, category, metric) and prints one table per metric:
setting x category, and the mean over the categories that have the metric. Choosing a setting
on these test sets is allowed (dev data) only for what helps every category, not one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from recontrast.data import build_datasets
from recontrast.evaluate import evaluate
from recontrast.model import load_model

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1max")
# One change at a time from the model's own map (the paper's: levels 1/1/1, sigma 4, max, sum).
# combine=mean is sum divided by a constant: the same ranking, not worth a row.
SETTINGS = {
    "paper": {},
    "levels_110": {"level_weights": (1.0, 1.0, 0.0)},
    "levels_011": {"level_weights": (0.0, 1.0, 1.0)},
    "levels_100": {"level_weights": (1.0, 0.0, 0.0)},
    "levels_010": {"level_weights": (0.0, 1.0, 0.0)},
    "levels_001": {"level_weights": (0.0, 0.0, 1.0)},
    "levels_1_1_half": {"level_weights": (1.0, 1.0, 0.5)},
    "levels_half_1_1": {"level_weights": (0.5, 1.0, 1.0)},
    "sigma_2": {"sigma": 2.0},
    "sigma_6": {"sigma": 6.0},
    "sigma_8": {"sigma": 8.0},
    "topk_1pct": {"score": "topk_mean", "topk": 0.01},
    "topk_0.1pct": {"score": "topk_mean", "topk": 0.001},
    "product": {"combine": "product"},
    # The image score alone from the product (eval.score_combine), the map the paper's sum.
    "score_product": {"score_combine": "product"},
}
# The last iteration's weights of a train.ema model (its checkpoint's live_model), scored as
# `paper` and `score_product` score the average.
LAST_WEIGHTS = {"last_weights": {}, "last_weights_score_product": {"score_combine": "product"}}


class CachedPairs(nn.Module):
    """Stands in for the model in `evaluate`: gives back the pairs the network computed for
    each batch, in the order the (unshuffled) test loader asks for them."""

    def __init__(self, batches: list):
        super().__init__()
        self.batches, self.next = batches, 0
        self.register_buffer("anchor", torch.zeros(1))  # evaluate finds the device from it

    def anomaly_pairs(self, x):
        pairs = self.batches[self.next % len(self.batches)]
        self.next += 1
        assert pairs[0][0].shape[0] == x.shape[0], "the test loader's batches changed"
        return pairs


def network_pairs(model, dataset, batch_size: int) -> list:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    with torch.inference_mode():
        return [model.anomaly_pairs(batch["image"]) for batch in loader]


def scored(cached: CachedPairs, test, eval_cfg, settings: dict) -> dict:
    """Returns {setting: {metric: value}} of the network's cached pairs under each setting;
    every setting without score_combine scores images with the map's own maximum (the paper's)."""
    rows = {}
    for name, change in settings.items():
        changed = dataclasses.replace(eval_cfg, proxy=False, figures=False, gif=False,
                                      **({"score_combine": "map"} | change))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*need both.*")
            metrics = evaluate(cached, test, changed, torch.device("cpu")).metrics
        rows[name] = {k: 100 * float(metrics[k]) for k in METRICS}
    return rows


def study_category(folder: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    model, cfg, ckpt = load_model(folder / "last.ckpt")
    test = build_datasets(cfg.data).test
    t0 = time.process_time()
    rows = scored(CachedPairs(network_pairs(model, test, cfg.eval.batch_size)), test, cfg.eval, SETTINGS)
    if ckpt.get("live_model") is not None:
        model.load_state_dict(ckpt["live_model"])
        rows |= scored(CachedPairs(network_pairs(model, test, cfg.eval.batch_size)), test, cfg.eval, LAST_WEIGHTS)
    evaluated = folder / "eval" / "metrics.json"
    reference = json.loads(evaluated.read_text()) if evaluated.is_file() else {}
    return {"rows": rows, "cpu_s": time.process_time() - t0, "encoder_bn": cfg.model.encoder_bn,
            "evaluated": {k: 100 * reference[k] for k in METRICS if isinstance(reference.get(k), (int, float))}}


def tables(results: dict) -> str:
    lines = []
    cats = list(results)
    for metric in METRICS:
        masked = [c for c in cats if not np.isnan(results[c]["rows"]["paper"][metric])]
        lines += ["", f"### {metric} (mean over {', '.join(masked)})", "",
                  "| setting | " + " | ".join(cats) + " | mean | mean - paper |", "|---" * (len(cats) + 3) + "|"]
        paper_mean = np.mean([results[c]["rows"]["paper"][metric] for c in masked])
        for name in [*SETTINGS, *LAST_WEIGHTS]:
            if any(name not in results[c]["rows"] for c in cats):
                continue
            values = [results[c]["rows"][name][metric] for c in cats]
            mean = np.mean([results[c]["rows"][name][metric] for c in masked])
            lines.append(f"| {name} | " + " | ".join("n/a" if np.isnan(v) else f"{v:.2f}" for v in values)
                         + f" | {mean:.2f} | {mean - paper_mean:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="bench_out/cat3/recontrast",
                        help="a folder of <category>/last.ckpt (the categories section's trained models)")
    parser.add_argument("--out", default="bench_out/maps", help="where maps.json goes")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runs, out = ROOT / args.runs, ROOT / args.out
    folders = sorted(p.parent for p in runs.glob("*/last.ckpt"))
    if not folders:
        raise SystemExit(f"no <category>/last.ckpt under {runs}: run benchmarks/run.py --sections categories first")
    out.mkdir(parents=True, exist_ok=True)
    load, t0 = os.getloadavg()[0], time.perf_counter()
    results = {}
    for folder in folders:
        results[folder.name] = study_category(folder, args.threads)
        r = results[folder.name]
        print(f"[maps] {folder.name}: paper {json.dumps(r['rows']['paper'])}; its evaluation "
              f"{json.dumps(r['evaluated'])}; {r['cpu_s']:.0f} CPU s", flush=True)
    (out / "maps.json").write_text(json.dumps(results, indent=1))
    print(tables(results))
    print(f"\n{len(folders)} categories, {time.perf_counter() - t0:.0f} s wall, load {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}; written to {out / 'maps.json'}")


if __name__ == "__main__":
    main()
