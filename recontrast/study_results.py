"""Study results: the runs of a study read back from MLflow as tables (notebook 04, the demo),
and the study-level metrics its parent run carries for the MLflow UI.

pandas is imported inside the functions: `recontrast` itself works without it.
"""
from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from recontrast import tracking
from recontrast.mlflow_store import RunStatus, Tag, experiment_id, get_client, quote, retry
from recontrast.study import METRICS, load_study, switches


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
    run_id, variant, category, status, the study's switches (the config keys its variants
    set: `frame.attrs["switches"]`, read from its parent run) and every metric."""
    import pandas as pd

    client = get_client(uri=uri)
    experiments = _experiment_ids(client, experiment)
    runs, parent = [], None
    for i in range(0, len(experiments), 100):
        for run in client.search_runs(experiments[i:i + 100], f"tags.{Tag.STUDY} = {quote(study)}", max_results=5000,
                                      order_by=["attributes.start_time DESC"]):
            if run.data.tags.get(Tag.ROLE) == Tag.ROLE_STUDY:
                parent = parent or run.data.tags  # the latest parent run
            elif not run.data.tags.get(Tag.ROLE) and not run.data.tags.get(Tag.SUPERSEDED_BY):
                runs.append(run)  # a pair's run (not a comparison run), not replaced by a rerun of its pair
    columns = _switches(parent or {})
    rows = []
    for run in runs:
        tags = run.data.tags
        row = {"run_id": run.info.run_id, "variant": tags.get(Tag.VARIANT, "?"),
               "category": tags.get(Tag.CATEGORY, "?"), "status": run.info.status,
               "start_time": run.info.start_time}
        row.update({k: run.data.params.get(k) for k in columns})
        row.update(run.data.metrics)
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["switches"] = columns
    if frame.empty:
        return frame
    finished = frame[frame["status"] == RunStatus.FINISHED]
    # Newest first: keep the latest FINISHED run of each pair, else its latest run.
    frame = pd.concat([finished, frame]).drop_duplicates(["variant", "category"], keep="first")
    variant_order = [v for v in (parent or {}).get(Tag.VARIANTS, "").split(",") if v]
    rank = {v: i for i, v in enumerate(variant_order)}  # the study file's order
    frame["rank"] = [rank.get(v, len(rank)) for v in frame["variant"]]
    frame = frame.sort_values(["rank", "variant", "category"]).drop(columns="rank").reset_index(drop=True)
    frame.attrs["switches"] = columns
    return frame


def _switches(parent_tags: dict[str, str]) -> list[str]:
    """Returns the config keys a study's variants set: its parent run's tag `switches`, else
    (a parent run logged before that tag) those of the study file it names, else []."""
    if Tag.SWITCHES in parent_tags:
        return [k for k in parent_tags[Tag.SWITCHES].split(",") if k]
    try:
        return switches(load_study(parent_tags[Tag.STUDY_FILE]))
    except (KeyError, OSError, ValueError):  # no parent run, or its study file is gone or changed
        return []


def varying_switches(frame) -> list[str]:
    """Returns the study's switches (study.switches) whose value differs between the runs of `frame`."""
    return [s for s in frame.attrs.get("switches", []) if s in frame and frame[s].nunique(dropna=True) > 1]


def ablation_table(frame, metric: str = "image_auroc", baseline: str = "full"):
    """Returns variants x categories of `metric` (plus 'mean'), and a 'delta' column: the
    variant's mean minus the baseline variant's mean (NaN when there is no baseline)."""
    import pandas as pd

    finished = frame[frame["status"] == RunStatus.FINISHED] if "status" in frame else frame
    if finished.empty or metric not in finished:
        return pd.DataFrame()
    table = finished.pivot_table(index="variant", columns="category", values=metric, aggfunc="first")
    table["mean"] = table.mean(axis=1)
    table["delta"] = table["mean"] - table.loc[baseline, "mean"] if baseline in table.index else float("nan")
    seen = list(dict.fromkeys(finished["variant"]))  # the frame's order, not alphabetical
    order = [v for v in [baseline] if v in table.index] + [v for v in seen if v != baseline]
    return table.loc[order]


def ablation_deltas(frame, metrics: Sequence[str] = METRICS, baseline: str = "full"):
    """Returns a long DataFrame (variant, category, metric, value, delta) where delta is the
    variant's value minus the baseline variant's on the same category."""
    import pandas as pd

    finished = frame[frame["status"] == RunStatus.FINISHED] if "status" in frame else frame
    metrics = [m for m in metrics if m in finished]
    long = finished.melt(id_vars=["variant", "category"], value_vars=metrics, var_name="metric")
    base = long[long["variant"] == baseline].set_index(["category", "metric"])["value"]
    long["delta"] = [v - base.get((c, m), float("nan")) for c, m, v in
                     zip(long["category"], long["metric"], long["value"])]
    return pd.DataFrame(long)


def study_summary_metrics(frame, baseline: str = "full", metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """Returns the study-level metrics of the parent run: per variant and metric,
    '<variant>/<metric>_mean' (mean over its finished categories) and, for every variant but
    the baseline, '<variant>/<metric>_delta' (mean over the categories both finished of the
    variant's value minus the baseline's; absent without a baseline run)."""
    import pandas as pd

    finished = frame[frame["status"] == RunStatus.FINISHED] if "status" in frame else frame
    metrics = [m for m in metrics if m in finished]
    if finished.empty or not metrics:
        return {}
    values = finished.melt(id_vars=["variant", "category"], value_vars=metrics, var_name="metric").dropna()
    out: dict[str, float] = {}
    for (variant, metric), group in values.groupby(["variant", "metric"], sort=False):
        out[f"{variant}/{metric}_mean"] = float(group["value"].mean())
    deltas = ablation_deltas(finished, metrics, baseline).dropna(subset=["delta"])
    for (variant, metric), group in deltas[deltas["variant"] != baseline].groupby(["variant", "metric"], sort=False):
        out[f"{variant}/{metric}_delta"] = float(group["delta"].mean())
    return {k: v for k, v in out.items() if pd.notna(v)}


def delta_table(frame, baseline: str = "full", metrics: Sequence[str] = METRICS):
    """Returns variants (not the baseline) x metrics: the mean over the categories both
    finished of the variant's value minus the baseline's, in percentage points (the parent
    run's '<variant>/<metric>_delta' metrics times 100); empty without a baseline run."""
    import pandas as pd

    if frame.empty:
        return pd.DataFrame()
    deltas = ablation_deltas(frame, metrics, baseline).dropna(subset=["delta"])
    deltas = deltas[deltas["variant"] != baseline]
    if deltas.empty:
        return pd.DataFrame()
    table = 100 * deltas.pivot_table(index="variant", columns="metric", values="delta", aggfunc="mean")
    order = [v for v in dict.fromkeys(frame["variant"]) if v in table.index]  # the study file's order
    table = table.loc[order, [m for m in metrics if m in table.columns]]
    table.columns.name = f"minus {baseline}, points"
    return table


def delta_figure(table, baseline: str = "full"):
    """Returns a matplotlib Figure of delta_table: one panel per metric, a named bar per
    variant, its value in points written beside it."""
    n_var, n_met = len(table.index), len(table.columns)
    cols = min(4, n_met)
    rows = -(-n_met // cols)
    fig = Figure(figsize=(1.5 + 3.2 * cols, rows * (1.0 + 0.45 * n_var) + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax, metric in zip(axes, table.columns):
        values = table[metric].to_numpy()
        ax.barh(list(table.index), values, color=["tab:red" if v < 0 else "tab:green" for v in values])
        ax.bar_label(ax.containers[0], labels=[f"{v:+.2f}" for v in values], padding=2, fontsize=8)
        low, high = min(values.min(), 0.0), max(values.max(), 0.0)
        pad = 0.35 * max(high - low, 0.5)  # room for the value labels
        ax.set_xlim(low - pad, high + pad)
        ax.axvline(0, color="black", lw=1)
        ax.set(title=metric, xlabel="points")
    for ax in axes[n_met:]:
        ax.set_visible(False)
    axes[0].invert_yaxis()  # the study file's order, top down (the axes share y)
    fig.suptitle(f"variant minus {baseline}, percentage points (mean over categories)")
    return fig


def write_delta_table(table, folder: str | Path, baseline: str = "full") -> list[Path]:
    """Returns [deltas.csv, deltas.png] after writing delta_table and its figure to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, png = folder / "deltas.csv", folder / "deltas.png"
    table.round(4).to_csv(csv)
    delta_figure(table, baseline).savefig(png, dpi=100)
    return [csv, png]


# `make ui` serves the local store here; a tracking server's URI is its own UI.
LOCAL_UI = "http://127.0.0.1:5000"


def ui_link(experiment_id: str, search_filter: str | None = None, uri: str | None = None) -> str:
    """Returns the MLflow UI's address of an experiment's runs in its machine-learning view
    (MLflow 3 opens in its GenAI view of traces otherwise), filtered by `search_filter`."""
    base = uri.rstrip("/") if uri and uri.startswith(("http://", "https://")) else LOCAL_UI
    query = {"searchFilter": search_filter} if search_filter else {}
    query["workflowType"] = "machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"


def _parent_run_id(client, experiments: list[str], study: str) -> str | None:
    """Returns the id of the latest parent run of `study` (tags recontrast_role=study), or None."""
    found = client.search_runs(experiments, f"tags.{Tag.ROLE} = '{Tag.ROLE_STUDY}' and tags.{Tag.STUDY} = {quote(study)}",
                               max_results=1, order_by=["attributes.start_time DESC"]) if experiments else []
    return found[0].info.run_id if found else None


def log_study_metrics(study: str, parent_run_id: str | None = None, experiment: str | None = None,
                      uri: str | None = None, baseline: str = "full",
                      metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """Returns the study_summary_metrics of `study`'s runs after logging them to its parent
    run (`parent_run_id`, else the latest one found), and to each of its runs the deltas to
    the baseline on the same category as 'delta/<metric>' (0 for the baseline): in the MLflow
    UI's chart view one bar chart per metric then compares the variants."""
    client = get_client(uri=uri)
    parent_run_id = parent_run_id or _parent_run_id(client, _experiment_ids(client, experiment), study)
    if parent_run_id is None:
        raise LookupError(f"study '{study}' has no parent run (tags.recontrast_role = 'study'); "
                          f"`recontrast batch` creates it")
    frame = study_results(study, experiment, uri)
    summary = study_summary_metrics(frame, baseline, metrics)
    run = tracking.Run(parent_run_id, client)
    run.log_metrics(summary)
    run.set_tags({Tag.BASELINE: baseline})
    if summary:
        run_ids = {(v, c): r for v, c, r in zip(frame["variant"], frame["category"], frame["run_id"])}
        deltas = ablation_deltas(frame, metrics, baseline).dropna(subset=["delta"])
        for (variant, category), group in deltas.groupby(["variant", "category"], sort=False):
            tracking.Run(run_ids[(variant, category)], client).log_metrics(
                {f"delta/{m}": d for m, d in zip(group["metric"], group["delta"])})
    return summary


def log_comparison(study: str, paths: Sequence[str | Path], experiment: str | None = None,
                   uri: str | None = None) -> str:
    """Returns the id of the run the comparison files were logged to (under comparison/):
    the study's parent run, or a new run '<study>-comparison' when there is none."""
    client = get_client(uri=uri)
    parent_run_id = _parent_run_id(client, _experiment_ids(client, experiment), study)
    if parent_run_id:
        run = tracking.Run(parent_run_id, client)
    else:
        exp_id = experiment_id(client, experiment or "recontrast")
        created = retry(client.create_run, exp_id, run_name=f"{study}-comparison",
                                 tags={Tag.STUDY: study, Tag.ROLE: Tag.ROLE_COMPARISON})
        run = tracking.Run(created.info.run_id, client)
    for path in paths:
        run.log_artifact(path, "comparison")
    if not parent_run_id:
        run.end(RunStatus.FINISHED)
    return run.run_id
