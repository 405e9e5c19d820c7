"""Data-parallel training under torchrun (recontrast/distributed.py): 2 gloo processes on the
CPU, each on its half of the global batch, train the model one process trains; BatchNorm and
the hard-mining threshold see the whole batch; rank 0 alone logs and writes the checkpoint.

Tolerances. One forward (the first loss) and the gradients of a small, well-conditioned block
agree to float32 reduction order (1e-5 relative): the sums behind the batch statistics are
merely taken in another order. Over training iterations the difference grows, and it is not a
bug: Adam's first steps move every weight by about lr * sign(gradient), so a gradient near 0
whose last bits differ moves its weight by 2 * lr instead of 0. Measured at this scale
(resnet18 from scratch, 64 px, global batch 4), one process alone changes its own loss
history by up to 2 % relative within 8 iterations when only its summation order changes
(model.channels_last=true, or 2 threads instead of 1); 2 processes stay within that band, so
the history is held to 5 % relative per step, and the first loss to 1e-5.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import run_cli, write_config
from recontrast import distributed as D
from recontrast import synthetic
from recontrast.checkpoint import load_checkpoint
from recontrast.config import Config, ConfigError
from recontrast.loss import ReContrastLoss
from recontrast.model import DeBottleneck, load_model

REPO = Path(__file__).resolve().parents[1]
CATEGORY = synthetic.CATEGORIES[0]
FIRST_LOSS_RTOL = 1e-5  # one forward: float32 reduction order
HISTORY_RTOL = 5e-2  # 8 Adam steps: see the module docstring


# ----------------------------------------------------------------------------- 2 processes, one block
def _inputs():
    """Returns a BN block, its global batch (4, 16, 8, 8) and 3 (target, prediction) pairs whose
    two halves differ in spread (a per-rank threshold would differ from the global one)."""
    torch.manual_seed(0)
    block = DeBottleneck(16, 4, 16)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 16, 8, 8)
    noise = torch.tensor([0.3, 0.3, 1.5, 1.5]).view(4, 1, 1, 1)  # rank 1's half: worse reconstructions
    targets = [torch.randn(4, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4))]
    return block, x, [(t, t + noise * torch.randn_like(t)) for t in targets]


def _grads(block, x, pairs, part=slice(None), loss_cls=ReContrastLoss, sync=False):
    """Returns the block's gradients and the predictions' gradients for the rows `part`."""
    cfg = Config().loss
    if sync:
        D.sync_batchnorm(block)
    block.train()
    y = block(x[part])
    ((y * 3).sin().mean(dim=(1, 2, 3)).sum() / y.shape[0]).backward()
    preds = [p[part].clone().requires_grad_() for _, p in pairs]
    loss, _ = loss_cls(cfg, total_iters=10)([(t[part], p) for (t, _), p in zip(pairs, preds)], 10)  # alpha = 1
    loss.backward()
    return [p.grad for p in block.parameters()], [p.grad for p in preds], float(loss.detach()), y.detach()


def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        block, x, pairs = _inputs()
        rows = slice(2 * rank, 2 * rank + 2)
        synced = _grads(block, x, pairs, rows, D.GlobalBatchLoss, sync=True)
        plain = _grads(*_inputs(), rows)  # per-rank statistics: what sync_bn=false gives
        block_grads = [g.clone() for g in synced[0]]
        for g in block_grads:
            dist.all_reduce(g)  # what DistributedDataParallel does (sum, then / world size)
        loss = D.mean_over_ranks(torch.tensor(synced[2]))
        torch.save({"block": [g / 2 for g in block_grads], "preds": synced[1], "loss": float(loss),
                    "y": synced[3], "y_plain": plain[3], "preds_plain": plain[1]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return float((a - b).norm()) <= rtol * float(b.norm()) + 1e-12


@pytest.mark.slow
def test_bn_statistics_and_hard_mining_threshold_are_those_of_the_global_batch(tmp_path):
    block_ref, pred_ref, loss_ref, y_ref = _grads(*_inputs())
    torch.multiprocessing.spawn(_rank, args=(_free_port(), str(tmp_path / "rank")), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank.{r}") for r in (0, 1)]

    y = torch.cat([r["y"] for r in ranks])
    assert _close(y, y_ref)  # forward: BN normalised with the global mean and variance
    assert not _close(torch.cat([r["y_plain"] for r in ranks]), y_ref, 1e-2)  # not so per rank
    assert all(_close(a, b) for a, b in zip(ranks[0]["block"], block_ref))  # BN backward over ranks
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["block"], ranks[1]["block"]))
    assert abs(ranks[0]["loss"] - loss_ref) <= 1e-6 * abs(loss_ref)
    for level, ref in enumerate(pred_ref):
        # Each rank's loss is its mean over 2 of the 4 samples: its gradient is twice one process's.
        got = torch.cat([r["preds"][level] for r in ranks]) / 2
        assert torch.equal(got == 0, ref == 0), f"level {level}: another hard-mining mask"
        assert _close(got, ref), level
        plain = torch.cat([r["preds_plain"][level] for r in ranks]) / 2
        assert not torch.equal(plain == 0, ref == 0)  # per-rank thresholds would mask other points


def test_the_global_batch_must_split_evenly():
    two = D.World(rank=1, size=2)
    assert D.rank_part(torch.arange(6), two).tolist() == [3, 4, 5]
    with pytest.raises(ConfigError, match="multiple of 2"):
        D.check_batch(5, two)
    with pytest.raises(ConfigError, match="drop_last=true"):
        D.check_batch(4, two, n_images=9)  # a last batch of 1 image
    D.check_batch(4, two, n_images=10)
    D.check_batch(5, D.World())


# ----------------------------------------------------------------------------- torchrun, end to end
def _torchrun(args: list[str], env: dict[str, str], log: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "recontrast", "train", *args]
    with log.open("a") as out:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, log.read_text()[-4000:]


@pytest.mark.e2e
def test_torchrun_on_two_cpu_processes_trains_what_one_process_trains(synthetic_root, store, tmp_path):
    config = write_config(tmp_path, synthetic_root, CATEGORY, data={"val_fraction": 0.0},
                          train={"iters": 8, "batch_size": 4, "checkpoint_every": 4, "log_every": 1},
                          tracking={"experiment": "ddp"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": store,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    ddp, log = tmp_path / "ddp", tmp_path / "torchrun.log"
    # Stopped at iteration 4, then resumed to 8: resume works under torchrun as in one process.
    _torchrun(["--config", str(config), "--out", str(ddp), "--set", "train.iters=4"], env, log)
    _torchrun(["--config", str(config), "--out", str(ddp), "--resume"], env, log)
    assert run_cli(["train", "--config", str(config), "--out", str(tmp_path / "one"), "--no-track"]) is None

    two, one = load_checkpoint(ddp / "last.ckpt"), load_checkpoint(tmp_path / "one" / "last.ckpt")
    assert two["iteration"] == one["iteration"] == 8
    h2, h1 = np.array(two["loss_history"]), np.array(one["loss_history"])
    assert abs(h2[0] - h1[0]) <= FIRST_LOSS_RTOL * h1[0], (h2[0], h1[0])
    assert np.all(np.abs(h2 - h1) <= HISTORY_RTOL * h1), np.abs(h2 - h1) / h1
    assert h2[-1] < 0.8 * h2[0]  # it learned

    # Rank 0 alone logged: one run, FINISHED, with the global batch's loss at every step.
    from mlflow import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = sorted(client.get_metric_history(runs[0].info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in logged] == list(range(1, 9))
    assert np.allclose([m.value for m in logged], h2, rtol=1e-6)

    # The checkpoint is an ordinary one: it loads and scores in one process.
    model, _, _ = load_model(ddp / "last.ckpt")
    assert two["model"].keys() == one["model"].keys()
    with torch.no_grad():
        pairs = model.anomaly_pairs(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(p).all() for pair in pairs for p in pair)
    assert two["calibration"]  # rank 0 evaluated it (recontrast train evaluates at the end)
