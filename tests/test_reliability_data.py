"""Reliability, inputs: bad image files and bad configurations, tried end to end.

Each test makes the fault happen on a real (tiny) dataset and checks what a researcher sees:
a clear message naming the file/key and the fix, given before training starts (bad config:
before anything is written, no run folder, no MLflow run), or with
data.skip_bad_images=true a warning plus a logged count.
tests/test_data.py covers the same faults at the dataset level; these go through
`recontrast train` (cli.main), run_training and evaluate.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, write_config
from recontrast.data import DataWarning
from recontrast.images import IMAGENET_MEAN, IMAGENET_STD

CATEGORY = "weave"  # test/{good,hole,misweave,stain}, ground_truth/<type>/<stem>_mask.png


@pytest.fixture
def root(tmp_path, synthetic_root) -> Path:
    """Returns a writable copy of the synthetic dataset holding only CATEGORY (64 px)."""
    shutil.copytree(synthetic_root / CATEGORY, tmp_path / "data" / CATEGORY)
    return tmp_path / "data"


def runs_in(uri: str, out: Path) -> list:
    """Returns the runs in the store that trained (or tried to) into the run folder `out`."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(ids, run_view_type=ViewType.ALL, max_results=1000) if ids else []
    return [r for r in runs if r.data.params.get("train.out") == str(out)]


def _no_model(monkeypatch):
    from recontrast import train

    monkeypatch.setattr(train, "build_model", lambda cfg: pytest.fail("training started"))


# ----------------------------------------------------------------------------- bad images
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _mask_8x8(p: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(p)


def _truncated_jpeg(p: Path) -> Path:
    """Replaces the PNG `p` by the first 60 % of its JPEG (a download cut short); returns it."""
    jpeg = p.with_suffix(".jpg")
    Image.open(p).convert("RGB").save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: int(jpeg.stat().st_size * 0.6)])
    p.unlink()
    return jpeg


def _corrupt_pixels(p: Path) -> None:
    """Garbles the PNG's compressed pixel data and fixes the chunk checksum: the header and
    every CRC are valid, only decoding the pixels fails."""
    data = bytearray(p.read_bytes())
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4:at], "big")
    start = at + 4
    for i in range(start + length // 4, start + length - 8, 3):
        data[i] ^= 0x5A
    data[start + length:start + length + 4] = zlib.crc32(bytes(data[at:start + length])).to_bytes(4, "big")
    p.write_bytes(bytes(data))


DAMAGES = {
    "truncated_png": ("train/good/003.png", _truncate, r"003\.png' is truncated or corrupt"),
    "zero_byte": ("train/good/004.png", lambda p: p.write_bytes(b""), r"004\.png' is a zero-byte file"),
    "text_as_png": ("train/good/005.png", lambda p: p.write_text("id,label\n1,good\n"),
                    r"005\.png' is not an image"),
    "text_as_jpg": ("test/good/new.jpg", lambda p: p.write_text("not a jpeg"), r"new\.jpg' is not an image"),
    "corrupt_mask": ("ground_truth/hole/001_mask.png", _truncate, r"001_mask\.png' is truncated"),
    "mask_other_size": ("ground_truth/stain/000_mask.png", _mask_8x8,
                        r"000_mask\.png' is 8x8 but its image .*stain/000\.png' is 64x64"),
    # Files whose header (and PNG checksums) are fine: only decoding every pixel finds them.
    "truncated_jpeg": ("train/good/006.png", _truncated_jpeg, r"006\.jpg' is truncated or corrupt"),
    "png_corrupt_pixels": ("train/good/007.png", _corrupt_pixels, r"007\.png' is truncated or corrupt"),
    "truncated_jpeg_in_test_good": ("test/good/001.png", _truncated_jpeg, r"good/001\.jpg' is truncated or corrupt"),
    "mask_corrupt_pixels": ("ground_truth/hole/002_mask.png", _corrupt_pixels, r"002_mask\.png' is truncated"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_bad_file_stops_train_before_any_work_naming_the_file(damage, root, store, tmp_path, monkeypatch):
    where, spoil, message = DAMAGES[damage]
    spoil(root / CATEGORY / where)
    _no_model(monkeypatch)
    out = tmp_path / "run"
    error = run_cli(["train", "--config", str(write_config(tmp_path, root, CATEGORY)), "--out", str(out)])
    assert error is not None, "training went ahead on a broken dataset"
    assert error.startswith("recontrast train: BadImage") or "MaskMismatch" in error, error
    assert re.search(message, error), error
    if damage != "mask_other_size":  # unreadable files: the message names the way out
        assert "replace or delete it, or set data.skip_bad_images=true" in error
    assert not (out / "last.ckpt").exists()
    # run_training records data failures in MLflow: a run may exist, but ended FAILED with the
    # same message (what an overnight batch shows the next morning), never left RUNNING.
    for run in runs_in(store, out):
        assert run.info.status == "FAILED" and re.search(message, run.data.tags.get("error", ""))


def test_skip_bad_images_trains_warns_and_logs_the_count(root, store, tmp_path):
    _truncate(root / CATEGORY / "train" / "good" / "003.png")
    (root / CATEGORY / "train" / "good" / "004.png").write_bytes(b"")
    (root / CATEGORY / "test" / "good" / "002.png").write_text("not an image")
    config = write_config(tmp_path, root, CATEGORY, data={"skip_bad_images": True})
    with pytest.warns(DataWarning, match="skipping") as caught:
        assert run_cli(["train", "--config", str(config), "--out", str(tmp_path / "run")]) is None
    skipped = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(skipped) == 3 and any("003.png" in m for m in skipped) and any("002.png" in m for m in skipped)
    assert (tmp_path / "run" / "last.ckpt").is_file()

    (run,) = runs_in(store, tmp_path / "run")
    assert run.info.status == "FINISHED"
    # The count must reach the run (a metric, param or tag whose name says "skipped"),
    # not only the console: overnight batches are read from MLflow the next morning.
    logged = {**run.data.metrics, **run.data.params, **run.data.tags}
    counts = {k: v for k, v in logged.items() if "skipped" in k.lower()}
    numbers = [float(v) for v in counts.values() if str(v).replace(".", "", 1).isdigit()]
    assert numbers and (3.0 in numbers or sum(numbers) == 3.0), (
        f"no skipped-file count in the MLflow run (metrics/params/tags containing 'skipped': {counts})")


def test_with_skipping_a_file_that_fails_only_to_decode_is_skipped_everywhere_alike(root, store, tmp_path):
    """A truncated JPEG and a PNG with valid checksums but corrupt pixels in train/good, and a
    truncated JPEG in test/good: with data.skip_bad_images=true all three are skipped when
    the datasets are built, training and evaluation finish, and the checkpoint is calibrated."""
    from recontrast.checkpoint import load_checkpoint

    _truncated_jpeg(root / CATEGORY / "train" / "good" / "006.png")
    _corrupt_pixels(root / CATEGORY / "train" / "good" / "007.png")
    _truncated_jpeg(root / CATEGORY / "test" / "good" / "001.png")
    config = write_config(tmp_path, root, CATEGORY, data={"skip_bad_images": True})
    with pytest.warns(DataWarning, match="skipping") as caught:
        assert run_cli(["train", "--config", str(config), "--out", str(tmp_path / "run")]) is None
    skipped = sorted(Path(str(w.message).split("'")[1]).name for w in caught if "skipping" in str(w.message))
    assert skipped == ["001.jpg", "006.jpg", "007.png"]
    calibration = load_checkpoint(tmp_path / "run" / "last.ckpt")["calibration"]
    assert calibration["threshold_normal"] is not None and calibration["n_normal"] == 5  # 6 good, one skipped
    (run,) = runs_in(store, tmp_path / "run")
    assert run.info.status == "FINISHED" and run.data.metrics["data/skipped_images"] == 3


def test_a_test_split_left_empty_by_skipping_stops_before_training(root, store, tmp_path, monkeypatch):
    for image in (root / CATEGORY / "test").rglob("*.png"):
        image.write_bytes(image.read_bytes()[:40])  # every test image unreadable
    _no_model(monkeypatch)
    out = tmp_path / "run"
    config = write_config(tmp_path, root, CATEGORY, data={"skip_bad_images": True})
    with pytest.warns(DataWarning):
        error = run_cli(["train", "--config", str(config), "--out", str(out)])
    assert error is not None and re.search(r"every test image was skipped as unreadable \(15, e\.g\. ", error), error
    assert not out.exists() and runs_in(store, out) == []


def _rgb_back(item) -> np.ndarray:
    """Returns the item's image as (S, S, 3) on 0..255, undoing the ImageNet normalisation."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((item["image"] * std + mean) * 255).permute(1, 2, 0).numpy()


def test_odd_modes_and_a_10x_image_train_and_evaluate_correctly(root, tmp_path):
    """16-bit, palette, RGBA, grayscale and a 640 px image among 64 px ones: training and
    evaluation run, the big image is downscaled (not cropped) and its mask stays aligned."""
    from recontrast.config import load_config
    from recontrast.data import build_datasets
    from recontrast.evaluate import evaluate
    from recontrast.train import train

    rng = np.random.default_rng(0)
    good = root / CATEGORY / "train" / "good"
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(good / "000.png")  # 16-bit gray
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).convert("P").save(good / "001.png")
    rgba = np.dstack([np.asarray(Image.open(good / "002.png").convert("RGB")), np.full((64, 64), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(good / "002.png")
    Image.open(good / "003.png").convert("L").save(good / "003.png")
    big = np.asarray(Image.open(good / "004.png").convert("RGB").resize((640, 640), Image.BICUBIC))
    Image.fromarray(big).save(good / "004.png")
    modes = {p.name: Image.open(p).mode for p in sorted(good.iterdir())[:5]}
    assert modes == {"000.png": "I;16", "001.png": "P", "002.png": "RGBA", "003.png": "L", "004.png": "RGB"}
    # A 10x defect image with its 10x mask, and a mask holding 0/128/255.
    hole = root / CATEGORY / "test" / "hole" / "000.png"
    Image.open(hole).convert("RGB").resize((640, 640), Image.BICUBIC).save(hole)
    mask = np.zeros((640, 640), np.uint8)
    mask[100:300, 200:400] = 255
    Image.fromarray(mask).save(root / CATEGORY / "ground_truth" / "hole" / "000_mask.png")
    grey = np.asarray(Image.open(root / CATEGORY / "ground_truth" / "stain" / "001_mask.png")).copy()
    grey[:4, :4] = 128
    Image.fromarray(grey).save(root / CATEGORY / "ground_truth" / "stain" / "001_mask.png")

    cfg = load_config(write_config(tmp_path, root, CATEGORY),
                      [f"train.out={tmp_path / 'run'}", "tracking.enabled=false"])
    # Every file is decoded when the datasets are built (data.cache=true keeps the result):
    # an odd mask is said then, before training.
    with pytest.warns(DataWarning, match=r"001_mask\.png' holds values other than 0/255"):
        datasets = build_datasets(cfg.data)
    assert len(datasets.train) == 12 and not datasets.train.skipped and not datasets.test.skipped
    item = datasets.train[4]
    assert item["image"].shape == (3, 64, 64)
    expected = np.asarray(Image.fromarray(big).resize((64, 64), Image.BILINEAR), np.float32)
    assert np.abs(_rgb_back(item) - expected).mean() < 1.0 and np.abs(_rgb_back(item) - expected).max() < 8
    assert np.allclose(_rgb_back(datasets.train[0]), 40000 / 257, atol=0.6)  # 16 bit scaled, not clipped
    test_item = next(datasets.test[i] for i, s in enumerate(datasets.test.samples) if s.path == hole)
    expected_mask = torch.zeros(1, 64, 64)
    expected_mask[0, 10:30, 20:40] = 1
    assert torch.equal(test_item["mask"], expected_mask)

    result = train(cfg, datasets=datasets)
    assert result.iterations == 2 and all(np.isfinite(result.loss_history))
    evaluation = evaluate(result.model, datasets.test, cfg.eval)
    assert len(evaluation.records) == len(datasets.test) == 15
    assert all(np.isfinite(v) for v in evaluation.metrics.values())


# ----------------------------------------------------------------------------- bad config
CONFIG_FAULTS = {
    "unknown_key": (["--set", "train.itres=5"], r"unknown config key 'train\.itres' \(did you mean 'train\.iters'\?\)"),
    "unknown_section_in_yaml": ({"trian": {"iters": 5}}, r"unknown config key 'trian\.iters' \(did you mean 'train'\?\)"),
    "wrong_type_override": (["--set", "train.iters=abc"], r"train\.iters: expected an integer, got 'abc'"),
    "wrong_type_in_yaml": ({"train": {"lr": "fast"}}, r"train\.lr: expected a number, got 'fast'"),
    "bool_as_string": (["--set", "model.contrast=maybe"], r"model\.contrast: expected true or false"),
    "unknown_backbone": (["--set", "model.backbone=resnet19"],
                         r"unknown backbone 'resnet19'; did you mean 'resnet18'\?"),
    "size_not_multiple_of_32": (["--set", "data.image_size=100"],
                                r"data\.image_size=100 must be a positive multiple of 32 .*try 96 or 128"),
    "batch_larger_than_train_set": (["--set", "train.batch_size=13"],
                                    r"train\.batch_size=13 but only 12 training images .*lower it"),
    # Values that used to pass here, then fail in the middle of training or after it.
    "negative_lr": (["--set", "train.lr=-1"], r"train\.lr=-1\.0: must be > 0"),
    "nan_lr": (["--set", "train.lr=.nan"], r"train\.lr: expected a finite number, got nan"),
    "betas_out_of_range": (["--set", "train.betas=[2,3]"], r"train\.betas=\[2\.0, 3\.0\]: each value must be in \[0, 1\)"),
    "negative_weight_decay": (["--set", "train.weight_decay=-1"], r"train\.weight_decay=-1\.0: must be >= 0"),
    "unknown_device": (["--set", "train.device=foo"], r"train\.device='foo' is not a device"),
    "absent_cuda_device": (["--set", "train.device=cuda:7"], r"train\.device=cuda:7 but"),
    "fp16_on_cpu": (["--set", "train.precision=fp16", "train.device=cpu"], r"train\.precision=fp16 needs CUDA"),
    "empty_experiment": (["--set", "tracking.experiment="], r"tracking\.experiment is empty"),
    "stable_reset_every_0": (["--set", "train.stable=true", "train.reset_every=0"], r"train\.reset_every=0: must be >= 1"),
    "negative_sigma": (["--set", "eval.sigma=-1"], r"eval\.sigma=-1\.0: must be in \[0, 64\]"),
    "quantile_above_1": (["--set", "eval.threshold_quantile=2"], r"eval\.threshold_quantile=2\.0: must be in \[0, 1\]"),
    "pro_fpr_limit_0": (["--set", "eval.pro_fpr_limit=0"], r"eval\.pro_fpr_limit=0\.0: must be in \(0, 1\]"),
    "one_bin": (["--set", "eval.num_bins=1"], r"eval\.num_bins=1: must be in \[2, "),
    "yaml_syntax_error": ("train:\n  iters: [2\n", r"config\.yaml:3:1: YAML syntax error"),
    "yaml_top_level_list": ("- train\n- data\n", r"config\.yaml: the top level must be a mapping"),
    "yaml_top_level_scalar": ("just text\n", r"config\.yaml: the top level must be a mapping .*not str 'just text'"),
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_a_bad_config_exits_with_the_fix_before_any_work(fault, root, store, tmp_path):
    change, message = CONFIG_FAULTS[fault]
    sets = change if isinstance(change, list) else []
    config = write_config(tmp_path, root, CATEGORY, **(change if isinstance(change, dict) else {}))
    if isinstance(change, str):  # the file's text itself
        config.write_text(change)
    out = tmp_path / "run"
    error = run_cli(["train", "--config", str(config), "--out", str(out), *sets])
    assert error is not None and error.startswith("recontrast train: "), error
    assert re.search(message, error) and "\n" not in error, error
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert written == [], f"the run folder was written before the config error: {written}"
    runs = [(r.info.status, r.data.tags.get("error", "")[:80]) for r in runs_in(store, out)]
    assert runs == [], f"an MLflow run was created for a config that cannot work: {runs}"


@pytest.mark.slow
def test_the_cli_exit_is_one_line_without_a_traceback(root, tmp_path):
    config = write_config(tmp_path, root, CATEGORY)
    proc = subprocess.run(
        [sys.executable, "-m", "recontrast.cli", "train", "--config", str(config), "--no-track",
         "--out", str(tmp_path / "run"), "--set", "train.iters=abc", "model.backbone=resnet19"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "recontrast train: train.iters: expected an integer, got 'abc'"
    assert not (tmp_path / "run").exists()
