"""The study's comparison as the batch prints and writes it: the delta table in percentage
points, its figure and files, and the MLflow UI link in the machine-learning view."""
from __future__ import annotations

import urllib.parse

import pandas as pd
import pytest

from recontrast.study_results import delta_table, ui_link, write_delta_table


def runs() -> pd.DataFrame:
    """Three variants on two categories; 'no_sg' lacks a finished run on 'disc'."""
    rows = [("full", "weave", 0.90, 0.80), ("full", "disc", 0.70, 0.60),
            ("no_da", "weave", 0.95, 0.70), ("no_da", "disc", 0.60, 0.65),
            ("no_sg", "weave", 0.91, 0.81), ("no_sg", "disc", 0.10, 0.10)]
    frame = pd.DataFrame(rows, columns=["variant", "category", "image_auroc", "aupro"])
    frame["status"] = ["FINISHED"] * 5 + ["FAILED"]
    return frame


def test_the_delta_table_is_the_mean_over_categories_in_points_without_the_baseline():
    table = delta_table(runs(), "full", ["image_auroc", "aupro", "pixel_auroc"])
    assert list(table.index) == ["no_da", "no_sg"] and list(table.columns) == ["image_auroc", "aupro"]
    # no_da: weave +5, disc -10 -> -2.5; aupro: -10, +5 -> -2.5. no_sg: only weave (disc failed).
    assert table.loc["no_da"].tolist() == pytest.approx([-2.5, -2.5])
    assert table.loc["no_sg"].tolist() == pytest.approx([1.0, 1.0])
    assert delta_table(runs(), "missing").empty


def test_the_delta_table_is_written_as_csv_and_png(tmp_path):
    table = delta_table(runs(), "full", ["image_auroc", "aupro"])
    csv, png = write_delta_table(table, tmp_path / "study")
    assert pd.read_csv(csv, index_col=0).loc["no_da", "aupro"] == pytest.approx(-2.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("uri, base", [(None, "http://127.0.0.1:5000"), ("sqlite:///x.db", "http://127.0.0.1:5000"),
                                       ("http://mlflow.lab:8080/", "http://mlflow.lab:8080")])
def test_the_ui_link_opens_the_experiments_runs_in_the_machine_learning_view(uri, base):
    link = ui_link("7", "tags.study = 'demo'", uri)
    page, _, query = link.partition("?")
    assert page == f"{base}/#/experiments/7/runs"
    assert urllib.parse.parse_qs(query) == {"searchFilter": ["tags.study = 'demo'"],
                                            "workflowType": ["machine_learning"]}
