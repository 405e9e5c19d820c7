"""The one place that ties training, evaluation, calibration, reports and MLflow together.

- `run_training(cfg)`: trains, evaluates the final model, stores its calibration, logs all of
  it to one MLflow run (`recontrast train` and notebook 02);
- `run_evaluation(checkpoint)`: evaluates a checkpoint, stores its calibration, logs it to the
  run that trained it (`recontrast evaluate` and notebook 03);
- `evaluate_and_store(...)`: the one calibrate-and-store step both use.
Modules below this one never call MLflow or write reports on their own.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from recontrast import plots, tracking
from recontrast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from recontrast.config import (ATTEMPT1, ATTEMPT2, COARSE, Config, apply_overrides, encoder_bn_mode, fallback_config,
                               fine_config, load_config, validate, warmup_iters)
from recontrast.data import Datasets, build_datasets
from recontrast.defects import ProxyDataset
from recontrast.distributed import is_main_process, world
from recontrast.evaluate import PROXY_PREFIX, PROXY_SCORE, EvalResult, evaluate, make_eval_fn, proxy_metrics
from recontrast.health import NOT_CONVERGED, Health, assess
from recontrast.layout import choose_bottleneck_pool
from recontrast.layout import verdict as layout_verdict
from recontrast.locks import LOCK_FILE, folder_lock
from recontrast.mlflow_store import (Tag, check_reachable, get_client, run_of_folder, tracking_uri,
                                     write_run_id)
from recontrast.model import load_model
from recontrast.preflight import check_device, check_evaluation_overrides, check_resumable
from recontrast.report import write_outputs
from recontrast.runtime import pick_device
from recontrast.train import Callback, TrainResult, train

log = logging.getLogger(__name__)


def proxy_dataset(cfg: Config, datasets: Datasets) -> ProxyDataset | None:
    """Returns the held-out good images plus their synthetic-defect copies, or None when
    there are no held-out images (data.val_fraction=0) or eval.proxy is off."""
    if not cfg.eval.proxy or datasets.val is None or len(datasets.val) == 0:
        return None
    return ProxyDataset(datasets.val, seed=cfg.eval.proxy_seed, copies=cfg.eval.proxy_copies)


def evaluate_and_store(model, cfg: Config, datasets: Datasets, checkpoint: Path, out_dir: Path,
                       iteration: int, store: bool = True, loss_history: list[float] | None = None,
                       known: PostTraining | None = None) -> EvalResult:
    """Returns the EvalResult of `model` on datasets.test, plus its proxy/* metrics, with its
    reports written to `out_dir` and (with `store`) its calibration saved into `checkpoint`.

    With the run's `loss_history`, a failed training is noted in the reports (health.assess).
    `known`: what the training that just ended already has (its proxy set, the proxy metrics
    of these very weights, its health): reused, not computed again; the checkpoint it stores
    the calibration into is kept there for the MLflow model.
    """
    device = pick_device(cfg.train.device)
    result = evaluate(model, datasets.test, cfg.eval, device, datasets.val, keep_samples=True)
    if known is not None and known.proxy_metrics:
        result.metrics.update(known.proxy_metrics)
    else:
        proxy = known.proxy if known is not None else proxy_dataset(cfg, datasets)
        if proxy is not None:
            result.metrics.update(proxy_metrics(model, proxy, cfg.eval, device))
    health = known.health if known is not None else (
        assess(loss_history, warmup_iters(cfg), result.metrics) if loss_history is not None else None)
    if health is not None and health.status == NOT_CONVERGED:
        result.notes.append(health.message)
    result.calibration.update(category=cfg.data.category, data_root=str(cfg.data.root),
                              iteration=int(iteration))
    write_outputs(result, cfg.eval, out_dir, getattr(datasets.test, "category", None) or cfg.data.category)
    if store:
        ckpt = load_checkpoint(checkpoint)
        ckpt["calibration"] = result.calibration
        save_checkpoint(checkpoint, ckpt)
        if known is not None:
            known.checkpoint_state = ckpt
    return result


def proxy_part(metrics: dict[str, Any]) -> dict[str, Any]:
    """Returns the proxy/* entries of a training's metrics (its last evaluation's)."""
    return {k: v for k, v in metrics.items() if k.startswith(PROXY_PREFIX)}


@dataclass
class PostTraining:
    """What the end of a training knows, computed once and passed on to evaluation and logging."""

    proxy: ProxyDataset | None  # the held-out images with synthetic defects, built once per run
    proxy_metrics: dict[str, float] = field(default_factory=dict)  # of the final (or selected) weights
    health: Health | None = None
    checkpoint_state: dict[str, Any] | None = None  # the calibrated checkpoint, once stored


@dataclass
class RunOptions:
    """How run_training runs and records a training (its keyword arguments, grouped)."""

    resume: bool = False
    track: bool = True
    evaluate_at_end: bool = True
    callbacks: Sequence[Callback] = ()
    run_name: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, Any] | None = None
    # Log the calibrated checkpoint as the run's MLflow model; None: when evaluated here.
    log_checkpoint: bool | None = None


# ----------------------------------------------------------------------------- training
def run_training(cfg: Config, datasets: Datasets | None = None, options: RunOptions | None = None,
                 **option_values: Any):
    """Returns (TrainResult, EvalResult or None, run id or None): trains cfg, evaluates the
    final model with figures, and logs both (config, metrics, checkpoint, figures) to one run.

    `options` (or its fields as keywords: resume=True, run_name=..., ...) say how; see RunOptions.
    With resume=True the run recorded in <train.out>/mlflow_run_id is reopened (when it
    trained in this very folder: a copied folder gets a run of its own). The
    checkpoint is logged when evaluated here (log_checkpoint=None), so the logged copy holds
    its calibration; without evaluation, notebook 03 / log_evaluation(log_checkpoint=True) logs it.
    """
    opts = options if options is not None else RunOptions(**option_values)
    # A dataset (every file decoded), device or tracking server that cannot work stops here,
    # a batch size or backbone in train()'s checks: before any run exists, and the run folder
    # is removed again when nothing was written to it. What fails later is recorded in the
    # run (FAILED/KILLED). One process at a time owns the run folder.
    check_device(cfg)
    if opts.track and cfg.tracking.enabled:
        check_reachable(tracking_uri(cfg))
    data = datasets if datasets is not None else build_datasets(cfg.data)
    # Under torchrun the ranks of one training share the folder: rank 0 holds its lock.
    owner = is_main_process()
    lock = (folder_lock(cfg.train.out, "the run folder", fix="train into another folder (--out / train.out)")
            if owner else contextlib.nullcontext())
    with lock:
        # train.pool_max_spread: the coarse code only for training images that share a layout.
        cfg, spread = choose_bottleneck_pool(cfg, data.train)
        if spread is not None:
            opts = dataclasses.replace(opts, tags={**(opts.tags or {}), Tag.POSITION_SPREAD: f"{spread:.4f}"})
        if pool_fallback_applies(cfg) and (Path(cfg.train.out) / COARSE).is_dir():
            cfg = fine_config(cfg)  # the coarse training was flagged and set aside: the fine one goes on
        if fallback_applies(cfg):
            cfg = _fallback_state(cfg)
        if opts.resume:
            check_resumable(cfg)
        found = _run_training(cfg, data, opts)
        if falls_back(cfg, found[0].health):
            found = (_train_fine(cfg, data, opts, found) if pool_fallback_applies(cfg)
                     else _train_again(cfg, data, opts, found))
        found[0].position_spread = spread
        return found


def fallback_applies(cfg: Config) -> bool:
    """Returns whether train.bn_fallback may retrain cfg: asked for, a trainable encoder whose
    BatchNorm mode can change (not the stable variant), and one process (under torchrun every
    rank would have to agree)."""
    return (cfg.train.bn_fallback and cfg.model.domain_adaptation and not cfg.train.stable
            and not world().distributed)


def pool_fallback_applies(cfg: Config) -> bool:
    """Returns whether train.pool_fallback may retrain cfg: asked for, a coarse bottleneck code
    (model.bottleneck_pool > 1), one process."""
    return cfg.train.pool_fallback and cfg.model.bottleneck_pool > 1 and not world().distributed


def _fallback_state(cfg: Config) -> Config:
    """Returns cfg as its run folder's train.bn_fallback history has it go on: the second
    training's when the first was trained again (attempt1/), with no further fallback when the
    first was kept over the second (attempt2/), cfg itself otherwise."""
    out = Path(cfg.train.out)
    if (out / ATTEMPT2).is_dir():
        return apply_overrides(copy.deepcopy(cfg), {"train.bn_fallback": False})
    return fallback_config(cfg) if (out / ATTEMPT1).is_dir() else cfg


def falls_back(cfg: Config, health: Health | None) -> bool:
    """Returns whether a training of cfg with this health is trained again (train.pool_fallback
    or train.bn_fallback)."""
    return ((pool_fallback_applies(cfg) or fallback_applies(cfg))
            and health is not None and health.status == NOT_CONVERGED)


def _train_fine(cfg: Config, data: Datasets, opts: RunOptions, coarse: tuple):
    """Returns what run_training returns for train.pool_fallback's training with bottleneck_pool
    1 (and train.bn_fallback's after it, as run_training does), after moving the flagged coarse
    training into <train.out>/coarse and marking its MLflow run superseded_by the kept one."""
    result, _, coarse_run = coarse
    out, fine = Path(cfg.train.out), fine_config(cfg)
    said = (f"train.pool_fallback: the training with model.bottleneck_pool={cfg.model.bottleneck_pool} did not "
            f"converge ({'; '.join(result.health.reasons)}); training it again with model.bottleneck_pool=1. "
            f"The coarse training is kept in {out / COARSE}")
    log.warning(said)
    _move_run_into(out, COARSE)
    again = _options_after(opts, coarse_run)
    kept = _run_training(fine, data, again)
    if falls_back(fine, kept[0].health):
        kept = _train_again(fine, data, again, kept)
    kept[0].warnings.insert(0, said)
    kept[0].coarse_attempt, kept[0].fit_seconds = True, kept[0].fit_seconds + result.fit_seconds
    _mark_superseded(cfg, coarse_run, kept[2], said)
    return kept


def _options_after(opts: RunOptions, run_id: str | None) -> RunOptions:
    """Returns the options of a training that replaces run `run_id` (a fresh start, tagged fallback_of)."""
    tags = {**(opts.tags or {}), **({Tag.FALLBACK_OF: run_id} if run_id else {})}
    return dataclasses.replace(opts, resume=False, tags=tags)


def _mark_superseded(cfg: Config, run_id: str | None, by: str | None, why: str) -> None:
    """Tags MLflow run `run_id` superseded_by `by` (as batch marks a pair's replaced run), when both exist."""
    if run_id and by:
        with contextlib.suppress(Exception):  # a tag is never worth failing the run that is kept
            tracking.Run(run_id, get_client(cfg)).set_tags({Tag.SUPERSEDED_BY: by, Tag.SUPERSEDED_REASON: why[:5000]})


def _train_again(cfg: Config, data: Datasets, opts: RunOptions, first: tuple):
    """Returns what run_training returns for train.bn_fallback's second training, after moving
    the flagged first one into <train.out>/attempt1 and marking its MLflow run superseded_by; or,
    when the second is flagged too and the first has the higher proxy/score, the first again
    (moved back, evaluated now), the second in <train.out>/attempt2 (_keep_first)."""
    result, _, first_run = first
    out, second = Path(cfg.train.out), fallback_config(cfg)
    said = (f"train.bn_fallback: the training with the encoder's BatchNorm in {encoder_bn_mode(cfg)} mode did not "
            f"converge ({'; '.join(result.health.reasons)}); training it again with model.encoder_bn="
            f"{second.model.encoder_bn}. The first training is kept in {out / ATTEMPT1}")
    log.warning(said)  # and in result.warnings, which notebook 02 prints
    _move_run_into(out, ATTEMPT1)
    found = _run_training(second, data, _options_after(opts, first_run))
    found[0].attempt, fit_seconds = 2, result.fit_seconds + found[0].fit_seconds
    kept, dropped, why = found, first, said
    if _first_is_better(result, found[0]):
        kept, dropped = _keep_first(cfg, data, opts, first, found), found
        why = result.warnings[-1]
    kept[0].warnings.insert(0, said)
    kept[0].attempts, kept[0].fit_seconds = 2, fit_seconds
    _mark_superseded(cfg, dropped[2], kept[2], why)
    return kept


def _first_is_better(first: TrainResult, second: TrainResult) -> bool:
    """Returns whether train.bn_fallback keeps its first training over the second: only when the
    second is flagged too, and then by the higher proxy/score, a label-free choice. Where both
    were flagged on the dev categories (mesh, grain), the first was the better model on every
    test metric and the proxy ranked the pair right (docs/recipe.md, "Mesh and board")."""
    if second.health is None or second.health.status != NOT_CONVERGED:
        return False
    a, b = first.metrics.get(PROXY_SCORE), second.metrics.get(PROXY_SCORE)
    return a is not None and b is not None and a > b


def _keep_first(cfg: Config, data: Datasets, opts: RunOptions, first: tuple, second: tuple):
    """Returns what run_training returns for bn_fallback's first training, kept after all: the
    second moves into <train.out>/attempt2, the first back from attempt1, and it is evaluated
    and logged to its own MLflow run now (as a flagged training, it was not at its end)."""
    result, _, run_id = first
    out = Path(cfg.train.out)
    why = (f"train.bn_fallback: the second training did not converge either "
           f"({'; '.join(second[0].health.reasons)}); the first is kept, its proxy/score "
           f"{100 * result.metrics[PROXY_SCORE]:.2f} above the second's {100 * second[0].metrics[PROXY_SCORE]:.2f}. "
           f"The second training is kept in {out / ATTEMPT2}")
    log.warning(why)
    _move_run_into(out, ATTEMPT2)
    for item in (out / ATTEMPT1).iterdir():
        item.rename(out / item.name)
    (out / ATTEMPT1).rmdir()
    result.warnings.append(why)
    known = PostTraining(None, proxy_part(result.metrics), result.health)
    evaluation = evaluate_and_store(result.model, cfg, data, result.checkpoint, out / "eval",
                                    result.selected_iteration or result.iterations,
                                    known=known) if opts.evaluate_at_end else None
    if run_id:
        _record(tracking.Run(run_id, get_client(cfg)), result, evaluation, opts, known)
    return result, evaluation, run_id


def _move_run_into(out: Path, name: str) -> None:
    """Moves what a training wrote into <out> (not earlier attempts, not the lock) into <out>/name."""
    (out / name).mkdir()
    for item in out.iterdir():
        if item.name not in (ATTEMPT1, ATTEMPT2, COARSE, LOCK_FILE):
            item.rename(out / name / item.name)


def _record(run: tracking.Run, result: TrainResult, evaluation: EvalResult | None, opts: RunOptions,
            known: PostTraining) -> None:
    """Logs a kept training's evaluation and (when asked, RunOptions.log_checkpoint) its
    calibrated checkpoint as the run's MLflow model."""
    if evaluation is not None:
        tracking.log_evaluation(evaluation, result.checkpoint, run_id=run.run_id, uri=run.client.tracking_uri,
                                step=result.iterations)
    if opts.evaluate_at_end if opts.log_checkpoint is None else opts.log_checkpoint:
        # After evaluation (calibrated); the folder's lock keeps any other recontrast
        # process from replacing the file since this run wrote it.
        tracking.log_trained_model(run, result.checkpoint, step=result.iterations, ckpt=known.checkpoint_state)


def _run_training(cfg: Config, data: Datasets, opts: RunOptions):
    """Returns what run_training returns; the caller holds the run folder's lock."""
    if not is_main_process():  # torchrun: rank 0 alone logs to MLflow, evaluates and writes reports
        return train(cfg, callbacks=opts.callbacks, resume=opts.resume, datasets=data), None, None
    known = PostTraining(proxy_dataset(cfg, data))
    # Test metrics during training only when asked (eval_every); proxy metrics always, at
    # eval_every and at the end: what train.select=proxy and the health check read.
    test = data.test if cfg.train.eval_every > 0 else None
    eval_fn = make_eval_fn(test, cfg.eval, data.val, known.proxy) if test is not None or known.proxy else None
    out = Path(cfg.train.out)

    def finish(result: TrainResult, run: tracking.Run | None) -> EvalResult | None:
        known.health = check_health(cfg, result, run)
        known.proxy_metrics = proxy_part(result.metrics)
        if not opts.evaluate_at_end or falls_back(cfg, known.health):  # a flagged run trained again: no test
            return None
        return evaluate_and_store(result.model, cfg, data, result.checkpoint, out / "eval",
                                  result.selected_iteration or result.iterations, known=known)

    if not (opts.track and cfg.tracking.enabled):
        result = train(cfg, callbacks=opts.callbacks, resume=opts.resume, eval_fn=eval_fn, datasets=data)
        return result, finish(result, None), None

    # Reopen the folder's run only if it trained in this very folder (not in the one this was copied from).
    previous = run_of_folder(get_client(cfg), out) if opts.resume else None
    tags = {**(opts.tags or {}), Tag.RUN_FOLDER: str(out.resolve())}
    with contextlib.ExitStack() as stack:
        def open_run() -> tracking.Run:
            run = stack.enter_context(tracking.start_run(cfg, run_name=opts.run_name, run_id=previous,
                                                         parent_run_id=opts.parent_run_id, tags=tags,
                                                         log_system_metrics=True))
            try:
                write_run_id(out, run.run_id)
            except OSError as err:
                raise CheckpointError(f"cannot write to the run folder {out} ({type(err).__name__}: {err}); "
                                      f"train.out must be a writable folder, not a file") from None
            run.log_text(cfg.to_yaml(), "config.yaml")
            _log_data(run, data, cfg)
            return run

        callback = tracking.MLflowCallback(open_run)
        try:
            result = train(cfg, callbacks=[callback, *opts.callbacks], resume=opts.resume, eval_fn=eval_fn,
                           datasets=data)
        except BaseException:
            with contextlib.suppress(Exception):
                callback.flush()  # the last metrics before the crash
            raise
        run = callback.run
        _log_loss_curve(run, result, out)
        evaluation = finish(result, run)
        if not falls_back(cfg, known.health):  # a flagged run trained again is recorded if kept after all
            _record(run, result, evaluation, opts, known)
    return result, evaluation, run.run_id


def check_health(cfg: Config, result: TrainResult, run: tracking.Run | None) -> Health:
    """Returns the run's Health; a failed one is said in the log, as a warning (the notebook
    shows result.warnings), and as MLflow tags health / health_reason."""
    health = assess(result.loss_history, warmup_iters(cfg), result.metrics)
    result.health = health
    if health.status == NOT_CONVERGED:
        result.warnings.append(health.message)
        log.warning(health.message)
        warnings.warn(health.message, RuntimeWarning, stacklevel=3)
    if run is not None:
        run.set_tags({Tag.HEALTH: health.status, Tag.HEALTH_REASON: "; ".join(health.reasons)[:5000] or "-"})
    return health


def _log_data(run: tracking.Run, data: Datasets, cfg: Config) -> None:
    """Logs the splits as MLflow dataset inputs, the image counts and the files skipped as
    unreadable (data.skip_bad_images)."""
    splits = {"train": data.train, "val": data.val, "test": data.test}
    tracking.log_datasets(run, splits, cfg.data.category, cfg.data.root)
    skipped = [entry for d in splits.values() if d is not None for entry in getattr(d, "skipped", [])]
    run.log_metrics({f"data/{name}_images": len(d) for name, d in splits.items() if d is not None}
                    | {"data/skipped_images": len(skipped)})
    if skipped:
        run.log_text("".join(f"{path}\t{reason}\n" for path, reason in skipped), "skipped_images.txt")


def _log_loss_curve(run: tracking.Run, result: TrainResult, out: Path) -> None:
    try:  # a figure is never worth failing the run
        plots.loss_curve(result.loss_history, out / "loss_curve.png")
        run.log_artifact(out / "loss_curve.png", "figures")
    except Exception as err:
        log.warning("no loss curve artifact: %s", err)


def main_train(
    config_path: str | Path | None,
    overrides: list[str] | dict[str, Any] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    track: bool = True,
    callbacks: Sequence[Callback] = (),
    evaluate: bool = False,
) -> TrainResult:
    """Returns the TrainResult of `recontrast train --config ... --set ... --out ...`.

    Logs to MLflow when `track` and tracking.enabled. With `evaluate`, the final model is
    evaluated too (figures, calibration) and its metrics printed; otherwise that is
    `recontrast evaluate --checkpoint <out>/last.ckpt`.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(config_path, overrides)
    if out is not None:
        cfg.train.out = str(out)
    result, evaluation, run_id = run_training(cfg, resume=resume, track=track, evaluate_at_end=evaluate,
                                              callbacks=callbacks)
    if not is_main_process():  # torchrun: rank 0 prints
        return result
    if evaluation is not None:
        print(evaluation.table())
        print(f"figures and metrics: {evaluation.out_dir}")
    note = "; the loss trend rose, see the warning above" if result.loss_rising else ""
    run = f"; MLflow run {run_id}" if run_id else ""
    chosen = (f", weights of iteration {result.selected_iteration} (train.select=proxy)"
              if result.selected_iteration is not None else "")
    print(f"checkpoint: {result.checkpoint} ({result.iterations} iterations{chosen}{run}{note})")
    if result.position_spread is not None:
        print(layout_verdict(result.position_spread, cfg))
    if result.health is not None and result.health.status == NOT_CONVERGED:
        print(f"WARNING: {result.health.message}")
    return result


# ----------------------------------------------------------------------------- evaluation
def run_evaluation(
    checkpoint: str | Path,
    data_root: str | None = None,
    category: str | None = None,
    out: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    track: bool = True,
) -> EvalResult:
    """Returns the EvalResult of `recontrast evaluate`; stores the calibration in the checkpoint.

    The test (and held-out val) datasets are rebuilt from the checkpoint's config, with
    data.root / data.category replaced when given. Calibration is written back (atomically)
    only when the category is the one the model was trained on.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        load_checkpoint(checkpoint)  # raises, naming the checkpoints the folder holds
    # Storing the calibration rewrites the checkpoint: its folder has one owner from the
    # moment the weights are read until the calibration is written next to them.
    with folder_lock(checkpoint.parent, "the checkpoint's folder", fix="evaluate a copy of the checkpoint"):
        result, cfg, trained_category, out = _evaluate_checkpoint(checkpoint, data_root, category, out,
                                                                  overrides, track)
    same = cfg.data.category == trained_category
    stored = (f"calibration stored in {checkpoint}" if same else
              f"calibration NOT stored: the model was trained on '{trained_category}', "
              f"evaluated on '{cfg.data.category}'")

    cal = result.calibration
    print(f"{cfg.data.category}: {len(result.records)} test images, iteration {cal['iteration']}")
    print(result.table())
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    print(f"thresholds (raw score): f1={fmt(cal['threshold_f1'])} "
          f"normal={fmt(cal['threshold_normal'])} (q={cal['quantile']} of {cal['n_normal']} "
          f"{cal['normal_source']} images); {stored}")
    if cal.get("map_threshold") is not None:  # eval.score_combine: the score is not the map's maximum
        print(f"image score: the {cal['eval']['score_combine']} of the pairs; the {cal['eval']['combine']} map "
              f"is shown on its own threshold {fmt(cal['map_threshold'])} (its maximum, same quantile)")
    print(f"outputs in {out}")
    sys.stdout.flush()

    if track and cfg.tracking.enabled:
        try:  # the outputs are written: tracking is best effort here
            tracking.log_evaluation(result, checkpoint)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"could not log the evaluation to MLflow: {type(err).__name__}: {err}",
                          RuntimeWarning, stacklevel=2)
    return result



def _evaluate_checkpoint(checkpoint: Path, data_root, category, out, overrides, track: bool):
    """Returns (EvalResult, cfg, trained category, out folder) of run_evaluation's work, every
    setting and the data checked before the model runs; the caller holds the folder's lock."""
    model, cfg, ckpt = load_model(checkpoint, "cpu")
    trained_category, trained = cfg.data.category, cfg.flatten()
    apply_overrides(cfg, overrides)
    if data_root is not None:
        cfg.data.root = str(data_root)
    if category is not None:
        cfg.data.category = category
    validate(cfg)
    check_evaluation_overrides(trained, cfg)
    device = check_device(cfg)
    out = Path(out) if out is not None else checkpoint.parent / f"eval_{cfg.data.category}"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out '{out}' is a file; metrics and figures go into a folder: give a folder path")
    if track and cfg.tracking.enabled:
        check_reachable(tracking_uri())  # where log_evaluation logs
    datasets = build_datasets(cfg.data)
    model.to(device).eval()
    same = cfg.data.category == trained_category
    result = evaluate_and_store(model, cfg, datasets, checkpoint, out, int(ckpt.get("iteration", 0)), store=same,
                                loss_history=list(ckpt.get("loss_history", [])))
    return result, cfg, trained_category, out
