"""Image and mask files to arrays: header checks, mode conversion, resizing.

Every PIL failure leaves this module as `BadImage` naming the file, never as a bare PIL trace.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class DataError(ValueError):
    """A dataset problem; the message names the file or folder and the fix."""


class BadImage(DataError):
    """An image or mask file that cannot be read (corrupt, truncated, empty, not an image)."""


def list_images(folder: Path) -> list[Path]:
    """Returns the image files directly in `folder`, sorted by name (other files ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_image(path: Path) -> tuple[int, int]:
    """Returns (width, height) after decoding every pixel: a file that passes here decodes
    later too (a truncated JPEG, or a PNG whose chunks have valid checksums but whose
    compressed pixels are corrupt, fail here and not in the middle of training)."""
    if path.stat().st_size == 0:
        raise BadImage(f"'{path}' is a zero-byte file")
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "PNG":
                im.verify()  # chunk checksums, which decoding alone does not check
        with Image.open(path) as im:  # verify() leaves the image unusable: open it again
            im.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error...
        raise _bad(path, exc) from None
    return size


def _bad(path: Path, exc: Exception) -> BadImage:
    if isinstance(exc, Image.UnidentifiedImageError):
        return BadImage(f"'{path}' is not an image PIL can read (wrong extension or corrupt)")
    return BadImage(f"'{path}' is truncated or corrupt ({type(exc).__name__}: {exc})")


def decode_image(path: Path) -> Image.Image:
    """Returns the decoded PIL image (every pixel read); raises BadImage naming the file."""
    if path.is_file() and path.stat().st_size == 0:
        raise BadImage(f"'{path}' is a zero-byte file")
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except Exception as exc:
        raise _bad(path, exc) from None


def load_rgb(path: Path) -> np.ndarray:
    """Returns the image as float32 (H, W, 3) RGB on the 8-bit range [0, 255].

    Grayscale, palette (with transparency), RGBA and CMYK go through PIL's RGB conversion
    (alpha dropped); 16-bit images are scaled by 1/257 so 65535 maps to 255.
    """
    im = decode_image(path)
    try:
        if im.mode in SIXTEEN_BIT_MODES:
            gray = np.asarray(im, dtype=np.float32) / 257.0
            return np.repeat(np.clip(gray, 0, 255)[..., None], 3, axis=-1)
        if im.mode == "F":
            gray = np.asarray(im, dtype=np.float32)
            gray = gray * 255.0 if gray.max(initial=0) <= 1.0 else gray
            return np.repeat(np.clip(gray, 0, 255)[..., None], 3, axis=-1)
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        return np.asarray(im.convert("RGB"), dtype=np.float32)
    except (ValueError, OSError) as exc:  # a mode PIL decodes but cannot convert to RGB
        raise BadImage(f"'{path}' has pixel mode {im.mode}, which cannot be converted to RGB "
                       f"({type(exc).__name__}: {exc})") from None


def load_mask(path: Path) -> tuple[np.ndarray, str | None]:
    """Returns (bool (H, W) mask, note); note says how a non-0/255 mask was binarised, or None.

    0/255 masks are taken as they are; 0/1 masks mark 1 as defect; anything else is
    thresholded at half of its value range (127.5 for 8-bit, 32767.5 for 16-bit).
    """
    im = decode_image(path)
    if im.mode == "1":
        return np.asarray(im, dtype=bool), None
    if im.mode in SIXTEEN_BIT_MODES:
        values, full = np.asarray(im, dtype=np.int64), 65535
    else:
        values, full = np.asarray(im.convert("L"), dtype=np.int64), 255
    present = np.unique(values)
    if np.isin(present, (0, full)).all():
        return values == full, None
    if np.isin(present, (0, 1)).all():
        return values == 1, f"'{path}' holds 0/1 values; 1 taken as defect"
    shown = ", ".join(str(v) for v in present[:6]) + (", ..." if len(present) > 6 else "")
    note = f"'{path}' holds values other than 0/{full} ({shown}); binarised at {full / 2}"
    return values > full / 2, note


def resize_rgb(image: np.ndarray, size: int) -> torch.Tensor:
    """Returns uint8 (3, size, size): bilinear with antialiasing, like PIL's downscaling."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """Returns uint8 (1, size, size) of 0/1, resized with nearest neighbour."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    if im.size != (size, size):
        im = im.resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(im) > 127).to(torch.uint8)[None]


def imagenet_normalise(image: torch.Tensor) -> torch.Tensor:
    """Returns float (3, S, S) ImageNet-normalised from uint8 (3, S, S)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std


def denormalize(image) -> np.ndarray:
    """Returns the uint8 RGB (H, W, 3) image of an ImageNet-normalised (3, H, W) tensor/array."""
    x = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(x.shape)}")
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    rgb = np.clip((x * std + mean) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb.transpose(1, 2, 0))  # (3, H, W) -> (H, W, 3)
