"""The training images' position spread per category, and the bottleneck code a recipe chooses
with it (train.pool_max_spread; recontrast/layout.py). Label-free and training-free: one pass
of the frozen encoder over each category's training images.

    HF_HUB_OFFLINE=1 python benchmarks/spread.py --sizes 256,320 --out bench_out/spread

Categories: bottle and screw from ../shared/data when present, the synthetic ones generated
under <out>/synthetic (as benchmarks/run.py does). Prints one line per (image size, category)
and writes them to <out>/spread.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import categories  # noqa: E402 - benchmarks/categories.py, beside this file


def spread_row(config: str, root: Path, category: str, size: int, extra: list[str] = ()) -> dict:
    """Returns the category's position spread at `size` px and the bottleneck_pool `config` trains it with."""
    from recontrast.config import load_config
    from recontrast.data import build_datasets
    from recontrast.layout import choose_bottleneck_pool

    cfg = load_config(ROOT / config, [f"data.root={root}", f"data.category={category}",
                                      f"data.image_size={size}", *extra])
    train = build_datasets(cfg.data).train
    wall, cpu = time.perf_counter(), time.process_time()
    chosen, spread = choose_bottleneck_pool(cfg, train)
    return {"category": category, "image_size": size, "images": len(train), "position_spread": spread,
            "limit": cfg.train.pool_max_spread, "bottleneck_pool": chosen.model.bottleneck_pool,
            "wall_seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=categories.DEFAULT_CONFIG)
    parser.add_argument("--categories", default=",".join(("bottle", "screw", *categories.SYNTHETIC)))
    parser.add_argument("--sizes", default="256", help="image sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "spread")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    roots = categories.category_roots(args.out)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for category in args.categories.split(","):
            if category not in roots:
                print(f"[spread] {category}: no data (../shared/data holds bottle and screw)", flush=True)
                continue
            rows.append(spread_row(args.config, roots[category], category, size))
            r = rows[-1]
            spread = "not measured" if r["position_spread"] is None else f"{r['position_spread']:.3f}"
            print(f"[spread] {size} px {category}: position spread {spread} ({r['images']} images, "
                  f"{r['cpu_seconds']:.1f} CPU-s) -> bottleneck_pool {r['bottleneck_pool']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spread.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
