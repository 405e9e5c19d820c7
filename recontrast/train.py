"""Training: one readable loop over iterations, two AdamW optimizers, atomic checkpoints.

`train(cfg)` is the whole recipe of docs/method.md; `Callback` is the only hook (MLflow
tracking subclasses it; `recontrast.pipeline` ties training, evaluation and tracking).
Sampling is a pure function of (seed, iteration), and the checkpoint holds model,
optimizers, RNG and loss history, so `resume=True` continues bit-identically where a
killed run stopped. Under torchrun each process trains on its slice of that global batch
with DistributedDataParallel (recontrast.distributed, docs/scaling.md); rank 0 alone calls
the callbacks, evaluates and writes checkpoints.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recontrast.checkpoint import (config_changes, load_checkpoint, restore_training_state,
                                   save_checkpoint, training_state)
from recontrast.config import Config, ConfigError
from recontrast.cpu_memory import reuse_freed_memory
from recontrast.data import build_datasets
from recontrast.distributed import (GlobalBatchLoss, World, check_batch, join, mean_over_ranks, rank_part,
                                    sync_batchnorm)
from recontrast.evaluate import PROXY_SCORE
from recontrast.loss import ReContrastLoss
from recontrast.model import build_model
from recontrast.runtime import pick_device, progress_bar, progress_lines, seed_everything

log = logging.getLogger(__name__)
_STACK_LIMIT_BYTES = 4 << 30  # stack the cached train set into one tensor below this size


# What a warning is about (Callback.on_warning's `kind`; MLflow sets a tag of that name).
LOSS_RISING = "loss_rising"  # the loss trend rose after the warm-up: a warning, training goes on
DIVERGED = "diverged"  # the loss or a weight became NaN/inf: training stops


class TrainingDivergedError(RuntimeError):
    """The loss (or a weight) became NaN/inf; the last good checkpoint is kept."""


class Callback:
    """No-op hooks the loop calls; subclass and override what you need."""

    def on_start(self, cfg: Config, model: nn.Module, start_iteration: int) -> None: ...
    def on_log(self, iteration: int, metrics: dict[str, float]) -> None: ...
    def on_eval(self, iteration: int, metrics: dict[str, Any]) -> None: ...
    def on_warning(self, message: str, kind: str) -> None: ...
    def on_checkpoint(self, iteration: int, path: Path) -> None: ...
    # Before checkpoint `iteration` is written: what a resume from it would not log again
    # (the metrics of the iterations up to it) must be persisted now, not after.
    def before_checkpoint(self, iteration: int) -> None: ...
    def on_end(self, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    model: nn.Module
    checkpoint: Path
    iterations: int
    loss_history: list[float]
    loss_rising: bool = False  # a LOSS_RISING warning was given (divergence raises instead)
    warnings: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # the last eval_fn result
    fit_seconds: float = 0.0  # wall time of this call's training loop (checkpoints included)
    selected_iteration: int | None = None  # train.select=proxy: the iteration whose weights were kept
    health: Any = None  # health.Health, set by the pipeline once training ended


def batch_indices(n: int, batch_size: int, seed: int, iteration: int, drop_last: bool) -> torch.Tensor:
    """Returns the sample indices of batch `iteration`: a function of its arguments only.

    Each epoch is a permutation drawn from a generator seeded with seed * 1000 + epoch.
    """
    per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    epoch, k = divmod(iteration, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[k * batch_size : (k + 1) * batch_size]


class ProxySelection:
    """Keeps the weights of the evaluation with the best proxy/score in best.ckpt
    (train.select=proxy): model selection on synthetic defects, never on test labels."""

    def __init__(self, path: Path, enabled: bool, resume: bool):
        self.path, self.enabled, self.best = path, enabled, -math.inf
        if enabled and resume and path.is_file():
            self.best = load_checkpoint(path)["selection"]["score"]
        elif not resume:
            path.unlink(missing_ok=True)  # an earlier run's choice must not survive a new run

    def offer(self, metrics: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
        """Saves state() to best.ckpt when metrics' proxy/score beats every earlier one."""
        score = metrics.get(PROXY_SCORE, math.nan)
        if self.enabled and math.isfinite(score) and score > self.best:
            self.best = score
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or hasattr(v, "item")}
            save_checkpoint(self.path, {**state(), "selection": {"score": float(score), "metrics": numbers}})

    def restore_best(self, result: TrainResult) -> None:
        """Loads the selected weights into result.model; result.checkpoint becomes best.ckpt."""
        if not (self.enabled and self.path.is_file()):
            return
        ckpt = load_checkpoint(self.path)
        result.model.load_state_dict(ckpt["model"])
        result.checkpoint, result.selected_iteration = self.path, int(ckpt["iteration"])
        result.metrics = dict(ckpt["selection"]["metrics"])
        log.info("train.select=proxy: kept iteration %d (proxy/score %.4f)", result.selected_iteration, self.best)


class TrainBatches:
    """Gives batch `iteration` of the training images, shape (B, 3, S, S), on `device`;
    under torchrun this rank's slice of it, (B / N, 3, S, S)."""

    def __init__(self, dataset, cfg: Config, device: torch.device, here: World = World()):
        self.dataset, self.cfg, self.device, self.here = dataset, cfg, device, here
        n, bs = len(dataset), cfg.train.batch_size
        if bs > n:
            where = Path(cfg.data.root) / (f"{cfg.data.category}/train/good" if cfg.data.format == "mvtec" else "")
            held = f" (after holding out data.val_fraction={cfg.data.val_fraction})" if cfg.data.val_fraction else ""
            raise ConfigError(f"train.batch_size={bs} but only {n} training images{held} in {where}; lower it")
        check_batch(bs, here, n if not cfg.train.drop_last else 0)
        first = dataset[0]["image"]
        self.images = None  # decoded once by the dataset's cache; stacked here when it fits
        if n * first.numel() * first.element_size() <= _STACK_LIMIT_BYTES:
            self.images = torch.stack([dataset[i]["image"] for i in range(n)]).to(device)

    def __call__(self, iteration: int) -> torch.Tensor:
        t = self.cfg.train
        idx = rank_part(batch_indices(len(self.dataset), t.batch_size, t.seed, iteration, t.drop_last), self.here)
        if self.images is not None:
            return self.images[idx.to(self.device)]
        return torch.stack([self.dataset[i]["image"] for i in idx.tolist()]).to(self.device)


def rising_trend(losses: Sequence[float], min_rise: float = 0.1, min_t: float = 3.0) -> bool:
    """Returns True when `losses` clearly rise: least-squares slope over the window is
    > `min_rise` of the mean loss and > `min_t` standard errors above zero."""
    y = np.asarray(losses, dtype=np.float64)
    if len(y) < 3 or not np.isfinite(y).all():
        return False
    x = np.arange(len(y), dtype=np.float64) - (len(y) - 1) / 2
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    resid = y - y.mean() - slope * x
    stderr = math.sqrt((resid**2).sum() / (len(y) - 2) / (x * x).sum())
    rise = slope * (len(y) - 1) / max(abs(y.mean()), 1e-12)
    return rise > min_rise and slope > min_t * stderr


def stable_loss_config(cfg: Config):
    """Returns cfg.loss, with the stable variant's alpha warm-up of at least 20 % (method.md)."""
    if not cfg.train.stable or cfg.loss.warmup_fraction >= 0.2:
        return cfg.loss
    return replace(cfg.loss, warmup_fraction=0.2)


def warmup_iters(cfg: Config) -> int:
    """Returns the length of the alpha warm-up (method.md), after which divergence is watched."""
    loss = stable_loss_config(cfg)
    return max(math.ceil(loss.warmup_fraction * cfg.train.iters), loss.warmup_min_iters)


def build_optimizers(cfg: Config, model: nn.Module, device: torch.device) -> list[torch.optim.AdamW]:
    """Returns [decoder AdamW] plus [encoder AdamW] when the model has a trainable encoder."""
    t = cfg.train
    kw: dict[str, Any] = {"betas": tuple(t.betas), "weight_decay": t.weight_decay,
                          "eps": 1e-10 if t.stable else t.eps}
    if device.type == "cuda":
        kw["fused"] = True
    optimizers = [torch.optim.AdamW(list(model.decoder_params()), lr=t.lr, **kw)]
    encoder = [p for p in model.encoder_params() if p.requires_grad]
    if encoder:
        optimizers.append(torch.optim.AdamW(encoder, lr=t.encoder_lr, **kw))
    return optimizers


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.amp=fp16 needs CUDA (GradScaler); use train.amp=bf16 or none on {device.type}")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def train(
    cfg: Config,
    callbacks: Sequence[Callback] = (),
    resume: bool = False,
    eval_fn: Callable[[nn.Module, int], dict] | None = None,
    datasets=None,
) -> TrainResult:
    """Returns the trained model, its checkpoint <train.out>/last.ckpt and the loss history."""
    t = cfg.train
    here, device = join(pick_device(t.device))  # torchrun: this rank's device, the process group
    amp = _amp_dtype(t.amp, device)
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)
    if datasets is None:
        datasets = build_datasets(cfg.data)
    batches = TrainBatches(datasets.train, cfg, device, here)  # checks batch size before any work
    if not here.is_main:  # rank 0 alone logs, evaluates and writes files
        callbacks, eval_fn = (), None

    model = build_model(cfg).to(device)  # handles stable (partial BN), encoder BN mode, channels_last
    if here.distributed and t.sync_bn:
        sync_batchnorm(model)  # BN statistics over the global batch, as in one process
    optimizers = build_optimizers(cfg, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    loss_fn = (GlobalBatchLoss if here.distributed else ReContrastLoss)(stable_loss_config(cfg), t.iters)
    path = Path(t.out) / "last.ckpt"
    selector = ProxySelection(Path(t.out) / "best.ckpt", enabled=t.select == "proxy" and here.is_main,
                              resume=resume or not here.is_main)
    start, history, last_good = 0, [], None
    if resume:
        ckpt = load_checkpoint(path)
        for change in config_changes(ckpt["config"], cfg):
            log.warning("resume: setting changed since the checkpoint: %s", change)
        restore_training_state(ckpt, model, optimizers, scaler)
        start, history, last_good = ckpt["iteration"], list(ckpt["loss_history"]), path
        log.info("resuming %s at iteration %d of %d", path, start, t.iters)
    # Gradients averaged over the ranks: the gradient of the global batch's mean loss.
    forward = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if here.distributed else model

    def save(iteration: int) -> Path:
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise _diverged(iteration, "a weight", last_good, callbacks)
        if not here.is_main:
            return path
        for cb in callbacks:
            cb.before_checkpoint(iteration)
        save_checkpoint(path, training_state(cfg, model, optimizers, scaler, iteration, history))
        for cb in callbacks:
            cb.on_checkpoint(iteration, path)
        return path

    result = TrainResult(model, path, start, history)
    watch_from = warmup_iters(cfg) + t.divergence_window if t.divergence_window >= 3 else math.inf
    for cb in callbacks:
        cb.on_start(cfg, model, start)
    log.info("training on %s: %d images, batch %d, iterations %d..%d",
             device, len(datasets.train), t.batch_size, start, t.iters)
    if t.stable:
        log.info("stable variant: images are scored with eval.score=%s (the authors' stable runs use "
                 "topk_mean, the mean of the top %.0f %% of the map)", cfg.eval.score, 100 * cfg.eval.topk)
    model.train()  # ReContrast.train() keeps the frozen encoder and encoder BN as configured
    tick, last_eval = (time.perf_counter(), start), None
    fit_start = tick[0]
    reuse = reuse_freed_memory(t.reuse_cpu_memory and device.type == "cpu")
    with progress_bar(t.iters, "train", "it", start, here.is_main) as bar, reuse:
        for it in range(start, t.iters):
            if t.stable and it > 0 and it % t.reset_every == 0:
                optimizers[0].state.clear()  # the stable variant: fresh decoder Adam moments
            encoder_paused = t.stable and it >= t.reset_every and it % t.reset_every < t.encoder_pause
            x = batches(it)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                pairs = forward(x)
            loss, info = loss_fn([(a.float(), b.float()) for a, b in pairs], it)
            value = mean_over_ranks(loss.detach()).item()  # the global batch's loss on every rank
            if not math.isfinite(value):
                raise _diverged(it, f"the loss ({value})", last_good, callbacks)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            for opt in optimizers[:1] if encoder_paused else optimizers:
                scaler.step(opt)
            scaler.update()
            history.append(value)
            done = result.iterations = it + 1

            if (t.log_every > 0 and done % t.log_every == 0) or done == t.iters:
                metrics = _log_metrics(history[tick[1] - done:], tick[0], info, optimizers, encoder_paused)
                tick = (time.perf_counter(), done)
                bar.set_postfix(loss=f"{value:.4f}", alpha=f"{metrics['alpha']:.2f}", refresh=False)
                if progress_lines(bar) and here.is_main:  # no terminal or widget (nohup, a log file, batch)
                    print(progress_line(done, t.iters, metrics), flush=True)
                for cb in callbacks:
                    cb.on_log(done, metrics)
            bar.update(1)
            if not result.loss_rising and done >= watch_from and rising_trend(history[-t.divergence_window:]):
                _warn(result, callbacks, f"training may be diverging: the loss rose over iterations "
                      f"{done - t.divergence_window}..{done} after the warm-up. Try train.stable=true, a "
                      f"lower train.lr, a longer warm-up (loss.warmup_min_iters) or loss.factor > 0")
            if (t.checkpoint_every > 0 and done % t.checkpoint_every == 0) or done == t.iters:
                last_good = save(done)
            if eval_fn is not None and t.eval_every > 0 and done % t.eval_every == 0:
                last_eval = _evaluate(eval_fn, model, done, callbacks, result)
                selector.offer(result.metrics, lambda: training_state(cfg, model, optimizers, scaler, done, history))
    result.fit_seconds = time.perf_counter() - fit_start
    if eval_fn is not None and last_eval != result.iterations:
        _evaluate(eval_fn, model, result.iterations, callbacks, result)
        selector.offer(result.metrics, lambda: training_state(cfg, model, optimizers, scaler, result.iterations,
                                                              history))
    selector.restore_best(result)
    model.eval()
    for cb in callbacks:
        cb.on_end(result)
    return result


def progress_line(done: int, total: int, metrics: dict) -> str:
    """Returns the line a run without a progress bar prints every train.log_every iterations:
    `train 40/280 (14%) loss 1.2345 (mean 1.3001) alpha 0.40 1.53 it/s, ETA 2m37s`."""
    rate = metrics["it_per_s"]
    eta = int(round((total - done) / rate)) if rate > 0 else 0
    return (f"train {done}/{total} ({100 * done // max(total, 1)}%) loss {metrics['loss']:.4f} "
            f"(mean {metrics['loss_avg']:.4f}) alpha {metrics['alpha']:.2f} {rate:.2f} it/s, "
            f"ETA {eta // 60}m{eta % 60:02d}s")


def _log_metrics(recent: list[float], since: float, info: dict, optimizers, encoder_paused: bool) -> dict:
    """Returns what on_log gets: the last loss, its mean since the last log, alpha, lrs, it/s."""
    metrics = {"loss": recent[-1], "loss_avg": sum(recent) / len(recent), "alpha": float(info["alpha"]),
               "lr": optimizers[0].param_groups[0]["lr"],
               "it_per_s": len(recent) / max(time.perf_counter() - since, 1e-9)}
    if len(optimizers) > 1:
        metrics["encoder_lr"] = 0.0 if encoder_paused else optimizers[1].param_groups[0]["lr"]
    return metrics


def _evaluate(eval_fn, model: nn.Module, iteration: int, callbacks, result: TrainResult) -> int:
    model.eval()
    result.metrics = dict(eval_fn(model, iteration) or {})
    model.train()
    for cb in callbacks:
        cb.on_eval(iteration, result.metrics)
    return iteration


def _warn(result: TrainResult, callbacks, message: str) -> None:
    result.loss_rising = True
    result.warnings.append(message)
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    for cb in callbacks:
        cb.on_warning(message, LOSS_RISING)


def _diverged(iteration: int, what: str, last_good: Path | None, callbacks) -> TrainingDivergedError:
    """Returns the error to raise, after telling the callbacks (MLflow records the reason)."""
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    message = (f"training diverged at iteration {iteration}: {what} is NaN/inf; {kept}. "
               f"Try a lower train.lr, train.stable=true, or train.amp=none")
    for cb in callbacks:
        cb.on_warning(message, DIVERGED)
    return TrainingDivergedError(message)
