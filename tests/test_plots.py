"""Behaviour of the figures: valid files, one fixed heatmap scale, faithful curves, small GIFs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recontrast import plots


def _valid_png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_denormalize_inverts_the_dataset_normalisation():
    from recontrast.images import imagenet_normalise

    rgb = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    back = plots.denormalize(imagenet_normalise(rgb))
    assert back.dtype == np.uint8 and back.shape == (16, 16, 3)
    assert np.array_equal(back, rgb.permute(1, 2, 0).numpy())


def test_overlay_uses_a_fixed_scale_not_per_image_min_max():
    img = np.full((8, 8, 3), 128, np.uint8)
    calm = plots.overlay(img, np.full((8, 8), 0.05))
    calm_but_varied = plots.overlay(img, np.linspace(0.04, 0.06, 64).reshape(8, 8))
    alarm = plots.overlay(img, np.full((8, 8), 1.0))
    assert calm.dtype == np.uint8 and calm.shape == (8, 8, 3)
    # A calm map with tiny variations must not be stretched to the colormap's full range.
    assert np.abs(calm_but_varied.astype(int) - calm.astype(int)).max() <= 12
    assert np.abs(alarm.astype(int) - calm.astype(int)).max() > 60
    # Maps of another size are resized to the image; grayscale images are accepted.
    assert plots.overlay(img[..., 0], np.zeros((4, 4))).shape == (8, 8, 3)


def test_curves_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels, 1.0), 1)  # ties on purpose
    c = plots.curves(scores, labels)
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    ap = float(np.sum(np.diff(c["recall"]) * c["precision"][1:]))
    assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_figures_are_written_as_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(10), np.ones(12)].astype(int)
    scores = rng.normal(labels, 0.5)
    types = ["good"] * 10 + ["hole"] * 6 + ["stain"] * 6
    plots.roc_pr_curves(scores, labels, tmp_path / "roc.png", metrics={"image_auroc": 0.9, "image_ap": 0.8})
    plots.roc_pr_curves(np.zeros(3), np.zeros(3), tmp_path / "roc_one_class.png")
    plots.score_histograms(scores, labels, types, tmp_path / "hist.png",
                           thresholds={"f1": 0.5, "normal": None})
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    maps = [rng.random((16, 16)) for _ in range(3)]
    masks = [None, rng.random((32, 32)) > 0.8, None]
    fig = plots.heatmap_gallery(images, maps, masks, ["a", "b", "c"], tmp_path / "gallery.png")
    assert len(fig.axes) == 3 * 3 + 1  # three columns per image, plus the colour bar
    plots.loss_curve(list(np.linspace(1, 0.1, 120)), tmp_path / "loss.png")
    plots.loss_curve([{"iteration": 10 * i, "loss": 1 / (i + 1)} for i in range(5)], tmp_path / "loss2.png")
    for name in ("roc", "roc_one_class", "hist", "gallery", "loss", "loss2"):
        w, h = _valid_png(tmp_path / f"{name}.png")
        assert w > 100 and h > 100


def test_make_gif_is_animated_looping_and_small(tmp_path):
    rng = np.random.default_rng(0)
    frames = [plots.triptych(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.full((64, 64), i / 5),
                             None, caption=f"frame {i}") for i in range(5)]
    big = [np.kron(f, np.ones((4, 4, 1), np.uint8)) for f in frames]  # 4x larger: shrunk to max_side
    path = plots.make_gif(big, tmp_path / "cat.gif", max_side=256)
    with Image.open(path) as im:
        assert im.format == "GIF" and im.is_animated and im.n_frames == 5
        assert max(im.size) <= 256 and im.info.get("loop") == 0
    with pytest.raises(ValueError):
        plots.make_gif([], tmp_path / "empty.gif")
