"""CPU runtimes for the inference graph: ONNX Runtime (fp32, int8) and OpenVINO (fp32, int8).

    graph = InferenceGraph(model, eval_cfg, 256)                        # torch: image -> map, score
    xml = write_model(graph, "last.int8.xml", "openvino", int8_batches=normal_batches)
    maps, scores = Session(xml, "openvino", threads=4).run(x)          # x: (B, 3, S, S)

write_model is the one way a graph becomes a file: fp32 ONNX first, then (int8_batches)
static int8 quantization (quantize_onnx_int8), then (openvino) the OpenVINO IR
(convert_openvino). The graph: input "image" (B, 3, S, S) ImageNet-normalised float32,
outputs "anomaly_map" (B, 1, S, S) and "score" (B,), both raw (uncalibrated); the caller's
metadata (calibration, settings) travels in the file. infer.Detector and export.export
decide what goes in (the checkpoint's weights, scoring settings and calibration).
onnxruntime, onnx and openvino are optional: they are imported where used, and a missing
one raises RuntimeMissing naming the extra that installs it.
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from recontrast.anomaly_map import maps_and_scores, max_map_value
from recontrast.config import EXPORT_RUNTIMES, ONNX, OPENVINO, RUNTIMES, TORCH, EvalConfig

# package -> the pyproject extra that installs it
EXTRAS = {"onnxruntime": "export", "onnx": "export", "openvino": "openvino"}
# Op types quantized to int8: the convolutions hold nearly all the compute. Everything else
# (BN folded into conv, ReLU, Add, Resize, the cosine's Mul/ReduceSum/Div) stays float.
QUANTIZED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


class RuntimeMissing(ImportError):
    """An optional runtime package is not installed."""

    def __init__(self, package: str, purpose: str = ""):
        extra = EXTRAS.get(package.split(".")[0], "export")
        what = f" ({purpose})" if purpose else ""
        super().__init__(f"{package} is not installed{what}: pip install -e '.[{extra}]'")
        self.package, self.extra = package, extra


def _require(module: str, purpose: str = "") -> ModuleType:
    """Returns the imported module, or raises RuntimeMissing naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        # Chain the cause only when the package is there but broken (a missing library).
        missing = err.name is None or err.name.split(".")[0] == module.split(".")[0]
        raise RuntimeMissing(module.split(".")[0], purpose) from (None if missing else err)


def check_runtime(runtime: str) -> str:
    """Returns `runtime` if it is one of RUNTIMES, else raises ValueError listing them."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    return runtime


# --- the graph and its files ---------------------------------------------------------------

# How write_model makes a file, recorded in it: a file made another way is written again.
RECIPE = "2: QDQ int8 (u8 activations per tensor, s8 weights per channel, minmax); float stems, depthwise convs, map head"
# The file each (runtime, int8) writes beside a checkpoint: last.ckpt -> last.int8.xml, ...
SUFFIXES = {(ONNX, False): ".onnx", (ONNX, True): ".int8.onnx",
            (OPENVINO, False): ".xml", (OPENVINO, True): ".int8.xml"}


class InferenceGraph(nn.Module):
    """image (B, 3, S, S) ImageNet-normalised -> (anomaly map (B, 1, S, S), raw score (B,))."""

    def __init__(self, model: nn.Module, eval_cfg: EvalConfig, image_size: int):
        super().__init__()
        self.model, self.eval_cfg, self.image_size = model.eval(), eval_cfg, image_size
        if hasattr(model, "precision"):
            model.precision = "fp32"  # an exported graph is fp32 (or int8): no autocast is traced into it

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return maps_and_scores(self.model(x), (self.image_size, self.image_size), self.eval_cfg)

    def map_max(self) -> float:
        """Returns the largest value a map can take (anomaly_map.max_map_value) for the number
        of pairs the model gives (counted on one small forward)."""
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            n_pairs = len(self.model(torch.zeros(1, 3, 64, 64, device=device)))
        return max_map_value(n_pairs, self.eval_cfg.combine, self.eval_cfg.level_weights)


def model_path(checkpoint: str | Path, runtime: str, int8: bool = False) -> Path:
    """Returns the file `runtime`'s model of `checkpoint` is written to by default, beside it:
    last.ckpt -> last.onnx, last.int8.onnx, last.xml (+ last.bin) or last.int8.xml."""
    if check_runtime(runtime) == TORCH:
        raise ValueError("runtime 'torch' runs the checkpoint itself: there is no file to write")
    return Path(checkpoint).with_suffix(SUFFIXES[runtime, bool(int8)])


def require_packages(runtime: str, int8: bool = False, write: bool = True) -> None:
    """Raises RuntimeMissing when a package that running `runtime`'s model needs (and with
    `write`, writing it: onnx, the quantizer for int8) is missing."""
    if runtime == OPENVINO:
        _require("openvino", "the openvino runtime")
    elif runtime == ONNX or int8:
        _require("onnxruntime", "the onnx runtime" if runtime == ONNX else "int8 quantization")
    if write:
        _require("onnx", "export")
    if write and int8:
        _require("onnxruntime.quantization", "int8 quantization")


def write_model(graph: InferenceGraph, out: str | Path, runtime: str = ONNX,
                int8_batches: Iterable[np.ndarray] | None = None,
                metadata: dict[str, str] | None = None) -> Path:
    """Returns `out`, the graph as `runtime`'s model: ONNX (.onnx) or OpenVINO IR (.xml + .bin),
    fp32, or int8 (static quantization, quantize_onnx_int8) calibrated on `int8_batches`
    ((B, 3, S, S) float32 normal images, preprocessed as the model's input).

    The file's metadata: `metadata` plus "recontrast.image_size", "recontrast.eval" (the
    scoring settings), "recontrast.map_max", "recontrast.precision" and "recontrast.recipe". Written in a
    temporary folder beside `out`, then renamed: a reader never sees half a model.
    """
    if check_runtime(runtime) == TORCH:
        raise ValueError("runtime 'torch' runs the checkpoint itself: there is no file to write")
    out = Path(out)
    if out.suffix != SUFFIXES[runtime, False]:
        raise ValueError(f"the {runtime} runtime's model is a {SUFFIXES[runtime, False]} file, not {out.name}")
    require_packages(runtime, int8_batches is not None)  # now, not after minutes of export
    e = graph.eval_cfg
    metadata = {**(metadata or {}), "recontrast.image_size": str(graph.image_size),
                "recontrast.eval": json.dumps(vars(e)), "recontrast.map_max": repr(graph.map_max()),
                "recontrast.precision": "fp32" if int8_batches is None else "int8", "recontrast.recipe": RECIPE}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        onnx_path = write_onnx(graph, Path(tmp) / "model.onnx", metadata)
        if int8_batches is not None:
            onnx_path = quantize_onnx_int8(onnx_path, Path(tmp) / "model.int8.onnx", int8_batches)
        if runtime == ONNX:
            os.replace(onnx_path, out)
        else:
            xml = convert_openvino(onnx_path, Path(tmp) / "ir.xml")
            os.replace(xml.with_suffix(".bin"), out.with_suffix(".bin"))  # the .xml names its .bin
            os.replace(xml, out)
    return out


def write_onnx(graph: InferenceGraph, out: str | Path, metadata: dict[str, str]) -> Path:
    """Returns `out`, the graph exported to ONNX (opset 17, dynamic batch axis) with `metadata`
    in its metadata_props."""
    onnx = _require("onnx", "export")
    size = graph.image_size
    dummy = torch.zeros(1, 3, size, size, device=next(graph.parameters()).device)
    kwargs = dict(input_names=["image"], output_names=["anomaly_map", "score"], opset_version=17,
                  dynamic_axes={"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # The dynamo exporter needs onnxscript (not a dependency); the TorchScript one
        # exports kornia's blur (reflect pad + conv) and timm/torchvision encoders as is.
        torch.onnx.export(graph.eval(), (dummy,), str(out), dynamo=False, **kwargs)
    proto = onnx.load(str(out))
    for key, value in metadata.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(proto, str(out))
    return Path(out)


# --- int8 ----------------------------------------------------------------------------------

def float_nodes(model) -> list[str]:
    """Returns the names of the ONNX nodes that int8 quantization leaves in float32: the map
    head, the stems (the first convolutions on the image) and the grouped (depthwise)
    convolutions."""
    return head_nodes(model) + stem_nodes(model) + grouped_nodes(model)


def grouped_nodes(model) -> list[str]:
    """Returns the names of the grouped convolutions (EfficientNet's depthwise ones).

    A depthwise convolution mixes no channels, so each output channel keeps its input
    channel's range, and those differ by orders of magnitude; one activation scale per
    tensor flattens the small ones. On the trained Lite0 bottle model (60 iterations), int8
    depthwise convolutions cost 1.2 AUPRO and 1.3 pixel-F1 points (score error up to 17 %,
    median 2.8 %); float ones 0.0 and 0.2 (up to 3.7 %, median 0.5 %). They are a small share
    of the FLOPs (one multiply per weight and pixel per channel).
    """
    def group(node) -> int:
        return next((a.i for a in node.attribute if a.name == "group"), 1)
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose") and group(n) > 1]


def head_nodes(model) -> list[str]:
    """Returns the names of the ONNX nodes that compute the anomaly map from the features.

    The head (cosine distance, upsampling, sum, Gaussian blur, max) turns feature errors into
    the map: its Convs are the blur, and int8 there would quantize the map itself. The
    TorchScript exporter names nodes by module scope: the network's nodes lie under
    "/model/" (InferenceGraph.model), the head's do not.
    """
    if not any(n.name.startswith("/model/") for n in model.graph.node):
        return _downstream_of_cosine(model)  # another exporter: find the head by its ops
    return [n.name for n in model.graph.node if not n.name.startswith("/model/")]


def _downstream_of_cosine(model) -> list[str]:
    """Returns the names of the nodes fed, directly or not, by a ReduceSum (the cosine's)."""
    tainted: set[str] = set()
    names: list[str] = []
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if node.op_type in ("ReduceSum", "ReduceL2") or tainted.intersection(node.input):
            tainted.update(node.output)
            names.append(node.name)
    return names


def stem_nodes(model) -> list[str]:
    """Returns the names of the first quantizable nodes on every path from the graph input.

    An int8 input re-quantizes the image on a grid that is not its own 8 bits: on resnet18
    (150 iterations) int8 stems tripled the score error (1.5e-2 vs 4.7e-3). The stems are
    a small share of the compute (3 input channels).
    """
    tainted = {i.name for i in model.graph.input}
    stems: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size") or not tainted.intersection(node.input):
            continue  # shapes carry no pixel values
        if node.op_type in QUANTIZED_OPS:
            stems.append(node.name)  # stop here: its output is a feature map, not the image
        else:
            tainted.update(node.output)
    return stems


def quantize_onnx_int8(fp32_path: str | Path, out_path: str | Path,
                       calibration_batches: Iterable[np.ndarray], method: str = "minmax") -> Path:
    """Returns `out_path`, an int8 ONNX model made by static quantization of `fp32_path`.

    calibration_batches: (B, 3, S, S) float32 ImageNet-normalised normal (training) images;
    a few dozen suffice. QDQ format, weights int8 per output channel, activations uint8 per
    tensor. Only the network's convolutions are quantized, less the stems (stem_nodes) and
    the depthwise ones (grouped_nodes); the map head (cosine, resize, blur, max) stays
    float32: the score is the max of a map of small distances. method: "minmax" (default), "percentile" or "entropy"; on the tiny
    model minmax and percentile came out alike (score error 4.7e-3 vs 5.2e-3).
    The model's metadata (calibration, image size) is kept.
    """
    onnx = _require("onnx", "int8 quantization")
    q = _require("onnxruntime.quantization", "int8 quantization")
    methods = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
               "entropy": q.CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"calibration method {method!r} is not one of {', '.join(methods)}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recontrast_q_") as tmp:
        # Shape inference + ORT's graph optimisations first (the quantizer warns without it).
        prepped = Path(tmp) / "prepped.onnx"
        q.quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        model = onnx.load(str(prepped))
        name = model.graph.input[0].name

        class Batches(q.CalibrationDataReader):
            def __init__(self):
                self.batches = iter(calibration_batches)

            def get_next(self):
                batch = next(self.batches, None)
                return None if batch is None else {name: np.ascontiguousarray(batch, np.float32)}

        q.quantize_static(
            str(prepped), str(out_path), Batches(),
            quant_format=q.QuantFormat.QDQ, per_channel=True,
            # u8 activations / s8 weights: ORT's x86 default, exact on VNNI CPUs; AVX2-only
            # CPUs can saturate u8 x s8 products (ORT documents reduce_range for those)
            activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=float_nodes(model),
            calibrate_method=methods[method],
        )
    return out_path


# --- OpenVINO ------------------------------------------------------------------------------

def convert_openvino(onnx_path: str | Path, out_xml: str | Path,
                     int8_calibration: Iterable[np.ndarray] | None = None) -> Path:
    """Returns `out_xml`, the OpenVINO IR (.xml + .bin) of the ONNX model at `onnx_path`.

    fp32 weights (compress_to_fp16=False: fp16 weights would move small distances). An int8
    ONNX model (quantize_onnx_int8) converts to an int8 IR: OpenVINO reads its QDQ pairs as
    FakeQuantize and runs those convolutions in int8. int8_calibration ((B, 3, S, S) normal
    batches) does that quantization on the way. The ONNX metadata (calibration, image size)
    lands in the IR's rt_info["framework"], where Session reads it.
    """
    ov = _require("openvino", "OpenVINO conversion")
    out_xml = Path(out_xml).with_suffix(".xml")
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recontrast_ov_") as tmp:
        if int8_calibration is not None:
            # One int8 recipe for both runtimes. NNCF (nncf.quantize) works too, but measured
            # less close to PyTorch on the tiny model (score error 7.3e-3 vs 5.2e-3), takes 3x
            # as long and is a heavy dependency.
            onnx_path = quantize_onnx_int8(onnx_path, Path(tmp) / "int8.onnx", int8_calibration)
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(out_xml), compress_to_fp16=False)
    return out_xml


# --- sessions ------------------------------------------------------------------------------

class Session:
    """An exported graph loaded in ONNX Runtime or OpenVINO: `.run(x) -> (maps, scores)`.

    path: .onnx for "onnx"; .xml (IR) or .onnx for "openvino". threads: intra-op threads
    (None: the runtime's default, all cores). "torch" is the checkpoint itself: infer.Detector.
    """

    def __init__(self, path: str | Path, runtime: str, threads: int | None = None):
        self.path, self.runtime, self.threads = Path(path), check_runtime(runtime), threads
        if runtime == TORCH:
            raise ValueError("runtime 'torch' runs the checkpoint in PyTorch (infer.Detector); "
                             f"Session loads exported graphs: {', '.join(EXPORT_RUNTIMES)}")
        if not self.path.is_file():
            raise FileNotFoundError(f"no exported model at {self.path}")
        if runtime == ONNX and self.path.suffix != ".onnx":
            raise ValueError(f"the onnx runtime loads .onnx files, not {self.path.name}")
        self.metadata: dict[str, str] = {}  # the export's "recontrast.*" entries (calibration)
        self._run = self._onnx() if runtime == ONNX else self._openvino()
        size = self.metadata.get("recontrast.image_size")
        self.image_size = int(size) if size else None  # the maps are drawn at this size

    def _onnx(self):
        ort = _require("onnxruntime", "the onnx runtime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(self.threads or 0)  # 0: one per physical core
        opts.inter_op_num_threads = 1  # the graph is a chain: no parallel branches worth threads
        sess = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        outs = _outputs([o.name for o in sess.get_outputs()])
        meta = sess.get_modelmeta().custom_metadata_map
        self.metadata = {k: v for k, v in meta.items() if k.startswith("recontrast.")}
        return lambda x: sess.run(outs, {name: x})

    def _openvino(self):
        ov = _require("openvino", "the openvino runtime")
        core = ov.Core()
        model = core.read_model(str(self.path))
        if model.has_rt_info("framework"):  # the ONNX metadata, from an .onnx or an IR
            info = model.get_rt_info("framework").astype(dict)
            self.metadata = {k: v.astype(str) for k, v in info.items() if k.startswith("recontrast.")}
        # f32 precision: on CPUs with bf16 (AVX512-BF16, AMX) OpenVINO would otherwise run
        # in bf16, 3 significant digits, far from the PyTorch maps.
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        names = [o.get_any_name() for o in compiled.outputs]
        outs = [compiled.outputs[names.index(n)] for n in _outputs(names)]

        def run(x):
            result = request.infer({0: x})
            # copies: the request reuses its output buffers on the next call
            return [np.array(result[o], copy=True) for o in outs]
        return run

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns raw maps (B, 1, S, S) and scores (B,), float32, for a (B, 3, S, S) batch."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        s = self.image_size or (x.shape[-1] if x.ndim == 4 else "S")
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"expected a (B, 3, {s}, {s}) ImageNet-normalised batch, got {x.shape}")
        maps, scores = self._run(x)
        return maps.astype(np.float32, copy=False), scores.astype(np.float32, copy=False).reshape(-1)


def _outputs(names: list[str]) -> list[str]:
    """Returns the names of the map and score outputs, by name, else the first two."""
    return ["anomaly_map", "score"] if {"anomaly_map", "score"} <= set(names) else names[:2]


__all__ = ["RUNTIMES", "InferenceGraph", "RuntimeMissing", "Session", "check_runtime", "convert_openvino",
           "float_nodes", "grouped_nodes", "model_path", "quantize_onnx_int8", "require_packages", "write_model", "write_onnx"]
