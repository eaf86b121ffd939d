"""Run reports: atomic writes, figures and markdown pages built from evaluation metrics."""

from .io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, csv_text, to_jsonable
from .markdown import (
    check_section,
    format_cell,
    format_params,
    format_percent,
    markdown_table,
    merge_section,
    trainable_percent,
    write_run_report,
)
from .plots import plot_confusion_matrix, plot_metric_vs_params, plot_training_curves
from .progress import progress_bar

__all__ = [
    "atomic_dir",
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
