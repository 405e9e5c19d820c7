"""Behaviour of recontrast/backbones.py: levels, weight sources and their error messages."""
from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from recontrast import backbones
from recontrast.backbones import BackboneError, create_encoder, load_offline_lite

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_offline_lite0_weights_are_imagenet_weights():
    skdata = pytest.importorskip("skimage.data")
    model = load_offline_lite(0).eval()
    # The model's own preprocessing (TF weights: mean = std = 0.5, bicubic, crop 0.875).
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    x = transform(Image.fromarray(skdata.chelsea())).unsqueeze(0)
    with torch.no_grad():
        top5 = model(x).topk(5).indices[0].tolist()
    assert top5[0] in IMAGENET_CATS, top5
    assert sum(c in IMAGENET_CATS for c in top5) >= 2, top5


def test_offline_encoder_carries_the_classifier_weights():
    encoder, channels = create_encoder("tf_efficientnet_lite0", "offline")
    assert channels == [24, 40, 112]
    full = load_offline_lite("tf_efficientnet_lite0")
    assert torch.equal(encoder.conv_stem.weight, full.conv_stem.weight)
    assert torch.equal(encoder.blocks_4[-1].conv_pwl.weight, full.blocks[4][-1].conv_pwl.weight)
    feats = encoder.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4]
    assert not hasattr(encoder, "conv_head")  # stages after stride 16 are dropped


def test_offline_with_a_non_lite_backbone_is_refused():
    with pytest.raises(BackboneError, match="offline.*tf_efficientnet_lite0"):
        create_encoder("resnet18", "offline")


@pytest.mark.parametrize("name", backbones.SUPPORTED)
def test_supported_backbones_give_strides_4_8_16(name):
    encoder, channels = create_encoder(name, "none")
    assert channels == encoder.feature_info.channels()
    assert encoder.feature_info.reduction() == [4, 8, 16]
    if name.startswith("tf_efficientnet_lite0"):
        assert channels == [24, 40, 112]
    if name == "wide_resnet50_2":
        assert channels == [256, 512, 1024]
        assert not hasattr(encoder, "layer4")


def test_unknown_backbone_suggests_a_supported_name():
    with pytest.raises(BackboneError) as err:
        create_encoder("wide_resnet50", "none")
    msg = str(err.value)
    assert "did you mean 'wide_resnet50_2'" in msg
    assert "tf_efficientnet_lite0" in msg and "timm" in msg


def test_unknown_weight_source_suggests_one():
    with pytest.raises(BackboneError, match="did you mean 'offline'"):
        create_encoder("tf_efficientnet_lite0", "ofline")


def test_local_state_dict_loads_strictly(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)
    raw, wrapped = tmp_path / "raw.pth", tmp_path / "ckpt.pth"
    torch.save(source.state_dict(), raw)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, wrapped)
    for path in (raw, wrapped):
        encoder, _ = create_encoder("resnet18", str(path))
        assert torch.equal(encoder.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
        assert torch.equal(encoder.bn1.running_var, source.bn1.running_var)


def test_wrong_weights_file_lists_missing_and_unexpected_keys(tmp_path):
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    state.pop("layer2.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(BackboneError) as err:
        create_encoder("resnet18", str(path))
    msg = str(err.value)
    assert "1 missing keys: layer2.0.conv1.weight" in msg
    assert "1 unexpected keys: extra.weight" in msg

    other = tmp_path / "lite.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict(), other)
    with pytest.raises(BackboneError, match="missing keys: conv1.weight.*unexpected keys: conv_stem"):
        create_encoder("resnet18", str(other))


def test_timm_without_network_fails_fast_naming_alternatives(monkeypatch):
    def no_network(*args, **kwargs):
        time.sleep(0.05)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(backbones, "_cached_timm_weights", lambda name: None)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(BackboneError) as err:
        create_encoder("resnet18", "timm")
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "no network" in msg and "pretrained='offline'" in msg and "path" in msg


def test_timm_weights_found_in_the_cache_need_no_network(tmp_path, monkeypatch):
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18_cached.pth"
    torch.save(source.state_dict(), path)
    asked = []
    monkeypatch.setattr(backbones, "_cached_timm_weights", lambda name: asked.append(name) or str(path))
    monkeypatch.setattr(backbones, "_hub_reachable", lambda: pytest.fail("network checked"))
    encoder, _ = create_encoder("resnet18", "timm")
    assert asked == ["resnet18.tv_in1k"]  # torchvision's weights, as the reference uses
    assert torch.equal(encoder.conv1.weight, source.conv1.weight)


def test_lite_name_mapping_is_complete():
    """Every efficientnet_pytorch key of all three Lite files maps onto a timm key."""
    for variant in (1, 2):
        model = load_offline_lite(variant)  # raises on any missing/unexpected key
        assert np.isfinite(model.classifier.weight.detach().numpy()).all()
