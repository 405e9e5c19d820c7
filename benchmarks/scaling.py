"""The same tiny study with the local executor and with Ray on this machine: wall time side by
side, and what Ray adds per task (docs/scaling.md, "What Ray costs").

    .venv/bin/python benchmarks/scaling.py [--iters 2] [--jobs 2] [--repeats 1]

A study of 2 variants x 2 synthetic categories (resnet18 from scratch, 64 px), each pair the two
papermill notebooks as `recontrast batch` runs them, `--jobs` pairs at a time: the local
executor's process pool, then a local Ray instance of `--jobs` CPUs (`--executor ray`). Each
run gets a fresh sqlite MLflow store and run folder. Prints one table (markdown).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def study_file(folder: Path, data: Path, iters: int) -> Path:
    config = {
        "data": {"root": str(data), "image_size": 64, "val_fraction": 0.0},
        "model": {"backbone": "resnet18", "pretrained": "none"},
        "train": {"iters": iters, "batch_size": 2, "checkpoint_every": iters, "log_every": 1, "threads": 1},
        "eval": {"figures": False, "gif": False},
        "tracking": {"experiment": "scaling_bench"},
        "study": {"name": "bench", "categories": ["weave", "grain"],
                  "variants": {"full": {}, "no_da": {"model.domain_adaptation": False}}},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_once(executor: str, study: Path, folder: Path, jobs: int) -> tuple[float, list[float]]:
    """Returns (wall seconds, each pair's seconds) of one batch run with a fresh store."""
    from recontrast import batch, mlflow_store
    from recontrast.ray_executor import RayOptions

    (folder / "mlruns").mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    mlflow_store.get_client()  # the store's tables exist before the clock starts, for both executors
    t0 = time.perf_counter()
    report = batch.run_study(study, jobs=jobs, runs_dir=folder / "runs", ray=RayOptions() if executor == "ray" else None)
    wall = time.perf_counter() - t0
    if not report.ok:
        raise SystemExit(f"{executor}: {report.summary()}")
    return wall, [r.seconds for r in report.results]


def ray_start_seconds(cpus: int) -> float:
    """Returns the wall time of starting and stopping an empty local Ray instance (once per batch)."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False)
    ray.get(ray.remote(lambda: None).remote())  # one worker up and answering
    ray.shutdown()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    from recontrast import synthetic

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthetic.generate(tmp / "data", size=64, n_train=12, n_test_good=6, n_test_defect=3, seed=0,
                                  categories=["weave", "grain"])
        study = study_file(tmp, data, args.iters)
        walls: dict[str, list[float]] = {"local": [], "ray": []}
        starts = []
        pairs: dict[str, list[float]] = {"local": [], "ray": []}
        for k in range(args.repeats):
            for executor in ("local", "ray"):
                wall, seconds = run_once(executor, study, tmp / f"{executor}{k}", args.jobs)
                walls[executor].append(wall)
                pairs[executor] += seconds
            starts.append(ray_start_seconds(args.jobs))
    n = len(pairs["local"]) // args.repeats
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"tiny study: {n} pairs (2 variants x 2 categories, {args.iters} iterations), {args.jobs} at a time, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}, median of {args.repeats}")
    print("| executor | study wall time | per pair (in its worker) |")
    print("|---|---|---|")
    for executor in ("local", "ray"):
        print(f"| {executor} | {statistics.median(walls[executor]):.1f} s | "
              f"{statistics.median(pairs[executor]):.1f} s |")
    extra = statistics.median(walls["ray"]) - statistics.median(walls["local"])
    start = statistics.median(starts)
    print(f"Ray adds {extra:.1f} s to the study: {start:.1f} s to start (and stop) the local instance with "
          f"its first worker, once per batch, and {(extra - start) / n * args.jobs:.1f} s per task "
          f"(the rest, x {args.jobs} at a time / {n} tasks)")


if __name__ == "__main__":
    main()
