"""The comparison of runs: reading both metrics layouts, mean ± sample std over seeds (checked
against numpy / statistics), the table, the per-class plot, the CLI."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from ltdist.cli import main as cli_main
from ltdist.eval.compare import (
    Method,
    RunMetrics,
    compare_runs,
    format_table,
    parse_run_spec,
    plot_per_class_ap,
)

NAMES = [("person", 500, "head"), ("kite", 30, "medium"), ("toaster", 5, "tail")]


def _classes(aps):
    return [
        {"id": i, "name": n, "frequency": f, "group": g, "ap": ap}
        for i, ((n, f, g), ap) in enumerate(zip(NAMES, aps, strict=True))
    ]


def _map(aps):
    vals = {
        g: [a for (_, _, gg), a in zip(NAMES, aps, strict=True) if gg == g and a is not None]
        for g in ("head", "medium", "tail")
    }
    valid = [a for a in aps if a is not None]
    out = {"all": float(np.mean(valid))}
    out.update({g: (float(np.mean(v)) if v else None) for g, v in vals.items()})
    return out


def _eval_run(path, aps):
    """An evaluation report folder (launchers/evaluate.py, ltdist reference-cnn): rows inline."""
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"map": _map(aps), "classes": _classes(aps)}))
    return path


def _train_run(path, aps):
    """A trainer output folder: metrics.json names its report's metrics."""
    report = path / "report"
    report.mkdir(parents=True)
    (report / "metrics.json").write_text(json.dumps({"map": _map(aps), "classes": _classes(aps)}))
    (path / "metrics.json").write_text(
        json.dumps(
            {
                "status": "completed",
                "map": _map(aps),
                "report": {"metrics": str(report / "metrics.json")},
            }
        )
    )
    return path


def test_mean_and_sample_std_over_seeds(tmp_path):
    seeds = [[0.9, 0.4, 0.1], [0.8, 0.5, 0.3], [1.0, 0.45, None]]
    runs = [_eval_run(tmp_path / f"s{i}", aps) for i, aps in enumerate(seeds[:2])]
    runs.append(_train_run(tmp_path / "s2", seeds[2]))
    [method] = compare_runs([f"m={r}" for r in runs])
    assert len(method.runs) == 3
    for g in ("all", "head", "medium"):
        vals = [_map(aps)[g] for aps in seeds]
        assert method.mean(g) == pytest.approx(statistics.fmean(vals), abs=1e-12)
        assert method.std(g) == pytest.approx(statistics.stdev(vals), abs=1e-12)
    # the tail group has no value in the third run: mean and std over the two that have one
    assert method.mean("tail") == pytest.approx(0.2)
    assert method.std("tail") == pytest.approx(statistics.stdev([0.1, 0.3]))
    mean, std = method.ap_mean_std()
    np.testing.assert_allclose(mean, [0.9, 0.45, 0.2])
    np.testing.assert_allclose(std[:2], [0.1, 0.05])


def test_table_cells_and_columns(tmp_path):
    a = [
        _eval_run(tmp_path / f"a{i}", aps)
        for i, aps in enumerate([[1.0, 0.5, 0.2], [0.8, 0.5, 0.0]])
    ]
    b = _eval_run(tmp_path / "b", [0.5, 0.25, None])
    methods = compare_runs([f"first={a[0]}", f"second={b}", f"first={a[1]}"])
    assert [m.name for m in methods] == ["first", "second"]
    text = format_table(methods)
    first = next(line for line in text.splitlines() if line.startswith("first"))
    # all: means 0.5667 and 0.4333 -> 50.0 ± 9.4 (sample std); head 90.0 ± 14.1
    assert "50.0 ± 9.4" in first and "90.0 ± 14.1" in first and first.rstrip().endswith("2")
    second = next(line for line in text.splitlines() if line.startswith("second"))
    assert second.split()[1:] == ["37.5", "50.0", "25.0", "-", "1"]
    md = format_table(methods, markdown=True, extra={"group": ["x", "y"]})
    lines = md.splitlines()
    assert lines[0] == "| method | group | all | head | medium | tail | seeds |"
    assert lines[2].startswith("| first | x | 50.0 ± 9.4 |")


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="did the run finish"):
        RunMetrics.read(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'map' entry"):
        RunMetrics.read(tmp_path / "bad")
    assert parse_run_spec("runs/x/cprfl/") == ("cprfl", "runs/x/cprfl/")
    assert parse_run_spec("CPRFL head=runs/x") == ("CPRFL head", "runs/x")


def test_plot_and_cli(tmp_path, capsys):
    a = _eval_run(tmp_path / "a", [0.9, 0.4, 0.1])
    b = _train_run(tmp_path / "b", [0.7, 0.2, 0.05])
    png = plot_per_class_ap(compare_runs([str(a), str(b)]))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "c"
    other.mkdir()
    rows = _classes([0.1, 0.2, 0.3])
    rows[0]["name"] = "dog"
    (other / "metrics.json").write_text(json.dumps({"map": {"all": 0.2}, "classes": rows}))
    with pytest.raises(ValueError, match="other classes"):
        plot_per_class_ap(
            [Method("a", [RunMetrics.read(a)]), Method("c", [RunMetrics.read(other)])]
        )

    plot = tmp_path / "cmp.png"
    assert cli_main(["compare", f"x={a}", f"y={b}", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["method", "all", "head", "medium", "tail", "seeds"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["compare", str(tmp_path / "nothing")]) == 2
