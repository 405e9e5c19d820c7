"""Figures: ROC/PR curves, score histograms, heatmap galleries, GIFs and loss curves.

Every function returns a matplotlib `Figure` (or a uint8 image) and, given `path`, also
writes it as a PNG. Figures are built with `matplotlib.figure.Figure`, not pyplot, so they
hold no global state, need no `plt.close`, and work headless; in a notebook the returned
Figure displays itself. Heatmaps are always drawn on ONE fixed scale (the calibration's
normalisation, threshold = 0.5), never per-image min-max: a normal image must look calm.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules and not os.environ.get("DISPLAY") and "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")  # headless: never try to open a window

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from recontrast.images import denormalize  # noqa: F401 - plots.denormalize for notebooks

CMAP = "jet"


def resize_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Returns the float (H, W) map bilinearly resized to size = (H, W)."""
    heatmap = np.asarray(heatmap, np.float32)
    if heatmap.shape == tuple(size):
        return heatmap
    img = Image.fromarray(heatmap, mode="F").resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img, np.float32)


def colorize(map_normalised: np.ndarray, cmap: str = CMAP) -> np.ndarray:
    """Returns the uint8 RGB (H, W, 3) colormap image of a [0, 1] map (values outside clip)."""
    m = np.clip(np.nan_to_num(np.asarray(map_normalised, np.float32)), 0.0, 1.0)
    return (matplotlib.colormaps[cmap](m)[..., :3] * 255 + 0.5).astype(np.uint8)


def overlay(image_uint8: np.ndarray, map_normalised: np.ndarray, alpha: float = 0.5,
            cmap: str = CMAP) -> np.ndarray:
    """Returns the uint8 RGB image blended with the colormapped map (0 = calm, 1 = alarming).

    image_uint8: (H, W, 3) or (H, W); map_normalised: (h, w), resized to (H, W) if needed.
    """
    img = np.asarray(image_uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.float32)
    heat = colorize(resize_map(map_normalised, img.shape[:2]), cmap).astype(np.float32)
    return (img * (1 - alpha) + heat * alpha + 0.5).clip(0, 255).astype(np.uint8)


def mask_rgb(mask: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """Returns the (H, W, 3) uint8 rendering of a 0/1 mask (black where none is given)."""
    if mask is None:
        return np.zeros((*size, 3), np.uint8)
    m = np.asarray(mask, np.float32).squeeze()
    m = resize_map(m, size) > 0.5
    return np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2)


def save(fig: Figure, path: str | Path | None, dpi: int = 100) -> Path | None:
    """Returns `path` after writing `fig` there as PNG (None: nothing written)."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def curves(scores, labels) -> dict[str, np.ndarray]:
    """Returns ROC (fpr, tpr) and PR (precision, recall) points, one per distinct score."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of each group of tied scores
    tp = np.cumsum(y)[last].astype(np.float64)
    fp = (last + 1) - tp
    pos, neg = max(y.sum(), 1), max((~y).sum(), 1)
    return {
        "fpr": np.r_[0.0, fp / neg], "tpr": np.r_[0.0, tp / pos],
        "precision": np.r_[1.0, tp / (tp + fp)], "recall": np.r_[0.0, tp / pos],
    }


def roc_pr_curves(scores, labels, path: str | Path | None = None, title: str = "",
                  metrics: dict[str, float] | None = None) -> Figure:
    """Returns a two-panel figure: image-level ROC curve and precision-recall curve."""
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax_roc, ax_pr = fig.subplots(1, 2)
    y = np.asarray(labels).astype(bool)
    metrics = metrics or {}
    if y.all() or not y.any():
        for ax in (ax_roc, ax_pr):
            ax.text(0.5, 0.5, "needs both good and defect images", ha="center", va="center")
    else:
        c = curves(scores, labels)
        auroc, ap = metrics.get("image_auroc"), metrics.get("image_ap")
        ax_roc.plot(c["fpr"], c["tpr"], lw=2, label=f"AUROC {auroc:.3f}" if auroc is not None else None)
        ax_roc.plot([0, 1], [0, 1], ls="--", c="gray", lw=1)
        ax_pr.step(c["recall"], c["precision"], where="pre", lw=2,
                   label=f"AP {ap:.3f}" if ap is not None else None)
        ax_pr.axhline(y.mean(), ls="--", c="gray", lw=1, label=f"chance {y.mean():.2f}")
        for ax in (ax_roc, ax_pr):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="lower right" if ax is ax_roc else "lower left")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC",
               xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall",
              xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    if title:
        fig.suptitle(title)
    save(fig, path)
    return fig


def score_histograms(scores, labels, defect_types: Sequence[str], path: str | Path | None = None,
                     thresholds: dict[str, float] | None = None, title: str = "") -> Figure:
    """Returns a seaborn histogram of image scores, good vs each defect type, with thresholds."""
    import seaborn as sns

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    types = [("good" if int(lab) == 0 else str(t)) for lab, t in zip(labels, defect_types)]
    order = ["good"] + sorted(set(types) - {"good"}) if "good" in types else sorted(set(types))
    tab10 = sns.color_palette("tab10", 10)
    others = [c for i, c in enumerate(tab10) if i != 2]  # green is reserved for "good"
    defects = [t for t in order if t != "good"]
    palette = {"good": tab10[2], **{t: others[i % len(others)] for i, t in enumerate(defects)}}
    data = {"score": np.asarray(scores, np.float64), "type": types}
    bins = min(40, max(10, len(types) // 2))
    sns.histplot(data=data, x="score", hue="type", hue_order=order, palette=palette, bins=bins,
                 element="step", stat="count", common_bins=True, ax=ax)
    for i, (name, value) in enumerate((thresholds or {}).items()):
        if value is not None and np.isfinite(value):
            ax.axvline(value, ls=("--", ":", "-.")[i % 3], c="black", lw=1.2)
            ax.text(value, ax.get_ylim()[1] * (0.95 - 0.08 * i), f" {name}", fontsize=8, va="top")
    ax.set(xlabel="image score (raw)", ylabel="images", title=title or "image scores by type")
    save(fig, path)
    return fig


def heatmap_gallery(images: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                    masks: Sequence[np.ndarray | None] | None, titles: Sequence[str],
                    path: str | Path | None = None, cmap: str = CMAP, suptitle: str = "") -> Figure:
    """Returns a grid, one row per image: input | heatmap overlay | ground-truth mask.

    images: uint8 (H, W, 3); maps: normalised (h, w) on the shared fixed scale (0.5 =
    threshold); masks: 0/1 (h, w) or None (the column is dropped when all are None).
    """
    n = len(images)
    with_mask = masks is not None and any(m is not None for m in masks)
    cols = 3 if with_mask else 2
    fig = Figure(figsize=(2.6 * cols + 0.6, 2.6 * max(n, 1)), layout="constrained")
    if n == 0:
        fig.subplots().text(0.5, 0.5, "no images", ha="center", va="center")
        save(fig, path)
        return fig
    axes = np.asarray(fig.subplots(n, cols, squeeze=False))
    for i in range(n):
        img = np.asarray(images[i])
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(titles[i], fontsize=8, loc="left")
        axes[i, 1].imshow(overlay(img, maps[i], cmap=cmap))
        if with_mask:
            axes[i, 2].imshow(mask_rgb(masks[i], img.shape[:2]))
    for j, name in enumerate(["input", "heatmap (0.5 = threshold)", "ground truth"][:cols]):
        axes[0, j].set_xlabel(name)
        axes[0, j].xaxis.set_label_position("top")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    sm = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=cmap)
    fig.colorbar(sm, ax=axes, location="right", shrink=min(0.9, 2.0 / n + 0.2),
                 label="normalised anomaly (0.5 = threshold)")
    if suptitle:
        fig.suptitle(suptitle)
    save(fig, path)
    return fig


def make_gif(frames: Sequence[np.ndarray], path: str | Path, duration_ms: int = 600,
             max_side: int = 384) -> Path:
    """Returns `path` after writing the uint8 RGB frames as a looping animated GIF.

    Frames wider than `max_side` are shrunk (aspect kept) so the file stays small.
    """
    if not frames:
        raise ValueError("make_gif needs at least one frame")
    pil = []
    for f in frames:
        im = Image.fromarray(np.asarray(f, np.uint8)).convert("RGB")
        scale = max_side / max(im.size)
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.BILINEAR)
        pil.append(im.quantize(colors=256, method=Image.Quantize.MEDIANCUT))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=duration_ms, loop=0,
                optimize=True)
    return path


def triptych(image_uint8: np.ndarray, map_normalised: np.ndarray, mask: np.ndarray | None,
             caption: str = "") -> np.ndarray:
    """Returns one GIF frame: input | heatmap overlay | ground truth, side by side (uint8)."""
    img = np.asarray(image_uint8, np.uint8)
    gap = np.full((img.shape[0], 4, 3), 255, np.uint8)
    frame = np.concatenate([img, gap, overlay(img, map_normalised), gap,
                            mask_rgb(mask, img.shape[:2])], axis=1)
    if caption:
        band = Image.new("RGB", (frame.shape[1], 14), "white")
        ImageDraw.Draw(band).text((2, 1), caption, fill="black")
        frame = np.concatenate([np.asarray(band), frame], axis=0)
    return frame


def loss_curve(history, path: str | Path | None = None, title: str = "training loss",
               smooth: int = 0) -> Figure:
    """Returns the loss-vs-iteration figure, raw and moving-averaged.

    history: [float] (one per iteration, as in the checkpoint's loss_history) or
    [{"iteration": int, "loss": float}, ...].
    """
    if len(history) and isinstance(history[0], dict):
        it = np.asarray([h.get("iteration", i + 1) for i, h in enumerate(history)], np.float64)
        loss = np.asarray([h["loss"] for h in history], np.float64)
    else:
        loss = np.asarray(history, np.float64)
        it = np.arange(1, len(loss) + 1, dtype=np.float64)
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(it, loss, lw=0.8, alpha=0.4, label="loss")
    window = smooth or max(1, len(loss) // 50)
    if window > 1 and len(loss) >= window:
        avg = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(it[window - 1:], avg, lw=2, label=f"moving average ({window})")
    ax.set(xlabel="iteration", ylabel="loss", title=title)
    if len(loss):
        ax.legend()
    save(fig, path)
    return fig
