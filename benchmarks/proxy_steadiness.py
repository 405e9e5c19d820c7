"""How steady the label-free proxy is (issue 20, part 4): evaluation only, on trained models.

The proxy set holds one synthetic defect per held-out normal image by default; with ~20
held-out images that is ~3 defects per kind. This scores every model that `benchmarks/run.py
--sections correlation` ranked (its <out>/correlation_models.json: the kept model of each
category and bn_fallback's other training) with proxy sets of several sizes
(`eval.proxy_copies`) and draws (`eval.proxy_seed`), each at the model's own map, and prints:

- Spearman's rho between proxy/score and the real AUPRO / image AUROC across the models, per
  (copies, seed): how much of the across-category ranking is the draw;
- for each category trained twice, which training each proxy set ranks higher, beside which
  one is better on the test set: what bn_fallback's choice between two flagged trainings reads;
- per model, each defect kind's proxy AUPRO averaged over the draws of each size, its weakest
  kinds first: whether one kind singles out a model that fails on the test set.

    python benchmarks/proxy_steadiness.py --models bench_out/wave3/correlation_models.json \
        --copies 1,4 --seeds 0,1,2,3 --out bench_out/proxy_steadiness

Writes <out>/proxy_steadiness.json. Proxy metrics use no test label; the real metrics come from
the correlation section's evaluations.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from recontrast.data import build_datasets
from recontrast.defects import KINDS, ProxyDataset
from recontrast.evaluate import PROXY_SCORE, proxy_metrics
from recontrast.model import load_model

ROOT = Path(__file__).resolve().parents[1]


def score_model(row: dict, draws: list[tuple[int, int]]) -> dict:
    """Returns {"c<copies>s<seed>": {"score": proxy/score, "kinds": {kind: proxy/<kind>/aupro},
    "cpu_s": CPU seconds}} of one model."""
    model, cfg, _ = load_model(ROOT / row["checkpoint"])
    val = build_datasets(cfg.data).val
    eval_cfg = dataclasses.replace(cfg.eval, figures=False, gif=False)
    found = {}
    for copies, seed in draws:
        start = time.process_time()
        with torch.inference_mode():
            metrics = proxy_metrics(model, ProxyDataset(val, seed=seed, copies=copies), eval_cfg)
        kinds = {k: metrics[f"proxy/{k}/aupro"] for k in KINDS if f"proxy/{k}/aupro" in metrics}
        found[f"c{copies}s{seed}"] = {"score": metrics[PROXY_SCORE], "kinds": kinds, "cpu_s": time.process_time() - start}
    return found


def rankings(models: list[dict], draws: list[tuple[int, int]]) -> dict:
    """Returns Spearman's rho per draw and, per category trained twice, each draw's choice."""
    rho = {}
    for copies, seed in draws:
        key = f"c{copies}s{seed}"
        scores = [m["proxy"][key]["score"] for m in models]
        rho[key] = {metric: float(spearmanr(scores, [m["metrics"][metric] for m in models])[0])
                    for metric in ("aupro", "image_auroc")}
    pairs = {}
    for category in sorted({m["category"] for m in models}):
        two = [m for m in models if m["category"] == category]
        if len(two) != 2:
            continue
        a, b = two
        better = a["setting"] if a["metrics"]["aupro"] > b["metrics"]["aupro"] else b["setting"]
        pairs[category] = {"better_on_test": better, "choice": {
            f"c{c}s{s}": a["setting"] if a["proxy"][f"c{c}s{s}"]["score"] > b["proxy"][f"c{c}s{s}"]["score"]
            else b["setting"] for c, s in draws}}
    return {"rho": rho, "pairs": pairs}


def kind_means(model: dict, copies: int) -> dict[str, float]:
    """Returns {kind: the mean of proxy/<kind>/aupro over the model's draws with `copies` copies}."""
    draws = [v["kinds"] for k, v in model["proxy"].items() if k.startswith(f"c{copies}s")]
    return {k: sum(d[k] for d in draws) / len(draws) for k in KINDS if all(k in d for d in draws)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bench_out/wave3/correlation_models.json",
                        help="benchmarks/run.py --sections correlation's <out>/correlation_models.json")
    parser.add_argument("--copies", default="1,4", help="comma-separated eval.proxy_copies values")
    parser.add_argument("--seeds", default="0,1,2,3", help="comma-separated eval.proxy_seed values")
    parser.add_argument("--out", default="bench_out/proxy_steadiness")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    source = ROOT / args.models
    if not source.is_file():
        raise SystemExit(f"{source} does not exist: run benchmarks/run.py --sections categories,correlation first")
    torch.set_num_threads(args.threads)
    draws = [(int(c), int(s)) for c in args.copies.split(",") for s in args.seeds.split(",")]
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    load, t0 = os.getloadavg()[0], time.perf_counter()
    models = []
    for row in json.loads(source.read_text()):
        if not (row.get("metrics") or {}).get("aupro"):
            continue  # no pixel metrics (image labels only): nothing to rank against
        models.append({k: row[k] for k in ("category", "setting", "checkpoint", "metrics", "health")})
        models[-1]["proxy"] = score_model(row, draws)
        print(f"[proxy] {row['category']}/{row['setting']}: " + " ".join(
            f"{k} {100 * v['score']:.2f} ({v['cpu_s']:.0f} CPU s)" for k, v in models[-1]["proxy"].items()), flush=True)
    found = {"models": models, **rankings(models, draws)}
    (out / "proxy_steadiness.json").write_text(json.dumps(found, indent=1, default=str))
    print(f"\nSpearman's rho across {len(models)} models, proxy/score against the test set's metric:")
    print("| copies | seed | AUPRO | I-AUROC |\n|---|---|---|---|")
    for (copies, seed), (key, rho) in zip(draws, found["rho"].items()):
        print(f"| {copies} | {seed} | {rho['aupro']:.3f} | {rho['image_auroc']:.3f} |")
    for category, pair in found["pairs"].items():
        print(f"{category}: better on the test set (AUPRO) {pair['better_on_test']}; the proxy's choice per draw: "
              + ", ".join(f"{k} {v}" for k, v in pair["choice"].items()))
    print("\nEach kind's proxy AUPRO, the mean over the seeds, weakest first:")
    for m in models:
        for copies in sorted({c for c, _ in draws}):
            means = kind_means(m, copies)
            print(f"{m['category']}/{m['setting']} (AUPRO {100 * m['metrics']['aupro']:.2f}), {copies} copies: "
                  + ", ".join(f"{k} {100 * v:.2f}" for k, v in sorted(means.items(), key=lambda kv: kv[1])[:3]))
    print(f"\n{time.perf_counter() - t0:.0f} s wall, load {load:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"written to {out / 'proxy_steadiness.json'}")


if __name__ == "__main__":
    main()
