"""The `recontrast` command: synth, train, evaluate, predict, export, batch, runs, demo.

Each subcommand parses its flags and calls one library function; no method logic lives here.
Heavy imports happen inside the handlers so `recontrast --help` stays fast.
"""
from __future__ import annotations

import argparse
import sys

from recontrast.config import ConfigError


def _synth(args: argparse.Namespace) -> None:
    from recontrast import synthetic

    root = synthetic.generate(
        args.out, size=args.size, n_train=args.n_train, seed=args.seed, categories=args.categories
    )
    print(synthetic.format_summary(synthetic.summarize(root)))
    print(f"synthetic dataset written to {root}")


def _train(args: argparse.Namespace) -> None:
    from recontrast.pipeline import main_train

    main_train(args.config, args.set, out=args.out, resume=args.resume, track=not args.no_track,
               evaluate=True)


def _evaluate(args: argparse.Namespace) -> None:
    from recontrast.pipeline import run_evaluation

    run_evaluation(
        args.checkpoint, data_root=args.data, category=args.category, out=args.out,
        overrides=args.set, track=not args.no_track,
    )


def _predict(args: argparse.Namespace) -> None:
    from recontrast.infer import main_predict

    main_predict(args.checkpoint, args.inputs, out=args.out, threshold=args.threshold)


def _export(args: argparse.Namespace) -> None:
    from recontrast.export import export

    path = export(args.checkpoint, out=args.out, fmt=args.format, image_size=args.image_size)
    print(f"exported {args.format} model to {path}")


def _batch(args: argparse.Namespace) -> None:
    from recontrast.batch import run_study

    report = run_study(
        args.study, categories=args.categories, jobs=args.jobs, force=args.force,
        overrides=args.set, variants=args.variants,
    )
    sys.exit(0 if report.ok else 1)


def _runs(args: argparse.Namespace) -> None:
    from recontrast.mlflow_store import fix_stale_runs

    fixed = fix_stale_runs(older_than_s=args.older_than)
    print(f"marked {len(fixed)} stale RUNNING run(s) as FAILED" + (": " + ", ".join(fixed) if fixed else ""))


def _demo(args: argparse.Namespace) -> None:
    from recontrast.demo import run_demo

    run_demo(quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recontrast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="dotted config overrides, e.g. train.iters=500")

    p = add("synth", _synth, "write the synthetic MVTec-layout dataset")
    p.add_argument("--out", default="data/synthetic")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--categories", nargs="*", default=None)

    p = add("train", _train, "train one model (one category)")
    p.add_argument("--config", required=True)
    overrides(p)
    p.add_argument("--out", default=None, help="run folder (overrides train.out)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.ckpt")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")

    p = add("evaluate", _evaluate, "evaluate a checkpoint on a test split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="dataset root (default: the checkpoint's)")
    p.add_argument("--category", default=None)
    p.add_argument("--out", default=None, help="folder for metrics and figures")
    overrides(p)
    p.add_argument("--no-track", action="store_true")

    p = add("predict", _predict, "score new images with a trained checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", default="preds")
    p.add_argument("--threshold", default="normal", help="'normal' (from good images only), 'f1' or a number")

    p = add("export", _export, "export the inference graph (image -> map + score)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", default=None)
    p.add_argument("--image-size", type=int, default=None)

    p = add("batch", _batch, "run a study: papermill executions per (variant, category)")
    p.add_argument("--study", required=True)
    p.add_argument("--categories", nargs="*", default=["all"])
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--force", action="store_true", help="redo finished (variant, category) pairs")
    overrides(p)

    p = add("runs", _runs, "maintain the MLflow store")
    p.add_argument("--fix-stale", action="store_true", required=True,
                   help="mark runs left RUNNING by a killed process as FAILED")
    p.add_argument("--older-than", type=float, default=0.0,
                   help="only runs whose owning process is gone or silent this many seconds")

    p = add("demo", _demo, "the offline demo: synthetic data, a small ablation study, its table")
    p.add_argument("--quick", action="store_true", help="a tiny version for smoke tests")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"recontrast {args.command}: {err}")
    except Exception as err:  # the package's own errors carry their fix in the message
        if type(err).__module__.startswith("recontrast"):
            sys.exit(f"recontrast {args.command}: {type(err).__name__}: {err}")
        raise


if __name__ == "__main__":
    main()
