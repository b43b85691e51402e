"""Report files: present, JSON round-trips without NaN, PNG valid and of a sensible size."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from ltdist.eval.metrics import group_map, map_from_logits
from ltdist.eval.report import (
    CURVE_DPI,
    CURVE_PANEL_INCHES,
    format_f1_summary,
    format_report,
    format_summary,
    plot_curves,
    write_report,
)
from ltdist.eval.thresholds import best_f1_thresholds, f1_report
from ltdist.labels import LabelSpace

pytest.importorskip("matplotlib")


@pytest.fixture
def evaluated():
    rng = np.random.default_rng(0)
    freq = np.array([900, 400, 120, 80, 45, 21, 15, 8, 3, 1])
    ls = LabelSpace([f"class {i}" for i in range(10)], freq, np.diag(freq))
    targets = rng.random((300, 10)) < np.linspace(0.4, 0.05, 10)
    targets[:, 9] = False  # a tail class without test positives
    scores = rng.random((300, 10)) + 0.6 * targets * np.linspace(1, 0.2, 10)
    return group_map(scores, targets, ls), ls


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_report_files(tmp_path, evaluated):
    result, ls = evaluated
    paths = write_report(result, ls, tmp_path / "eval", title="demo run")
    assert set(paths) == {"metrics", "report", "plot"}
    for p in paths.values():
        assert Path(p).parent == tmp_path / "eval" and Path(p).stat().st_size > 0

    text = Path(paths["metrics"]).read_text()
    assert "NaN" not in text
    metrics = json.loads(text)
    assert metrics["title"] == "demo run"
    assert metrics["map"]["all"] == pytest.approx(result.map_all, abs=1e-15)
    assert metrics["map"]["tail"] == pytest.approx(result.map_tail, abs=1e-15)
    assert metrics["excluded"] == ["class 9"]
    rows = metrics["classes"]
    assert [r["name"] for r in rows] == ls.names
    assert [r["frequency"] for r in rows] == ls.frequency.tolist()
    assert [r["group"] for r in rows] == ls.groups
    assert rows[9]["ap"] is None and rows[9]["excluded"] is True
    np.testing.assert_allclose([r["ap"] for r in rows[:9]], result.ap[:9], rtol=0, atol=1e-15)

    width, height = _png_size(Path(paths["plot"]).read_bytes())
    assert 400 <= width <= 3000 and 300 <= height <= 2000

    report = Path(paths["report"]).read_text()
    assert report.startswith("demo run\n")
    assert "class 9" in report and "excl." in report
    assert f"{100 * result.map_head:.2f}" in report


@pytest.mark.parametrize(("scoring", "selection"), [("softmax", "test"), ("sigmoid", "last")])
def test_the_report_names_its_scoring_and_checkpoint_selection(tmp_path, scoring, selection):
    rng = np.random.default_rng(2)
    ls = LabelSpace([f"c{i}" for i in range(4)], np.array([300, 50, 9, 2]), np.eye(4))
    targets = rng.random((40, 4)) < 0.4
    logits = rng.normal(size=(40, 4)) + targets
    result = map_from_logits(logits, targets, ls, scoring)
    paths = write_report(result, ls, tmp_path, scores=logits, checkpoint_selection=selection)
    metrics = json.loads(Path(paths["metrics"]).read_text())
    assert (metrics["scoring"], metrics["checkpoint_selection"]) == (scoring, selection)
    for text in (Path(paths["report"]).read_text(), format_summary(result, selection)):
        assert f"AP scores: {scoring} (" in text
        assert f"checkpoint: {selection} (" in text
    assert ("LMPT's protocol" in format_summary(result)) == (scoring == "softmax")
    with pytest.raises(ValueError, match="checkpoint_selection 'best'"):
        write_report(result, ls, tmp_path, checkpoint_selection="best")


def test_scores_given_directly_state_no_scoring(tmp_path, evaluated):
    result, ls = evaluated
    metrics = json.loads(Path(write_report(result, ls, tmp_path)["metrics"]).read_text())
    assert metrics["scoring"] is None and metrics["checkpoint_selection"] is None
    assert "AP scores" not in format_summary(result)


def test_format_summary_table(evaluated):
    result, _ = evaluated
    text = format_summary(result)
    lines = text.splitlines()
    assert lines[0].split() == ["group", "mAP", "classes"]
    assert lines[2].split() == ["all", f"{100 * result.map_all:.2f}", "9/10"]
    assert lines[5].split() == ["tail", f"{100 * result.map_tail:.2f}", "3/4"]
    assert "excluded (no test positive): class 9" in text


def test_group_without_classes_reads_as_dash():
    names, groups = ["a", "b"], ["head", "head"]
    result = group_map(
        np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([[1, 0], [0, 1]]), (names, groups)
    )
    assert result.map_medium is None and result.map_tail is None
    summary = format_summary(result)
    assert summary.splitlines()[4].split() == ["medium", "-", "0/0"]


def test_write_report_rejects_other_label_space(tmp_path, evaluated):
    result, _ = evaluated
    other = LabelSpace([f"y{i}" for i in range(10)], np.ones(10), np.eye(10))
    with pytest.raises(ValueError, match="different classes"):
        write_report(result, other, str(tmp_path))


def test_format_report_rows(evaluated):
    result, ls = evaluated
    lines = format_report(result, ls).splitlines()
    class_rows = [
        line for line in lines if line.lstrip().split(" ", 1)[0].isdigit() and "class" in line
    ]
    assert len(class_rows) == 10


def test_plot_curves_one_panel_per_metric():
    image_module = pytest.importorskip("PIL.Image")
    series = {
        "loss": [(s, 2.0 / (1 + s)) for s in range(0, 500, 10)],
        "gcl": [(s, 1.0 / (1 + s)) for s in range(0, 500, 10)],
        "qcl": [(20, 0.3), (10, 0.5)],  # out of step order
        "lr": [(0, 1e-4)],  # a single point
        "eval/map_all": [],  # no evaluation yet
    }
    png = plot_curves(series, title="demo run")
    with image_module.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        image.load()  # decodes the pixel data, not only the header
        width, height = CURVE_PANEL_INCHES
        assert image.size == (3 * width * CURVE_DPI, 2 * height * CURVE_DPI)  # 3 + 2 panels

    with image_module.open(io.BytesIO(plot_curves({"loss": [(5, 1.0)]}))) as image:
        assert image.size == (width * CURVE_DPI, height * CURVE_DPI)


def test_plot_curves_without_metrics_is_an_error():
    with pytest.raises(ValueError, match="at least one metric"):
        plot_curves({})


def test_format_f1_summary_table(evaluated):
    _, ls = evaluated
    rng = np.random.default_rng(1)
    targets = rng.random((300, 10)) < np.linspace(0.4, 0.05, 10)
    targets[:, 9] = False
    scores = rng.random((300, 10)) + 0.6 * targets
    thresholds, _ = best_f1_thresholds(scores, targets)
    report = f1_report(scores, targets, thresholds, ls)
    lines = format_f1_summary(report).splitlines()
    assert lines[0].split() == ["group", "macro-F1", "classes"]
    assert lines[2].split() == ["all", f"{100 * report['macro_f1']['all']:.2f}", "9/10"]
    assert lines[5].split() == ["tail", f"{100 * report['macro_f1']['tail']:.2f}", "3/4"]
    micro = report["micro"]
    assert lines[6] == (
        f"micro-F1 {100 * micro['f1']:.2f} "
        f"(precision {100 * micro['precision']:.2f}, recall {100 * micro['recall']:.2f})"
    )
    assert lines[7] == "excluded (no positive, none predicted): class 9"


def test_format_f1_summary_without_groups():
    report = f1_report(np.array([[0.9], [0.1]]), np.array([[1], [0]]), 0.5)
    lines = format_f1_summary(report).splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["all", "micro-F1"]
    assert lines[2].split() == ["all", "100.00", "1/1"]
