"""The ReContrast network: two encoders, an RD4AD bottleneck, a de-ResNet decoder, two head sets.

Pure torch: no training logic, logging or files here (see docs/method.md, "Model").
`forward(x)` returns the (target, prediction) pairs the loss and the anomaly map consume.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import Bottleneck

from recontrast.backbones import create_encoder, pretrained_normalization
from recontrast.checkpoint import CheckpointError, load_checkpoint
from recontrast.config import Config, encoder_bn_mode, from_dict
from recontrast.images import IMAGENET_MEAN, IMAGENET_STD
from recontrast.runtime import autocast

Pairs = list[tuple[Tensor, Tensor]]
DECODER_BLOCKS = (3, 4, 6)  # de-Bottleneck blocks per stage: H/32->H/16, ->H/8, ->H/4


class PartialBatchNorm2d(nn.BatchNorm2d):
    """Train-mode BatchNorm that never divides by a near-zero batch variance (the "stable" BN).

    As the authors' code does (docs/method.md, "stable variant"): in training, a channel whose
    unbiased batch variance is not above v = min(pretrained running variance, var_thresh) is
    normalised with its batch mean and variance v, and v enters the running-variance update;
    the other channels are plain train-mode BN, their running variance updated with the
    unbiased batch variance. Eval mode is plain BN on the running statistics.
    `act`/`drop` carry timm's BatchNormAct2d activation when that is what was replaced.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, momentum: float = 0.1,
                 var_thresh: float = 5e-4, act: nn.Module | None = None,
                 drop: nn.Module | None = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.var_thresh = var_thresh
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        # Not persistent: state_dicts stay interchangeable with plain-BN models, and a model
        # resumed from a checkpoint still falls back to the variance it was built with.
        self.register_buffer("pretrained_var", torch.ones(num_features), persistent=False)

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, eps: float = 1e-6, var_thresh: float = 5e-4):
        """Returns a PartialBatchNorm2d carrying `bn`'s parameters, statistics and activation."""
        new = cls(bn.num_features, eps=eps, momentum=bn.momentum if bn.momentum else 0.1,
                  var_thresh=var_thresh, act=getattr(bn, "act", None), drop=getattr(bn, "drop", None))
        new = new.to(device=bn.running_var.device)
        with torch.no_grad():
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
            new.pretrained_var.copy_(bn.running_var)
        new.train(bn.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             False, 0.0, self.eps)
            return self.act(self.drop(y))
        xf = x.float()  # statistics in fp32 also under autocast
        mean = xf.mean(dim=(0, 2, 3))
        var = xf.var(dim=(0, 2, 3), unbiased=False)
        n = xf.numel() // xf.shape[1]  # values per channel
        unbiased = var.detach() * n / max(n - 1, 1)
        fallback = self.pretrained_var.clamp(max=self.var_thresh)  # v = min(pretrained var, 5e-4)
        low = unbiased <= fallback  # the authors test the unbiased variance: "not above v"
        scale = self.weight * torch.rsqrt(torch.where(low, fallback, var) + self.eps)
        y = (xf - mean[None, :, None, None]) * scale[None, :, None, None] + self.bias[None, :, None, None]
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(torch.where(low, fallback, unbiased), self.momentum)
            self.num_batches_tracked.add_(1)
        return self.act(self.drop(y.to(x.dtype)))


def convert_partial_bn(module: nn.Module) -> nn.Module:
    """Returns `module` with every BatchNorm2d (timm BatchNormAct2d too) made partial, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, PartialBatchNorm2d):
            setattr(module, name, PartialBatchNorm2d.from_bn(child))
        else:
            convert_partial_bn(child)
    return module


def _conv3x3_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class FusionBottleneck(nn.Module):
    """RD4AD's one-class bottleneck: fuses the 3 levels into one H/32 map of 2*c3*w channels.

    level1 -> 2x (conv3x3 s2, BN, ReLU); level2 -> conv3x3 s2, BN, ReLU; concat with level3
    (3*c3 ch at H/16); then 3 ResNet Bottleneck blocks (stride 2 at the first). The reference's
    unused 1x1 conv + BN is left out.
    """

    def __init__(self, channels: list[int], width_mult: float = 1.0, blocks: int = 3, pool: int = 1) -> None:
        super().__init__()
        self.pool = pool  # model.bottleneck_pool
        c1, c2, c3 = channels
        self.down1 = nn.Sequential(*_conv3x3_bn_relu(c1, c2), *_conv3x3_bn_relu(c2, c3))
        self.down2 = nn.Sequential(*_conv3x3_bn_relu(c2, c3))
        planes = max(1, round(c3 * width_mult / 2))  # WRN50: 512 -> width 1024, out 2048
        out = planes * Bottleneck.expansion
        shortcut = nn.Sequential(nn.Conv2d(3 * c3, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))
        layers = [Bottleneck(3 * c3, planes, stride=2, downsample=shortcut, base_width=128)]
        layers += [Bottleneck(out, planes, base_width=128) for _ in range(blocks - 1)]
        self.blocks = nn.Sequential(*layers)
        self.out_channels = out

    def forward(self, feats: list[Tensor]) -> Tensor:
        fused = torch.cat([self.down1(feats[0]), self.down2(feats[1]), feats[2]], dim=1)
        if self.pool == 1:
            return self.blocks(fused)
        # the blocks see a map `pool` times coarser; their output goes back to the size they give unpooled
        size = [(n - 1) // 2 + 1 for n in fused.shape[-2:]]
        coarse = self.blocks(F.avg_pool2d(fused, self.pool, ceil_mode=True))
        return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


class DeBottleneck(nn.Module):
    """A ResNet Bottleneck mirrored: the stride-2 3x3 conv becomes a 2x2 stride-2 transposed conv."""

    def __init__(self, cin: int, width: int, cout: int, upsample: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if upsample:
            self.conv2 = nn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if upsample:
            self.shortcut = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False),
                                          nn.BatchNorm2d(cout))
        elif cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class Decoder(nn.Module):
    """de-ResNet trunk: H/32 -> [H/4, H/8, H/16] maps (level order 1, 2, 3) of d_l channels.

    Stage widths mirror the encoder: stage l outputs d_l = c_l * width_mult channels with an
    inner width d_l / 2 (WRN50: 1024/512, 512/256, 256/128), 3/4/6 blocks from deep to shallow.
    """

    def __init__(self, cin: int, channels: list[int], width_mult: float = 1.0) -> None:
        super().__init__()
        self.out_channels = [max(1, round(c * width_mult)) for c in channels]
        stages = []
        for cout, n in zip(reversed(self.out_channels), DECODER_BLOCKS):
            width = max(1, cout // 2)
            blocks = [DeBottleneck(cin, width, cout, upsample=True)]
            blocks += [DeBottleneck(cout, width, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)  # deep (level 3) first

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[::-1]  # level 1 (H/4) first


class _RecomputedSequential(nn.Sequential):
    """An nn.Sequential that, when training with gradients, keeps only its input and runs
    again in backward (activation checkpointing). The second run sees the same batch
    statistics but leaves BN's running statistics alone, so weights, gradients and statistics
    equal those of a plain run; state_dict keys are unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, x, use_reentrant=False,
                              context_fn=lambda: (nullcontext(), _frozen_running_stats(self)))
        return super().forward(x)


def recompute_in_backward(module: nn.Module) -> None:
    """Makes every plain nn.Sequential child of `module` (ResNet layers, EfficientNet block
    stages, decoder stages) recompute its activations in backward."""
    for child in module.children():
        if type(child) is nn.Sequential:
            child.__class__ = _RecomputedSequential


@contextmanager
def _frozen_running_stats(module: nn.Module):
    """Train-mode BN inside normalises with batch statistics and leaves its running statistics
    and counters as they were (momentum 0 keeps the same ops, as checkpoint requires)."""
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class ReContrast(nn.Module):
    """Trainable + frozen encoder, shared bottleneck/decoder, one 1x1 head set per encoder.

    `forward(x)` (x: (B, 3, H, W), ImageNet-normalised) returns (target, prediction) pairs,
    each (B, C_l, H/s_l, W/s_l) for strides 4, 8, 16:
    - domain_adaptation on, contrast on (the paper): levels 1-3 of head 0 (predicted from the
      trainable-encoder half, target = frozen features), then levels 1-3 of head 1 (predicted
      from the frozen half, target = trainable features): 6 pairs;
    - contrast off: head 0 targets the trainable and head 1 the frozen features: 6 pairs;
    - domain_adaptation off: one frozen encoder, one head set, 3 pairs (RD4AD-like).
    Targets are returned as computed (trainable ones carry gradient); the loss detaches them.
    """

    def __init__(self, encoder: nn.Module, channels: list[int], *, domain_adaptation: bool = True,
                 contrast: bool = True, encoder_bn: str = "train", stable: bool = False,
                 width_mult: float = 1.0, channels_last: bool = False, recompute_decoder: bool = False,
                 recompute_encoder: bool = False, precision: str = "fp32", freeze_stem: bool = False,
                 depthwise_fp32: bool = False, bottleneck_pool: int = 1,
                 input_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> None:
        super().__init__()
        if encoder_bn not in ("train", "eval"):
            raise ValueError(f"encoder_bn must be 'train' or 'eval', got {encoder_bn!r}")
        self.channels = list(channels)
        self.domain_adaptation = domain_adaptation
        self.contrast = contrast
        self.encoder_bn = encoder_bn
        self.stable = stable
        self.channels_last = channels_last
        self.precision = precision  # train.precision: the autocast of every forward (runtime.autocast)

        self.encoder_frozen = copy.deepcopy(encoder) if domain_adaptation else encoder
        self.encoder_frozen.requires_grad_(False)
        self.encoder = encoder if domain_adaptation else None
        if self.encoder is not None and stable:
            convert_partial_bn(self.encoder)
        if depthwise_fp32:  # both encoders alike, so a shared stem and eval-mode agreement hold
            for enc in (self.encoder_frozen, self.encoder):
                if enc is not None:
                    depthwise_in_fp32(enc)
        # model.freeze_stem: the trainable encoder's stem keeps ImageNet's weights and statistics,
        # so both encoders share its output (computed once, or cached with train.cache_features).
        self.stem = StemSplit(self.encoder_frozen) if freeze_stem and self.encoder is not None else None
        if self.stem is not None:
            for m in self.stem.stem_modules(self.encoder):
                m.requires_grad_(False)

        self.bottleneck = FusionBottleneck(self.channels, width_mult, pool=bottleneck_pool)
        self.decoder = Decoder(self.bottleneck.out_channels, self.channels, width_mult)
        self.heads = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(d, c, 1) for d, c in zip(self.decoder.out_channels, self.channels))
            for _ in range(2 if domain_adaptation else 1)
        )
        _init_like_reference(self.bottleneck, self.decoder, self.heads)
        # Activation checkpointing (less peak memory, one more forward of what is recomputed).
        if recompute_decoder:
            recompute_in_backward(self.decoder.stages)
        if recompute_encoder and self.encoder is not None:
            recompute_in_backward(self.encoder)

        # The data layer normalises with ImageNet mean/std; weights trained with another
        # normalisation (EfficientNet-Lite: mean = std = 0.5) get their own input back:
        # x_own = x * scale + shift, with scale = std_in / std_own, shift = (mean_in - mean_own) / std_own.
        self._renorm = False
        if input_norm is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in input_norm)
            m_in = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            s_in = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            self._renorm = not (torch.allclose(mean, m_in) and torch.allclose(std, s_in))
            self.register_buffer("input_scale", s_in / std, persistent=False)
            self.register_buffer("input_shift", (m_in - mean) / std, persistent=False)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.train()

    def train(self, mode: bool = True) -> "ReContrast":
        """Sets train/eval mode; the frozen encoder stays in eval, and so does the trainable
        encoder's BN when encoder_bn == 'eval'."""
        super().train(mode)
        self.encoder_frozen.eval()
        if mode and self.encoder is not None and self.encoder_bn == "eval":
            for m in self.encoder.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        if self.stem is not None:
            for m in self.stem.stem_modules(self.encoder):
                m.eval()
        return self

    def forward(self, x: Tensor, frozen: list[Tensor] | None = None) -> Pairs:
        """`frozen`: the frozen encoder's features of `x` when already known (train.cache_features)."""
        with autocast(self.precision, x.device):
            return self._pairs(self._prepare(x), frozen)

    def frozen_features(self, x: Tensor) -> list[Tensor]:
        """Returns the frozen encoder's features of x, as forward computes them: its levels,
        then, with model.freeze_stem, the stem's output the trainable encoder continues from."""
        with autocast(self.precision, x.device):
            return self._frozen(self._prepare(x))

    def _frozen(self, x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            if self.stem is None:
                return self.encoder_frozen(x)
            stem = self.stem.head(self.encoder_frozen, x)
            return [*self.stem.tail(self.encoder_frozen, stem), stem]

    def _pairs(self, x: Tensor, frozen: list[Tensor] | None) -> Pairs:
        if frozen is None:
            frozen = self._frozen(x)
        if self.encoder is None:
            preds = [head(d) for head, d in zip(self.heads[0], self.decoder(self.bottleneck(frozen)))]
            return list(zip(frozen, preds))
        if self.stem is None:
            trained = self.encoder(x)
        else:
            frozen, stem = frozen[:len(self.channels)], frozen[len(self.channels)]
            trained = self.stem.tail(self.encoder, stem)
        # Both encoders' features in one batch of 2B: bottleneck and decoder BN share statistics.
        both = [torch.cat([t, f], dim=0) for t, f in zip(trained, frozen)]
        decoded = self.decoder(self.bottleneck(both))
        # (2B, C, H, W) -> trainable half (B, C, H, W), frozen half (B, C, H, W)
        halves = [rearrange(d, "(half b) c h w -> half b c h w", half=2) for d in decoded]
        pred0 = [head(d[0]) for head, d in zip(self.heads[0], halves)]
        pred1 = [head(d[1]) for head, d in zip(self.heads[1], halves)]
        target0, target1 = (frozen, trained) if self.contrast else (trained, frozen)
        return list(zip(target0, pred0)) + list(zip(target1, pred1))

    def anomaly_pairs(self, x: Tensor) -> Pairs:
        """Returns the forward pairs computed in eval mode without gradient (for anomaly maps);
        the module's train/eval mode is restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():  # maps and metrics in fp32 whatever the forward's precision
                return [(t.float(), p.float()) for t, p in self(x)]
        finally:
            self.train(was_training)

    def decoder_params(self) -> list[nn.Parameter]:
        """Returns bottleneck + decoder + head parameters (optimizer 1, lr 2e-3)."""
        return [*self.bottleneck.parameters(), *self.decoder.parameters(), *self.heads.parameters()]

    def encoder_params(self) -> list[nn.Parameter]:
        """Returns the trainable encoder's parameters (optimizer 2, lr 1e-5); [] without DA."""
        return [] if self.encoder is None else list(self.encoder.parameters())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Returns {'decoder': decoder_params(), 'encoder': encoder_params()}."""
        return {"decoder": self.decoder_params(), "encoder": self.encoder_params()}

    def _prepare(self, x: Tensor) -> Tensor:
        if self._renorm:
            x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class _Fp32OnCpu:
    """Mixin of a depthwise convolution that runs in fp32 when the CPU's autocast is on
    (train.depthwise_fp32): oneDNN's bf16 depthwise kernels, their backward above all, are
    slower than its fp32 channels-last ones (docs/speed.md). Elsewhere it is the plain layer."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return super().forward(x.float())


def mix_into(module: nn.Module, wanted, mixin: type) -> int:
    """Gives every submodule m of `module` with wanted(m) the class (mixin, type(m)), made once
    per class: its behaviour changes, its attributes, parameters and state_dict keys do not.
    Returns how many were changed (those already mixed are left as they are)."""
    count = 0
    for m in module.modules():
        if wanted(m) and not isinstance(m, mixin):
            base = type(m)
            if base not in _MIXED.setdefault(mixin, {}):
                _MIXED[mixin][base] = type(f"{mixin.__name__.strip('_')}{base.__name__}", (mixin, base), {})
            m.__class__ = _MIXED[mixin][base]
            count += 1
    return count


_MIXED: dict[type, dict[type, type]] = {}


def depthwise_in_fp32(module: nn.Module) -> int:
    """Makes every depthwise convolution in `module` a `_Fp32OnCpu` one; returns how many."""
    return mix_into(module, lambda m: isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels,
                    _Fp32OnCpu)


class StemSplit:
    """Where `model.freeze_stem` cuts an encoder: the stem (its leading layers whose input is at
    half the image's resolution or finer: EfficientNet's conv_stem, bn1, blocks.0 and blocks.1.0,
    ResNet's conv1, bn1, act1 and maxpool) and the rest. A timm FeatureListNet's top-level
    modules are its layers, each nn.Sequential stage split into its blocks; the cut is found by
    running a small image through the encoder once. `head` runs the stem, `tail` the rest,
    given the module to run (both encoders have the same structure)."""

    def __init__(self, encoder: nn.Module, size: int = 128) -> None:
        self.stages = list(encoder.keys())
        self.outputs = dict(encoder.return_layers)
        x, was_training = torch.zeros(1, 3, size, size), encoder.training
        encoder.eval()  # the probe leaves BN's running statistics alone
        try:
            with torch.no_grad():
                self.cut = self._find_cut(encoder, x, size)  # (stage, block): the first layer of the rest
        finally:
            encoder.train(was_training)
        inside = [name for name in self.stages[:self.cut[0]] if name in self.outputs]
        if inside:
            raise ValueError(f"model.freeze_stem: the feature level {inside[0]!r} lies inside the stem")

    def _find_cut(self, encoder: nn.Module, x: Tensor, size: int) -> tuple[int, int]:
        for i, name in enumerate(self.stages):
            for j, block in enumerate(self._blocks(encoder[name])):
                if x.shape[-1] * 4 <= size:
                    return i, j
                x = block(x)
        return len(self.stages), 0

    @staticmethod
    def _blocks(stage: nn.Module) -> list[nn.Module]:
        return list(stage.children()) if isinstance(stage, nn.Sequential) else [stage]

    def head(self, encoder: nn.Module, x: Tensor) -> Tensor:
        """Returns the stem's output of x (run as the caller's grad mode and BN mode say)."""
        for module in self.stem_modules(encoder):
            x = module(x)
        return x

    def tail(self, encoder: nn.Module, x: Tensor) -> list[Tensor]:
        """Returns the feature levels, given the stem's output x."""
        stage, block = self.cut
        feats = []
        for i, name in enumerate(self.stages[stage:], start=stage):
            if i == stage and block:  # the stage the cut falls in: its remaining blocks
                for b in self._blocks(encoder[name])[block:]:
                    x = b(x)
            else:
                x = encoder[name](x)
            if name in self.outputs:
                feats.append(x)
        return feats

    def stem_modules(self, encoder: nn.Module) -> list[nn.Module]:
        """Returns the modules of the stem."""
        stage, block = self.cut
        whole = [encoder[name] for name in self.stages[:stage]]
        return whole + (self._blocks(encoder[self.stages[stage]])[:block] if stage < len(self.stages) else [])


def _init_like_reference(*modules: nn.Module) -> None:
    """Kaiming-normal (fan_out) Conv2d weights and unit/zero BN, as RD4AD initialises them."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def build_model(cfg: Config) -> ReContrast:
    """Returns the ReContrast model that `cfg.model` (and `cfg.train.stable`, `.precision`) describe."""
    encoder, channels = create_encoder(cfg.model.backbone, cfg.model.pretrained)
    model = ReContrast(
        encoder,
        channels,
        domain_adaptation=cfg.model.domain_adaptation,
        contrast=cfg.model.contrast,
        encoder_bn=encoder_bn_mode(cfg),
        stable=cfg.train.stable,
        width_mult=cfg.model.width_mult,
        channels_last=cfg.model.channels_last,
        recompute_decoder=cfg.model.recompute_decoder,
        recompute_encoder=cfg.model.recompute_encoder,
        precision=cfg.train.precision,
        freeze_stem=cfg.model.freeze_stem,
        depthwise_fp32=cfg.train.depthwise_fp32,
        bottleneck_pool=cfg.model.bottleneck_pool,
        input_norm=pretrained_normalization(cfg.model.backbone),
    )
    if cfg.model.compile:
        compile_network(model)
    return model


def compile_network(model: ReContrast) -> ReContrast:
    """Compiles encoders, bottleneck, decoder and heads in place (torch.compile, model.compile):
    training and evaluation run the compiled code; parameters and state_dict keys are unchanged."""
    for part in (model.encoder_frozen, model.encoder, model.bottleneck, model.decoder):
        if part is not None:
            part.compile()
    return model


def load_model(path, device: str | torch.device = "cpu") -> tuple[ReContrast, Config, dict]:
    """Returns (model in eval mode, cfg, ckpt): the model rebuilt from a checkpoint's config.

    `model.pretrained` is forced to "none": every weight comes from the checkpoint, so
    evaluation and prediction never download anything.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    cfg = from_dict(ckpt["config"])
    cfg.model.pretrained = "none"
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"'{path}' does not match the model its config builds: {err}") from err
    return model.to(device).eval(), cfg, ckpt
