"""Accuracy against compute: ReContrast settings beside PaDiM and PatchCore, per category.

    HF_HUB_OFFLINE=1 python benchmarks/compute_study.py --categories bottle,weave,bar \
        --settings default,bn_train,size320 --threads 2 --out bench_out/compute

Each (category, setting) trains once, in a process of its own, with experiments/cpu_default.yaml
plus the setting's overrides (SETTINGS), and is evaluated with the recipe's map and with the map
variants of MAPS: the same weights, only the map changes, so a map variant costs an evaluation,
not a training. The x axis is process CPU minutes (all threads) of training and the recipe's
evaluation, which, unlike wall time, does not grow when other work shares the cores. Peers fit
once per category (benchmarks/peers.py, `pip install -e .[peers]`). Rows are appended to
<out>/rows.json as they finish (a stopped study resumes where it was); the figures go to
docs/figures/compute_<category>.png and the table to <out>/compute.md. Test labels are read
to measure, as in every benchmark: the dev categories are development data (docs/recipe.md).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import categories  # noqa: E402 - benchmarks/categories.py, beside this file

# What a setting changes on top of REFERENCE: experiments/cpu_default.yaml as it was when the
# study began (encoder BN in eval mode, fp32, one training), so that every row keeps its meaning
# while the recipe moves. "recipe" is cpu_default.yaml as it is now, REFERENCE not applied, and
# so are the "recipe_*" settings.
REFERENCE = ["model.encoder_bn=eval", "train.precision=fp32", "train.bn_fallback=false"]
SETTINGS = {
    "default": [],  # REFERENCE itself (named so in the rows of the earlier runs)
    "recipe": [],
    "seed1": ["train.seed=1"],  # the run-to-run noise every other difference is read against
    "bn_train": ["model.encoder_bn=train"],
    "no_da": ["model.domain_adaptation=false"],
    "iters560": ["train.iters=560"],
    "iters1120": ["train.iters=1120"],
    "size320": ["data.image_size=320"],
    "size384": ["data.image_size=384"],
    "lite1": ["model.backbone=tf_efficientnet_lite1"],
    "lite2": ["model.backbone=tf_efficientnet_lite2"],
    "width3": ["model.width_mult=3.0"],
    "stable": ["train.stable=true"],
    "bf16": ["train.precision=bf16"],
    "bn_train_bf16": ["model.encoder_bn=train", "train.precision=bf16"],
    "bf16_seed1": ["train.precision=bf16", "train.seed=1"],
    # On top of cpu_default.yaml as it is now (REFERENCE not applied): what the recipe would give.
    "recipe_size320": ["data.image_size=320"],
    "recipe_iters560": ["train.iters=560"],
    "recipe_lite1": ["model.backbone=tf_efficientnet_lite1"],
    "recipe_freeze_stem": ["model.freeze_stem=true", "train.depthwise_fp32=true"],
    "recipe_freeze_stem_size320": ["model.freeze_stem=true", "train.depthwise_fp32=true", "data.image_size=320"],
    "recipe_size128": ["data.image_size=128"],
    "recipe_size192": ["data.image_size=192"],
    "recipe_pool2": ["model.bottleneck_pool=2"],
    "recipe_pool4": ["model.bottleneck_pool=4"],
}
ON_RECIPE = "recipe_"  # settings named so change the current recipe, not REFERENCE


# Map variants evaluated on every trained model (eval.* overrides; "recipe" is the model's own).
MAPS = {
    "recipe": {},
    "levels110": {"level_weights": (1.0, 1.0, 0.0)},
    "levels121": {"level_weights": (1.0, 2.0, 1.0)},
    "sigma2": {"sigma": 2.0},
    "sigma8": {"sigma": 8.0},
    "topk": {"score": "topk_mean"},  # image score: the mean of the top 1 % of the map instead of its max
}
SHOWN = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1max")


def study_row(category: str, root: Path, setting: str, out: Path, threads: int, extra: list[str] = ()) -> dict:
    """Returns one trained setting's row: the recipe's metrics, CPU minutes, and each map variant's metrics."""
    base = [] if setting == "recipe" or setting.startswith(ON_RECIPE) else REFERENCE
    row = categories.recontrast_row(categories.DEFAULT_CONFIG, root, category, out / setting, threads,
                                    [*base, *extra, *SETTINGS[setting], f"tracking.run_name=compute-{setting}-{category}"])
    row.pop("points", None)
    return {**row, "setting": setting, "maps": map_variants(row)}


def map_variants(row: dict, threads: int = 0) -> dict:
    """Returns the test metrics of a row's model under every map variant of MAPS it lacks (the
    recipe's own map too when the row has no metrics: a model the categories benchmark kept aside)."""
    import dataclasses

    import torch

    from recontrast.data import build_datasets
    from recontrast.evaluate import evaluate
    from recontrast.model import load_model

    if threads:
        torch.set_num_threads(threads)
    model, cfg, _ = load_model(row["checkpoint"])
    datasets = build_datasets(cfg.data)
    maps = dict(row.get("maps") or {})
    for name, change in MAPS.items():
        if name in maps or (not change and row.get("metrics")):
            continue
        eval_cfg = dataclasses.replace(cfg.eval, proxy=False, figures=False, gif=False, **change)
        t0 = time.process_time()
        with torch.inference_mode():
            maps[name] = evaluate(model, datasets.test, eval_cfg, torch.device("cpu"), datasets.val).metrics
        maps[name]["eval_cpu_seconds"] = time.process_time() - t0
    return maps


def proxy_of(row: dict, threads: int) -> dict:
    """Returns the proxy metrics of a row's model, for its recipe map and every map variant,
    with today's proxy set (recontrast.defects): what the correlation section ranks."""
    import dataclasses

    import torch

    from recontrast.data import build_datasets
    from recontrast.defects import ProxyDataset
    from recontrast.evaluate import proxy_metrics
    from recontrast.model import load_model

    torch.set_num_threads(threads)
    model, cfg, _ = load_model(row["checkpoint"])
    proxy = ProxyDataset(build_datasets(cfg.data).val, seed=cfg.eval.proxy_seed, copies=cfg.eval.proxy_copies)
    found = {}
    for name, change in MAPS.items():
        eval_cfg = dataclasses.replace(cfg.eval, figures=False, gif=False, **change)
        with torch.inference_mode():
            found[name] = proxy_metrics(model, proxy, eval_cfg)
    return found


def correlation(rows: list[dict]) -> dict:
    """Returns Spearman's rho between proxy/score and the real AUPRO / image AUROC over every
    (category, setting, map) model of the study, and over categories alone at the recipe map."""
    from scipy.stats import spearmanr

    points = []
    for r in rows:
        for name, proxy in (r.get("proxy") or {}).items():
            real = r["metrics"] if name == "recipe" else r["maps"][name]
            points.append({"category": r["category"], "setting": r["setting"], "map": name, "health": r.get("health"),
                           "proxy": proxy.get("proxy/score", math.nan), "aupro": real.get("aupro", math.nan),
                           "image_auroc": real.get("image_auroc", math.nan)})
    out = {"n": len(points), "points": points}
    for real in ("aupro", "image_auroc"):
        pairs = [(p["proxy"], p[real]) for p in points if math.isfinite(p["proxy"]) and math.isfinite(p[real])]
        out[f"proxy/score ~ {real}"] = float(spearmanr(*zip(*pairs)).statistic) if len(pairs) >= 3 else math.nan
        out[f"n ~ {real}"] = len(pairs)
    return out


def correlation_figure(found: dict, path: Path) -> Path:
    """Returns `path` after drawing what `correlation` found: proxy/score (x) against each real
    metric (y), one panel each, every (category, model, map) a point; a colour per category, a
    large dot for a model at its recipe's map and a small one per map variant, a red ring round a
    model the health check did not pass; Spearman's rho in each panel's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    pts = found["points"]
    cats = list(dict.fromkeys(p["category"] for p in pts))
    colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(cats)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, real in zip(axes, ("aupro", "image_auroc")):
        for p in pts:
            if not (math.isfinite(p["proxy"]) and math.isfinite(p[real])):
                continue
            at_recipe = p["map"] == "recipe"
            x, y = 100 * p["proxy"], 100 * p[real]
            ax.scatter(x, y, s=70 if at_recipe else 22, color=colours[p["category"]], alpha=1.0 if at_recipe else 0.6,
                       zorder=3 if at_recipe else 2)
            if at_recipe and p.get("health") not in (None, "ok"):
                ax.scatter(x, y, s=190, facecolors="none", edgecolors="red", linewidths=1.5, zorder=4)
        rho = found.get(f"proxy/score ~ {real}", math.nan)
        ax.set_title(f"{real} vs proxy/score: Spearman {rho:.2f} over {found.get(f'n ~ {real}', 0)} points")
        ax.set_xlabel("proxy/score (synthetic defects on held-out normal images), %")
        ax.set_ylabel(f"real {real} (test set), %")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", ls="", color=colours[c], label=c) for c in cats]
    handles += [Line2D([], [], marker="o", ls="", color="grey", markersize=9, label="a model, its recipe's map"),
                Line2D([], [], marker="o", ls="", color="grey", markersize=4, label="the same model, another map"),
                Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="red", markersize=11,
                       label="health check: not ok")]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.suptitle("Does the label-free proxy rank models as the test set does?")
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def peer(method: str, root: Path, category: str, threads: int) -> dict:
    """Returns the peer's row with the CPU seconds of its fit and prediction."""
    t0 = time.process_time()
    row = categories.peer_row(method, root, category, threads)
    return {**row, "setting": method, "cpu_seconds": time.process_time() - t0}


def in_subprocess(fn, *args):
    """Returns fn(*args) computed in a fresh spawned process (own memory, own CPU clock)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def points(rows: list[dict], category: str) -> list[tuple[str, float, dict]]:
    """Returns (label, CPU minutes, metrics) for every ReContrast model, map variant and peer of a
    category; a map variant costs what its model cost (it replaces the recipe's evaluation)."""
    found = []
    for r in rows:
        if r["category"] != category:
            continue
        minutes = r["cpu_seconds"] / 60
        if r["method"] != "recontrast":
            found.append((r["method"], minutes, r["metrics"]))
            continue
        found.append((r["setting"], minutes, r["metrics"]))
        for name, metrics in r.get("maps", {}).items():
            found.append((f"{r['setting']}+{name}", minutes, metrics))  # the same model: the same cost
    return found


def figure(rows: list[dict], category: str, path: Path) -> None:
    """Draws one panel per metric: x CPU minutes, y the metric; a colour per trained setting
    (its recipe map a large dot, each map variant its own small marker), peers as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    found = points(rows, category)
    shown = [k for k in SHOWN if any(math.isfinite(m.get(k) or math.nan) for _, _, m in found)]
    settings = list(dict.fromkeys(label.split("+")[0] for label, _, _ in found if label not in ("padim", "patchcore")))
    colours = {s: plt.cm.tab10(i % 10) for i, s in enumerate(settings)}
    markers = {name: m for name, m in zip(MAPS, "os^v<>Dp")}
    cols = min(2, len(shown))
    fig, axes = plt.subplots((len(shown) + cols - 1) // cols, cols, figsize=(6 * cols, 3.6 * ((len(shown) + 1) // 2)),
                             squeeze=False)
    for ax, key in zip(axes.flat, shown):
        for label, minutes, m in found:
            value = m.get(key)
            if value is None or not math.isfinite(value):
                continue
            if label in ("padim", "patchcore"):
                ax.scatter(minutes, 100 * value, marker="*", s=220, color="crimson" if label == "padim" else "black",
                           zorder=4)
                continue
            setting, _, variant = label.partition("+")
            ax.scatter(minutes, 100 * value, marker=markers.get(variant or "recipe", "o"),
                       s=70 if not variant else 30, color=colours[setting], alpha=1.0 if not variant else 0.7, zorder=3)
        ax.set_title(key)
        ax.set_xlabel("CPU minutes (fit + evaluation)")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    handles = [Line2D([], [], marker="o", ls="", color=colours[s], label=s) for s in settings]
    handles += [Line2D([], [], marker=markers[n], ls="", color="grey", label=f"map: {n}") for n in MAPS]
    handles += [Line2D([], [], marker="*", ls="", markersize=12, color=c, label=n)
                for n, c in (("PaDiM", "crimson"), ("PatchCore 1 %", "black"))]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.suptitle(f"{category}: accuracy vs compute (ReContrast settings and map variants; peers as stars)")
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    """Returns one table: every point of every category, metrics in %, CPU minutes."""
    lines = ["| category | setting | CPU min | " + " | ".join(SHOWN) + " | proxy score |",
             "|---|---|---|" + "---|" * (len(SHOWN) + 1)]
    for category in dict.fromkeys(r["category"] for r in rows):
        for label, minutes, m in points(rows, category):
            cells = [categories._pct(m.get(k)) for k in (*SHOWN, "proxy/score")]
            lines.append(f"| {category} | {label} | {minutes:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", default="bottle,screw,weave,grain,disc,bar")
    parser.add_argument("--settings", default="default,bn_train", help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--peers", default="padim,patchcore", help="peers to fit per category ('' for none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every setting (before the setting's own)")
    parser.add_argument("--out", default="bench_out/compute")
    parser.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    parser.add_argument("--report-only", action="store_true", help="redraw the figures and the table from rows.json")
    parser.add_argument("--correlation", action="store_true",
                        help="no training: evaluate the map variants a trained model lacks, and every model's proxy "
                             "metrics with today's proxy set, ranked against the real metrics")
    parser.add_argument("--correlation-figure", default="",
                        help="no training: redraw <out>/correlation.png from this correlation.json, or from the "
                             "correlation across categories of a benchmarks/run.py results.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "rows.json"
    rows: list[dict] = json.loads(saved.read_text()) if saved.is_file() else []
    if args.correlation_figure:
        found = json.loads(Path(args.correlation_figure).read_text())
        found = found.get("correlation", {}).get("across", found)  # a run.py results.json holds it there
        print(f"wrote {correlation_figure(found, out / 'correlation.png')}")
        return
    if args.report_only:
        for category in dict.fromkeys(r["category"] for r in rows):
            figure(rows, category, Path(args.figures) / f"compute_{category}.png")
        (out / "compute.md").write_text(markdown(rows) + "\n")
        print(markdown(rows))
        return
    if args.correlation:
        for r in rows:
            r.setdefault("checkpoint", str(out / r["setting"] / "recontrast" / r["category"] / "last.ckpt"))
            if r["method"] == "recontrast" and Path(r["checkpoint"]).is_file():
                if set(MAPS) - {"recipe"} - set(r.get("maps") or {}):
                    r["maps"] = in_subprocess(map_variants, r, args.threads)
                if set(MAPS) - set(r.get("proxy") or {}):
                    r["proxy"] = in_subprocess(proxy_of, r, args.threads)
                saved.write_text(json.dumps(rows, indent=1, default=str))
        found = correlation(rows)
        (out / "correlation.json").write_text(json.dumps(found, indent=1))
        correlation_figure(found, out / "correlation.png")
        print(json.dumps({k: v for k, v in found.items() if k != "points"}, indent=1))
        return
    roots = categories.category_roots(out)
    wanted = [c for c in args.categories.split(",") if c in roots]
    for category in wanted:
        jobs = [(s, study_row, (category, roots[category], s, out, args.threads, args.set))
                for s in args.settings.split(",") if s]
        jobs += [(m, peer, (m, roots[category], category, args.threads)) for m in args.peers.split(",") if m]
        for setting, fn, fn_args in jobs:
            if any(r["category"] == category and r["setting"] == setting for r in rows):
                continue
            t0, load = time.perf_counter(), os.getloadavg()[0]
            try:
                row = in_subprocess(fn, *fn_args)
            except Exception as err:  # a peer without anomalib, a setting that fails: say so, go on
                print(f"[compute] {category}/{setting}: failed ({type(err).__name__}: {err})", flush=True)
                continue
            row.update(wall_seconds=time.perf_counter() - t0, load_before=load, load_after=os.getloadavg()[0])
            rows.append(row)
            saved.write_text(json.dumps(rows, indent=1, default=str))
            brief = {k: round(100 * row["metrics"][k], 2) for k in SHOWN if k in row["metrics"]}
            print(f"[compute] {category}/{setting}: {row['cpu_seconds'] / 60:.1f} CPU min, "
                  f"{row['wall_seconds']:.0f} s wall, load {load:.1f}->{row['load_after']:.1f}, {brief}", flush=True)
        figure(rows, category, Path(args.figures) / f"compute_{category}.png")
    (out / "compute.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
