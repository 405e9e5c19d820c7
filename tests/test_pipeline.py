"""recontrast/pipeline.py: proxy metrics in every evaluation, a failed training flagged in
every place a user looks, checkpoint selection by proxy metric, image-level test splits."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import one_thread
from recontrast import pipeline, synthetic
from recontrast.checkpoint import final_checkpoint, load_checkpoint
from recontrast.config import Config, apply_overrides
from recontrast.data import build_datasets
from recontrast.evaluate import PROXY_SCORE, proxy_metrics
from recontrast.defects import KINDS, SURFACE_KINDS
from recontrast.health import NOT_CONVERGED, OK, PROXY_FLOORS, Health, assess
from recontrast.model import build_model
from recontrast.train import Callback, TrainResult, warmup_iters


def lite_cfg(root, out, **overrides) -> Config:
    """Offline ImageNet Lite0 at 64 px on synthetic weave: 30 iterations learn visibly."""
    base = {
        "data.root": str(root), "data.category": "weave", "data.image_size": 64, "data.val_fraction": 0.25,
        "model.backbone": "tf_efficientnet_lite0", "model.pretrained": "offline", "model.width_mult": 1.0,
        "train.iters": 30, "train.batch_size": 4, "train.threads": 1, "train.checkpoint_every": 0,
        "train.log_every": 5, "train.out": str(out), "tracking.enabled": False,
        "eval.figures": False, "eval.gif": False,
    }
    return apply_overrides(Config(), {**base, **overrides})


@pytest.fixture(scope="module")
def weave(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("weave"), size=64, n_train=24, n_test_good=6,
                              n_test_defect=3, seed=0, categories=["weave"])


@pytest.fixture(scope="module")
def healthy(weave, tmp_path_factory):
    with one_thread():
        return pipeline.run_training(lite_cfg(weave, tmp_path_factory.mktemp("healthy")))


def test_every_evaluation_reports_proxy_metrics_without_test_labels(healthy):
    result, evaluation, _ = healthy
    proxy = {k: v for k, v in evaluation.metrics.items() if k.startswith("proxy/")}
    overall = {"proxy/image_auroc", "proxy/pixel_auroc", "proxy/aupro", "proxy/score"}
    kinds = {k.split("/")[1] for k in proxy if k.count("/") == 2}
    assert kinds and kinds <= set(KINDS)  # as many kinds as held-out images, up to all of them
    assert set(proxy) == overall | {f"proxy/{kind}/{m}" for kind in kinds for m in ("image_auroc", "pixel_auroc",
                                                                                   "aupro", "score")}
    written = json.loads((evaluation.out_dir / "metrics.json").read_text())
    assert written["proxy/aupro"] == pytest.approx(proxy["proxy/aupro"])
    assert "proxy/score" in result.metrics  # the end-of-training evaluation the health check reads
    assert result.health.status == OK and not result.warnings


def test_a_trained_model_scores_higher_proxy_metrics_than_an_untrained_one(healthy, weave, tmp_path):
    result, _, _ = healthy
    cfg = lite_cfg(weave, tmp_path)
    torch.manual_seed(0)
    untrained = build_model(cfg)
    proxy = pipeline.proxy_dataset(cfg, build_datasets(cfg.data))
    before = proxy_metrics(untrained, proxy, cfg.eval)
    after = proxy_metrics(result.model, proxy, cfg.eval)
    # Pixel metrics: 6 held-out images give one defect image per kind, too few for image AUROC.
    assert after["proxy/pixel_auroc"] > before["proxy/pixel_auroc"] + 0.2
    assert after["proxy/aupro"] > before["proxy/aupro"] + 0.3


def test_a_run_whose_proxy_is_below_a_learning_run_is_flagged_with_the_number(healthy, weave, tmp_path):
    """The health check reads the proxy per defect family: an untrained model (a run that learned
    nothing, whatever its loss did) is flagged, naming the number and the floor; the 30-iteration
    run is not. The loss history is the learning run's, so only the proxy can flag."""
    result, _, _ = healthy
    cfg = lite_cfg(weave, tmp_path)
    torch.manual_seed(0)
    proxy = pipeline.proxy_dataset(cfg, build_datasets(cfg.data))
    broken = proxy_metrics(build_model(cfg), proxy, cfg.eval)
    health = assess(result.loss_history, warmup_iters(cfg), broken)
    assert health.status == NOT_CONVERGED
    surface = np.mean([broken[f"proxy/{k}/pixel_auroc"] for k in SURFACE_KINDS if f"proxy/{k}/pixel_auroc" in broken])
    assert f"surface synthetic defects = {surface:.3f} (< {PROXY_FLOORS['surface']}" in health.message
    learned = assess(result.loss_history, warmup_iters(cfg), proxy_metrics(result.model, proxy, cfg.eval))
    assert learned.status == OK, learned.reasons


def test_a_failed_training_is_flagged_in_console_results_reports_and_mlflow(weave, tmp_path, store, capsys):
    """A learning rate of 1.0: the loss stalls right after the warm-up."""
    from mlflow import MlflowClient

    overrides = {**lite_cfg(weave, tmp_path / "run").flatten(), "train.lr": 1.0, "tracking.enabled": True,
                 "tracking.experiment": "health"}
    with one_thread(), pytest.warns(RuntimeWarning, match="did not converge"):
        result = pipeline.main_train(None, [f"{k}={v}" for k, v in overrides.items() if k != "eval.level_weights"],
                                     evaluate=True)
    assert result.health.status == NOT_CONVERGED and "loss did not fall" in result.health.reasons[0]
    assert any("did not converge" in w for w in result.warnings)  # notebook 02 prints these
    out = capsys.readouterr().out
    assert "WARNING: training did not converge" in out and "note: training did not converge" in out
    notes = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["notes"]
    assert any("did not converge" in n for n in notes)
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    tags = MlflowClient(store).get_run(run_id).data.tags
    assert tags["health"] == NOT_CONVERGED and "loss did not fall" in tags["health_reason"]


@pytest.mark.slow
def test_select_proxy_keeps_the_weights_of_the_best_evaluation(weave, tmp_path):
    seen = {}

    class Evals(Callback):
        def on_eval(self, iteration, metrics):
            seen[iteration] = metrics["proxy/score"]

    cfg = lite_cfg(weave, tmp_path, **{"train.iters": 12, "train.eval_every": 4, "train.select": "proxy",
                                        "train.checkpoint_every": 4})
    with one_thread():
        result, evaluation, _ = pipeline.run_training(cfg, callbacks=[Evals()])
    best = max(seen, key=seen.get)
    assert result.selected_iteration == best and result.checkpoint == tmp_path / "best.ckpt"
    assert final_checkpoint(tmp_path) == result.checkpoint
    stored = load_checkpoint(result.checkpoint)
    assert stored["iteration"] == best and stored["calibration"]  # evaluated and calibrated
    assert load_checkpoint(tmp_path / "last.ckpt")["iteration"] == 12  # the resume point stays
    for k, v in stored["model"].items():
        torch.testing.assert_close(result.model.state_dict()[k], v)


def test_select_proxy_without_held_out_images_is_refused_before_any_work(weave, tmp_path):
    from recontrast.config import ConfigError, validate

    with pytest.raises(ConfigError, match="data.val_fraction > 0"):
        validate(lite_cfg(weave, tmp_path, **{"train.select": "proxy", "train.eval_every": 2,
                                              "data.val_fraction": 0.0}))


def test_an_image_level_test_split_trains_and_evaluates_with_pixel_metrics_na(weave, tmp_path, capsys):
    """Good/defect labels only (no ground_truth/ folder, like the screw copy): image metrics,
    pixel metrics n/a (not 0, no crash), figures without masks, a note saying why."""
    root = tmp_path / "data"
    shutil.copytree(weave, root)
    shutil.rmtree(root / "weave" / "ground_truth")
    cfg = lite_cfg(root, tmp_path / "run", **{"train.iters": 4, "eval.figures": True, "eval.gif": True})
    with one_thread():
        _, evaluation, _ = pipeline.run_training(cfg)
    m = evaluation.metrics
    assert 0.0 <= m["image_auroc"] <= 1.0 and all(m[k] != m[k] for k in ("pixel_auroc", "aupro", "pixel_f1max"))
    assert "proxy/aupro" in m  # the proxy set has its own masks
    written = json.loads((evaluation.out_dir / "metrics.json").read_text())
    assert written["pixel_auroc"] is None and any("no ground-truth masks" in n for n in written["notes"])
    assert "n/a" in evaluation.table() and "no ground-truth masks" in evaluation.table()
    assert (evaluation.out_dir / "worst_gallery.png").is_file() and (evaluation.out_dir / "weave.gif").is_file()


def test_post_training_work_is_done_once(weave, tmp_path, monkeypatch, store):
    """After training: one health check, one proxy set and one proxy evaluation (the training's
    last, reused by the final evaluation), and the checkpoint read back once (to store the
    calibration) before the MLflow model is logged from the same contents."""
    from recontrast import evaluate as evaluate_module
    from recontrast import health, mlflow_model, tracking

    calls = {"assess": 0, "proxy_metrics": 0, "proxy_set": 0, "read": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(pipeline, "assess", counting("assess", health.assess))
    monkeypatch.setattr(evaluate_module, "proxy_metrics", counting("proxy_metrics", evaluate_module.proxy_metrics))
    monkeypatch.setattr(pipeline, "proxy_metrics", evaluate_module.proxy_metrics)
    monkeypatch.setattr(pipeline, "ProxyDataset", counting("proxy_set", pipeline.ProxyDataset))
    for module in (pipeline, tracking, mlflow_model):
        monkeypatch.setattr(module, "load_checkpoint", counting("read", module.load_checkpoint))
    cfg = lite_cfg(weave, tmp_path / "run", **{"train.iters": 4, "tracking.enabled": True,
                                               "tracking.experiment": "post-training"})
    with one_thread():
        result, evaluation, run_id = pipeline.run_training(cfg)
    assert run_id and "proxy/score" in evaluation.metrics
    assert evaluation.metrics["proxy/score"] == result.metrics["proxy/score"]
    assert calls == {"assess": 1, "proxy_metrics": 1, "proxy_set": 1, "read": 1}


def proxy_scores_of_trainings(monkeypatch, *scores: float) -> None:
    """Gives the next trainings run_training starts these proxy/score values, in order (what
    train.bn_fallback compares when both of its trainings are flagged); later ones keep theirs."""
    real, given = pipeline._run_training, iter(scores)

    def stamped(cfg, data, opts):
        found, score = real(cfg, data, opts), next(given, None)
        if score is not None:
            found[0].metrics[PROXY_SCORE] = score
        return found

    monkeypatch.setattr(pipeline, "_run_training", stamped)


@pytest.mark.slow
def test_bn_fallback_trains_a_flagged_run_again_with_the_other_bn_mode_and_keeps_the_first(
        weave, tmp_path, store, monkeypatch):
    """A learning rate of 1.0 stalls the loss: with train.bn_fallback the run is trained again
    with the encoder's BN in eval mode (weave's is train), the first training moves to
    attempt1/ and its MLflow run points to the one that replaced it; a resume continues the
    second training. Both are flagged here, and the second has the higher proxy score."""
    from mlflow import MlflowClient

    out = tmp_path / "run"
    cfg = lite_cfg(weave, out, **{"train.lr": 1.0, "train.bn_fallback": True, "tracking.enabled": True,
                                  "tracking.experiment": "fallback", "train.checkpoint_every": 10})
    proxy_scores_of_trainings(monkeypatch, 0.6, 0.7)
    with one_thread(), pytest.warns(RuntimeWarning, match="did not converge"):
        result, evaluation, run_id = pipeline.run_training(cfg)
    assert result.warnings[0].startswith("train.bn_fallback: the training with the encoder's BatchNorm in train mode")
    assert result.health.status == NOT_CONVERGED and (result.attempts, result.attempt) == (2, 2)
    assert not (out / "attempt2").exists()
    assert load_checkpoint(out / "attempt1" / "last.ckpt")["config"]["model"]["encoder_bn"] == "auto"  # weave: train
    assert load_checkpoint(out / "last.ckpt")["config"]["model"]["encoder_bn"] == "eval"
    assert evaluation is not None and not (out / "attempt1" / "eval").exists()  # the flagged one is not tested
    client = MlflowClient(store)
    first = (out / "attempt1" / "mlflow_run_id").read_text().strip()
    assert (out / "mlflow_run_id").read_text().strip() == run_id != first
    assert client.get_run(first).data.tags["superseded_by"] == run_id
    assert client.get_run(run_id).data.tags["fallback_of"] == first
    assert client.get_run(run_id).data.params["model.encoder_bn"] == "eval"

    kept = {p.name: p.stat().st_mtime_ns for p in (out / "attempt1").iterdir()}
    more = lite_cfg(weave, out, **{"train.lr": 1.0, "train.bn_fallback": True, "train.iters": 40,
                                   "tracking.enabled": True, "tracking.experiment": "fallback"})
    with one_thread(), pytest.warns(RuntimeWarning, match="did not converge"):
        resumed, _, resumed_run = pipeline.run_training(more, resume=True)
    assert resumed_run == run_id and resumed.iterations == 40
    assert load_checkpoint(out / "last.ckpt")["config"]["model"]["encoder_bn"] == "eval"
    assert {p.name: p.stat().st_mtime_ns for p in (out / "attempt1").iterdir()} == kept  # untouched


@pytest.mark.slow
def test_bn_fallback_keeps_the_first_training_when_both_are_flagged_and_it_has_the_higher_proxy_score(
        weave, tmp_path, store, monkeypatch):
    """Both trainings flagged, the first with the higher proxy/score: the first is the result
    after all. It moves back into <train.out>, is evaluated and logged to its own MLflow run
    (with its model); the second, evaluated too, moves to attempt2/ and its run is the one
    marked superseded; a resume continues the first with no third training."""
    from mlflow import MlflowClient

    out = tmp_path / "run"
    cfg = lite_cfg(weave, out, **{"train.lr": 1.0, "train.bn_fallback": True, "tracking.enabled": True,
                                  "tracking.experiment": "fallback-first"})
    proxy_scores_of_trainings(monkeypatch, 0.8, 0.7)
    with one_thread(), pytest.warns(RuntimeWarning, match="did not converge"):
        result, evaluation, run_id = pipeline.run_training(cfg)
    assert (result.attempts, result.attempt) == (2, 1) and result.health.status == NOT_CONVERGED
    assert "the first is kept, its proxy/score 80.00 above the second's 70.00" in result.warnings[-1]
    assert not (out / "attempt1").exists()
    assert load_checkpoint(out / "last.ckpt")["config"]["model"]["encoder_bn"] == "auto"  # weave: train
    assert load_checkpoint(out / "attempt2" / "last.ckpt")["config"]["model"]["encoder_bn"] == "eval"
    assert load_checkpoint(out / "last.ckpt")["calibration"]["iteration"] == 30  # evaluated and stored
    assert evaluation is not None and evaluation.out_dir == out / "eval" and (out / "eval" / "metrics.json").is_file()
    assert (out / "attempt2" / "eval" / "metrics.json").is_file()  # the second was tested at its end

    client = MlflowClient(store)
    second = (out / "attempt2" / "mlflow_run_id").read_text().strip()
    assert (out / "mlflow_run_id").read_text().strip() == run_id != second
    first_run, second_run = client.get_run(run_id), client.get_run(second)
    assert "superseded_by" not in first_run.data.tags and first_run.data.tags["health"] == NOT_CONVERGED
    assert first_run.data.metrics["image_auroc"] == evaluation.metrics["image_auroc"]
    assert first_run.outputs.model_outputs, "the kept training's model is logged"
    assert second_run.data.tags["superseded_by"] == run_id and second_run.data.tags["fallback_of"] == run_id
    assert "proxy/score" in second_run.data.tags["superseded_reason"]

    kept = {p.name: p.stat().st_mtime_ns for p in (out / "attempt2").iterdir()}
    more = lite_cfg(weave, out, **{"train.lr": 1.0, "train.bn_fallback": True, "train.iters": 40,
                                   "tracking.enabled": True, "tracking.experiment": "fallback-first"})
    with one_thread(), pytest.warns(RuntimeWarning, match="did not converge"):
        resumed, _, resumed_run = pipeline.run_training(more, resume=True)
    assert resumed_run == run_id and resumed.iterations == 40 and resumed.attempts == 1
    assert load_checkpoint(out / "last.ckpt")["config"]["model"]["encoder_bn"] == "auto"
    assert {p.name: p.stat().st_mtime_ns for p in (out / "attempt2").iterdir()} == kept  # untouched
    assert not (out / "attempt1").exists()


def test_bn_fallback_keeps_the_first_training_only_over_a_flagged_second_with_a_lower_proxy_score():
    flagged, ok = Health(NOT_CONVERGED, ["the loss stalled"]), Health(OK, [])

    def trained(score, health):
        return TrainResult(None, None, 40, [], metrics={} if score is None else {PROXY_SCORE: score}, health=health)

    better = pipeline._first_is_better
    assert better(trained(0.9, flagged), trained(0.8, flagged))
    assert not better(trained(0.8, flagged), trained(0.9, flagged))
    assert not better(trained(0.9, flagged), trained(0.8, ok)), "a converged second training is always kept"
    assert not better(trained(None, flagged), trained(0.8, flagged)), "without proxy metrics: the second"
    assert not better(trained(0.8, flagged), trained(0.8, flagged)), "a tie: the second"


@pytest.mark.slow
def test_pool_fallback_trains_a_flagged_coarse_run_again_with_a_fine_code_and_bn_fallback_after_it(
        weave, tmp_path, store, monkeypatch):
    """A learning rate of 1.0 stalls every training: the coarse one (bottleneck_pool 2) moves to
    coarse/ and is trained again with bottleneck_pool 1, which train.bn_fallback trains once more
    in eval mode; the coarse run points to the kept one, and a resume continues the kept one."""
    from mlflow import MlflowClient

    out = tmp_path / "run"
    settings = {"train.lr": 1.0, "train.bn_fallback": True, "train.pool_fallback": True, "model.bottleneck_pool": 2,
                "tracking.enabled": True, "tracking.experiment": "pool-fallback"}
    proxy_scores_of_trainings(monkeypatch, 0.9, 0.6, 0.7)  # the coarse one's is never compared
    with one_thread(), pytest.warns(RuntimeWarning, match="did not converge"):
        result, evaluation, run_id = pipeline.run_training(lite_cfg(weave, out, **settings))
    assert result.warnings[0].startswith("train.pool_fallback: the training with model.bottleneck_pool=2 did not")
    assert result.coarse_attempt and (result.attempts, result.attempt) == (2, 2)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["attempt1", "coarse", "eval"]
    coarse = load_checkpoint(out / "coarse" / "last.ckpt")["config"]["model"]
    first = load_checkpoint(out / "attempt1" / "last.ckpt")["config"]["model"]
    kept = load_checkpoint(out / "last.ckpt")["config"]["model"]
    assert (coarse["bottleneck_pool"], first["bottleneck_pool"], kept["bottleneck_pool"]) == (2, 1, 1)
    assert (first["encoder_bn"], kept["encoder_bn"]) == ("auto", "eval")  # weave: train, then eval
    assert evaluation is not None and not (out / "coarse" / "eval").exists()  # the flagged ones are not tested
    client = MlflowClient(store)
    coarse_run = (out / "coarse" / "mlflow_run_id").read_text().strip()
    first_run = (out / "attempt1" / "mlflow_run_id").read_text().strip()
    assert len({coarse_run, first_run, run_id}) == 3
    assert client.get_run(coarse_run).data.tags["superseded_by"] == run_id
    assert "bottleneck_pool=1" in client.get_run(coarse_run).data.tags["superseded_reason"]
    assert client.get_run(first_run).data.tags["fallback_of"] == coarse_run
    assert client.get_run(run_id).data.params["model.bottleneck_pool"] == "1"

    untouched = {p.name: p.stat().st_mtime_ns for p in (out / "coarse").iterdir()}
    more = lite_cfg(weave, out, **{**settings, "train.iters": 40})
    with one_thread(), pytest.warns(RuntimeWarning, match="did not converge"):
        resumed, _, resumed_run = pipeline.run_training(more, resume=True)
    assert resumed_run == run_id and resumed.iterations == 40 and not resumed.coarse_attempt
    assert load_checkpoint(out / "last.ckpt")["config"]["model"]["bottleneck_pool"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "coarse").iterdir()} == untouched


def test_pool_fallback_leaves_a_run_that_converged_or_has_no_coarse_code_alone():
    flagged, ok = Health(NOT_CONVERGED, ["the loss stalled"]), Health(OK, [])
    coarse = apply_overrides(Config(), {"model.bottleneck_pool": 2, "train.pool_fallback": True})
    assert pipeline.falls_back(coarse, flagged) and not pipeline.falls_back(coarse, ok)
    fine = pipeline.fine_config(coarse)
    assert (fine.model.bottleneck_pool, fine.train.pool_fallback) == (1, False)
    assert not pipeline.falls_back(fine, flagged)  # nor train.bn_fallback, off here
    assert not pipeline.pool_fallback_applies(apply_overrides(Config(), {"train.pool_fallback": True}))
