"""A category in a varying pose: the paper's bottleneck code against the coarse one, beside the peers.

    HF_HUB_OFFLINE=1 python benchmarks/pose_study.py --category board --poses 10,0.05 30,0.1 \
        --jobs 2 --out bench_out/jitter

For each pose DEGREES,SHIFT, a copy of the category whose every image (train and test, masks
alike) is turned by up to +-DEGREES and shifted by up to +-SHIFT of the width, one seeded draw
per file (reflection padding for images; nearest and zero padding for masks, so a mask covers
exactly the moved defect), is written to <out>/<pose>/<category>; then its position spread
(train.pool_max_spread, recontrast/layout.py) is measured, and cpu_default.yaml trains it with
model.bottleneck_pool 1 and with 2 (train.pool_max_spread 1.0: the code as asked), beside PaDiM
and PatchCore (`pip install -e .[peers]`). Rows go to <out>/rows.json as they finish (a stopped
study resumes). What docs/recipe.md's "Choosing the code from the training images" reports.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import categories  # noqa: E402 - benchmarks/categories.py, beside this file
import spread  # noqa: E402

SHOWN = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1max")


def write_posed(src: Path, dst: Path, degrees: float, shift: float, seed: int = 0) -> Path:
    """Writes src (one MVTec-layout category) to dst with every image in a pose of its own; returns dst."""
    import numpy as np
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for image in sorted(src.rglob("*.png")):
        rel = image.relative_to(src)
        if rel.parts[0] == "ground_truth":
            continue  # moved with its image below
        x = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)[None].float()
        angle, offset = spread.pose(1, degrees, shift, x.shape[-1], g)
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(spread.moved(x, angle, offset).clamp(0, 255).round().byte()[0].permute(1, 2, 0).numpy()).save(out)
        mask = src / "ground_truth" / rel.parts[1] / f"{image.stem}_mask.png"
        if rel.parts[0] == "test" and mask.is_file():
            m = torch.from_numpy(np.array(Image.open(mask).convert("L")))[None, None].float()
            m = spread.moved(m, angle, offset, mode="nearest", padding="zeros")
            out = dst / "ground_truth" / rel.parts[1] / mask.name
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(((m[0, 0] > 127).numpy() * 255).astype(np.uint8)).save(out)
    return dst


def row(job: tuple) -> dict:
    """Returns one row: (pose name, root, category, method or bottleneck_pool, out, threads)."""
    name, root, category, method, out, threads = job
    os.chdir(ROOT)
    if method in ("padim", "patchcore"):
        found = categories.peer_row(method, root, category, threads)
    else:
        found = categories.recontrast_row(categories.DEFAULT_CONFIG, root, category, out / name / f"pool{method}", threads,
                                          [f"model.bottleneck_pool={method}", "train.pool_max_spread=1.0"])
    return {"pose": name, "method": str(method), **{k: found["metrics"].get(k) for k in SHOWN},
            "health": found.get("health"), "fit_seconds": found.get("fit_seconds"), "cpu_seconds": found.get("cpu_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="board")
    parser.add_argument("--poses", nargs="+", default=["10,0.05", "30,0.1"], help="DEGREES,SHIFT pairs")
    parser.add_argument("--methods", default="1,2,padim,patchcore", help="bottleneck_pool values and peers")
    parser.add_argument("--threads", type=int, default=1, help="per job")
    parser.add_argument("--jobs", type=int, default=1, help="jobs at once (two at most on a 2-core machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "pose")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src = categories.category_roots(args.out)[args.category] / args.category
    saved = args.out / "rows.json"
    rows = json.loads(saved.read_text()) if saved.is_file() else []
    jobs = []
    for text in args.poses:
        degrees, shift = (float(v) for v in text.split(","))
        name = f"pose{degrees:g}_{shift:g}"
        root = args.out / name
        if not (root / args.category / "train").is_dir():
            write_posed(src, root / args.category, degrees, shift)
        if not any(r["pose"] == name and r["method"] == "spread" for r in rows):
            measured = spread.spread_row(categories.DEFAULT_CONFIG, root, args.category, 256)
            rows.append({"pose": name, "method": "spread", "position_spread": measured["position_spread"]})
            print(f"[pose] {name}: position spread {measured['position_spread']:.3f}", flush=True)
        jobs += [(name, root, args.category, m, args.out, args.threads) for m in args.methods.split(",")
                 if not any(r["pose"] == name and r["method"] == m for r in rows)]
    saved.write_text(json.dumps(rows, indent=1))
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for found in pool.imap_unordered(row, jobs):
            rows.append(found)
            saved.write_text(json.dumps(rows, indent=1))
            print(f"[pose] {found['pose']} {found['method']}: " + " / ".join(
                f"{100 * found[k]:.2f}" for k in SHOWN if found[k] is not None) + f" ({found['health'] or 'peer'})",
                flush=True)


if __name__ == "__main__":
    main()
