"""Synthetic defects on normal images: a label-free ("proxy") validation set.

Proxy metrics (image AUROC, pixel AUROC, AUPRO on `ProxyDataset`) let a model judge itself
without test labels: they compare settings (backbone, iterations, level weights) and catch a
failed training run (a collapsed model scores synthetic defects no higher than good images).

Two families of kinds (KINDS):
- surface kinds (`texture`, `patch`, `scar`): foreign colour or texture blended into a blob,
  a recoloured copy, a thin band. Almost any model that learned something scores them ~1.0.
- structural kinds (`erase`, `move`, `paste`, `shuffle`): the image's own content, rearranged
  (a region erased and filled with the surrounding texture; a region cut out and moved or
  rotated elsewhere, its hole filled; a patch of ANOTHER held-out image pasted in; small tiles
  of a region shuffled). Colour statistics stay those of the image, so only a model that knows
  what goes where (missing, misplaced or extra parts, broken periodic structure) finds them.

Limits: synthetic defects are not the user's defects. They are easier or harder than real
scratches or missing parts, so proxy numbers rank models; they do not predict the real test
AUROC. A model can also learn to spot these artefacts if it
ever trains on them: keep the proxy images out of training (they come from held-out images).

`synthesize` works on any (3, H, W) image in [0, 1], is deterministic per seed (local RNGs
only) and returns a mask that is exactly the set of changed pixels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from kornia.filters import gaussian_blur2d
from torch.utils.data import Dataset

from recontrast.images import IMAGENET_MEAN, IMAGENET_STD

SURFACE_KINDS: tuple[str, ...] = ("texture", "patch", "scar")
STRUCTURAL_KINDS: tuple[str, ...] = ("erase", "move", "paste", "shuffle")
KINDS: tuple[str, ...] = SURFACE_KINDS + STRUCTURAL_KINDS
TOL = 2 / 255  # a mask pixel differs from the input by more than this, summed over channels
# Target fraction of pixels for blob and ellipse regions. Small and subtle on purpose: easy
# defects (large, opaque) score ~1.0 for every model that learned anything, which cannot
# rank models; these sit nearer the size and contrast of real surface defects.
AREA = (0.004, 0.03)
MIN_FRACTION = 0.003  # below this the defect is retried with the next sub-seed
ATTEMPTS = 8
PLACES = 4  # candidate places of a structural defect; the one with the most image structure wins


def synthesize(image: torch.Tensor, seed: int, kind: str | None = None, donor: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Returns (defective image (3, H, W) in [0, 1], mask (1, H, W) float 0/1, kind).

    `image` is (3, H, W) float in [0, 1] (not normalised); `seed` >= 0. Pixels outside the
    mask are bit-identical to `image`; every mask pixel differs by more than TOL (summed
    over channels). `kind` is one of KINDS, or None to draw one from the seed. `donor`
    (3, H', W') in [0, 1] is the other image a `paste` defect cuts its patch from (resized to
    H x W when it differs); without one, `paste` uses `image` turned by 180 degrees.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if kind is None:
        kind = KINDS[int(np.random.default_rng((seed, 0)).integers(len(KINDS)))]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    device, image = image.device, image.detach().cpu()  # regions and fills are built on the CPU
    if kind == "paste":
        donor = image.flip(1, 2) if donor is None else _fit(donor.detach().cpu().to(image.dtype), image)
        make = lambda im, rng: _paste_defect(im, rng, donor)  # noqa: E731
    else:
        make = {"texture": _texture_defect, "patch": _patch_defect, "scar": _scar_defect,
                "erase": _erase_defect, "move": _move_defect, "shuffle": _shuffle_defect}[kind]
    best = None
    for attempt in range(ATTEMPTS):
        # A sub-seed per attempt: a texture that happens to match the image is redrawn,
        # deterministically, rather than returned with an (almost) empty mask.
        rng = np.random.default_rng((seed, 1 + attempt))
        candidate, region = make(image, rng)
        out, mask = _keep_changed(image, candidate, region)
        if best is None or mask.sum() > best[1].sum():
            best = out, mask, region
        if mask.float().mean() >= MIN_FRACTION:
            break
    out, mask, region = best
    if not mask.any():
        # Last resort for pathological images: shift every region pixel by half the range,
        # which always changes it by 0.5 per channel.
        out, mask = _keep_changed(image, (image + 0.5) % 1.0, region)
    return out.to(device), mask.to(device, image.dtype), kind


def _keep_changed(image, candidate, region) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (image with candidate pixels where they changed inside region, bool (1, H, W) mask)."""
    candidate = candidate.clamp(0, 1)
    changed = (candidate - image).abs().sum(0, keepdim=True) > TOL
    mask = changed & region
    return torch.where(mask, candidate, image), mask


# ---------------------------------------------------------------- surface kinds


def _texture_defect(image, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (candidate, region): a foreign texture blended into an irregular blob (DRAEM-like)."""
    _, h, w = image.shape
    region = _blob(rng, h, w, _area(rng))
    beta = rng.uniform(0.2, 0.8)
    texture = _texture(rng, h, w).to(image)
    return image * (1 - beta) + texture * beta, region


def _patch_defect(image, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (candidate, region): a recoloured copy of elsewhere in the image (CutPaste-like)."""
    _, h, w = image.shape
    area = _area(rng)
    region = _blob(rng, h, w, area) if rng.random() < 0.5 else _ellipse(rng, h, w, area)
    return _recolour(rng, _shifted(rng, image), region), region


def _scar_defect(image, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (candidate, region): a thin long curved band of pasted or solid colour (CutPaste-scar)."""
    _, h, w = image.shape
    region = _scar(rng, h, w)
    if rng.random() < 0.5:
        return _recolour(rng, _shifted(rng, image), region), region
    colour = _far_colour(rng, image, region).to(image)
    return colour.expand_as(image), region


# ---------------------------------------------------------------- structural kinds


def _region(rng, image) -> torch.Tensor:
    """Returns a blob or an ellipse of a random AREA fraction (bool (1, H, W)): the busiest of
    PLACES candidates (see _busyness)."""
    _, h, w = image.shape
    area, blob = _area(rng), rng.random() < 0.5
    candidates = [_blob(rng, h, w, area) if blob else _ellipse(rng, h, w, area) for _ in range(PLACES)]
    busy = _busyness(image)
    return max(candidates, key=lambda r: float(busy[r[0]].mean()) if r.any() else -1.0)


def _busyness(image) -> torch.Tensor:
    """Returns (H, W) local structure: the gradient magnitude of the slightly blurred image.

    Rearranging flat background (an object's backdrop) changes only sensor noise: a defect no
    model can see, yet its mask counts. Structural defects go where the image has structure.
    """
    smooth = gaussian_blur2d(image[None], (5, 5), (1.5, 1.5), border_type="reflect")[0]
    dy = F.pad((smooth[:, 1:] - smooth[:, :-1]).abs(), (0, 0, 0, 1))
    dx = F.pad((smooth[:, :, 1:] - smooth[:, :, :-1]).abs(), (0, 1))
    return (dy + dx).sum(0)


def _erase_defect(image, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (candidate, region): a region erased and filled with the surrounding texture."""
    region = _region(rng, image)
    return _fill(rng, image, region), region


def _move_defect(image, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (candidate, region = hole + destination): a region cut out, its hole filled with the
    surrounding texture, and the cut-out put back elsewhere (or in place) rotated or not.

    A third of the moves turn the part in place (a rotated part), the rest shift it by more
    than its size (a misplaced part), half of those rotated as well.
    """
    hole = _region(rng, image)
    src = _centroid(hole)
    if rng.random() < 1 / 3:
        dst, angle = src, rng.choice([-1, 1]) * rng.uniform(math.pi / 6, math.pi)
    else:
        dst, angle = _elsewhere(rng, hole, src), (rng.uniform(-math.pi, math.pi) if rng.random() < 0.5 else 0.0)
    content, moved = _warp(image, hole, src, dst, angle)
    out = torch.where(moved, content, _fill(rng, image, hole))
    return out, hole | moved


def _paste_defect(image, rng, donor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (candidate, region): a patch cut from `donor` (another image of the same kind),
    pasted at a random place of `image`, rotated half of the time (an extra or foreign part)."""
    _, h, w = image.shape
    cut = _region(rng, donor)  # a part of the donor with something on it
    src = _centroid(cut)
    dst = (rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w)
    angle = rng.uniform(-math.pi, math.pi) if rng.random() < 0.5 else 0.0
    content, region = _warp(donor, cut, src, dst, angle)
    return torch.where(region, content, image), region


def _shuffle_defect(image, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (candidate, region): a rectangle of small square tiles (2-5 % of the side) shuffled,
    each tile also turned by a multiple of 90 degrees half of the time (a locally scrambled structure)."""
    _, h, w = image.shape
    tile = max(2, round(rng.uniform(0.02, 0.05) * math.sqrt(h * w)))
    n = max(4, round(_area(rng) * h * w / tile**2))  # tiles in the region
    ny = int(np.clip(round(math.sqrt(n * rng.uniform(0.5, 2))), 2, h // tile))
    nx = int(np.clip(round(n / ny), 2, w // tile))
    busy = _busyness(image)
    corners = [(int(rng.integers(0, h - ny * tile + 1)), int(rng.integers(0, w - nx * tile + 1))) for _ in range(PLACES)]
    y0, x0 = max(corners, key=lambda c: float(busy[c[0]:c[0] + ny * tile, c[1]:c[1] + nx * tile].mean()))
    window = image[:, y0:y0 + ny * tile, x0:x0 + nx * tile]
    tiles = rearrange(window, "c (ny t1) (nx t2) -> (ny nx) c t1 t2", t1=tile, t2=tile)
    order = torch.from_numpy(rng.permutation(len(tiles)))
    if bool((order == torch.arange(len(tiles))).all()):  # the identity shuffles nothing
        order = order.roll(1)
    tiles = tiles[order]
    if rng.random() < 0.5:
        turns = rng.integers(0, 4, len(tiles))
        tiles = torch.stack([torch.rot90(t, int(k), dims=(1, 2)) for t, k in zip(tiles, turns)])
    out, region = image.clone(), torch.zeros(1, h, w, dtype=torch.bool)
    out[:, y0:y0 + ny * tile, x0:x0 + nx * tile] = rearrange(tiles, "(ny nx) c t1 t2 -> c (ny t1) (nx t2)", ny=ny)
    region[:, y0:y0 + ny * tile, x0:x0 + nx * tile] = True
    return out, region


def _fill(rng, image, region) -> torch.Tensor:
    """Returns `image` with `region` filled from its surroundings: the colour a Gaussian blur of the
    pixels outside the region gives there (normalised convolution), plus the fine texture of a
    copy shifted by about the region's size (so the fill is texture of the neighbourhood, not a
    smooth patch)."""
    _, h, w = image.shape
    radius = math.sqrt(float(region.sum()) / math.pi)
    sigma = max(1.0, radius / 2)
    size = min(2 * math.ceil(3 * sigma) + 1, (min(h, w) - 1) // 2 * 2 + 1)  # odd, below the side
    blur = lambda t: gaussian_blur2d(t[None], (size, size), (sigma, sigma), border_type="reflect")[0]  # noqa: E731
    known = (~region).to(image)
    colour = blur(image * known) / blur(known).clamp_min(1e-6)
    a = rng.uniform(0, 2 * math.pi)
    shift = 2.2 * radius + 2
    centre = _centroid(region)
    nearby, _ = _warp(image, torch.ones_like(region), (centre[0] + shift * math.sin(a), centre[1] + shift * math.cos(a)),
                      centre, 0.0)
    return torch.where(region, colour + nearby - blur(nearby), image)


def _centroid(region) -> tuple[float, float]:
    """Returns the (y, x) centre in pixels of a bool (1, H, W) region (the image centre if empty)."""
    ys, xs = torch.nonzero(region[0], as_tuple=True)
    if len(ys) == 0:
        return (region.shape[1] - 1) / 2, (region.shape[2] - 1) / 2
    return float(ys.double().mean()), float(xs.double().mean())


def _elsewhere(rng, region, src) -> tuple[float, float]:
    """Returns a (y, x) centre away from `src` by more than the region's extent where one fits."""
    _, h, w = region.shape
    ys, xs = torch.nonzero(region[0], as_tuple=True)
    extent = float(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1) if len(ys) else 0.0
    best, far = None, -1.0
    for _ in range(16):
        y, x = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        d = math.hypot(y - src[0], x - src[1])
        if d > far:
            best, far = (y, x), d
        if d > 1.1 * extent:
            break
    return best


def _warp(source, region, src, dst, angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (content (3, H, W), its bool (1, H, W) footprint): `source` around the (y, x) pixel
    `src`, turned by `angle` radians and centred on `dst`; the footprint is `region` moved the same
    way (nearest sampling, so it is exactly the pixels the content lands on)."""
    _, h, w = region.shape
    if angle == 0:  # a whole-pixel shift copies pixels exactly (bilinear weights 0 / 1): no blur
        dst = (src[0] + round(dst[0] - src[0]), src[1] + round(dst[1] - src[1]))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    dy, dx = ys - dst[0], xs - dst[1]
    c, s = math.cos(angle), math.sin(angle)
    qy, qx = src[0] - s * dx + c * dy, src[1] + c * dx + s * dy  # the source pixel of each output pixel
    # grid_sample's pixel-centre convention (align_corners=False): pixel i sits at (2i + 1) / n - 1.
    grid = torch.stack([(2 * qx + 1) / w - 1, (2 * qy + 1) / h - 1], dim=-1)[None].to(source.dtype)
    content = F.grid_sample(source[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
    footprint = F.grid_sample(region[None].to(source.dtype), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[0] > 0.5
    return content, footprint


def _fit(donor, image) -> torch.Tensor:
    """Returns `donor` resized to the image's (H, W) when they differ."""
    if donor.shape[-2:] == image.shape[-2:]:
        return donor
    return F.interpolate(donor[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0].clamp(0, 1)


# ---------------------------------------------------------------- regions (bool (1, H, W))


def _area(rng) -> float:
    """Returns a target region fraction, log-uniform in AREA (small defects are as common as big)."""
    return math.exp(rng.uniform(math.log(AREA[0]), math.log(AREA[1])))


def _coords(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns pixel-centre (y, x), each (H, W), in units of sqrt(H * W) (shapes stay round)."""
    s = math.sqrt(h * w)
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / s
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / s
    return torch.meshgrid(y, x, indexing="ij")


def _centre(rng, h: int, w: int, margin: float) -> tuple[float, float]:
    """Returns a random (cy, cx) at least `margin` (of each side) from the borders."""
    s = math.sqrt(h * w)
    return rng.uniform(margin, 1 - margin) * h / s, rng.uniform(margin, 1 - margin) * w / s


def _rotated(rng, h: int, w: int, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (u, v), each (H, W): coordinates along and across a random angle, about a random centre."""
    y, x = _coords(h, w)
    cy, cx = _centre(rng, h, w, margin)
    a = rng.uniform(0, math.pi)
    return (x - cx) * math.cos(a) + (y - cy) * math.sin(a), -(x - cx) * math.sin(a) + (y - cy) * math.cos(a)


def _smooth_noise(rng, h: int, w: int, cells: int, octaves: int = 3) -> torch.Tensor:
    """Returns (H, W) fractal noise: random grids upsampled bicubically, amplitude halved per octave."""
    total = torch.zeros(1, 1, h, w)
    for o in range(octaves):
        n = min(cells * 2 ** o, max(h, w))  # a grid finer than the image adds nothing
        grid = torch.from_numpy(rng.standard_normal((1, 1, n + 1, n + 1)).astype(np.float32))
        total += 0.5 ** o * F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)
    return total[0, 0]


def _top(field: torch.Tensor, fraction: float) -> torch.Tensor:
    """Returns bool (1, H, W): the `fraction` of pixels with the highest field (exact count, no ties)."""
    flat = field.flatten()
    k = max(1, round(fraction * flat.numel()))
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    return (field >= threshold)[None]


def _blob(rng, h: int, w: int, fraction: float) -> torch.Tensor:
    """Returns an irregular blob covering `fraction`: Perlin-like noise plus a bump, thresholded.

    Thresholding noise alone (DRAEM) scatters spots over the whole image; the bump at a random
    centre keeps the defect local while the noise roughens its outline.
    """
    y, x = _coords(h, w)
    cy, cx = _centre(rng, h, w, 0.15)
    radius2 = fraction / math.pi
    bump = -((y - cy) ** 2 + (x - cx) ** 2) / radius2
    noise = _smooth_noise(rng, h, w, cells=int(rng.integers(4, 9)))
    return _top(bump + rng.uniform(0.7, 1.5) * noise, fraction)


def _ellipse(rng, h: int, w: int, fraction: float) -> torch.Tensor:
    """Returns a rotated ellipse of area `fraction` (less where it leaves the image)."""
    u, v = _rotated(rng, h, w, 0.2)
    aspect = rng.uniform(1, 3)
    b = math.sqrt(fraction / (math.pi * aspect))  # semi-axes a = aspect * b, area pi a b
    return ((u / (aspect * b)) ** 2 + (v / b) ** 2 <= 1)[None]


def _scar(rng, h: int, w: int) -> torch.Tensor:
    """Returns a thin band, slightly curved: length 15-30 % of the side, width 2-6 %, area >= 0.6 %."""
    u, v = _rotated(rng, h, w, 0.2)
    length = rng.uniform(0.15, 0.30)
    width = rng.uniform(max(0.02, 0.006 / length), 0.06)  # thin scars are long ones
    bend = rng.uniform(-0.3, 0.3) * length  # sagitta of the curve
    v = v - bend * (2 * u / length) ** 2
    return ((u.abs() <= length / 2) & (v.abs() <= width / 2))[None]


# ---------------------------------------------------------------- fills


def _texture(rng, h: int, w: int) -> torch.Tensor:
    """Returns a (3, H, W) foreign texture in [0, 1]: coloured noise, stripes, checker or blobs."""
    style = int(rng.integers(4))
    if style == 0:
        noise = torch.stack([_smooth_noise(rng, h, w, cells=int(rng.integers(8, 24))) for _ in range(3)])
        return torch.sigmoid(2 * noise)
    colours = torch.from_numpy(rng.uniform(0, 1, (2, 3, 1, 1)).astype(np.float32))
    u, v = _rotated(rng, h, w, 0.0)
    period = rng.uniform(0.02, 0.08)  # of the side: several periods inside a defect
    if style == 1:
        t = 0.5 + 0.5 * torch.sin(2 * math.pi * u / period)
    elif style == 2:
        t = ((torch.floor(u / period) + torch.floor(v / period)) % 2).float()
    else:
        t = (_smooth_noise(rng, h, w, cells=int(rng.integers(12, 32)), octaves=2) > 0).float()
    return colours[0] * (1 - t) + colours[1] * t


def _shifted(rng, image) -> torch.Tensor:
    """Returns the image rolled by 20-80 % of each side, so region pixels come from elsewhere."""
    _, h, w = image.shape
    dy, dx = (round(rng.uniform(0.2, 0.8) * n) for n in (h, w))
    return torch.roll(image, shifts=(dy, dx), dims=(1, 2))


def _far_colour(rng, image, region) -> torch.Tensor:
    """Returns a (3, 1, 1) colour 0.3-0.7 away (per channel, wrapping) from the region's mean colour."""
    pixels = rearrange(image, "c h w -> (h w) c")[region.flatten()]
    # numpy's pairwise sum: the same bits whatever torch's thread count
    mean = pixels.double().numpy().mean(axis=0) if len(pixels) else np.full(3, 0.5)
    colour = (mean + rng.uniform(0.3, 0.7, 3)) % 1.0
    return torch.from_numpy(colour.astype(np.float32)).view(3, 1, 1)


def _recolour(rng, source, region) -> torch.Tensor:
    """Returns `source` pulled 10-35 % towards a far colour: even a flat image changes by >= 0.03."""
    a = rng.uniform(0.10, 0.35)
    return source * (1 - a) + _far_colour(rng, source, region).to(source) * a


# ---------------------------------------------------------------- dataset


def item_seed(seed: int, index: int) -> int:
    """Returns the synthesis seed of item `index` (hash-free: the same in every process)."""
    return int(np.random.SeedSequence((seed, index)).generate_state(1)[0])


class ProxyDataset(Dataset):
    """Returns base items as good (the first len(base) items) then `copies` copies of each with
    a synthetic defect.

    Defect kinds go in turn through KINDS (item i after the good ones: KINDS[(seed + i) % 7],
    on base image i % len(base)), so each kind gets a fair share and, with several copies, each
    image several kinds; the kind is in "defect_type" ("synthetic_<kind>"). A `paste` defect
    takes its patch from another base image (the next one, cyclically).
    `base` items follow `recontrast.data` ({"image": ImageNet-normalised (3, S, S), "mask",
    "label", "defect_type", "path"}); use held-out normal images (`Datasets.val`).
    """

    def __init__(self, base, seed: int = 0, copies: int = 1):
        if copies < 1:
            raise ValueError(f"copies={copies}: each held-out image needs at least one defective copy")
        self.base, self.seed, self.copies = base, seed, int(copies)
        self.has_masks = True
        self.category = getattr(base, "category", None)
        self.skipped: list = []
        self._cache: dict[int, dict] = {}  # the base is small; evaluation repeats every few steps
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return (1 + self.copies) * len(self.base)

    def __getitem__(self, index: int) -> dict:
        n, total = len(self.base), len(self)
        if not -total <= index < total:
            raise IndexError(f"index {index} out of range for {total} items")
        index %= total
        if index < n:
            item = self.base[index]
            return {**item, "mask": torch.zeros_like(item["mask"]), "label": 0, "defect_type": "good"}
        i = index - n
        if i not in self._cache:
            self._cache[i] = self._synthetic(i)
        item = self._cache[i]
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in item.items()}  # callers may edit

    def _synthetic(self, i: int) -> dict:
        """Returns defect item i: base item i % len(base) with a synthetic defect (label 1, its
        mask, "synthetic_<kind>"; copies after the first say which in their path)."""
        n = len(self.base)
        b, copy = i % n, i // n
        item = self.base[b]
        normalised = item["image"]
        image = self._unnormalise(normalised)
        # Kinds in turn, not drawn: a few dozen images still get each kind about equally often.
        kind = KINDS[(self.seed + i) % len(KINDS)]
        donor = self._unnormalise(self.base[(b + 1) % n]["image"]) if kind == "paste" and n > 1 else None
        defective, mask, kind = synthesize(image, item_seed(self.seed, i), kind, donor)
        # Outside the mask keep the base tensor itself: no float round-trip error there.
        renormalised = (defective - self._mean) / self._std
        out = torch.where(mask.bool(), renormalised, normalised)
        return {"image": out, "mask": mask.to(item["mask"].dtype), "label": 1,
                "defect_type": f"synthetic_{kind}",
                "path": f"{item['path']}#synthetic_{kind}" + (f"_{copy + 1}" if copy else "")}

    def _unnormalise(self, normalised: torch.Tensor) -> torch.Tensor:
        return (normalised * self._std + self._mean).clamp(0, 1)
