"""Evaluation reports: ``metrics.json``, a readable ``report.txt`` and an AP-vs-frequency plot.

The plot is the long-tail picture in one glance: per-class AP against training frequency, with
each group's mAP as a dashed line. Files go through ``ltdist.storage`` so ``out_dir`` may
be a local folder or an object-store URL, and each file is written atomically. Alongside: an
F1 summary table (from ``thresholds.f1_report``) and training-curve plots.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ltdist import storage
from ltdist.eval.metrics import SCORING_TEXT, MapResult
from ltdist.labels import GROUPS, HEAD_MIN, MEDIUM_MIN, LabelSpace

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.txt"
PLOT_FILE = "ap_vs_frequency.png"
SCORES_FILE = "scores.npy"
GROUP_COLOURS = {"head": "tab:blue", "medium": "tab:orange", "tail": "tab:red"}
# Which weights were evaluated: the run's final ones, or the best on a validation / the test
# split (the papers' code picks the best on test).
SELECTION_TEXT = {
    "last": "the run's final weights (none selected)",
    "val": "the best on the validation split",
    "test": "the best on the test split",
}


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _protocol_lines(result: MapResult, checkpoint_selection: str | None) -> list[str]:
    lines = []
    if result.scoring is not None:
        lines.append(f"AP scores: {result.scoring} ({SCORING_TEXT[result.scoring]})")
    if checkpoint_selection is not None:
        lines.append(f"checkpoint: {checkpoint_selection} ({SELECTION_TEXT[checkpoint_selection]})")
    return lines


def format_summary(result: MapResult, checkpoint_selection: str | None = None) -> str:
    """One table: mAP (percent) of all / head / medium / tail with evaluated / total classes,
    under the scoring of the result and the checkpoint selection when known."""
    counts = result.counts()
    lines = _protocol_lines(result, checkpoint_selection)
    lines += [f"{'group':<8}  {'mAP':>7}  {'classes':>9}", "-" * 28]
    for g in ("all", *GROUPS):
        n = counts[g]
        evaluated = f"{n['evaluated']}/{n['classes']}"
        lines.append(f"{g:<8}  {_pct(result.map_of(g)):>7}  {evaluated:>9}")
    if result.excluded:
        lines.append(f"excluded (no test positive): {', '.join(result.excluded)}")
    return "\n".join(lines)


def _class_rows(result: MapResult, label_space: LabelSpace) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "name": name,
            "frequency": int(label_space.frequency[i]),
            "group": result.groups[i],
            "test_positives": int(result.positives[i]),
            "ap": float(result.ap[i]) if result.valid[i] else None,  # JSON has no NaN
            "excluded": not bool(result.valid[i]),
        }
        for i, name in enumerate(result.names)
    ]


def metrics_dict(
    result: MapResult,
    label_space: LabelSpace,
    title: str = "",
    checkpoint_selection: str | None = None,
) -> dict[str, Any]:
    """Everything ``metrics.json`` holds; AP values are fractions in [0, 1], never NaN.
    ``scoring`` and ``checkpoint_selection`` are None where unknown (scores given directly)."""
    if checkpoint_selection is not None and checkpoint_selection not in SELECTION_TEXT:
        raise ValueError(
            f"checkpoint_selection {checkpoint_selection!r}; expected one of {list(SELECTION_TEXT)}"
        )
    return {
        "title": title,
        "scoring": result.scoring,
        "checkpoint_selection": checkpoint_selection,
        "num_samples": result.num_samples,
        "map": result.summary(),
        "counts": result.counts(),
        "group_rule": {"head_min": HEAD_MIN, "medium_min": MEDIUM_MIN},
        "excluded": list(result.excluded),
        "classes": _class_rows(result, label_space),
    }


def format_report(
    result: MapResult,
    label_space: LabelSpace,
    title: str = "",
    checkpoint_selection: str | None = None,
) -> str:
    """The group summary, then one row per class in label-id order."""
    rows = _class_rows(result, label_space)
    width = max(5, *(len(r["name"]) for r in rows))
    header = f"{'id':>3}  {'class':<{width}}  {'freq':>6}  {'group':<6}  {'test+':>6}  {'AP':>7}"
    lines = [title, "=" * len(title)] if title else []
    summary = format_summary(result, checkpoint_selection)
    lines += [f"{result.num_samples} test samples", "", summary, "", header]
    lines.append("-" * len(header))
    for r in rows:
        ap = "excl." if r["excluded"] else _pct(r["ap"])
        lines.append(
            f"{r['id']:>3}  {r['name']:<{width}}  {r['frequency']:>6}  {r['group']:<6}  "
            f"{r['test_positives']:>6}  {ap:>7}"
        )
    return "\n".join(lines) + "\n"


def plot_ap_vs_frequency(result: MapResult, label_space: LabelSpace, title: str = "") -> bytes:
    """PNG bytes: per-class AP (%) against training frequency (log x), coloured by group."""
    # The object-oriented API renders with Agg without touching pyplot's global backend.
    from matplotlib.figure import Figure

    freq = label_space.frequency.astype(np.float64)
    if (freq[result.valid] < 1).any():
        log.warning("classes with training frequency 0 are drawn at 0.5 on the log axis")
    x = np.maximum(freq, 0.5)
    groups = np.asarray(result.groups)

    fig = Figure(figsize=(9.5, 5), dpi=120)
    ax = fig.add_subplot()
    for g in GROUPS:
        sel = result.valid & (groups == g)
        colour = GROUP_COLOURS[g]
        ax.scatter(
            x[sel],
            100 * result.ap[sel],
            s=22,
            color=colour,
            alpha=0.8,
            label=f"{g} ({int(sel.sum())} classes)",
        )
        value = result.map_of(g)
        if value is not None:
            ax.axhline(
                100 * value,
                color=colour,
                linestyle="--",
                linewidth=1.2,
                label=f"{g} mAP {100 * value:.1f}",
            )
    if result.map_all is not None:
        ax.axhline(
            100 * result.map_all,
            color="0.3",
            linestyle="--",
            linewidth=1.2,
            label=f"all mAP {100 * result.map_all:.1f}",
        )
    for edge in (MEDIUM_MIN, HEAD_MIN):  # group boundaries of the benchmark rule
        ax.axvline(edge, color="0.75", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("training frequency (positive images, log scale)")
    ax.set_ylabel("AP (%)")
    ax.set_title(title or "Per-class AP vs training frequency")
    ax.grid(True, which="major", alpha=0.3)
    # Outside the axes: inside, it would hide the points of some group whatever the corner.
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    if result.excluded:
        n = len(result.excluded)
        legend.set_title(
            f"{n} class{'es' if n > 1 else ''} without\ntest positives not shown", prop={"size": 7}
        )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def format_f1_summary(report: dict[str, Any]) -> str:
    """One table from ``f1_report``: macro-F1 (percent) per group with evaluated / total
    classes, then micro-F1 with its precision and recall."""
    counts = report["counts"]
    lines = [f"{'group':<8}  {'macro-F1':>8}  {'classes':>9}", "-" * 29]
    for g, value in report["macro_f1"].items():
        evaluated = f"{counts[g]['evaluated']}/{counts[g]['classes']}"
        lines.append(f"{g:<8}  {_pct(value):>8}  {evaluated:>9}")
    micro = report["micro"]
    lines.append(
        f"micro-F1 {_pct(micro['f1'])} "
        f"(precision {_pct(micro['precision'])}, recall {_pct(micro['recall'])})"
    )
    if report["excluded"]:
        lines.append(f"excluded (no positive, none predicted): {', '.join(report['excluded'])}")
    return "\n".join(lines)


# Each metric gets a panel of this size (inches at CURVE_DPI), at most this many to a row.
CURVE_PANEL_INCHES = (4, 3)
CURVE_DPI = 100
CURVE_COLUMNS = 3


def plot_curves(
    series: dict[str, list[tuple[int, float]]], title: str = "", xlabel: str = "step"
) -> bytes:
    """PNG bytes: one panel per metric (e.g. "loss", "lr", "eval/map_all") against step.

    Panels fill rows of ``CURVE_COLUMNS``, so the image is CURVE_DPI * CURVE_PANEL_INCHES
    times (columns, rows) pixels. Points are drawn in step order; a lone point gets a marker
    and a metric without points gets a "no data" panel. An empty ``series`` is a ValueError:
    there is nothing to lay out, and a silent blank image would hide a caller's bug.
    """
    if not series:
        raise ValueError("plot_curves needs at least one metric; series is empty")
    from matplotlib.figure import Figure

    columns = min(CURVE_COLUMNS, len(series))
    rows = math.ceil(len(series) / columns)
    width, height = CURVE_PANEL_INCHES
    fig = Figure(figsize=(width * columns, height * rows), dpi=CURVE_DPI)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, points) in zip(axes, series.items()):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, marker="o" if len(points) == 1 else None, linewidth=1.2)
    for ax in axes[len(series) :]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(
    result: MapResult,
    label_space: LabelSpace,
    out_dir: str | Path,
    title: str = "",
    scores: np.ndarray | None = None,
    checkpoint_selection: str | None = None,
) -> dict[str, str]:
    """Write ``metrics.json``, ``report.txt`` and ``ap_vs_frequency.png`` (and with ``scores``,
    the (N, C) scores AP was computed on, in the split's stored order and their own dtype, as
    ``scores.npy``, for analyses and for comparing two evaluations sample by sample); return
    their paths.

    ``out_dir`` is a local folder or an fsspec URL (``s3://...``).
    ``label_space`` supplies training frequencies; its class names must match the result's.
    ``checkpoint_selection`` ("last", "val" or "test") says which weights were evaluated.
    """
    if list(label_space.names) != list(result.names):
        raise ValueError("label space and result name different classes (or order)")
    out_dir = str(out_dir)  # storage speaks strings (local paths and URLs alike)
    storage.makedirs(out_dir)
    paths = {
        "metrics": storage.join(out_dir, METRICS_FILE),
        "report": storage.join(out_dir, REPORT_FILE),
        "plot": storage.join(out_dir, PLOT_FILE),
    }
    metrics = metrics_dict(result, label_space, title, checkpoint_selection)
    storage.write_bytes_atomic(
        paths["metrics"], json.dumps(metrics, indent=1, allow_nan=False).encode()
    )
    report = format_report(result, label_space, title, checkpoint_selection)
    storage.write_bytes_atomic(paths["report"], report.encode())
    storage.write_bytes_atomic(paths["plot"], plot_ap_vs_frequency(result, label_space, title))
    if scores is not None:
        paths["scores"] = storage.join(out_dir, SCORES_FILE)
        buf = io.BytesIO()
        np.save(buf, np.asarray(scores), allow_pickle=False)
        storage.write_bytes_atomic(paths["scores"], buf.getvalue())
    log.info("evaluation report written to %s", out_dir)
    return paths
