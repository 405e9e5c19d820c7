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


def test_make_tests_xdist_groups_keep_their_tests_on_one_worker(tmp_path):
    """`make test` runs `-n 2 --dist loadgroup`: the Ray tests and the PostgreSQL tests must each
    run on one worker (one Ray instance, one server that one teardown stops). pytest 9.2 broke
    that silently (pyproject's pin); this runs the Makefile's options on three grouped tests."""
    import subprocess
    import sys

    makefile = (ROOT / "Makefile").read_text()
    options = re.search(r"^XDIST = (.*)$", makefile, re.M).group(1).replace("$(PYTEST_WORKERS)", "2").split()
    assert options == ["-n", "2", "--dist", "loadgroup"]
    (tmp_path / "test_grouped.py").write_text(
        "import os, time, pytest\n"
        "pytestmark = pytest.mark.xdist_group('one')\n"
        + "".join(f"def test_{i}():\n    time.sleep(0.3)\n    print('WORKER', os.environ['PYTEST_XDIST_WORKER'])\n"
                  for i in range(3)))
    (tmp_path / "test_free.py").write_text("".join(f"def test_{i}():\n    pass\n" for i in range(3)))
    done = subprocess.run([sys.executable, "-m", "pytest", *options, "-v", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    workers = re.findall(r"\[(gw\d)\] \[ *\d+%\] PASSED \S*test_grouped\.py", done.stdout)
    assert len(workers) == 3 and len(set(workers)) == 1, done.stdout[-2000:]
