"""benchmarks/run.py: its report says which targets a run meets (no training here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
