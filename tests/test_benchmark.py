"""benchmarks/run.py: its report says which targets a run meets (no training here)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from recontrast.defects import KINDS

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accuracy(pixel_auroc: float, fit_s: float) -> dict:
    metrics = {"image_auroc": 1.0, "pixel_auroc": pixel_auroc, "aupro": 0.975, "pixel_f1max": 0.83}
    return {**metrics, "level_weights": [1.0, 1.0, 0.0], "paper_map": dict(metrics), "fit_s": fit_s,
            "time_to_first_result_s": fit_s + 10}


def test_report_marks_each_target_met_or_not():
    bench = _bench()
    good = bench.markdown({"host": "cpu", "accuracy": {"full": _accuracy(0.9926, 600.0)}})
    assert "pixel_auroc met" in good and "fit within 15 min met" in good and "NOT met" not in good
    assert "| full | levels [1.0, 1.0, 0.0] | 100.00 | 99.26 | 97.50 | 83.00 | 600 | 610 |" in good
    short = bench.markdown({"host": "cpu", "accuracy": {"full": _accuracy(0.9910, 901.0)}})
    assert "pixel_auroc NOT met" in short and "fit within 15 min NOT met" in short
    assert "aupro met" in short


def _row(category: str, method: str, fit_s: float = 100.0, **metrics) -> dict:
    base = {k: 0.9 for k in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
                              "pixel_f1max", "aupro")}
    return {"category": category, "method": method, "metrics": {**base, **metrics}, "fit_seconds": fit_s,
            "health": "ok"}


def test_category_verdicts_compare_with_the_best_peer_on_every_shared_metric():
    categories = _bench().categories
    rows = [_row("screw", "recontrast", pixel_auroc=float("nan"), aupro=float("nan")),
            _row("screw", "padim", image_auroc=0.95, pixel_auroc=float("nan"), aupro=float("nan")),
            _row("screw", "patchcore", image_auroc=0.85),
            _row("weave", "recontrast", fit_s=1000.0, image_auroc=0.99),
            _row("weave", "padim", image_auroc=0.97),
            _row("disc", "recontrast"),
            {**_row("bar", "recontrast", fit_s=800.0), "cpu_seconds": 1300.0},  # two trainings: 21.7 CPU min
            {**_row("board", "recontrast", fit_s=400.0), "cpu_seconds": 600.0}]
    screw, weave, disc, bar, board = categories.verdicts(rows)
    assert "NOT met (image_auroc 90.00 < 95.00)" in screw  # pixel metrics n/a: not compared
    assert "vs best peer MET" in weave and "fit 1000 s NOT met" in weave  # no CPU time: the fit's wall time
    assert "21.7 CPU min (training + evaluation, limit 15) NOT met; fit 800 s" in bar  # within 15 wall minutes
    assert "10.0 CPU min (training + evaluation, limit 15) MET" in board
    assert "vs best peer not measured (no peer in this run)" in disc  # no peer: no verdict either way
    assert "| screw | recontrast | 90.00 | 90.00 | 90.00 | n/a |" in categories.table(rows)


def test_rank_correlation_is_spearman_over_the_checkpoints():
    categories = _bench().categories
    points = [{"proxy/image_auroc": p, "image_auroc": r, "proxy/pixel_auroc": p, "pixel_auroc": -r,
               "proxy/aupro": p, "aupro": float("nan"), "proxy/score": p}
              for p, r in [(0.1, 0.5), (0.2, 0.7), (0.3, 0.6), (0.4, 0.9)]]
    rho = categories.rank_correlation(points)
    assert rho["n_checkpoints"] == 4
    assert rho["proxy/image_auroc ~ image_auroc"] == rho["proxy/score ~ image_auroc"] == pytest.approx(0.8)
    assert rho["proxy/pixel_auroc ~ pixel_auroc"] == pytest.approx(-0.8)
    assert rho["proxy/aupro ~ aupro"] != rho["proxy/aupro ~ aupro"]  # no finite pairs: NaN


def _script(name: str):
    path = RUN.with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_prints_its_table(tmp_path, capsys):
    """The device check runs end to end on the CPU (tiny backbone, 2 iterations) so it cannot rot."""
    results = _script("gpu_check").main(["--dry-run", "--settings", "fp32,bf16,fp16", "--out", str(tmp_path)])
    rows = results["rows"]
    assert rows["fp32"]["step_s"] > 0 and rows["bf16"]["step_s"] > 0
    assert "needs CUDA" in rows["fp16"]["error"]  # a setting that cannot run here is reported, not fatal
    assert results["run"]["setting"] in ("fp32", "bf16") and "image_auroc" in results["run"]["metrics"]
    printed = capsys.readouterr().out
    assert "| fp16 | failed: ConfigError" in printed and "verdict: no paper figure" in printed
    assert (tmp_path / "gpu_check.json").is_file()


def test_compute_study_points_put_map_variants_at_their_models_cost():
    study = _script("compute_study")
    row = {"category": "bar", "method": "recontrast", "setting": "default", "cpu_seconds": 600.0,
           "metrics": {"pixel_auroc": 0.9}, "maps": {"levels110": {"pixel_auroc": 0.95, "eval_cpu_seconds": 30.0}}}
    peer = {"category": "bar", "method": "padim", "setting": "padim", "cpu_seconds": 60.0, "metrics": {"pixel_auroc": 0.97}}
    found = study.points([row, peer], "bar")
    assert [(label, minutes) for label, minutes, _ in found] == [("default", 10.0), ("default+levels110", 10.0),
                                                                  ("padim", 1.0)]
    assert "| bar | default+levels110 | 10.0 | n/a | 95.00 |" in study.markdown([row, peer])


def test_correlation_figure_draws_what_the_correlation_found_and_redraws_from_a_results_file(tmp_path):
    """compute_study.correlation over rows of two categories (one model flagged, one map variant
    without a metric): rho as scipy computes it, and a figure drawn from it, again from a saved
    run.py results.json by --correlation-figure."""
    import subprocess
    import sys

    from scipy.stats import spearmanr

    study = _script("compute_study")
    rows = [{"category": c, "setting": "recipe", "health": h,
             "metrics": {"aupro": a, "image_auroc": i},
             "maps": {"sigma2": {"aupro": a - 0.05, "image_auroc": float("nan")}},
             "proxy": {"recipe": {"proxy/score": p}, "sigma2": {"proxy/score": p - 0.01}}}
            for c, h, a, i, p in (("bar", "not_converged", 0.6, 0.7, 0.95), ("disc", "ok", 0.99, 1.0, 0.99),
                                  ("weave", "ok", 0.9, 0.95, 0.97))]
    found = study.correlation(rows)
    proxies = [0.95, 0.94, 0.99, 0.98, 0.97, 0.96]
    assert found["proxy/score ~ aupro"] == pytest.approx(spearmanr(proxies, [0.6, 0.55, 0.99, 0.94, 0.9, 0.85]).statistic)
    assert found["n ~ aupro"] == 6 and found["n ~ image_auroc"] == 3  # a NaN metric is no point
    path = study.correlation_figure(found, tmp_path / "a" / "correlation.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"correlation": {"across": found}}))
    done = subprocess.run([sys.executable, str(RUN.with_name("compute_study.py")), "--out", str(tmp_path / "b"),
                           "--correlation-figure", str(results)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b" / "correlation.png").stat().st_size > 10_000


def test_throughput_rows_count_the_recipes_proxy_evaluations_and_compare_with_the_issues_recipe():
    bench = _bench()
    assert bench.THROUGHPUT["issue"] == (["model.freeze_stem=false", "train.depthwise_fp32=false", "model.bottleneck_pool=1",
                                          "model.encoder_bn=eval", "train.precision=fp32", "train.cache_features=false"],
                                         None, 40)
    # 10 timed iterations of 3 CPU-s, a 6 CPU-s proxy evaluation every 70 of 280 iterations: 4 of them.
    row = {"iters": 10, "cpu_s": 30.0, "proxy_eval_cpu_s": 6.0}
    assert bench.recipe_rate(row, 70) == pytest.approx(60 * 280 / (280 * 3 + 4 * 6))
    assert bench.recipe_rate(row, 0) == pytest.approx(60 * 280 / (280 * 3 + 6))  # evaluated once, at the end
    rows = {name: {**row, "precision": "fp32", "cache_features": False, "omp_wait_policy": "PASSIVE",
                   "it_per_cpu_min": 20.0, "recipe_it_per_cpu_min": rate, "speedup_vs_issue": rate / 10,
                   "it_per_wall_min": 40.0, "final_loss": 1.5, "load_before": 0.5, "load_after": 1.0}
            for name, rate in (("issue", 10.0), ("recipe", 18.0))}
    table = bench.throughput_table(rows).splitlines()
    assert len(table) == 4 and table[3].startswith("| recipe | fp32 | False | PASSIVE | 20.0 | 18.0 | 1.80x |")

    # Three interleaved rounds: each round's ratio is to that round's issue row; the median round is shown.
    measured = {"issue": [{"recipe_it_per_cpu_min": r, "round": i} for i, r in enumerate((10.0, 12.0, 10.0))],
                "recipe": [{"recipe_it_per_cpu_min": r, "round": i} for i, r in enumerate((19.0, 18.0, 16.0))]}
    found = bench.median_rows(measured)
    assert found["recipe"]["speedups"] == pytest.approx([1.9, 1.5, 1.6])
    assert found["recipe"]["round"] == 2 and found["recipe"]["speedup_vs_issue"] == pytest.approx(1.6)
    assert found["issue"]["speedup_vs_issue"] == 1.0
    assert bench._ratio(found["recipe"]) == "1.60x (1.50-1.90)"



def test_map_study_scores_the_models_own_map_as_its_evaluation_did(tiny_model, tmp_path):
    """benchmarks/map_study.py scores map settings from one network pass: its 'paper' row (the
    tiny model's own map) must be what `recontrast evaluate` measured, and a changed map must
    change the numbers."""
    import shutil

    spec = importlib.util.spec_from_file_location("map_study", RUN.with_name("map_study.py"))
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    folder = tmp_path / "disc"
    folder.mkdir()
    shutil.copy(tiny_model.checkpoint, folder / "last.ckpt")
    found = study.study_category(folder, threads=1)
    evaluated = tiny_model.evaluation.metrics
    assert found["rows"]["paper"] == pytest.approx({k: 100 * evaluated[k] for k in study.METRICS})
    assert found["rows"]["levels_001"] != found["rows"]["paper"]
    product = found["rows"]["score_product"]  # eval.score_combine: the image score alone changes
    assert product["aupro"] == found["rows"]["paper"]["aupro"]
    assert product["image_auroc"] == pytest.approx(found["rows"]["product"]["image_auroc"])
    assert "| paper |" in study.tables({"disc": found})
    assert "last_weights" not in found["rows"]  # no train.ema: nothing else to score

    # A train.ema checkpoint: its last weights (live_model) are scored beside the average.
    from recontrast.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(folder / "last.ckpt")
    save_checkpoint(folder / "last.ckpt", {**ckpt, "live_model": ckpt["model"]})
    same = study.study_category(folder, threads=1)["rows"]
    assert same["last_weights"] == same["paper"] and same["last_weights_score_product"] == same["score_product"]
    moved = {k: (v * 1.5 if k.startswith("decoder.") and v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    save_checkpoint(folder / "last.ckpt", {**ckpt, "live_model": moved})
    other = study.study_category(folder, threads=1)
    assert other["rows"]["paper"] == same["paper"] and other["rows"]["last_weights"] != same["paper"]
    assert "| last_weights_score_product |" in study.tables({"disc": other})


@pytest.mark.slow
def test_correlation_across_categories_ranks_every_kept_and_superseded_model(tiny_model, tmp_path, monkeypatch):
    """benchmarks/run.py's correlation section: each categories row gives its kept model and,
    where bn_fallback trained twice, the one it did not keep (<out>/attempt1 or attempt2), which it evaluates
    itself; every model is scored under every map, and the report says whether rho meets 0.7."""
    import argparse
    import shutil

    from conftest import one_thread

    bench = _bench()
    monkeypatch.setattr(bench, "in_subprocess", lambda fn, *args: fn(*args))  # no spawned process in a test
    kept = tmp_path / "disc" / "last.ckpt"
    (kept.parent / "attempt1").mkdir(parents=True)
    shutil.copy(tiny_model.checkpoint, kept)
    shutil.copy(tiny_model.checkpoint, kept.parent / "attempt1" / "last.ckpt")
    row = {"category": "disc", "method": "recontrast", "checkpoint": str(kept), "attempts": 2, "health": "ok",
           "metrics": tiny_model.evaluation.metrics}
    peer = {"category": "disc", "method": "padim", "metrics": {"image_auroc": 1.0}}
    assert [m["setting"] for m in bench.trained_models([row, peer])] == ["recipe", "attempt1"]
    assert [m["setting"] for m in bench.trained_models([{**row, "attempts": 1}])] == ["recipe"]
    (kept.parent / "attempt1").rename(kept.parent / "attempt2")  # the first kept, the second not
    assert [m["setting"] for m in bench.trained_models([row])] == ["recipe", "attempt2"]
    (kept.parent / "attempt2").rename(kept.parent / "attempt1")

    args = argparse.Namespace(threads=1, resume=False)
    with one_thread():
        across = bench.across_categories(args, tmp_path, {"categories": {"rows": [row, peer]}})
    study = _script("compute_study")
    assert across["n_models"] == 2 and across["n"] == 2 * len(study.MAPS)
    first = [p for p in across["points"] if p["setting"] == "attempt1" and p["map"] == "recipe"][0]
    # The same weights as the kept model: the first training's own evaluation gives the same numbers.
    assert first["aupro"] == pytest.approx(tiny_model.evaluation.metrics["aupro"])
    assert first["health"] == "not_converged"
    saved = {(m["category"], m["setting"]) for m in json.loads((tmp_path / "correlation_models.json").read_text())}
    assert saved == {("disc", "recipe"), ("disc", "attempt1")}
    report = "\n".join(bench.across_markdown(across))
    assert "| disc | attempt1 | not_converged |" in report
    assert "proxy/score ~ aupro" in report and ("(met)" in report or "(NOT met)" in report)


def test_proxy_steadiness_scores_each_draw_and_says_which_training_each_would_keep(tiny_model):
    """benchmarks/proxy_steadiness.py: one proxy/score per (copies, seed), a larger proxy set
    costing more; rho per draw across models, and per category trained twice, each draw's choice."""
    study = _script("proxy_steadiness")
    row = {"checkpoint": str(tiny_model.checkpoint)}
    scores = study.score_model(row, [(1, 0), (3, 0), (1, 5)])
    assert set(scores) == {"c1s0", "c3s0", "c1s5"} and all(0 <= v["score"] <= 1 for v in scores.values())
    assert scores["c1s0"]["score"] != scores["c1s5"]["score"]  # another draw, other defects
    assert set(scores["c3s0"]["kinds"]) == set(KINDS)  # three copies of each held-out image: every kind
    assert study.kind_means({"proxy": {"c3s0": scores["c3s0"]}}, 3) == scores["c3s0"]["kinds"]

    def model(category, setting, aupro, iauroc, a, b):
        return {"category": category, "setting": setting, "metrics": {"aupro": aupro, "image_auroc": iauroc},
                "proxy": {"c1s0": {"score": a}, "c4s0": {"score": b}}}

    models = [model("mesh", "recipe", 0.87, 0.57, 0.99, 0.97), model("mesh", "attempt1", 0.95, 0.92, 0.98, 0.98),
              model("bottle", "recipe", 0.97, 1.0, 0.995, 0.995)]
    found = study.rankings(models, [(1, 0), (4, 0)])
    assert found["pairs"] == {"mesh": {"better_on_test": "attempt1", "choice": {"c1s0": "recipe", "c4s0": "attempt1"}}}
    assert found["rho"]["c4s0"]["aupro"] == pytest.approx(1.0) and found["rho"]["c1s0"]["aupro"] == pytest.approx(0.5)


def test_a_categories_row_says_its_cpu_time_and_the_load_around_it(synthetic_root, tmp_path):
    """benchmarks/categories.py: a ReContrast row carries what shows whether the machine was quiet."""
    from conftest import one_thread

    categories = _script("categories")
    tiny = ["data.image_size=64", "data.val_fraction=0.25", "model.backbone=resnet18", "model.pretrained=none",
            "train.iters=2", "train.batch_size=4", "train.bn_fallback=false", "train.pool_fallback=false",
            "train.eval_every=0",
            "tracking.enabled=false", "eval.figures=false", "eval.gif=false"]
    with one_thread():
        row = categories.recontrast_row("experiments/cpu_default.yaml", synthetic_root, "disc", tmp_path, 1, tiny)
    assert row["cpu_seconds"] > 0 and row["attempts"] == row["attempt"] == 1
    # the recipe's coarse code where the training images' position spread lets it through, as kept
    assert 0 <= row["position_spread"] <= 1 and not row["coarse_attempt"]
    assert row["bottleneck_pool"] == (2 if row["position_spread"] <= 0.5 else 1)
    assert row["load_before"] >= 0 and row["load_after"] >= 0


def test_the_spread_script_says_which_code_the_recipe_chooses_per_category(synthetic_root):
    """benchmarks/spread.py: cpu_default.yaml's offline Lite0 on tiny synthetic data; a fixed
    layout (disc) keeps the coarse code, a texture (grain) gets the paper's."""
    from conftest import one_thread

    spread = _script("spread")
    with one_thread():
        disc, grain = (spread.spread_row("experiments/cpu_default.yaml", synthetic_root, c, 64, ["data.val_fraction=0"])
                       for c in ("disc", "grain"))
    assert disc["position_spread"] < disc["limit"] == 0.5 < grain["position_spread"]
    assert (disc["bottleneck_pool"], grain["bottleneck_pool"]) == (2, 1)
    assert disc["images"] == 12 and disc["cpu_seconds"] > 0
    with one_thread():  # the same disc images in any pose (turned up to +-180 degrees, shifted up to +-20 %)
        moved = spread.spread_row("experiments/cpu_default.yaml", synthetic_root, "disc", 64, ["data.val_fraction=0"],
                                  jitter=(180.0, 0.2))
    assert moved["position_spread"] > disc["position_spread"] + 0.1


def test_the_pose_study_moves_each_image_and_its_mask_together(synthetic_root, tmp_path):
    """benchmarks/pose_study.py: no pose copies the category's pixels; a pose moves image and mask alike."""
    import numpy as np
    from PIL import Image

    pose_study = _script("pose_study")
    src = synthetic_root / "board"
    still = pose_study.write_posed(src, tmp_path / "still", 0, 0)
    turned = pose_study.write_posed(src, tmp_path / "turned", 90, 0)  # +-90 degrees: some turn a lot
    files = sorted(p.relative_to(src) for p in src.rglob("*.png"))
    assert files == sorted(p.relative_to(still) for p in still.rglob("*.png"))
    read = lambda root, f: np.array(Image.open(root / f))  # noqa: E731
    assert all((read(src, f) == read(still, f)).all() for f in files)
    masks = [f for f in files if f.parts[0] == "ground_truth"]
    assert masks and all(set(np.unique(read(turned, f))) <= {0, 255} for f in masks)
    assert sum((read(src, f) != read(turned, f)).any() for f in masks) >= len(masks) // 2
    assert any((read(src, f) != read(turned, f)).any() for f in files if f.parts[:2] == ("train", "good"))

    # a mask follows its own image: a white square on black, its mask the square
    square = np.zeros((48, 48, 3), np.uint8)
    square[8:20, 26:40] = 255
    for folder, name, pixels in (("train/good", "000.png", square), ("test/dent", "000.png", square),
                                 ("ground_truth/dent", "000_mask.png", square[..., 0])):
        (tmp_path / "toy" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "toy" / folder / name)
    for seed in range(3):
        posed = pose_study.write_posed(tmp_path / "toy", tmp_path / f"toy{seed}", 60, 0.1, seed=seed)
        image = read(posed, "test/dent/000.png")[..., 0].astype(float)
        mask = read(posed, "ground_truth/dent/000_mask.png") > 0
        assert image[mask].mean() > 200 and image[~mask].mean() < 30
