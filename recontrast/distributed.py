"""Data-parallel training under torchrun: the process group, each rank's part of the batch,
and the two batch-wide statistics of the method taken over the whole global batch.

`torchrun --nproc_per_node=N -m recontrast train ...` starts N processes with RANK,
LOCAL_RANK and WORLD_SIZE set; `recontrast.train` then wraps the model in
DistributedDataParallel (NCCL on GPUs, gloo on CPU) and each rank trains on its slice of
the deterministic global batch (docs/scaling.md). Two things in ReContrast see the whole
batch, and here they still do:
- BatchNorm: the decoder normalises both encoders' halves concatenated on the batch axis
  (2B images). `sync_batchnorm` makes train-mode BN use the mean and variance of all ranks'
  images (`train.sync_bn`); without it each rank normalises its 2B/N images alone.
- hard mining: the threshold mean(d) + alpha * std(d) is over the batch; `GlobalBatchLoss`
  takes both moments over all ranks.
Both reduce with torch.distributed's autograd-aware all_reduce, so gradients match one
process's. torch.nn.SyncBatchNorm is not used: its kernels are CUDA-only (it refuses CPU
tensors, i.e. gloo) and it would replace the stable variant's partial BN and drop timm's
BatchNormAct2d activation.
"""
from __future__ import annotations

import atexit
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce
from torch.nn.modules.batchnorm import _BatchNorm

from recontrast.config import ConfigError
from recontrast.loss import ReContrastLoss
from recontrast.model import PartialBatchNorm2d, mix_into


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0: the one process that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """Returns the rank and world size torchrun set in the environment (1 process without it)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def is_main_process() -> bool:
    """True unless this is a torchrun process other than rank 0."""
    return world().is_main


def join(device: torch.device) -> tuple[World, torch.device]:
    """Returns (world, this rank's device) after joining the process group torchrun set up
    (NCCL for CUDA, gloo otherwise); a single process joins nothing."""
    here = world()
    if not here.distributed:
        return here, device
    if device.type == "cuda":
        device = torch.device("cuda", here.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_stop)
    # Its suggested replacement (_functional_collectives) has no autograd for all_reduce.
    warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_reduce is deprecated", FutureWarning)
    return here, device


def _stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_part(indices: Tensor, here: World) -> Tensor:
    """Returns this rank's contiguous slice of the global batch's indices: rank r of N gets
    indices[r * B/N : (r + 1) * B/N], so the N slices in rank order are the global batch."""
    per_rank = len(indices) // here.size
    return indices[here.rank * per_rank : (here.rank + 1) * per_rank]


def check_batch(batch_size: int, here: World, n_images: int = 0) -> None:
    """Raises ConfigError unless every global batch splits evenly over the processes
    (`n_images`: the training set's size when a short last batch is kept, drop_last=false)."""
    if batch_size % here.size:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch and must split evenly over "
                          f"the {here.size} torchrun processes; use a multiple of {here.size}")
    if here.distributed and n_images % batch_size % here.size:
        raise ConfigError(f"the last batch of each epoch ({n_images % batch_size} of {n_images} images) does not "
                          f"split over {here.size} processes: set train.drop_last=true")


def mean_over_ranks(value: Tensor) -> Tensor:
    """Returns the mean of `value` over the ranks (the value itself in one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


# ----------------------------------------------------------------------------- BatchNorm
class _GlobalBatchStats:
    """Train-mode BatchNorm normalising with the mean and (biased) variance of every rank's
    values, updating its running statistics with them; elsewhere the class it extends.

    Two passes (mean, then the squared deviations from it) keep the variance as accurate as
    one process's; the all_reduce is autograd-aware, so gradients flow through the global
    statistics to every rank's inputs, as in one process with the whole batch.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()  # statistics in fp32, also under autocast
        count = xf.numel() // xf.shape[1] * dist.get_world_size()  # ranks hold equal batches
        mean = differentiable_all_reduce(xf.sum(dim=(0, 2, 3))) / count
        centred = xf - mean[None, :, None, None]
        var = differentiable_all_reduce((centred * centred).sum(dim=(0, 2, 3))) / count
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.weight is not None:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / max(count - 1, 1), momentum)
        y = y.to(x.dtype)
        if hasattr(self, "act"):  # timm's BatchNormAct2d: BN, then drop and activation
            y = self.act(self.drop(y))
        return y


def sync_batchnorm(module: nn.Module) -> int:
    """Returns how many BatchNorm layers of `module` now use global batch statistics (in place).

    Each layer keeps its class's attributes and state_dict keys (a checkpoint loads in one
    process); the stable variant's PartialBatchNorm2d keeps per-rank statistics.
    """
    return mix_into(module, lambda m: isinstance(m, _BatchNorm) and not isinstance(m, PartialBatchNorm2d),
                    _GlobalBatchStats)


# ----------------------------------------------------------------------------- hard mining
def global_moments(d: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (mean, unbiased std) of `d` over all ranks' values, as torch's d.mean() and
    d.std() over the concatenated batch give them (two passes)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return d.mean(), d.std()
    count = d.numel() * dist.get_world_size()
    total = d.sum()
    dist.all_reduce(total)
    mean = total / count
    squares = ((d - mean) ** 2).sum()
    dist.all_reduce(squares)
    return mean, torch.sqrt(squares / max(count - 1, 1))


class GlobalBatchLoss(ReContrastLoss):
    """ReContrastLoss whose hard-mining threshold is taken over the global batch (all ranks).

    The value is each rank's mean over its own samples: DistributedDataParallel averages the
    gradients, which gives the gradient of the mean over the global batch.
    """

    moments = staticmethod(global_moments)
