"""Checkpoints are written atomically and read without ever running code."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from recontrast import checkpoint as C


def sample(iteration: int) -> dict:
    return {"format": C.FORMAT, "model": {"w": torch.full((3,), float(iteration))},
            "optimizers": [], "iteration": iteration, "config": {}, "rng": C.rng_state(),
            "loss_history": [0.5] * iteration, "calibration": {}}


def test_roundtrip_and_rng_state(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = C.save_checkpoint(tmp_path / "run" / "last.ckpt", sample(2))
    expected = (random.random(), np.random.rand(), torch.rand(1))
    ckpt = C.load_checkpoint(path)
    assert ckpt["iteration"] == 2 and torch.equal(ckpt["model"]["w"], torch.full((3,), 2.0))
    C.set_rng_state(ckpt["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert os.listdir(tmp_path / "run") == ["last.ckpt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = C.save_checkpoint(tmp_path / "last.ckpt", sample(2))

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.torch, "save", disk_full)
    with pytest.raises(C.CheckpointError, match=rf"{tmp_path}.*No space left.*{tmp_path} is writable.*unchanged"):
        C.save_checkpoint(path, sample(4))
    monkeypatch.undo()
    assert C.load_checkpoint(path)["iteration"] == 2
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temp file left behind


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(C.CheckpointError, match="could not write checkpoint .*file"):
        C.save_checkpoint(blocker / "last.ckpt", sample(1))


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    payload = {"format": C.FORMAT, "model": Evil(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # reaches the GLOBAL opcode
    with pytest.raises(C.CheckpointError, match="(?s)refused .*evil.ckpt.*Only recontrast checkpoints.*posix.system"):
        C.load_checkpoint(path)
    assert not marker.exists()


def test_files_that_are_not_checkpoints(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "backbone.pth")
    with pytest.raises(C.CheckpointError, match="not a recontrast checkpoint.*model.pretrained"):
        C.load_checkpoint(tmp_path / "backbone.pth")
    (tmp_path / "junk.ckpt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(C.CheckpointError, match="junk.ckpt"):
        C.load_checkpoint(tmp_path / "junk.ckpt")
    with pytest.raises(C.CheckpointError, match="no checkpoint file .*missing.ckpt.*found: junk.ckpt"):
        C.load_checkpoint(tmp_path / "missing.ckpt")


def test_a_setting_newer_than_the_checkpoint_counts_as_its_default_on_resume():
    from recontrast.config import Config

    cfg = Config()
    stored = cfg.to_dict()
    del stored["model"]["freeze_stem"], stored["train"]["depthwise_fp32"]  # written before those keys existed
    assert C.config_changes(stored, cfg) == []
    cfg.model.freeze_stem = True
    assert C.config_changes(stored, cfg) == ["model.freeze_stem: False -> True"]
