"""One prepared device check: does the paper's recipe run on this GPU, how fast, and is it on course?

    python benchmarks/gpu_check.py                 # on a GPU machine, within ~8 minutes
    python benchmarks/gpu_check.py --dry-run       # anywhere: tiny backbone, CPU, 2 iterations

It prints ONE table:
- per setting (fp32, bf16, fp16, compile = bf16 + model.compile): the training step time of
  experiments/mvtec_paper.yaml (WRN50, 256 px, batch 16), measured in the real loop
  (recontrast.train) after its warm-up steps, and the peak GPU memory;
- the fastest working setting trained for --iters iterations (200) and evaluated, beside the
  paper's figures for 2000 iterations, with "on course" when each metric is within
  --tolerance points of them.
Data: the bottle copy in ../shared/data when present, else the synthetic `disc` category
(generated). ImageNet weights: timm's (a download); where there is no network the check says so
and measures with random weights (times hold, metrics do not), or give --weights PATH
(a local wide_resnet50_2 state_dict / timm checkpoint). Results also go to <out>/gpu_check.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "mvtec_ad_256"
PAPER = {"bottle": {"image_auroc": 1.0, "pixel_auroc": 0.9899, "aupro": 0.9709}}  # docs/method.md, 2000 it
SETTINGS = {"fp32": ["train.precision=fp32"], "bf16": ["train.precision=bf16"], "fp16": ["train.precision=fp16"],
            "compile": ["train.precision=bf16", "model.compile=true"]}
DRY_RUN = ["model.backbone=resnet18", "model.pretrained=none", "data.image_size=64", "train.batch_size=2",
           "train.device=cpu", "train.threads=1", "data.val_fraction=0.2"]
sys.path.insert(0, str(ROOT))


class _StepTimes:
    """A training callback that keeps the wall time of every logged iteration (log_every=1)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __getattr__(self, name):  # the other hooks: nothing to do
        return lambda *args, **kwargs: None

    def on_log(self, iteration, metrics):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())


def data_overrides(out: Path, dry_run: bool) -> tuple[list[str], str]:
    """Returns the data overrides (bottle copy or a generated synthetic category) and the category."""
    if (SHARED / "bottle" / "train").is_dir() and not dry_run:
        return [f"data.root={SHARED}", "data.category=bottle"], "bottle"
    from recontrast.synthetic import generate

    root, size = out / "synthetic", 64 if dry_run else 256
    if not (root / "disc" / "train").is_dir():
        generate(root, size=size, categories=["disc"], **({"n_train": 12, "n_test_good": 4, "n_test_defect": 4}
                                                            if dry_run else {}))
    return [f"data.root={root}", "data.category=disc"], "disc"


def weights_overrides(weights: str | None, dry_run: bool) -> tuple[list[str], str]:
    """Returns the weight source override and a note when the metrics cannot be compared."""
    if dry_run:
        return [], "dry run: random weights"
    if weights:
        return [f"model.pretrained={weights}"], ""
    try:
        from recontrast.backbones import create_encoder

        create_encoder("wide_resnet50_2", "timm")
        return [], ""
    except Exception as err:  # no network on the GPU machine, no cached weights
        return (["model.pretrained=none"],
                f"no ImageNet weights ({type(err).__name__}); random weights: times hold, metrics are not the paper's")


def step_time(base: list[str], setting: str, steps: int, out: Path) -> dict:
    """Returns the median step time and peak memory of `steps` real training iterations."""
    import torch

    from recontrast.config import load_config
    from recontrast.runtime import pick_device
    from recontrast.train import train

    cfg = load_config(ROOT / "experiments" / "mvtec_paper.yaml", [
        *base, *SETTINGS[setting], f"train.iters={steps}", "train.log_every=1", "train.eval_every=0",
        f"train.checkpoint_every={steps}", "tracking.enabled=false", f"train.out={out / setting}"])
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = _StepTimes(device)
    t0 = time.perf_counter()
    train(cfg, [timer])
    warm = min(3, max(len(timer.times) - 2, 0))  # the first steps include cuDNN/compile warm-up
    gaps = [b - a for a, b in zip(timer.times[warm:], timer.times[warm + 1:])]
    return {"step_s": statistics.median(gaps) if gaps else math.nan, "total_s": time.perf_counter() - t0,
            "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan}


def short_run(base: list[str], setting: str, iters: int, out: Path) -> dict:
    """Returns the metrics of `iters` iterations of `setting`, evaluated as the pipeline does."""
    from recontrast.config import load_config
    from recontrast.pipeline import run_training

    cfg = load_config(ROOT / "experiments" / "mvtec_paper.yaml", [
        *base, *SETTINGS[setting], f"train.iters={iters}", "train.eval_every=0", "tracking.enabled=false",
        "eval.gif=false", f"train.out={out / f'{setting}_{iters}it'}", f"train.checkpoint_every={iters}"])
    t0 = time.perf_counter()
    result, evaluation, _ = run_training(cfg, track=False)
    return {"metrics": evaluation.metrics, "seconds": time.perf_counter() - t0, "health": result.health.status}


def table(device: str, rows: dict, run: dict | None, category: str, note: str, tolerance: float) -> str:
    """Returns the one table the check prints."""
    lines = [f"GPU check on {device} ({category}; experiments/mvtec_paper.yaml){': ' + note if note else ''}",
             "| setting | step s | peak GB | it/s |", "|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:90]} | | |")
        else:
            lines.append(f"| {name} | {r['step_s']:.3f} | {r['peak_gb']:.2f} | {1 / r['step_s']:.2f} |")
    if run is not None:
        m, paper = run["metrics"], PAPER.get(category, {})
        cells = []
        for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_f1max"):
            value, ref = m.get(key), paper.get(key)
            shown = "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"
            cells.append(f"{key} {shown}" + (f" (paper {100 * ref:.2f})" if ref is not None else ""))
        behind = [k for k, ref in paper.items() if not m.get(k, 0) >= ref - tolerance / 100]
        verdict = ("no paper figure for this category" if not paper else
                   "on course" if not behind else f"NOT on course ({', '.join(behind)} more than {tolerance} points behind)")
        lines += ["", f"{run['setting']}, {run['iters']} iterations in {run['seconds']:.0f} s (health {run['health']}): "
                  + "; ".join(cells), f"verdict: {verdict}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny backbone on the CPU, 2 iterations (tests)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed iterations per setting (default 12; dry run 2)")
    parser.add_argument("--iters", type=int, default=None, help="iterations of the short run (default 200; dry run 2)")
    parser.add_argument("--tolerance", type=float, default=5.0, help="points from the paper's figures still 'on course'")
    parser.add_argument("--weights", default=None, help="a local wide_resnet50_2 state_dict (no network here)")
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "gpu_check"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    steps = args.steps or (2 if args.dry_run else 12)
    iters = args.iters or (2 if args.dry_run else 200)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    data, category = data_overrides(out, args.dry_run)
    weights, note = weights_overrides(args.weights, args.dry_run)
    base = [*data, *weights, *(DRY_RUN if args.dry_run else [])]
    device = "cpu (dry run)" if args.dry_run else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    rows: dict[str, dict] = {}
    for name in [s for s in args.settings.split(",") if s]:
        try:
            rows[name] = step_time(base, name, steps, out)
        except Exception as err:  # fp16 without CUDA, compile without a compiler: say so, go on
            rows[name] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
        print(f"[gpu_check] {name}: {rows[name]}", flush=True)
    working = {k: r for k, r in rows.items() if "error" not in r and math.isfinite(r["step_s"])}
    run = None
    if working:
        fastest = min(working, key=lambda k: working[k]["step_s"])
        run = {"setting": fastest, "iters": iters, **short_run(base, fastest, iters, out)}
    report = table(device, rows, run, category, note, args.tolerance)
    print(report)
    results = {"device": device, "category": category, "note": note, "rows": rows, "run": run, "table": report}
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
