"""What docs/mlflow_ui.md (and its screenshots) shows, checked through a real `mlflow ui` on
loopback over a tiny study: the parent run holds the study-level metrics and no variant of
its own, its children hold variant, category and study tags and the switches as params, and
the filter strings the page gives select what it says."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import empty_store, one_thread
from recontrast import batch, pipeline, study_results
from recontrast.batch import PairResult
from recontrast.config import load_config

pytestmark = pytest.mark.e2e  # a real server: make test runs it, make test-fast does not

STUDY = "ui_mini"
EXPERIMENT = "ui_test"


def train_here(job) -> PairResult:
    """An executor that trains and evaluates the pair in this process (what notebooks 02 and
    03 do through papermill), nested under the study's parent run."""
    cfg = load_config(job.config, [*job.overrides, f"data.category={job.category}",
                                   f"train.out={Path(job.folder) / 'train'}", f"tracking.study={job.study}",
                                   f"tracking.ablation={job.variant}"])
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two iterations do not converge, and say so
        _, _, run_id = pipeline.run_training(cfg, run_name=f"{job.variant}-{job.category}",
                                             parent_run_id=job.parent_run_id)
    return PairResult(job.variant, job.category, "done", run_id, "", 0.0, job.folder)


@pytest.fixture(scope="module")
def study(synthetic_root, tmp_path_factory):
    """A two-variant study on synthetic weave, logged to its own store: (uri, report)."""
    folder = tmp_path_factory.mktemp("ui_study")
    uri = empty_store(tmp_path_factory, folder / "mlruns")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            report = _run_study(synthetic_root, folder)
        yield uri, report, printed.getvalue()
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _run_study(synthetic_root: Path, folder: Path):
    path = folder / "ui_mini.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"root": str(synthetic_root), "image_size": 64, "val_fraction": 0.25},
        "model": {"backbone": "resnet18", "pretrained": "none"},
        "train": {"iters": 2, "batch_size": 2, "threads": 1, "checkpoint_every": 0, "log_every": 1},
        "eval": {"figures": False, "gif": False},
        "tracking": {"experiment": EXPERIMENT},
        "study": {"name": STUDY, "categories": ["weave"],
                  "variants": {"full": {}, "no_da": {"model.domain_adaptation": False}}},
    }))
    report = batch.run_study(path, runs_dir=folder / "runs", executor=train_here, register="full")
    assert report.ok
    return report


def screenshot_script():
    """Returns scripts/mlflow_screenshot.py as a module (mlflow_ui, Chromium)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "mlflow_screenshot.py"
    spec = importlib.util.spec_from_file_location("mlflow_screenshot", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ui(study):
    """Returns the base URL of `mlflow ui` serving the study's store on 127.0.0.1 (started the
    way scripts/mlflow_screenshot.py starts it for the screenshots)."""
    uri = study[0]
    with screenshot_script().mlflow_ui(uri, timeout_s=300) as base:  # a loaded machine starts it slowly
        yield base


def api(base: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """Returns the JSON answer of the MLflow REST API (POST with `body`, else GET with `query`)."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if body is None:
        request = urllib.request.Request(f"{url}?{urllib.parse.urlencode(query)}")
    else:
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def search(base: str, filter_string: str) -> list[dict]:
    """Returns the runs of the study's experiment that `filter_string` selects (as the UI's search box)."""
    exp = api(base, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]["experiment_id"]
    return api(base, "runs/search", {"experiment_ids": [exp], "filter": filter_string, "max_results": 100}).get("runs", [])


def fields(run: dict, kind: str) -> dict[str, object]:
    return {item["key"]: item["value"] for item in run["data"].get(kind, [])}


def test_the_parent_run_holds_the_study_metrics_and_no_variant_of_its_own(ui, study):
    report = study[1]
    parents = search(ui, f"tags.recontrast_role = 'study' and tags.study = '{STUDY}'")
    assert [p["info"]["run_id"] for p in parents] == [report.parent_run_id]
    parent = parents[0]
    tags, params, metrics = fields(parent, "tags"), fields(parent, "params"), fields(parent, "metrics")
    assert parent["info"]["run_name"] == f"study:{STUDY}" and parent["info"]["status"] == "FINISHED"
    assert "variant" not in tags and "ablation" not in tags and tags["variants"] == "full,no_da"
    # No params of a variant (the switch it flips, its name, its category): the children hold those.
    assert not {"model.domain_adaptation", "tracking.ablation", "data.category"} & set(params)
    assert params["train.iters"] == "2" and params["model.backbone"] == "resnet18"

    children = {fields(r, "tags")["variant"]: fields(r, "metrics") for r in
                search(ui, f"tags.mlflow.parentRunId = '{report.parent_run_id}'")}
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        for variant in ("full", "no_da"):
            assert metrics[f"{variant}/{metric}_mean"] == pytest.approx(children[variant][metric])
        delta = children["no_da"][metric] - children["full"][metric]
        assert metrics[f"no_da/{metric}_delta"] == pytest.approx(delta)
        assert f"full/{metric}_delta" not in metrics  # the baseline's delta is 0 by definition
        # The chart view's delta/<metric> charts: one bar per variant, the baseline's at 0.
        assert (children["full"][f"delta/{metric}"], children["no_da"][f"delta/{metric}"]) == pytest.approx((0.0, delta))


def test_the_children_carry_variant_category_study_tags_and_the_switches_as_params(ui, study):
    report = study[1]
    children = search(ui, f"tags.mlflow.parentRunId = '{report.parent_run_id}'")
    assert len(children) == 2
    for child in children:
        tags, params = fields(child, "tags"), fields(child, "params")
        assert (tags["category"], tags["study"]) == ("weave", STUDY)
        assert params["model.domain_adaptation"] == str(tags["variant"] == "full")
        assert child["info"]["run_name"] == f"{tags['variant']}-weave"
        assert {d["dataset"]["name"] for d in child["inputs"]["dataset_inputs"]} == {
            "weave/train", "weave/val", "weave/test"}
        assert child["outputs"]["model_outputs"]  # the logged MLflow model '<variant>-weave'


def test_the_filter_strings_of_the_ui_page_select_what_they_say(ui, study):
    """The strings docs/mlflow_ui.md ("Filter strings that work") tells a reader to type into the UI's search box."""
    names = lambda runs: sorted(r["info"]["run_name"] for r in runs)  # noqa: E731
    assert names(search(ui, f"tags.study = '{STUDY}'")) == ["full-weave", "no_da-weave", f"study:{STUDY}"]
    assert names(search(ui, f"tags.study = '{STUDY}' and tags.variant = 'no_da'")) == ["no_da-weave"]
    assert names(search(ui, "params.model.domain_adaptation = 'False'")) == ["no_da-weave"]
    assert names(search(ui, f"tags.study = '{STUDY}' and tags.category = 'weave'")) == ["full-weave", "no_da-weave"]
    assert names(search(ui, "tags.recontrast_role = 'study'")) == [f"study:{STUDY}"]
    assert names(search(ui, "metrics.`no_da/image_auroc_mean` > -1")) == [f"study:{STUDY}"]
    summary = study_results.study_summary_metrics(study_results.study_results(STUDY, EXPERIMENT, study[0]))
    assert set(summary) == {k for k in fields(search(ui, "tags.recontrast_role = 'study'")[0], "metrics")
                            if "/" in k and not k.startswith("system/")}


def test_the_study_option_registers_the_full_variants_model_per_category(ui, study):
    report = study[1]
    full = next(r for r in report.results if r.variant == "full")
    versions = api(ui, "model-versions/search", filter="name = 'weave'")["model_versions"]
    assert [(v["version"], v["run_id"]) for v in versions] == [("1", full.run_id)]
    assert {t["key"]: t["value"] for t in versions[0]["tags"]} == {"category": "weave", "variant": "full",
                                                                   "study": STUDY}


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Chromium: apt-get install -y chromium")
def test_the_printed_link_opens_the_studys_runs_in_the_ml_view_and_the_parent_shows_its_delta_figure(ui, study):
    """A real Chromium opens the link the batch printed (its host swapped for this test's
    `mlflow ui`): the study's runs in the runs table, then the parent's delta figure."""
    report, printed = study[1], study[2]
    assert re.search(r"no_da +[-+]\d+\.\d\d +[-+]\d+\.\d\d +[-+]\d+\.\d\d", printed)  # the delta table
    link = re.search(r"MLflow UI \(`make ui`\): (\S+)", printed).group(1)
    assert "workflowType=machine_learning" in link
    browser = screenshot_script().Chromium(shutil.which("chromium"), 1400, 1000)
    try:
        browser.open(link.replace(study_results.LOCAL_UI, ui), f"study:{STUDY}")
        text = browser.js("document.body.innerText")
        assert "Model training" in text and "3 matching runs" in text  # the ML view, filtered to the study
        browser.click('[data-component-id$="runnamecellrenderer.tsx_46"]')  # expand the parent: its children
        browser.wait_for_text("no_da-weave")
        assert "full-weave" in browser.js("document.body.innerText")
        # The parent's artifacts: the delta figure is its one file (MLflow lists folders first).
        exp = re.search(r"#/experiments/(\d+)/", link).group(1)
        browser.open(f"{ui}/#/experiments/{exp}/runs/{report.parent_run_id}/artifacts?workflowType=machine_learning",
                     "deltas.png")
        text = browser.js("document.body.innerText")
        assert text.index("comparison") < text.index("deltas.png") and "deltas.csv" not in text
        browser.js("[...document.querySelectorAll('*')].filter(e => e.textContent.trim() === 'deltas.png').pop().click()")
        # The figure is shown: an image of the written file's width, decoded by the browser.
        width = Image.open(Path(report.results[0].folder).parents[1] / "deltas.png").width
        browser._until(lambda: browser.js(f"[...document.images].some(i => i.complete && i.naturalWidth == {width})"),
                       60, "the delta figure was not shown")
    finally:
        browser.close()
