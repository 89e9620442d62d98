"""The seam between the manager and an experiment tracker.

A ``Tracker`` is a handful of operations on runs: metric points since a cursor, tags, small
JSON artifacts, and the list of managed runs. Everything else in the project talks to a
tracker only through this protocol and never asks which backend it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class TrackerError(RuntimeError):
    """A tracker operation failed."""


class TrackerUnavailable(TrackerError):
    """The tracker could not be reached (network, server down, timeout)."""


class RunNotFound(TrackerError):
    """No run with that id exists on the tracker."""


@dataclass(frozen=True)
class MetricPoint:
    key: str
    step: int
    value: float
    timestamp: int


@dataclass
class RunInfo:
    run_id: str
    name: str
    experiment_id: str
    status: str
    start_time: int | None
    tags: dict[str, str] = field(default_factory=dict)
    latest_metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    @property
    def is_running(self) -> bool:
        return self.status == "RUNNING"


@dataclass
class MetricCursor:
    """How far each metric key of one run has been read; owned by the reader."""

    offsets: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Tracker(Protocol):
    """The operations the manager and the client need from an experiment tracker."""

    uri: str

    def get_run(self, run_id: str) -> RunInfo:
        """The run's status, tags and latest metric values; raises RunNotFound."""
        ...

    def find_managed_runs(self, experiments: list[str] | None = None) -> list[RunInfo]:
        """Running runs tagged as managed (in the named experiments, when given)."""
        ...

    def read_new_points(
        self, run_id: str, keys: list[str], cursor: MetricCursor
    ) -> list[MetricPoint]:
        """Points of ``keys`` logged since ``cursor``, oldest first; advances the cursor."""
        ...

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None: ...

    def delete_tag(self, run_id: str, key: str) -> None: ...

    def log_metric(self, run_id: str, key: str, value: float, step: int) -> None: ...

    def read_json(self, run_id: str, path: str) -> Any | None:
        """The parsed JSON artifact at ``path``, or None if there is none.

        Raises TrackerError when the file exists but is not valid JSON.
        """
        ...

    def write_json(self, run_id: str, path: str, payload: Any) -> None: ...

    def list_artifacts(self, run_id: str, directory: str) -> list[str]:
        """Paths of the files directly under ``directory`` (empty if none)."""
        ...

    def ping(self) -> bool:
        """A cheap reachability check that never retries."""
        ...
