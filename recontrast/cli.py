"""The `recontrast` command: synth, train, evaluate, predict, export, batch, register, runs, demo.

Each subcommand parses its flags and calls one library function; no method logic lives here.
Heavy imports happen inside the handlers so `recontrast --help` stays fast.

Every failure ends in one bounded line, `recontrast <command>: <what and the fix>`, and a
non-zero exit status; `--debug` (or RECONTRAST_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from recontrast.config import EXPORT_RUNTIMES, ONNX, RUNTIMES, TORCH, ConfigError

MAX_MESSAGE = 600  # characters of an error message shown: the start (what) and the end (the fix)


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """Returns `text` on one line, at most `limit` characters: its start and end are kept."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    tail, gap = limit // 3, 40  # the gap holds " [... N characters ...] "
    cut = len(text) - limit + gap
    return f"{text[:limit - tail - gap]} [... {cut} characters ...] {text[-tail:]}"


# ----------------------------------------------------------------------------- flag types
def _flag_type(name: str, check, expected: str):
    """Returns an argparse `type` that converts with `check` and names `expected` on failure."""
    def convert(text: str):
        try:
            value = check(text)
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"{one_line(repr(text), 80)} is not {expected}")
        return value
    convert.__name__ = name
    return convert


def _int_at_least(low: int):
    return lambda text: int(text) if int(text) >= low else None


def _finite_at_least(low: float):
    return lambda text: float(text) if math.isfinite(float(text)) and float(text) >= low else None


def _threshold(text: str):
    if text in ("normal", "f1"):
        return text
    value = float(text)
    return text if math.isfinite(value) else None


def _image_size(text: str):
    value = int(text)
    return value if value > 0 and value % 32 == 0 else None


POSITIVE = _flag_type("positive_int", _int_at_least(1), "a positive integer")
NON_NEGATIVE = _flag_type("non_negative_int", _int_at_least(0), "an integer >= 0")
SECONDS = _flag_type("seconds", _finite_at_least(0.0), "a number of seconds >= 0")
THRESHOLD = _flag_type("threshold", _threshold, "'normal', 'f1' or a finite number (a raw score)")
IMAGE_SIZE = _flag_type("image_size", _image_size, "a positive multiple of 32 (e.g. 224 or 256)")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of the command."""

    def error(self, message: str):
        raise SystemExit(f"{self.prog}: {one_line(message)} (see {self.prog} --help)")


def _synth(args: argparse.Namespace) -> None:
    from recontrast import synthetic

    root = synthetic.generate(
        args.out, size=args.size, n_train=args.n_train, seed=args.seed, categories=args.categories
    )
    print(synthetic.format_summary(synthetic.summarize(root)))
    print(f"synthetic dataset written to {root}")


def _print_config(args: argparse.Namespace) -> None:
    """Prints the resolved config as YAML, then what each override changed, in order."""
    from recontrast.config import config_diff, load_config

    overrides = [*args.set, *([f"train.out={args.out}"] if args.out else [])]
    cfg = load_config(args.config, overrides)
    print(cfg.to_yaml().rstrip())
    print(f"# {args.config}" + (", then each override:" if overrides else ", no override"))
    before = load_config(args.config)
    for i, override in enumerate(overrides):
        after = load_config(args.config, overrides[:i + 1])
        changed = config_diff(before, after)
        what = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        print(f"#   {override}: {what or 'no change (the value was already so)'}")
        before = after


def _train(args: argparse.Namespace) -> None:
    from recontrast.pipeline import main_train

    if args.print_config:
        _print_config(args)
        return
    main_train(args.config, args.set, out=args.out, resume=args.resume, track=not args.no_track,
               evaluate=True)


def _model_checkpoint(args: argparse.Namespace, folder: Path) -> str:
    """Returns --checkpoint, or the checkpoint of --model when it names an MLflow model
    (models:/<name>/<version>, a run id), downloaded into `folder`."""
    from recontrast.mlflow_model import is_model_reference, model_checkpoint

    if is_model_reference(args.model):
        if args.checkpoint:
            raise ConfigError(f"give --checkpoint or --model {args.model}, not both")
        checkpoint = model_checkpoint(args.model, folder)
        print(f"{args.model}: {checkpoint}")
        args.model = None
        return str(checkpoint)
    if not args.checkpoint:
        raise ConfigError("give --checkpoint <file.ckpt> or --model models:/<name>/<version> (or a run id)")
    return args.checkpoint


def _evaluate(args: argparse.Namespace) -> None:
    from recontrast.pipeline import run_evaluation

    with tempfile.TemporaryDirectory(prefix="recontrast-model-") as tmp:  # a downloaded model's weights
        run_evaluation(
            _model_checkpoint(args, Path(tmp)), data_root=args.data, category=args.category, out=args.out,
            overrides=args.set, track=not args.no_track,
        )


def _predict(args: argparse.Namespace) -> None:
    from recontrast.infer import main_predict

    checkpoint = _model_checkpoint(args, Path(args.out) / "model")
    rows = main_predict(checkpoint, args.inputs, out=args.out, threshold=args.threshold,
                        runtime=args.runtime, int8=args.int8, model_path=args.model, threads=args.threads,
                        data_root=args.data)
    if not any(not r.get("error") for r in rows):  # a script must see that nothing was scored
        sys.exit(f"recontrast predict: none of the {len(rows)} input image(s) could be read, nothing was "
                 f"scored (reasons in {Path(args.out) / 'predictions.csv'})")


def _export(args: argparse.Namespace) -> None:
    from recontrast.export import export

    runtime = args.runtime or args.format or ONNX
    if args.format and args.runtime and args.format != args.runtime:
        raise ValueError(f"--format {args.format} (the former name of --runtime onnx) contradicts --runtime {args.runtime}")
    path = export(args.checkpoint, out=args.out, image_size=args.image_size, runtime=runtime, int8=args.int8,
                  calibration_images=args.calibration_images, data_root=args.data)
    print(f"exported the {runtime}{' int8' if args.int8 else ''} model to {path}")


def _batch(args: argparse.Namespace) -> None:
    from recontrast.batch import run_study
    from recontrast.ray_executor import RayOptions

    if args.executor != "ray" and (args.address or args.cpus_per_pair or args.gpus_per_pair is not None):
        raise ConfigError("--address, --cpus-per-pair and --gpus-per-pair need --executor ray")
    ray = (RayOptions(args.address, args.cpus_per_pair, args.gpus_per_pair, args.max_retries, args.ray_timeout)
           if args.executor == "ray" else None)
    report = run_study(
        args.study, categories=args.categories, jobs=args.jobs, force=args.force,
        overrides=args.set, variants=args.variants, register=args.register, ray=ray,
        compare=not args.no_compare,
    )
    sys.exit(0 if report.ok else 1)


def _register(args: argparse.Namespace) -> None:
    from recontrast.mlflow_model import RUN_ID, find_run_by_name, register

    run_id = args.run if RUN_ID.match(args.run) else find_run_by_name(args.run, args.study)
    version = register(run_id, args.name)
    print(f"registered run {run_id}'s model as models:/{version.name}/{version.version}")


def _runs(args: argparse.Namespace) -> None:
    from recontrast.mlflow_store import fix_stale_runs

    fixed = fix_stale_runs(older_than_s=args.older_than)
    print(f"marked {len(fixed)} stale RUNNING run(s) as FAILED" + (": " + ", ".join(fixed) if fixed else ""))


def _demo(args: argparse.Namespace) -> None:
    from recontrast.demo import run_demo

    run_demo(quick=args.quick)


def _version() -> str:
    """Returns the installed distribution's version (the package's own when not installed)."""
    from recontrast import __version__

    try:
        return metadata.version("recontrast")
    except metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recontrast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"recontrast {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or RECONTRAST_DEBUG=1)")
    parser.add_argument("--root", default=None, metavar="FOLDER",
                        help="the project root: runs, the MLflow store and relative data paths (or "
                             "RECONTRAST_ROOT; default: the recontrast checkout holding the working directory, "
                             "else the working directory)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error (or RECONTRAST_DEBUG=1)")
        p.add_argument("--root", default=argparse.SUPPRESS, metavar="FOLDER", help="the project root (see recontrast --help)")
        return p

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="dotted config overrides, e.g. train.iters=500")

    p = add("synth", _synth, "write the synthetic MVTec-layout dataset")
    p.add_argument("--out", default="data/synthetic")
    p.add_argument("--size", type=POSITIVE, default=256)
    p.add_argument("--n-train", type=POSITIVE, default=200)
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--categories", nargs="*", default=None)

    p = add("train", _train, "train one model (one category)")
    p.add_argument("--config", required=True)
    overrides(p)
    p.add_argument("--out", default=None, help="run folder (overrides train.out)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.ckpt")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and what each override changed, then stop (trains nothing)")

    p = add("evaluate", _evaluate, "evaluate a checkpoint (or an MLflow model) on a test split")
    p.add_argument("--checkpoint", default=None, help="a checkpoint file (last.ckpt, best.ckpt)")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="instead of --checkpoint: an MLflow model, models:/<name>/<version> (registered), "
                        "models:/<model id>, or a training run's id")
    p.add_argument("--data", default=None, help="dataset root (default: the checkpoint's)")
    p.add_argument("--category", default=None)
    p.add_argument("--out", default=None, help="folder for metrics and figures")
    overrides(p)
    p.add_argument("--no-track", action="store_true")

    p = add("predict", _predict, "score new images with a trained checkpoint or an MLflow model")
    p.add_argument("--checkpoint", default=None, help="a checkpoint file (last.ckpt, best.ckpt)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", default="preds")
    p.add_argument("--threshold", type=THRESHOLD, default="normal",
                   help="'normal' (from good images only), 'f1' or a number")
    p.add_argument("--runtime", default=TORCH, choices=RUNTIMES,
                   help="what runs the model: PyTorch, ONNX Runtime or OpenVINO (CPU; the model is "
                        "exported beside the checkpoint on first use)")
    p.add_argument("--int8", action="store_true",
                   help="the int8 model (onnx/openvino), calibrated on the checkpoint's training images")
    p.add_argument("--model", default=None,
                   help="an MLflow model instead of --checkpoint: models:/<name>/<version> (registered), "
                        "models:/<model id> or a training run's id (downloaded into <out>/model); or, with "
                        "--checkpoint, an exported model to run (from `recontrast export`)")
    p.add_argument("--threads", type=POSITIVE, default=None, help="onnx/openvino threads (default: all cores)")
    p.add_argument("--data", default=None, help="dataset root of the int8 calibration images (default: the checkpoint's)")

    p = add("export", _export, "export the inference graph (image -> map + score)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--runtime", default=None, choices=EXPORT_RUNTIMES,
                   help="onnx: an .onnx file (ONNX Runtime); openvino: an OpenVINO IR (.xml + .bin)")
    p.add_argument("--format", default=None, choices=[ONNX], help="the former name of --runtime onnx")
    p.add_argument("--int8", action="store_true",
                   help="static int8 quantization, calibrated on the checkpoint's normal training images")
    p.add_argument("--calibration-images", type=POSITIVE, default=64,
                   help="training images the int8 calibration uses (evenly spread)")
    p.add_argument("--data", default=None, help="dataset root of those images (default: the checkpoint's)")
    p.add_argument("--out", default=None,
                   help="file to write (default beside the checkpoint: last.onnx, last.int8.onnx, last.xml, ...)")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=None,
                   help="default: the size the checkpoint was calibrated (or trained) at")

    p = add("batch", _batch, "run a study: papermill executions per (variant, category), then the "
                             "comparison (notebook 04, the delta table, the MLflow UI link)")
    p.add_argument("--study", required=True, help="a study file: a config with a study: section (experiments/*.yaml)")
    p.add_argument("--categories", nargs="*", default=["all"],
                   help="the categories to run (default: all of the study's study.categories)")
    p.add_argument("--variants", nargs="*", default=None,
                   help="the variants to run (default: all of the study's study.variants)")
    p.add_argument("--jobs", type=POSITIVE, default=1,
                   help="pairs run at once (one process each, GPUs shared round-robin)")
    p.add_argument("--force", action="store_true", help="redo finished (variant, category) pairs")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: processes on this machine (--jobs at once); ray: one Ray task per pair "
                        "(pip install -e '.[cluster]'; docs/scaling.md)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto': the one `ray start` runs here; host:port); "
                        "default: a local Ray instance with the CPUs of --jobs pairs")
    p.add_argument("--cpus-per-pair", type=float, default=None,
                   help="Ray CPUs per pair (default: the study's study.resources.cpus, else 1)")
    p.add_argument("--gpus-per-pair", type=float, default=None,
                   help="Ray GPUs per pair (default: study.resources.gpus, else 1 where the cluster has GPUs)")
    p.add_argument("--max-retries", type=int, default=1,
                   help="Ray's retries of a pair whose worker died (it resumes from its checkpoint)")
    p.add_argument("--ray-timeout", type=SECONDS, default=60.0,
                   help="seconds to join the Ray cluster (or start the local instance) before giving up")
    p.add_argument("--register", default=None, metavar="VARIANT",
                   help="register this variant's models, one registered model per category")
    p.add_argument("--no-compare", action="store_true",
                   help="end without the comparison (notebook 04, deltas.csv/png in the study folder)")
    overrides(p)

    p = add("register", _register, "register a run's MLflow model (models:/<name>/<version>)")
    p.add_argument("--run", required=True,
                   help="the MLflow run id of an evaluated training run, or its name ('<variant>-<category>', "
                        "with --study when several studies have one)")
    p.add_argument("--study", default=None, help="the study the run named by --run belongs to")
    p.add_argument("--name", required=True, help="the registered model's name, e.g. the category")

    p = add("runs", _runs, "maintain the MLflow store")
    p.add_argument("--fix-stale", action="store_true", required=True,
                   help="mark runs left RUNNING by a killed process as FAILED")
    p.add_argument("--older-than", type=SECONDS, default=0.0,
                   help="only runs whose owning process is gone or silent this many seconds")

    p = add("demo", _demo, "the offline demo: synthetic data, a small ablation study, its table")
    p.add_argument("--quick", action="store_true", help="a tiny version for smoke tests")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("RECONTRAST_DEBUG", "") not in ("", "0")
    if args.root is not None:
        if not Path(args.root).is_dir():
            sys.exit(f"recontrast {args.command}: --root {one_line(args.root, 200)} is not a folder; give the "
                     f"project folder (where experiments/, data/ and mlruns/ are)")
        os.environ["RECONTRAST_ROOT"] = str(Path(args.root).resolve())
    try:
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.exit(f"recontrast {args.command}: interrupted")
    except Exception as err:
        if debug:
            raise
        sys.exit(f"recontrast {args.command}: {describe(err)}")


def describe(err: BaseException) -> str:
    """Returns the one bounded line an error is shown as: config and missing-file errors as
    their message (which names the fix), anything else as 'Type: message'."""
    if isinstance(err, (ConfigError, FileNotFoundError)):
        return one_line(str(err))
    text = str(err) or repr(err)
    return one_line(f"{type(err).__name__}: {text}") + ("" if _raised_here(err) else " (--debug shows the traceback)")


def _raised_here(err: BaseException) -> bool:
    """Returns True when the package raised `err` itself (its message then names the fix),
    False for an error from deeper down (torch, PIL, MLflow), whose traceback may help."""
    if type(err).__module__.startswith("recontrast"):
        return True
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = str(Path(__file__).resolve().parent)
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(package)


if __name__ == "__main__":
    main()
