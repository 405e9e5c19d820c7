"""Writes the four notebooks of this folder, without outputs: edit here, then run

    .venv/bin/python notebooks/make_notebooks.py

The notebooks orchestrate and draw; the method lives in `recontrast`. Each has one cell
tagged `parameters` (papermill injects its values after it). Cell ids are fixed so that
regenerating an unchanged notebook gives the same file.
"""
from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

SETUP = '''\
%matplotlib inline
import os
from pathlib import Path

from recontrast.tracking import project_root

os.chdir(project_root())  # paths in configs and parameters are relative to the repository root
print("working in", Path.cwd())'''

# --------------------------------------------------------------------------- 01
DATA_EXPLORATION = [
    ("md", '''\
# 01 Data exploration

Counts per split and defect type, sample images with their masks, where defects are and how
large, and image statistics, for one category of an MVTec-AD-layout root (`data_format="mvtec"`)
or a folder of your own images (`data_format="folder"`, see `recontrast.data.FolderDataset`).

Works on the synthetic data (`recontrast synth`, generated here when missing), on the real
bottle copy (`data_root="../shared/data/mvtec_ad_256"`, `category="bottle"`) and on a full
MVTec AD download.'''),
    ("parameters", '''\
data_root = "data/synthetic"  # relative to the repository root
category = "weave"
image_size = 256
data_format = "mvtec"  # "mvtec" or "folder"
max_images = 400  # per split, for the statistics (all images are counted)
n_examples = 4  # sample images per row'''),
    ("code", SETUP + '''

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from recontrast import plots, synthetic
from recontrast.config import DataConfig
from recontrast.data import build_datasets

sns.set_theme(style="whitegrid")
if not Path(data_root).exists() and Path(data_root).name.startswith("synthetic"):
    print(f"{data_root} is missing: generating the synthetic dataset")
    synthetic.generate(data_root)'''),
    ("code", '''\
data_cfg = DataConfig(root=data_root, category=category, format=data_format,
                      image_size=image_size, val_fraction=0.0, cache=False)
ds = build_datasets(data_cfg)
samples = pd.DataFrame(
    [{"split": split, "defect_type": s.defect_type, "label": s.label, "path": str(s.path),
      "has_mask": s.mask_path is not None}
     for split, d in (("train", ds.train), ("test", ds.test)) for s in d.samples])
print(f"{len(samples)} images, defect types: {', '.join(ds.test.defect_types) or 'none'}")
pd.crosstab(samples["defect_type"], samples["split"], margins=True)'''),
    ("code", '''\
fig = Figure(figsize=(8, 3.5), layout="constrained")
ax = fig.subplots()
sns.countplot(data=samples, y="defect_type", hue="split", ax=ax)
ax.set(title=f"{category}: images per split and type", xlabel="images", ylabel="")
fig'''),
    ("md", "## Sample images, defects outlined by their masks"),
    ("code", '''\
def pick(dataset, kind, n):
    return [i for i, s in enumerate(dataset.samples) if s.defect_type == kind][:n]

rows = [("train good", ds.train, pick(ds.train, "good", n_examples))]
rows += [(f"test {t}", ds.test, pick(ds.test, t, n_examples)) for t in ds.test.defect_types]
fig = Figure(figsize=(2.2 * n_examples, 2.3 * len(rows)), layout="constrained")
axes = fig.subplots(len(rows), n_examples, squeeze=False)
for (title, dataset, idx), row in zip(rows, axes):
    for j, ax in enumerate(row):
        ax.axis("off")
        if j >= len(idx):
            continue
        item = dataset[idx[j]]
        ax.imshow(plots.denormalize(item["image"]))
        if item["mask"].any():
            ax.contour(item["mask"][0].numpy(), levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"{title}\\n{Path(item['path']).name}", fontsize=8)
fig'''),
    ("md", "## Defect masks: size and location"),
    ("code", '''\
defects = [i for i, s in enumerate(ds.test.samples) if s.label == 1][:max_images]
records, heat = [], np.zeros((image_size, image_size))
for i in defects:
    item = ds.test[i]
    mask = item["mask"][0].numpy() > 0.5
    heat += mask
    ys, xs = np.nonzero(mask)
    records.append({"defect_type": item["defect_type"], "area_%": 100 * mask.mean(),
                    "cx": xs.mean() / image_size if len(xs) else np.nan,
                    "cy": ys.mean() / image_size if len(ys) else np.nan})
masks = pd.DataFrame(records)
masks.groupby("defect_type")["area_%"].describe().round(3) if len(masks) else "no masks"'''),
    ("code", '''\
fig = Figure(figsize=(14, 4), layout="constrained")
ax_area, ax_loc, ax_heat = fig.subplots(1, 3)
if len(masks):
    sns.histplot(data=masks, x="area_%", hue="defect_type", element="step", ax=ax_area)
    sns.scatterplot(data=masks, x="cx", y="cy", hue="defect_type", ax=ax_loc, legend=False)
    ax_loc.set(xlim=(0, 1), ylim=(1, 0), aspect="equal")
    ax_heat.imshow(heat / max(len(defects), 1), cmap="magma")
ax_area.set(title="defect area (% of the image)")
ax_loc.set(title="defect centroids (image coordinates)")
ax_heat.set(title="how often each pixel is defective")
ax_heat.axis("off")
fig'''),
    ("md", "## Image statistics: brightness and colour per split and type"),
    ("code", '''\
stats = []
for split, dataset in (("train", ds.train), ("test", ds.test)):
    for i in np.linspace(0, len(dataset) - 1, min(len(dataset), max_images)).astype(int):
        item = dataset[int(i)]
        rgb = plots.denormalize(item["image"]).reshape(-1, 3).astype(np.float32)
        stats.append({"split": split, "defect_type": item["defect_type"],
                      "brightness": rgb.mean(), "contrast": rgb.mean(1).std(),
                      **{f"mean_{c}": v for c, v in zip("rgb", rgb.mean(0))}})
stats = pd.DataFrame(stats)
stats.groupby(["split", "defect_type"])[["brightness", "contrast", "mean_r", "mean_g", "mean_b"]].mean().round(1)'''),
    ("code", '''\
fig = Figure(figsize=(12, 4), layout="constrained")
ax_b, ax_c = fig.subplots(1, 2)
stats["group"] = stats["split"] + " " + stats["defect_type"]
sns.boxplot(data=stats, y="group", x="brightness", ax=ax_b)
sns.boxplot(data=stats, y="group", x="contrast", ax=ax_c)
ax_b.set(ylabel="", title="mean intensity (0-255)")
ax_c.set(ylabel="", title="intensity standard deviation")
fig'''),
    ("code", '''\
# Mean and per-pixel standard deviation of the training images: a sharp mean means aligned
# objects; bright spots in the std image are where normal images vary (and where a model
# must tolerate change).
train_idx = np.linspace(0, len(ds.train) - 1, min(len(ds.train), max_images)).astype(int)
stack = np.stack([plots.denormalize(ds.train[int(i)]["image"]).astype(np.float32) for i in train_idx])
fig = Figure(figsize=(8, 4), layout="constrained")
ax_m, ax_s = fig.subplots(1, 2)
ax_m.imshow(stack.mean(0).astype(np.uint8))
ax_s.imshow(stack.std(0).mean(-1), cmap="viridis")
ax_m.set_title(f"mean of {len(stack)} training images")
ax_s.set_title("per-pixel standard deviation")
for ax in (ax_m, ax_s):
    ax.axis("off")
fig'''),
]

# --------------------------------------------------------------------------- 02
TRAIN = [
    ("md", '''\
# 02 Train

Trains one model (one category) with `recontrast.tracking.run_training`, the same function as
`recontrast train`: the loss is drawn live, everything is logged to MLflow (`make ui`), and the
run id is written to `<train.out>/mlflow_run_id`, where notebook 03 and `recontrast evaluate`
find it. `recontrast batch` runs this notebook once per (variant, category) of a study.

`overrides` takes dotted config keys, e.g. `["train.iters=100", "model.domain_adaptation=false"]`.'''),
    ("parameters", '''\
config = "experiments/demo.yaml"  # a config or study file, relative to the repository root
category = ""  # empty: the config's data.category
data_root = ""  # empty: the config's data.root
overrides = []  # dotted overrides (see above)
run_name = ""  # MLflow run name; empty: <variant>-<category>
study = ""  # study tag (set by `recontrast batch`)
variant = ""  # ablation name, tracking.ablation (set by `recontrast batch`)
out = ""  # training folder; empty: the config's train.out
parent_run_id = ""  # the study's parent MLflow run (set by `recontrast batch`)
resume = False  # continue from <out>/last.ckpt, in the same MLflow run
evaluate_at_end = True  # False when notebook 03 evaluates (as in batches)
track = True  # log to MLflow'''),
    ("code", SETUP + '''

import time

from IPython.display import Image, display
from matplotlib.figure import Figure

from recontrast import plots, tracking
from recontrast.config import load_config
from recontrast.train import Callback'''),
    ("code", '''\
given = {"data.category": category, "data.root": data_root, "train.out": out,
         "tracking.study": study, "tracking.ablation": variant}
cfg = load_config(config, [*overrides, *(f"{k}={v}" for k, v in given.items() if v)])
print(cfg)'''),
    ("code", '''\
class LiveLoss(Callback):
    """Redraws the loss curve in place, at most every `every_s` seconds."""

    def __init__(self, every_s: float = 5.0):
        self.points, self.every_s, self.last, self.handle = [], every_s, 0.0, None

    def on_log(self, iteration, metrics):
        self.points.append({"iteration": iteration, "loss": metrics["loss_avg"]})
        if time.monotonic() - self.last > self.every_s:
            self.draw()

    def on_end(self, result):
        self.draw()

    def draw(self):
        fig = plots.loss_curve(self.points, title=f"{cfg.data.category}: loss (mean over each log step)")
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        self.last = time.monotonic()


result, evaluation, run_id = tracking.run_training(
    cfg, resume=resume, track=track, evaluate_at_end=evaluate_at_end, callbacks=[LiveLoss()],
    run_name=run_name or None, parent_run_id=parent_run_id or None)
print(f"checkpoint: {result.checkpoint} ({result.iterations} iterations)")
print(f"MLflow run: {run_id} in {tracking.tracking_uri(cfg)}")
for warning in result.warnings:
    print("WARNING:", warning)'''),
    ("code", '''\
plots.loss_curve(result.loss_history, title=f"{cfg.data.category}: training loss per iteration")'''),
    ("code", '''\
if evaluation is not None:
    print(evaluation.table())
    for name in ("roc_pr", "gallery"):
        if name in evaluation.figures:
            display(Image(filename=str(evaluation.figures[name])))'''),
    ("md", '''\
Next: notebook 03 with `run_id` (or `checkpoint`) from the cell below, e.g.
`papermill notebooks/03_evaluate.ipynb out.ipynb -p run_id <id>`.'''),
    ("code", '''\
print(f"run_id = {run_id!r}\\ncheckpoint = {str(result.checkpoint)!r}")'''),
]

# --------------------------------------------------------------------------- 03
EVALUATE = [
    ("md", '''\
# 03 Evaluate

Evaluates a checkpoint on its test split (or another root / category) with
`recontrast.evaluate.main_evaluate`, stores the calibration in the checkpoint, shows the
metrics, ROC/PR curves, score histograms, the worst-ranked heatmaps and the GIF, and logs
them to the MLflow run that trained the checkpoint.

`overrides` changes evaluation settings, e.g. `["eval.sigma=2", "eval.score=topk_mean"]`.'''),
    ("parameters", '''\
run_id = ""  # the MLflow run that trained the checkpoint
checkpoint = ""  # or the checkpoint path; empty: the run's checkpoint
data_root = ""  # empty: the checkpoint's data.root
category = ""  # empty: the checkpoint's category
out = ""  # figures folder; empty: <checkpoint folder>/eval_<category>
overrides = []  # eval settings to change (see above)
track = True  # log to MLflow'''),
    ("code", SETUP + '''

import pandas as pd
import seaborn as sns
from IPython.display import Image, display
from matplotlib.figure import Figure

from recontrast import tracking
from recontrast.evaluate import main_evaluate

if not checkpoint and not run_id:
    raise ValueError("give run_id or checkpoint (notebook 02 prints both)")
checkpoint = Path(checkpoint) if checkpoint else tracking.checkpoint_of(run_id)
print("checkpoint:", checkpoint)'''),
    ("code", '''\
result = main_evaluate(checkpoint, data_root=data_root or None, category=category or None,
                       out=out or None, overrides=overrides, track=False)
if track:
    run_id = tracking.log_evaluation(result, checkpoint, run_id=run_id or None, log_checkpoint=True)
    print("logged to MLflow run", run_id)'''),
    ("code", '''\
metrics = pd.Series(result.metrics, name="value").to_frame()
metrics["%"] = (100 * metrics["value"]).round(2)
metrics'''),
    ("code", '''\
per_defect = metrics.loc[[k for k in metrics.index if k.startswith("image_auroc_")], "value"]
if len(per_defect):
    fig = Figure(figsize=(6, 0.5 + 0.4 * len(per_defect)), layout="constrained")
    ax = fig.subplots()
    sns.barplot(x=per_defect.values, y=[k.removeprefix("image_auroc_") for k in per_defect.index], ax=ax)
    ax.axvline(0.5, ls="--", c="gray")
    ax.set(xlim=(0, 1), xlabel="image AUROC", title="per defect type (vs all good images)")
    display(fig)'''),
    ("code", '''\
for name in ("roc_pr", "histogram", "gallery"):
    if name in result.figures:
        display(Image(filename=str(result.figures[name])))'''),
    ("code", '''\
records = pd.DataFrame(result.records)
print("highest-scoring good and lowest-scoring defect images:")
pd.concat([records[records.label == 0].nlargest(5, "score"), records[records.label == 1].nsmallest(5, "score")])'''),
    ("code", '''\
if "gif" in result.figures:
    display(Image(filename=str(result.figures["gif"])))'''),
]

# --------------------------------------------------------------------------- 04
ABLATIONS = [
    ("md", '''\
# 04 Ablations

Compares the runs of one study (`recontrast batch`) from MLflow: every metric per variant and
category, deltas against the full method, and the domain adaptation x stop-gradient grid (other
switches that vary in the study are listed too). Tables and figures are saved and logged to
the study's parent run.

A sanity check: without domain adaptation the targets come from the frozen encoder, which gets
no gradient anyway, so `no_da` and `no_da_no_sg` must give the same numbers.'''),
    ("parameters", '''\
study = "demo"  # the study name (tags.study)
experiment = ""  # MLflow experiment; empty: search them all
baseline = "full"  # the variant the deltas are taken against
metrics = ["image_auroc", "pixel_auroc", "aupro"]
out = ""  # empty: experiments/runs/<study>/comparison
log_to_mlflow = True'''),
    ("code", SETUP + '''

import pandas as pd
import seaborn as sns
from IPython.display import display
from matplotlib.figure import Figure

from recontrast import batch

sns.set_theme(style="whitegrid")
out_dir = Path(out or f"experiments/runs/{study}/comparison")
out_dir.mkdir(parents=True, exist_ok=True)
saved = []'''),
    ("code", '''\
runs = batch.study_results(study, experiment or None)
if runs.empty:
    raise ValueError(f"no MLflow runs tagged study={study!r}; run `recontrast batch` first")
switches = batch.varying_switches(runs)
metrics = [m for m in metrics if m in runs]
print(f"{len(runs)} runs; switches that vary: {', '.join(switches) or 'none'}")
failed = runs[runs.status != "FINISHED"]
if len(failed):
    print("not finished (left out of the tables):")
    display(failed[["variant", "category", "status", "run_id"]])
runs[["variant", "category", "status", *switches, *metrics]]'''),
    ("code", '''\
tables = {m: batch.ablation_table(runs, m, baseline) for m in metrics}
for m, table in tables.items():
    print(m)
    display(table.round(4))
    table.to_csv(out_dir / f"{m}.csv")
    saved.append(out_dir / f"{m}.csv")'''),
    ("code", '''\
finished = runs[runs.status == "FINISHED"]
n_cat, n_var = finished.category.nunique(), finished.variant.nunique()
fig = Figure(figsize=(3 + 1.6 * n_cat, (1 + 0.45 * n_var) * len(metrics)), layout="constrained")
axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
for ax, m in zip(axes, metrics):
    grid = tables[m].drop(columns=["delta"])
    sns.heatmap(grid, annot=True, fmt=".3f", cmap="viridis", ax=ax, cbar=False)
    ax.set(title=m, xlabel="", ylabel="")
fig.savefig(out_dir / "metrics_heatmap.png", dpi=100)
saved.append(out_dir / "metrics_heatmap.png")
fig'''),
    ("code", '''\
deltas = batch.ablation_deltas(runs, metrics, baseline)
deltas = deltas[deltas.variant != baseline]
fig = Figure(figsize=(4.5 * len(metrics), 4), layout="constrained")
axes = fig.subplots(1, len(metrics), squeeze=False)[0]
for ax, m in zip(axes, metrics):
    sns.barplot(data=deltas[deltas.metric == m], x="delta", y="variant", hue="category", ax=ax)
    ax.axvline(0, c="black", lw=1)
    ax.set(title=f"{m}: variant - {baseline}", xlabel="delta", ylabel="")
fig.savefig(out_dir / "deltas.png", dpi=100)
saved.append(out_dir / "deltas.png")
fig'''),
    ("code", '''\
# Domain adaptation x stop-gradient: the mean over categories in a 2 x 2 grid per metric.
da, sg = "model.domain_adaptation", "loss.stop_grad"
if {da, sg} <= set(switches):
    fig = Figure(figsize=(4 * len(metrics), 3.5), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        grid = finished.pivot_table(index=da, columns=sg, values=m, aggfunc="mean")
        sns.heatmap(grid, annot=True, fmt=".3f", cmap="viridis", cbar=False, ax=ax)
        ax.set(title=m, ylabel="domain adaptation", xlabel="stop-gradient")
    fig.savefig(out_dir / "da_x_sg.png", dpi=100)
    saved.append(out_dir / "da_x_sg.png")
    display(fig)
else:
    print("domain adaptation and stop-gradient do not both vary in this study")'''),
    ("code", '''\
if log_to_mlflow:
    run_id = batch.log_comparison(study, saved, experiment or None)
    print(f"logged {len(saved)} files to MLflow run {run_id}")'''),
]

NOTEBOOKS = {
    "01_data_exploration.ipynb": DATA_EXPLORATION,
    "02_train.ipynb": TRAIN,
    "03_evaluate.ipynb": EVALUATE,
    "04_ablations.ipynb": ABLATIONS,
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """Returns the notebook: markdown and code cells, the `parameters` cell tagged."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    }
    stem = name.split("_")[0]
    for i, (kind, source) in enumerate(cells):
        if kind == "md":
            cell = nbformat.v4.new_markdown_cell(source)
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
        cell.id = f"nb{stem}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
