"""Datasets: MVTec-AD-layout folders, VisA and BTAD in their own layouts, and a user's own folders.

Files are checked when a dataset is built (headers and PNG checksums, mask sizes), and
decoded lazily in `__getitem__`; with `cache=True` each image is decoded and resized once.
Every item is {"image": (3, S, S) float ImageNet-normalised, "mask": (1, S, S) float 0/1,
"label": 0 good / 1 defect, "defect_type": str, "path": str}.
"""
from __future__ import annotations

import copy
import csv
import difflib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from recontrast.images import (IMAGE_EXTENSIONS, BadImage, DataError, check_image, decode_image,
                               imagenet_normalise, list_images, load_mask, load_rgb, resize_mask, resize_rgb)


class RootNotFound(DataError):
    """The data root folder does not exist."""


class CategoryNotFound(DataError):
    """No folder for the category under the data root."""


class EmptySplit(DataError):
    """A split (e.g. train/good) has no images."""


class MaskMissing(DataError):
    """A defect image has no ground-truth mask."""


class MaskMismatch(DataError):
    """A mask whose size differs from its image's."""


class DataWarning(UserWarning):
    """A data problem that was worked around (skipped image, non-binary mask)."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 defect
    defect_type: str  # "good" for normal images
    mask_path: Path | None


class ImageDataset(Dataset):
    """Returns items from a list of samples; the base of MVTecDataset and FolderDataset.

    Every file is decoded in full when the dataset is built, so a file that would fail in
    the middle of training or evaluation fails (or, with skip_bad, is skipped) here; with
    `cache` the decoded, resized tensors are kept, so nothing is decoded twice.
    """

    def __init__(self, entries, image_size: int, skip_bad: bool, cache: bool, has_masks: bool):
        self.image_size, self.skip_bad, self.cache, self.has_masks = image_size, skip_bad, cache, has_masks
        self.skipped: list[tuple[str, str]] = []
        self._warned_mask = False
        self.samples: list[Sample] = []
        self._cache: list = []
        for s in entries:
            ok, pair = self._verify(s)
            if ok:
                self.samples.append(s)
                self._cache.append(pair)

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.samples} - {"good"})

    def _verify(self, s: Sample) -> tuple[bool, tuple | None]:
        """Returns (False, None) for a skipped unreadable file (skip_bad), (True, the decoded
        pair when caching); raises BadImage naming the file and the fix, or MaskMismatch."""
        try:
            if self.cache:
                image = load_rgb(s.path)  # decodes every pixel
                mask, note = self.read_mask(s.mask_path) if s.mask_path is not None else (None, None)
                size, mask_size = image.shape[1::-1], None if mask is None else mask.shape[::-1]
            else:
                size = check_image(s.path)  # decodes every pixel, keeps nothing
                mask_size = check_image(s.mask_path) if s.mask_path is not None else None
            if mask_size is not None and tuple(mask_size) != tuple(size):
                raise MaskMismatch(
                    f"mask '{s.mask_path}' is {mask_size[0]}x{mask_size[1]} but its image "
                    f"'{s.path}' is {size[0]}x{size[1]}; masks must have their image's size")
        except BadImage as exc:
            if not self.skip_bad:
                raise BadImage(f"{exc}; replace or delete it, or set data.skip_bad_images=true "
                               "to skip such files") from None
            warnings.warn(f"skipping: {exc}", DataWarning, stacklevel=5)
            self.skipped.append((str(s.path), str(exc)))
            return False, None
        if not self.cache:
            return True, None
        self._note(note)
        return True, (resize_rgb(image, self.image_size),
                      None if mask is None else resize_mask(mask, self.image_size))

    def read_mask(self, path: Path) -> tuple[np.ndarray, str | None]:
        """Returns (bool (H, W) mask, note): images.load_mask (0/255, 0/1, else thresholded)."""
        return load_mask(path)

    def _note(self, note: str | None) -> None:
        if note and not self._warned_mask:
            warnings.warn(f"{note} (further such masks in this dataset binarised silently)",
                          DataWarning, stacklevel=4)
            self._warned_mask = True

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, s: Sample) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = resize_rgb(load_rgb(s.path), self.image_size)
        if s.mask_path is None:
            return image, None
        mask, note = self.read_mask(s.mask_path)
        self._note(note)
        return image, resize_mask(mask, self.image_size)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        pair = self._cache[index] or self._load(s)
        if self.cache:
            self._cache[index] = pair
        image, mask = pair
        if mask is None:
            mask = torch.zeros(1, self.image_size, self.image_size, dtype=torch.uint8)
        return {"image": imagenet_normalise(image), "mask": mask.float(), "label": s.label,
                "defect_type": s.defect_type, "path": str(s.path)}

    def subset(self, indices) -> "ImageDataset":
        """Returns a dataset of the same kind holding only samples[indices] (and their cached
        tensors: the subset decodes nothing again)."""
        new = copy.copy(self)
        new.samples = [self.samples[i] for i in indices]
        new._cache = [self._cache[i] for i in indices]
        return new


def _require_root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise RootNotFound(
            f"data root '{root}' does not exist; create a synthetic dataset with "
            f"`recontrast synth --out {root}` or download MVTec AD "
            "(https://www.mvtec.com/company/research/datasets/mvtec-ad) and extract it there")
    return root


def _require_images(folder: Path, what: str) -> list[Path]:
    paths = list_images(folder)
    if not paths:
        state = "does not exist"
        if folder.is_dir():
            found = sorted(p.name for p in folder.iterdir())
            state = (f"holds no image but {len(found)} other entr{'y' if len(found) == 1 else 'ies'} "
                     f"({', '.join(found[:5])}{', ...' if len(found) > 5 else ''})") if found else "is empty"
        raise EmptySplit(f"{what} folder '{folder}' {state}; it needs images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _find_mask(mask_dirs: list[Path], defect_type: str, image: Path) -> Path:
    """Returns <dir>/<type>/<stem>_mask.png (or <stem>.png, as VisA converters write)."""
    for d in mask_dirs:
        for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
            if (d / defect_type / name).is_file():
                return d / defect_type / name
    expected = mask_dirs[0] / defect_type / f"{image.stem}_mask.png"
    raise MaskMissing(f"defect image '{image}' has no mask; expected '{expected}' "
                      "(add it, or move the image out of the dataset)")


class MVTecDataset(ImageDataset):
    """One category of the MVTec AD layout.

    <root>/<category>/train/good/*.png, test/good/*.png, test/<type>/*.png,
    ground_truth/<type>/<stem>_mask.png (0/255; `<stem>.png` accepted too). Without a
    ground_truth/ folder the test split is image-level only (`has_masks` False).
    """

    def __init__(self, root, category: str, split: str, image_size: int = 256,
                 skip_bad: bool = False, cache: bool = False):
        root = _require_root(root)
        base = root / category
        if not base.is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            close = difflib.get_close_matches(category, found, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CategoryNotFound(f"no folder '{category}' under {root}{hint}; "
                                   f"found: {', '.join(found) or 'no folders'}")
        if split == "train":
            entries = [Sample(p, 0, "good", None)
                       for p in _require_images(base / "train" / "good", "training")]
        elif split == "test":
            types = (sorted(p.name for p in (base / "test").iterdir() if p.is_dir())
                     if (base / "test").is_dir() else [])
            # No ground_truth/ folder at all: an image-level dataset (good/defect labels only);
            # pixel metrics are then n/a. With the folder, every defect image needs its mask.
            has_masks = (base / "ground_truth").is_dir()
            entries = [Sample(p, int(t != "good"), t,
                              _find_mask([base / "ground_truth"], t, p) if t != "good" and has_masks else None)
                       for t in types for p in list_images(base / "test" / t)]
            if not entries:
                raise EmptySplit(f"no test images under '{base / 'test'}' (expected test/good "
                                 "and test/<defect type> folders)")
        else:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root, self.category, self.split = root, category, split
        super().__init__(entries, image_size, skip_bad, cache,
                         has_masks=split == "train" or (base / "ground_truth").is_dir())


def every_kth(n: int, fraction: float) -> list[int]:
    """Returns max(1, round(n * fraction)) evenly spaced indices in range(n); [] for 0."""
    if fraction <= 0 or n == 0:
        return []
    k = max(1, round(n * fraction))
    return sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)})


class FolderDataset(ImageDataset):
    """A user's own images, one folder per kind:

        <root>/good/*.png              normal images
        <root>/<defect type>/*.png     anomalous images, any number of such folders
        <root>/train/good/*.png        optional: normal images for training only
        <root>/ground_truth/<type>/<stem>_mask.png   optional masks (or <root>/masks/<type>/...)

    train: train/good when it exists; otherwise good/ minus a held-out `test_good_fraction`
    (every k-th image), so train and test never share an image. test: good/ (all of it, or
    the held-out share) plus every defect folder. Without a ground_truth/ or masks/ folder
    `has_masks` is False and masks are all zero (pixel metrics are then skipped); with one,
    every defect image needs its mask. Folders named train, test, ground_truth and masks are
    never defect types.
    """

    RESERVED = ("train", "test", "ground_truth", "masks")

    def __init__(self, root, split: str, image_size: int = 256, skip_bad: bool = False,
                 cache: bool = False, test_good_fraction: float = 0.2):
        root = _require_root(root)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        mask_dirs = [root / d for d in ("ground_truth", "masks") if (root / d).is_dir()]
        if (root / "train" / "good").is_dir():
            train = _require_images(root / "train" / "good", "training")
            test_good = list_images(root / "good")
        else:
            good = _require_images(root / "good", "normal-image ('good')")
            held = set(every_kth(len(good), test_good_fraction))
            if len(held) == len(good):
                raise EmptySplit(f"'{root / 'good'}' has {len(good)} image(s): too few to hold "
                                 "some out for testing; add images or a train/good folder")
            train = [p for i, p in enumerate(good) if i not in held]
            test_good = [p for i, p in enumerate(good) if i in held]
        if split == "train":
            entries = [Sample(p, 0, "good", None) for p in train]
        else:
            types = sorted(p.name for p in root.iterdir() if p.is_dir()
                           and p.name not in self.RESERVED + ("good",) and not p.name.startswith("."))
            entries = [Sample(p, 0, "good", None) for p in test_good]
            entries += [Sample(p, 1, t, _find_mask(mask_dirs, t, p) if mask_dirs else None)
                        for t in types for p in list_images(root / t)]
        self.root, self.split = root, split
        super().__init__(entries, image_size, skip_bad, cache, has_masks=bool(mask_dirs))


class VisADataset(ImageDataset):
    """One category of VisA (Zou et al. 2022) as it is downloaded, read through its split file:

        <root>/split_csv/1cls.csv      object,split,label,image,mask (paths relative to root)
        <root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG
        <root>/<category>/Data/Masks/Anomaly/*.png   (pixel values: defect ids, 0 = background)

    label 'normal' is good, 'anomaly' a defect (defect_type 'anomaly': 1cls.csv names no type).
    A mask pixel is defect wherever it is not 0 (VisA masks hold small ids, not 255, so the
    0/255 rule of other masks would read them as empty).
    """

    SPLIT_FILE = Path("split_csv") / "1cls.csv"

    def __init__(self, root, category: str, split: str, image_size: int = 256,
                 skip_bad: bool = False, cache: bool = False):
        root = _require_root(root)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        table = root / self.SPLIT_FILE
        if not table.is_file():
            raise RootNotFound(f"'{table}' does not exist: data.format=visa reads VisA as downloaded "
                               f"(https://github.com/amazon-science/spot-diff), with its split_csv/1cls.csv")
        with open(table, newline="") as f:
            rows = [r for r in csv.DictReader(f)]
        found = sorted({r["object"] for r in rows})
        if category not in found:
            close = difflib.get_close_matches(category, found, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CategoryNotFound(f"no category '{category}' in {table}{hint}; found: {', '.join(found)}")
        entries = []
        for r in rows:
            if r["object"] != category or r["split"] != split:
                continue
            defect = r["label"] != "normal"
            mask = root / r["mask"] if defect and r.get("mask") else None
            if defect and mask is None:
                raise MaskMissing(f"'{r['image']}' is an anomaly without a mask in {table}")
            entries.append(Sample(root / r["image"], int(defect), "anomaly" if defect else "good", mask))
        if not entries:
            raise EmptySplit(f"{table} lists no {split} images of '{category}'")
        self.root, self.category, self.split = root, category, split
        super().__init__(entries, image_size, skip_bad, cache, has_masks=True)

    def read_mask(self, path: Path) -> tuple[np.ndarray, str | None]:
        return np.asarray(decode_image(path).convert("L")) > 0, None


class BTADDataset(ImageDataset):
    """One category (01, 02, 03) of BTAD (beanTech, Mishra et al. 2021) as it is downloaded:

        <root>/<category>/train/ok/*.bmp|png     normal images
        <root>/<category>/test/ok/, test/ko/     normal and defective test images
        <root>/<category>/ground_truth/ko/<stem>.png|bmp   masks of test/ko

    'ok' is good and 'ko' a defect (defect_type 'ko'); masks follow images.load_mask's rules.
    """

    def __init__(self, root, category: str, split: str, image_size: int = 256,
                 skip_bad: bool = False, cache: bool = False):
        base = _require_root(root) / category
        if not base.is_dir():
            found = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
            raise CategoryNotFound(f"no folder '{category}' under {root}; found: {', '.join(found) or 'no folders'}"
                                   " (BTAD's categories are 01, 02, 03)")
        if split == "train":
            entries = [Sample(p, 0, "good", None) for p in _require_images(base / "train" / "ok", "training")]
        elif split == "test":
            entries = [Sample(p, 0, "good", None) for p in list_images(base / "test" / "ok")]
            entries += [Sample(p, 1, "ko", self._mask(base, p)) for p in list_images(base / "test" / "ko")]
            if not entries:
                raise EmptySplit(f"no test images under '{base / 'test'}' (expected test/ok and test/ko)")
        else:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root, self.category, self.split = Path(root), category, split
        super().__init__(entries, image_size, skip_bad, cache, has_masks=True)

    @staticmethod
    def _mask(base: Path, image: Path) -> Path:
        for suffix in (".png", ".bmp"):
            if (base / "ground_truth" / "ko" / f"{image.stem}{suffix}").is_file():
                return base / "ground_truth" / "ko" / f"{image.stem}{suffix}"
        raise MaskMissing(f"defect image '{image}' has no mask; expected "
                          f"'{base / 'ground_truth' / 'ko' / (image.stem + '.png')}'")


def make_dataset(data_cfg, split: str, root=None) -> ImageDataset:
    """Returns the `split` ('train' or 'test') of data_cfg's dataset, read from `root`
    (default: data_cfg.root) in data_cfg.format's layout."""
    root = root or data_cfg.root
    common = dict(image_size=data_cfg.image_size, skip_bad=data_cfg.skip_bad_images, cache=data_cfg.cache)
    if data_cfg.format == "mvtec":
        return MVTecDataset(root, data_cfg.category, split, **common)
    if data_cfg.format == "visa":
        return VisADataset(root, data_cfg.category, split, **common)
    if data_cfg.format == "btad":
        return BTADDataset(root, data_cfg.category, split, **common)
    if data_cfg.format == "folder":
        return FolderDataset(root, split, **common)
    raise DataError(f"data.format={data_cfg.format!r} is not one of mvtec, visa, btad, folder")


class Datasets(NamedTuple):
    train: ImageDataset
    val: ImageDataset | None  # held-out normal images; None when val_fraction is 0
    test: ImageDataset


def build_datasets(data_cfg, val_fraction: float | None = None) -> Datasets:
    """Returns (train, val, test) for a DataConfig; val is every k-th image of train/good."""
    fraction = data_cfg.val_fraction if val_fraction is None else val_fraction
    full, test = make_dataset(data_cfg, "train"), make_dataset(data_cfg, "test")
    # Both splits were decoded in full: a split left empty by skipped files stops here, not
    # after training (an evaluation of no test image can calibrate nothing).
    for split, what in ((full, "training"), (test, "test")):
        if not split.samples:
            raise EmptySplit(f"every {what} image was skipped as unreadable ({len(split.skipped)}, e.g. "
                             f"{split.skipped[0][1] if split.skipped else '?'}); replace them")
    held = every_kth(len(full), fraction)
    if len(held) == len(full):
        raise EmptySplit(f"only {len(full)} training image(s): nothing left after holding out "
                         f"data.val_fraction={fraction}; set data.val_fraction=0 or add images")
    rest = [i for i in range(len(full)) if i not in set(held)]
    val = full.subset(held) if held else None
    if val is not None:
        val.skipped = []  # train.skipped already counts the files skipped in train/good
    return Datasets(full.subset(rest), val, test)
