"""Accuracy and speed on real data: `make bench` or `python benchmarks/run.py`.

Runs on ../shared/data/mvtec_ad_256/bottle when present (else on a synthetic category) and
prints and saves (JSON + markdown, under --out) what it measured:
- accuracy: image AUROC, pixel AUROC, AUPRO, pixel F1-max of the full method and of the
  domain-adaptation-off baseline with the offline EfficientNet-Lite0 encoder
  (experiments/cpu_bottle.yaml), last iteration, no selection on the test set;
- speed: training it/s and img/s, inference img/s at batch 1 and 16, peak RSS, time to first
  result;
- cost growth: training step time and evaluation memory at 128/256/384 px; evaluation time
  and memory as the test set doubles;
- the reference comparison: WRN50, 256 px, batch 16 training step and batch-1 evaluation,
  before (the reference's way: frozen encoder inside autograd, images decoded every step)
  and after (this project's loop) in one run;
- categories (--sections categories): the one ReContrast recipe (--recipe) against PaDiM and
  PatchCore on every category, with verdicts; correlation: proxy vs real metrics over the
  checkpoints of two bottle trainings and across every model the categories section trained
  (issue 20's target: Spearman >= 0.7).
Every measurement runs in a fresh subprocess so its peak RSS is its own. Accuracy runs are
logged to MLflow (experiment `benchmark`) so the UI shows them side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "mvtec_ad_256"
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1max")
ACROSS_TARGET = 0.7  # issue 20: Spearman of proxy/score vs real metrics across (category, setting)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import categories  # noqa: E402 - benchmarks/categories.py, beside this file

# Issue 6's targets for the Lite0 CPU recipe on bottle (fit within 15 minutes): the categories
# benchmark's own, one definition.
TARGETS, FIT_LIMIT_S = categories.BOTTLE_TARGETS, categories.FIT_LIMIT_S


def peak_rss_gb() -> float:
    """Returns this process's peak resident memory in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory() -> dict:
    """Returns peak RSS, plus CUDA's peak allocated memory when a GPU was used, in GiB."""
    import torch

    peak = {"peak_rss_gb": peak_rss_gb()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return peak


def in_subprocess(fn, *args):
    """Returns fn(*args) computed in a fresh spawned process (clean peak-RSS accounting)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _config(config: str, overrides: list[str]):
    from recontrast.config import load_config

    return load_config(ROOT / config if not Path(config).is_absolute() else config, overrides)


# --- accuracy ------------------------------------------------------------------------------
def accuracy_run(config: str, overrides: list[str], threads: int) -> dict:
    """Trains and evaluates one variant (logged to MLflow); also scores the same model with
    the paper's map (all levels weighted 1) so the effect of eval.level_weights shows."""
    import torch

    from recontrast.data import build_datasets
    from recontrast.evaluate import evaluate
    from recontrast.pipeline import run_training

    torch.set_num_threads(threads)
    cfg = _config(config, overrides)
    t0 = time.perf_counter()
    datasets = build_datasets(cfg.data)  # decoded once, for training and both evaluations
    result, evaluation, run_id = run_training(cfg, datasets=datasets)
    total = time.perf_counter() - t0
    paper_map = dataclasses.replace(cfg.eval, level_weights=(1.0, 1.0, 1.0), figures=False, gif=False)
    paper = evaluate(result.model, datasets.test, paper_map).metrics
    m = evaluation.metrics
    return {
        "overrides": overrides, "run_id": run_id, "iterations": result.iterations,
        **{k: m[k] for k in METRICS}, "image_ap": m["image_ap"], "pixel_ap": m["pixel_ap"],
        "level_weights": list(cfg.eval.level_weights), "paper_map": {k: paper[k] for k in METRICS},
        "time_to_first_result_s": total, "fit_s": result.fit_seconds, **peak_memory(),
        "final_loss": result.loss_history[-1], "checkpoint": str(result.checkpoint),
    }


# --- speed ---------------------------------------------------------------------------------
def _train_batch(cfg, n: int):
    import torch

    from recontrast.data import build_datasets

    ds = build_datasets(cfg.data).train
    return torch.stack([ds[i % len(ds)]["image"] for i in range(n)])


def train_step_time(config: str, overrides: list[str], threads: int, steps: int, naive: bool) -> dict:
    """Returns seconds per training step (after one warm-up step) and peak RSS.

    naive=True reproduces the reference's waste: the frozen encoder runs inside autograd
    with requires_grad weights, every step decodes and resizes its images from disk, and
    freed memory goes back to the system every step (train.reuse_cpu_memory off)."""
    import torch

    from recontrast.cpu_memory import reuse_freed_memory
    from recontrast.data import build_datasets
    from recontrast.loss import ReContrastLoss
    from recontrast.model import build_model
    from recontrast.runtime import pick_device
    from recontrast.train import build_optimizers

    torch.set_num_threads(threads)
    cfg = _config(config, overrides)
    device = pick_device(cfg.train.device)  # a GPU when there is one (train.device=auto)
    model = build_model(cfg).to(device)
    optimizers = build_optimizers(cfg, model, device)
    loss_fn = ReContrastLoss(cfg.loss, cfg.train.iters)
    bs = cfg.train.batch_size
    if naive:
        raw = build_datasets(dataclasses.replace(cfg.data, cache=False)).train
        model.encoder_frozen.requires_grad_(True)

        def batch(it: int):
            return torch.stack([raw[(it * bs + i) % len(raw)]["image"] for i in range(bs)])

        def forward(x):
            frozen = model.encoder_frozen(x)  # inside autograd, as in the reference
            trained = model.encoder(x)
            both = [torch.cat([t, f]) for t, f in zip(trained, frozen)]
            decoded = model.decoder(model.bottleneck(both))
            halves = [d.chunk(2) for d in decoded]
            p0 = [h(d[0]) for h, d in zip(model.heads[0], halves)]
            p1 = [h(d[1]) for h, d in zip(model.heads[1], halves)]
            return list(zip(frozen, p0)) + list(zip(trained, p1))
    else:
        cached = _train_batch(cfg, bs)

        def batch(it: int):
            return cached

        forward = model
    model.train()
    times = []
    with reuse_freed_memory(cfg.train.reuse_cpu_memory and not naive and device.type == "cpu"):
        for it in range(steps + 1):
            t0 = time.perf_counter()
            loss, _ = loss_fn(forward(batch(it).to(device)), it)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    step = sum(times[1:]) / steps
    return {"step_s": step, "img_per_s": bs / step, "it_per_s": 1 / step, **peak_memory(),
            "batch_size": bs, "image_size": cfg.data.image_size, "backbone": cfg.model.backbone, "naive": naive}


# The training-cost settings the speed section compares side by side (issue 20): name ->
# (overrides, OMP_WAIT_POLICY of the worker (None: unset, OpenMP's default), the recipe's
# eval_every). "issue" is the recipe as issue 20 measured it (encoder BN eval, fp32, the frozen
# encoder run every step, OpenMP's default spin-wait, a proxy evaluation every 40 iterations,
# the whole encoder trained, every layer under bf16's autocast); "recipe" is
# experiments/cpu_default.yaml as it now is. The rows between change one thing at a time.
F32, B16, BN_EVAL = "train.precision=fp32", "train.precision=bf16", "model.encoder_bn=eval"
NO_CACHE, CACHE = "train.cache_features=false", "train.cache_features=true"
POOL1 = "model.bottleneck_pool=1"  # the code of every row but "recipe" (whose coarse code, where the
# spread lets it through, is cheaper, if anything: the bottleneck's blocks on a map 4x smaller)
WAVE3 = ["model.freeze_stem=false", "train.depthwise_fp32=false", POOL1]  # ... and before the frozen stem
THROUGHPUT = {
    "issue": ([*WAVE3, BN_EVAL, F32, NO_CACHE], None, 40),
    "passive": ([*WAVE3, BN_EVAL, F32, NO_CACHE], "PASSIVE", 40),
    "passive_cache": ([*WAVE3, BN_EVAL, F32, CACHE], "PASSIVE", 70),
    "bf16": ([*WAVE3, BN_EVAL, B16, NO_CACHE], None, 40),
    "bf16_passive_cache": ([*WAVE3, BN_EVAL, B16, CACHE], "PASSIVE", 70),
    "bn_train": (WAVE3, "PASSIVE", None),  # the recipe of the wave's first sessions (encoder BN train)
    "depthwise_fp32": (["model.freeze_stem=false", POOL1], "PASSIVE", None),
    "recipe": ([], "PASSIVE", None),  # + model.freeze_stem
}
RECIPE_ITERS = 280  # cpu_default.yaml's train.iters: the proxy evaluations are counted per 280 iterations


def throughput_table(rows: dict) -> str:
    """Returns the throughput rows as one markdown table (what docs/speed.md quotes)."""
    lines = ["| row | precision | feature cache | OMP_WAIT_POLICY | it / CPU-min (steps) | it / CPU-min (recipe, "
             "with its proxy evaluations) | x issue | it / wall-min | loss at the last iteration | one proxy "
             "evaluation, CPU s | load before -> after |", "|---" * 11 + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['precision']} | {r['cache_features']} | {r['omp_wait_policy']} | "
                     f"{r['it_per_cpu_min']:.1f} | {r['recipe_it_per_cpu_min']:.1f} | {_ratio(r)} | "
                     f"{r['it_per_wall_min']:.1f} | {r['final_loss']:.3f} | {r['proxy_eval_cpu_s'] or 0:.1f} | "
                     f"{r['load_before']:.1f} -> {r['load_after']:.1f} |")
    return "\n".join(lines)


def _ratio(row: dict) -> str:
    """Returns '1.78x', or with several rounds '1.78x (1.61-1.80)': the median and the range."""
    spread = row.get("speedups") or []
    return f"{row['speedup_vs_issue']:.2f}x" + (f" ({min(spread):.2f}-{max(spread):.2f})" if len(spread) > 1 else "")


def recipe_rate(row: dict, eval_every: int) -> float:
    """Returns training iterations per CPU-minute of a 280-iteration run that also runs its
    proxy evaluations every `eval_every` iterations (what a recipe's training costs)."""
    evals = RECIPE_ITERS // eval_every if eval_every else 1
    cpu = RECIPE_ITERS * row["cpu_s"] / row["iters"] + evals * (row["proxy_eval_cpu_s"] or 0.0)
    return 60 * RECIPE_ITERS / cpu


def median_rows(measured: dict[str, list[dict]]) -> dict[str, dict]:
    """Returns one row per name from rounds of interleaved measurements ("issue" among them):
    the round whose ratio to the same round's issue row is the median, with every round's
    ratio (`speedups`) beside it (`speedup_vs_issue`: that median ratio)."""
    issue = measured["issue"]
    out = {}
    for name, rounds in measured.items():
        ratios = [r["recipe_it_per_cpu_min"] / i["recipe_it_per_cpu_min"] for r, i in zip(rounds, issue)]
        middle = sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]
        out[name] = {**rounds[middle], "speedup_vs_issue": ratios[middle], "speedups": ratios}
    return out


def train_throughput(config: str, overrides: list[str], threads: int, iters: int) -> dict:
    """Returns training iterations per CPU-minute and per wall-minute of the real loop
    (recontrast.train.train: batches, feature cache, precision, checkpoints), the final loss,
    the cost of one proxy evaluation, and the load average around it."""
    import os

    import torch

    from recontrast.data import build_datasets
    from recontrast.evaluate import proxy_metrics
    from recontrast.pipeline import proxy_dataset
    from recontrast.runtime import autocast_dtype
    from recontrast.train import train

    torch.set_num_threads(threads)
    cfg = _config(config, overrides + [f"train.iters={iters}", "tracking.enabled=false",
                                       f"train.checkpoint_every={iters}"])
    eval_every, cfg.train.eval_every = cfg.train.eval_every, 0  # timed once below, counted by recipe_rate
    datasets = build_datasets(cfg.data)
    load, cpu0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    result = train(cfg, datasets=datasets)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    proxy, cpu1 = proxy_dataset(cfg, datasets), time.process_time()
    if proxy is not None:
        proxy_metrics(result.model, proxy, cfg.eval)
    return {"iters": iters, "cpu_s": cpu, "wall_s": wall, "it_per_cpu_min": 60 * iters / cpu,
            "it_per_wall_min": 60 * iters / wall, "final_loss": result.loss_history[-1],
            "proxy_eval_cpu_s": time.process_time() - cpu1 if proxy is not None else None,
            "load_before": load, "load_after": os.getloadavg()[0],
            "precision": str(autocast_dtype(cfg.train.precision, "cpu") or "fp32").removeprefix("torch."),
            "cache_features": cfg.train.cache_features, "eval_every": eval_every, **peak_memory()}


def inference_speed(config: str, overrides: list[str], threads: int, batch_size: int, n_images: int,
                    repeat: int = 1) -> dict:
    """Returns evaluation throughput (anomaly maps + scores + streamed pixel metrics) and peak RSS.

    repeat > 1 evaluates the test set that many times over (the memory-growth check)."""
    import torch
    from torch.utils.data import ConcatDataset, Subset

    from recontrast.data import build_datasets
    from recontrast.evaluate import evaluate
    from recontrast.model import build_model
    from recontrast.runtime import pick_device

    torch.set_num_threads(threads)
    cfg = _config(config, overrides)
    device = pick_device(cfg.train.device)
    cfg.eval.batch_size = batch_size
    test = build_datasets(cfg.data).test
    def spread(n: int) -> Subset:  # good and defect images alike (the folders are sorted)
        return Subset(test, list(range(0, len(test), max(1, len(test) // n)))[:n])

    data = spread(n_images) if n_images else test
    data = ConcatDataset([data] * repeat) if repeat > 1 else data
    model = build_model(cfg).to(device).eval()
    evaluate(model, spread(min(2 * batch_size, len(test))), cfg.eval, device=device)  # warm-up
    t0 = time.perf_counter()
    evaluate(model, data, cfg.eval, device=device)  # ends with its results on the host
    elapsed = time.perf_counter() - t0
    return {"images": len(data), "seconds": elapsed, "img_per_s": len(data) / elapsed,
            **peak_memory(), "batch_size": batch_size, "image_size": cfg.data.image_size}


def compute_bound(config: str, overrides: list[str], threads: int) -> dict:
    """Returns the FLOPs of one training step and of one evaluated image (torch's FLOP
    counter, convolutions and matmuls), this CPU's measured fp32 matmul rate, and the
    fastest step time and evaluation rate that rate would allow."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from recontrast.loss import ReContrastLoss
    from recontrast.model import build_model

    torch.set_num_threads(threads)
    cfg = _config(config, overrides)
    model, size, batch = build_model(cfg), cfg.data.image_size, 2
    loss_fn = ReContrastLoss(cfg.loss, cfg.train.iters)
    x = torch.randn(batch, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(x), 0)[0].backward()
    step = counter.get_total_flops() / batch * cfg.train.batch_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.anomaly_pairs(x[:1])
    image = counter.get_total_flops()
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    peak = 3 * 2 * 4096**3 / (time.perf_counter() - t0)
    return {"train_step_tflop": step / 1e12, "eval_gflop_per_image": image / 1e9,
            "matmul_gflop_s": peak / 1e9, "min_step_s_at_matmul_rate": step / peak,
            "max_eval_img_per_s_at_matmul_rate": peak / image}


def section_metrics(section: str, values: dict) -> dict:
    """Returns what a section logs as MLflow metrics (nested dicts become a/b/c keys)."""
    if section == "categories":
        return {f"{r['category']}/{r['method']}": {**r["metrics"], "fit_seconds": r["fit_seconds"]}
                for r in values["rows"]}
    if section == "correlation":
        return {"spearman/" + k.replace(" ~ ", "_vs_"): v for k, v in values.items() if " ~ " in k}
    return values


def log_section(config: str, overrides: list[str], section: str, values: dict) -> str:
    """Logs a section as one MLflow run (same experiment as the accuracy runs) so the UI
    shows it beside them; returns the run id."""
    from recontrast.tracking import start_run

    cfg = _config(config, overrides)
    with start_run(cfg, run_name=f"bench_{section}", tags={"benchmark_section": section}) as run:
        run.log_metrics(section_metrics(section, values))
        run.log_text(json.dumps(values, indent=1), f"{section}.json")
        return run.run_id


# --- categories and correlation (benchmarks/categories.py) -----------------------------------
def run_categories(args, out: Path, saved: Path) -> dict:
    """Returns {"rows": [...], "verdicts": [...]}: ReContrast's default recipe, PaDiM and
    PatchCore on every category, each in its own subprocess; written to `saved`/categories.json
    after every row, so a long run that is stopped keeps what it measured."""
    roots = categories.category_roots(out)
    wanted = [c for c in args.categories.split(",") if c] or list(roots)
    partial = saved.with_name("categories.json")
    # --resume: the rows an earlier (stopped, or partly failed) run measured are kept, not redone
    rows: list[dict] = json.loads(partial.read_text()) if args.resume and partial.is_file() else []
    done = {(r["category"], r["method"]) for r in rows}
    methods = args.methods.split(",")
    for category in wanted:
        partial.write_text(json.dumps(rows, indent=1, default=str))
        if "recontrast" in methods and (category, "recontrast") not in done:
            rows.append(in_subprocess(categories.recontrast_row, args.recipe, roots[category], category, out,
                                      args.threads, args.set))
            print(f"[bench] categories/{category}/recontrast: {json.dumps(_brief(rows[-1]))}", flush=True)
        for method in [m for m in ("padim", "patchcore") if m in methods and (category, m) not in done]:
            try:
                rows.append(in_subprocess(categories.peer_row, method, roots[category], category, args.threads))
            except Exception as err:  # anomalib missing (pip install -e .[peers]) or a peer failed
                print(f"[bench] categories/{category}/{method}: skipped ({type(err).__name__}: {err})", flush=True)
                continue
            print(f"[bench] categories/{category}/{method}: {json.dumps(_brief(rows[-1]))}", flush=True)
    partial.write_text(json.dumps(rows, indent=1, default=str))
    return {"recipe": args.recipe, "rows": rows, "verdicts": categories.verdicts(rows)}


def trained_models(rows: list[dict]) -> list[dict]:
    """Returns one row per ReContrast model the categories section trained: each category's kept
    model (setting "recipe", its metrics and health) and, where train.bn_fallback trained it
    twice, the flagged training it did not keep, in <train.out>/attempt1 or attempt2 (setting
    "attempt1" / "attempt2", no metrics yet: the correlation evaluates it)."""
    from recontrast.config import ATTEMPT1, ATTEMPT2
    from recontrast.health import NOT_CONVERGED

    found = []
    for r in rows:
        if r["method"] != "recontrast":
            continue
        kept = Path(r["checkpoint"])
        found.append({"category": r["category"], "setting": "recipe", "checkpoint": str(kept),
                      "metrics": r["metrics"], "health": r.get("health")})
        for other in (ATTEMPT1, ATTEMPT2):
            dropped = kept.parent / other / kept.name
            if r.get("attempts") == 2 and dropped.is_file():
                found.append({"category": r["category"], "setting": other, "checkpoint": str(dropped),
                              "metrics": None, "health": NOT_CONVERGED})
    return found


def across_categories(args, out: Path, results: dict) -> dict:
    """Returns Spearman's rho between proxy/score and the real AUPRO / image AUROC over every
    (category, model, map) of the categories section (issue 20's target: >= 0.7): each model
    under each map of compute_study.MAPS, real metrics on the test set, proxy metrics on the
    held-out normal images. Rows are saved to <out>/correlation_models.json as they finish."""
    import compute_study

    saved = out / "correlation_models.json"
    done = {(m["category"], m["setting"]): m for m in json.loads(saved.read_text())} if args.resume and saved.is_file() else {}
    models = []
    for model in trained_models((results.get("categories") or {}).get("rows", [])):
        model = done.get((model["category"], model["setting"]), model)  # --resume: keep what was measured
        if set(compute_study.MAPS) - {"recipe"} - set(model.get("maps") or {}) or not model.get("metrics"):
            model["maps"] = in_subprocess(compute_study.map_variants, model, args.threads)
            model["metrics"] = model["metrics"] or model["maps"].pop("recipe")
        if set(compute_study.MAPS) - set(model.get("proxy") or {}):
            model["proxy"] = in_subprocess(compute_study.proxy_of, model, args.threads)
        models.append(model)
        saved.write_text(json.dumps(models, indent=1, default=str))
        recipe_proxy = model["proxy"]["recipe"].get("proxy/score", float("nan"))
        print(f"[bench] correlation/{model['category']}/{model['setting']}: proxy/score {recipe_proxy:.4f}, "
              f"{json.dumps({k: round(model['metrics'].get(k, float('nan')), 4) for k in METRICS})}", flush=True)
    return {"n_models": len(models), **compute_study.correlation(models)}


def run_correlation(args, out: Path, results: dict) -> dict:
    """Returns the proxy-vs-real rank correlation over the checkpoints of two bottle trainings
    and ("across") over every model, category and map of the categories section."""
    root = SHARED if (SHARED / "bottle").is_dir() else categories.category_roots(out)["weave"]
    category = "bottle" if root == SHARED else "weave"
    # The default recipe's own bottle run (categories section) evaluated every eval_every
    # iterations already: reuse its checkpoints; train the ablation (and the default, if absent).
    earlier = [r for r in (results.get("categories") or {}).get("rows", [])
               if r["category"] == category and r["method"] == "recontrast" and r.get("points")]
    points = list(earlier[0]["points"]) if earlier else []
    variants = {"no_domain_adaptation": ["model.domain_adaptation=false"]} | ({} if points else {"default": []})
    for name, extra in variants.items():
        points += in_subprocess(categories.checkpoint_points, args.recipe, root, category, out, args.threads,
                                name, [*args.set, *extra, f"train.eval_every={args.eval_every}"], args.eval_every)
    summary = categories.rank_correlation(points)
    print(f"[bench] correlation ({category}): {json.dumps(summary)}", flush=True)
    across = across_categories(args, out, results)
    import compute_study

    across["figure"] = str(compute_study.correlation_figure(across, out / "correlation.png"))
    print(f"[bench] correlation (across): {json.dumps({k: v for k, v in across.items() if k != 'points'})}", flush=True)
    return {"category": category, "recipe": args.recipe, **summary, "points": points, "across": across}


def _brief(row: dict) -> dict:
    keep = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1max", "proxy/score")
    return {"fit_s": round(row["fit_seconds"], 1), "health": row.get("health", "-"),
            **{k: round(row[k], 2) for k in ("cpu_seconds", "load_before", "load_after") if k in row},
            **{k: round(row["metrics"][k], 4) for k in keep if k in row["metrics"]}}


def across_markdown(across: dict) -> list[str]:
    """Returns the report's lines for the correlation across categories, models and maps: rho
    against issue 20's target and, per model at its recipe map, the proxy score beside the real
    metrics and the health check's verdict (does a failing model stand out without labels?)."""
    lines = [f"### Proxy vs real across categories ({across['n_models']} models x their maps, "
             f"{across['n']} points, Spearman; target >= {ACROSS_TARGET})", ""]
    for real in ("aupro", "image_auroc"):
        rho = across[f"proxy/score ~ {real}"]
        lines.append(f"- proxy/score ~ {real}: {rho:.3f} over {across[f'n ~ {real}']} "
                     f"({'met' if rho >= ACROSS_TARGET else 'NOT met'})")
    if across.get("figure"):
        lines.append(f"- figure: {across['figure']}")
    lines += ["", "| category | model | health | proxy/score | I-AUROC | AUPRO |", "|---|---|---|---|---|---|"]
    for p in across["points"]:
        if p["map"] == "recipe":
            cells = " | ".join("n/a" if p[k] != p[k] else f"{100 * p[k]:.2f}" for k in ("proxy", "image_auroc", "aupro"))
            lines.append(f"| {p['category']} | {p['setting']} | {p.get('health') or '-'} | {cells} |")
    return lines + [""]


# --- driver --------------------------------------------------------------------------------
def data_overrides(out: Path) -> list[str]:
    if (SHARED / "bottle").is_dir():
        return [f"data.root={SHARED}", "data.category=bottle"]
    from recontrast.synthetic import generate

    root = out / "synthetic"
    if not (root / "weave").is_dir():
        generate(root, size=256, n_train=200, categories=["weave"])
    return [f"data.root={root}", "data.category=weave"]


def markdown(results: dict) -> str:
    lines = [f"# Benchmark ({results['host']})", ""]
    if "accuracy" in results:
        lines += ["| variant | map | I-AUROC | P-AUROC | AUPRO@0.3 | P-F1max | fit s | train+eval s |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in results["accuracy"].items():
            for label, m in ((f"levels {r['level_weights']}", r), ("paper (all levels)", r["paper_map"])):
                cells = " | ".join(f"{100 * m[k]:.2f}" for k in METRICS)
                lines.append(f"| {name} | {label} | {cells} | {r['fit_s']:.0f} | {r['time_to_first_result_s']:.0f} |")
        full = results["accuracy"].get("full")
        if full is not None:
            met = [f"{k} {'met' if full[k] >= v else 'NOT met'}" for k, v in TARGETS.items()]
            met.append(f"fit within 15 min {'met' if full['fit_s'] <= FIT_LIMIT_S else 'NOT met'}")
            lines += ["", "Targets (full method): " + ", ".join(met)]
        lines.append("")
    if "categories" in results:
        lines += [f"## Categories ({results['categories']['recipe']}, vs anomalib peers)", "",
                  categories.table(results["categories"]["rows"]), "", *[f"- {v}" for v in results["categories"]["verdicts"]], ""]
    if "correlation" in results:
        c = results["correlation"]
        lines += [f"## Proxy vs real metrics ({c['category']}, {c['n_checkpoints']} checkpoints, Spearman)", ""]
        lines += [f"- {k}: {v:.3f}" for k, v in c.items() if " ~ " in k]
        lines.append("")
        if c.get("across"):
            lines += across_markdown(c["across"])
    for section in ("speed", "scaling", "reference"):
        if section in results:
            lines += [f"## {section}", "", "```", json.dumps(results[section], indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/cpu_bottle.yaml")
    parser.add_argument("--sections", default="accuracy,speed,scaling,reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    parser.add_argument("--ref-steps", type=int, default=2)
    parser.add_argument("--ref-runs", default="", help="comma-separated subset of the reference section's rows")
    parser.add_argument("--jemalloc", default="", help="path of libjemalloc.so.2 (Debian: libjemalloc2): adds "
                        "the reference rows after_jemalloc and after_recompute_jemalloc (LD_PRELOAD)")
    parser.add_argument("--recipe", default=categories.DEFAULT_CONFIG,
                        help="the one ReContrast recipe of the categories and correlation sections")
    parser.add_argument("--categories", default="", help="comma-separated (default: every one available)")
    parser.add_argument("--methods", default="recontrast,padim,patchcore", help="categories: which methods")
    parser.add_argument("--resume", action="store_true",
                        help="categories: keep the rows of <out>/categories.json and measure only the missing ones; "
                        "correlation: likewise the models of <out>/correlation_models.json")
    parser.add_argument("--eval-every", type=int, default=40, help="correlation: evaluate every N iterations")
    parser.add_argument("--speed-iters", type=int, default=24, help="speed: training iterations per throughput row")
    parser.add_argument("--speed-repeat", type=int, default=1,
                        help="speed: rounds of the throughput rows, interleaved; the table shows the median ratio")
    parser.add_argument("--speed-rows", default=",".join(THROUGHPUT),
                        help="speed: which throughput rows (the 'issue' row is always measured: the ratios are to it)")
    args = parser.parse_args()
    rows = set(args.speed_rows.split(",")) - {""}
    if rows - set(THROUGHPUT):
        parser.error(f"--speed-rows: unknown {sorted(rows - set(THROUGHPUT))}; choose from {', '.join(THROUGHPUT)}")
    unknown = set(args.methods.split(",")) - {"recontrast", "padim", "patchcore"}
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from recontrast, padim, patchcore")
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    base = data_overrides(out) + ["tracking.experiment=benchmark", f"train.threads={args.threads}"] + args.set
    sections = args.sections.split(",")
    saved = out / "results.json"
    # Sections not run this time keep their last results (run sections one at a time if needed).
    results: dict = json.loads(saved.read_text()) if saved.is_file() else {}
    results.update({"host": f"{platform.processor() or platform.machine()}, {args.threads} threads",
                    "config": args.config, "base_overrides": base})

    def show(name: str, value) -> None:
        print(f"[bench] {name}: {json.dumps(value)}", flush=True)

    if "accuracy" in sections:
        results["accuracy"] = {}
        for name, extra in {"full": [], "no_domain_adaptation": ["model.domain_adaptation=false"]}.items():
            r = in_subprocess(accuracy_run, args.config, base + extra + [
                f"train.out={out / name}", f"tracking.run_name=bench_{name}", f"tracking.ablation={name}"], args.threads)
            results["accuracy"][name] = r
            show(f"accuracy/{name}", r)
    if "speed" in sections:
        speed = {"train": in_subprocess(train_step_time, args.config, base, args.threads, 3, False)}
        # The default recipe's loop under each cost setting, side by side in this one run (issue 20).
        from recontrast.runtime import environment

        measured: dict[str, list[dict]] = {}
        # Rows interleaved, --speed-repeat rounds: a drift of the machine's speed reaches every row alike.
        for _ in range(args.speed_repeat):
            for name, (extra, omp_wait, eval_every) in THROUGHPUT.items():
                if name != "issue" and name not in rows:
                    continue
                with environment(OMP_WAIT_POLICY=omp_wait):  # read by the spawned worker when it loads torch
                    row = in_subprocess(train_throughput, args.recipe, base + extra, args.threads, args.speed_iters)
                row["eval_every"] = row["eval_every"] if eval_every is None else eval_every
                row.update(omp_wait_policy=omp_wait or "(OpenMP default)",
                           recipe_it_per_cpu_min=recipe_rate(row, row["eval_every"]))
                measured.setdefault(name, []).append(row)
        throughput = median_rows(measured)
        for name, row in throughput.items():
            show(f"speed/throughput/{name}", row)
        print(throughput_table(throughput), flush=True)
        speed["throughput"] = throughput
        for bs in (1, 16):
            speed[f"inference_b{bs}"] = in_subprocess(inference_speed, args.config, base, args.threads, bs, 32)
        results["speed"] = speed
        show("speed", speed)
    if "scaling" in sections:
        scaling = {}
        for size in (128, 256, 384):
            ov = base + [f"data.image_size={size}"]
            scaling[f"train_{size}px"] = in_subprocess(train_step_time, args.config, ov, args.threads, 2, False)
            scaling[f"eval_{size}px"] = in_subprocess(inference_speed, args.config, ov, args.threads, 16, 32)
            show(f"scaling/{size}", [scaling[f"train_{size}px"], scaling[f"eval_{size}px"]])
        for repeat in (1, 2, 4):
            scaling[f"eval_testx{repeat}"] = in_subprocess(inference_speed, args.config, base, args.threads, 16, 0, repeat)
            show(f"scaling/testx{repeat}", scaling[f"eval_testx{repeat}"])
        results["scaling"] = scaling
    if "reference" in sections:
        wrn = base + ["model.backbone=wide_resnet50_2", "model.pretrained=none", "model.width_mult=1.0",
                      "data.image_size=256", "train.batch_size=16", "model.recompute_decoder=false",
                      "model.recompute_encoder=false"]
        nchw, nhwc = wrn + ["model.channels_last=false"], wrn + ["model.channels_last=true"]
        recompute = ["model.recompute_decoder=true", "model.recompute_encoder=true"]
        # The authors' code, measured side by side with this project on this machine (issue 16).
        ref = {"authors_code": {"train_step_s": 48.3, "train_peak_gb": 12.6, "eval_img_per_s": 1.17, "eval_peak_gb": 2.7}}
        runs = {  # name: (function, args); "before" is the benchmark's emulation of the reference's way
            "before": (train_step_time, (args.config, nchw, args.threads, args.ref_steps, True)),
            "after": (train_step_time, (args.config, nhwc, args.threads, args.ref_steps, False)),
            "after_recompute": (train_step_time, (args.config, nhwc + recompute, args.threads, args.ref_steps, False)),
            "after_least_memory": (train_step_time, (args.config, nhwc + recompute + ["train.reuse_cpu_memory=false"],
                                                     args.threads, args.ref_steps, False)),
            "eval_b1_nchw": (inference_speed, (args.config, nchw, args.threads, 1, 16)),
            "eval_b1": (inference_speed, (args.config, nhwc, args.threads, 1, 16)),
            "compute": (compute_bound, (args.config, nhwc, args.threads)),
        }
        if args.jemalloc:  # the allocator A/B: jemalloc keeps freed pages itself, no heap growth
            low = nhwc + ["train.reuse_cpu_memory=false"]
            runs["after_jemalloc"] = (train_step_time, (args.config, low, args.threads, args.ref_steps, False))
            runs["after_recompute_jemalloc"] = (train_step_time, (args.config, low + recompute, args.threads,
                                                                  args.ref_steps, False))
        from recontrast.runtime import environment

        wanted = [r for r in args.ref_runs.split(",") if r] or list(runs)
        for name in wanted:
            fn, fn_args = runs[name]
            preload = args.jemalloc if name.endswith("_jemalloc") else ""
            with environment(LD_PRELOAD=preload or None):  # a spawned worker inherits it
                ref[name] = in_subprocess(fn, *fn_args)
            show(f"reference/{name}", ref[name])
        if "before" in ref and "after" in ref:
            ref["speedup_before_after"] = ref["before"]["step_s"] / ref["after"]["step_s"]
        results["reference"] = ref
    if "categories" in sections:
        results["categories"] = run_categories(args, out, saved)
    if "correlation" in sections:
        results["correlation"] = run_correlation(args, out, results)
    for section in ("speed", "scaling", "reference", "categories", "correlation"):
        if section in sections:  # sections kept from an earlier run are logged already
            results[section]["mlflow_run_id"] = log_section(args.config, base, section, results[section])
    saved.write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"saved {saved} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
