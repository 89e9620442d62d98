"""The MLflow backend of the ``Tracker`` protocol (server, sqlite or Databricks URIs).

A training process logs to MLflow's active run, or to ``MLFLOW_RUN_ID``'s; the manager writes
tags and JSON artifacts into that run with ``MlflowClient`` (never ``start_run`` on a run another
process owns: it would change the run's status). While a client manages the run, the points the
script logs through ``mlflow.log_metric(s)`` without a step go to the training step instead of
step 0 (``follow_steps``, below).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.tracking.fluent
import requests
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.service_pb2 import GetMetricHistoryBulkInterval
from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking import MlflowClient
from mlflow.utils.proto_json_utils import message_to_json

from integrations.protocol import TAG_MANAGED
from integrations.redact import redact
from integrations.trackers import strict_json
from integrations.trackers.base import (
    Cursor,
    MetricPoint,
    PointsRead,
    RunBinding,
    RunInfo,
    RunNotFound,
    Tracker,
    TrackerError,
    TrackerUnavailable,
    Window,
    widen,
    window_of,
)

log = logging.getLogger(__name__)

_MANAGED_FILTER = f"tags.`{TAG_MANAGED}` = 'true'"
_RUNNING_FILTER = " and attributes.status = 'RUNNING'"
# The step-range history read returns at most this many points per run and request, sampled
# evenly (first and last kept) when the range holds more; steps are 32-bit there.
_RANGE_MAX = 2500
_LAST_STEP = 2**31 - 1


class _Steps(Cursor):
    """The last step read of each metric key: the next read asks for the steps after it."""

    def __init__(self, last: dict[str, int] | None = None) -> None:
        self.last = dict(last or {})


class MlflowTracker:
    """A ``Tracker`` over ``MlflowClient``."""

    leases = True

    def __init__(self, uri: str) -> None:
        # Artifact downloads would draw a progress bar in the training process's output
        # at every poll that fetches a file.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.uri = uri
        self._client = MlflowClient(tracking_uri=uri)
        self._store = self._client._tracking_client.store
        self._repositories: dict[str, ArtifactRepository] = {}
        # Each run's metrics' latest steps, as the last listing or read of the run gave them:
        # a first read of a key starts its window there instead of asking the server.
        self._latest_steps: dict[str, dict[str, int]] = {}

    def _seen(self, runs: list[Any], *, listing: bool = False) -> list[RunInfo]:
        infos = [_run_info(r) for r in runs]
        if listing:
            # Runs no longer listed are forgotten: the memory follows the managed runs.
            self._latest_steps = {i.run_id: i.latest_steps for i in infos}
        else:
            self._latest_steps.update((i.run_id, i.latest_steps) for i in infos)
        return infos

    def _artifacts(self, run_id: str) -> ArtifactRepository:
        """The run's artifact store, looked up once per run (a run's artifact URI is fixed)."""
        repository = self._repositories.get(run_id)
        if repository is None:
            uri = self._client.get_run(run_id).info.artifact_uri
            repository = get_artifact_repository(uri, tracking_uri=self.uri)
            self._repositories[run_id] = repository
        return repository

    def ping(self) -> bool:
        if not self.uri.startswith(("http://", "https://")):
            return True
        try:
            return requests.get(self.uri.rstrip("/") + "/health", timeout=2).ok
        except requests.RequestException:
            return False

    def get_run(self, run_id: str) -> RunInfo:
        with _translated(run_id):
            run = self._client.get_run(run_id)
        return self._seen([run])[0]

    def find_managed_runs(
        self, experiments: list[str] | None = None, *, finished: bool = False
    ) -> list[RunInfo]:
        with _translated():
            experiment_ids = [
                e.experiment_id
                for e in _all_pages(self._client.search_experiments)
                if experiments is None or e.name in experiments
            ]
            runs = []
            # search_runs takes a bounded number of experiments per call, and pages.
            for i in range(0, len(experiment_ids), 100):
                runs += _all_pages(
                    self._client.search_runs,
                    experiment_ids[i : i + 100],
                    filter_string=_MANAGED_FILTER + ("" if finished else _RUNNING_FILTER),
                )
        return self._seen(runs, listing=True)

    def list_runs(self, experiment: str) -> list[RunInfo]:
        with _translated():
            experiment_id = self._experiment_id(experiment)
            if experiment_id is None:
                return []
            runs = _all_pages(self._client.search_runs, [experiment_id])
        return [_run_info(r) for r in runs]

    def _experiment_id(self, experiment: str) -> str | None:
        """The id of the experiment named ``experiment``, else of the one with that id (a
        run's ``experiment_id``), else None."""
        found = self._client.get_experiment_by_name(experiment)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self._client.get_experiment(experiment).experiment_id)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def read_new_points(
        self,
        run_id: str,
        keys: list[str],
        cursor: Cursor | None,
        *,
        window: int | Window | None = None,
    ) -> tuple[list[MetricPoint], Cursor]:
        return self.read_new_points_many([(run_id, keys, cursor)], window=window)[0]

    def read_new_points_many(
        self, reads: Sequence[PointsRead], *, window: int | Window | None = None
    ) -> list[tuple[list[MetricPoint], Cursor]]:
        # Runs that read a key from about the same step share one request for it (the server
        # takes up to 100 runs per range read); first reads of a key go one by one.
        cursors = [_Steps(c.last if isinstance(c, _Steps) else None) for _, _, c in reads]
        found: list[list[MetricPoint]] = [[] for _ in reads]
        shared: dict[str, list[int]] = {}
        for i, (run_id, keys, _) in enumerate(reads):
            for key in keys:
                if key in cursors[i].last:
                    shared.setdefault(key, []).append(i)
                else:
                    with _translated(run_id):
                        found[i] += self._first_read(run_id, key, window_of(window, key))
        for key, members in shared.items():
            for group in _neighbours({i: cursors[i].last[key] for i in members}):
                start = min(cursors[i].last[key] for i in group) + 1
                ids = [reads[i][0] for i in group]
                with _translated():
                    points = self._range_many(ids, key, start, _LAST_STEP)
                for i in group:
                    after = cursors[i].last[key]
                    found[i] += [p for p in points.get(reads[i][0], []) if p.step > after]
        results = []
        for i, (_, keys, _) in enumerate(reads):
            for key in keys:
                steps = [p.step for p in found[i] if p.key == key]
                if steps:
                    cursors[i].last[key] = max(steps)
            results.append((sorted(found[i], key=lambda p: (p.timestamp, p.step)), cursors[i]))
        return results

    def _first_read(self, run_id: str, key: str, window: int | None) -> list[MetricPoint]:
        """A key's whole history, or its last ``window`` points: a few bounded reads that
        search for a step range holding at least ``window`` points, few enough that the
        server returns them all."""
        if window is None:
            return self._history(run_id, key)
        end = self._latest_steps.get(run_id, {}).get(key)
        if end is None:
            # Not in a listing yet: ask the server (it keeps the last point of a sampled read;
            # it looks at every step of the key to sample them, which the listing spares it).
            last = self._range(run_id, key, 0, _LAST_STEP, limit=1)
            if not last:
                return []
            end = last[0].step
        too_few, too_many = 0, None  # spans known to hold too few points, or too many
        span = window
        found: list[MetricPoint] = []
        while too_many is None or too_many - too_few > 1:
            start = max(0, end - span + 1)
            found = self._range(run_id, key, start, end)
            if len(found) >= _RANGE_MAX:
                too_many = span
            elif len(found) >= window or start == 0:
                break
            else:
                too_few = span
            # A sparse key: look as far back as its density asks; bounds found: halve between.
            if too_many is None:
                span = widen(span, len(found), window)
            else:
                span = (too_few + too_many) // 2
        return found[-window:]

    def _range(
        self, run_id: str, key: str, start: int, end: int, *, limit: int = _RANGE_MAX
    ) -> list[MetricPoint]:
        return self._range_many([run_id], key, start, end, limit=limit).get(run_id, [])

    def _range_many(
        self, run_ids: list[str], key: str, start: int, end: int, *, limit: int = _RANGE_MAX
    ) -> dict[str, list[MetricPoint]]:
        """Points of ``key`` at steps ``start``..``end`` of each run, in step order (at most
        ``limit`` per run, sampled evenly by the server beyond that)."""
        start, end = min(start, _LAST_STEP), min(end, _LAST_STEP)
        if start > end:
            return {}
        if isinstance(self._store, RestStore):
            body = message_to_json(
                GetMetricHistoryBulkInterval(
                    run_ids=run_ids,
                    metric_key=key,
                    start_step=start,
                    end_step=end,
                    max_results=limit,
                )
            )
            found = self._store._call_endpoint(GetMetricHistoryBulkInterval, body).metrics
        elif _reads_ranges(self._store):  # a database store (sqlite:///…) read directly
            found = self._store.get_metric_history_bulk_interval(run_ids, key, limit, start, end)
        else:
            found = [
                _WithRun(run_id, m)
                for run_id in run_ids
                for m in self._client.get_metric_history(run_id, key)
                if start <= m.step <= end
            ]
        by_run: dict[str, list[MetricPoint]] = {}
        for m in found:
            by_run.setdefault(m.run_id, []).append(_point(m))
        return {r: _in_order(points) for r, points in by_run.items()}

    def _history(self, run_id: str, key: str) -> list[MetricPoint]:
        return [_point(m) for m in self._client.get_metric_history(run_id, key)]

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        # One request: a reader never sees some of the tags without the others.
        with _translated(run_id):
            self._client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def delete_tag(self, run_id: str, key: str) -> None:
        if key not in self.get_run(run_id).tags:
            return
        with _translated(run_id):
            self._client.delete_tag(run_id, key)

    def log_metric(self, run_id: str, key: str, value: float, step: int) -> None:
        with _translated(run_id):
            self._client.log_metric(run_id, key, value, step=step)

    def log_metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        with _translated(run_id):
            self._client.log_batch(run_id, metrics=metrics)

    def read_json(self, run_id: str, path: str) -> Any | None:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "artifact.json"
            with _translated(run_id):
                repository = self._artifacts(run_id)
            try:
                # One request: the file itself, from the run's artifact store.
                repository._download_file(path, str(local))
            except requests.HTTPError as exc:
                if exc.response is not None and exc.response.status_code == 404:
                    return None
                raise TrackerUnavailable(redact(f"tracker unreachable: {exc}")) from exc
            except (MlflowException, requests.RequestException, OSError) as exc:
                # A store that reports a missing file some other way: a listing tells
                # "absent" from "failed".
                parent = path.rsplit("/", 1)[0] if "/" in path else ""
                if path not in self.list_artifacts(run_id, parent):
                    return None
                raise TrackerError(
                    redact(f"cannot read artifact {path} of run {run_id}: {exc}")
                ) from exc
            where = f"artifact {path} of run {run_id}"
            # Sized before it is read into memory and parsed.
            if (refused := strict_json.too_large(local.stat().st_size, where)) is not None:
                raise refused
            raw = local.read_bytes()
        return strict_json.parse(raw, where)

    def write_json(self, run_id: str, path: str, payload: Any) -> None:
        # Strict JSON, as every reader parses it: a non-finite number fails here, not there.
        text = json.dumps(payload, allow_nan=False, indent=2)
        with _translated(run_id):
            self._client.log_text(run_id, text, path)

    def write_file(self, run_id: str, path: str, data: bytes) -> None:
        directory, _, name = path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            local.write_bytes(data)
            with _translated(run_id):
                self._artifacts(run_id).log_artifact(str(local), directory or None)

    def list_artifacts(self, run_id: str, directory: str) -> list[str]:
        with _translated(run_id):
            files = self._artifacts(run_id).list_artifacts(directory or None)
        return [f.path for f in files if not f.is_dir]


@dataclass(frozen=True)
class _WithRun:
    """A metric point and its run, as the range read returns them."""

    run_id: str
    metric: Metric

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metric, name)


# Runs that share one range read: at most this many, read from steps at most this far apart
# (the points before a run's own cursor are read and dropped).
_SHARED_READ_RUNS = 100
_SHARED_READ_SPREAD = 1000


def _neighbours(steps: dict[int, int]) -> list[list[int]]:
    """The reads in ``steps`` (read index → the step it reads after) in groups of runs that
    read from about the same step."""
    groups: list[list[int]] = []
    for i in sorted(steps, key=steps.__getitem__):
        group = groups[-1] if groups else None
        if (
            group
            and len(group) < _SHARED_READ_RUNS
            and steps[i] - steps[group[0]] <= _SHARED_READ_SPREAD
        ):
            group.append(i)
        else:
            groups.append([i])
    return groups


def _all_pages(search: Any, *args: Any, **kwargs: Any) -> list[Any]:
    """Every result of an MLflow search, page by page (a page holds at most 1,000)."""
    found: list[Any] = []
    token = None
    while True:
        page = search(*args, max_results=1000, page_token=token, **kwargs)
        found += page
        token = page.token
        if not token:
            return found


def _reads_ranges(store: object) -> bool:
    # The generic implementation reads whole histories and samples them here; only stores
    # with their own do a step-range read.
    own = type(store).get_metric_history_bulk_interval  # type: ignore[attr-defined]
    return own is not AbstractStore.get_metric_history_bulk_interval


def _in_order(points: Iterable[MetricPoint]) -> list[MetricPoint]:
    return sorted(points, key=lambda p: (p.step, p.timestamp))


def _point(m: Any) -> MetricPoint:
    return MetricPoint(key=m.key, step=int(m.step), value=float(m.value), timestamp=m.timestamp)


def _run_info(run: Any) -> RunInfo:
    return RunInfo(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        experiment_id=run.info.experiment_id,
        status=run.info.status,
        start_time=run.info.start_time,
        tags=dict(run.data.tags),
        latest_metrics=dict(run.data.metrics),
        latest_steps={m.key: int(m.step) for m in run.data._metric_objs},
        params=dict(run.data.params),
    )


class _translated:
    """Turn MLflow and network exceptions into the tracker's own."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, TrackerError):
            return False
        if isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RunNotFound(f"no run {self.run_id!r} on this tracker") from exc
        if isinstance(exc, RestException):
            raise TrackerError(redact(str(exc).splitlines()[0])) from exc
        if isinstance(exc, MlflowException):
            # MLflow reports a request it could not complete (connection refused, timeouts,
            # retries exhausted) as a plain MlflowException whose text says so.
            text = redact(str(exc))
            if "API request" in text or "Max retries" in text or "Connection" in text:
                raise TrackerUnavailable(f"tracker unreachable: {text.splitlines()[0]}") from exc
            raise TrackerError(text.splitlines()[0] if text else repr(exc)) from exc
        if isinstance(exc, requests.RequestException | ConnectionError | TimeoutError):
            raise TrackerUnavailable(redact(f"tracker unreachable: {exc}")) from exc
        return False


# ---- metrics a script logs without a step ------------------------------------------------
#
# ``mlflow.log_metric(key, value)`` and ``mlflow.log_metrics(values)`` without a step record
# every point at step 0, and the manager reads a run's metrics by step range from where it last
# read: such a run would look as if it never logged again after its first evaluation. While a
# client manages the run in this process, those two functions (wrapped in ``mlflow`` and
# ``mlflow.tracking.fluent``, where scripts call them) give such points the training step the
# client last saw, and the user is told once. Points logged with a step, to another run, or
# through ``MlflowClient`` are left as they are, and so is everything once the client stops. A
# script that bound ``log_metric`` to a name of its own before the client started (``from
# mlflow import log_metric``) calls the original, and its points stay at step 0.

# Runs managed in this process → the training step their client last saw (None: none yet).
_training_steps: dict[str, Callable[[], int | None]] = {}
_told: set[str] = set()
_lock = threading.Lock()
# Where each wrapped function takes its step as a positional argument.
_STEP_POSITION = {"log_metric": 2, "log_metrics": 1}


def follow_steps(run_id: str, training_step: Callable[[], int | None]) -> Callable[[], None]:
    """Record ``run_id``'s step-less points at ``training_step()``; returns the undo."""
    _wrap_fluent_api()
    with _lock:
        _training_steps[run_id] = training_step

    def stop() -> None:
        with _lock:
            if _training_steps.get(run_id) is training_step:
                del _training_steps[run_id]

    return stop


def _wrap_fluent_api() -> None:
    for name, position in _STEP_POSITION.items():
        for module in (mlflow, mlflow.tracking.fluent):
            original = getattr(module, name)
            if not hasattr(original, "__atm_wrapped__"):
                setattr(module, name, _with_training_step(original, position))


def _with_training_step(original: Callable[..., Any], position: int) -> Callable[..., Any]:
    @functools.wraps(original)
    def logged(*args: Any, **kwargs: Any) -> Any:
        if len(args) <= position and kwargs.get("step") is None:
            step = _step_for(kwargs.get("run_id"), _keys(args, kwargs))
            if step is not None:
                kwargs["step"] = step
        return original(*args, **kwargs)

    logged.__atm_wrapped__ = original  # type: ignore[attr-defined]
    return logged


def _keys(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    first = args[0] if args else kwargs.get("key", kwargs.get("metrics"))
    return list(first) if isinstance(first, dict) else [str(first)]


def _step_for(run_id: str | None, keys: Iterable[str]) -> int | None:
    """The training step for a step-less point of ``run_id`` (None: the run the call logs to),
    or None to leave the point as MLflow records it."""
    try:
        if run_id is None:
            active = mlflow.active_run()
            run_id = active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")
        source = _training_steps.get(run_id) if run_id else None
        step = source() if source is not None else None
    except Exception:  # the script's own logging must go on whatever happens here
        log.debug("atm: no training step for a step-less metric", exc_info=True)
        return None
    if step is None:
        return None
    with _lock:
        first = run_id not in _told
        _told.add(run_id)
    if first:
        log.warning(
            "atm: %s logged without step=; recorded at the training step (%d now) so the "
            "manager can follow the run (pass step= to choose the step yourself)",
            ", ".join(keys),
            step,
        )
    return step


class MlflowBackend:
    """How a process finds its MLflow run, and how a launched script is pointed at one."""

    name = "mlflow"

    def open(self, uri: str, *, fail_fast: bool = False) -> Tracker:
        if fail_fast:
            # MLflow reads these at each request; its defaults retry for minutes.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        return MlflowTracker(uri)

    def current_run(self, run_id: str | None, uri: str | None) -> RunBinding | None:
        if run_id is None:
            active = mlflow.active_run()
            run_id = active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")
        if run_id is None:
            return None
        return RunBinding(
            MlflowTracker(uri or mlflow.get_tracking_uri()),
            run_id,
            follow_steps=functools.partial(follow_steps, run_id),
        )

    def launch_env(self, uri: str, run_id: str | None) -> dict[str, str]:
        env = {"MLFLOW_TRACKING_URI": uri}
        if run_id:
            env["MLFLOW_RUN_ID"] = run_id
        return env

    def default_uri(self) -> str | None:
        return os.environ.get("MLFLOW_TRACKING_URI") or None


BACKEND = MlflowBackend()
