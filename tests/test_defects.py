"""Synthetic defects: the mask is exactly the changed pixels, seeds reproduce, ProxyDataset's contract."""
from __future__ import annotations

import pytest
import torch

from recontrast.defects import KINDS, STRUCTURAL_KINDS, TOL, ProxyDataset, synthesize
from recontrast.images import IMAGENET_MEAN, IMAGENET_STD

SEEDS = range(6)


def _gradient(size: int = 96, seed: int = 0) -> torch.Tensor:
    """Returns a (3, size, size) image in [0, 1]: colour gradients plus sensor-like noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.1, 0.9, size)
    image = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                         torch.full((size, size), 0.5)])
    return (image + 0.05 * torch.randn(3, size, size, generator=g)).clamp(0, 1)


IMAGES = {"gradient": _gradient(), "grey": torch.full((3, 96, 96), 0.5),
          "black": torch.zeros(3, 64, 64)}


def _normalise(image: torch.Tensor) -> torch.Tensor:
    return (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


class _Base(torch.utils.data.Dataset):
    """A tiny stand-in for `Datasets.val`: held-out normal images as normalised items."""

    category = "toy"

    def __init__(self, n: int = len(KINDS), size: int = 64):
        self.images = [_normalise(_gradient(size, seed)) for seed in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i].clone(), "mask": torch.zeros(1, *self.images[i].shape[1:]),
                "label": 0, "defect_type": "good", "path": f"img{i}.png"}


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_mask_is_exactly_the_changed_pixels(name, kind):
    image = IMAGES[name]
    for seed in SEEDS:
        out, mask, got = synthesize(image, seed, kind)
        assert got == kind
        assert out.shape == image.shape and mask.shape == (1, *image.shape[1:])
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        inside = mask[0].bool()
        assert torch.equal(out[:, ~inside], image[:, ~inside])  # bit-identical outside
        assert ((out - image).abs().sum(0)[inside] > TOL).all()
        assert 0.003 <= mask.mean() < 0.10, (seed, mask.mean())
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_seed_reproduces_and_differs():
    image = IMAGES["gradient"]
    for kind in (*KINDS, None):
        a, b = synthesize(image, 7, kind), synthesize(image, 7, kind)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
        assert not torch.equal(a[1], synthesize(image, 8, kind)[1])
    drawn = {synthesize(image, s)[2] for s in range(40)}
    assert drawn == set(KINDS)  # kind=None draws every kind


def test_paste_takes_its_patch_from_the_donor():
    black, white = torch.zeros(3, 64, 64), torch.ones(3, 80, 80)  # a donor of another size is resized
    for seed in SEEDS:
        out, mask, _ = synthesize(black, seed, "paste", donor=white)
        inside = mask[0].bool()
        assert inside.any()
        torch.testing.assert_close(out[:, inside], torch.ones_like(out[:, inside]))  # bilinear, turned


def test_shuffle_and_move_rearrange_the_image_own_pixels():
    """A shuffle permutes pixels (tiles moved and turned); a move brings no foreign colour: every
    moved pixel's colour is one of the image's (whole-pixel shifts) or between them (turns)."""
    image = IMAGES["gradient"]
    for seed in SEEDS:
        out, mask, _ = synthesize(image, seed, "shuffle")
        assert mask.any()
        for c in range(3):
            assert torch.equal(out[c].flatten().sort().values, image[c].flatten().sort().values)
        out, mask, _ = synthesize(image, seed, "move")
        inside = mask[0].bool()
        assert out[:, inside].min() >= image.min() - 0.3 and out[:, inside].max() <= image.max() + 0.3


def test_structural_kinds_keep_the_colours_surface_kinds_change_them():
    """erase / move / shuffle fill from the image itself: the defect's mean colour stays near the
    image's; that is what makes them hard for a model that only learned colour statistics."""
    image = _gradient(128, seed=1)
    for kind in ("erase", "move", "shuffle"):
        assert kind in STRUCTURAL_KINDS
        for seed in SEEDS:
            out, mask, _ = synthesize(image, seed, kind)
            inside = mask[0].bool()
            assert (out[:, inside].mean(1) - image[:, inside].mean(1)).abs().max() < 0.25, (kind, seed)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        synthesize(IMAGES["grey"], 0, "stain")
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        synthesize(torch.zeros(1, 8, 8), 0)


def test_proxy_dataset():
    base = _Base()
    n = len(base)
    proxy = ProxyDataset(base, seed=3)
    assert len(proxy) == 2 * n
    assert proxy.has_masks and proxy.category == "toy" and proxy.skipped == []
    for i in range(n):
        good, bad = proxy[i], proxy[n + i]
        assert good["label"] == 0 and good["defect_type"] == "good" and not good["mask"].any()
        assert torch.equal(good["image"], base[i]["image"])
        assert bad["label"] == 1 and bad["defect_type"].startswith("synthetic_")
        assert bad["path"] == f"img{i}.png#{bad['defect_type']}"
        inside = bad["mask"][0].bool()
        assert inside.any() and bad["mask"].shape == good["mask"].shape
        diff = (bad["image"] - base[i]["image"]).abs().sum(0)
        assert torch.equal(diff[~inside], torch.zeros_like(diff[~inside]))
        assert (diff[inside] > TOL / max(IMAGENET_STD) - 1e-4).all()  # TOL in [0, 1] units, at least
    assert {proxy[n + i]["defect_type"] for i in range(n)} == {f"synthetic_{k}" for k in KINDS}  # in turn
    with pytest.raises(IndexError):
        proxy[2 * n]


def test_proxy_dataset_with_several_copies_gives_each_image_several_kinds_and_keeps_the_first_copy():
    """eval.proxy_copies: copy 1 is the one-copy set's defect item for item; the other copies
    put other kinds on the same images, so every kind gets `copies` times as many defects."""
    base, n = _Base(n=5), 5
    one, three = ProxyDataset(base, seed=3), ProxyDataset(base, seed=3, copies=3)
    assert len(three) == 4 * n
    for i in range(2 * n):
        a, b = one[i], three[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) and a["path"] == b["path"]
    defects = [three[i] for i in range(n, 4 * n)]
    kinds = [d["defect_type"].removeprefix("synthetic_") for d in defects]
    # 15 in turn over the seven kinds from KINDS[3] (seed 3): erase once more than the others
    assert {k: kinds.count(k) for k in KINDS} == {k: 3 if k == "erase" else 2 for k in KINDS}
    assert len({d["path"] for d in defects}) == 3 * n  # the second and third copies say which they are
    assert [kinds[i] for i in range(0, 3 * n, n)] == ["erase", "patch", "shuffle"]  # image 0: three kinds
    with pytest.raises(IndexError):
        three[4 * n]
    with pytest.raises(ValueError, match="at least one"):
        ProxyDataset(base, copies=0)


def test_proxy_dataset_deterministic_and_cached():
    a, b = ProxyDataset(_Base(), seed=1), ProxyDataset(_Base(), seed=1)
    n = len(a.base)
    first = [a[i] for i in range(n, 2 * n)]
    first[0]["image"].zero_()  # a caller editing its copy must not reach the cache
    for i in range(n, 2 * n):
        again, other = a[i], b[i]
        assert torch.equal(again["image"], other["image"]) and torch.equal(again["mask"], other["mask"])
        assert again["defect_type"] == other["defect_type"]
    assert not torch.equal(ProxyDataset(_Base(), seed=2)[n]["mask"], a[n]["mask"])
