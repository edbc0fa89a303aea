"""Run tracking: metrics.jsonl (+ optional TensorBoard / W&B / MLflow), progress, HTML reports.

`psirl.track.report` (matplotlib) is imported only when a report is written.
"""

from psirl.track.metrics import MetricsLogger, metrics_differences, read_metrics
from psirl.track.progress import StepProgress, summary_line

__all__ = ["MetricsLogger", "StepProgress", "metrics_differences", "read_metrics", "summary_line"]
