"""Behaviour of recontrast/anomaly_map.py: distances, upsampling, combining, smoothing, scores."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from recontrast.anomaly_map import anomaly_map, image_score, kernel_size_for, maps_and_scores, max_map_value
from recontrast.config import EvalConfig


def _pairs(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, c, s, s, generator=g), torch.randn(2, c, s, s, generator=g))
        for c, s in shapes
    ]


SHAPES = [(16, 16), (32, 8), (64, 4)]  # (channels, side) per level, like strides 4/8/16 of 64 px


def test_identical_features_give_a_zero_map_of_the_requested_size():
    pairs = [(t, t.clone()) for t, _ in _pairs(SHAPES)]
    maps = anomaly_map(pairs, size=64)
    assert maps.shape == (2, 1, 64, 64) and maps.dtype == torch.float32
    assert maps.abs().max() < 1e-5
    assert anomaly_map(pairs, size=(48, 64)).shape == (2, 1, 48, 64)


@pytest.mark.parametrize("combine, expected", [("sum", 6.0), ("mean", 2.0), ("product", 8.0)])
def test_opposite_features_reach_max_map_value(combine, expected):
    pairs = [(t, -t) for t, _ in _pairs(SHAPES)]  # cos = -1 everywhere: 1 - cos = 2
    maps = anomaly_map(pairs, size=64, combine=combine)
    assert torch.allclose(maps, torch.full_like(maps, expected), atol=1e-4)
    assert max_map_value(len(pairs), combine) == expected


def test_random_maps_stay_within_max_map_value():
    pairs = _pairs(SHAPES, seed=3)
    for combine in ("sum", "mean", "product"):
        maps = anomaly_map(pairs, size=64, combine=combine)
        assert maps.min() >= 0 and maps.max() <= max_map_value(3, combine)


def test_unsmoothed_map_is_the_upsampled_sum_of_one_minus_cosine():
    pairs = _pairs(SHAPES, seed=1)
    expected = sum(
        F.interpolate(
            (1 - F.cosine_similarity(t, p, dim=1)).unsqueeze(1),
            size=(64, 64), mode="bilinear", align_corners=True,
        )
        for t, p in pairs
    )
    assert torch.allclose(anomaly_map(pairs, size=64, sigma=0), expected, atol=1e-5)


def test_local_feature_difference_lands_at_the_same_place_in_the_map():
    target = torch.ones(1, 8, 8, 8)
    prediction = target.clone()
    prediction[:, :, 2, 5] = -1.0  # one wrong feature vector at row 2, column 5
    maps = anomaly_map([(target, prediction)], size=64)
    row, col = divmod(int(maps.flatten().argmax()), 64)
    assert abs(row - 2 * 63 / 7) <= 2 and abs(col - 5 * 63 / 7) <= 2  # align_corners grid


def test_smoothing_is_scipy_gaussian_filter_with_mirror_border():
    pairs = _pairs(SHAPES, seed=2)
    raw = anomaly_map(pairs, size=64, sigma=0)
    smooth = anomaly_map(pairs, size=64, sigma=4)
    assert kernel_size_for(4.0) == 33
    for b in range(2):
        # kornia "reflect" == scipy "mirror"; truncate=4 gives the same 33-tap kernel.
        ref = ndimage.gaussian_filter(raw[b, 0].double().numpy(), sigma=4, mode="mirror")
        assert np.abs(smooth[b, 0].numpy() - ref).max() < 1e-4
        # The reference's scipy default ("reflect") differs only near the border.
        ref_default = ndimage.gaussian_filter(raw[b, 0].double().numpy(), sigma=4)
        assert np.abs(smooth[b, 0, 16:-16, 16:-16].numpy() - ref_default[16:-16, 16:-16]).max() < 1e-4


def test_maps_smaller_than_the_kernel_still_smooth():
    maps = anomaly_map(_pairs([(4, 4)]), size=8, sigma=4)
    assert maps.shape == (2, 1, 8, 8) and torch.isfinite(maps).all()


def test_no_graph_is_built_and_low_precision_inputs_give_float32():
    t = torch.randn(2, 8, 4, 4, requires_grad=True)
    p = torch.randn(2, 8, 4, 4, requires_grad=True)
    maps = anomaly_map([(t, p)], size=16)
    assert not maps.requires_grad
    maps16 = anomaly_map([(t.bfloat16(), p.bfloat16())], size=16)
    assert maps16.dtype == torch.float32
    assert torch.allclose(maps16, maps, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_maps_stay_on_the_features_device():
    pairs = [(t.cuda(), p.cuda()) for t, p in _pairs(SHAPES)]
    maps = anomaly_map(pairs, size=64)
    assert maps.device.type == "cuda"
    cpu = anomaly_map(_pairs(SHAPES), size=64)
    assert torch.allclose(maps.cpu(), cpu, atol=1e-4)


def test_image_score_max_and_topk_mean():
    maps = torch.zeros(2, 1, 10, 10)
    maps[0, 0, 0, :3] = torch.tensor([5.0, 3.0, 1.0])
    maps[1, 0, 4, 4] = 2.0
    assert image_score(maps).tolist() == [5.0, 2.0]
    assert torch.allclose(image_score(maps, "topk_mean", topk=0.03), torch.tensor([3.0, 2 / 3]))
    assert image_score(maps, "topk_mean", topk=0.001).tolist() == [5.0, 2.0]  # >= 1 pixel
    assert image_score(maps[:, 0], "max").shape == (2,)


def test_bad_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="sum, mean, product"):
        anomaly_map(_pairs(SHAPES), size=64, combine="add")
    with pytest.raises(ValueError, match="max, topk_mean"):
        image_score(torch.zeros(1, 1, 4, 4), mode="mean")


def test_level_weights_weight_each_level_of_both_heads():
    six = _pairs(SHAPES + SHAPES, seed=5)  # head 0 levels 1-3, then head 1 levels 1-3
    kept = [six[0], six[1], six[3], six[4]]
    dropped = anomaly_map(six, size=64, sigma=0, level_weights=(1, 1, 0))
    assert torch.allclose(dropped, anomaly_map(kept, size=64, sigma=0), atol=1e-5)
    halved = anomaly_map(six, size=64, sigma=0, level_weights=(1, 1, 0.5))
    assert torch.allclose(halved, dropped + 0.5 * anomaly_map([six[2], six[5]], size=64, sigma=0), atol=1e-5)
    assert torch.equal(anomaly_map(six, size=64, level_weights=(1, 1, 1)), anomaly_map(six, size=64))
    opposite = [(t, -t) for t, _ in six]
    for combine in ("sum", "mean", "product"):
        top = anomaly_map(opposite, size=64, combine=combine, level_weights=(1, 1, 0.5)).max()
        assert torch.isclose(top, torch.tensor(max_map_value(6, combine, (1, 1, 0.5))), rtol=1e-4)
    with pytest.raises(ValueError, match="level_weights"):
        anomaly_map(six, size=64, level_weights=(0, 0, 0))


def test_level_weights_config_is_checked():
    from recontrast.config import ConfigError, load_config

    assert load_config(None, ["eval.level_weights=[1, 1, 0.25]"]).eval.level_weights == (1.0, 1.0, 0.25)
    for bad in ("[1, -1, 1]", "[0, 0, 0]", "[1, 1]"):
        with pytest.raises(ConfigError, match="level_weights"):
            load_config(None, [f"eval.level_weights={bad}"])


@pytest.mark.parametrize("score_combine", ["map", "sum", "product"])
def test_the_image_score_comes_from_the_map_or_from_the_pairs_combined_another_way(score_combine):
    """eval.score_combine changes the score alone: the map stays the sum's; a score of the
    product is the maximum of the product map of the same pairs, not of the sum map."""
    pairs = _pairs(SHAPES, seed=3)
    cfg = EvalConfig(score_combine=score_combine, sigma=2.0, level_weights=(1.0, 0.5, 1.0))
    maps, scores = maps_and_scores(pairs, 64, cfg)
    summed = anomaly_map(pairs, 64, "sum", 2.0, (1.0, 0.5, 1.0))
    assert torch.equal(maps, summed)
    scored = anomaly_map(pairs, 64, "sum" if score_combine == "map" else score_combine, 2.0, (1.0, 0.5, 1.0))
    assert torch.equal(scores, image_score(scored, "max"))
    if score_combine == "product":  # another ranking basis, another scale
        assert not torch.allclose(scores, image_score(summed, "max"))
