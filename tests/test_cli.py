"""The `recontrast` command's failures: every invalid flag or value of every subcommand ends
in one bounded line naming the value and the fix, with a non-zero exit status and no
traceback (`--debug` / RECONTRAST_DEBUG=1 show it). Failures that need a trained model or
data are tried in tests/test_reliability_*.py; these need neither.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from recontrast import cli

REPO = Path(__file__).resolve().parents[1]
LIMIT = cli.MAX_MESSAGE + 100  # the command's prefix and a hint on top of the message


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Returns {name: (argv, regex the one-line error must match)}; `tmp` holds a_file.txt
    and the folder a_folder."""
    a_file, a_folder = tmp / "a_file.txt", tmp / "a_folder"
    return {
        "predict_threshold_word": (["predict", "--checkpoint", "x.ckpt", "x.png", "--threshold", "abc"],
                                   r"--threshold: 'abc' is not 'normal', 'f1' or a finite number"),
        "predict_threshold_nan": (["predict", "--checkpoint", "x.ckpt", "x.png", "--threshold", "nan"],
                                  r"--threshold: 'nan' is not .* finite number"),
        "predict_threshold_inf": (["predict", "--checkpoint", "x.ckpt", "x.png", "--threshold=-inf"],
                                  r"--threshold: '-inf' is not"),
        "predict_out_is_a_file": (["predict", "--checkpoint", "x.ckpt", "x.png", "--out", str(a_file)],
                                  rf"--out '{re.escape(str(a_file))}' is a file; .*give a folder path"),
        "predict_missing_input": (["predict", "--checkpoint", "x.ckpt", str(tmp / "nope.png"), "--out", str(tmp / "p")],
                                  r"nope\.png' does not exist"),
        "export_size_not_32": (["export", "--checkpoint", "x.ckpt", "--image-size", "100"],
                               r"--image-size: '100' is not a positive multiple of 32"),
        "export_size_zero": (["export", "--checkpoint", "x.ckpt", "--image-size", "0"], r"--image-size: '0' is not"),
        "export_size_word": (["export", "--checkpoint", "x.ckpt", "--image-size", "big"], r"--image-size: 'big' is not"),
        "export_out_is_a_folder": (["export", "--checkpoint", "x.ckpt", "--out", str(a_folder)],
                                   r"--out '.*a_folder' is a folder; give the file to write, e\.g\. .*model\.onnx"),
        "export_missing_checkpoint": (["export", "--checkpoint", str(tmp / "none.ckpt"), "--out", str(tmp / "m.onnx")],
                                      r"no checkpoint file '.*none\.ckpt'"),
        "evaluate_missing_checkpoint": (["evaluate", "--checkpoint", str(tmp / "none.ckpt"), "--no-track"],
                                        r"no checkpoint file '.*none\.ckpt'"),
        "synth_size_zero": (["synth", "--size", "0", "--out", str(tmp / "s")], r"--size: '0' is not a positive integer"),
        "synth_size_tiny": (["synth", "--size", "8", "--out", str(tmp / "s")], r"size=8 is out of range: .*32 to 4096"),
        "synth_n_train_zero": (["synth", "--n-train", "0", "--out", str(tmp / "s")], r"--n-train: '0' is not a positive"),
        "synth_seed_negative": (["synth", "--seed", "-1", "--out", str(tmp / "s")], r"--seed: '-1' is not an integer >= 0"),
        "synth_unknown_category": (["synth", "--categories", "foo", "--out", str(tmp / "s")],
                                   r"unknown synthetic categories 'foo'; choose from weave, grain, disc, bar"),
        "synth_out_is_a_file": (["synth", "--categories", "weave", "--out", str(a_file)], r"a_file\.txt' is a file"),
        "train_missing_config": (["train", "--config", str(tmp / "nope.yaml")], r"no config file '.*nope\.yaml'"),
        "batch_jobs_zero": (["batch", "--study", "x.yaml", "--jobs", "0"], r"--jobs: '0' is not a positive integer"),
        "batch_missing_study": (["batch", "--study", str(tmp / "nope.yaml")], r"no config file '.*nope\.yaml'"),
        "runs_negative_age": (["runs", "--fix-stale", "--older-than", "-1"], r"--older-than: '-1' is not a number of seconds"),
        "runs_nan_age": (["runs", "--fix-stale", "--older-than", "nan"], r"--older-than: 'nan' is not"),
        "unknown_command": (["trian"], r"invalid choice: 'trian'"),
        "missing_flag": (["predict", "x.png"], r"give --checkpoint <file.ckpt> or --model models:/"),
    }


CASES = list(_cases(Path("/nonexistent")))


@pytest.mark.parametrize("case", CASES)
def test_every_bad_flag_is_one_line_naming_value_and_fix(case, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "a_file.txt").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    argv, pattern = _cases(tmp_path)[case]
    error = run_cli(argv)
    assert error is not None and error.startswith(f"recontrast {argv[0] if argv[0] != 'trian' else ''}".rstrip()), error
    assert "\n" not in error and len(error) < LIMIT, error
    assert re.search(pattern, error), error
    assert "Traceback" not in error


def test_an_enormous_value_gives_a_bounded_line(tmp_path):
    for argv in (["predict", "--checkpoint", "x", "x.png", "--threshold", "9" * 100_000 + "x"],
                 ["train", "--config", str(tmp_path / ("d" * 200) / ("c" * 200 + ".yaml"))],
                 ["synth", "--categories", *(["nope"] * 20_000), "--out", str(tmp_path / "s")]):
        error = run_cli(argv)
        assert error is not None and "\n" not in error and len(error) < LIMIT, (len(error or ""), argv[0])


def test_one_line_keeps_the_start_and_the_fix():
    text = "what went wrong: " + "x" * 5000 + " ; the fix: do this"
    line = cli.one_line(text)
    assert len(line) <= cli.MAX_MESSAGE and line.startswith("what went wrong") and line.endswith("do this")
    assert cli.one_line("a\nb\n  c") == "a b c"


def test_an_error_from_deeper_down_points_to_debug_one_from_the_package_does_not():
    import torch

    try:
        torch.zeros(2) @ torch.zeros(3)
    except RuntimeError as err:
        deep = cli.describe(err)
    try:
        cli._threshold("abc")
    except ValueError as err:
        ours = cli.describe(err)
    assert deep.startswith("RuntimeError: ") and deep.endswith("(--debug shows the traceback)")
    assert "--debug" not in ours


@pytest.mark.parametrize("debug", [None, "--debug", "RECONTRAST_DEBUG=1"])
def test_exit_status_and_stderr_of_a_failing_command(tmp_path, debug):
    argv = [sys.executable, "-m", "recontrast.cli", "synth", "--categories", "foo", "--out", str(tmp_path / "s")]
    env = dict(os.environ)
    if debug == "--debug":
        argv.insert(3, "--debug")
    elif debug:
        env["RECONTRAST_DEBUG"] = "1"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode != 0
    if debug is None:
        assert proc.stderr.strip().splitlines() == [
            "recontrast synth: ValueError: unknown synthetic categories 'foo'; choose from weave, grain, disc, bar, mesh, board"]
    else:
        assert "Traceback (most recent call last)" in proc.stderr and "unknown synthetic categories" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_version_names_the_installed_distribution(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"recontrast {metadata.version('recontrast')}"


def test_every_option_of_every_command_has_a_help_text():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, sub in commands.items()
               for a in sub._actions if a.help in (None, "") and a.dest not in ("help",)]
    assert not [m for m in missing if m.startswith("batch ")], missing


def test_print_config_shows_the_resolved_config_and_what_each_override_changed(capsys):
    import yaml

    from recontrast.config import load_config

    argv = ["train", "--config", "experiments/demo.yaml", "--print-config", "--set", "train.iters=7",
            "data.image_size=128", "train.iters=9"]
    assert run_cli(argv) is None
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["train"]["iters"] == 9  # the YAML part parses; comments follow it
    base = load_config(REPO / "experiments" / "demo.yaml")
    assert f"#   train.iters=7: train.iters: {base.train.iters} -> 7" in out
    assert "#   data.image_size=128: no change" in out  # demo.yaml already says 128
    assert "#   train.iters=9: train.iters: 7 -> 9" in out
