"""Studies: a config plus variants, expanded into one job per (variant, category).

A study file is a config (experiments/*.yaml) plus a `study:` block:

    study:
      name: ablation_da_sg
      categories: [weave, disc]          # what `--categories all` means
      variants:                          # name -> dotted overrides (a mapping or "k=v" strings)
        full: {}
        no_da: {model.domain_adaptation: false}

Each pair gets a folder experiments/runs/<study>/<variant>/<category>/; `recontrast.batch`
executes the jobs, `recontrast.study_results` reads their runs back.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from recontrast.config import NON_RESULT_KEYS, PLACEMENT_KEYS, Config, ConfigError, load_config, show
from recontrast.mlflow_store import tracking_uri
from recontrast.runtime import project_root

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "image_f1max", "pixel_f1max")


class PairStatus:
    """What study_status finds for a pair (RUN, RESUME, DONE), and what a batch did with it
    (batch.PairResult.status: DONE, SKIPPED, FAILED)."""

    RUN, RESUME, DONE, SKIPPED, FAILED = "run", "resume", "done", "skipped", "failed"


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
    settings: dict[str, Any] = field(default_factory=dict)  # result_config: what a rerun compares
    replaces: str = ""  # the run of this pair's earlier result, when a rerun replaces it
    replace_reason: str = ""


# A study or variant name becomes a folder (experiments/runs/<study>/<variant>) and a value in
# MLflow filter strings: letters, digits, '_', '-' and '.', starting with a letter or digit.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_name(name: str, what: str) -> str:
    """Returns `name` when it is a valid study or variant name; raises ConfigError naming the
    allowed characters otherwise."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{what} {show(name)} is not a valid name: use letters, digits, '_', '-' and '.' "
                          f"(at most 100, starting with a letter or digit), e.g. obrien_v2")
    return name


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
        raise ConfigError(f"{path}: study.variants must map a name to overrides, got {show(variants)}")
    for variant in variants:
        check_name(str(variant), f"{path}: study.variants:")
    return Study(name=check_name(str(block.get("name") or path.stem), f"{path}: study.name"), path=path.resolve(),
                 categories=[str(c) for c in block.get("categories") or []],
                 variants={str(k): _as_overrides(v, f"{path}: study.variants.{k}") for k, v in variants.items()})


def switches(study: Study) -> list[str]:
    """Returns the config keys the study's variants set, in the study file's order: the
    switches its ablation compares (the parent run's tag `switches`, study_results' columns)."""
    return list(dict.fromkeys(o.split("=", 1)[0].strip() for overrides in study.variants.values() for o in overrides))


def _as_overrides(value: Any, where: str) -> list[str]:
    """Returns ["key=value", ...] from a {dotted key: value} mapping or a list of strings."""
    if not value:
        return []
    if isinstance(value, dict):
        return [f"{k}={v if isinstance(v, str) else _yaml_scalar(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise ConfigError(f"{where}: expected {{dotted.key: value}} or ['key=value', ...], got {show(value)}")


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


def result_config(cfg: Config) -> dict[str, Any]:
    """Returns the flattened config less the keys that cannot change a result: where it runs
    (PLACEMENT_KEYS) and what is logged (NON_RESULT_KEYS). What the fingerprint hashes."""
    return {k: v for k, v in cfg.flatten().items() if k not in PLACEMENT_KEYS and k not in NON_RESULT_KEYS}


def fingerprint(cfg: Config) -> str:
    """Returns a short hash of what decides a result (result_config)."""
    return hashlib.sha1(json.dumps(result_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _differing(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Returns both result_configs json round-tripped, `before` completed with today's defaults,
    and the keys whose values differ. A key `before` lacks is newer than the run that recorded
    it, and that run had the key's default behaviour (every new switch defaults to what the code
    did before it), so a new key at its default changes nothing."""
    defaults = json.loads(json.dumps(result_config(Config()), default=str))
    before = {**defaults, **before}
    after = json.loads(json.dumps(after, default=str))
    return before, after, sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def same_settings(before: dict[str, Any] | None, after: dict[str, Any]) -> bool:
    """Returns True when a recorded result_config (done.json, started.json) decides the same
    result as `after`: equal once the keys it lacks take their defaults."""
    return bool(before) and not _differing(before, after)[2]


def recorded_as(record: dict[str, Any], job: Job) -> bool:
    """Returns whether a pair's record (done.json, started.json) was written for the settings
    `job` has: the same fingerprint, or recorded settings that are the same once keys added
    since take their defaults (same_settings)."""
    return record.get("fingerprint") == job.fingerprint or same_settings(record.get("settings"), job.settings)


def changed_keys(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    """Returns 'key: old -> new, ...' between two result_configs (json round-tripped), or a
    note when the earlier one was not recorded."""
    if not before:
        return "the settings it finished with were not recorded"
    before, after, keys = _differing(before, after)
    return ", ".join(f"{k}: {show(before.get(k), 30)} -> {show(after.get(k), 30)}" for k in keys) or "none"


def plan(study: Study, categories: Sequence[str] | None = None, variants: Sequence[str] | None = None,
         overrides: Sequence[str] | None = None, runs_dir: str | Path | None = None) -> list[Job]:
    """Returns the jobs of a study, each config validated before anything runs."""
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
                            tracking_uri(cfg), cfg.tracking.enabled,
                            settings=json.loads(json.dumps(result_config(cfg), default=str))))
    return jobs


def _given(study: str, variant: str, category: str, folder: Path) -> list[str]:
    """Returns the overrides notebook 02 derives from its category/out/study/variant parameters."""
    return [f"data.category={category}", f"train.out={folder / 'train'}",
            f"tracking.study={study}", f"tracking.ablation={variant}"]


def study_status(job: Job, force: bool) -> str:
    """Returns PairStatus.DONE (a matching done.json), RESUME (a checkpoint of the same config) or RUN."""
    folder = Path(job.folder)
    if force:
        return PairStatus.RUN
    try:
        done = json.loads((folder / "done.json").read_text())
        if recorded_as(done, job):
            return PairStatus.DONE
    except (OSError, ValueError):
        pass
    try:
        started = json.loads((folder / "started.json").read_text())
        if recorded_as(started, job) and (folder / "train" / "last.ckpt").is_file():
            return PairStatus.RESUME
    except (OSError, ValueError):
        pass
    return PairStatus.RUN
