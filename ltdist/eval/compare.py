"""Compare methods: group mAP over seeds as a table, and per-class AP side by side as a plot.

A run is the folder of one training or evaluation run: its ``metrics.json`` carries the group
mAP (``map``) and, directly or through the report it names (``report.metrics``), the per-class
AP rows that :func:`ltdist.eval.report.metrics_dict` writes. The trainer, ``launchers/evaluate.py``
and ``ltdist reference-cnn`` all write one. A method is a name and the runs of its seeds; the table
shows mean ± sample standard deviation over them, so a difference smaller than the spread
reads as one.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ltdist import storage
from ltdist.entry import InputError, MissingInputError
from ltdist.labels import GROUPS

TABLE_GROUPS = ("all", *GROUPS)
METRICS_FILE = "metrics.json"


@dataclass
class RunMetrics:
    """One run's group mAP (fractions, None where a group has no evaluated class) and its
    per-class rows (name, frequency, group, ap)."""

    path: str
    map: dict[str, float | None]
    classes: list[dict[str, Any]]

    @classmethod
    def read(cls, path: str | Path) -> RunMetrics:
        path = str(path).rstrip("/")
        file = path if path.endswith(".json") else f"{path}/{METRICS_FILE}"
        if not storage.exists(file):
            raise MissingInputError(f"{file}: no metrics (did the run finish?)")
        data = json.loads(storage.read_bytes(file))
        if "map" not in data:
            raise InputError(f"{file}: no 'map' entry; not a training or evaluation run's metrics")
        classes = data.get("classes")
        if classes is None:  # the trainer's metrics.json names its report's
            report = (data.get("report") or {}).get("metrics")
            if not report:
                raise InputError(f"{file}: neither per-class rows nor a report to read them from")
            classes = json.loads(storage.read_bytes(report))["classes"]
        return cls(path=path, map=dict(data["map"]), classes=list(classes))

    def ap_vector(self) -> np.ndarray:
        """Per-class AP in label-id order; NaN for classes without test positives."""
        return np.array([np.nan if c["ap"] is None else c["ap"] for c in self.classes])


@dataclass
class Method:
    """A method's runs, one per seed."""

    name: str
    runs: list[RunMetrics] = field(default_factory=list)

    def values(self, group: str) -> np.ndarray:
        vals = [r.map.get(group) for r in self.runs]
        return np.array([np.nan if v is None else v for v in vals], dtype=np.float64)

    def mean(self, group: str) -> float:
        v = self.values(group)
        return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan

    def std(self, group: str) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        v = self.values(group)
        v = v[np.isfinite(v)]
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    def ap_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        aps = np.stack([r.ap_vector() for r in self.runs])
        std = np.nanstd(aps, axis=0, ddof=1) if len(aps) > 1 else np.zeros(aps.shape[1])
        return np.nanmean(aps, axis=0), std


def _cell(method: Method, group: str) -> str:
    mean = method.mean(group)
    if math.isnan(mean):
        return "-"
    if len(method.runs) > 1:
        return f"{100 * mean:.1f} ± {100 * method.std(group):.1f}"
    return f"{100 * mean:.1f}"


def format_table(
    methods: Sequence[Method],
    markdown: bool = False,
    extra: dict[str, Sequence[str]] | None = None,
) -> str:
    """Group mAP (percent) per method: mean ± std over its runs. ``extra`` adds columns
    (header -> one cell per method) after the method name."""
    extra = extra or {}
    headers = ["method", *extra, *TABLE_GROUPS, "seeds"]
    rows = [
        [m.name, *(col[i] for col in extra.values()), *(_cell(m, g) for g in TABLE_GROUPS)]
        + [str(len(m.runs))]
        for i, m in enumerate(methods)
    ]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*headers), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def plot_per_class_ap(methods: Sequence[Method], title: str = "") -> bytes:
    """PNG bytes: per-class AP (%) of each method, classes ordered by training frequency (head
    left, tail right), mean over seeds with the spread as error bars; group boundaries drawn."""
    from matplotlib.figure import Figure

    if not methods:
        raise ValueError("plot_per_class_ap: no methods")
    classes = methods[0].runs[0].classes
    for m in methods:
        for r in m.runs:
            if [c["name"] for c in r.classes] != [c["name"] for c in classes]:
                raise InputError(f"{r.path}: other classes than {methods[0].runs[0].path}")
    order = np.argsort([-c["frequency"] for c in classes], kind="stable")
    groups = [classes[i]["group"] for i in order]
    x = np.arange(len(order))
    width = 0.8 / len(methods)

    fig = Figure(figsize=(max(9.0, 0.45 * len(order) + 3), 5), dpi=120)
    ax = fig.add_subplot()
    for k, m in enumerate(methods):
        mean, std = m.ap_mean_std()
        ax.bar(
            x - 0.4 + (k + 0.5) * width,
            100 * mean[order],
            width,
            yerr=100 * std[order] if len(m.runs) > 1 else None,
            capsize=1.5,
            label=f"{m.name} (mAP {100 * m.mean('all'):.1f})",
            error_kw={"linewidth": 0.7},
        )
    for i in range(1, len(groups)):
        if groups[i] != groups[i - 1]:
            ax.axvline(i - 0.5, color="0.4", linestyle=":", linewidth=1)
    for g in GROUPS:
        idx = [i for i, name in enumerate(groups) if name == g]
        if idx:
            ax.text(np.mean(idx), 103, g, ha="center", fontsize=9, color="0.3")
    ax.set_xticks(x)
    ax.set_xticklabels(
        [f"{classes[i]['name']} ({classes[i]['frequency']})" for i in order],
        rotation=60,
        ha="right",
        fontsize=7,
    )
    ax.set_ylim(0, 108)
    ax.set_ylabel("AP (%)")
    ax.set_title(title or "Per-class AP, classes by training frequency")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def parse_run_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named by its folder) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = Path(spec.rstrip("/")).name
    return name, path


def compare_runs(specs: Sequence[str]) -> list[Method]:
    """Runs given as ``NAME=PATH`` (repeat a name for its seeds), in first-seen order."""
    methods: dict[str, Method] = {}
    for spec in specs:
        name, path = parse_run_spec(spec)
        methods.setdefault(name, Method(name)).runs.append(RunMetrics.read(path))
    return list(methods.values())
