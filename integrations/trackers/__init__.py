"""Tracker backends, chosen from the tracking URI."""

from __future__ import annotations

import os

from integrations.trackers.base import (
    MetricCursor,
    MetricPoint,
    RunInfo,
    RunNotFound,
    Tracker,
    TrackerError,
    TrackerUnavailable,
)

__all__ = [
    "MetricCursor",
    "MetricPoint",
    "RunInfo",
    "RunNotFound",
    "Tracker",
    "TrackerError",
    "TrackerUnavailable",
    "default_tracking_uri",
    "open_tracker",
]

_MLFLOW_SCHEMES = ("http://", "https://", "sqlite://", "databricks", "postgresql", "mysql")


def default_tracking_uri() -> str | None:
    """The URI from the environment (``MLFLOW_TRACKING_URI``), if any."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def open_tracker(uri: str) -> Tracker:
    """The tracker backend for ``uri``: MLflow for http(s), sqlite, databases and Databricks."""
    if uri.startswith(_MLFLOW_SCHEMES):
        from integrations.trackers.mlflow_backend import MlflowTracker

        return MlflowTracker(uri)
    if uri.startswith("wandb://"):
        raise ValueError("the W&B backend is not available in this version; use an MLflow URI")
    raise ValueError(
        f"unsupported tracking URI {uri!r}: expected http(s)://…, sqlite:///…, databricks, "
        "or a database URI"
    )
