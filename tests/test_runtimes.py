"""Exported graphs in ONNX Runtime and OpenVINO give PyTorch's maps and scores (fp32), int8
stays within its stated tolerance, and missing or unknown runtimes fail with clear errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import one_thread
from recontrast import runtimes
from recontrast.runtimes import RUNTIMES, RuntimeMissing, Session

FP32_ATOL = 1e-4  # absolute, on maps and scores (measured: 2e-6)
# int8 (weights per channel, activations per tensor: 256 levels, ~0.4 % of a tensor's range
# per layer, partly cancelling over ~20 layers): measured 0.3 % of the score on this model,
# 0.6 % on one trained 150 iterations; maps 0.6 % and 1.1 % of their maximum.
INT8_SCORE_RTOL = 0.01  # |score error| <= 1 % of the score
INT8_MAP_RTOL = 0.02  # |map error| <= 2 % of the largest map value


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """Returns (fp32 .onnx path, test images (B, 3, 64, 64), PyTorch maps, PyTorch scores,
    calibration batches of training images) of the session's tiny model (conftest)."""
    pytest.importorskip("onnxruntime")
    from recontrast.export import export
    from recontrast.infer import Detector

    datasets = tiny_model.datasets
    with one_thread():
        path = export(tiny_model.checkpoint, out=tmp_path_factory.mktemp("runtimes") / "model.onnx")
        x = torch.stack([datasets.test[i]["image"] for i in range(len(datasets.test))])
        maps, scores = Detector.load(tiny_model.checkpoint).raw(x)  # the torch runtime: raw maps and scores
    train_x = torch.stack([datasets.train[i]["image"] for i in range(len(datasets.train))]).numpy()
    batches = [train_x[i:i + 4] for i in range(0, len(train_x), 4)]
    return path, x.numpy(), maps.numpy(), scores.numpy(), batches


def test_onnx_and_openvino_fp32_match_pytorch(exported, tmp_path):
    path, x, maps, scores, _ = exported
    sessions = {"onnx": Session(path, "onnx", threads=1)}
    if _has("openvino"):
        xml = runtimes.convert_openvino(path, tmp_path / "model.xml")
        assert xml.with_suffix(".bin").is_file()
        sessions["openvino IR"] = Session(xml, "openvino", threads=1)
        sessions["openvino reading .onnx"] = Session(path, "openvino", threads=1)
    for name, session in sessions.items():
        got_maps, got_scores = session.run(x)
        assert got_maps.shape == (len(x), 1, 64, 64) and got_scores.shape == (len(x),), name
        assert got_maps.dtype == got_scores.dtype == np.float32
        np.testing.assert_allclose(got_maps, maps, rtol=0, atol=FP32_ATOL, err_msg=name)
        np.testing.assert_allclose(got_scores, scores, rtol=0, atol=FP32_ATOL, err_msg=name)
        # dynamic batch axis: one image alone gives its row of the batch
        np.testing.assert_allclose(session.run(x[1:2])[1], got_scores[1:2], rtol=0, atol=1e-6)
        # the export's metadata (calibration, image size) is readable from every runtime
        assert session.image_size == 64 and "recontrast.calibration" in session.metadata, name
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        sessions["onnx"].run(x[:, :, :32, :32])


@pytest.mark.slow
def test_int8_stays_within_tolerance_and_keeps_the_map_head_float(exported, tmp_path):
    import onnx

    path, x, maps, scores, batches = exported
    int8 = runtimes.quantize_onnx_int8(path, tmp_path / "model.int8.onnx", batches)
    graph = onnx.load(str(int8)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    int8_convs = {n.name for n in convs if n.input[0] in dequantized}  # int8 activations in
    assert len(int8_convs) > 0.8 * len(convs)
    # the blur convs (outside "/model/") and the stems (first convs on the image) stay float
    assert not any(not name.startswith("/model/") or name.endswith("encoder/conv1/Conv")
                   or name.endswith("encoder_frozen/conv1/Conv") for name in int8_convs)
    sessions = {"onnx int8": Session(int8, "onnx", threads=1)}
    if _has("openvino"):
        xml = runtimes.convert_openvino(int8, tmp_path / "model.int8.xml")
        sessions["openvino int8"] = Session(xml, "openvino", threads=1)
    for name, session in sessions.items():
        got_maps, got_scores = session.run(x)
        assert session.metadata["recontrast.image_size"] == "64", name
        np.testing.assert_array_less(np.abs(got_scores - scores), INT8_SCORE_RTOL * np.abs(scores), err_msg=name)
        assert np.abs(got_maps - maps).max() <= INT8_MAP_RTOL * np.abs(maps).max(), name
        assert not np.allclose(got_scores, scores, rtol=0, atol=1e-6), f"{name}: not quantized?"


def test_write_model_writes_each_runtime_file_whole_with_its_metadata(tmp_path):
    pytest.importorskip("onnxruntime")
    from recontrast.config import EvalConfig

    torch.manual_seed(0)
    model = _TinyPairs()
    graph = runtimes.InferenceGraph(model, EvalConfig(sigma=1.0), 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps, scores = graph(x)
    assert runtimes.model_path(tmp_path / "last.ckpt", "openvino", True).name == "last.int8.xml"
    kinds = [("onnx", False), ("onnx", True)] + ([("openvino", False)] if _has("openvino") else [])
    for runtime, int8 in kinds:
        out = runtimes.model_path(tmp_path / "last.ckpt", runtime, int8)
        batches = [x.numpy()] if int8 else None
        assert runtimes.write_model(graph, out, runtime, batches, {"recontrast.note": "kept"}) == out
        session = Session(out, runtime, threads=1)
        meta = session.metadata
        assert meta["recontrast.note"] == "kept" and meta["recontrast.precision"] == ("int8" if int8 else "fp32")
        assert meta["recontrast.recipe"] == runtimes.RECIPE
        assert float(meta["recontrast.map_max"]) == 2.0 * 2  # two pairs, combine "sum"
        assert session.image_size == 32
        got_maps, got_scores = session.run(x.numpy())
        atol = 0.02 * float(scores.abs().max()) if int8 else FP32_ATOL
        np.testing.assert_allclose(got_scores, scores.numpy(), rtol=0, atol=atol, err_msg=out.name)
    import onnx

    graph_proto = onnx.load(str(tmp_path / "last.int8.onnx")).graph
    dequantized = {o for n in graph_proto.node if n.op_type == "DequantizeLinear" for o in n.output}
    int8_convs = {n.name for n in graph_proto.node if n.op_type == "Conv" and n.input[0] in dequantized}
    assert any("/b/" in name for name in int8_convs)  # the 2x2 conv: quantized
    assert not any("depthwise" in name or "/a/" in name for name in int8_convs)  # depthwise and stem: float
    names = sorted(p.name for p in tmp_path.iterdir())  # no temporary folder left behind
    assert names == sorted(["last.onnx", "last.int8.onnx"] + (["last.xml", "last.bin"] if _has("openvino") else []))
    with pytest.raises(ValueError, match="openvino runtime's model is a .xml file, not m.onnx"):
        runtimes.write_model(graph, tmp_path / "m.onnx", "openvino")


class _TinyPairs(torch.nn.Module):
    """Two (target, prediction) pairs at strides 4 and 8: the shape of ReContrast's output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Conv2d(8, 8, 2, stride=2)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pa, self.pb = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        fa = torch.relu(self.depthwise(torch.relu(self.a(x))))
        fb = torch.relu(self.b(fa))
        return [(fa, self.pa(fa)), (fb, self.pb(fb))]


def test_a_missing_runtime_names_the_extra_that_installs_it(tmp_path, monkeypatch):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read: the import fails first")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(RuntimeMissing, match=r"openvino .*pip install -e '\.\[openvino\]'") as err:
        Session(model, "openvino")
    assert isinstance(err.value, ImportError) and "\n" not in str(err.value)
    with pytest.raises(RuntimeMissing, match=r"\[openvino\]"):
        runtimes.convert_openvino(model, tmp_path / "model.xml")
    for name in ("onnxruntime", "onnxruntime.quantization"):  # as if never installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeMissing, match=r"onnxruntime .*pip install -e '\.\[export\]'"):
        Session(model, "onnx")
    with pytest.raises(RuntimeMissing, match=r"\[export\]"):
        runtimes.quantize_onnx_int8(model, tmp_path / "q.onnx", [])


def test_the_module_imports_without_the_optional_packages():
    code = ("import sys\n"
            "for m in ('onnx', 'onnxruntime', 'openvino'): sys.modules[m] = None\n"
            "import recontrast.runtimes as r\n"
            "assert r.RUNTIMES == ('torch', 'onnx', 'openvino')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_unknown_runtime_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'; choose one of torch, onnx, openvino"):
        Session(tmp_path / "model.onnx", "tensorrt")
    assert RUNTIMES == ("torch", "onnx", "openvino")
    with pytest.raises(ValueError, match="infer.Detector"):
        Session(tmp_path / "model.onnx", "torch")  # the checkpoint itself, not an export
    with pytest.raises(FileNotFoundError, match="no exported model"):
        Session(tmp_path / "missing.onnx", "onnx")


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_a_coarse_bottleneck_code_exports_and_runs_as_pytorch_does(tmp_path):
    """model.bottleneck_pool adds an average pool and a bilinear resize to the graph: ONNX Runtime
    runs them as PyTorch does (an odd-sized map included: the pool's ceil mode, the resize's size)."""
    pytest.importorskip("onnxruntime")
    from recontrast.backbones import create_encoder
    from recontrast.config import EvalConfig
    from recontrast.model import ReContrast

    torch.manual_seed(0)
    encoder, channels = create_encoder("resnet18", "none")
    model = ReContrast(encoder, channels, bottleneck_pool=2).eval()
    graph = runtimes.InferenceGraph(model, EvalConfig(), 96)  # level 3 at 6 x 6, pooled to 3 x 3
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        maps, scores = graph(x)
    out = runtimes.write_model(graph, tmp_path / "last.onnx", "onnx", None, {})
    got_maps, got_scores = Session(out, "onnx", threads=1).run(x.numpy())
    np.testing.assert_allclose(got_maps, maps.numpy(), rtol=0, atol=FP32_ATOL)
    np.testing.assert_allclose(got_scores, scores.numpy(), rtol=0, atol=FP32_ATOL)
