"""Behaviour of the training loop: frozen encoder, learning, exact resume, NaN stop, checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recontrast import pipeline
from recontrast import train as T
from recontrast.checkpoint import load_checkpoint
from recontrast.model import build_model, load_model
from recontrast.config import Config, ConfigError, apply_overrides


def tiny_cfg(root, out, **overrides) -> Config:
    """resnet18 from scratch at 64 px: a few iterations take a second on a CPU."""
    from recontrast import synthetic

    base = {
        "data.root": str(root), "data.category": synthetic.CATEGORIES[0], "data.image_size": 64,
        "data.val_fraction": 0.0, "model.backbone": "resnet18", "model.pretrained": "none",
        "train.iters": 6, "train.batch_size": 2, "train.checkpoint_every": 2, "train.log_every": 1,
        "train.threads": 1, "train.out": str(out), "tracking.enabled": False,
    }
    return apply_overrides(Config(), {**base, **overrides})


@pytest.fixture(scope="module")
def datasets(synthetic_root):
    from recontrast.data import build_datasets

    return build_datasets(tiny_cfg(synthetic_root, "unused").data)


class Recorder(T.Callback):
    def __init__(self, stop_after_checkpoint: int | None = None):
        self.events, self.stop = [], stop_after_checkpoint

    def on_start(self, cfg, model, start_iteration):
        self.events.append(("start", start_iteration))
        self.start_state = {k: v.clone() for k, v in model.state_dict().items()}

    def on_log(self, iteration, metrics):
        self.events.append(("log", iteration, dict(metrics)))

    def on_eval(self, iteration, metrics):
        self.events.append(("eval", iteration, metrics))

    def on_warning(self, message, kind):
        self.events.append(("warning", message, kind))

    def on_checkpoint(self, iteration, path):
        self.events.append(("checkpoint", iteration))
        if iteration == self.stop:
            raise KeyboardInterrupt("simulated kill after the checkpoint")

    def on_end(self, result):
        self.events.append(("end", result.iterations))

    def kinds(self, kind):
        return [e for e in self.events if e[0] == kind]


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_frozen_encoder_unchanged_trainable_encoder_adapts(synthetic_root, datasets, tmp_path, bn):
    rec = Recorder()
    cfg = tiny_cfg(synthetic_root, tmp_path, **{"train.iters": 3, "model.encoder_bn": bn})
    result = T.train(cfg, [rec], datasets=datasets)
    after = result.model.state_dict()
    frozen = [k for k in after if k.startswith("encoder_frozen.")]
    weights = [k for k, p in result.model.named_parameters() if k.startswith("encoder.")]
    bn_stats = [k for k in after if k.startswith("encoder.") and k.endswith("running_mean")]
    assert frozen and weights and bn_stats
    assert all(torch.equal(rec.start_state[k], after[k]) for k in frozen)  # weights and BN stats
    assert any(not torch.equal(rec.start_state[k], after[k]) for k in weights)
    stats_moved = any(not torch.equal(rec.start_state[k], after[k]) for k in bn_stats)
    assert stats_moved == (bn == "train")  # encoder BN mode survives model.train() in the loop
    assert [e[1] for e in rec.kinds("log")] == [1, 2, 3]
    assert {"loss", "alpha", "lr", "encoder_lr", "it_per_s"} <= set(rec.kinds("log")[0][2])
    assert rec.events[0] == ("start", 0) and rec.events[-1] == ("end", 3)


def test_short_training_reduces_the_loss(synthetic_root, datasets, tmp_path, capsys):
    cfg = tiny_cfg(synthetic_root, tmp_path, **{"train.iters": 24, "train.batch_size": 4,
                                                "train.checkpoint_every": 0, "train.log_every": 10})
    losses = T.train(cfg, datasets=datasets).loss_history
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    # stdout is no terminal here: no bar, a progress line every log_every iterations and at the end
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train ")]
    assert [line.split()[1] for line in lines] == ["10/24", "20/24", "24/24"], lines
    assert f"loss {losses[9]:.4f}" in lines[0] and "it/s, ETA" in lines[0] and lines[-1].endswith("ETA 0m00s")


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_resume_after_a_kill_is_bit_identical(synthetic_root, datasets, tmp_path, ema):
    torch.use_deterministic_algorithms(True)
    extra = {"train.ema": ema, "train.ema_every": 2}
    try:
        ref = T.train(tiny_cfg(synthetic_root, tmp_path / "ref", **extra), datasets=datasets)
        cfg = tiny_cfg(synthetic_root, tmp_path / "killed", **extra)
        with pytest.raises(KeyboardInterrupt):
            T.train(cfg, [Recorder(stop_after_checkpoint=4)], datasets=datasets)
        assert load_checkpoint(tmp_path / "killed" / "last.ckpt")["iteration"] == 4
        rec = Recorder()
        resumed = T.train(cfg, [rec], resume=True, datasets=datasets)
    finally:
        torch.use_deterministic_algorithms(False)
    assert rec.events[0] == ("start", 4) and resumed.iterations == 6
    assert resumed.loss_history == ref.loss_history
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model, cfg2, ckpt = load_model(resumed.checkpoint)  # evaluate/predict path
    assert cfg2.model.pretrained == "none" and ckpt["iteration"] == 6 and not model.training
    assert all(torch.equal(v, b[k].cpu()) for k, v in model.state_dict().items())


def test_ema_keeps_the_average_of_the_snapshots_and_trains_on(synthetic_root, datasets, tmp_path):
    """train.ema: snapshots every ema_every iterations and at the last; evaluations see the
    average, training continues from the live weights; the final checkpoint holds both."""
    live, seen = {}, {}

    class Snapshots(T.Callback):
        def __init__(self):
            self.model = None

        def on_start(self, cfg, model, start_iteration):
            self.model = model

        def on_log(self, iteration, metrics):
            live[iteration] = {k: v.clone() for k, v in self.model.state_dict().items()}

    def eval_fn(model, iteration):
        seen[iteration] = {k: v.clone() for k, v in model.state_dict().items()}
        return {}

    cfg = tiny_cfg(synthetic_root, tmp_path, **{"train.iters": 5, "train.ema": 0.6, "train.ema_every": 2,
                                                "train.eval_every": 2})
    result = T.train(cfg, [Snapshots()], eval_fn=eval_fn, datasets=datasets)
    averages = {2: {k: v.clone() for k, v in live[2].items()}}
    for before, done in ((2, 4), (4, 5)):  # every 2nd iteration and the last
        averages[done] = {k: (a.clone().mul_(0.6).add_(live[done][k], alpha=0.4) if a.is_floating_point()
                              else live[done][k].clone()) for k, a in averages[before].items()}
    average, expected_at_4 = averages[5], averages[4]
    moving = [k for k, v in live[5].items() if v.is_floating_point() and not torch.equal(v, average[k])]
    assert moving  # the average is not the last weights
    assert all(torch.equal(seen[4][k], expected_at_4[k]) for k in expected_at_4)  # the eval saw the average
    assert not all(torch.equal(seen[4][k], live[4][k]) for k in moving)
    final = result.model.state_dict()
    assert all(torch.equal(final[k], average[k]) for k in average)  # the run keeps the average
    ckpt = load_checkpoint(result.checkpoint)
    assert all(torch.equal(ckpt["model"][k], average[k]) for k in average)
    assert all(torch.equal(ckpt["live_model"][k], live[5][k]) for k in live[5])  # a resume goes on from these
    model, _, _ = load_model(result.checkpoint)
    assert all(torch.equal(v, average[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("values", [{"train.ema": 1.0}, {"train.ema": -0.1}, {"train.ema": 0.5, "train.ema_every": 0}])
def test_ema_out_of_range_is_refused(synthetic_root, datasets, tmp_path, values):
    with pytest.raises(ConfigError, match="train.ema"):
        T.train(tiny_cfg(synthetic_root, tmp_path, **values), datasets=datasets)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_root, datasets, tmp_path, monkeypatch):
    from recontrast import loss as loss_module

    class NaNAt3(loss_module.ReContrastLoss):
        def __call__(self, pairs, iteration):
            loss, info = super().__call__(pairs, iteration)
            return (loss * float("nan") if iteration == 3 else loss), info

    monkeypatch.setattr(T, "ReContrastLoss", NaNAt3)  # the name train() calls
    rec = Recorder()
    with pytest.raises(T.TrainingDivergedError, match=r"iteration 3.*last\.ckpt.*train\.stable=true"):
        T.train(tiny_cfg(synthetic_root, tmp_path), [rec], datasets=datasets)
    ckpt = load_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["iteration"] == 2 and len(ckpt["loss_history"]) == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert rec.kinds("warning") and rec.kinds("warning")[0][2] == T.DIVERGED


def test_rising_loss_warns_once_and_eval_fn_runs(synthetic_root, datasets, tmp_path, monkeypatch):
    from recontrast import loss as loss_module

    class Rising(loss_module.ReContrastLoss):  # adds a ramp that the gradient cannot remove
        def __call__(self, pairs, iteration):
            loss, info = super().__call__(pairs, iteration)
            return loss.detach() * 0 + loss * 1e-3 + 1.0 + 0.5 * iteration, info

    monkeypatch.setattr(T, "ReContrastLoss", Rising)
    cfg = tiny_cfg(synthetic_root, tmp_path, **{
        "train.iters": 8, "train.divergence_window": 4, "loss.warmup_fraction": 0.0,
        "train.checkpoint_every": 0, "train.eval_every": 3})
    rec, seen = Recorder(), []

    def eval_fn(model, iteration):
        seen.append((iteration, model.training))
        return {"auroc": 0.5}

    with pytest.warns(RuntimeWarning, match="diverging"):
        result = T.train(cfg, [rec], eval_fn=eval_fn, datasets=datasets)
    assert result.loss_rising and len(result.warnings) == 1 and len(rec.kinds("warning")) == 1
    assert seen == [(3, False), (6, False), (8, False)] and result.metrics == {"auroc": 0.5}
    assert [e[1] for e in rec.kinds("eval")] == [3, 6, 8] and result.model.training is False


def test_stable_variant_resets_decoder_and_pauses_encoder(synthetic_root, datasets, tmp_path):
    cfg = tiny_cfg(synthetic_root, tmp_path, **{
        "train.iters": 4, "train.stable": True, "train.reset_every": 2, "train.encoder_pause": 2})
    rec = Recorder()
    snapshots = {}

    class Snap(T.Callback):
        def on_checkpoint(self, iteration, path):
            snapshots[iteration] = load_checkpoint(path)

    T.train(cfg, [rec, Snap()], datasets=datasets)
    at2, at4 = snapshots[2], snapshots[4]
    enc = [k for k, v in at2["model"].items() if k.startswith("encoder.") and "running" not in k
           and "num_batches" not in k and v.is_floating_point()]
    dec = [k for k in at2["model"] if k.startswith(("decoder", "bottleneck"))]
    assert enc and dec
    assert all(torch.equal(at2["model"][k], at4["model"][k]) for k in enc)  # paused at 2, 3
    assert any(not torch.equal(at2["model"][k], at4["model"][k]) for k in dec)
    for opt in at4["optimizers"]:
        assert opt["param_groups"][0]["eps"] == 1e-10
    # the decoder's Adam state restarted at iteration 2: two steps since, not four
    steps = {float(s["step"]) for s in at4["optimizers"][0]["state"].values()}
    assert steps == {2.0}


def test_batch_larger_than_the_training_set_fails_before_work(synthetic_root, datasets, tmp_path, monkeypatch):

    monkeypatch.setattr(T, "build_model", lambda cfg: pytest.fail("model was built"))
    n = len(datasets.train)
    with pytest.raises(ConfigError, match=rf"train.batch_size={n + 1} but only {n} training images in .*lower it"):
        T.train(tiny_cfg(synthetic_root, tmp_path / "run", **{"train.batch_size": n + 1}), datasets=datasets)
    assert not (tmp_path / "run").exists()


def test_resume_without_a_checkpoint_names_the_file(synthetic_root, datasets, tmp_path):
    from recontrast.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="last.ckpt"):
        T.train(tiny_cfg(synthetic_root, tmp_path), resume=True, datasets=datasets)


def test_batch_indices_are_a_function_of_seed_and_iteration():
    epoch0 = torch.cat([T.batch_indices(10, 3, 7, it, drop_last=True) for it in range(3)])
    assert len(set(epoch0.tolist())) == 9  # three full batches, the last sample dropped
    assert torch.equal(T.batch_indices(10, 3, 7, 4, True), T.batch_indices(10, 3, 7, 4, True))
    assert not torch.equal(T.batch_indices(10, 3, 7, 0, True), T.batch_indices(10, 3, 8, 0, True))
    assert [len(T.batch_indices(10, 3, 7, it, drop_last=False)) for it in range(5)] == [3, 3, 3, 1, 3]


def test_batches_without_the_stacked_copy_are_the_same(datasets, synthetic_root, monkeypatch):
    cfg = tiny_cfg(synthetic_root, "unused")
    stacked = T.TrainBatches(datasets.train, cfg, torch.device("cpu"))
    monkeypatch.setattr(T, "_STACK_LIMIT_BYTES", 0)  # a training set too large to stack
    streamed = T.TrainBatches(datasets.train, cfg, torch.device("cpu"))
    assert stacked.images is not None and streamed.images is None
    for it in (0, 5, 6, 11):
        assert torch.equal(stacked(it), streamed(it)) and stacked(it).shape == (2, 3, 64, 64)


def test_rising_trend_detector():
    rng = np.random.default_rng(0)
    x = np.arange(100)
    noise = rng.normal(0, 0.01, 100)
    assert T.rising_trend(0.1 + 0.002 * x + noise)  # doubles over the window
    assert not T.rising_trend(0.3 - 0.002 * x + noise)  # falling
    assert not T.rising_trend(0.2 + noise)  # flat and noisy
    assert not T.rising_trend(0.2 + 0.0001 * x + noise)  # a rise within the noise
    assert not T.rising_trend([0.1, float("nan"), 0.3])


def test_optimizers_follow_the_config(synthetic_root):

    cfg = tiny_cfg(synthetic_root, "unused")
    opts = T.build_optimizers(cfg, build_model(cfg), torch.device("cpu"))
    assert [o.param_groups[0]["lr"] for o in opts] == [2e-3, 1e-5]
    assert opts[0].param_groups[0]["eps"] == 1e-8 and opts[0].param_groups[0]["betas"] == (0.9, 0.999)
    cfg = tiny_cfg(synthetic_root, "unused", **{"model.domain_adaptation": False, "train.stable": True})
    opts = T.build_optimizers(cfg, build_model(cfg), torch.device("cpu"))
    assert len(opts) == 1 and opts[0].param_groups[0]["eps"] == 1e-10


def test_main_train_bf16_prints_the_checkpoint(synthetic_root, tmp_path, capsys):
    cfg = tiny_cfg(synthetic_root, "unused", **{"train.iters": 2, "train.precision": "bf16"})
    overrides = {k: v for k, v in cfg.flatten().items() if k.startswith(("data.", "model.", "train."))}
    result = pipeline.main_train(None, overrides, out=tmp_path / "cli", track=False)
    assert result.iterations == 2 and all(math.isfinite(v) for v in result.loss_history)
    assert f"checkpoint: {tmp_path / 'cli' / 'last.ckpt'}" in capsys.readouterr().out
    assert load_checkpoint(result.checkpoint)["config"]["train"]["precision"] == "bf16"


def test_fp16_needs_cuda_and_auto_follows_the_cpu():
    from recontrast.runtime import autocast_dtype, cpu_has_bf16

    with pytest.raises(ConfigError, match="fp16 needs CUDA.*bf16"):
        autocast_dtype("fp16", torch.device("cpu"))
    assert autocast_dtype("fp32", "cpu") is None and autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("auto", "cpu") is (torch.bfloat16 if cpu_has_bf16() else None)


def test_an_older_checkpoints_train_amp_reads_as_train_precision():
    from recontrast.config import from_dict

    assert from_dict({"train": {"amp": "none"}}).train.precision == "fp32"
    assert from_dict({"train": {"amp": "bf16"}}).train.precision == "bf16"


def test_bf16_forward_gives_fp32_maps_close_to_fp32(synthetic_root, datasets):
    cfg = tiny_cfg(synthetic_root, "unused")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.stack([datasets.train[i]["image"] for i in range(2)])
    fp32 = model.anomaly_pairs(x)
    model.precision = "bf16"
    assert all(p.dtype == torch.bfloat16 for _, p in model(x))  # the forward runs under autocast
    bf16 = model.anomaly_pairs(x)
    assert all(p.dtype == torch.float32 for pair in bf16 for p in pair)  # maps are computed in fp32
    for (t32, p32), (t16, p16) in zip(fp32, bf16):
        assert torch.allclose(p16, p32, rtol=0.05, atol=0.05 * p32.abs().max().item())


@pytest.mark.parametrize("extra", [{}, {"model.channels_last": True}, {"model.domain_adaptation": False},
                                   {"model.freeze_stem": True}])
def test_cached_frozen_features_train_bit_identically(synthetic_root, datasets, tmp_path, extra):
    runs = [T.train(tiny_cfg(synthetic_root, tmp_path / str(flag), **{"train.cache_features": flag, **extra}),
                    datasets=datasets) for flag in (False, True)]
    assert runs[0].loss_history == runs[1].loss_history
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b)


def test_feature_cache_too_large_is_skipped_with_a_warning(synthetic_root, datasets, tmp_path, caplog):
    cfg = tiny_cfg(synthetic_root, tmp_path, **{"train.cache_features": True, "train.cache_features_gb": 1e-9,
                                                "train.iters": 1})
    with caplog.at_level("WARNING"):
        T.train(cfg, datasets=datasets)
    assert "computed every step" in caplog.text


@pytest.mark.slow
def test_compiled_network_trains_and_keeps_its_state_dict_keys(synthetic_root, datasets, tmp_path):
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (cc/gcc), none found")
    cfg = tiny_cfg(synthetic_root, tmp_path, **{"model.compile": True, "train.iters": 2, "data.image_size": 32})
    result = T.train(cfg, datasets=datasets)
    assert all(math.isfinite(v) for v in result.loss_history)
    assert set(result.model.state_dict()) == set(build_model(tiny_cfg(synthetic_root, "x")).state_dict())


def test_reusing_freed_cpu_memory_changes_no_number(synthetic_root, datasets, tmp_path):
    from recontrast.cpu_memory import _glibc, reuse_freed_memory

    with reuse_freed_memory(False) as active:
        assert active is False
    with reuse_freed_memory(True) as active:  # Linux/glibc here; elsewhere it is a no-op
        assert active is (_glibc() is not None)
        kept = torch.ones(64 << 20, dtype=torch.uint8)  # a block glibc would otherwise mmap
        del kept
    runs = [T.train(tiny_cfg(synthetic_root, tmp_path / str(flag), **{"train.reuse_cpu_memory": flag}),
                    datasets=datasets) for flag in (True, False)]
    assert runs[0].loss_history == runs[1].loss_history
    for key, value in runs[0].model.state_dict().items():
        assert torch.equal(value, runs[1].model.state_dict()[key]), key


def test_progress_lines_where_no_bar_reaches_the_reader(monkeypatch):
    import io

    from tqdm import tqdm

    from recontrast.runtime import PROGRESS_LINES_ENV, progress_lines

    monkeypatch.delenv(PROGRESS_LINES_ENV, raising=False)
    shown, hidden = tqdm(total=1, file=io.StringIO(), disable=False), tqdm(total=1, disable=True)
    assert progress_lines(hidden) and not progress_lines(shown)
    monkeypatch.setenv(PROGRESS_LINES_ENV, "1")  # what `recontrast batch` sets for its notebooks
    assert progress_lines(shown)
    line = T.progress_line(40, 280, {"loss": 1.2345, "loss_avg": 1.3, "alpha": 0.4, "it_per_s": 0.5})
    assert line == "train 40/280 (14%) loss 1.2345 (mean 1.3000) alpha 0.40 0.50 it/s, ETA 8m00s"


def test_environment_sets_removes_and_restores(monkeypatch):
    import os

    from recontrast.runtime import environment

    monkeypatch.setenv("RECONTRAST_T_KEEP", "before")
    monkeypatch.delenv("RECONTRAST_T_NEW", raising=False)
    with environment(RECONTRAST_T_KEEP=None, RECONTRAST_T_NEW="1"):
        assert "RECONTRAST_T_KEEP" not in os.environ and os.environ["RECONTRAST_T_NEW"] == "1"
    assert os.environ["RECONTRAST_T_KEEP"] == "before" and "RECONTRAST_T_NEW" not in os.environ
