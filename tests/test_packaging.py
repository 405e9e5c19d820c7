"""The install story: pyproject and environment.yml agree (notebooks: tests/test_architecture.py)."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_requirements_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section[-1] == "-e ."  # the project itself: `conda env create` gives a working `recontrast`
    assert sorted(project["dependencies"]) == sorted(pip_section[:-1])
    assert "python=3.11" in env["dependencies"]


def test_torch_pin_admits_the_pair_that_installs_offline():
    deps = {_name(d): d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert deps["torch"] == "torch>=2.4,<2.15"  # 2.14.1 lies on the dev/CI disk
    assert deps["torchvision"] == "torchvision>=0.19,<0.30"  # 0.29.1 pairs with it


def test_recontrast_makes_openmp_threads_sleep_unless_told_otherwise():
    import os
    import subprocess
    import sys

    code = "import recontrast, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        run_env = env if given is None else {**env, "OMP_WAIT_POLICY": given}
        done = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expected
