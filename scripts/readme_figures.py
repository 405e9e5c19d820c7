"""Makes README.md's pictures of a trained model: a heatmap gallery (input | heatmap | mask),
one test image per defect type plus a good one, and an animated GIF over more test images.

    python scripts/readme_figures.py --checkpoint bench_out/recontrast/bottle/last.ckpt \
        --data ../shared/data/mvtec_ad_256 --category bottle --out docs/figures

Writes <out>/<category>_gallery.png and, when the test set has masks, <out>/<category>.gif. The maps are the ones
`recontrast predict` gives (the checkpoint's calibration: 0.5 = its 'normal' threshold); the
images are the first of each defect type in file order, not picked by score.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from recontrast import plots
from recontrast.data import MVTecDataset
from recontrast.images import denormalize
from recontrast.infer import Detector


def first_per_type(dataset, per_type: int) -> list[dict]:
    """Returns the first `per_type` test items of every defect type ('good' first)."""
    by_type = defaultdict(list)
    for i in range(len(dataset)):
        sample = dataset.samples[i]
        if len(by_type[sample.defect_type]) < per_type:
            by_type[sample.defect_type].append(dataset[i])
    order = sorted(by_type, key=lambda t: (t != "good", t))
    return [item for t in order for item in by_type[t]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="dataset root holding <category>/test")
    parser.add_argument("--category", required=True)
    parser.add_argument("--out", default="docs/figures")
    parser.add_argument("--gif-per-type", type=int, default=3, help="GIF frames per defect type")
    args = parser.parse_args()

    detector = Detector.load(args.checkpoint)
    test = MVTecDataset(args.data, args.category, "test", detector.image_size)
    has_masks = getattr(test, "has_masks", True)
    out = Path(args.out)
    figures = [("gallery", first_per_type(test, 1))]
    if has_masks:  # a GIF frame always has a ground-truth panel: empty, it would read as "no defect"
        figures.append(("gif", first_per_type(test, args.gif_per_type)))
    else:
        print(f"{args.category}: image-level test set (no masks): the gallery only, no GIF")
    for name, items in figures:
        predictions = detector.predict_batch([it["path"] for it in items])
        images = [denormalize(it["image"]) for it in items]
        # No mask column for image-level test sets (no ground_truth/): an empty mask would read as "no defect".
        masks = [it["mask"][0].numpy() if has_masks else None for it in items]
        captions = [f"{it['defect_type']}: score {p.score:.2f} ({'defect' if p.is_anomalous else 'good'})"
                    for it, p in zip(items, predictions)]
        if name == "gallery":
            path = out / f"{args.category}_gallery.png"
            plots.heatmap_gallery(images, [p.anomaly_map for p in predictions], masks, captions, path,
                                  suptitle=f"{args.category}: first test image of each type")
        else:
            frames = [plots.triptych(im, p.anomaly_map, m, c)
                      for im, p, m, c in zip(images, predictions, masks, captions)]
            path = plots.make_gif(frames, out / f"{args.category}.gif", duration_ms=900)
        print(f"wrote {path} ({len(items)} images)")


if __name__ == "__main__":
    main()
