"""Run reports: atomic writes, figures and markdown pages built from evaluation metrics."""

from .io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, csv_text, to_jsonable
from .markdown import format_cell, format_params, markdown_table, write_run_report
from .plots import plot_confusion_matrix, plot_metric_vs_params, plot_training_curves

__all__ = [
    "atomic_dir",
    "csv_text",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "format_cell",
    "format_params",
    "markdown_table",
    "plot_confusion_matrix",
    "plot_metric_vs_params",
    "plot_training_curves",
    "to_jsonable",
    "write_run_report",
]
