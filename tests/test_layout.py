"""recontrast/layout.py: the position spread of the training images, and the bottleneck code
train.pool_max_spread chooses with it before training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import one_thread
from recontrast import layout, pipeline, synthetic
from recontrast.config import Config, apply_overrides
from recontrast.data import build_datasets
from recontrast.model import build_model
from test_pipeline import lite_cfg


class Features:
    """A stand-in model whose frozen level LEVEL is the image itself (so the spread is known)."""

    def frozen_features(self, x):
        return [None, x, None]


def images(tensors):
    return [{"image": t} for t in tensors]


def brute_force(stack):
    """The spread from every feature at once, as the docstring defines it."""
    f = F.adaptive_avg_pool2d(stack.double(), (min(layout.GRID, stack.shape[2]), min(layout.GRID, stack.shape[3])))
    within = ((f - f.mean(0, keepdim=True)) ** 2).sum()
    total = ((f - f.mean((0, 2, 3), keepdim=True)) ** 2).sum()
    return float(within / total)


def test_the_spread_is_the_share_of_the_variance_within_each_position_streamed_in_batches():
    gen = torch.Generator().manual_seed(0)
    layout_ = torch.randn(3, 16, 16, generator=gen)
    fixed = layout_ + 0.1 * torch.randn(7, 3, 16, 16, generator=gen)  # one layout, a little noise
    anywhere = torch.stack([torch.roll(layout_, (int(dy), int(dx)), (1, 2))  # the same thing, moved anywhere
                            for dy, dx in torch.randint(0, 16, (7, 2), generator=gen)])
    for stack in (fixed, anywhere):
        assert layout.position_spread(Features(), images(stack), batch_size=3) == pytest.approx(brute_force(stack))
    assert layout.position_spread(Features(), images(fixed), 3) < 0.05 < 0.6 < layout.position_spread(
        Features(), images(anywhere), 3)
    assert layout.position_spread(Features(), images(fixed[:1]), 3) == 0.0  # one image: nothing varies
    assert layout.position_spread(Features(), images(torch.ones(4, 3, 8, 8)), 3) == 0.0  # nothing at all varies


def test_the_pretrained_encoder_sees_a_fixed_layout_and_not_the_same_images_in_any_pose(tmp_path):
    """The synthetic board (an object held in place) has a low spread; the same images turned by
    a quarter turn each, like screw's pose, a higher one; a texture a higher one again."""
    root = synthetic.generate(tmp_path, size=64, n_train=12, n_test_good=1, n_test_defect=1, seed=0,
                              categories=["board", "grain"])

    def spread(category, turn=False):
        cfg = apply_overrides(Config(), {"data.root": str(root), "data.category": category, "data.image_size": 64,
                                         "data.val_fraction": 0.0, "model.backbone": "tf_efficientnet_lite0",
                                         "model.pretrained": "offline", "model.width_mult": 1.0})
        train = build_datasets(cfg.data).train
        if turn:
            train = [{"image": torch.rot90(train[i]["image"], i % 4, (1, 2))} for i in range(len(train))]
        return layout.position_spread(build_model(cfg).eval(), train, 4)

    with one_thread():
        board, turned, grain = spread("board"), spread("board", turn=True), spread("grain")
    assert board < turned < grain and board < 0.5 < grain


def test_the_code_is_chosen_only_when_asked_for_and_the_coarse_one_only_below_the_limit(monkeypatch):
    measured = []

    def fake_spread(value):
        def spread(model, dataset, batch_size, device):
            measured.append(value)
            return value
        return spread

    asked = apply_overrides(Config(), {"model.bottleneck_pool": 2, "train.pool_fallback": True,
                                       "train.pool_max_spread": 0.5, "model.backbone": "tf_efficientnet_lite0",
                                       "model.pretrained": "none"})
    monkeypatch.setattr(layout, "position_spread", fake_spread(0.3))
    cfg, spread = layout.choose_bottleneck_pool(asked, [])
    assert cfg is asked and spread == 0.3
    monkeypatch.setattr(layout, "position_spread", fake_spread(0.8))
    cfg, spread = layout.choose_bottleneck_pool(asked, [])
    assert (cfg.model.bottleneck_pool, cfg.train.pool_fallback, spread) == (1, False, 0.8)
    assert asked.model.bottleneck_pool == 2  # the caller's config is left as it was
    assert len(measured) == 2
    for not_asked in ({"model.bottleneck_pool": 2}, {"train.pool_max_spread": 0.5}):  # 1.0, or nothing coarse
        assert layout.choose_bottleneck_pool(apply_overrides(Config(), not_asked), []) == (
            apply_overrides(Config(), not_asked), None)
    assert len(measured) == 2


def test_a_texture_trains_with_the_fine_code_and_the_run_says_why(weave_root, tmp_path, store, capsys):
    """`recontrast train` measures the spread, trains synthetic weave with bottleneck_pool 1, says
    so and records the spread (TrainResult, MLflow tag) beside the code it chose (MLflow param,
    checkpoint)."""
    from mlflow import MlflowClient

    from recontrast.checkpoint import load_checkpoint
    from recontrast.mlflow_store import read_run_id

    settings = {"model.bottleneck_pool": 2, "train.pool_fallback": True, "train.pool_max_spread": 0.4,
                "train.iters": 2, "tracking.enabled": True, "tracking.experiment": "spread"}
    with one_thread():
        result = pipeline.main_train(None, lite_cfg(weave_root, tmp_path / "run", **settings).flatten())
    assert result.position_spread > 0.4 and result.model.bottleneck.pool == 1
    said = capsys.readouterr().out
    assert f"position spread {result.position_spread:.3f} > train.pool_max_spread 0.4" in said
    assert "model.bottleneck_pool=1" in said
    run = MlflowClient(store).get_run(read_run_id(tmp_path / "run"))
    assert float(run.data.tags["position_spread"]) == pytest.approx(result.position_spread, abs=1e-4)
    assert run.data.params["model.bottleneck_pool"] == "1"
    assert load_checkpoint(result.checkpoint)["config"]["model"]["bottleneck_pool"] == 1
    with one_thread():  # a resume measures again, chooses the same code, and goes on
        more = pipeline.main_train(None, lite_cfg(weave_root, tmp_path / "run", **{**settings, "train.iters": 4}).flatten(),
                                   resume=True)
    assert more.iterations == 4 and more.model.bottleneck.pool == 1


@pytest.fixture(scope="module")
def weave_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("weave"), size=64, n_train=12, n_test_good=3,
                              n_test_defect=2, seed=0, categories=["weave"])
