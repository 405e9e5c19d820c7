"""Behaviour of recontrast/loss.py: hard-mining hook, stop-gradient, schedule, loss kinds."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recontrast.backbones import create_encoder
from recontrast.config import LossConfig
from recontrast.loss import ReContrastLoss, alpha_at


def _pair(seed: int = 0, shape=(2, 8, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    p = (t + 0.8 * torch.randn(shape, generator=g)).requires_grad_(True)
    return t, p


def _const_alpha(alpha: float, **kw) -> LossConfig:
    return LossConfig(alpha_start=alpha, alpha_end=alpha, **kw)


def test_alpha_schedule_paper_defaults():
    cfg = LossConfig()
    assert alpha_at(0, 2000) == -3.0
    assert alpha_at(100, 2000) == pytest.approx(-1.0)
    assert alpha_at(199, 2000) < 1.0
    assert alpha_at(200, 2000) == 1.0  # the knee at 10 % of training
    assert alpha_at(2000, 2000) == 1.0
    loss = ReContrastLoss(cfg, total_iters=2000)
    assert loss.alpha_at(0) == -3.0 and loss.alpha_at(1999) == 1.0


def test_alpha_warmup_floor_in_iterations():
    # 10 % of 100 iterations would be 10; the floor stretches the warm-up to 50.
    assert alpha_at(10, 100, warmup_fraction=0.1, warmup_min_iters=50) == pytest.approx(-3 + 4 * 10 / 50)
    assert alpha_at(50, 100, warmup_fraction=0.1, warmup_min_iters=50) == 1.0
    assert alpha_at(0, 100, warmup_fraction=0.0, warmup_min_iters=0) == 1.0


@pytest.mark.parametrize("factor", [0.0, 0.25])
def test_hook_scales_exactly_the_gradients_below_threshold(factor):
    alpha = 0.3
    t, p = _pair()
    pairs = [(t, p), _pair(1), _pair(2)]  # one hook per prediction
    total, info = ReContrastLoss(_const_alpha(alpha, factor=factor), 10)(pairs, 0)
    total.backward()
    assert info["alpha"] == alpha

    # Reference: the same loss without hook, masked by hand.
    q = p.detach().clone().requires_grad_(True)
    plain = (1 - F.cosine_similarity(t.flatten(1), q.flatten(1), dim=1)).mean()
    plain.backward()
    d = 1 - F.cosine_similarity(t, p.detach(), dim=1)
    easy = (d < d.mean() + alpha * d.std())[:, None].expand_as(q)
    expected = torch.where(easy, q.grad * factor, q.grad)
    assert 0 < easy.float().mean() < 1  # the test covers both sides of the threshold
    torch.testing.assert_close(p.grad, expected)
    if factor == 0.0:
        assert (p.grad[easy] == 0).all() and (p.grad[~easy] != 0).all()


def test_logged_loss_is_unmasked_global_cosine():
    t, p = _pair()
    expected = (1 - F.cosine_similarity(t.flatten(1), p.flatten(1), dim=1)).mean()
    for mining in (True, False):
        total, info = ReContrastLoss(LossConfig(hard_mining=mining), 10)([(t, p)] * 3, 0)
        torch.testing.assert_close(total, 3 * expected)
        torch.testing.assert_close(info["pair_losses"], expected.detach().repeat(3))


def test_hard_mining_off_leaves_gradient_untouched():
    t, p = _pair()
    ReContrastLoss(LossConfig(hard_mining=False), 10)([(t, p)] * 3, 0)[0].backward()
    q = p.detach().clone().requires_grad_(True)
    (3 * (1 - F.cosine_similarity(t.flatten(1), q.flatten(1), dim=1)).mean()).backward()
    torch.testing.assert_close(p.grad, q.grad)


def test_regional_and_global_differ():
    t, p = _pair(shape=(2, 8, 6, 6))
    p = p.detach()
    p[:, :, :3] *= 5.0  # magnitude differences weigh in the global cosine only
    glob, _ = ReContrastLoss(LossConfig(kind="global"), 10)([(t, p)] * 3, 0)
    reg, _ = ReContrastLoss(LossConfig(kind="regional"), 10)([(t, p)] * 3, 0)
    torch.testing.assert_close(reg, 3 * (1 - F.cosine_similarity(t, p, dim=1)).mean())
    assert not torch.isclose(glob, reg)


def test_total_weights_six_and_three_pairs():
    pairs = [_pair(seed) for seed in range(6)]
    loss = ReContrastLoss(LossConfig(), 10)
    six, info = loss(pairs, 0)
    torch.testing.assert_close(six, 0.5 * info["pair_losses"].sum())
    three, info3 = loss(pairs[:3], 0)
    torch.testing.assert_close(three, info3["pair_losses"].sum())
    with pytest.raises(ValueError, match="3 or 6"):
        loss(pairs[:2], 0)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_grad_controls_gradient_into_targets(stop_grad):
    t, p = _pair()
    t.requires_grad_(True)
    ReContrastLoss(LossConfig(stop_grad=stop_grad), 10)([(t, p)] * 3, 5)[0].backward()
    assert p.grad is not None
    if stop_grad:
        assert t.grad is None
    else:
        assert t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_grad_with_the_model(stop_grad):
    from recontrast.model import ReContrast

    torch.manual_seed(0)
    encoder, channels = create_encoder("resnet18", "none")
    model = ReContrast(encoder, channels)
    x = torch.randn(2, 3, 64, 64)

    def encoder_grad(pairs, cfg):
        model.zero_grad(set_to_none=True)
        ReContrastLoss(cfg, 10)(pairs, 0)[0].backward()
        assert all(p.grad is None for p in model.encoder_frozen.parameters())
        return torch.cat([p.grad.flatten() for p in model.encoder.parameters()])

    pairs = model(x)
    assert all(not t.requires_grad for t, _ in pairs[:3])  # frozen targets carry no graph
    assert all(t.requires_grad for t, _ in pairs[3:])  # returned undetached
    grad = encoder_grad(pairs, LossConfig(stop_grad=stop_grad))
    # Reference: targets detached by hand; the encoder learns through the bottleneck only.
    detached = [(t.detach(), p) for t, p in model(x)]
    through_bottleneck = encoder_grad(detached, LossConfig(stop_grad=False))
    assert through_bottleneck.abs().sum() > 0
    if stop_grad:
        torch.testing.assert_close(grad, through_bottleneck)
    else:  # the extra gradient reached the encoder through its targets
        assert not torch.allclose(grad, through_bottleneck)
