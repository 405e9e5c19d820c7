"""The training images' position spread per category, and the bottleneck code a recipe chooses
with it (train.pool_max_spread; recontrast/layout.py). Label-free and training-free: one pass
of the frozen encoder over each category's training images.

    HF_HUB_OFFLINE=1 python benchmarks/spread.py --sizes 256,320 --out bench_out/spread
    HF_HUB_OFFLINE=1 python benchmarks/spread.py --categories bottle,board --jitter 0,0 15,0 0,0.1 --out bench_out/spread_pose

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


def pose(n: int, degrees: float, shift: float, width: int, generator) -> tuple:
    """Returns (angles (n,), offsets (n, 2) in pixels): uniform in +-degrees and +-shift * width."""
    import torch

    angle = (torch.rand(n, generator=generator) * 2 - 1) * degrees
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift * width
    return angle, offset


def moved(images, angle, offset, mode: str = "bilinear", padding: str = "reflection"):
    """Returns images (N, C, H, W) turned by `angle` degrees and shifted by `offset` pixels (kornia)."""
    import kornia

    images = kornia.geometry.transform.rotate(images, angle, mode=mode, padding_mode=padding)
    return kornia.geometry.transform.translate(images, offset, mode=mode, padding_mode=padding)


def jittered(dataset, degrees: float, shift: float, seed: int = 0) -> list[dict]:
    """Returns the dataset's images each turned by up to +-`degrees` and shifted by up to
    +-`shift` of the width (uniform, seeded; reflection padding): a pose that varies."""
    import torch

    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    angle, offset = pose(len(images), degrees, shift, images.shape[-1], torch.Generator().manual_seed(seed))
    return [{"image": x} for x in moved(images, angle, offset)]


def spread_row(config: str, root: Path, category: str, size: int, extra: list[str] = (),
               jitter: tuple[float, float] = (0.0, 0.0)) -> dict:
    """Returns the category's position spread at `size` px and the bottleneck_pool `config` trains
    it with; `jitter` (degrees, shift): its training images in a varying pose first (jittered)."""
    from recontrast.config import load_config
    from recontrast.data import build_datasets
    from recontrast.layout import choose_bottleneck_pool

    cfg = load_config(ROOT / config, [f"data.root={root}", f"data.category={category}",
                                      f"data.image_size={size}", *extra])
    train = build_datasets(cfg.data).train
    if any(jitter):
        train = jittered(train, *jitter)
    wall, cpu = time.perf_counter(), time.process_time()
    chosen, spread = choose_bottleneck_pool(cfg, train)
    return {"category": category, "image_size": size, "jitter": list(jitter), "images": len(train), "position_spread": spread,
            "limit": cfg.train.pool_max_spread, "bottleneck_pool": chosen.model.bottleneck_pool,
            "wall_seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=categories.DEFAULT_CONFIG)
    parser.add_argument("--categories", default=",".join(("bottle", "screw", *categories.SYNTHETIC)))
    parser.add_argument("--sizes", default="256", help="image sizes, comma-separated")
    parser.add_argument("--jitter", nargs="*", default=["0,0"],
                        help="DEGREES,SHIFT pairs: the training images turned by up to +-DEGREES and shifted by "
                             "up to +-SHIFT of the width before measuring (how the spread reacts to a varying pose)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "spread")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    roots = categories.category_roots(args.out)
    rows = []
    jitters = [tuple(float(v) for v in j.split(",")) for j in args.jitter]
    for size, jitter in ((int(s), j) for s in args.sizes.split(",") for j in jitters):
        for category in args.categories.split(","):
            if category not in roots:
                print(f"[spread] {category}: no data (../shared/data holds bottle and screw)", flush=True)
                continue
            rows.append(spread_row(args.config, roots[category], category, size, jitter=jitter))
            r = rows[-1]
            spread = "not measured" if r["position_spread"] is None else f"{r['position_spread']:.3f}"
            pose = f" turned +-{jitter[0]:g} deg, shifted +-{jitter[1]:.0%}" if any(jitter) else ""
            print(f"[spread] {size} px {category}{pose}: position spread {spread} ({r['images']} images, "
                  f"{r['cpu_seconds']:.1f} CPU-s) -> bottleneck_pool {r['bottleneck_pool']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spread.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
