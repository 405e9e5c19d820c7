"""Behaviour of recontrast/model.py: sizes, shapes, frozen encoder, switches, partial BN."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from recontrast.backbones import create_encoder
from recontrast.images import IMAGENET_MEAN, IMAGENET_STD
from recontrast.config import Config, LossConfig
from recontrast.loss import ReContrastLoss
from recontrast.model import PartialBatchNorm2d, ReContrast, build_model


def _model(backbone: str = "resnet18", seed: int = 0, **kw) -> ReContrast:
    torch.manual_seed(seed)
    encoder, channels = create_encoder(backbone, "none")
    return ReContrast(encoder, channels, **kw)


def _x(batch: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _train_steps(model: ReContrast, steps: int = 2) -> None:
    opts = [torch.optim.AdamW(model.decoder_params(), lr=1e-2)]
    if model.encoder_params():
        opts.append(torch.optim.AdamW(model.encoder_params(), lr=1e-2))
    loss_fn = ReContrastLoss(LossConfig(), total_iters=steps)
    model.train()
    for it in range(steps):
        loss, _ = loss_fn(model(_x(seed=it)), it)
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_wrn50_sizes_match_the_reference_and_six_pairs_at_256px():
    model = _model("wide_resnet50_2")
    assert _count(model.encoder) == 24_862_528
    assert _count(model.encoder_frozen) == 24_862_528
    assert _count(model.bottleneck) == 58_885_120
    assert _count(model.decoder) + _count(model.heads) == 27_673_600
    pairs = model.anomaly_pairs(_x(batch=1, size=256))
    expected = [(256, 64), (512, 32), (1024, 16)] * 2
    assert [(t.shape, p.shape) for t, p in pairs] == [
        (torch.Size([1, c, s, s]),) * 2 for c, s in expected
    ]


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0"])
@pytest.mark.parametrize("size", [64, 256])
def test_pair_shapes_for_small_backbones(backbone, size):
    model = _model(backbone)
    batch = 2 if size == 64 else 1
    pairs = model.anomaly_pairs(_x(batch, size))
    channels = [64, 128, 256] if backbone == "resnet18" else [24, 40, 112]
    assert model.channels == channels
    assert len(pairs) == 6
    for (t, p), c, stride in zip(pairs, channels * 2, [4, 8, 16] * 2):
        assert t.shape == p.shape == (batch, c, size // stride, size // stride)


def test_frozen_encoder_never_changes_and_trainable_one_adapts():
    model = _model()
    frozen, trainable = _state(model.encoder_frozen), _state(model.encoder)
    _train_steps(model)
    after = model.encoder_frozen.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # weights and BN statistics
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_frozen.parameters())
    assert not model.encoder_frozen.training
    changed = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, trainable[k])]
    assert any(k.endswith("conv1.weight") for k in changed)


def test_domain_adaptation_off_is_plain_reconstruction_of_the_frozen_encoder():
    model = _model(domain_adaptation=False)
    assert model.encoder is None and model.encoder_params() == [] and len(model.heads) == 1
    x = _x()
    pairs = model.anomaly_pairs(x)
    assert len(pairs) == 3
    with torch.no_grad():
        feats = model.encoder_frozen(x)
    for (t, _), f in zip(pairs, feats):
        torch.testing.assert_close(t, f)
    frozen = _state(model.encoder_frozen)
    _train_steps(model)
    assert all(torch.equal(v, frozen[k]) for k, v in model.encoder_frozen.state_dict().items())


def test_param_groups_cover_every_trainable_parameter_once():
    model = _model()
    groups = model.param_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in groups["encoder"]} == {id(p) for p in model.encoder.parameters()}


def test_contrast_switch_swaps_which_targets_each_head_reconstructs():
    on = _model(contrast=True)
    with torch.no_grad():  # make the two encoders differ
        for p in on.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    off = _model(contrast=False)
    off.load_state_dict(on.state_dict())
    x = _x()
    on.eval()
    with torch.no_grad():
        trained, frozen = on.encoder(x), on.encoder_frozen(x)
    pairs_on, pairs_off = on.anomaly_pairs(x), off.anomaly_pairs(x)
    for level in range(3):
        torch.testing.assert_close(pairs_on[level][0], frozen[level])
        torch.testing.assert_close(pairs_on[3 + level][0], trained[level])
        torch.testing.assert_close(pairs_off[level][0], trained[level])
        torch.testing.assert_close(pairs_off[3 + level][0], frozen[level])
    for (_, p_on), (_, p_off) in zip(pairs_on, pairs_off):  # same predictions, new targets
        torch.testing.assert_close(p_on, p_off)
    assert not torch.allclose(trained[0], frozen[0])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_encoder_bn_mode(mode):
    model = _model(encoder_bn=mode)
    model.train()
    bns = [m for m in model.encoder.modules() if isinstance(m, _BatchNorm)]
    assert all(m.training == (mode == "train") for m in bns)
    assert model.bottleneck.training and model.decoder.training
    before = _state(model.encoder)
    with torch.no_grad():
        model(_x())
    stats_same = all(
        torch.equal(v, before[k]) for k, v in model.encoder.state_dict().items() if "running" in k
    )
    assert stats_same == (mode == "eval")


def test_build_model_follows_the_config():
    cfg = Config()
    cfg.model.backbone, cfg.model.pretrained = "resnet18", "none"
    cfg.data.category = "grid"  # an encoder-BN-eval category of the authors
    model = build_model(cfg)
    assert model.encoder_bn == "eval" and model.contrast and model.domain_adaptation
    cfg.data.category, cfg.model.contrast, cfg.model.domain_adaptation = "bottle", False, False
    model = build_model(cfg)
    assert model.encoder_bn == "train" and not model.contrast and model.encoder is None
    cfg.model.domain_adaptation, cfg.train.stable = True, True
    model = build_model(cfg)
    assert model.stable and isinstance(model.encoder.bn1, PartialBatchNorm2d)


def test_stable_replaces_the_trainable_encoders_batchnorm_only():
    model = _model("tf_efficientnet_lite0", stable=True)
    ref = _model("tf_efficientnet_lite0")
    bns = [m for m in model.encoder.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(isinstance(m, PartialBatchNorm2d) and m.eps == 1e-6 for m in bns)
    assert not any(isinstance(m, PartialBatchNorm2d) for m in model.encoder_frozen.modules())
    assert not any(isinstance(m, PartialBatchNorm2d) for m in model.decoder.modules())
    # timm's BatchNormAct2d keeps its activation (ReLU6 in EfficientNet-Lite).
    acts = [type(m.act) for m in ref.encoder.modules() if isinstance(m, _BatchNorm)]
    assert [type(m.act) for m in bns] == acts and nn.ReLU6 in acts
    assert set(model.state_dict()) == set(ref.state_dict())  # checkpoints interchangeable


def test_partial_bn_falls_back_to_the_capped_pretrained_variance():
    """One layer, hand-made statistics, against the authors' rule: where the batch variance is
    below v = min(pretrained var, 5e-4), normalise with v and put v into the running variance;
    elsewhere plain BN with the UNBIASED batch variance in the running update."""
    bn = nn.BatchNorm2d(3, eps=1e-6, momentum=0.1)
    bn.running_var.copy_(torch.tensor([1.0, 1e-4, 1.0]))  # ch 0: v = 5e-4 (capped), ch 1: v = 1e-4
    partial = PartialBatchNorm2d.from_bn(bn).train()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 3.0 + 1e-3 * x[:, 0]  # batch variance ~1e-6 < 5e-4
    x[:, 1] = -1.0 + 1e-3 * x[:, 1]  # batch variance ~1e-6 < 1e-4
    y = partial(x)
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    n = 4 * 5 * 5
    v = torch.tensor([5e-4, 1e-4, float(var[2])])  # the authors' fallback: the CAPPED pretrained var
    expected = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(v.view(1, 3, 1, 1) + 1e-6)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    plain = nn.functional.batch_norm(x, None, None, training=True, eps=1e-6)
    torch.testing.assert_close(y[:, 2], plain[:, 2])  # a normal channel: plain batch norm
    running = torch.tensor([0.9 * 1.0 + 0.1 * 5e-4, 0.9 * 1e-4 + 0.1 * 1e-4, 0.9 * 1.0 + 0.1 * float(var[2]) * n / (n - 1)])
    torch.testing.assert_close(partial.running_var, running, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(partial.running_mean, 0.1 * mean, rtol=1e-6, atol=1e-7)


def test_stable_model_on_identical_images_stays_finite():
    model = _model(stable=True)
    image = torch.full((1, 3, 64, 64), 0.5)  # constant: many feature maps have zero variance
    pairs = model(image.expand(2, -1, -1, -1).contiguous())
    loss, _ = ReContrastLoss(LossConfig(), total_iters=10)(pairs, 0)
    loss.backward()
    for t, p in pairs:
        assert torch.isfinite(t).all() and torch.isfinite(p).all()
        assert t.abs().max() < 1e3 and p.abs().max() < 1e3
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_lite_input_is_renormalised_to_its_own_statistics():
    resnet = _model("resnet18")
    cfg = Config()
    cfg.model.backbone, cfg.model.pretrained = "tf_efficientnet_lite0", "none"
    lite = build_model(cfg)
    raw = torch.rand(1, 3, 8, 8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(lite._prepare((raw - mean) / std), (raw - 0.5) / 0.5)
    assert not resnet._renorm


def test_channels_last_gives_the_same_pairs():
    a, b = _model(), _model(channels_last=True)
    b.load_state_dict(a.state_dict())
    x = _x()
    for (ta, pa), (tb, pb) in zip(a.anomaly_pairs(x), b.anomaly_pairs(x)):
        torch.testing.assert_close(ta, tb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pa, pb, atol=1e-4, rtol=1e-4)


def test_anomaly_pairs_restores_the_training_mode():
    model = _model()
    model.train()
    pairs = model.anomaly_pairs(_x())
    assert model.training and model.bottleneck.training
    assert not model.encoder_frozen.training
    assert not any(p.requires_grad for pair in pairs for p in pair)


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0"])
def test_recomputed_activations_train_exactly_like_stored_ones(backbone):
    plain = _model(backbone)
    recomputed = _model(backbone, recompute_decoder=True, recompute_encoder=True)
    recomputed.load_state_dict(plain.state_dict())
    assert sum(type(m).__name__ == "_RecomputedSequential" for m in recomputed.modules()) >= 6
    _train_steps(plain)
    _train_steps(recomputed)
    a, b = _state(plain), _state(recomputed)
    assert a.keys() == b.keys()
    for key in a:  # weights, BN running statistics and counters alike
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    assert torch.equal(a["decoder.stages.2.0.bn1.num_batches_tracked"],
                       b["decoder.stages.2.0.bn1.num_batches_tracked"])


@pytest.mark.parametrize("backbone, stem", [
    ("tf_efficientnet_lite0", ["conv_stem", "bn1", "blocks_0", "blocks_1.0"]),
    ("resnet18", ["conv1", "bn1", "act1", "maxpool"]),
])
def test_freeze_stem_cuts_the_encoder_where_it_reaches_a_quarter_of_the_resolution(backbone, stem):
    model = _model(backbone, freeze_stem=True)
    names = {id(m): n for n, m in model.encoder.named_modules()}
    assert [names[id(m)] for m in model.stem.stem_modules(model.encoder)] == stem
    x = _x(size=64)
    # the stem's output is at a quarter of the image's resolution and the levels are unchanged
    out = model.stem.head(model.encoder_frozen, x)
    assert out.shape[-1] == 16
    assert all(torch.equal(a, b) for a, b in zip(model.stem.tail(model.encoder_frozen, out), model.encoder_frozen(x)))


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0"])
def test_freeze_stem_keeps_the_stem_at_its_imagenet_state_and_trains_the_rest(backbone):
    model = _model(backbone, freeze_stem=True)
    plain = _model(backbone)
    assert model.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay interchangeable
    stem = [n for n, m in model.encoder.named_modules() if m in model.stem.stem_modules(model.encoder)]
    before = _state(model.encoder)
    model.train()
    bns = [m for s in model.stem.stem_modules(model.encoder) for m in s.modules() if isinstance(m, _BatchNorm)]
    assert bns and not any(m.training for m in bns)  # ImageNet's statistics, as the frozen encoder's
    _train_steps(model)
    after = model.encoder.state_dict()
    in_stem = [k for k in before if any(k == s or k.startswith(s + ".") for s in stem)]
    assert in_stem and all(torch.equal(before[k], after[k]) for k in in_stem)  # weights and statistics
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in in_stem)
    # in eval mode the two encoders still agree exactly before training: the stem is shared
    fresh = _model(backbone, freeze_stem=True).eval()
    with torch.no_grad():
        pairs = fresh(_x())
    half = len(pairs) // 2
    assert all(torch.equal(t0, t1) for (t0, _), (t1, _) in zip(pairs[:half], pairs[half:]))


def test_depthwise_fp32_runs_only_the_depthwise_convolutions_in_fp32_under_cpu_autocast():
    plain = _model("tf_efficientnet_lite0", precision="bf16")
    fp32dw = _model("tf_efficientnet_lite0", precision="bf16", depthwise_fp32=True)
    assert plain.state_dict().keys() == fp32dw.state_dict().keys()
    swapped = [m for m in fp32dw.modules() if type(m).__name__.startswith("Fp32OnCpu")]
    assert swapped and all(m.groups == m.in_channels > 1 for m in swapped)
    assert len(swapped) == 2 * sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in plain.encoder.modules())
    assert not any(type(m).__name__.startswith("Fp32OnCpu") for m in _model(depthwise_fp32=True).modules())  # ResNet
    dtypes = {}
    for m in swapped[:2]:
        m.register_forward_hook(lambda mod, args, out: dtypes.__setitem__(id(mod), out.dtype))
    x = _x()
    with torch.no_grad():
        bf16 = [p.float() for _, p in fp32dw.eval()(x)]
        ref = [p.float() for _, p in plain.eval()(x)]
    assert set(dtypes.values()) == {torch.float32}
    for a, b in zip(bf16, ref):  # the same network; only the rounding of some layers differs
        assert torch.allclose(a, b, rtol=0.1, atol=0.1 * b.abs().max().item())
    plain.precision = fp32dw.precision = "fp32"  # without autocast the layers are the plain ones
    with torch.no_grad():
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fp32dw(x), plain(x)))


def test_bottleneck_pool_hides_where_in_a_pooling_cell_a_feature_is_and_keeps_every_shape_and_weight():
    plain, pooled = _model(seed=0), _model(seed=0, bottleneck_pool=2)
    assert plain.state_dict().keys() == pooled.state_dict().keys()  # checkpoints load either way
    pooled.load_state_dict(plain.state_dict())
    plain.eval(), pooled.eval()
    x = _x(size=96)  # level 3 at 6 x 6: three 2 x 2 pooling cells a side
    with torch.no_grad():
        assert [(t.shape, p.shape) for t, p in plain(x)] == [(t.shape, p.shape) for t, p in pooled(x)]
        feats = plain._frozen(plain._prepare(x))
        moved = [f.clone() for f in feats]  # level 3 goes into the fused map as it is:
        moved[2][..., 0, 0], moved[2][..., 0, 1] = feats[2][..., 0, 1], feats[2][..., 0, 0]  # swap in one cell
        for model, same in ((pooled, True), (plain, False)):
            a, b = model.bottleneck(feats), model.bottleneck(moved)
            assert a.shape == b.shape == (2, model.bottleneck.out_channels, 3, 3)
            assert torch.allclose(a, b, atol=1e-5) is same
    assert not torch.equal(plain.bottleneck(feats), pooled.bottleneck(feats))
