import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from recontrast.config import DataConfig
from recontrast.data import (BadImage, CategoryNotFound, DataWarning, EmptySplit, FolderDataset,
                             MaskMismatch, MaskMissing, MVTecDataset, RootNotFound, build_datasets,
                             every_kth)
from recontrast.images import IMAGENET_MEAN, IMAGENET_STD
from conftest import SYNTH


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _pixel(item):
    """Returns the item's top-left RGB pixel back on the 0..255 range."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (item["image"][:, 0, 0] * std + mean) * 255


@pytest.fixture
def disc(tmp_path, synthetic_root):
    """Returns a writable copy of the synthetic 'disc' category's root."""
    shutil.copytree(synthetic_root / "disc", tmp_path / "disc")
    return tmp_path


def _tree(root, n_train=3, size=16):
    """Writes a minimal MVTec tree (category 'c', one 'dent' defect) and returns root."""
    rng = np.random.default_rng(0)
    for i in range(n_train):
        _png(root / "c" / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (size, size, 3), np.uint8))
    _png(root / "c" / "test" / "good" / "000.png", rng.integers(0, 255, (size, size, 3), np.uint8))
    _png(root / "c" / "test" / "dent" / "000.png", rng.integers(0, 255, (size, size, 3), np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[2:6, 3:9] = 255
    _png(root / "c" / "ground_truth" / "dent" / "000_mask.png", mask)
    return root


def test_synthetic_items(synthetic_root):
    train = MVTecDataset(synthetic_root, "bar", "train", image_size=32)
    test = MVTecDataset(synthetic_root, "bar", "test", image_size=32)
    assert len(train) == SYNTH["n_train"] and train.defect_types == []
    assert len(test) == SYNTH["n_test_good"] + 3 * SYNTH["n_test_defect"]
    assert test.defect_types == ["misplaced_part", "missing_part", "thread"] and test.has_masks
    for item in (test[0], test[len(test) - 1]):
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["label"] == int(item["defect_type"] != "good") and item["path"].endswith(".png")
        assert (item["mask"].sum() > 0) == bool(item["label"])
    assert -2.2 < float(test[0]["image"].min()) and float(test[0]["image"].max()) < 2.7


def test_cache_keeps_decoded_tensors(synthetic_root):
    ds = MVTecDataset(synthetic_root, "weave", "test", image_size=64, cache=True)
    first = ds[-1]
    assert ds._cache[-1] is not None
    again = ds[-1]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    plain = MVTecDataset(synthetic_root, "weave", "test", image_size=64)[-1]
    assert torch.equal(plain["image"], first["image"])


def test_build_datasets_holds_out_every_kth(synthetic_root):
    cfg = DataConfig(root=str(synthetic_root), category="grain", image_size=32, val_fraction=0.25)
    ds = build_datasets(cfg)
    assert (len(ds.train), len(ds.val)) == (9, 3) and len(ds.test) == 15
    assert not {s.path for s in ds.train.samples} & {s.path for s in ds.val.samples}
    assert build_datasets(cfg, val_fraction=0.0).val is None
    assert len(build_datasets(cfg, val_fraction=0.01).val) == 1
    assert every_kth(10, 0.1) == [5] and every_kth(10, 0.5) == [1, 3, 5, 7, 9]
    with pytest.raises(Exception, match="format"):
        build_datasets(DataConfig(root=str(synthetic_root), format="zip"))


def test_real_bottle(real_mvtec_root):
    train = MVTecDataset(real_mvtec_root, "bottle", "train", image_size=64)
    test = MVTecDataset(real_mvtec_root, "bottle", "test", image_size=64)
    assert len(train) == 209
    assert sum(s.label == 0 for s in test.samples) == 20 and sum(s.label for s in test.samples) == 63
    for s in test.samples:
        if s.label:
            assert Image.open(s.mask_path).size == Image.open(s.path).size
    item = test[0]
    assert item["defect_type"] == "broken_large" and item["mask"].sum() > 0


def test_missing_root_says_how_to_get_data(tmp_path):
    with pytest.raises(RootNotFound, match="recontrast synth --out .*MVTec AD"):
        MVTecDataset(tmp_path / "nope", "bottle", "train")


def test_missing_category_lists_what_exists(synthetic_root):
    with pytest.raises(CategoryNotFound, match="no folder 'disk' .*did you mean 'disc'.*"
                       "found: bar, board, disc, grain, mesh, weave"):
        MVTecDataset(synthetic_root, "disk", "train")


def test_empty_train_good(tmp_path):
    (tmp_path / "c" / "train" / "good").mkdir(parents=True)
    (tmp_path / "c" / "train" / "good" / "notes.txt").write_text("x")
    with pytest.raises(EmptySplit, match=r"train/good' holds no image but 1 other entry \(notes\.txt\)"):
        MVTecDataset(tmp_path, "c", "train")


@pytest.mark.parametrize("damage,message", [
    ("truncate", "truncated or corrupt"),
    ("zero", "zero-byte file"),
    ("text", "not an image"),
])
def test_unreadable_images_are_named(disc, damage, message):
    bad = disc / "disc" / "train" / "good" / "001.png"
    data = bad.read_bytes()
    bad.write_bytes({"truncate": data[: len(data) // 2], "zero": b"", "text": b"hello, not a png"}[damage])
    with pytest.raises(BadImage, match=f"001.png.*{message}.*skip_bad_images=true"):
        MVTecDataset(disc, "disc", "train")


def test_skip_bad_warns_and_counts(disc):
    (disc / "disc" / "train" / "good" / "002.png").write_bytes(b"")
    (disc / "disc" / "train" / "good" / "003.png").write_bytes(b"junk")
    with pytest.warns(DataWarning, match="skipping"):
        ds = MVTecDataset(disc, "disc", "train", skip_bad=True)
    assert len(ds) == SYNTH["n_train"] - 2 and len(ds.skipped) == 2
    assert ds.skipped[0][0].endswith("002.png") and "zero-byte" in ds.skipped[0][1]
    cfg = DataConfig(root=str(disc), category="disc", skip_bad_images=True, image_size=32)
    with pytest.warns(DataWarning):
        built = build_datasets(cfg)
    assert len(built.train.skipped) == 2 and built.val.skipped == []


def test_modes_load_as_rgb(tmp_path):
    root = _tree(tmp_path)
    folder = root / "c" / "train" / "good"
    gray16 = np.full((16, 16), 65535 // 2, np.uint16)  # 32767 -> 127.5 after /257
    _png(folder / "000.png", gray16)
    _png(folder / "001.png", np.full((16, 16), 200, np.uint8))  # L
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.info["transparency"] = 0
    pal.save(folder / "002.png", transparency=0)
    _png(folder / "003.png", np.tile(np.array([1, 2, 3, 0], np.uint8) * 40, (16, 16, 1)))  # RGBA
    ds = MVTecDataset(root, "c", "train", image_size=16)
    assert Image.open(folder / "000.png").mode.startswith("I")
    assert torch.allclose(_pixel(ds[0]), torch.full((3,), 32767 / 257), atol=0.6)
    assert torch.allclose(_pixel(ds[1]), torch.full((3,), 200.0), atol=0.01)
    assert torch.allclose(_pixel(ds[2]), torch.tensor([10.0, 20, 30]), atol=0.01)
    assert torch.allclose(_pixel(ds[3]), torch.tensor([40.0, 80, 120]), atol=0.01)


def test_mask_of_another_size(tmp_path):
    root = _tree(tmp_path)
    _png(root / "c" / "ground_truth" / "dent" / "000_mask.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(MaskMismatch, match=r"000_mask.png' is 8x8 but its image .*000.png' is 16x16"):
        MVTecDataset(root, "c", "test")


def test_non_binary_masks_are_binarised_with_a_warning(tmp_path):
    root = _tree(tmp_path)
    mask = np.zeros((16, 16), np.uint8)
    mask[:4], mask[4:8] = 200, 100  # only the 200 rows are above 127.5
    _png(root / "c" / "ground_truth" / "dent" / "000_mask.png", mask)
    ds = MVTecDataset(root, "c", "test", image_size=16)
    with pytest.warns(DataWarning, match="values other than 0/255.*binarised"):
        item = ds[0]  # test/dent sorts before test/good
    assert item["mask"].sum() == 4 * 16
    _png(root / "c" / "ground_truth" / "dent" / "000_mask.png", (mask > 0).astype(np.uint8))
    ds = MVTecDataset(root, "c", "test", image_size=16)
    with pytest.warns(DataWarning, match="0/1 values"):
        assert ds[0]["mask"].sum() == 8 * 16


def test_missing_mask(tmp_path):
    root = _tree(tmp_path)
    (root / "c" / "ground_truth" / "dent" / "000_mask.png").unlink()
    with pytest.raises(MaskMissing, match=r"test/dent/000.png' has no mask; expected .*ground_truth/dent/000_mask.png"):
        MVTecDataset(root, "c", "test")


def test_resize_and_mask_nearest(tmp_path):
    root = _tree(tmp_path, size=64)
    ds = MVTecDataset(root, "c", "test", image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        item = ds[0]
    assert item["mask"].sum() == 2 * 3  # the 4x6 block at 64 px is 2x3 at 32 px


def test_folder_dataset_layouts(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, (16, 16, 3), np.uint8)  # noqa: E731
    for i in range(10):
        _png(tmp_path / "good" / f"g{i}.png", img())
    _png(tmp_path / "scratch" / "s0.png", img())
    train, test = FolderDataset(tmp_path, "train", 16), FolderDataset(tmp_path, "test", 16)
    assert len(train) == 8 and len(test) == 3 and not test.has_masks
    assert not {s.path for s in train.samples} & {s.path for s in test.samples}
    assert test[2]["label"] == 1 and test[2]["mask"].sum() == 0
    for i in range(4):
        _png(tmp_path / "train" / "good" / f"t{i}.png", img())
    assert len(FolderDataset(tmp_path, "train", 16)) == 4
    assert len(FolderDataset(tmp_path, "test", 16)) == 11
    (tmp_path / "masks" / "scratch").mkdir(parents=True)
    with pytest.raises(MaskMissing, match="s0.png' has no mask"):
        FolderDataset(tmp_path, "test", 16)
    _png(tmp_path / "masks" / "scratch" / "s0_mask.png", np.full((16, 16), 255, np.uint8))
    test = FolderDataset(tmp_path, "test", 16)
    assert test.has_masks and test[len(test) - 1]["mask"].sum() == 256
    cfg = DataConfig(root=str(tmp_path), format="folder", image_size=16, val_fraction=0.25)
    assert [len(d) for d in build_datasets(cfg)] == [3, 1, 11]


def visa_tree(root, size=64, n_normal=10, n_anomaly=3):
    """Writes a tiny VisA download in its exact layout (category 'candle') and returns root:
    split_csv/1cls.csv, candle/Data/Images/{Normal,Anomaly}/*.JPG, candle/Data/Masks/Anomaly/*.png
    whose defect pixels hold small ids (1, 2), as VisA's do, not 255."""
    rng = np.random.default_rng(0)
    rows = ["object,split,label,image,mask"]
    y, x = np.mgrid[:size, :size]
    for i in range(n_normal):
        base = (np.stack([x, y, x + y], -1) * 2 + rng.integers(0, 20, (size, size, 3))).clip(0, 255).astype(np.uint8)
        path = f"candle/Data/Images/Normal/{i:04d}.JPG"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base).save(root / path, format="JPEG")
        rows.append(f"candle,{'train' if i < n_normal - 2 else 'test'},normal,{path},")
    for i in range(n_anomaly):
        image = (np.stack([x, y, x + y], -1) * 2).clip(0, 255).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[10 + 5 * i:20 + 5 * i, 12:24] = 1 + i % 2  # ids 1 and 2
        image[mask > 0] = (250, 30, 30)
        path, mask_path = f"candle/Data/Images/Anomaly/{i:03d}.JPG", f"candle/Data/Masks/Anomaly/{i:03d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / mask_path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / path, format="JPEG")
        Image.fromarray(mask).save(root / mask_path)
        rows.append(f"candle,test,anomaly,{path},{mask_path}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa_is_read_in_its_own_layout_with_id_valued_masks(tmp_path):
    root = visa_tree(tmp_path / "visa")
    data = build_datasets(DataConfig(root=str(root), format="visa", category="candle", image_size=64,
                                     val_fraction=0.25))
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 5)
    labels = sorted((s.label, s.defect_type) for s in data.test.samples)
    assert labels == [(0, "good")] * 2 + [(1, "anomaly")] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # id-valued masks are VisA's format, not a problem to warn about
        defect = next(data.test[i] for i in range(len(data.test)) if data.test[i]["label"] == 1)
    assert defect["mask"].sum() == 10 * 12 and set(defect["mask"].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(CategoryNotFound, match="did you mean 'candle'"):
        build_datasets(DataConfig(root=str(root), format="visa", category="candel"))
    with pytest.raises(RootNotFound, match="split_csv"):
        build_datasets(DataConfig(root=str(tmp_path), format="visa", category="candle"))


def test_a_visa_category_trains_two_iterations_and_evaluates(tmp_path):
    from recontrast import pipeline
    from recontrast.config import Config, apply_overrides

    root = visa_tree(tmp_path / "visa")
    cfg = apply_overrides(Config(), {
        "data.root": str(root), "data.format": "visa", "data.category": "candle", "data.image_size": 64,
        "data.val_fraction": 0.25, "model.backbone": "resnet18", "model.pretrained": "none",
        "train.iters": 2, "train.batch_size": 2, "train.threads": 1, "train.checkpoint_every": 0,
        "train.out": str(tmp_path / "run"), "eval.figures": False, "eval.gif": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two iterations do not converge, and say so
        result, evaluation, _ = pipeline.run_training(cfg, track=False)
    assert result.iterations == 2 and result.checkpoint.is_file()
    assert 0.0 <= evaluation.metrics["image_auroc"] <= 1.0 and 0.0 <= evaluation.metrics["pixel_auroc"] <= 1.0
    assert evaluation.metrics["aupro"] is not None  # the masks reached the pixel metrics


def test_btad_is_read_in_its_own_layout(tmp_path):
    """BTAD as downloaded: 01/train/ok/*.bmp, test/ok, test/ko, ground_truth/ko/<stem>.png (or .bmp)."""
    rng = np.random.default_rng(0)
    base = tmp_path / "btad" / "01"
    for i in range(4):
        _png(base / "train" / "ok" / f"{i:04d}.bmp", rng.integers(0, 255, (32, 32, 3), np.uint8))
    _png(base / "test" / "ok" / "0000.bmp", rng.integers(0, 255, (32, 32, 3), np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[4:8, 4:12] = 255
    for i, suffix in enumerate((".png", ".bmp")):
        _png(base / "test" / "ko" / f"{i:04d}.bmp", rng.integers(0, 255, (32, 32, 3), np.uint8))
        _png(base / "ground_truth" / "ko" / f"{i:04d}{suffix}", mask)
    data = build_datasets(DataConfig(root=str(tmp_path / "btad"), format="btad", category="01", image_size=32,
                                     val_fraction=0.25))
    assert (len(data.train), len(data.val), len(data.test)) == (3, 1, 3)
    assert sorted((s.label, s.defect_type) for s in data.test.samples) == [(0, "good"), (1, "ko"), (1, "ko")]
    assert all(data.test[i]["mask"].sum() == 4 * 8 for i in range(3) if data.test[i]["label"] == 1)
    with pytest.raises(CategoryNotFound, match="01, 02, 03"):
        build_datasets(DataConfig(root=str(tmp_path / "btad"), format="btad", category="04"))
