"""Synthetic MVTec-AD-layout datasets: seeded textures and objects with exact defect masks.

Every image comes from its own random stream, seeded by (seed, category, split, index), so a
subset of categories or a different image count reproduces the images they share. A defect
image is rendered twice from the same nuisance stream, without and with the defect; its mask
is exactly the set of pixels whose 8-bit values differ between the two.

Nuisance (shifts, pattern phase, rotation, lighting gradients, gain, tint, sensor noise) is
sized to carry as much pixel energy as the defects, so a pixel-difference baseline is far
from perfect (see `pixel_baseline_scores`) while the defects stay local and visible.
"""
from __future__ import annotations

import functools
import json
import numbers
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
import psutil
from scipy import ndimage

CATEGORIES: tuple[str, ...] = ("weave", "grain", "disc", "bar", "mesh", "board")
KINDS = {"weave": "texture", "grain": "texture", "disc": "object", "bar": "object", "mesh": "texture",
         "board": "object"}
DEFECTS: dict[str, tuple[str, ...]] = {
    "weave": ("hole", "misweave", "stain"),
    "grain": ("hole", "scratch", "stain"),
    "disc": ("broken", "contamination", "scratch"),
    "bar": ("misplaced_part", "missing_part", "thread"),
    # Fine, structural defects on a strongly periodic texture: nothing but geometry changes.
    "mesh": ("broken_wire", "shifted_wire", "thick_wire"),
    # Parts of an object that are missing, out of place or one too many: colours stay normal.
    "board": ("extra_part", "misplaced_part", "missing_part"),
}
# Fixed stream ids: Python's hash() of a str changes between processes.
_CATEGORY_ID = {"weave": 11, "grain": 23, "disc": 37, "bar": 41, "mesh": 43, "board": 47}
_MARKER = "recontrast.synthetic"
_PNG = {"format": "PNG", "compress_level": 1}  # fixed settings: byte-identical reruns


@functools.lru_cache(maxsize=4)
def _grid(S: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns pixel-centre coordinates (x, y), each (S, S) float32, in pixels (read-only)."""
    c = np.arange(S, dtype=np.float32) + 0.5
    x, y = np.meshgrid(c, c)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _smooth_noise(rng: np.random.Generator, S: int, sigma) -> np.ndarray:
    """Returns (S, S) Gaussian-filtered white noise with unit standard deviation."""
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (2,))
    f = np.maximum(1, sig // 2).astype(int)  # filter coarse noise at low resolution, then upsample
    small = rng.standard_normal(tuple(-(-S // f))).astype(np.float32)
    n = ndimage.gaussian_filter(small, sig / f, mode="wrap")
    if (f > 1).any():
        n = ndimage.zoom(n, f, order=1, mode="grid-wrap", grid_mode=True)[:S, :S]
    return n / (n.std() + 1e-12)


def _step(d: np.ndarray) -> np.ndarray:
    """Returns an anti-aliased inside indicator for a signed distance in pixels (<0 inside)."""
    return np.clip(0.5 - d, 0.0, 1.0)


def _blob(rng: np.random.Generator, S: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Returns the (S, S) alpha of an irregular blob of mean radius r pixels."""
    x, y = _grid(S)
    dx, dy = x - cx, y - cy
    theta = np.arctan2(dy, dx)
    radius = np.full_like(theta, r)
    for k in (2, 3, 5):
        radius += r * rng.uniform(0.0, 0.25 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return _step(np.hypot(dx, dy) - radius)


def _curve(S: int, pts: np.ndarray, width: float) -> np.ndarray:
    """Returns the (S, S) alpha of a quadratic Bezier stroke through 3 control points."""
    t = np.linspace(0.0, 1.0, 256)[:, None]
    path = (1 - t) ** 2 * pts[0] + 2 * (1 - t) * t * pts[1] + t**2 * pts[2]  # (256, 2) x, y
    alpha = np.zeros((S, S))
    pad = width + 2
    x0, y0 = np.maximum(np.floor(path.min(0) - pad).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(path.max(0) + pad).astype(int), S)
    if x1 <= x0 or y1 <= y0:
        return alpha
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    d = np.hypot(xx[..., None] - path[:, 0], yy[..., None] - path[:, 1]).min(-1)
    alpha[y0:y1, x0:x1] = _step(d - width / 2)
    return alpha


def _random_curve(rng: np.random.Generator, S: int, cx: float, cy: float, length: float):
    a = rng.uniform(0, np.pi)
    half = length / 2 * np.array([np.cos(a), np.sin(a)])
    bend = rng.normal(0, 0.15) * length * np.array([-np.sin(a), np.cos(a)])
    c = np.array([cx, cy])
    return np.stack([c - half, c + bend, c + half])


def _chroma(rng: np.random.Generator, strength: float) -> np.ndarray:
    """Returns a per-channel factor 1 + delta that shifts hue more than brightness."""
    d = rng.standard_normal(3)
    d -= d.mean() * 0.7  # keep a little luminance change, mostly colour
    return 1.0 + strength * d / np.linalg.norm(d)


def _blend(img: np.ndarray, alpha: np.ndarray, value) -> np.ndarray:
    return img * (1 - alpha[..., None]) + alpha[..., None] * value


def _weave(rng, S, defect, drng):
    """Returns the albedo (S, S, 3) of a plain weave, optionally with a defect."""
    x, y = _grid(S)
    p = S * rng.uniform(0.085, 0.1)
    phi = rng.uniform(-0.06, 0.06)
    u0, v0 = rng.uniform(0, 2 * p, 2)  # pattern phase: the textures' "shift"
    base = np.array([0.80, 0.68, 0.50]) * (1 + rng.normal(0, 0.03, 3))
    fibre = 0.04 * _smooth_noise(rng, S, 0.6)
    u = (np.cos(phi) * x + np.sin(phi) * y + u0) / p
    v = (-np.sin(phi) * x + np.cos(phi) * y + v0) / p
    i, j = np.floor(u), np.floor(v)
    parity = (i + j) % 2
    cx, cy = drng.uniform(0.15, 0.85, 2) * S if defect else (0.0, 0.0)
    if defect == "misweave":  # a run of cells woven in the wrong direction
        ci = np.floor((np.cos(phi) * cx + np.sin(phi) * cy + u0) / p)
        cj = np.floor((-np.sin(phi) * cx + np.cos(phi) * cy + v0) / p)
        run = drng.integers(2, 4)
        parity = np.where((j == cj) & (i >= ci) & (i < ci + run), 1 - parity, parity)
    across = np.where(parity == 0, v - j, u - i)
    along = np.where(parity == 0, u - i, v - j)
    h = np.sin(np.pi * across) ** 0.7 * (0.8 + 0.2 * np.sin(np.pi * along))
    img = (0.3 + 0.7 * h + fibre)[..., None] * base
    if defect == "hole":  # threads torn away: the dark backing shows through
        backing = 0.3 * base * (1 + 0.05 * _smooth_noise(drng, S, 1.0))[..., None]
        img = _blend(img, _blob(drng, S, cx, cy, S * drng.uniform(0.03, 0.05)), backing)
    elif defect == "stain":
        tint = _chroma(drng, drng.uniform(0.14, 0.22))
        img = img * (1 + _blob(drng, S, cx, cy, S * drng.uniform(0.04, 0.07))[..., None] * (tint - 1))
    return img


def _grain(rng, S, defect, drng):
    """Returns the albedo of a wood-like grain: warped stripes plus stretched noise."""
    x, y = _grid(S)
    a = rng.uniform(-0.1, 0.1)
    yr = -np.sin(a) * x + np.cos(a) * y
    warp = 0.5 * _smooth_noise(rng, S, S / 8)
    fine = _smooth_noise(rng, S, (S / 256 * 0.8, S / 12))
    t = (0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(4, 7) * yr / S + warp))) ** 1.5
    g = np.clip(0.55 * t + 0.12 * fine + 0.25, 0, 1)[..., None]
    dark, light = np.array([0.40, 0.25, 0.13]), np.array([0.78, 0.58, 0.38])
    img = dark + g * (light - dark)
    if not defect:
        return img
    cx, cy = drng.uniform(0.12, 0.88, 2) * S
    if defect == "scratch":
        pts = _random_curve(drng, S, cx, cy, S * drng.uniform(0.15, 0.3))
        img = _blend(img, 0.7 * _curve(S, pts, max(1.0, S * 0.007)), light * 1.1)
    elif defect == "stain":
        tint = _chroma(drng, drng.uniform(0.2, 0.3)) * 0.85
        img = img * (1 + _blob(drng, S, cx, cy, S * drng.uniform(0.04, 0.07))[..., None] * (tint - 1))
    elif defect == "hole":
        img = _blend(img, _blob(drng, S, cx, cy, S * drng.uniform(0.018, 0.03)), dark * 0.45)
    return img


def _disc(rng, S, defect, drng):
    """Returns the albedo of a bottle seen from above: rim, body, lip, opening."""
    x, y = _grid(S)
    R = S * 0.31 * (1 + rng.normal(0, 0.01))
    cx, cy = S / 2 + rng.uniform(-0.02, 0.02, 2) * S
    psi = rng.uniform(0, 2 * np.pi)
    bg = 0.10 + 0.015 * _smooth_noise(rng, S, S / 16)
    r, theta = np.hypot(x - cx, y - cy), np.arctan2(y - cy, x - cx)
    highlight = 1 + 0.25 * np.cos(theta - psi)
    shade = (
        0.55 * highlight * (_step(r - R) - _step(r - 0.78 * R))
        + 0.28 * (_step(r - 0.78 * R) - _step(r - 0.42 * R))
        + 0.50 * highlight * (_step(r - 0.42 * R) - _step(r - 0.32 * R))
        + 0.06 * _step(r - 0.32 * R)
    )
    obj = _step(r - R)
    glass = np.array([0.45, 0.52, 0.30])
    if defect == "broken":  # a chip off the rim: background shows where glass was
        a = drng.uniform(0, 2 * np.pi)
        chip = _blob(drng, S, cx + R * np.cos(a), cy + R * np.sin(a), S * drng.uniform(0.03, 0.05))
        shade, obj = shade * (1 - chip), obj * (1 - chip)
    img = (bg * (1 - obj))[..., None] + shade[..., None] * glass
    if defect == "contamination":
        rr, a = drng.uniform(0.45, 0.75) * R, drng.uniform(0, 2 * np.pi)
        blob = drng.uniform(0.6, 0.9) * _blob(drng, S, cx + rr * np.cos(a), cy + rr * np.sin(a), S * drng.uniform(0.015, 0.03))
        img = _blend(img, blob, np.array([0.35, 0.25, 0.15]))
    elif defect == "scratch":
        rr, a = drng.uniform(0.8, 0.95) * R, drng.uniform(0, 2 * np.pi)
        pts = _random_curve(drng, S, cx + rr * np.cos(a), cy + rr * np.sin(a), S * drng.uniform(0.06, 0.12))
        img = _blend(img, 0.5 * _curve(S, pts, max(1.0, S * 0.005)), np.array([0.8, 0.85, 0.7]))
    return img


def _bar(rng, S, defect, drng):
    """Returns the albedo of a screw-like bar (head, threaded shaft, tip) at any rotation."""
    x, y = _grid(S)
    bg = np.array([0.78, 0.78, 0.76]) * (1 + 0.015 * _smooth_noise(rng, S, S / 16))[..., None]
    th = rng.uniform(0, 2 * np.pi)
    cx, cy = S / 2 + rng.uniform(-0.04, 0.04, 2) * S
    L, hw, rh = S * 0.30 * (1 + rng.normal(0, 0.02)), S * 0.045, S * 0.075
    pitch = S * 0.022
    u = np.cos(th) * (x - cx) + np.sin(th) * (y - cy)  # along the bar, head at -L
    v = -np.sin(th) * (x - cx) + np.cos(th) * (y - cy)
    tip, head_v, flat = L, 0.0, None
    if defect == "missing_part":
        tip = L - S * drng.uniform(0.07, 0.12)
    elif defect == "misplaced_part":
        head_v = drng.choice([-1, 1]) * S * drng.uniform(0.035, 0.055)
    elif defect == "thread":  # a stretch of flattened, shiny thread
        start = drng.uniform(-0.2, 0.6) * L
        flat = (u > start) & (u < start + S * drng.uniform(0.06, 0.1))
    half_w = hw * np.clip((L - u) / (2.5 * hw), 0, 1)  # pointed tip
    d_shaft = np.maximum(np.maximum(np.abs(v) - half_w, -L - u), u - tip)
    d_head = np.hypot(u + L, v - head_v) - rh
    in_shaft, in_head = _step(d_shaft), _step(d_head)
    cyl = 0.22 + 0.25 * np.clip(1 - (v / hw) ** 2, 0, 1)
    threads = 1 - 0.35 * (0.5 + 0.5 * np.cos(2 * np.pi * (u + 0.3 * v) / pitch)) * (u > -0.3 * L)
    if flat is not None:
        threads = np.where(flat, 1.15, threads)
    hr = np.hypot(u + L, v - head_v) / rh
    slot = np.abs(v - head_v) < rh * 0.12  # the screwdriver slot
    head = (0.30 + 0.2 * np.clip(1 - hr**2, 0, 1)) * np.where(slot, 0.5, 1.0)
    shade = np.where(in_head > 0, head, cyl * threads)
    obj = np.maximum(in_shaft, in_head)
    metal = np.array([0.95, 0.97, 1.0])
    return bg * (1 - obj[..., None]) + (obj * shade)[..., None] * metal


def _mesh(rng, S, defect, drng):
    """Returns the albedo of a woven wire mesh: two sets of round wires over and under each other.

    The period is at least 8 px, so a wire stays a few pixels wide on small test images.
    """
    x, y = _grid(S)
    p = max(8.0, S * rng.uniform(0.055, 0.065))
    phi = rng.uniform(-0.05, 0.05)
    u0, v0 = rng.uniform(0, p, 2)  # pattern phase
    hw = p * rng.uniform(0.11, 0.13)  # wire half-width
    bg = 0.12 + 0.02 * _smooth_noise(rng, S, S / 16)
    metal = np.array([0.82, 0.80, 0.74]) * (1 + rng.normal(0, 0.03, 3))
    u = np.cos(phi) * x + np.sin(phi) * y + u0
    v = -np.sin(phi) * x + np.cos(phi) * y + v0
    iu, iv = np.round(u / p), np.round(v / p)  # index of the nearest wire of each set
    du, dv = u - iu * p, v - iv * p  # signed distance to that wire's centre line
    half_u = half_v = np.full_like(u, hw)
    if defect:
        # The defect sits between two crossings of one wire (the set drawn at random), where a
        # break, a shift or a thickening changes nothing but that wire.
        ci, cj = drng.integers(2, max(3, int(S / p) - 2), 2)
        length = p * drng.uniform(0.45, 0.7)
        zone = lambda along, across: (np.abs(across - ci * p) < p / 2) & (np.abs(along - (cj + 0.5) * p) < length / 2)  # noqa: E731
        vertical = drng.random() < 0.5
        wires, along = ((u, v) if vertical else (v, u))
        here = zone(along, wires)
        d, half = (du, half_u) if vertical else (dv, half_v)
        if defect == "broken_wire":
            d = np.where(here, p, d)  # the wire is gone there: nothing is that close
        elif defect == "shifted_wire":
            d = np.where(here, d - drng.choice([-1, 1]) * p * drng.uniform(0.2, 0.3), d)
        elif defect == "thick_wire":
            half = np.where(here, hw * drng.uniform(1.7, 2.1), half)
        du, dv, half_u, half_v = (d, dv, half, half_v) if vertical else (du, d, half_u, half)
    on_u, on_v = _step(np.abs(du) - half_u), _step(np.abs(dv) - half_v)
    # Round wires, and at each crossing the set on top alternates (plain weave).
    shade_u = 0.55 + 0.45 * np.sqrt(np.clip(1 - (du / half_u) ** 2, 0, 1))
    shade_v = 0.55 + 0.45 * np.sqrt(np.clip(1 - (dv / half_v) ** 2, 0, 1))
    u_on_top = (iu + iv) % 2 == 0
    top, top_shade = np.where(u_on_top, on_u, on_v), np.where(u_on_top, shade_u, shade_v)
    low, low_shade = np.where(u_on_top, on_v, on_u), np.where(u_on_top, shade_v, shade_u)
    under = low * (1 - top)
    shade = top * top_shade + under * 0.8 * low_shade  # the lower wire is in the upper one's shadow
    cover = np.clip(top + under, 0, 1)
    return (bg * (1 - cover))[..., None] + shade[..., None] * metal


_BOARD_SLOTS = [(r, c) for r in range(3) for c in range(3)]
_BOARD_PARTS = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 2)]  # slots that hold a part; the others stay empty


def _board(rng, S, defect, drng):
    """Returns the albedo of a small circuit board with six parts (dark bodies, metal leads and a
    pin-1 dot) on a 3 x 3 grid of slots, three of them empty; shifted and turned a little."""
    x, y = _grid(S)
    bg = np.array([0.20, 0.20, 0.22]) * (1 + 0.02 * _smooth_noise(rng, S, S / 16))[..., None]
    th = rng.uniform(-0.08, 0.08)
    cx, cy = S / 2 + rng.uniform(-0.03, 0.03, 2) * S
    side = S * 0.36 * (1 + rng.normal(0, 0.01))  # half the board's side
    u = np.cos(th) * (x - cx) + np.sin(th) * (y - cy)
    v = -np.sin(th) * (x - cx) + np.cos(th) * (y - cy)
    pcb = np.array([0.18, 0.45, 0.25]) * (1 + rng.normal(0, 0.03, 3))
    img = _blend(bg, _step(np.maximum(np.abs(u), np.abs(v)) - side), pcb * (1 + 0.03 * _smooth_noise(rng, S, S / 32))[..., None])
    pitch = side * 0.62
    a, b = S * 0.065, S * 0.04  # a part's half length and half width
    jitter = rng.normal(0, 0.006 * S, (len(_BOARD_PARTS), 2))  # placement tolerance of good boards
    turn = rng.normal(0, 0.03, len(_BOARD_PARTS))
    parts = [[(c - 1) * pitch + dx, (r - 1) * pitch + dy, t] for (r, c), (dx, dy), t in zip(_BOARD_PARTS, jitter, turn)]
    if defect == "missing_part":
        parts.pop(int(drng.integers(len(parts))))
    elif defect == "misplaced_part":
        k = int(drng.integers(len(parts)))
        angle = drng.uniform(0, 2 * np.pi)
        shift = pitch * drng.uniform(0.2, 0.35) if drng.random() < 2 / 3 else 0.0
        parts[k][0] += shift * np.cos(angle)
        parts[k][1] += shift * np.sin(angle)
        parts[k][2] += drng.choice([-1, 1]) * drng.uniform(0.35, 1.2) if shift == 0 or drng.random() < 0.5 else 0.0
    elif defect == "extra_part":
        r, c = [s for s in _BOARD_SLOTS if s not in _BOARD_PARTS][int(drng.integers(9 - len(_BOARD_PARTS)))]
        parts.append([(c - 1) * pitch + drng.normal(0, 0.006 * S), (r - 1) * pitch + drng.normal(0, 0.006 * S),
                      drng.normal(0, 0.03)])
    lead, body, dot = np.array([0.85, 0.85, 0.82]), np.array([0.10, 0.10, 0.11]), np.array([0.70, 0.70, 0.66])
    for pu, pv, t in parts:
        pa = np.cos(t) * (u - pu) + np.sin(t) * (v - pv)  # along the part
        pb = -np.sin(t) * (u - pu) + np.cos(t) * (v - pv)
        img = _blend(img, _step(np.maximum(np.abs(pa) - a * 1.2, np.abs(pb) - b * 0.7)), lead)  # leads out both ends
        img = _blend(img, _step(np.maximum(np.abs(pa) - a, np.abs(pb) - b)), body)
        img = _blend(img, _step(np.hypot(pa + 0.6 * a, pb + 0.45 * b) - 0.25 * b), dot)  # pin 1: shows a turn
    return img


_RENDER = {"weave": _weave, "grain": _grain, "disc": _disc, "bar": _bar, "mesh": _mesh, "board": _board}


def _photograph(albedo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Returns the uint8 (S, S, 3) image under random gain, lighting gradient, tint, noise."""
    S = albedo.shape[0]
    x, y = _grid(S)
    gain, tilt, ang = rng.uniform(0.88, 1.12), rng.uniform(0, 0.16), rng.uniform(0, 2 * np.pi)
    light = gain * (1 + tilt * (np.cos(ang) * (2 * x / S - 1) + np.sin(ang) * (2 * y / S - 1)))
    tint = 1 + rng.normal(0, 0.02, 3)
    sigma = rng.uniform(1.5, 4.0)
    shared, own = rng.standard_normal((S, S, 1), np.float32), rng.standard_normal((S, S, 3), np.float32)
    noise = sigma * (0.8 * shared + 0.6 * own)
    img = albedo.astype(np.float32) * (255.0 * light)[..., None].astype(np.float32)
    img *= tint.astype(np.float32)
    img += noise
    return np.clip(np.rint(img, out=img), 0, 255, out=img).astype(np.uint8)


def render(category: str, kind: str, index: int, size: int = 256, seed: int = 0,
           attempt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image, clean) uint8 (S, S, 3) for split kind 'train', 'good' or a defect type.

    `clean` is the same sample without the defect (equal to image for good samples); the
    defect's exact mask is `(image != clean).any(-1)`.
    """
    kinds = ("train", "good") + DEFECTS.get(category, ())
    if category not in _RENDER or kind not in kinds:
        raise ValueError(f"unknown category/kind {category}/{kind}; categories: "
                         f"{', '.join(CATEGORIES)}; kinds: {', '.join(kinds)}")
    split = kinds.index(kind)  # train 0, good 1, defect types 2, 3, ...
    key = [seed, _CATEGORY_ID[category], split, index]
    defect = kind if split >= 2 else None
    draw = _RENDER[category]
    clean = _photograph(draw(np.random.default_rng(key), size, None, None), np.random.default_rng(key[::-1]))
    if defect is None:
        return clean, clean
    dr = np.random.default_rng(key + [1000 + attempt])
    albedo = draw(np.random.default_rng(key), size, defect, dr)
    return _photograph(albedo, np.random.default_rng(key[::-1])), clean


def _defect_sample(category, kind, index, size, seed):
    """Returns (image, mask) with a mask covering a plausible area (retries otherwise)."""
    for attempt in range(20):
        image, clean = render(category, kind, index, size, seed, attempt)
        mask = (image != clean).any(-1)
        if max(6, 2e-4 * size * size) <= mask.sum() <= 0.2 * size * size:
            return image, mask
    raise RuntimeError(f"could not place a {kind} defect in {category} #{index} at size {size}")


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **_PNG)


def generate(out, size: int = 256, n_train: int = 200, n_test_good: int = 20,
             n_test_defect: int = 10, seed: int = 0, categories=None) -> Path:
    """Writes the dataset (MVTec AD layout) under `out` and returns its root.

    A category folder left by an earlier run of this generator is replaced; any other
    existing folder of that name makes this raise instead of overwriting.
    """
    root = Path(out)
    cats = tuple(categories) if categories else CATEGORIES
    _check_arguments(root, cats, size, n_train, n_test_good, n_test_defect, seed)
    ours = _is_ours(root)
    for c in cats:
        if (root / c).exists() and not ours:
            raise FileExistsError(f"{root / c} exists and was not written by {_MARKER}; pick another --out")
    # Categories are written into a staging folder beside `root` and renamed into place when
    # complete, after the marker: a generator killed part-way leaves no half category and no
    # unmarked folder for the next run to refuse (that run removes the dead staging folder).
    _remove_dead_stages(root)
    stage = root.parent / f".{root.name}.synth-{os.getpid()}"
    width = max(3, len(str(max(n_train, n_test_good, n_test_defect) - 1)))
    try:
        for c in cats:
            base = stage / c
            for split, kind, n in (("train", "train", n_train), ("test", "good", n_test_good)):
                for i in range(n):
                    _save(render(c, kind, i, size, seed)[0], base / split / "good" / f"{i:0{width}d}.png")
            for d in DEFECTS[c]:
                for i in range(n_test_defect):
                    image, mask = _defect_sample(c, d, i, size, seed)
                    _save(image, base / "test" / d / f"{i:0{width}d}.png")
                    _save(mask.astype(np.uint8) * 255, base / "ground_truth" / d / f"{i:0{width}d}_mask.png")
        root.mkdir(parents=True, exist_ok=True)
        if not ours:
            _write_atomic(root / "summary.json", json.dumps({"generator": _MARKER}) + "\n")
        for c in cats:
            if (root / c).exists():
                os.replace(root / c, stage / f"{c}.old")
            os.replace(stage / c, root / c)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _write_info(root, dict(size=size, n_train=n_train, n_test_good=n_test_good,
                           n_test_defect=n_test_defect, seed=seed))
    return root


def _remove_dead_stages(root: Path) -> None:
    """Removes the staging folders of generators that were killed (their process is gone)."""
    for stage in root.parent.glob(f".{root.name}.synth-*") if root.parent.is_dir() else ():
        pid = stage.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):  # psutil: `synth` needs no torch
            shutil.rmtree(stage, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


MIN_SIZE, MAX_SIZE = 32, 4096  # below 32 px defects no longer fit reliably


def _check_arguments(root: Path, cats, size, n_train, n_test_good, n_test_defect, seed) -> None:
    """Raises ValueError naming the first argument generate() cannot work with, and its fix."""
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown synthetic categories {', '.join(map(repr, unknown))[:200]}; "
                         f"choose from {', '.join(CATEGORIES)}")
    counts = {"size": size, "n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect,
              "seed": seed}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}"[:200])
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size={size} is out of range: images are {MIN_SIZE} to {MAX_SIZE} px (e.g. 256)")
    if n_train < 1 or n_test_good < 1 or n_test_defect < 0 or seed < 0:
        raise ValueError(f"image counts must be >= 1 (n_train={n_train}, n_test_good={n_test_good}), "
                         f"n_test_defect >= 0 ({n_test_defect}) and seed >= 0 ({seed})")
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out '{root}' is a file; give a folder for the dataset")


def _is_ours(root: Path) -> bool:
    try:
        return json.loads((root / "summary.json").read_text()).get("generator") == _MARKER
    except (OSError, ValueError):
        return False


def _write_info(root: Path, params: dict) -> None:
    counts = summarize(root)
    info = {"generator": _MARKER, **params,
            "categories": {c: {"kind": KINDS.get(c, "?"), "defects": list(DEFECTS.get(c, ())),
                               "counts": counts[c]} for c in counts}}
    _write_atomic(root / "summary.json", json.dumps(info, indent=2) + "\n")
    lines = [f"Synthetic anomaly-detection dataset written by {_MARKER}.generate({params}).",
             "Layout as MVTec AD: <category>/train/good, test/good, test/<defect>,",
             "ground_truth/<defect>/<stem>_mask.png (0/255: exactly the pixels the defect changed).",
             "Regenerate with `recontrast synth`; the same seed gives byte-identical files.", ""]
    lines += [f"{c} ({KINDS.get(c, '?')}): {_format_counts(counts[c])}" for c in counts]
    _write_atomic(root / "README.txt", "\n".join(lines) + "\n")


def summarize(root) -> dict:
    """Returns {category: {"train": {"good": n}, "test": {type: n}, "masks": {type: n}}}."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset at {root}; create one with `recontrast synth --out {root}`")
    out = {}
    for cat in sorted(p for p in root.iterdir() if (p / "train").is_dir() or (p / "test").is_dir()):
        entry = {}
        for split, sub in (("train", "train"), ("test", "test"), ("masks", "ground_truth")):
            folder = cat / sub
            kinds = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
            entry[split] = {k.name: sum(1 for f in k.iterdir() if f.is_file()) for k in kinds}
        out[cat.name] = entry
    return out


def _format_counts(entry: dict) -> str:
    test = " / ".join(f"{k} {n}" for k, n in entry["test"].items())
    return f"train {sum(entry['train'].values())}, test {test}, masks {sum(entry['masks'].values())}"


def format_summary(summary: dict) -> str:
    """Returns one line per category of a summarize() result: 'weave: train 200, test ...'."""
    return "\n".join(f"{cat}: {_format_counts(entry)}" for cat, entry in summary.items())


def pixel_baseline_scores(root, category: str) -> dict[str, np.ndarray]:
    """Returns a naive baseline's image scores: |test - mean train image|, max and mean.

    {"labels": (N,), "max": (N,), "mean": (N,)}; used to check that the synthetic data is
    not trivially separable by raw pixel differences.
    """
    base = Path(root) / category
    load = lambda p: np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)  # noqa: E731
    mean = np.mean([load(p) for p in sorted((base / "train" / "good").glob("*.png"))], axis=0)
    labels, smax, smean = [], [], []
    for folder in sorted((base / "test").iterdir()):
        for p in sorted(folder.glob("*.png")):
            diff = np.abs(load(p) - mean).mean(-1)
            labels.append(int(folder.name != "good"))
            smax.append(diff.max())
            smean.append(diff.mean())
    return {"labels": np.array(labels), "max": np.array(smax), "mean": np.array(smean)}
