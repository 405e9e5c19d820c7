"""The notebooks, executed by papermill with tiny parameters: 01 on the synthetic data;
02 -> 03 -> 04 through the quick demo (`recontrast demo --quick`), checked in MLflow."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from conftest import empty_store
from recontrast import mlflow_store
from recontrast.batch import AblationsParams, EvaluateParams, TrainParams, kernel_name

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def outputs(path: Path) -> list[dict]:
    return [o for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code" for o in c.outputs]


def parameters_cell(path: Path) -> dict:
    """Returns {name: default} of the notebook's `parameters` cell, in its order."""
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}


@pytest.mark.parametrize("notebook, params", [("02_train.ipynb", TrainParams), ("03_evaluate.ipynb", EvaluateParams),
                                              ("04_ablations.ipynb", AblationsParams)])
def test_the_parameters_cell_matches_the_packages_parameter_set(notebook, params):
    """A batch (and the demo) passes dataclasses.asdict(params) to papermill: a name or default
    that drifted apart would be injected as a new variable the notebook never reads."""
    assert parameters_cell(NOTEBOOKS / notebook) == dataclasses.asdict(params())
    assert list(parameters_cell(NOTEBOOKS / notebook)) == [f.name for f in dataclasses.fields(params)]


@pytest.mark.e2e
def test_data_exploration_runs_on_the_synthetic_data(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "01.ipynb"
    pm.execute_notebook(NOTEBOOKS / "01_data_exploration.ipynb", out, kernel_name=kernel_name(),
                        cwd=str(REPO), progress_bar=False,
                        parameters=dict(data_root=str(synthetic_root), category="disc", image_size=64))
    images = [o for o in outputs(out) if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # counts, samples, mask statistics, image statistics, mean image
    assert not [o for o in outputs(out) if o["output_type"] == "error"]


@pytest.mark.e2e
def test_quick_demo_trains_evaluates_and_compares_through_the_notebooks(tmp_path_factory, tmp_path, monkeypatch,
                                                                       capsys):
    from recontrast.demo import run_demo

    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store(tmp_path_factory, tmp_path / "mlruns"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernels' torch: one thread wastes less on a busy CPU
    report = run_demo(quick=True, workdir=tmp_path)
    assert report.ok and [r.variant for r in report.results] == ["full", "no_da"]
    assert "image_auroc (delta" in capsys.readouterr().out

    client = mlflow_store.get_client()
    exp = client.get_experiment_by_name("demo")
    assert exp.artifact_location == (tmp_path / "mlruns" / "artifacts").as_uri()
    runs = {r.data.tags.get("variant"): r for r in client.search_runs([exp.experiment_id], "tags.study = 'demo_quick'")
            if r.data.tags.get("recontrast_role") != "study"}
    assert set(runs) == {"full", "no_da"}
    for variant, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == report.parent_run_id
        assert run.data.params["model.domain_adaptation"] == str(variant == "full")
        assert {"train/loss", "train/alpha", "image_auroc", "pixel_auroc", "aupro"} <= set(run.data.metrics)
        files = {f.path for d in ("", "evaluation", "figures", "notebooks")
                 for f in client.list_artifacts(run.info.run_id, d or None)}
        assert {"config.yaml", "evaluation/metrics.json", "evaluation/per_image.csv",
                "figures/loss_curve.png", "notebooks/02_train.ipynb", "notebooks/03_evaluate.ipynb"} <= files
        assert run.outputs.model_outputs and run.data.tags["mlflow.source.name"] == "02_train.ipynb"
        folder = tmp_path / "experiments" / "runs" / "demo_quick" / variant / "weave"
        assert json.loads((folder / "done.json").read_text())["run_id"] == run.info.run_id

    parent = client.get_run(report.parent_run_id)
    assert parent.info.status == "FINISHED" and "variant" not in parent.data.tags
    assert {"full/aupro_mean", "no_da/aupro_mean", "no_da/aupro_delta"} <= set(parent.data.metrics)
    compared = {f.path for f in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/image_auroc.csv", "comparison/deltas.png", "comparison/04_ablations.ipynb"} <= compared


def jupyterlab_save(nb):
    """Returns `nb` as JupyterLab saves it after a run: outputs and counts, cell timings
    (record timing on), widget state, the kernel's language details, papermill's metadata."""
    import copy

    nb = copy.deepcopy(nb)
    nb.metadata["language_info"] = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                                    "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                                    "pygments_lexer": "ipython3", "version": "3.11.7"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"abc": {"model_name": "x"}},
                                                                          "version_major": 2, "version_minor": 0}}
    nb.metadata["papermill"] = {"duration": 12.5, "parameters": {"study": "demo"}}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cell.execution_count = i
        cell.outputs = [nbformat.v4.new_output("stream", text=f"{i}\n"),
                        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="})]
        cell.metadata["execution"] = {"iopub.execute_input": "2026-12-06T02:00:00.000Z",
                                      "shell.execute_reply": "2026-12-06T02:00:01.000Z"}
        cell.metadata["ExecuteTime"] = {"end_time": "2026-12-06T02:00:01Z", "start_time": "2026-12-06T02:00:00Z"}
        cell.metadata["papermill"] = {"duration": 1.0, "status": "completed"}
        cell.metadata["scrolled"] = True
    return nb


def hook_args() -> list[str]:
    import yaml

    hooks = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())["repos"][0]["hooks"]
    return next(h for h in hooks if h["id"] == "nbstripout")["args"]


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_a_notebook_saved_by_jupyterlab_strips_to_its_committed_form(name, tmp_path):
    import shlex
    import shutil
    import subprocess
    import sys

    nbstripout = shutil.which("nbstripout") or str(Path(sys.executable).with_name("nbstripout"))
    if not Path(nbstripout).exists():
        pytest.skip("nbstripout is not installed (pip install -e .[dev])")
    committed = (NOTEBOOKS / name).read_text()
    saved = tmp_path / name
    nbformat.write(jupyterlab_save(nbformat.reads(committed, as_version=4)), saved)
    assert saved.read_text() != committed
    subprocess.run([nbstripout, *hook_args(), str(saved)], check=True, cwd=tmp_path)
    assert saved.read_text() == committed  # byte for byte: a clean diff
    # `make strip-notebooks` strips with the hook's very arguments.
    makefile = (REPO / "Makefile").read_text()
    line = next(x for x in makefile.splitlines() if x.startswith("NBSTRIPOUT_ARGS"))
    assert shlex.split(line.split(":=", 1)[1]) == hook_args()
