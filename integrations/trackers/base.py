"""The seam between the manager and an experiment tracker.

A ``Tracker`` is a handful of operations on runs: metric points since a cursor, tags, small
JSON artifacts (and files, for reports), and the lists of runs. Everything else in the project
talks to a tracker only through this protocol and never asks which backend it has. A
``TrackerBackend`` says how one kind of tracker is opened from a URI and how a training process
finds the run it logs to; ``integrations.trackers`` picks the backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class TrackerError(RuntimeError):
    """A tracker operation failed."""


class TrackerUnavailable(TrackerError):
    """The tracker could not be reached (network, server down, timeout, rate limit)."""


class RunNotFound(TrackerError):
    """No run with that id exists on the tracker."""


class CorruptArtifact(TrackerError):
    """A JSON artifact exists but cannot be read as JSON (truncated, tampered, not UTF-8)."""


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
    # The step of each metric's latest point, where the tracker's run listing carries it.
    latest_steps: dict[str, int] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    @property
    def is_running(self) -> bool:
        return self.status == "RUNNING"


class Cursor:
    """How far a reader has read a run's metrics. Opaque: made, advanced and read only by
    the backend that returned it."""


# One run's read: the run, the metric keys, and the cursor (None: a first read).
PointsRead = tuple[str, list[str], Cursor | None]


@dataclass(frozen=True)
class Window:
    """How many of a key's last points its first read takes: ``points`` of every key, or
    ``by_key`` of the keys named there."""

    points: int
    by_key: Mapping[str, int] = field(default_factory=dict)

    def of(self, key: str) -> int:
        return self.by_key.get(key, self.points)


def window_of(window: int | Window | None, key: str) -> int | None:
    """The points a first read of ``key`` takes (None: its whole history)."""
    return window.of(key) if isinstance(window, Window) else window


def widen(span: int, found: int, window: int) -> int:
    """The steps to read next when the last ``span`` steps held ``found`` points, fewer than
    ``window``: as many as the density seen asks for, a quarter more for uneven logging (one
    more read, not a history); eight times as many where none were found."""
    if found == 0:
        return span * 8
    return max(span + 1, math.ceil(span * window / found * 1.25))


@runtime_checkable
class Tracker(Protocol):
    """The operations the manager and the client need from an experiment tracker."""

    uri: str
    # Whether daemon replicas can share this tracker's runs through leases in run tags: a tag
    # write must land whole (not as a read-modify-write of a list) within a bounded time.
    leases: bool

    def get_run(self, run_id: str) -> RunInfo:
        """The run's status, tags and latest metric values; raises RunNotFound."""
        ...

    def find_managed_runs(
        self, experiments: list[str] | None = None, *, finished: bool = False
    ) -> list[RunInfo]:
        """Running runs tagged as managed (in the named experiments, when given); with
        ``finished``, the managed runs that have ended too."""
        ...

    def list_runs(self, experiment: str) -> list[RunInfo]:
        """Every run of the experiment named (or with that id: a run's ``experiment_id``),
        managed or not, whatever its status (none when there is no such experiment)."""
        ...

    def read_new_points(
        self,
        run_id: str,
        keys: list[str],
        cursor: Cursor | None,
        *,
        window: int | Window | None = None,
    ) -> tuple[list[MetricPoint], Cursor]:
        """Points of ``keys`` logged since ``cursor``, oldest first, and the cursor after them
        (``cursor`` is left as it was). A key the cursor has not seen is read from its start,
        or, with ``window``, only its last points (that many, or as many as the ``Window``
        gives the key): a restart reads a bounded recent window, not whole histories. The cost
        of a read follows what is new."""
        ...

    def read_new_points_many(
        self, reads: Sequence[PointsRead], *, window: int | Window | None = None
    ) -> list[tuple[list[MetricPoint], Cursor]]:
        """``read_new_points`` for several runs at once, in the order of ``reads``: one request
        per metric for many runs where the tracker has a batch read."""
        ...

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Set the tags together: a reader sees all of them or none."""
        ...

    def delete_tag(self, run_id: str, key: str) -> None:
        """Remove a tag; removing one that is not there is not an error."""
        ...

    def log_metric(self, run_id: str, key: str, value: float, step: int) -> None: ...

    def log_metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        """Several metrics at one step, in one request where the tracker allows."""
        ...

    def read_json(self, run_id: str, path: str) -> Any | None:
        """The parsed JSON artifact at ``path``, or None if there is none.

        Raises CorruptArtifact when the artifact exists but is not valid JSON.
        """
        ...

    def write_json(self, run_id: str, path: str, payload: Any) -> None: ...

    def write_file(self, run_id: str, path: str, data: bytes) -> None:
        """Store ``data`` as the artifact at ``path`` (a report's page or plot), replacing
        what was there."""
        ...

    def list_artifacts(self, run_id: str, directory: str) -> list[str]:
        """Paths of the artifacts directly under ``directory`` (empty if none)."""
        ...

    def ping(self) -> bool:
        """A cheap reachability check that never retries."""
        ...


@dataclass(frozen=True)
class RunBinding:
    """The run a training process logs to, and the tracker to reach it through."""

    tracker: Tracker
    run_id: str
    # The client's poll interval suited to this tracker (a hosted service asks for fewer
    # requests), unless the process sets its own; None: the client's default.
    poll_interval: float | None = None
    # Where the tracker's SDK records the points a script logs without a step at one fixed
    # step (MLflow: 0), which no step-range read can follow: ``follow_steps(training_step)``
    # records them at the step ``training_step()`` gives instead (None: as the SDK would),
    # and returns a function that stops it. None where the SDK numbers such points itself.
    follow_steps: Callable[[Callable[[], int | None]], Callable[[], None]] | None = None


class TrackerBackend(Protocol):
    """One kind of tracker: how to open it, and how a training process finds its run there."""

    name: str

    def open(self, uri: str, *, fail_fast: bool = False) -> Tracker:
        """A tracker for ``uri`` (a URI this backend was registered for). With ``fail_fast``
        (a daemon, a command line) a request that fails gives up after a short wait rather
        than retrying for minutes as a tracker SDK may by default."""
        ...

    def current_run(self, run_id: str | None, uri: str | None) -> RunBinding | None:
        """The run this process logs to on this kind of tracker (``run_id`` and ``uri`` when
        the caller names them), or None when it logs to none."""
        ...

    def launch_env(self, uri: str, run_id: str | None) -> dict[str, str]:
        """Environment variables that make a launched script log to ``uri`` (and continue run
        ``run_id``), as the tracker's own SDK reads them."""
        ...

    def default_uri(self) -> str | None:
        """The tracker named by the tracker's own environment variables, if any."""
        ...
