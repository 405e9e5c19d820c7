"""Studies: one papermill execution of notebooks 02 (train) and 03 (evaluate) per
(variant, category), grouped under a parent MLflow run; and the queries notebook 04 draws.

A study file is a config (experiments/*.yaml) plus a `study:` block:

    study:
      name: ablation_da_sg
      categories: [weave, disc]          # what `--categories all` means
      variants:                          # name -> dotted overrides (a mapping or "k=v" strings)
        full: {}
        no_da: {model.domain_adaptation: false}

Each pair gets a folder experiments/runs/<study>/<variant>/<category>/ with the executed
notebooks, the training output (train/) and, once both notebooks succeeded, done.json. A
rerun skips pairs whose done.json matches their current config (unless force), resumes a
training whose checkpoint is there, and goes on past a failing pair (reported at the end).
"""
from __future__ import annotations

import concurrent.futures as cf
import difflib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from recontrast.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

NOTEBOOKS = ("02_train.ipynb", "03_evaluate.ipynb")
# Config switches an ablation may flip; notebook 04 compares the ones that vary in a study.
SWITCHES = ("model.domain_adaptation", "loss.stop_grad", "model.contrast", "loss.hard_mining",
            "loss.kind", "model.encoder_bn", "train.stable", "loss.factor")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "image_f1max", "pixel_f1max")


@dataclass
class Study:
    name: str
    path: Path
    categories: list[str]
    variants: dict[str, list[str]]  # name -> ["key=value", ...]


@dataclass
class Job:
    """One (variant, category) pair: what the notebooks get and where their outputs go."""

    study: str
    variant: str
    category: str
    config: str
    overrides: list[str]
    folder: str
    fingerprint: str
    uri: str = ""  # the MLflow store the notebooks log to
    track: bool = True
    parent_run_id: str | None = None
    resume: bool = False


@dataclass
class PairResult:
    variant: str
    category: str
    status: str  # "done" | "skipped" | "failed"
    run_id: str | None = None
    error: str = ""
    seconds: float = 0.0
    folder: str = ""


@dataclass
class StudyReport:
    study: str
    results: list[PairResult] = field(default_factory=list)
    parent_run_id: str | None = None

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.results)

    @property
    def failed(self) -> list[PairResult]:
        return [r for r in self.results if r.status == "failed"]

    def summary(self) -> str:
        """Returns one line per pair and a count line."""
        lines = [f"{r.variant:<14} {r.category:<12} {r.status:<8} {r.seconds:7.1f}s  "
                 f"{r.run_id or '-':<32} {r.error}".rstrip() for r in self.results]
        counts = {s: sum(r.status == s for r in self.results) for s in ("done", "skipped", "failed")}
        lines.append(f"study {self.study}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- planning
def load_study(path: str | Path) -> Study:
    """Returns the `study:` block of a study file; raises ConfigError naming what is missing."""
    path = Path(path)
    load_config(path)  # the base config must be valid on its own
    block = (yaml.safe_load(path.read_text()) or {}).get("study")
    if not isinstance(block, dict):
        raise ConfigError(f"{path} has no 'study:' block (name, categories, variants); "
                          f"see experiments/ablation_da_sg.yaml")
    variants = block.get("variants") or {"full": {}}
    if not isinstance(variants, dict):
        raise ConfigError(f"{path}: study.variants must map a name to overrides, got {variants!r}")
    return Study(name=str(block.get("name") or path.stem), path=path.resolve(),
                 categories=[str(c) for c in block.get("categories") or []],
                 variants={str(k): _as_overrides(v, f"{path}: study.variants.{k}") for k, v in variants.items()})


def _as_overrides(value: Any, where: str) -> list[str]:
    """Returns ["key=value", ...] from a {dotted key: value} mapping or a list of strings."""
    if not value:
        return []
    if isinstance(value, dict):
        return [f"{k}={v if isinstance(v, str) else _yaml_scalar(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise ConfigError(f"{where}: expected {{dotted.key: value}} or ['key=value', ...], got {value!r}")


def _yaml_scalar(value: Any) -> str:
    """Returns `value` as the override parser reads it back (1e-05 -> '1.0e-05', False -> 'false')."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _pick(requested: Sequence[str] | None, available: list[str], what: str) -> list[str]:
    if not requested or list(requested) == ["all"]:
        return available
    unknown = [r for r in requested if r not in available]
    if unknown and what == "variant":
        close = difflib.get_close_matches(unknown[0], available, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; valid: {', '.join(available)}"
        raise ConfigError(f"unknown variant '{unknown[0]}'{hint}")
    return list(requested)


def fingerprint(cfg: Config) -> str:
    """Returns a short hash of what decides a result (the config minus paths and tracking)."""
    flat = {k: v for k, v in cfg.flatten().items()
            if not k.startswith("tracking.") and k not in ("train.out", "train.device", "train.threads")}
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plan(study: Study, categories: Sequence[str] | None = None, variants: Sequence[str] | None = None,
         overrides: Sequence[str] | None = None, runs_dir: str | Path | None = None) -> list[Job]:
    """Returns the jobs of a study, each config validated before anything runs."""
    from recontrast.tracking import project_root, tracking_uri

    runs_dir = Path(runs_dir) if runs_dir else project_root() / "experiments" / "runs"
    data_root = project_root() / load_config(study.path, list(overrides or [])).data.root  # the notebooks' cwd
    if not data_root.is_dir():
        raise ConfigError(f"data.root '{data_root}' does not exist: create the synthetic data with "
                          f"`recontrast synth --out {data_root}`, or pass --set data.root=<your MVTec root>")
    base_categories = study.categories or sorted(p.name for p in data_root.iterdir() if (p / "train").is_dir())
    jobs = []
    for variant in _pick(variants, list(study.variants), "variant"):
        clash = {o.split("=", 1)[0] for o in overrides or []} & {o.split("=", 1)[0] for o in study.variants[variant]}
        if clash:
            log.warning("--set %s overrides what variant '%s' sets", ", ".join(sorted(clash)), variant)
        for category in _pick(categories, base_categories, "category"):
            folder = runs_dir / study.name / variant / category
            ovr = [*study.variants[variant], *(overrides or [])]
            cfg = load_config(study.path, [*ovr, *_given(study.name, variant, category, folder)])
            jobs.append(Job(study.name, variant, category, str(study.path), ovr, str(folder), fingerprint(cfg),
                            tracking_uri(cfg), cfg.tracking.enabled))
    return jobs


def _given(study: str, variant: str, category: str, folder: Path) -> list[str]:
    """Returns the overrides notebook 02 derives from its category/out/study/variant parameters."""
    return [f"data.category={category}", f"train.out={folder / 'train'}",
            f"tracking.study={study}", f"tracking.ablation={variant}"]


def _status(job: Job, force: bool) -> str:
    """Returns 'done' (a matching done.json), 'resume' (a checkpoint of the same config) or 'run'."""
    folder = Path(job.folder)
    if force:
        return "run"
    try:
        done = json.loads((folder / "done.json").read_text())
        if done.get("fingerprint") == job.fingerprint:
            return "done"
        log.info("%s/%s: config changed since it finished; running it again", job.variant, job.category)
    except (OSError, ValueError):
        pass
    try:
        started = json.loads((folder / "started.json").read_text())
        if started.get("fingerprint") == job.fingerprint and (folder / "train" / "last.ckpt").is_file():
            return "resume"
    except (OSError, ValueError):
        pass
    return "run"


# ----------------------------------------------------------------------------- executing
def kernel_name() -> str:
    """Returns a Jupyter kernel name that runs this interpreter (sys.executable).

    'python3' when it resolves here (jupyter_client maps a bare 'python' to sys.executable);
    otherwise a kernelspec for this interpreter is installed into sys.prefix/share/jupyter.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        argv0 = manager.get_kernel_spec("python3").argv[0]
        if argv0 in ("python", "python3", f"python3.{sys.version_info[1]}") or \
                Path(argv0).resolve() == Path(sys.executable).resolve():
            return "python3"
    except NoSuchKernel:
        pass
    name = "recontrast-" + hashlib.sha1(sys.executable.encode()).hexdigest()[:8]
    spec_dir = Path(sys.prefix) / "share" / "jupyter" / "kernels" / name
    if not (spec_dir / "kernel.json").is_file():
        spec_dir.mkdir(parents=True, exist_ok=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"recontrast ({sys.executable})", "language": "python"}, indent=1))
    return name


def execute_pair(job: Job) -> PairResult:
    """Returns the outcome of running notebooks 02 then 03 for one pair (never raises)."""
    import papermill as pm

    from recontrast import tracking

    root, folder = tracking.project_root(), Path(job.folder)
    t0, run_id, kernel = time.time(), None, kernel_name()
    train_out = folder / "train"
    if not job.resume:  # a run id left by an earlier attempt must not receive this one's notebooks
        (train_out / tracking.RUN_ID_FILE).unlink(missing_ok=True)
    steps = [
        (NOTEBOOKS[0], dict(config=job.config, category=job.category, overrides=job.overrides,
                            out=str(train_out), study=job.study, variant=job.variant,
                            run_name=f"{job.variant}-{job.category}", parent_run_id=job.parent_run_id or "",
                            resume=job.resume, evaluate_at_end=False, track=job.track)),
        (NOTEBOOKS[1], dict(checkpoint=str(train_out / "last.ckpt"), out=str(folder / "eval"), track=job.track)),
    ]
    try:
        for name, params in steps:
            if name == NOTEBOOKS[1]:
                params["run_id"] = run_id or ""
            try:
                pm.execute_notebook(root / "notebooks" / name, folder / name, parameters=params,
                                    kernel_name=kernel, cwd=str(root), progress_bar=False,
                                    start_timeout=300, report_mode=False)
            finally:
                run_id = tracking.read_run_id(train_out) or run_id
                if run_id and (folder / name).is_file():
                    _log_notebook(job.uri, run_id, folder / name)
    except Exception as err:
        error = _describe(err)
        log.error("%s/%s failed: %s", job.variant, job.category, error)
        _fix_killed_kernel(err, job.uri)
        return PairResult(job.variant, job.category, "failed", run_id, error, time.time() - t0, str(folder))
    return PairResult(job.variant, job.category, "done", run_id, "", time.time() - t0, str(folder))


def _log_notebook(uri: str, run_id: str, path: Path) -> None:
    from recontrast import tracking

    try:
        tracking.Run(run_id, tracking.get_client(uri=uri or None)).log_artifact(path, "notebooks")
    except Exception as err:
        log.warning("could not log %s to run %s: %s", path.name, run_id, err)


def _describe(err: Exception) -> str:
    """Returns 'Type: message' of the error in the notebook (not papermill's wrapper)."""
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:500]


def _fix_killed_kernel(err: Exception, uri: str) -> None:
    """A kernel that died (OOM, SIGKILL) left its run RUNNING: mark it FAILED now."""
    if getattr(err, "ename", None):
        return  # an exception inside the notebook: its run context already ended the run
    try:
        from recontrast.tracking import fix_stale_runs

        fix_stale_runs(uri=uri or None)
    except Exception as fix_err:
        log.warning("could not check for stale runs: %s", fix_err)


def _init_worker(devices: "mp.Queue", threads: int) -> None:
    """Gives this worker process its own GPU (round-robin) and a share of the CPU threads."""
    device = devices.get()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    if threads and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def run_study(study: str | Path, categories: Sequence[str] | None = ("all",), jobs: int = 1,
              force: bool = False, overrides: Sequence[str] | None = None,
              variants: Sequence[str] | None = None, *, name: str | None = None,
              runs_dir: str | Path | None = None,
              executor: Callable[[Job], PairResult] | None = None) -> StudyReport:
    """Returns the report of running a study file's (variant, category) pairs through
    notebooks 02 and 03; `report.ok` is False when a pair failed (the others still ran).

    `name` renames the study (tags, folders); `executor` replaces execute_pair (tests).
    """
    from recontrast import tracking

    spec = load_study(study)
    if name:
        spec.name = name
    todo = plan(spec, categories, variants, overrides, runs_dir)
    report = StudyReport(spec.name)
    base = load_config(spec.path, [*(overrides or []), f"tracking.study={spec.name}"])
    executor = executor or execute_pair
    with _parent_run(base, spec, todo) as parent:
        report.parent_run_id = parent.run_id if parent else None
        pending = []
        for job in todo:
            state = _status(job, force)
            if state == "done":
                done = json.loads((Path(job.folder) / "done.json").read_text())
                report.results.append(PairResult(job.variant, job.category, "skipped", done.get("run_id"),
                                                 "finished earlier", 0.0, job.folder))
                continue
            job.parent_run_id, job.resume = report.parent_run_id, state == "resume"
            pending.append(job)
        print(f"study {spec.name}: {len(pending)} pair(s) to run, {len(todo) - len(pending)} finished earlier",
              flush=True)
        report.results += _run_jobs(pending, jobs, executor)
        if parent is not None:
            parent.set_tags({"pairs_failed": len(report.failed),
                             "pairs_done": sum(r.status != "failed" for r in report.results)})
    print(report.summary(), flush=True)
    for r in report.failed:
        print(f"FAILED {r.variant}/{r.category}: {r.error} (notebooks in {r.folder})", flush=True)
    return report


def _mark_started(job: Job) -> None:
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").unlink(missing_ok=True)
    (folder / "started.json").write_text(json.dumps({"fingerprint": job.fingerprint}) + "\n")


def _mark_done(job: Job, result: PairResult) -> None:
    """Writes done.json: what makes a rerun skip this pair."""
    if result.status == "done":
        (Path(job.folder) / "done.json").write_text(json.dumps(
            {"run_id": result.run_id, "fingerprint": job.fingerprint, "seconds": round(result.seconds, 1),
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")


def _run_jobs(pending: list[Job], jobs: int, executor) -> list[PairResult]:
    for job in pending:
        _mark_started(job)
    if jobs <= 1 or len(pending) <= 1:
        results = []
        for i, job in enumerate(pending, 1):
            print(f"[{i}/{len(pending)}] {job.variant}/{job.category} ...", flush=True)
            results.append(executor(job))
            _mark_done(job, results[-1])
            print(f"[{i}/{len(pending)}] {job.variant}/{job.category}: {results[-1].status} "
                  f"({results[-1].seconds:.0f}s)", flush=True)
        return results
    ctx = mp.get_context("spawn")  # no forked CUDA or sqlite state in the workers
    devices = ctx.Queue()
    gpus = _gpu_ids()
    for i in range(jobs):
        devices.put(gpus[i % len(gpus)] if gpus else None)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                initargs=(devices, threads)) as pool:
        futures = {pool.submit(executor, job): job for job in pending}
        results = []
        for future in cf.as_completed(futures):
            job = futures[future]
            try:
                results.append(future.result())
            except Exception as err:  # a worker process that died
                results.append(PairResult(job.variant, job.category, "failed", None, _describe(err), 0.0, job.folder))
            _mark_done(job, results[-1])
            print(f"{job.variant}/{job.category}: {results[-1].status} ({results[-1].seconds:.0f}s)", flush=True)
    order = {(j.variant, j.category): i for i, j in enumerate(pending)}
    return sorted(results, key=lambda r: order[(r.variant, r.category)])


def _parent_run(base: Config, spec: Study, todo: list[Job]):
    """Returns a context yielding the study's parent run (reopened on a rerun), or None
    when tracking is off."""
    import contextlib

    from recontrast import tracking

    if not base.tracking.enabled:
        return contextlib.nullcontext(None)
    client = tracking.get_client(base)
    exp = tracking.experiment_id(client, base.tracking.experiment)  # created once, before any job
    found = tracking.retry(client.search_runs, [exp], f"tags.recontrast_role = 'study' and tags.study = '{spec.name}'",
                           max_results=1, order_by=["attributes.start_time DESC"])
    earlier = found[0].data.tags if found else {}  # a rerun of some pairs keeps the others listed
    tags = {"recontrast_role": "study", "study_file": str(spec.path), "category": "(study)"}
    for key, names in (("variants", [*spec.variants, *(j.variant for j in todo)]),
                       ("categories", [j.category for j in todo])):
        tags[key] = ",".join(dict.fromkeys([*filter(None, earlier.get(key, "").split(",")), *names]))
    return tracking.start_run(base, run_name=f"study:{spec.name}", tags=tags,
                              run_id=found[0].info.run_id if found else None)


# ----------------------------------------------------------------------------- results
def _experiment_ids(client, experiment: str | None) -> list[str]:
    """Returns the id of `experiment` ([] when it does not exist), or of every active
    experiment when `experiment` is None or empty."""
    from mlflow.entities import ViewType

    if experiment:
        exp = client.get_experiment_by_name(experiment)
        return [exp.experiment_id] if exp else []
    return [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]


def study_results(study: str, experiment: str | None = None, uri: str | None = None):
    """Returns a DataFrame, one row per run of `study` (latest per variant and category):
    run_id, variant, category, status, the switches in SWITCHES and every metric."""
    import pandas as pd

    from recontrast import tracking

    client = tracking.get_client(uri=uri)
    experiments = _experiment_ids(client, experiment)
    rows, variant_order = [], []
    for i in range(0, len(experiments), 100):
        for run in client.search_runs(experiments[i:i + 100], f"tags.study = '{study}'", max_results=5000,
                                      order_by=["attributes.start_time DESC"]):
            tags = run.data.tags
            if tags.get("recontrast_role"):  # the study's parent run or a comparison run
                variant_order = variant_order or tags.get("variants", "").split(",")
                continue
            row = {"run_id": run.info.run_id, "variant": tags.get("ablation", "?"),
                   "category": tags.get("category", "?"), "status": run.info.status,
                   "start_time": run.info.start_time}
            row.update({k: run.data.params.get(k) for k in SWITCHES})
            row.update(run.data.metrics)
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    finished = frame[frame["status"] == "FINISHED"]
    # Newest first: keep the latest FINISHED run of each pair, else its latest run.
    frame = pd.concat([finished, frame]).drop_duplicates(["variant", "category"], keep="first")
    rank = {v: i for i, v in enumerate(variant_order)}  # the study file's order
    frame["rank"] = [rank.get(v, len(rank)) for v in frame["variant"]]
    return frame.sort_values(["rank", "variant", "category"]).drop(columns="rank").reset_index(drop=True)


def varying_switches(frame) -> list[str]:
    """Returns the SWITCHES whose value differs between the runs of `frame`."""
    return [s for s in SWITCHES if s in frame and frame[s].nunique(dropna=True) > 1]


def ablation_table(frame, metric: str = "image_auroc", baseline: str = "full"):
    """Returns variants x categories of `metric` (plus 'mean'), and a 'delta' column: the
    variant's mean minus the baseline variant's mean (NaN when there is no baseline)."""
    import numpy as np

    finished = frame[frame["status"] == "FINISHED"] if "status" in frame else frame
    if finished.empty or metric not in finished:
        import pandas as pd

        return pd.DataFrame()
    table = finished.pivot_table(index="variant", columns="category", values=metric, aggfunc="first")
    table["mean"] = table.mean(axis=1)
    table["delta"] = table["mean"] - table.loc[baseline, "mean"] if baseline in table.index else np.nan
    seen = list(dict.fromkeys(finished["variant"]))  # the frame's order, not alphabetical
    order = [v for v in [baseline] if v in table.index] + [v for v in seen if v != baseline]
    return table.loc[order]


def ablation_deltas(frame, metrics: Sequence[str] = METRICS, baseline: str = "full"):
    """Returns a long DataFrame (variant, category, metric, value, delta) where delta is the
    variant's value minus the baseline variant's on the same category."""
    import pandas as pd

    finished = frame[frame["status"] == "FINISHED"] if "status" in frame else frame
    metrics = [m for m in metrics if m in finished]
    long = finished.melt(id_vars=["variant", "category"], value_vars=metrics, var_name="metric")
    base = long[long["variant"] == baseline].set_index(["category", "metric"])["value"]
    long["delta"] = [v - base.get((c, m), float("nan")) for c, m, v in
                     zip(long["category"], long["metric"], long["value"])]
    return pd.DataFrame(long)


def log_comparison(study: str, paths: Sequence[str | Path], experiment: str | None = None,
                   uri: str | None = None) -> str:
    """Returns the id of the run the comparison files were logged to (under comparison/):
    the study's parent run, or a new run '<study>-comparison' when there is none."""
    from recontrast import tracking

    client = tracking.get_client(uri=uri)
    experiments = _experiment_ids(client, experiment)
    found = client.search_runs(experiments, f"tags.recontrast_role = 'study' and tags.study = '{study}'",
                               max_results=1, order_by=["attributes.start_time DESC"]) if experiments else []
    if found:
        run = tracking.Run(found[0].info.run_id, client)
    else:
        exp_id = tracking.experiment_id(client, experiment or "recontrast")
        created = tracking.retry(client.create_run, exp_id, run_name=f"{study}-comparison",
                                 tags={"study": study, "recontrast_role": "comparison"})
        run = tracking.Run(created.info.run_id, client)
    for path in paths:
        run.log_artifact(path, "comparison")
    if not found:
        run.end("FINISHED")
    return run.run_id
