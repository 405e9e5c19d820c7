"""Studies: planning, skipping finished pairs, force, going on past a failing pair, the
parent run, and one real failing pair through papermill."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from conftest import empty_store
from recontrast import batch, mlflow_store, study
from recontrast.batch import PairResult
from recontrast.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def store(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store(tmp_path_factory, tmp_path / "mlruns"))
    return mlflow_store.get_client()


def study_file(tmp_path: Path, data_root: Path, categories: list[str], variants: dict) -> Path:
    data_root.mkdir(parents=True, exist_ok=True)
    config = {
        "data": {"root": str(data_root), "image_size": 64},
        "model": {"backbone": "resnet18", "pretrained": "none"},
        "train": {"iters": 2, "batch_size": 2},
        "tracking": {"experiment": "batch_test"},
        "study": {"name": "mini", "categories": categories, "variants": variants},
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Recorder:
    """A stand-in for execute_pair: records the jobs, fails the categories in `failing`."""

    def __init__(self, failing=()):
        self.jobs, self.failing = [], set(failing)

    def __call__(self, job):
        self.jobs.append(job)
        failed = job.category in self.failing
        return PairResult(job.variant, job.category, "failed" if failed else "done",
                          f"run-{job.variant}-{job.category}", "boom" if failed else "", 0.1, job.folder)

    def pairs(self):
        return sorted((j.variant, j.category) for j in self.jobs)


def test_shipped_study_files_plan_four_variants(tmp_path):
    spec = study.load_study(REPO / "experiments" / "ablation_da_sg.yaml")
    jobs = study.plan(spec, overrides=[f"data.root={tmp_path}"], runs_dir=tmp_path)
    assert set(spec.variants) == {"full", "no_da", "no_sg", "no_da_no_sg"}
    assert len(jobs) == 4 * len(spec.categories)
    no_da_no_sg = next(j for j in jobs if j.variant == "no_da_no_sg")
    assert {"model.domain_adaptation=false", "loss.stop_grad=false"} <= set(no_da_no_sg.overrides)
    # The demo leaves out no_da_no_sg: without domain adaptation stop-gradient has nothing to stop.
    assert list(study.load_study(REPO / "experiments" / "demo_study.yaml").variants) == ["full", "no_da", "no_sg"]
    with pytest.raises(ConfigError, match="did you mean 'no_da'"):
        study.plan(spec, variants=["no-da"], overrides=[f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="recontrast synth --out"):
        study.plan(spec, overrides=[f"data.root={tmp_path / 'missing'}"])


def test_a_rerun_skips_finished_pairs_force_redoes_them_and_failures_do_not_stop_others(store, tmp_path):
    path = study_file(tmp_path, tmp_path / "data", ["disc", "weave"],
                      {"full": {}, "no_da": {"model.domain_adaptation": False}})
    runs = tmp_path / "runs"
    first = Recorder(failing={"disc"})
    report = batch.run_study(path, jobs=1, runs_dir=runs, executor=first)
    assert len(first.jobs) == 4 and not report.ok
    assert sorted((r.variant, r.category) for r in report.failed) == [("full", "disc"), ("no_da", "disc")]
    assert (runs / "mini" / "full" / "weave" / "done.json").is_file()
    assert not (runs / "mini" / "full" / "disc" / "done.json").exists()

    again = Recorder()
    report = batch.run_study(path, runs_dir=runs, executor=again)
    assert again.pairs() == [("full", "disc"), ("no_da", "disc")] and report.ok
    assert sorted(r.status for r in report.results) == ["done", "done", "skipped", "skipped"]

    nothing = Recorder()
    batch.run_study(path, runs_dir=runs, executor=nothing)
    assert nothing.jobs == []

    changed = Recorder()  # another config is another result: finished pairs run again
    batch.run_study(path, categories=["weave"], overrides=["train.iters=3"], runs_dir=runs, executor=changed)
    assert changed.pairs() == [("full", "weave"), ("no_da", "weave")]

    forced = Recorder()
    batch.run_study(path, variants=["no_da"], force=True, runs_dir=runs, executor=forced)
    assert forced.pairs() == [("no_da", "disc"), ("no_da", "weave")]
    assert {j.overrides[0] for j in forced.jobs} == {"model.domain_adaptation=false"}

    parents = store.search_runs([store.get_experiment_by_name("batch_test").experiment_id],
                                "tags.recontrast_role = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # reopened by each rerun
    assert all(j.parent_run_id == parents[0].info.run_id for j in forced.jobs)


def test_a_pair_finished_before_a_new_key_existed_is_not_run_again_unless_the_key_leaves_its_default(
        store, tmp_path):
    import json

    path = study_file(tmp_path, tmp_path / "data", ["weave"], {"full": {}})
    runs = tmp_path / "runs"
    batch.run_study(path, runs_dir=runs, executor=Recorder())
    # done.json as an older version wrote it: its fingerprint hashed fewer keys, its settings lack
    # the switches added since (here model.freeze_stem and train.depthwise_fp32)
    done_file = runs / "mini" / "full" / "weave" / "done.json"
    done = json.loads(done_file.read_text())
    for key in ("model.freeze_stem", "train.depthwise_fp32"):
        del done["settings"][key]
    done["fingerprint"] = "0123456789ab"
    done_file.write_text(json.dumps(done))

    nothing = Recorder()
    batch.run_study(path, runs_dir=runs, executor=nothing)
    assert nothing.jobs == []

    switched = Recorder()
    (job,) = study.plan(study.load_study(path), overrides=["model.freeze_stem=true"], runs_dir=runs)
    assert study.changed_keys(done["settings"], job.settings) == "model.freeze_stem: False -> True"
    batch.run_study(path, overrides=["model.freeze_stem=true"], runs_dir=runs, executor=switched)
    assert switched.pairs() == [("full", "weave")]


def test_a_half_trained_pair_resumes_from_its_checkpoint(store, tmp_path):
    path = study_file(tmp_path, tmp_path / "data", ["weave"], {"full": {}})
    runs = tmp_path / "runs"
    batch.run_study(path, runs_dir=runs, executor=Recorder(failing={"weave"}))
    (runs / "mini" / "full" / "weave" / "train").mkdir(parents=True)
    (runs / "mini" / "full" / "weave" / "train" / "last.ckpt").write_bytes(b"a checkpoint")
    resumed = Recorder()
    batch.run_study(path, runs_dir=runs, executor=resumed)
    assert [j.resume for j in resumed.jobs] == [True]


def test_the_kernel_runs_this_interpreter():
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name=batch.kernel_name())
    assert km.format_kernel_cmd()[0] == sys.executable


@pytest.mark.e2e
def test_a_failing_pair_is_reported_with_the_error_from_its_notebook(store, synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # A dozen training images: the notebook stops before any work (no MLflow run); a failure
    # during training would end its run FAILED (tests/test_tracking.py).
    path = study_file(tmp_path, synthetic_root, ["disc"], {"big_batch": {"train.batch_size": 100}})
    report = batch.run_study(path, runs_dir=tmp_path / "runs")
    assert not report.ok
    failed = report.failed[0]
    assert failed.error.startswith("ConfigError: train.batch_size=100 but only")
    assert failed.run_id is None
    assert (Path(failed.folder) / "02_train.ipynb").is_file()  # the executed notebook, with the error


def report_device(job):
    """An executor for worker processes: reports the GPU the worker was given, after
    waiting (up to 60 s) until both jobs run at once, i.e. in two workers."""
    import os
    import time

    here = Path(job.folder).parent
    (here / f"{job.category}.running").touch()
    deadline = time.time() + 60
    while len(list(here.glob("*.running"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return PairResult(job.variant, job.category, "done", None, device, 1.0, job.folder)


@pytest.mark.slow
def test_parallel_jobs_get_their_own_gpu(store, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    path = study_file(tmp_path, tmp_path / "data", ["disc", "weave"], {"full": {}})
    report = batch.run_study(path, jobs=2, runs_dir=tmp_path / "runs", executor=report_device)
    assert report.ok and [r.category for r in report.results] == ["disc", "weave"]
    assert sorted(r.error for r in report.results) == ["3", "5"]


@pytest.mark.slow
def test_the_switch_columns_are_the_keys_the_variants_set(store, tmp_path):
    """A new ablation switch needs no list to extend: the study's variants name it."""
    from recontrast import study_results, tracking
    from recontrast.config import load_config

    variants = {"full": {}, "no_da": {"model.domain_adaptation": False}, "soft": {"loss.factor": 0.1}}
    path = study_file(tmp_path, tmp_path / "data", ["weave"], variants)

    def logged(job):  # what notebook 02 logs: the pair's run, nested under the parent
        cfg = load_config(job.config, [*job.overrides, f"data.category={job.category}",
                                       f"tracking.study={job.study}", f"tracking.ablation={job.variant}"])
        with tracking.start_run(cfg, parent_run_id=job.parent_run_id) as run:
            run.log_metrics({"image_auroc": 0.5})
        return PairResult(job.variant, job.category, study.PairStatus.DONE, run.run_id, "", 0.1, job.folder)

    batch.run_study(path, runs_dir=tmp_path / "runs", executor=logged, compare=False)  # no notebook 04 needed
    assert study.switches(study.load_study(path)) == ["model.domain_adaptation", "loss.factor"]
    frame = study_results.study_results("mini", "batch_test")
    assert list(frame["variant"]) == ["full", "no_da", "soft"]  # the study file's order
    assert "loss.stop_grad" not in frame  # a key no variant sets is no column
    assert study_results.varying_switches(frame) == ["model.domain_adaptation", "loss.factor"]
    assert dict(zip(frame["variant"], frame["loss.factor"])) == {"full": "0.0", "no_da": "0.0", "soft": "0.1"}
