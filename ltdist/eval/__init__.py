"""Evaluation: per-class AP, mAP over all / head / medium / tail classes, reports and plots.

Imports neither torch nor matplotlib at load time (matplotlib loads when a plot is drawn), so
every environment can evaluate.
"""

from ltdist.eval.metrics import MapResult, as_numpy, average_precision, group_map
from ltdist.eval.report import format_report, format_summary, metrics_dict, write_report

__all__ = [
    "MapResult",
    "as_numpy",
    "average_precision",
    "format_report",
    "format_summary",
    "group_map",
    "metrics_dict",
    "write_report",
]
