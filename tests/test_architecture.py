"""The package's shape: modules import one way (down the layers of docs/architecture.md), at
the top of the file, so no import cycle can hide inside a function; notebooks are linted."""
from __future__ import annotations

import ast
import re
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
    "steps": ["calibration", "evaluate", "health", "layout", "distributed", "train", "plots"],
    "outputs and services": ["report", "runtimes", "infer", "pyfunc_model", "export", "mlflow_store", "mlflow_model", "tracking"],
    "orchestration": ["preflight", "pipeline"],
    "entry points": ["study", "study_results", "ray_executor", "batch", "demo", "cli", "__main__"],
}
ORDER = [m for layer in LAYERS.values() for m in layer]
LAYER_ROWS = [(layer, m) for layer, modules in LAYERS.items() for m in modules]  # what the docs' tables draw
# Imports inside functions: heavy or optional packages only (and the CLI's handlers, which
# keep `recontrast --help` fast).
LAZY_OK = {"mlflow", "papermill", "onnx", "onnxruntime", "openvino", "nncf", "pandas", "ray", "seaborn",
           "jupyter_client", "fcntl", "anomalib", "huggingface_hub"}


def _dynamic_import(node) -> str | None:
    """Returns the module a call imports by a literal name (importlib.import_module("x"),
    import_module(".x", "recontrast"), __import__("x")), else None."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    first = node.args[0]
    if called not in ("import_module", "__import__") or not (isinstance(first, ast.Constant)
                                                             and isinstance(first.value, str)):
        return None
    return f"recontrast{first.value}" if first.value.startswith(".") else first.value


def _imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """Returns (package modules imported at module level, [(line, name)] imported inside functions)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    nested: list[tuple[int, str]] = []

    def names(node) -> list[str]:
        if isinstance(node, ast.Call):
            return [_dynamic_import(node)]
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:  # relative: from .x import y, from . import x
            return [f"recontrast.{node.module}" if node.module else f"recontrast.{a.name}" for a in node.names]
        if node.module == "recontrast":
            return [f"recontrast.{a.name}" for a in node.names]
        return [node.module or ""]

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) or _dynamic_import(child):
                for name in names(child):
                    if in_function:
                        nested.append((child.lineno, name))
                    elif name.startswith("recontrast."):
                        top.add(name.split(".")[1])
            visit(child, inside)

    visit(tree, False)
    return top, nested


@pytest.mark.parametrize("source, top, nested", [
    ("from . import train", {"train"}, []),
    ("from .train import Callback", {"train"}, []),
    ("from recontrast import train, tracking", {"train", "tracking"}, []),
    ("import recontrast.train", {"train"}, []),
    ("import importlib\nTRAIN = importlib.import_module('recontrast.train')", {"train"}, []),
    ("from importlib import import_module\nTRAIN = import_module('.train', 'recontrast')", {"train"}, []),
    ("TRAIN = __import__('recontrast.train')", {"train"}, []),
    ("def f():\n    from . import train", set(), [(2, "recontrast.train")]),
    ("def f():\n    return __import__('recontrast.train')", set(), [(2, "recontrast.train")]),
    ("import importlib\ndef f(name):\n    return importlib.import_module(name)", set(), []),  # not a literal
])
def test_every_form_of_package_import_is_seen(tmp_path, source, top, nested):
    path = tmp_path / "module.py"
    path.write_text(source + "\n")
    found_top, found_nested = _imports(path)
    assert (found_top, [n for n in found_nested if n[1].startswith("recontrast")]) == (top, nested)


def _module_column(markdown: str, header: str, column: int) -> list[tuple[str, str]]:
    """Returns [(layer, module)] of the table whose header row starts with `header`, in order;
    the layer is the row's first cell (carried down where it is blank), the modules the
    backticked names in cell `column`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.replace(" ", "").startswith(header))
    rows, layer = [], ""
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        layer = cells[column - 1] or layer
        rows += [(layer, m) for m in re.findall(r"`([\w.]+)`", cells[column])]
    return rows


def test_docs_architecture_draws_the_layers_in_the_enforced_order():
    rows = _module_column((ROOT / "docs" / "architecture.md").read_text(), "|#|layer|modules", 2)
    assert rows == LAYER_ROWS, "redraw docs/architecture.md's Layers table from LAYERS"


def test_the_readme_layer_table_lists_the_modules_in_the_enforced_order():
    """Wherever the table lives (README.md or a page of docs/), it matches LAYERS."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    tables = [_module_column(text, "|layer|module|", 1) for text in (p.read_text() for p in pages)
              if "|layer|module|" in text.replace(" ", "")]
    assert tables, "no '| layer | module | ... |' table in README.md or docs/"
    for rows in tables:
        assert rows == LAYER_ROWS, "redraw the README's layer table from LAYERS in tests/test_architecture.py"


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
