"""A tracker held in memory, for fast tests of everything above the ``Tracker`` seam.

``memory://NAME`` opens the process-wide tracker of that name, so a client and a daemon in
one process share it as they would share a server. It behaves as the protocol says (tags set
together, artifacts stored as JSON text, points read after a cursor) and nothing more. Faults
are a handler, in the manner of httpx's ``MockTransport``: ``fault(operation, run_id)`` runs
before every operation and may raise (``TrackerUnavailable`` for an outage) or sleep.
``calls`` counts operations and ``points_read`` the metric points read, so a test can assert
how much a pass costs.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from integrations.protocol import TAG_MANAGED
from integrations.trackers import strict_json
from integrations.trackers.base import (
    Cursor,
    MetricPoint,
    PointsRead,
    RunBinding,
    RunInfo,
    RunNotFound,
    Window,
    window_of,
)

Fault = Callable[[str, str | None], None]

_SCHEME = "memory://"


@dataclass
class _Run:
    info: RunInfo
    points: list[MetricPoint] = field(default_factory=list)
    artifacts: dict[str, bytes] = field(default_factory=dict)


class _Seen(Cursor):
    """How many points of the run's log have been read, and which keys."""

    def __init__(self, count: int = 0, keys: frozenset[str] = frozenset()) -> None:
        self.count = count
        self.keys = keys


class MemoryTracker:
    """A ``Tracker`` whose runs live in this process."""

    leases = True

    def __init__(self, uri: str = f"{_SCHEME}default", fault: Fault | None = None) -> None:
        self.uri = uri
        self.fault = fault
        self.calls: Counter[str] = Counter()
        self.points_read = 0
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    # ---- what a training script does itself --------------------------------------------

    def create_run(self, name: str = "", experiment: str = "default") -> str:
        """A new RUNNING run, as a script's tracker SDK would start one."""
        run_id = uuid.uuid4().hex
        info = RunInfo(run_id, name or run_id[:8], experiment, "RUNNING", _now_ms())
        with self._lock:
            self._runs[run_id] = _Run(info)
        return run_id

    def set_status(self, run_id: str, status: str) -> None:
        with self._lock:
            self._run(run_id).info.status = status

    # ---- the Tracker protocol -----------------------------------------------------------

    def ping(self) -> bool:
        try:
            self._call("ping")
        except Exception:
            return False
        return True

    def get_run(self, run_id: str) -> RunInfo:
        self._call("get_run", run_id)
        with self._lock:
            return _copy(self._run(run_id).info)

    def find_managed_runs(
        self, experiments: list[str] | None = None, *, finished: bool = False
    ) -> list[RunInfo]:
        self._call("find_managed_runs")
        with self._lock:
            return [
                _copy(r.info)
                for r in self._runs.values()
                if r.info.tags.get(TAG_MANAGED) == "true"
                and (finished or r.info.is_running)
                and (experiments is None or r.info.experiment_id in experiments)
            ]

    def list_runs(self, experiment: str) -> list[RunInfo]:
        self._call("list_runs")
        with self._lock:
            return [
                _copy(r.info) for r in self._runs.values() if r.info.experiment_id == experiment
            ]

    def read_new_points(
        self,
        run_id: str,
        keys: list[str],
        cursor: Cursor | None,
        *,
        window: int | Window | None = None,
    ) -> tuple[list[MetricPoint], Cursor]:
        self._call("read_new_points", run_id)
        seen = cursor if isinstance(cursor, _Seen) else _Seen()
        with self._lock:
            log = list(self._run(run_id).points)
        new = [p for p in log[seen.count :] if p.key in keys and p.key in seen.keys]
        for key in set(keys) - seen.keys:
            first = [p for p in log if p.key == key]
            points = window_of(window, key)
            new += first[-points:] if points else first
        self.points_read += len(new)
        new.sort(key=lambda p: (p.timestamp, p.step))
        return new, _Seen(len(log), seen.keys | set(keys))

    def read_new_points_many(
        self, reads: Sequence[PointsRead], *, window: int | Window | None = None
    ) -> list[tuple[list[MetricPoint], Cursor]]:
        return [self.read_new_points(r, keys, c, window=window) for r, keys, c in reads]

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._call("set_tags", run_id)
        with self._lock:
            self._run(run_id).info.tags.update({k: str(v) for k, v in tags.items()})

    def delete_tag(self, run_id: str, key: str) -> None:
        self._call("delete_tag", run_id)
        with self._lock:
            self._run(run_id).info.tags.pop(key, None)

    def log_metric(self, run_id: str, key: str, value: float, step: int) -> None:
        self._call("log_metric", run_id)
        point = MetricPoint(key, int(step), float(value), _now_ms())
        with self._lock:
            run = self._run(run_id)
            run.points.append(point)
            run.info.latest_metrics[key] = point.value
            run.info.latest_steps[key] = point.step

    def log_metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.log_metric(run_id, key, value, step)

    def read_json(self, run_id: str, path: str) -> Any | None:
        self._call("read_json", run_id)
        with self._lock:
            raw = self._run(run_id).artifacts.get(path)
        if raw is None:
            return None
        return strict_json.parse(raw, f"artifact {path} of run {run_id}")

    def write_json(self, run_id: str, path: str, payload: Any) -> None:
        self._call("write_json", run_id)
        self.put_text(run_id, path, json.dumps(payload, allow_nan=False))

    def write_file(self, run_id: str, path: str, data: bytes) -> None:
        self._call("write_file", run_id)
        with self._lock:
            self._run(run_id).artifacts[path] = bytes(data)

    def list_artifacts(self, run_id: str, directory: str) -> list[str]:
        self._call("list_artifacts", run_id)
        prefix = directory.rstrip("/") + "/" if directory else ""
        with self._lock:
            names = self._run(run_id).artifacts
            return sorted(p for p in names if p.startswith(prefix) and "/" not in p[len(prefix) :])

    # ---- for tests ----------------------------------------------------------------------

    def put_text(self, run_id: str, path: str, text: str) -> None:
        """Store an artifact's raw text, valid JSON or not (a tampered file, say)."""
        with self._lock:
            self._run(run_id).artifacts[path] = text.encode("utf-8")

    def read_file(self, run_id: str, path: str) -> bytes | None:
        """An artifact's bytes, as a person downloading it would get them; None if absent."""
        with self._lock:
            return self._run(run_id).artifacts.get(path)

    def _call(self, operation: str, run_id: str | None = None) -> None:
        self.calls[operation] += 1
        if self.fault is not None:
            self.fault(operation, run_id)

    def _run(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise RunNotFound(f"no run {run_id!r} on this tracker")
        return run


def _copy(info: RunInfo) -> RunInfo:
    return RunInfo(
        info.run_id,
        info.name,
        info.experiment_id,
        info.status,
        info.start_time,
        tags=dict(info.tags),
        latest_metrics=dict(info.latest_metrics),
        latest_steps=dict(info.latest_steps),
        params=dict(info.params),
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


class MemoryBackend:
    """``memory://NAME``: one tracker per name in this process."""

    name = "memory"

    def __init__(self) -> None:
        self._trackers: dict[str, MemoryTracker] = {}
        self._lock = threading.Lock()

    def open(self, uri: str, *, fail_fast: bool = False) -> MemoryTracker:
        with self._lock:
            if uri not in self._trackers:
                self._trackers[uri] = MemoryTracker(uri)
            return self._trackers[uri]

    def current_run(self, run_id: str | None, uri: str | None) -> RunBinding | None:
        # A run in memory is only ever named explicitly: nothing logs to one by itself.
        if run_id is None or uri is None:
            return None
        return RunBinding(self.open(uri), run_id)

    def launch_env(self, uri: str, run_id: str | None) -> dict[str, str]:
        raise ValueError("an in-memory tracker lives in one process: it cannot be launched into")

    def default_uri(self) -> str | None:
        return None


BACKEND = MemoryBackend()
