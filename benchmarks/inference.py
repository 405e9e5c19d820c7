"""CPU inference per runtime, speed, memory and accuracy: `python benchmarks/inference.py`.

    python benchmarks/inference.py --checkpoint bench_out/recontrast/bottle/last.ckpt \\
        --backbones lite0,wrn50 --threads 2 --sections speed,accuracy

Runtimes: torch fp32 (the checkpoint in PyTorch), torch bf16 (torch.autocast, on CPUs with
avx512_bf16 or AMX), ONNX Runtime fp32 / int8 and OpenVINO fp32 / int8, each through
`recontrast.infer.Detector` (int8: static quantization calibrated on the checkpoint's own
training images). Backbones: lite0 is --checkpoint (the CPU recipe, trained; without it an
untrained one from experiments/cpu_default.yaml), wrn50 the paper's backbone with untrained
("none") weights, which speed does not depend on, written as a checkpoint under --out and
exported by the same code.

- speed and memory: img/s at each batch size. Each runtime runs in its own process, taking
  turns call by call with a torch fp32 process, so a machine loaded by other work slows both
  alike (thread pools of different runtimes never share a process); the ratio to torch fp32
  is the median of the per-round ratios. Peak MB: the runtime's process at that batch size
  (model loaded, inference included; the peak is reset before, /proc/self/clear_refs).
- accuracy: the checkpoint's test set through every runtime, metrics by recontrast.metrics
  (the code `recontrast evaluate` uses), and the largest score difference to torch fp32.
The CPU's instruction flags and the load average are printed beside the table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "mvtec_ad_256"
sys.path.insert(0, str(ROOT))

# name: (Detector runtime, int8, torch autocast bf16)
RUNTIMES = {
    "torch fp32": ("torch", False, False),
    "torch bf16": ("torch", False, True),
    "onnx fp32": ("onnx", False, False),
    "onnx int8": ("onnx", True, False),
    "openvino fp32": ("openvino", False, False),
    "openvino int8": ("openvino", True, False),
}
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1max")


def cpu_info() -> dict:
    """Returns the CPU model, the instruction flags that decide int8/bf16 speed, and the load."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(lines.get("flags\t\t", "").split())
    return {"model": lines.get("model name\t", "?").strip(), "cores": os.cpu_count(),
            "flags": {f: f in flags for f in FLAGS}, "loadavg": [round(v, 1) for v in os.getloadavg()]}


def _peak_mb() -> tuple[float, float]:
    """Returns (this process's peak RSS, its peak since the last reset (VmHWM)), in MB."""
    hwm = next((int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:")), 0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hwm / 1024


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


# --- checkpoints ---------------------------------------------------------------------------

def prepare_checkpoints(args, out: Path) -> dict[str, Path]:
    """Returns {backbone: checkpoint in `out`}: copies (exports land beside them, never beside
    the original) or, for wrn50 and a missing lite0 checkpoint, untrained ones."""
    from recontrast.checkpoint import FORMAT, save_checkpoint
    from recontrast.config import load_config
    from recontrast.model import build_model

    ckpts = {}
    for backbone in args.backbones:
        folder = out / backbone
        folder.mkdir(parents=True, exist_ok=True)
        ckpt = folder / "last.ckpt"
        if backbone == "lite0" and args.checkpoint:
            if not ckpt.exists() or ckpt.stat().st_mtime < Path(args.checkpoint).stat().st_mtime:
                shutil.copy(args.checkpoint, ckpt)
        elif not ckpt.exists():
            config = {"lite0": "experiments/cpu_default.yaml", "wrn50": "experiments/mvtec_paper.yaml"}[backbone]
            cfg = load_config(ROOT / config, ["model.pretrained=none", f"data.root={args.data}",
                                              "data.category=bottle", "data.image_size=256"])
            save_checkpoint(ckpt, {"format": FORMAT, "model": build_model(cfg).state_dict(), "iteration": 0,
                                   "config": cfg.to_dict(), "calibration": {}})
        ckpts[backbone] = ckpt
    return ckpts


def load_detector(ckpt: Path, name: str, threads: int, calibration_images: int):
    """Returns the Detector of runtime `name` (RUNTIMES), exporting its model on first use."""
    import torch

    from recontrast.infer import Detector

    runtime, int8, _ = RUNTIMES[name]
    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # untrained checkpoints are uncalibrated
        return Detector.load(ckpt, runtime=runtime, int8=int8, threads=threads,
                             calibration_images=calibration_images)


def export_model(ckpt: Path, name: str, threads: int, calibration_images: int) -> str:
    """Returns the runtime's name after writing its model beside the checkpoint (if missing)."""
    return load_detector(ckpt, name, threads, calibration_images).runtime


def raw(det, x, bf16: bool):
    """Returns det.raw(x) as float32, under bf16 autocast when asked."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        maps, scores = det.raw(x)
    return maps.float(), scores.float()


def test_images(ckpt: Path, n: int):
    """Returns n preprocessed test images (B, 3, S, S) of the checkpoint's category, spread
    over good and defect folders (random images when the data is missing)."""
    import torch

    from recontrast.checkpoint import load_checkpoint
    from recontrast.config import from_dict
    from recontrast.data import MVTecDataset

    cfg = from_dict(load_checkpoint(ckpt)["config"])
    try:
        test = MVTecDataset(cfg.data.root, cfg.data.category, "test", cfg.data.image_size)
    except Exception:  # noqa: BLE001 - speed does not depend on the pixels
        return torch.randn(n, 3, cfg.data.image_size, cfg.data.image_size)
    picks = [round(i * (len(test) - 1) / max(1, n - 1)) for i in range(n)]
    return torch.stack([test[i % len(test)]["image"] for i in picks])


# --- sections ------------------------------------------------------------------------------

def worker(conn, ckpt: Path, name: str, threads: int, calibration_images: int, batches: list[int]) -> None:
    """Serves one runtime in its own process: loads it, then runs what `conn` asks, one batch
    at a time ("warmup"/"run" bs -> seconds; "peak" -> MB; "stop")."""
    det = load_detector(ckpt, name, threads, calibration_images)
    images = test_images(ckpt, max(batches))
    bf16 = RUNTIMES[name][2]
    conn.send(_peak_mb())
    while True:
        cmd, bs = conn.recv()
        if cmd == "stop":
            return conn.close()
        if cmd == "peak":
            conn.send(_peak_mb())
            continue
        if cmd == "warmup":  # the first call compiles kernels; the peak from here is this batch's
            _reset_peak()
        t0 = time.perf_counter()
        raw(det, images[:bs], bf16)
        conn.send(time.perf_counter() - t0)


class Worker:
    """A runtime served by `worker` in a fresh process: `.time(cmd, bs)`, `.peak()`, `.stop()`."""

    def __init__(self, *args):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker, args=(child, *args), daemon=True)
        self.process.start()
        self.loaded = self.conn.recv()  # (peak MB, peak since reset MB) once loaded

    def ask(self, cmd: str, bs: int = 0):
        self.conn.send((cmd, bs))
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send(("stop", 0))
        self.process.join(60)


def speed(ckpt: Path, names: list[str], batches: list[int], threads: int, rounds: int,
          calibration_images: int) -> dict:
    """Returns {batch: {runtime: img/s, ratio to torch fp32, seconds, peak MB}}.

    Each runtime runs in its own process beside one torch fp32 process; the two take turns,
    one call at a time (the idle one waits on a pipe), so both see the same load, and the
    ratio is the median of the per-round ratios. Peak MB: the runtime's process, from its
    first call at that batch size (model loaded, inference included).
    """
    base = Worker(ckpt, "torch fp32", threads, calibration_images, batches)
    out: dict = {bs: {} for bs in batches}
    base_times: dict = {bs: [] for bs in batches}
    base_peak: dict = {}
    try:
        for name in [n for n in names if n != "torch fp32"]:
            other = Worker(ckpt, name, threads, calibration_images, batches)
            for bs in batches:
                if bs not in base_peak:
                    base.ask("warmup", bs)
                other.ask("warmup", bs)
                pairs = [(base.ask("run", bs), other.ask("run", bs)) for _ in range(rounds)]
                if bs not in base_peak:
                    base_peak[bs] = base.ask("peak")
                base_times[bs] += [b for b, _ in pairs]
                seconds = [o for _, o in pairs]
                _, batch_mb = other.ask("peak")
                out[bs][name] = {"img_per_s": bs / statistics.median(seconds),
                                 "ratio": statistics.median(b / o for b, o in pairs),
                                 "seconds": [round(o, 3) for o in seconds],
                                 "torch_fp32_seconds": [round(b, 3) for b, _ in pairs], "batch_peak_mb": batch_mb}
                print(f"[inference] {name} batch {bs}: {out[bs][name]['img_per_s']:.2f} img/s, "
                      f"{out[bs][name]['ratio']:.2f}x torch fp32 (turns {out[bs][name]['seconds']} vs "
                      f"{out[bs][name]['torch_fp32_seconds']} s), peak {batch_mb:.0f} MB", flush=True)
            other.stop()
        for bs in batches:
            if base_times[bs]:
                out[bs] = {"torch fp32": {"img_per_s": bs / statistics.median(base_times[bs]), "ratio": 1.0,
                                          "seconds": [round(b, 3) for b in base_times[bs]],
                                          "batch_peak_mb": base_peak[bs][1]}, **out[bs]}
    finally:
        base.stop()
    return out


def accuracy(ckpt: Path, names: list[str], threads: int, calibration_images: int) -> dict:
    """Returns {runtime: metrics (points), score differences to torch fp32} on the test set."""
    import numpy as np
    import torch

    from recontrast.checkpoint import load_checkpoint
    from recontrast.config import from_dict
    from recontrast.data import MVTecDataset
    from recontrast.metrics import PixelMetrics, compute_all

    cfg = from_dict(load_checkpoint(ckpt)["config"])
    test = MVTecDataset(cfg.data.root, cfg.data.category, "test", cfg.data.image_size)
    items = [test[i] for i in range(len(test))]
    labels = np.array([it["label"] for it in items])
    types = [it["defect_type"] for it in items]
    out, reference = {}, None
    for name in names:
        det = load_detector(ckpt, name, threads, calibration_images)
        pixel = PixelMetrics(det.eval_cfg.num_bins, det.eval_cfg.pro_fpr_limit)
        scores = []
        for start in range(0, len(items), 16):
            chunk = items[start:start + 16]
            maps, s = raw(det, torch.stack([it["image"] for it in chunk]), RUNTIMES[name][2])
            pixel.update(maps, torch.stack([it["mask"] for it in chunk]))
            scores.append(s.double().numpy())
        scores = np.concatenate(scores)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = compute_all(scores, labels, types, pixel)
        row = {k: 100 * float(metrics[k]) for k in METRICS}
        if reference is None:
            reference = (scores, row)
        row["max_abs_score_diff"] = float(np.abs(scores - reference[0]).max())
        row["max_rel_score_diff"] = float((np.abs(scores - reference[0]) / np.abs(reference[0])).max())
        row["delta_points"] = {k: row[k] - reference[1][k] for k in METRICS}
        out[name] = row
        print(f"[inference] accuracy {name}: " + ", ".join(f"{k} {row[k]:.2f}" for k in METRICS)
              + f", max |score diff| {row['max_abs_score_diff']:.2e} ({100 * row['max_rel_score_diff']:.2f} %)",
              flush=True)
        del det
    return out


def in_subprocess(fn, *args):
    """Returns fn(*args) computed in a fresh spawned process (its own peak RSS)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# --- report --------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    cpu = results["cpu"]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items())
    lines = [f"CPU: {cpu['model']}, {cpu['cores']} cores; {flags}",
             f"load average at start / end: {cpu['loadavg']} / {results.get('loadavg_end')}; "
             f"threads {results['threads']}; OMP_WAIT_POLICY {results['omp_wait_policy']}", ""]
    for backbone, res in results["backbones"].items():
        lines += [f"#### {backbone}", "", "| runtime | batch | img/s | x torch fp32 | peak MB |", "|---|---|---|---|---|"]
        for bs, rows in res.get("speed", {}).items():
            for name, r in rows.items():
                lines.append(f"| {name} | {bs} | {r['img_per_s']:.2f} | {r['ratio']:.2f} | {r['batch_peak_mb']:.0f} |")
        if res.get("accuracy"):
            lines += ["", "| runtime | " + " | ".join(METRICS) + " | max score diff |",
                      "|---|" + "---|" * (len(METRICS) + 1)]
            for name, r in res["accuracy"].items():
                cells = " | ".join(f"{r[k]:.2f} ({r['delta_points'][k]:+.2f})" for k in METRICS)
                lines.append(f"| {name} | {cells} | {r['max_abs_score_diff']:.1e} ({100 * r['max_rel_score_diff']:.2f} %) |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a trained Lite0 checkpoint (the lite0 rows)")
    parser.add_argument("--backbones", default="lite0,wrn50")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"any of {', '.join(RUNTIMES)}")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sections", default="speed,accuracy")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--data", default=str(SHARED), help="dataset root of the untrained checkpoints")
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "inference"))
    parser.add_argument("--omp-passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP threads sleep instead of spinning "
                             "(on a CPU shared with other work, spinning threads stall each other)")
    args = parser.parse_args()
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when a spawned worker loads torch
    args.backbones = args.backbones.split(",")
    names = args.runtimes.split(",")
    unknown = sorted(set(names) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtimes {unknown}; choose from {', '.join(RUNTIMES)}")
    batches = [int(b) for b in args.batches.split(",")]
    sections = args.sections.split(",")
    out = Path(args.out)
    results = {"cpu": cpu_info(), "threads": args.threads, "command": " ".join(sys.argv), "backbones": {},
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}
    print(f"[inference] cpu: {json.dumps(results['cpu'])}", flush=True)
    for backbone, ckpt in prepare_checkpoints(args, out).items():
        res = results["backbones"][backbone] = {"checkpoint": str(ckpt)}
        for name in names:  # export every model first, outside the timings
            in_subprocess(export_model, ckpt, name, args.threads, args.calibration_images)
        if "speed" in sections:
            res["speed"] = speed(ckpt, names, batches, args.threads, args.rounds, args.calibration_images)
        if "accuracy" in sections and (backbone == "lite0" and args.checkpoint):
            res["accuracy"] = in_subprocess(accuracy, ckpt, names, args.threads, args.calibration_images)
    results["loadavg_end"] = [round(v, 1) for v in os.getloadavg()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "inference.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
