"""Tracking: console line and MLflow (rank 0 only)."""

from llmtrain.tracking.console import ConsoleLogger, format_line

__all__ = ["ConsoleLogger", "format_line"]
