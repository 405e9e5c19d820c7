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


@pytest.mark.parametrize("name", ["demo.yaml", "mvtec_paper.yaml", "cpu_default.yaml", "cpu_long.yaml", "cpu_parts.yaml"])
def test_shipped_experiment_files_load(name):
    load_config(ROOT / "experiments" / name)


def test_the_long_cpu_recipe_is_the_default_one_at_a_larger_image_size():
    from recontrast.config import config_diff

    default, long = (load_config(ROOT / "experiments" / f"cpu_{name}.yaml") for name in ("default", "long"))
    assert config_diff(default, long) == {"data.image_size": (256, 320), "train.out": ("runs/cpu_default", "runs/cpu_long")}


def test_the_parts_recipe_is_the_default_one_with_the_coarse_code_whatever_the_spread():
    from recontrast.config import config_diff

    default, parts = (load_config(ROOT / "experiments" / f"cpu_{name}.yaml") for name in ("default", "parts"))
    assert (default.model.bottleneck_pool, default.train.pool_fallback) == (2, True)
    assert config_diff(default, parts) == {"train.pool_max_spread": (0.5, 1.0),
                                           "train.out": ("runs/cpu_default", "runs/cpu_parts")}


def test_encoder_bn_auto_follows_the_per_category_defaults():
    cfg = load_config(None, ["data.category=screw"])
    assert encoder_bn_mode(cfg) == "eval"
    cfg.data.category = "bottle"
    assert encoder_bn_mode(cfg) == "train"
    cfg.train.stable = True
    cfg.data.category = "screw"
    assert encoder_bn_mode(cfg) == "train"


# ----------------------------------------------------------------------------- every value checked
BAD_VALUES = {
    "train.lr=-1": r"train\.lr=-1\.0: must be > 0",
    "train.lr=.nan": r"train\.lr: expected a finite number, got nan",
    "train.lr=.inf": r"train\.lr: expected a finite number",
    "train.betas=[2,3]": r"train\.betas=\[2\.0, 3\.0\]: each value must be in \[0, 1\)",
    "train.betas=[0.9]": r"train\.betas: expected a list of 2 numbers",
    "train.betas=[1,": r"train\.betas: expected a list of 2 numbers",
    "train.weight_decay=-1": r"train\.weight_decay=-1\.0: must be >= 0",
    "train.eps=0": r"train\.eps=0\.0: must be > 0",
    "train.device=foo": r"train\.device='foo' is not a device; use auto, cpu, cuda",
    "tracking.experiment=": r"tracking\.experiment is empty",
    "train.out=": r"train\.out is empty",
    "train.reset_every=0": r"train\.reset_every=0: must be >= 1",
    "model.bottleneck_pool=0": r"model\.bottleneck_pool=0: must be in \[1, 8\]",
    "train.pool_max_spread=1.5": r"train\.pool_max_spread=1\.5: must be in \[0, 1\]",
    "train.seed=-1": r"train\.seed=-1: must be in \[0, 2147483648\)",
    "train.iters=[": r"train\.iters: expected an integer, got '\['",
    "eval.sigma=-1": r"eval\.sigma=-1\.0: must be in \[0, 64\]",
    "eval.threshold_quantile=2": r"eval\.threshold_quantile=2\.0: must be in \[0, 1\]",
    "eval.pro_fpr_limit=0": r"eval\.pro_fpr_limit=0\.0: must be in \(0, 1\]",
    "eval.num_bins=1": r"eval\.num_bins=1: must be in \[2, ",
    "eval.num_bins=101": r"eval\.num_bins=101 must be even",
    "eval.topk=0": r"eval\.topk=0\.0: must be in \(0, 1\]",
    "eval.proxy_copies=0": r"eval\.proxy_copies=0: must be in \[1, 64\]",
    "eval.level_weights=[1,.nan,1]": r"eval\.level_weights: expected a finite number, got nan",
    "eval.level_weights=[0,0,0]": r"eval\.level_weights must be >= 0 and not all 0",
    "loss.warmup_fraction=1.5": r"loss\.warmup_fraction=1\.5: must be in \[0, 1\]",
    "loss.factor=-0.1": r"loss\.factor=-0\.1: must be >= 0",
    "data.image_size=8192": r"data\.image_size=8192 must be a positive multiple of 32 up to 4096",
    "train.iters=" + "9" * 400: r"train\.iters=9{60}\.\.\. \(400 characters\): must be below 2147483648",
}


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_every_bad_value_is_refused_when_loaded_naming_key_value_and_range(override):
    with pytest.raises(ConfigError, match=BAD_VALUES[override]) as caught:
        load_config(None, [override, "train.stable=true"])
    assert len(str(caught.value)) < 300  # whatever was given, the message stays short


def test_a_long_wrong_value_is_echoed_cut_short():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["train.device=" + "x" * 100_000])
    assert len(str(caught.value)) < 300 and "(100002 characters)" in str(caught.value)


@pytest.mark.parametrize("text, message", [
    ("train:\n  iters: [1\n", r"bad\.yaml:3:1: YAML syntax error .*fix the file"),
    ("train:\n\titers: 5\n", r"bad\.yaml:2:1: YAML syntax error"),
    ("- data\n- train\n", r"bad\.yaml: the top level must be a mapping of sections .*not list \['data', 'train'\]"),
    ("42\n", r"bad\.yaml: the top level must be a mapping of sections .*not int 42"),
    ("train: 5\n", r"section 'train' must be a mapping of keys to values, got 5"),
])
def test_a_broken_yaml_file_is_one_config_error_naming_file_and_line(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "bad.yaml")


def test_an_empty_file_or_section_means_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "bare.yaml").write_text("train:\neval:\n  sigma: 2\n")
    assert load_config(tmp_path / "empty.yaml").flatten() == Config().flatten()
    bare = load_config(tmp_path / "bare.yaml")
    assert bare.train.iters == Config().train.iters and bare.eval.sigma == 2.0


def _switch_table() -> dict[str, tuple[str, str, str]]:
    """Returns {config key: (its row's default cell, paper cell, the cell's share for this key)}
    from docs/method.md's 'Every switch' table; a row names one or more keys (`a.b` / `a.c`)."""
    import re

    lines = (ROOT / "docs" / "method.md").read_text().split("## Every switch", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.replace(" ", "").startswith("|configkey|"))
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        keys = re.findall(r"`(\w+\.\w+)`", cells[0])
        shares = next((parts for sep in (" / ", ", ") if len(parts := cells[1].split(sep)) == len(keys)),
                      [""] * len(keys))  # the default cell split per key, where it splits evenly
        table.update({k: (cells[1], cells[2], share) for k, share in zip(keys, shares)})
    return table


def _shows(text: str, value) -> bool:
    """Returns whether a docs cell writes `value` (true/false, a number, a string)."""
    import re

    if isinstance(value, bool):
        return ("true" if value else "false") in text.lower()
    if isinstance(value, (int, float)):
        return any(float(n) == value for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text))
    if isinstance(value, str):
        return (value or '""') in text
    return True  # lists: read by a person


def test_docs_method_md_lists_every_config_key_with_its_default_and_paper_value():
    """A new config key is documented where the method is: its row says our default and the paper's."""
    table, defaults = _switch_table(), Config().flatten()
    missing = [k for k in defaults if k not in table]
    assert not missing, (f"docs/method.md ('Every switch' table) has no row for {missing}: "
                         f"add one with the default and the paper's value")
    stale = [k for k in table if k not in defaults]
    assert not stale, f"docs/method.md lists {stale}, which are not config keys: rename or remove their rows"
    empty = [k for k, (default, paper, _) in table.items() if not default or not paper]
    assert not empty, f"docs/method.md: the rows of {empty} need a default and a paper value"
    wrong = [f"{k}={defaults[k]!r} (docs: {share!r})" for k, (_, _, share) in table.items()
             if share and not _shows(share, defaults[k])]
    assert not wrong, f"docs/method.md shows defaults that are not the code's: {wrong}"
