"""Run reports: atomic writes, figures and markdown pages built from evaluation metrics.

The figures (matplotlib) load on first use, so the atomic writers can be imported cheaply.
"""

from importlib import import_module

from .io import (
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    csv_text,
    to_jsonable,
)
from .markdown import (
    check_section,
    format_cell,
    format_params,
    format_percent,
    markdown_table,
    merge_section,
    trainable_percent,
)
from .progress import progress_bar

_PLOTS = ("plot_confusion_matrix", "plot_metric_vs_params", "plot_training_curves")
_RUN_REPORT = ("write_run_report",)

__all__ = [
    "atomic_dir",
    "atomic_write_csv",
    "check_section",
    "csv_text",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "format_cell",
    "format_params",
    "format_percent",
    "markdown_table",
    "merge_section",
    "plot_confusion_matrix",
    "plot_metric_vs_params",
    "plot_training_curves",
    "progress_bar",
    "to_jsonable",
    "trainable_percent",
    "write_run_report",
]


def __getattr__(name: str):
    if name in _PLOTS or name in _RUN_REPORT:  # matplotlib costs about a second; most callers never plot
        module = import_module(".plots" if name in _PLOTS else ".run_report", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
