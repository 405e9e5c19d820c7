import pytest

from recontrast.config import Config, ConfigError, encoder_bn_mode, load_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_recipe():
    cfg = Config()
    assert (cfg.train.iters, cfg.train.batch_size, cfg.train.lr, cfg.train.encoder_lr) == (2000, 16, 2e-3, 1e-5)
    assert (cfg.loss.alpha_start, cfg.loss.alpha_end, cfg.loss.warmup_fraction, cfg.loss.factor) == (-3.0, 1.0, 0.1, 0.0)
    assert cfg.model.backbone == "wide_resnet50_2" and cfg.eval.sigma == 4.0


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["train.iters=500", "model.contrast=false", "train.betas=[0.5, 0.9]", "loss.factor=0.1",
                             "train.lr=1e-4"])
    assert cfg.train.lr == 1e-4
    assert cfg.train.iters == 500 and cfg.model.contrast is False
    assert cfg.train.betas == (0.5, 0.9) and cfg.loss.factor == 0.1


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'train.iters'"):
        load_config(None, ["train.iter=5"])
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(None, ["trian.iters=5"])


def test_wrong_types_are_refused():
    with pytest.raises(ConfigError, match="train.iters: expected an integer"):
        load_config(None, ["train.iters=many"])
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(None, ["model.contrast=maybe"])


def test_image_size_must_be_a_multiple_of_32():
    with pytest.raises(ConfigError, match="multiple of 32.*try 224 or 256"):
        load_config(None, ["data.image_size=250"])


def test_choice_fields_are_checked():
    with pytest.raises(ConfigError, match="loss.kind"):
        load_config(None, ["loss.kind=local"])


def test_flatten_and_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.iters=7", "data.category=bottle"])
    flat = cfg.flatten()
    assert flat["train.iters"] == 7 and flat["data.category"] == "bottle"
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path).flatten() == flat


def test_missing_config_file_lists_what_exists():
    with pytest.raises(ConfigError, match="found: .*demo.yaml"):
        load_config(ROOT / "experiments" / "dmeo.yaml")


@pytest.mark.parametrize("name", ["demo.yaml", "mvtec_paper.yaml"])
def test_shipped_experiment_files_load(name):
    load_config(ROOT / "experiments" / name)


def test_encoder_bn_auto_follows_the_per_category_defaults():
    cfg = load_config(None, ["data.category=screw"])
    assert encoder_bn_mode(cfg) == "eval"
    cfg.data.category = "bottle"
    assert encoder_bn_mode(cfg) == "train"
    cfg.train.stable = True
    cfg.data.category = "screw"
    assert encoder_bn_mode(cfg) == "train"
