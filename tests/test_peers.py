"""benchmarks/peers.py: anomalib PaDiM / PatchCore on the offline Lite0 weights, scored by
recontrast.metrics. The scoring and import checks run everywhere; fitting the peers needs
the `peers` extra (anomalib) and skips without it."""
from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest
import torch

PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
SIZE = 64  # conftest's synthetic_root is 64 px


def _load():
    spec = importlib.util.spec_from_file_location("bench_peers", PEERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peers = _load()


needs_anomalib = pytest.mark.skipif(
    importlib.util.find_spec("anomalib") is None,
    reason="anomalib is not installed (benchmark-only extra: pip install -e .[peers])",
)


# --------------------------------------------------------------- no anomalib needed
def test_missing_anomalib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "anomalib", None)  # makes `import anomalib` fail
    with pytest.raises(peers.PeersUnavailable, match=r"pip install -e \.\[peers\]"):
        peers.require_anomalib()
    with pytest.raises(SystemExit, match=r"pip install -e \.\[peers\]"):
        peers.main(["--categories", "bottle", "--out", "/dev/null"])


def _oracle_batches(raw_offset: float):
    """Two batches whose scores and maps are the ground truth plus a large offset."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(2):
        labels = torch.tensor([0, 1, 0, 1])
        masks = torch.zeros(4, 1, 16, 16)
        masks[1, 0, 2:6, 3:9] = 1
        masks[3, 0, 10:14, 10:12] = 1
        masks[3, 0, 1:3, 1:3] = 1
        maps = raw_offset + 5.0 * masks + 0.1 * torch.rand(4, 1, 16, 16, generator=g)
        scores = raw_offset + 10.0 * labels + torch.rand(4, generator=g)
        types = ["good", "crack", "good", "hole" if b else "crack"]
        batches.append((scores, maps, masks, labels, types))
    return batches


@pytest.mark.parametrize("raw_offset", [0.0, 60.0])
def test_perfect_oracle_scores_one(raw_offset):
    """Scores of 60..71 would all be sigmoid(x) == 1.0 in float64 if read as logits (AUROC
    0.5); the project's metrics rank them, so the oracle reaches 1 everywhere."""
    m = peers.score_predictions(_oracle_batches(raw_offset), has_masks=True)
    for key in ("image_auroc", "image_ap", "image_f1max", "image_auroc_crack", "image_auroc_hole",
                "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"):
        assert m[key] == pytest.approx(1.0, abs=1e-9), key


def test_inverted_oracle_scores_zero():
    batches = [(-s, m, mask, lab, t) for s, m, mask, lab, t in _oracle_batches(60.0)]
    m = peers.score_predictions(batches, has_masks=False)
    assert m["image_auroc"] == pytest.approx(0.0)
    assert "pixel_auroc" not in m  # no masks: image metrics only


def test_table_lists_every_metric():
    rows = [{"category": "bottle", "method": "padim", "fit_seconds": 3.2, "predict_seconds": 1.0,
             "metrics": {k: 0.5 for k in peers.TABLE_METRICS}},
            {"category": "screw", "method": "patchcore", "fit_seconds": 9.0,
             "predict_seconds": 2.0, "metrics": {"image_auroc": 0.75}}]
    table = peers.format_table(rows)
    assert all(k in table.splitlines()[0] for k in peers.TABLE_METRICS)
    assert "| screw | patchcore | 0.7500 | - |" in table


# --------------------------------------------------------------- with anomalib
@pytest.fixture(scope="module")
def tiny(synthetic_root):
    return peers.load_category(synthetic_root, "weave", SIZE)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection attempt fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@needs_anomalib
def test_extractor_carries_the_offline_weights(no_network):
    from recontrast.backbones import create_encoder

    model = peers.build_peer("padim")
    encoder, _ = create_encoder(peers.BACKBONE, "offline")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    ours = encoder.eval()(x)
    theirs = model.feature_extractor(x)
    assert list(theirs) == list(peers.LAYERS["padim"])
    for a, b in zip(ours, theirs.values()):
        assert torch.equal(a, b)


@needs_anomalib
@pytest.mark.parametrize("method", peers.METHODS)
def test_peer_fits_and_predicts(method, tiny, no_network):
    batches = list(peers._batches(tiny.test, 8))
    model = peers.build_peer(method, seed=0)
    peers.fit_peer(model, method, [b["image"] for b in peers._batches(tiny.train, 8)],
                   coreset_ratio=0.05)
    scores, maps = peers.predict_peer(model, batches[0]["image"])
    n = len(batches[0]["label"])
    assert maps.shape == (n, 1, SIZE, SIZE)
    assert scores.shape == (n,)
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() > 0


@needs_anomalib
@pytest.mark.parametrize("method", peers.METHODS)
def test_fit_predict_is_deterministic(method, tiny, no_network):
    first = peers.fit_predict(method, tiny, image_size=SIZE, seed=3, coreset_ratio=0.05)
    again = peers.fit_predict(method, tiny, image_size=SIZE, seed=3, coreset_ratio=0.05)
    assert first["metrics"] == again["metrics"]
    m = first["metrics"]
    assert first["n_train"] == len(tiny.train) and first["n_test"] == len(tiny.test)
    assert first["fit_seconds"] > 0 and first["predict_seconds"] > 0
    for key in ("image_auroc", "image_ap", "pixel_auroc", "aupro"):
        assert 0.0 <= m[key] <= 1.0, key
    assert any(k.startswith("image_auroc_") for k in m)
    if method == "patchcore":
        assert first["coreset_size"] == int(0.05 * first["bank_size"])


def test_wrong_image_size_is_refused(tiny):  # checked before anomalib is needed
    with pytest.raises(ValueError, match="data.image_size=256"):
        peers.fit_predict("padim", tiny, image_size=256)


def test_category_without_masks_gets_image_metrics_only(synthetic_root, tmp_path):
    """Like shared/'s screw copy: test/<type> images, no ground_truth folder."""
    import shutil

    shutil.copytree(synthetic_root / "bar", tmp_path / "bar")
    shutil.rmtree(tmp_path / "bar" / "ground_truth")
    data = peers.load_category(tmp_path, "bar", SIZE)
    assert data.test.has_masks is False
    labels = [data.test[i]["label"] for i in range(len(data.test))]
    assert 0 in labels and 1 in labels
    assert len(data.train) == len(peers.load_category(synthetic_root, "bar", SIZE).train)
