"""Metrics: the per-round rows of metrics.jsonl."""

from diloco.metrics.jsonl import REQUIRED_FIELDS, MetricsWriter, read_metrics

__all__ = ["REQUIRED_FIELDS", "MetricsWriter", "read_metrics"]
