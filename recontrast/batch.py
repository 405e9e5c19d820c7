"""Batch: one papermill execution of notebooks 02 (train) and 03 (evaluate) per
(variant, category) of a study, grouped under a parent MLflow run.

Each pair runs in experiments/runs/<study>/<variant>/<category>/ with the executed
notebooks, the training output (train/) and, once both notebooks succeeded, done.json. A
rerun skips pairs whose done.json matches their current config (unless force), resumes a
training whose checkpoint is there, and goes on past a failing pair (reported at the end).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
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

import torch

from recontrast import mlflow_model, tracking
from recontrast.checkpoint import final_checkpoint
from recontrast.config import Config, ConfigError, load_config
from recontrast.health import NOT_CONVERGED
from recontrast.locks import folder_lock
from recontrast.mlflow_store import (RUN_ID_FILE, Tag, experiment_id, fix_stale_runs, get_client, quote, read_run_id,
                                     retry, tracking_uri)
from recontrast.preflight import checkpoint_progress
from recontrast.ray_executor import RayOptions, check_options, connected, import_ray, run_pairs
from recontrast.runtime import PROGRESS_LINES_ENV, ROOT_ENV, environment, notebook_folder, project_root
from recontrast.study import (Job, PairStatus, Study, changed_keys, check_name, load_study, plan,
                              recorded_as, study_status, switches)
from recontrast.study_results import (delta_table, log_comparison, log_study_metrics, study_results, ui_link,
                                      write_delta_table)

log = logging.getLogger(__name__)

NOTEBOOKS = ("02_train.ipynb", "03_evaluate.ipynb")
KERNEL_LOG = "kernel.log"  # in the pair's folder: the kernel process's own output (not its cells')
# Loggers that report a notebook kernel's shutdown; after a Ctrl-C that is noise, the data is safe.
_SHUTDOWN_LOGGERS = ("asyncio", "papermill", "nbclient", "traitlets", "jupyter_client", "tornado")


@dataclass
class TrainParams:
    """Notebook 02's parameters, with its defaults (tests/test_notebooks.py checks its
    `parameters` cell against them): what a batch passes to papermill for one pair."""

    config: str = "experiments/demo.yaml"
    category: str = ""
    data_root: str = ""
    overrides: list[str] = field(default_factory=list)
    run_name: str = ""
    study: str = ""
    variant: str = ""
    out: str = ""
    parent_run_id: str = ""
    resume: bool = False
    evaluate_at_end: bool = True
    track: bool = True


@dataclass
class EvaluateParams:
    """Notebook 03's parameters, with its defaults (checked like TrainParams)."""

    run_id: str = ""
    checkpoint: str = ""
    data_root: str = ""
    category: str = ""
    out: str = ""
    overrides: list[str] = field(default_factory=list)
    track: bool = True


@dataclass
class AblationsParams:
    """Notebook 04's parameters, with its defaults (checked like TrainParams)."""

    study: str = "demo"
    experiment: str = ""
    baseline: str = "full"
    metrics: list[str] = field(default_factory=lambda: ["image_auroc", "pixel_auroc", "aupro"])
    out: str = ""
    log_to_mlflow: bool = True
COMPARISON = "04_ablations.ipynb"


@dataclass
class PairResult:
    variant: str
    category: str
    status: str  # PairStatus.DONE, SKIPPED or FAILED
    run_id: str | None = None
    error: str = ""
    seconds: float = 0.0
    folder: str = ""
    health: str = ""  # the run's health tag: "not_converged" marks a model not to trust


@dataclass
class StudyReport:
    study: str
    results: list[PairResult] = field(default_factory=list)
    parent_run_id: str | None = None

    @property
    def ok(self) -> bool:
        return all(r.status != PairStatus.FAILED for r in self.results)

    @property
    def failed(self) -> list[PairResult]:
        return [r for r in self.results if r.status == PairStatus.FAILED]

    @property
    def not_converged(self) -> list[PairResult]:
        return [r for r in self.results if r.health == NOT_CONVERGED]

    def summary(self) -> str:
        """Returns one line per pair and a count line."""
        lines = [f"{r.variant:<14} {r.category:<12} {r.status:<8} {r.health or '-':<13} {r.seconds:7.1f}s  "
                 f"{r.run_id or '-':<32} {r.error}".rstrip() for r in self.results]
        counts = {s: sum(r.status == s for r in self.results) for s in (PairStatus.DONE, PairStatus.SKIPPED, PairStatus.FAILED)}
        lines.append(f"study {self.study}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return "\n".join(lines)


def kernel_name() -> str:
    """Returns a Jupyter kernel name that runs this interpreter (sys.executable).

    'python3' when it resolves here (jupyter_client maps a bare 'python' to sys.executable);
    otherwise a kernelspec for this interpreter is installed into sys.prefix/share/jupyter.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        argv0 = manager.get_kernel_spec("python3").argv[0]
        if (argv0 in ("python", "python3", f"python3.{sys.version_info[1]}")
                or Path(argv0).resolve() == Path(sys.executable).resolve()):
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

    root, folder = project_root(), Path(job.folder)
    t0, run_id, kernel = time.time(), None, kernel_name()
    train_out = folder / "train"
    if not job.resume:  # a run id left by an earlier attempt must not receive this one's notebooks
        (train_out / RUN_ID_FILE).unlink(missing_ok=True)
    steps = [
        (NOTEBOOKS[0], TrainParams(config=job.config, category=job.category, overrides=job.overrides,
                                   out=str(train_out), study=job.study, variant=job.variant,
                                   run_name=f"{job.variant}-{job.category}", parent_run_id=job.parent_run_id or "",
                                   resume=job.resume, evaluate_at_end=False, track=job.track)),
        (NOTEBOOKS[1], EvaluateParams(out=str(folder / "eval"), track=job.track)),
    ]
    if job.resume and _training_finished(job, train_out):  # resuming would train nothing
        steps, run_id = steps[1:], read_run_id(train_out)
        print(f"[{job.variant}/{job.category}] its training finished earlier; evaluating it", flush=True)
    try:
        for name, params in steps:
            if isinstance(params, EvaluateParams):  # known once training ended (best.ckpt with train.select=proxy)
                params.run_id, params.checkpoint = run_id or "", str(final_checkpoint(train_out))
            try:
                # The kernel's printed lines reach this console, prefixed with the pair, so a
                # long batch shows which pair is at which iteration.
                out = PrefixedLines(f"[{job.variant}/{job.category}] ", sys.stdout)
                # The kernel inherits both: $IPYNB_FILE gives its runs mlflow.source.name = the
                # notebook; progress lines reach this console (a widget would not).
                with environment(IPYNB_FILE=str(folder / name), **{PROGRESS_LINES_ENV: "1", ROOT_ENV: str(root)}):
                    pm.execute_notebook(notebook_folder() / name, folder / name, parameters=dataclasses.asdict(params),
                                        kernel_name=kernel, cwd=str(root), progress_bar=False,
                                        kernel_manager_class=logged_kernel(folder / KERNEL_LOG),
                                        start_timeout=300, report_mode=False, stdout_file=out, stderr_file=out)
            finally:
                run_id = read_run_id(train_out) or run_id
                if run_id and (folder / name).is_file():
                    _log_notebook(job.uri, run_id, folder / name)
    except Exception as err:
        error = _describe(err)
        log.error("%s/%s failed: %s", job.variant, job.category, error)
        _fix_killed_kernel(err, job.uri)
        return PairResult(job.variant, job.category, PairStatus.FAILED, run_id, error, time.time() - t0, str(folder))
    return PairResult(job.variant, job.category, PairStatus.DONE, run_id, "", time.time() - t0, str(folder),
                      health=_run_health(job.uri, run_id))


def logged_kernel(log: Path):
    """Returns a jupyter_client kernel manager class whose kernel process writes its own output
    (IPKernelApp notices, the ZMQ tracebacks of its shutdown after a Ctrl-C) to `log`, not to
    the batch's console; what the cells print still reaches it through papermill."""
    from jupyter_client.manager import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as out:  # the kernel gets its own copy of the descriptor
                kw.setdefault("stdout", out)
                kw.setdefault("stderr", out)
                return await super()._async_launch_kernel(kernel_cmd, **kw)

    return LoggedKernelManager


def _training_finished(job: Job, train_out: Path) -> bool:
    """Returns True when <train_out>/last.ckpt already holds the pair's train.iters iterations."""
    try:
        done, _ = checkpoint_progress(train_out / "last.ckpt")
        return done >= load_config(job.config, job.overrides).train.iters
    except Exception:  # no readable checkpoint: notebook 02 says what is wrong
        return False


def _run_health(uri: str, run_id: str | None) -> str:
    """Returns the run's health tag ('ok', 'not_converged', ...; '' when unknown)."""
    if not run_id:
        return ""
    try:
        return get_client(uri=uri or None).get_run(run_id).data.tags.get(Tag.HEALTH, "")
    except Exception as err:  # the pair finished; its health is extra information
        log.warning("could not read the health of run %s: %s", run_id, err)
        return ""


class PrefixedLines:
    """A text stream that writes each complete line to `target` behind `prefix`."""

    def __init__(self, prefix: str, target):
        self.prefix, self.target, self._partial = prefix, target, ""

    def write(self, text: str) -> int:
        lines = (self._partial + text.replace("\r", "\n")).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.target.write(f"{self.prefix}{line}\n")
        self.target.flush()
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def _log_notebook(uri: str, run_id: str, path: Path) -> None:
    try:
        tracking.Run(run_id, get_client(uri=uri or None)).log_artifact(path, "notebooks")
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
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def run_study(study: str | Path, categories: Sequence[str] | None = ("all",), jobs: int = 1,
              force: bool = False, overrides: Sequence[str] | None = None,
              variants: Sequence[str] | None = None, *, name: str | None = None,
              runs_dir: str | Path | None = None, register: str | None = None,
              executor: Callable[[Job], PairResult] | None = None,
              ray: RayOptions | None = None, compare: bool = True) -> StudyReport:
    """Returns the report of running a study file's (variant, category) pairs through
    notebooks 02 and 03; `report.ok` is False when a pair failed (the others still ran).
    The parent run gets the study-level metrics (study_results.log_study_metrics).

    `name` renames the study (tags, folders); `register` names a variant whose models are
    registered, one registered model per category (`models:/<category>/<version>`);
    `executor` replaces execute_pair (tests); `ray` runs each pair as a Ray task
    (recontrast.ray_executor) instead of a local process; `compare` ends the batch with the
    comparison (_compare: notebook 04, the delta table printed and in the study folder).
    One batch runs a study at a time: a second one, started while the first runs, refuses at
    once naming the first (it would train the same pairs into the same folders).
    """
    if ray is not None:  # an executor that cannot work stops here, before any folder or run is touched
        check_options(ray)
        import_ray()
    spec = load_study(study)
    if name:
        spec.name = check_name(name, "the study name")
    todo = plan(spec, categories, variants, overrides, runs_dir)
    if register and register not in spec.variants:
        raise ConfigError(f"cannot register the models of variant '{register}': study '{spec.name}' has the "
                          f"variants {', '.join(spec.variants)}")
    folder = (Path(runs_dir) if runs_dir else project_root() / "experiments" / "runs") / spec.name
    try:
        with folder_lock(folder, f"study '{spec.name}', folder", fix="stop it first (a rerun skips the pairs it finished)"):
            return _run_planned(spec, todo, jobs, force, overrides, executor or execute_pair, register, ray,
                                folder if compare else None)
    except KeyboardInterrupt:  # Ctrl-C: the caller says "interrupted" in one line; the kernels' shutdown is silent
        for name in _SHUTDOWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        raise


def _run_planned(spec: Study, todo: list[Job], jobs: int, force: bool, overrides, executor,
                 register: str | None = None, ray: RayOptions | None = None,
                 compare_in: Path | None = None) -> StudyReport:
    """Returns run_study's report; the caller holds the study folder's lock. `compare_in`: the
    study folder the comparison (notebook 04, the delta table) is written to; None: none.

    Every check comes before any record is opened: which pairs have work left, then the
    executor (Ray joined within its timeout); the parent run is reopened only when a pair runs.
    """
    report = StudyReport(spec.name)
    base = load_config(spec.path, [*(overrides or []), f"tracking.study={spec.name}"])
    pending = []
    for job in todo:
        state = study_status(job, force)
        if state == PairStatus.DONE:
            done = json.loads((Path(job.folder) / "done.json").read_text())
            report.results.append(PairResult(job.variant, job.category, PairStatus.SKIPPED, done.get("run_id"),
                                             "finished earlier", 0.0, job.folder, done.get("health", "")))
            continue
        job.resume = state == PairStatus.RESUME
        _say_why_rerun(job, force)
        pending.append(job)
    print(f"study {spec.name}: {len(pending)} pair(s) to run, {len(todo) - len(pending)} finished earlier",
          flush=True)
    if not pending:
        print(f"study {spec.name}: nothing to run, every pair finished earlier with these settings (--force "
              f"redoes them); no run or file was changed", flush=True)
        print(report.summary(), flush=True)
        return report
    with connected(ray, pending, jobs) if ray else contextlib.nullcontext():
        with _parent_run(base, spec, todo) as parent:
            report.parent_run_id = parent.run_id if parent else None
            for job in pending:
                job.parent_run_id = report.parent_run_id
            report.results += _run_on_ray(pending, jobs, executor, ray) if ray else _run_jobs(pending, jobs, executor)
            if parent is not None:
                parent.set_tags({Tag.PAIRS_FAILED: len(report.failed),
                                 Tag.PAIRS_DONE: sum(r.status != PairStatus.FAILED for r in report.results)})
                _log_study_metrics(spec, base, parent.run_id)
                if register:
                    _register(report, register, tracking_uri(base))
    print(report.summary(), flush=True)
    for r in report.failed:
        print(f"FAILED {r.variant}/{r.category}: {r.error} (notebooks in {r.folder})", flush=True)
    for r in report.not_converged:
        print(f"NOT CONVERGED {r.variant}/{r.category}: its metrics are not to be trusted "
              f"(MLflow run {r.run_id}, tag health_reason; notebooks in {r.folder})", flush=True)
    if parent is not None and compare_in is not None:
        _compare(spec, base, report.parent_run_id, compare_in)
    return report


def _say_why_rerun(job: Job, force: bool) -> None:
    """Prints why a finished pair runs again (--force, or which result-changing keys changed)
    and notes its run in started.json, so the run that replaces it can mark it superseded."""
    try:
        done = json.loads((Path(job.folder) / "done.json").read_text())
    except (OSError, ValueError):
        return
    why = "--force" if force and recorded_as(done, job) else \
        f"its settings changed since it finished ({changed_keys(done.get('settings'), job.settings)})"
    print(f"{job.variant}/{job.category}: running it again: {why}", flush=True)
    job.replaces = done.get("run_id") or ""
    job.replace_reason = why


def _mark_started(job: Job) -> None:
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").unlink(missing_ok=True)
    started = {"fingerprint": job.fingerprint, "settings": job.settings}
    if job.replaces:
        started.update(replaces=job.replaces, reason=job.replace_reason)
    elif job.resume:  # a resumed attempt keeps the run it replaces from its first attempt
        with contextlib.suppress(OSError, ValueError):
            earlier = json.loads((folder / "started.json").read_text())
            started.update({k: earlier[k] for k in ("replaces", "reason") if k in earlier})
    (folder / "started.json").write_text(json.dumps(started) + "\n")


def _mark_done(job: Job, result: PairResult) -> None:
    """Writes done.json (what makes a rerun skip this pair) and tags the run this pair's
    earlier result was logged to as superseded by the new one."""
    if result.status != PairStatus.DONE:
        return
    (Path(job.folder) / "done.json").write_text(json.dumps(
        {"run_id": result.run_id, "fingerprint": job.fingerprint, "seconds": round(result.seconds, 1),
         "health": result.health, "settings": job.settings,
         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    try:
        started = json.loads((Path(job.folder) / "started.json").read_text())
    except (OSError, ValueError):
        return
    old = started.get("replaces")
    if job.track and old and old != result.run_id:
        try:
            tracking.Run(old, get_client(uri=job.uri or None)).set_tags(
                {Tag.SUPERSEDED_BY: result.run_id or "?", Tag.SUPERSEDED_REASON: started.get("reason", "")[:5000]})
        except Exception as err:  # the new result is kept either way
            log.warning("could not mark run %s as superseded by %s: %s", old, result.run_id, err)


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
                results.append(PairResult(job.variant, job.category, PairStatus.FAILED, None, _describe(err), 0.0,
                                          job.folder))
            _mark_done(job, results[-1])
            print(f"{job.variant}/{job.category}: {results[-1].status} ({results[-1].seconds:.0f}s)", flush=True)
    return _in_plan_order(pending, results)


def _run_on_ray(pending: list[Job], jobs: int, executor, options: RayOptions) -> list[PairResult]:
    """Returns the pairs' results, each run as a Ray task (a local instance: `jobs` at once)."""
    for job in pending:
        _mark_started(job)
    results = []
    for job, outcome in run_pairs(pending, executor, options, local_pairs=jobs):
        if not isinstance(outcome, PairResult):  # the task failed or its worker died: a one-line reason
            outcome = PairResult(job.variant, job.category, PairStatus.FAILED, read_run_id(Path(job.folder) / "train"),
                                 outcome, 0.0, job.folder)
        results.append(outcome)
        _mark_done(job, outcome)
        print(f"{job.variant}/{job.category}: {outcome.status} ({outcome.seconds:.0f}s)", flush=True)
    return _in_plan_order(pending, results)


def _in_plan_order(pending: list[Job], results: list[PairResult]) -> list[PairResult]:
    order = {(j.variant, j.category): i for i, j in enumerate(pending)}
    return sorted(results, key=lambda r: order[(r.variant, r.category)])


def _log_study_metrics(spec: Study, base: Config, parent_run_id: str) -> None:
    """Logs the means and deltas per variant to the parent run (the MLflow UI charts them)."""
    baseline = study_baseline(spec)
    try:
        summary = log_study_metrics(spec.name, parent_run_id, base.tracking.experiment, tracking_uri(base), baseline)
        print(f"study {spec.name}: {len(summary)} study metrics logged to the parent run {parent_run_id}", flush=True)
    except Exception as err:  # the pairs' runs hold the results; the summary can be logged again
        log.warning("could not log the study metrics to run %s: %s", parent_run_id, err)


def study_baseline(spec: Study) -> str:
    """Returns the variant the deltas are taken against: 'full', else the study's first."""
    return "full" if "full" in spec.variants else next(iter(spec.variants))


def _compare(spec: Study, base: Config, parent_run_id: str, folder: Path) -> None:
    """Ends a batch with the comparison of the study's finished runs: notebook 04 executed
    into <folder>/04_ablations.ipynb (its tables and figures in <folder>/comparison/, logged to
    the parent run under comparison/), the delta table per variant printed and written as
    <folder>/deltas.csv and deltas.png (the figure logged as the parent run's top-level file), and
    the MLflow UI link of the study's runs. A failure here leaves the pairs' results alone."""
    uri, experiment, baseline = tracking_uri(base), base.tracking.experiment, study_baseline(spec)
    try:
        frame = study_results(spec.name, experiment, uri)
        if frame.empty or not (frame["status"] == "FINISHED").any():
            print(f"study {spec.name}: no finished run to compare", flush=True)
            return
        table = delta_table(frame, baseline)
        paths = write_delta_table(table, folder, baseline) if not table.empty else []
        client = get_client(uri=uri)
        if paths:  # the parent's one top-level file (notebook 04's are under comparison/, with its CSVs)
            tracking.Run(parent_run_id, client).log_artifact(paths[1])
        notebook = comparison_notebook(spec.name, experiment, folder, baseline)
        log_comparison(spec.name, [notebook], experiment, uri)
    except Exception as err:  # the runs hold every number; notebook 04 can be run again by hand
        log.warning("could not compare the runs of study %s: %s (run notebooks/%s with study=%s)",
                    spec.name, _describe(err), COMPARISON, spec.name)
        return
    if table.empty:
        print(f"study {spec.name}: no '{baseline}' run to take deltas against", flush=True)
    else:
        print(f"\nstudy {spec.name}: variant minus {baseline}, percentage points, mean over categories\n"
              f"{table.to_string(float_format='{:+.2f}'.format)}\n"
              f"written to {paths[0]} and {paths[1].name}; notebook 04: {notebook}", flush=True)
    link = ui_link(experiment_id(client, experiment), f"tags.study = '{spec.name}'", uri)
    print(f"MLflow UI (`make ui`): {link}", flush=True)


def comparison_notebook(study: str, experiment: str, folder: Path, baseline: str = "full") -> Path:
    """Returns notebook 04 executed for `study` into `folder` (its tables and figures in
    folder/comparison, logged to the study's parent run)."""
    import papermill as pm

    out = folder / COMPARISON
    params = AblationsParams(study=study, experiment=experiment, baseline=baseline, out=str(folder / "comparison"))
    pm.execute_notebook(notebook_folder() / COMPARISON, out, cwd=str(project_root()),
                        parameters=dataclasses.asdict(params),
                        kernel_name=kernel_name(), progress_bar=False, start_timeout=300)
    return out


def _register(report: StudyReport, variant: str, uri: str) -> None:
    """Registers the model of each pair of `variant` under its category's name."""
    for r in report.results:
        if r.variant != variant or r.status == PairStatus.FAILED or not r.run_id:
            continue
        try:
            version = mlflow_model.register(r.run_id, r.category, uri=uri)
            print(f"registered {r.variant}/{r.category}: models:/{version.name}/{version.version}", flush=True)
        except Exception as err:
            log.warning("could not register the model of %s/%s (run %s): %s", r.variant, r.category, r.run_id, err)


def study_params(base: Config, spec: Study) -> dict[str, Any]:
    """Returns the parent run's params: the config all pairs share, less the keys a variant
    sets (its children carry those) and each pair's own (category, run folder, variant)."""
    varied = set(switches(spec))
    own = {"tracking.ablation", "tracking.run_name", "data.category", "train.out"}
    return {k: v for k, v in base.flatten().items() if k not in varied | own}


def _parent_run(base: Config, spec: Study, todo: list[Job]):
    """Returns a context yielding the study's parent run (reopened on a rerun), or None
    when tracking is off."""
    if not base.tracking.enabled:
        return contextlib.nullcontext(None)
    client = get_client(base)
    exp = experiment_id(client, base.tracking.experiment)  # created once, before any job
    found = retry(client.search_runs, [exp], f"tags.{Tag.ROLE} = '{Tag.ROLE_STUDY}' and tags.{Tag.STUDY} = {quote(spec.name)}",
                           max_results=1, order_by=["attributes.start_time DESC"])
    earlier = found[0].data.tags if found else {}  # a rerun of some pairs keeps the others listed
    # No variant of its own: the base config's variant would read as one of the study's.
    tags = {Tag.ROLE: Tag.ROLE_STUDY, Tag.STUDY_FILE: str(spec.path), Tag.CATEGORY: "(study)", Tag.VARIANT: None}
    for key, names in ((Tag.VARIANTS, [*spec.variants, *(j.variant for j in todo)]),
                       (Tag.CATEGORIES, [j.category for j in todo]), (Tag.SWITCHES, switches(spec))):
        tags[key] = ",".join(dict.fromkeys([*filter(None, earlier.get(key, "").split(",")), *names]))
    return tracking.start_run(base, run_name=f"study:{spec.name}", tags=tags, params=study_params(base, spec),
                              run_id=found[0].info.run_id if found else None)


