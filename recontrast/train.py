"""Training: one readable loop over iterations, two AdamW optimizers, atomic checkpoints.

`train(cfg)` is the whole recipe of docs/method.md: `setup` builds (or resumes) everything
the loop needs, and the loop in `train` reads top to bottom, one comment per step.
`Callback` is the only hook (MLflow tracking subclasses it; `recontrast.pipeline` ties
training, evaluation and tracking).
Sampling is a pure function of (seed, iteration), and the checkpoint holds model,
optimizers, RNG and loss history (and train.ema's average), so `resume=True` continues
bit-identically where a killed run stopped. Under torchrun each process trains on its slice
of that global batch with DistributedDataParallel (recontrast.distributed, docs/scaling.md);
rank 0 alone calls the callbacks, evaluates and writes checkpoints.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recontrast.checkpoint import (config_changes, load_checkpoint, restore_training_state,
                                   save_checkpoint, training_state)
from recontrast.config import Config, ConfigError, stable_loss_config, warmup_iters
from recontrast.cpu_memory import reuse_freed_memory
from recontrast.data import build_datasets
from recontrast.distributed import (GlobalBatchLoss, World, check_batch, join, mean_over_ranks, rank_part,
                                    sync_batchnorm)
from recontrast.evaluate import PROXY_SCORE
from recontrast.loss import ReContrastLoss
from recontrast.model import build_model
from recontrast.runtime import autocast_dtype, pick_device, progress_bar, progress_lines, seed_everything

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
    attempts: int = 1  # 2 when train.bn_fallback trained it again (fit_seconds counts both)
    attempt: int = 1  # which of them this is: train.bn_fallback keeps the second unless both were flagged
    coarse_attempt: bool = False  # a flagged training with model.bottleneck_pool > 1 came first (train.pool_fallback)
    position_spread: float | None = None  # the training images', when train.pool_max_spread chose the code


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


class WeightAverage:
    """The weights a run keeps under train.ema: an exponential moving average of the model's
    state (parameters and BatchNorm statistics; integer counters are copied), a snapshot every
    train.ema_every iterations and at the last. Off (train.ema 0, the paper) it holds nothing."""

    def __init__(self, cfg: Config):
        t = cfg.train
        if not 0.0 <= t.ema < 1.0 or t.ema_every < 1:
            raise ConfigError(f"train.ema={t.ema} must be in [0, 1) (0: off) and train.ema_every={t.ema_every} >= 1")
        self.decay, self.every, self.iters = t.ema, t.ema_every, t.iters
        self.state: dict[str, torch.Tensor] | None = None  # None until the first snapshot
        self._live: dict[str, torch.Tensor] | None = None  # the live weights while the average is applied

    def update(self, model: nn.Module, done: int) -> None:
        """Takes iteration `done`'s snapshot into the average, when one is due."""
        if self.decay == 0.0 or (done % self.every and done != self.iters):
            return
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.state[key].mul_(self.decay).add_(value, alpha=1 - self.decay)
            else:
                self.state[key].copy_(value)

    def live(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Returns the live weights' state, also while the average is applied."""
        return self._live if self._live is not None else model.state_dict()

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Holds the average in `model` for the block (nothing changes before the first
        snapshot), the live weights again after it."""
        if self.state is None:
            yield
            return
        self._live = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield
        finally:
            model.load_state_dict(self._live)
            self._live = None

    def into(self, ckpt: dict[str, Any], model: nn.Module, iteration: int) -> dict[str, Any]:
        """Returns checkpoint `ckpt` with the average: "ema" always; at the last iteration the
        average becomes "model" (what evaluation and inference load) and the live weights
        "live_model" (what a resume continues from)."""
        if self.state is not None:
            ckpt["ema"], ckpt["model"] = self.state, self.live(model)
            if iteration >= self.iters:
                ckpt["live_model"], ckpt["model"] = ckpt["model"], self.state
        return ckpt

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Takes the average a checkpoint holds (resume)."""
        if self.decay > 0.0 and ckpt.get("ema") is not None:
            self.state = {k: v.clone() for k, v in ckpt["ema"].items()}


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
        self.images = None  # decoded once by the dataset's cache; stacked here, on the device, when it fits
        if n * first.numel() * first.element_size() <= _STACK_LIMIT_BYTES:
            self.images = torch.stack([dataset[i]["image"] for i in range(n)]).to(device)

    def indices(self, iteration: int) -> torch.Tensor:
        """Returns the dataset indices of batch `iteration` (this rank's part of it)."""
        t = self.cfg.train
        return rank_part(batch_indices(len(self.dataset), t.batch_size, t.seed, iteration, t.drop_last), self.here)

    def __call__(self, iteration: int) -> torch.Tensor:
        idx = self.indices(iteration)
        if self.images is not None:
            return self.images[idx.to(self.device)]
        batch = torch.stack([self.dataset[i]["image"] for i in idx.tolist()])
        if self.device.type == "cuda":  # page-locked, so the copy overlaps the GPU's work
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)


class FrozenFeatures:
    """The frozen encoder's features of every training image, computed once (train.cache_features).

    The frozen encoder never changes and the recipe has no augmentation, so its features of an
    image are the same every epoch. They are computed in batches of train.batch_size, in the
    training's layout and precision: `__call__(iteration)` gives what the forward pass would
    compute for batch `iteration`, or None when caching is off or the features would not fit.
    """

    def __init__(self, model: nn.Module, batches: TrainBatches, cfg: Config):
        self.features: list[torch.Tensor] | None = None
        self.batches, t = batches, cfg.train
        if not t.cache_features:
            return
        if batches.images is None:
            log.warning("train.cache_features: the training images do not fit in memory at once; "
                        "the frozen features are computed every step")
            return
        images, bs = batches.images, t.batch_size
        per_image = sum(f[0].numel() * f.element_size() for f in model.frozen_features(images[:1]))
        needed = per_image * len(images) / 2**30
        if needed > t.cache_features_gb:
            log.warning("train.cache_features: the frozen features need %.1f GB, more than train.cache_features_gb"
                        "=%.1f; they are computed every step", needed, t.cache_features_gb)
            return
        chunks = [model.frozen_features(images[i:i + bs]) for i in range(0, len(images), bs)]
        self.features = [torch.cat(level) for level in zip(*chunks)]
        log.info("train.cache_features: frozen features of %d images kept (%.2f GB)", len(images), needed)

    def __call__(self, iteration: int) -> list[torch.Tensor] | None:
        if self.features is None:
            return None
        idx = self.batches.indices(iteration).to(self.features[0].device)
        # the layout the encoder gives (channels_last or not), so the decoder computes the same bits
        return [f[idx].contiguous(memory_format=_layout(f)) for f in self.features]


def _layout(t: torch.Tensor) -> torch.memory_format:
    nhwc = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


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


class Dispatch:
    """Calls one hook on every callback in turn: `calls.on_log(iteration, metrics)`."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def __getattr__(self, hook: str) -> Callable[..., None]:
        def call(*args, **kwargs) -> None:
            for cb in self.callbacks:
                getattr(cb, hook)(*args, **kwargs)
        return call


@dataclass
class Setup:
    """What the loop works with: built, and resumed from last.ckpt, by `setup`."""

    cfg: Config
    here: World
    device: torch.device
    model: nn.Module
    forward: Callable  # the model, or its DistributedDataParallel wrapper under torchrun
    optimizers: list[torch.optim.AdamW]
    scaler: torch.amp.GradScaler
    loss_fn: ReContrastLoss
    batches: TrainBatches
    frozen: FrozenFeatures
    selector: ProxySelection
    average: WeightAverage
    calls: Dispatch
    eval_fn: Callable[[nn.Module, int], dict] | None
    path: Path
    start: int = 0
    history: list[float] = field(default_factory=list)
    last_good: Path | None = None

    def schedule(self, it: int) -> list[torch.optim.AdamW]:
        """Returns the optimizers that step at iteration `it`: the stable variant resets the
        decoder's Adam moments every reset_every iterations and then pauses the encoder."""
        t = self.cfg.train
        if t.stable and it > 0 and it % t.reset_every == 0:
            self.optimizers[0].state.clear()
        paused = t.stable and it >= t.reset_every and it % t.reset_every < t.encoder_pause
        return self.optimizers[:1] if paused else self.optimizers

    def step(self, loss: torch.Tensor, stepped: list[torch.optim.AdamW]) -> None:
        """Back-propagates `loss` (scaled under fp16) and steps the optimizers in `stepped`."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for opt in stepped:
            self.scaler.step(opt)
        self.scaler.update()

    def state(self, iteration: int) -> dict[str, Any]:
        state = training_state(self.cfg, self.model, self.optimizers, self.scaler, iteration, self.history)
        return self.average.into(state, self.model, iteration)

    def save(self, iteration: int) -> None:
        """Writes last.ckpt (rank 0), once every weight is known to be finite."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise _diverged(iteration, "a weight", self.last_good, self.calls)
        if self.here.is_main:
            self.calls.before_checkpoint(iteration)
            save_checkpoint(self.path, self.state(iteration))
            self.calls.on_checkpoint(iteration, self.path)
        self.last_good = self.path

    def evaluate(self, iteration: int, result: TrainResult) -> int:
        """Evaluates the weights the run would keep now (eval_fn; train.ema: the average), tells
        the callbacks, offers them to the proxy selection."""
        with self.average.applied(self.model):
            self.model.eval()
            result.metrics = dict(self.eval_fn(self.model, iteration) or {})
            self.model.train()
            self.calls.on_eval(iteration, result.metrics)
            self.selector.offer(result.metrics, lambda: {**self.state(iteration), "model": self.model.state_dict()})
        return iteration


def setup(cfg: Config, callbacks: Sequence[Callback], resume: bool, eval_fn, datasets) -> Setup:
    """Returns the model, optimizers, batches and state of a training (resumed with `resume`)."""
    t = cfg.train
    here, device = join(pick_device(t.device))  # torchrun: this rank's device, the process group
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = t.cudnn_benchmark
    seed_everything(t.seed)
    datasets = datasets if datasets is not None else build_datasets(cfg.data)
    batches = TrainBatches(datasets.train, cfg, device, here)  # checks batch size before any work
    if not here.is_main:  # rank 0 alone logs, evaluates and writes files
        callbacks, eval_fn = (), None
    model = build_model(cfg).to(device)  # stable (partial BN), encoder BN mode, channels_last, compile
    if here.distributed and t.sync_bn:
        sync_batchnorm(model)  # BN statistics over the global batch, as in one process
    # Under torchrun, gradients are averaged over the ranks: the gradient of the global batch's mean loss.
    forward = (DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
               if here.distributed else model)
    optimizers = build_optimizers(cfg, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(t.precision, device) is torch.float16)
    loss_fn = (GlobalBatchLoss if here.distributed else ReContrastLoss)(stable_loss_config(cfg), t.iters)
    selector = ProxySelection(Path(t.out) / "best.ckpt", enabled=t.select == "proxy" and here.is_main,
                              resume=resume or not here.is_main)
    s = Setup(cfg, here, device, model, forward, optimizers, scaler, loss_fn, batches,
              FrozenFeatures(model, batches, cfg), selector, WeightAverage(cfg), Dispatch(callbacks), eval_fn,
              Path(t.out) / "last.ckpt")
    if resume:
        ckpt = load_checkpoint(s.path)
        for change in config_changes(ckpt["config"], cfg):
            log.warning("resume: setting changed since the checkpoint: %s", change)
        restore_training_state(ckpt, model, optimizers, scaler)
        s.average.restore(ckpt)
        s.start, s.history, s.last_good = ckpt["iteration"], list(ckpt["loss_history"]), s.path
        log.info("resuming %s at iteration %d of %d", s.path, s.start, t.iters)
    log.info("training on %s (precision %s): %d images, batch %d, iterations %d..%d", device, t.precision,
             len(datasets.train), t.batch_size, s.start, t.iters)
    if t.stable:
        log.info("stable variant: images are scored with eval.score=%s (the authors' stable runs use "
                 "topk_mean, the mean of the top %.0f %% of the map)", cfg.eval.score, 100 * cfg.eval.topk)
    return s


def train(
    cfg: Config,
    callbacks: Sequence[Callback] = (),
    resume: bool = False,
    eval_fn: Callable[[nn.Module, int], dict] | None = None,
    datasets=None,
) -> TrainResult:
    """Returns the trained model, its checkpoint <train.out>/last.ckpt and the loss history."""
    s = setup(cfg, callbacks, resume, eval_fn, datasets)
    t, model, calls, history = cfg.train, s.model, s.calls, s.history
    result = TrainResult(model, s.path, s.start, history)
    watch_from = warmup_iters(cfg) + t.divergence_window if t.divergence_window >= 3 else math.inf
    calls.on_start(cfg, model, s.start)
    model.train()  # ReContrast.train() keeps the frozen encoder and encoder BN as configured
    tick, last_eval, fit_start = (time.perf_counter(), s.start), None, time.perf_counter()
    memory = reuse_freed_memory(t.reuse_cpu_memory and s.device.type == "cpu")
    with progress_bar(t.iters, "train", "it", s.start, s.here.is_main) as bar, memory:
        for it in range(s.start, t.iters):
            # 1. The optimizers that step now (the stable variant resets and pauses some).
            stepped = s.schedule(it)
            # 2. Forward batch `it` (a function of seed and it); frozen features from the cache when kept.
            pairs = s.forward(s.batches(it), s.frozen(it))
            # 3. The loss in fp32, the global batch's value on every rank; NaN/inf stops the run.
            loss, info = s.loss_fn([(a.float(), b.float()) for a, b in pairs], it)
            value = mean_over_ranks(loss.detach()).item()
            if not math.isfinite(value):
                raise _diverged(it, f"the loss ({value})", s.last_good, calls)
            # 4. Backward and step; train.ema takes its snapshot when one is due.
            s.step(loss, stepped)
            history.append(value)
            done = result.iterations = it + 1
            s.average.update(model, done)
            bar.update(1)
            # 5. Every log_every iterations: the bar, a console line where no bar shows, the callbacks.
            if (t.log_every > 0 and done % t.log_every == 0) or done == t.iters:
                metrics = _log_metrics(history[tick[1] - done:], tick[0], info, s, stepped)
                tick = (time.perf_counter(), done)
                bar.set_postfix(loss=f"{value:.4f}", alpha=f"{metrics['alpha']:.2f}", refresh=False)
                if progress_lines(bar) and s.here.is_main:
                    print(progress_line(done, t.iters, metrics), flush=True)
                calls.on_log(done, metrics)
            # 6. Divergence watch: a rising loss after the warm-up is a warning; training goes on.
            if not result.loss_rising and done >= watch_from and rising_trend(history[-t.divergence_window:]):
                _warn(result, calls, f"training may be diverging: the loss rose over iterations "
                      f"{done - t.divergence_window}..{done} after the warm-up. Try train.stable=true, a "
                      f"lower train.lr, a longer warm-up (loss.warmup_min_iters) or loss.factor > 0")
            # 7. Checkpoint, then evaluate (train.select=proxy keeps the best evaluation's weights).
            if (t.checkpoint_every > 0 and done % t.checkpoint_every == 0) or done == t.iters:
                s.save(done)
            if s.eval_fn is not None and t.eval_every > 0 and done % t.eval_every == 0:
                last_eval = s.evaluate(done, result)
    result.fit_seconds = time.perf_counter() - fit_start
    if s.eval_fn is not None and last_eval != result.iterations:
        s.evaluate(result.iterations, result)
    if s.average.state is not None:  # train.ema: the run keeps the average
        model.load_state_dict(s.average.state)
    s.selector.restore_best(result)
    model.eval()
    calls.on_end(result)
    return result


def progress_line(done: int, total: int, metrics: dict) -> str:
    """Returns the line a run without a progress bar prints every train.log_every iterations:
    `train 40/280 (14%) loss 1.2345 (mean 1.3001) alpha 0.40 1.53 it/s, ETA 2m37s`."""
    rate = metrics["it_per_s"]
    eta = int(round((total - done) / rate)) if rate > 0 else 0
    return (f"train {done}/{total} ({100 * done // max(total, 1)}%) loss {metrics['loss']:.4f} "
            f"(mean {metrics['loss_avg']:.4f}) alpha {metrics['alpha']:.2f} {rate:.2f} it/s, "
            f"ETA {eta // 60}m{eta % 60:02d}s")


def _log_metrics(recent: list[float], since: float, info: dict, s: Setup, stepped: list) -> dict:
    """Returns what on_log gets: the last loss, its mean since the last log, alpha, lrs, it/s,
    and on CUDA the peak GPU memory so far."""
    optimizers = s.optimizers
    metrics = {"loss": recent[-1], "loss_avg": sum(recent) / len(recent), "alpha": float(info["alpha"]),
               "lr": optimizers[0].param_groups[0]["lr"],
               "it_per_s": len(recent) / max(time.perf_counter() - since, 1e-9)}
    if len(optimizers) > 1:
        metrics["encoder_lr"] = optimizers[1].param_groups[0]["lr"] if len(stepped) > 1 else 0.0
    if s.device.type == "cuda":
        metrics["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(s.device) / 2**30
    return metrics


def _warn(result: TrainResult, calls: Dispatch, message: str) -> None:
    result.loss_rising = True
    result.warnings.append(message)
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    calls.on_warning(message, LOSS_RISING)


def _diverged(iteration: int, what: str, last_good: Path | None, calls: Dispatch) -> TrainingDivergedError:
    """Returns the error to raise, after telling the callbacks (MLflow records the reason)."""
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    message = (f"training diverged at iteration {iteration}: {what} is NaN/inf; {kept}. "
               f"Try a lower train.lr, train.stable=true, or train.precision=fp32")
    calls.on_warning(message, DIVERGED)
    return TrainingDivergedError(message)
