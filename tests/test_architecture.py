"""The package's shape: modules import one way (down the layers of docs/architecture.md), at
the top of the file, so no import cycle can hide inside a function; notebooks are linted."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "recontrast"

# Lowest first. A module may import the modules listed before it (its own layer's earlier
# entries included) and nothing after it: docs/architecture.md draws the same list.
LAYERS = {
    "configuration": ["validation", "config"],
    "runtime helpers": ["runtime", "locks", "cpu_memory", "checkpoint"],
    "data": ["images", "data", "synthetic", "defects"],
    "method": ["backbones", "model", "loss", "anomaly_map", "metrics"],
    "steps": ["calibration", "evaluate", "health", "distributed", "train", "plots"],
    "outputs and services": ["report", "runtimes", "infer", "pyfunc_model", "export", "mlflow_store", "mlflow_model", "tracking"],
    "orchestration": ["preflight", "pipeline"],
    "entry points": ["study", "study_results", "ray_executor", "batch", "demo", "cli", "__main__"],
}
ORDER = [m for layer in LAYERS.values() for m in layer]
# Imports inside functions: heavy or optional packages only (and the CLI's handlers, which
# keep `recontrast --help` fast).
LAZY_OK = {"mlflow", "papermill", "onnx", "onnxruntime", "openvino", "nncf", "pandas", "ray", "seaborn",
           "jupyter_client", "fcntl", "anomalib", "huggingface_hub"}


def _imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """Returns (package modules imported at module level, [(line, name)] imported inside functions)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    nested: list[tuple[int, str]] = []

    def names(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:  # relative import: from .x import y
            return [f"recontrast.{node.module}" if node.module else "recontrast"]
        if node.module == "recontrast":
            return [f"recontrast.{a.name}" for a in node.names]
        return [node.module or ""]

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in names(child):
                    if in_function:
                        nested.append((child.lineno, name))
                    elif name.startswith("recontrast."):
                        top.add(name.split(".")[1])
            visit(child, inside)

    visit(tree, False)
    return top, nested


def test_every_module_has_a_place_in_the_layers():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(ORDER) == modules, "add the new module to LAYERS and to docs/architecture.md"


@pytest.mark.parametrize("module", ORDER)
def test_imports_go_down_the_layers_only(module):
    top, _ = _imports(PACKAGE / f"{module}.py")
    above = sorted(m for m in top if ORDER.index(m) >= ORDER.index(module))
    assert not above, f"recontrast.{module} imports {above}, which are not below it in LAYERS"


@pytest.mark.parametrize("module", ORDER)
def test_no_package_imports_hide_inside_functions(module):
    _, nested = _imports(PACKAGE / f"{module}.py")
    bad = [(line, name) for line, name in nested
           if name.split(".")[0] not in LAZY_OK and not (module == "cli" and name.startswith("recontrast"))]
    assert not bad, f"recontrast.{module}: imports inside functions {bad}; move them to the top of the file"


def test_a_low_module_imported_alone_pulls_in_nothing_above_it():
    """The same rule at run time, in a fresh interpreter: importing the model loads no
    training, evaluation, tracking or MLflow code."""
    code = ("import sys, recontrast.model; "
            "print(sorted(m for m in sys.modules if m.startswith(('recontrast.', 'mlflow', 'papermill'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    pulled = {name.strip(" '[]\n").split(".")[-1] for name in loaded.split(",")}
    assert pulled <= set(ORDER[: ORDER.index("model") + 1]), loaded


def _notebook_problems(path: Path) -> list[str]:
    """Returns what keeps a notebook from being committed: outputs, counts, no parameters cell."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    problems = [f"cell {i} has outputs or an execution count" for i, c in enumerate(nb.cells)
                if c.cell_type == "code" and (c.outputs or c.execution_count)]
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"{len(tagged)} cells tagged 'parameters' (papermill needs exactly one)")
    return problems


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_committed_notebooks_are_sources_without_outputs(name):
    problems = _notebook_problems(ROOT / "notebooks" / name)
    assert not problems, f"{name}: {problems}; clear them with `make strip-notebooks`"


def test_a_notebook_edited_and_saved_like_jupyterlab_passes(tmp_path):
    """JupyterLab writes nbformat 4.5 with cell ids and its own metadata: no generator to match."""
    nb = nbformat.read(ROOT / "notebooks" / "02_train.ipynb", as_version=4)
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    nb.cells.append(nbformat.v4.new_code_cell("print(cfg.train.iters)"))
    nbformat.write(nb, tmp_path / "edited.ipynb")
    assert _notebook_problems(tmp_path / "edited.ipynb") == []
    nb.cells[-1].outputs = [nbformat.v4.new_output("stream", text="2000\n")]
    nbformat.write(nb, tmp_path / "executed.ipynb")
    assert _notebook_problems(tmp_path / "executed.ipynb")  # outputs must be cleared first


def test_package_tests_benchmarks_and_notebooks_pass_the_linter():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    done = subprocess.run([ruff, "check", "recontrast", "tests", "benchmarks", "notebooks"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
