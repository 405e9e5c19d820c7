import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from recontrast import synthetic
from conftest import SYNTH


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_counts_and_summary(synthetic_root):
    counts = synthetic.summarize(synthetic_root)
    assert sorted(counts) == sorted(synthetic.CATEGORIES)
    for cat, entry in counts.items():
        assert entry["train"] == {"good": SYNTH["n_train"]}
        assert entry["test"] == {"good": SYNTH["n_test_good"],
                                 **{d: SYNTH["n_test_defect"] for d in synthetic.DEFECTS[cat]}}
        assert entry["masks"] == {d: SYNTH["n_test_defect"] for d in synthetic.DEFECTS[cat]}
    info = json.loads((synthetic_root / "summary.json").read_text())
    assert info["seed"] == 0 and info["size"] == 64 and info["categories"]["bar"]["kind"] == "object"
    assert "weave" in (synthetic_root / "README.txt").read_text()
    text = synthetic.format_summary(counts)
    assert text.splitlines()[0].startswith("bar: train 12, test good 6 / misplaced_part 3")
    assert {synthetic.KINDS[c] for c in synthetic.CATEGORIES} == {"texture", "object"}


def test_same_seed_same_bytes_and_subsets_reproduce(tmp_path, synthetic_root):
    kw = dict(size=48, n_train=3, n_test_good=2, n_test_defect=2, categories=["weave", "bar"])
    a = _files(synthetic.generate(tmp_path / "a", seed=1, **kw))
    b = _files(synthetic.generate(tmp_path / "b", seed=1, **kw))
    c = _files(synthetic.generate(tmp_path / "c", seed=2, **kw))
    assert a == b
    images = [k for k in a if k.suffix == ".png"]
    assert all(a[k] != c[k] for k in images if "train" in k.parts)
    # One category alone gives the bytes it has inside the full dataset.
    alone = synthetic.generate(tmp_path / "d", **{**SYNTH, "categories": ["disc"]})
    assert _files(alone / "disc") == _files(synthetic_root / "disc")


def test_masks_are_exactly_the_changed_pixels(synthetic_root):
    size = SYNTH["size"]
    for cat in synthetic.CATEGORIES:
        for defect in synthetic.DEFECTS[cat]:
            for i in range(SYNTH["n_test_defect"]):
                image = np.asarray(Image.open(synthetic_root / cat / "test" / defect / f"{i:03d}.png"))
                mask = np.asarray(Image.open(synthetic_root / cat / "ground_truth" / defect / f"{i:03d}_mask.png"))
                assert image.shape == (size, size, 3) and mask.shape == (size, size)
                assert set(np.unique(mask)) == {0, 255}
                assert 0 < (mask > 0).mean() <= 0.2, (cat, defect, i)
                # Re-rendering the sample without its defect differs exactly on the mask.
                for attempt in range(20):
                    again, clean = synthetic.render(cat, defect, i, size, SYNTH["seed"], attempt)
                    if np.array_equal(again, image):
                        break
                assert np.array_equal((image != clean).any(-1), mask > 0), (cat, defect, i)


def test_good_images_vary(synthetic_root):
    for cat in synthetic.CATEGORIES:
        a, b = (np.asarray(Image.open(synthetic_root / cat / "train" / "good" / f"{i:03d}.png"), float)
                for i in (0, 1))
        assert np.abs(a - b).mean() > 3, cat  # nuisance: shifts, lighting, rotation, noise


def test_pixel_difference_baseline_is_far_from_perfect(tmp_path):
    root = synthetic.generate(tmp_path, size=64, n_train=30, n_test_good=15, n_test_defect=6)
    aurocs = {}
    for cat in synthetic.CATEGORIES:
        s = synthetic.pixel_baseline_scores(root, cat)
        aurocs[cat] = {k: roc_auc_score(s["labels"], s[k]) for k in ("max", "mean")}
    for k in ("max", "mean"):
        below = [c for c in aurocs if aurocs[c][k] < 0.98]
        assert len(below) > len(aurocs) / 2, aurocs


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic categories.*weave"):
        synthetic.generate(tmp_path, categories=["wheat"])
    (tmp_path / "own" / "weave").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by"):
        synthetic.generate(tmp_path / "own", size=32, n_train=1, n_test_good=1, n_test_defect=1)


@pytest.mark.parametrize("size", [32, 47, 100])
@pytest.mark.parametrize("category", ["mesh", "board"])
def test_structural_categories_at_any_size(category, size):
    """mesh (periodic texture, fine breaks and misalignments) and board (parts missing, out of
    place, one too many): every defect places at odd and tiny sizes, its mask exact and local."""
    for defect in synthetic.DEFECTS[category]:
        for i in range(2):
            image, mask = synthetic._defect_sample(category, defect, i, size, 0)
            assert image.shape == (size, size, 3) and mask.shape == (size, size)
            attempts = [synthetic.render(category, defect, i, size, 0, a) for a in range(20)]
            clean = next(c for im, c in attempts if np.array_equal(im, image))
            assert np.array_equal((image != clean).any(-1), mask)
            # Structural, not a stain: the defect is a small part of the image.
            assert mask.mean() < (0.03 if category == "mesh" else 0.12), (defect, i, mask.mean())


def test_board_parts_change_only_where_a_part_was_or_is():
    """A missing part shows bare board where a good board has a dark part; an extra part puts a
    dark part where a good board is bare: the defect is the geometry, colours are the normal ones."""
    for defect, dark_after in (("missing_part", False), ("extra_part", True)):
        image, mask = synthetic._defect_sample("board", defect, 0, 128, 0)
        clean = next(c for im, c in (synthetic.render("board", defect, 0, 128, 0, a) for a in range(20))
                     if np.array_equal(im, image))
        dark = lambda im: im[mask].mean(-1) < 60  # noqa: E731  the part bodies are near black
        assert dark(image).mean() > 0.3 if dark_after else dark(clean).mean() > 0.3
        assert dark(clean).mean() < 0.05 if dark_after else dark(image).mean() < 0.05
