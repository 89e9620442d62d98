"""The Weights & Biases backend of the ``Tracker`` protocol (``wandb://ENTITY/PROJECT``).

The contract's names map onto W&B's own places (``integrations.protocol`` names them):

- the managed flag is the run tag ``atm-managed``; the other tags the daemon and the command
  line write (the params version, the objective, the last intervention, the spec digest) are
  run tags ``NAME=VALUE``, written by a tags-only update that never touches the run's config
  or summary (W&B's live SDK in the training process would clobber those);
- the tags only the training client writes (heartbeat, acks, refusals) are ``atm/…`` keys of
  its own run's summary, written through the live ``wandb`` run of the process that owns it;
- each JSON artifact path is a version of one artifact per run and kind (``atm-spec-RUN``,
  ``atm-params-RUN``, ``atm-audit-RUN``), named by an alias (``params-v3``, ``decision-7``).
  The client logs the spec through its own run; params and audit records are logged through a
  writer run of the daemon's own (job type ``atm-daemon``), and the client marks the params
  version it applied as used by its run, so W&B's lineage shows who issued it and who applied
  it.

Reads go through one ``wandb.Api`` per process; metric points are read per key from the
step after the cursor. W&B's service retries HTTP 429 (honouring ``Retry-After``) and 5xx
itself; a call that still fails within the timeout becomes ``TrackerUnavailable``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
import wandb
from wandb.errors import CommError
from wandb.sdk import wandb_setup
from wandb.sdk.lib.service.service_connection import WandbApiFailedError

from integrations.protocol import (
    METRIC_PARAMS_VERSION,
    SPEC_PATH,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_MANAGED,
    WANDB_ARTIFACT_KINDS,
    WANDB_CLIENT_TAGS,
    WANDB_METRIC_APPLIED_STEP,
    WANDB_TAG_MANAGED,
    WANDB_TAG_MAX,
    WANDB_WRITER_JOB_TYPE,
    params_path,
    wandb_alias,
    wandb_key,
    wandb_path,
)
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

SCHEME = "wandb://"
HOSTED_URL = "https://api.wandb.ai"
HOSTED_POLL_INTERVAL_S = 30.0
# Each API call waits at most this long (W&B's service retries 429 and 5xx within it).
API_TIMEOUT_S = 30
# How long a summary write waits to show on the server (the live SDK uploads it every few
# seconds).
SUMMARY_VISIBLE_TIMEOUT_S = 60.0
_STATUS = {
    "running": "RUNNING",
    "pending": "RUNNING",
    "finished": "FINISHED",
    "crashed": "FAILED",
    "failed": "FAILED",
    "killed": "KILLED",
}
_TAGS_ONLY = """
mutation UpsertBucket($id: String!, $tags: [String!]) {
    upsertBucket(input: {id: $id, tags: $tags}) { bucket { id tags } }
}
"""
# A scan reads the steps of one key in pages of this many steps.
_PAGE = 1000
# Marks the continuation of a value too long for one run tag: NAME~1=…
_CONTINUED = "~"
_METADATA_FIELDS = ("version", "parent_version", "source", "values", "decision_id", "status")


def suited_poll_interval() -> float | None:
    """The client's poll interval against W&B's hosted service (its read limits are per user
    and project); None for a server of one's own."""
    base = os.environ.get("WANDB_BASE_URL", HOSTED_URL)
    return HOSTED_POLL_INTERVAL_S if base.rstrip("/") == HOSTED_URL else None


def parse_uri(uri: str) -> tuple[str | None, str]:
    """``wandb://ENTITY/PROJECT`` (or ``wandb://PROJECT``: the API key's default entity)."""
    rest = uri.removeprefix(SCHEME).strip("/")
    parts = rest.split("/")
    if not uri.startswith(SCHEME) or not rest or len(parts) > 2 or not all(parts):
        raise ValueError(
            f"W&B tracking URI {uri!r} is not of the form wandb://ENTITY/PROJECT "
            "(or wandb://PROJECT)"
        )
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


class _Steps(Cursor):
    """The last step read of each metric key: the next read starts after it."""

    def __init__(self, last: dict[str, int] | None = None) -> None:
        self.last = dict(last or {})


_api: Any = None
_api_lock = threading.Lock()


def shared_api() -> Any:
    """This process's one ``wandb.Api`` (each starts a service process of its own)."""
    global _api
    with _api_lock:
        if _api is None:
            _api = wandb.Api(timeout=API_TIMEOUT_S)
        return _api


def _active_runs() -> list[Any]:
    """The runs this process started and has not finished, newest last (``wandb.run`` is
    only one of them when some were started with ``reinit="create_new"``)."""
    setup = wandb_setup.singleton()
    with setup._active_runs_lock:
        return list(setup._active_runs)


def live_run(run_id: str) -> Any | None:
    """The run ``run_id`` if this process owns it (started it with ``wandb.init``)."""
    current = wandb.run
    if current is not None and current.id == run_id:
        return current
    return next((r for r in reversed(_active_runs()) if r.id == run_id), None)


def script_run() -> Any | None:
    """The run this process's script logs to: ``wandb.run``, else its newest active run
    that is not a writer of the manager's own."""
    if wandb.run is not None:
        return wandb.run
    runs = [r for r in _active_runs() if r.job_type != WANDB_WRITER_JOB_TYPE]
    return runs[-1] if runs else None


class WandbTracker:
    """A ``Tracker`` over a W&B project: one ``wandb.Api`` for reads and tag updates, the
    training process's live run for what it owns, a writer run for the daemon's artifacts."""

    # Tags are one list, rewritten whole: two replicas could each read their own lease back.
    leases = False

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._entity, self.project = parse_uri(uri)
        self._runs: dict[str, Any] = {}
        self._tags_lock = threading.Lock()

    # ---- where things are ---------------------------------------------------------------

    @property
    def entity(self) -> str:
        if self._entity is None:
            with _translated():
                self._entity = shared_api().default_entity
        assert self._entity is not None
        return self._entity

    def _path(self, run_id: str) -> str:
        return f"{self.entity}/{self.project}/{run_id}"

    def _artifact(self, run_id: str, path: str) -> tuple[str, str]:
        """The artifact type and name that hold ``path`` (a path or a directory) of a run."""
        directory = path if path in WANDB_ARTIFACT_KINDS else path.rpartition("/")[0]
        kind = WANDB_ARTIFACT_KINDS.get(directory)
        if kind is None:
            raise ValueError(f"{path!r} is not an artifact path of the contract")
        return kind, f"{kind}-{run_id}"

    def _run(self, run_id: str) -> Any:
        """The run, freshly loaded (one request)."""
        with _translated(run_id):
            run = self._runs.get(run_id)
            if run is None:
                # The API keeps the runs it was asked for; another tracker of this process
                # may have had this one loaded long ago.
                run = shared_api().run(self._path(run_id))
                self._runs[run_id] = run
            run.load(force=True)
        return run

    # ---- reads --------------------------------------------------------------------------

    def ping(self) -> bool:
        base = os.environ.get("WANDB_BASE_URL", HOSTED_URL).rstrip("/")
        try:
            response = requests.post(
                f"{base}/graphql",
                json={"query": "query Viewer { viewer { id } }"},
                auth=("api", os.environ.get("WANDB_API_KEY", "")),
                timeout=2,
            )
        except requests.RequestException:
            return False
        return response.status_code < 500 and response.status_code != 429

    def get_run(self, run_id: str) -> RunInfo:
        return self._info(self._run(run_id))

    def find_managed_runs(
        self, experiments: list[str] | None = None, *, finished: bool = False
    ) -> list[RunInfo]:
        if experiments is not None and self.project not in experiments:
            return []
        managed: dict[str, Any] = {"tags": {"$in": [WANDB_TAG_MANAGED]}}
        return self._list(managed if finished else {**managed, "state": "running"})

    def _list(self, filters: dict[str, Any] | None) -> list[RunInfo]:
        with _translated():
            api = shared_api()
            with _api_lock:
                api.flush()  # api.runs() keeps its listings: ask the server again
            try:
                runs = list(api.runs(f"{self.entity}/{self.project}", filters=filters))
            except ValueError as exc:
                if "Could not find project" in str(exc) or "not found" in str(exc).lower():
                    return []
                raise
        for run in runs:
            self._runs[run.id] = run
        return [self._info(r) for r in runs]

    def list_runs(self, experiment: str) -> list[RunInfo]:
        """Every run of the project (a W&B project is what an experiment is elsewhere)."""
        return self._list(None) if experiment == self.project else []

    def read_new_points(
        self,
        run_id: str,
        keys: list[str],
        cursor: Cursor | None,
        *,
        window: int | Window | None = None,
    ) -> tuple[list[MetricPoint], Cursor]:
        run = self._run(run_id)
        after = _Steps(cursor.last if isinstance(cursor, _Steps) else None)
        found: list[MetricPoint] = []
        with _translated(run_id):
            last_step = int(run.lastHistoryStep)
            for key in keys:
                if key in after.last:
                    points = self._scan(run, key, after.last[key] + 1, last_step)
                elif (last := window_of(window, key)) is None:
                    points = self._scan(run, key, 0, last_step)
                else:
                    points = self._last_points(run, key, last, last_step)
                if points:
                    after.last[key] = max(p.step for p in points)
                found += points
        return sorted(found, key=lambda p: (p.timestamp, p.step)), after

    def read_new_points_many(
        self, reads: Sequence[PointsRead], *, window: int | Window | None = None
    ) -> list[tuple[list[MetricPoint], Cursor]]:
        return [self.read_new_points(r, keys, c, window=window) for r, keys, c in reads]

    def _last_points(self, run: Any, key: str, window: int, last_step: int) -> list[MetricPoint]:
        """The last ``window`` points of ``key``: a recent range of steps, widened until it
        holds that many or reaches the first step."""
        span = window
        while True:
            start = max(0, last_step - span + 1)
            points = self._scan(run, key, start, last_step)
            if len(points) >= window or start == 0:
                return points[-window:]
            span = widen(span, len(points), window)

    def _scan(self, run: Any, key: str, start: int, last_step: int) -> list[MetricPoint]:
        """The points of ``key`` from step ``start`` to the run's last step."""
        if start > last_step:
            return []
        column = wandb_key(key)
        # The params version marker carries the training step it was applied at.
        columns = [column, "_timestamp"]
        if key == METRIC_PARAMS_VERSION:
            columns.append(WANDB_METRIC_APPLIED_STEP)
        points = []
        for row in run.scan_history(keys=columns, min_step=start, page_size=_PAGE):
            value = row.get(column)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            step = row.get(WANDB_METRIC_APPLIED_STEP, row.get("_step", 0))
            stamp = row.get("_timestamp")
            points.append(
                MetricPoint(
                    key=key,
                    step=int(step),
                    value=float(value),
                    timestamp=int(float(stamp) * 1000) if stamp else int(row.get("_step", 0)),
                )
            )
        return points

    def _info(self, run: Any) -> RunInfo:
        tags = _decode_tags(list(run.tags or []))
        if WANDB_TAG_MANAGED in (run.tags or []):
            tags[TAG_MANAGED] = "true"
        summary = dict(run.summary_metrics or {})
        for name in WANDB_CLIENT_TAGS:
            if (value := summary.get(wandb_key(name))) is not None:
                tags[name] = _text(value)
        metrics = {
            k: float(v)
            for k, v in summary.items()
            if not k.startswith(("_", "atm/"))
            and isinstance(v, int | float)
            and not isinstance(v, bool)
        }
        # The one contract metric among the summary's atm/ keys: the params version applied.
        marker = summary.get(wandb_key(METRIC_PARAMS_VERSION))
        if isinstance(marker, int | float) and not isinstance(marker, bool):
            metrics[METRIC_PARAMS_VERSION] = float(marker)
        config = {k: str(v) for k, v in (run.config or {}).items() if _scalar(v)}
        return RunInfo(
            run_id=run.id,
            name=run.name or run.id,
            experiment_id=self.project,
            status=_STATUS.get(run.state, str(run.state).upper()),
            start_time=_millis(getattr(run, "created_at", None)),
            tags=tags,
            latest_metrics=metrics,
            params=config,
        )

    # ---- tags ---------------------------------------------------------------------------

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        own = {k: str(v) for k, v in tags.items() if k in WANDB_CLIENT_TAGS}
        shared = {k: str(v) for k, v in tags.items() if k not in WANDB_CLIENT_TAGS}
        if own:
            self._write_summary(run_id, own)
        if shared:
            self._update_run_tags(run_id, values=shared)
        if TAG_CLIENT_APPLIED_VERSION in own:
            self._mark_used(run_id, int(own[TAG_CLIENT_APPLIED_VERSION]))

    def delete_tag(self, run_id: str, key: str) -> None:
        if key in WANDB_CLIENT_TAGS:
            run = self._own_run(run_id, key)
            summary_key = wandb_key(key)
            if summary_key in dict(run.summary):
                del run.summary[summary_key]
            self._await_summary(run_id, {summary_key: None})
            return
        self._update_run_tags(run_id, delete=key)

    def _write_summary(self, run_id: str, values: dict[str, str]) -> None:
        run = self._own_run(run_id, next(iter(values)))
        converted = {wandb_key(k): _number(v) for k, v in values.items()}
        run.summary.update(converted)
        self._await_summary(run_id, converted)

    def _own_run(self, run_id: str, key: str) -> Any:
        run = live_run(run_id)
        if run is None:
            raise TrackerError(
                f"on W&B, {key} is kept in the run's own summary and only the training process "
                f"that logs to run {run_id!r} writes it"
            )
        return run

    def _await_summary(self, run_id: str, expected: dict[str, Any]) -> None:
        """Wait until the server shows the summary keys just written (None: removed).

        The live SDK uploads its summary every few seconds; waiting makes a write here
        complete as a tag write is: a reader that sees what is written after it (the managed
        tag after the heartbeat, an ack after its marker) sees it too."""
        deadline = time.monotonic() + SUMMARY_VISIBLE_TIMEOUT_S
        while True:
            summary = self._run(run_id).summary_metrics or {}
            if all(summary.get(k) == v for k, v in expected.items()):
                return
            if time.monotonic() > deadline:
                log.warning("run %s: its summary is not on W&B yet; going on", run_id)
                return
            time.sleep(0.25)

    def _update_run_tags(
        self, run_id: str, *, values: dict[str, str] | None = None, delete: str | None = None
    ) -> None:
        """Change the run's tags in one tags-only update (config and summary untouched).

        The update sends the whole list: writes from this process go one at a time, so none
        undoes another (a renewed lease and a new version, say)."""
        with self._tags_lock:
            self._replace_tags(run_id, values or {}, delete)

    def _replace_tags(self, run_id: str, changed: dict[str, str], delete: str | None) -> None:
        run = self._run(run_id)
        names = {*changed, *([delete] if delete else [])}
        kept = [t for t in run.tags or [] if not _names_tag(t, names)]
        for name, value in changed.items():
            if name == TAG_MANAGED and value == "true":
                kept.append(WANDB_TAG_MANAGED)
            else:
                kept += _encode_tags(name, value)
        with _translated(run_id):
            shared_api()._service_api.execute_graphql(
                _TAGS_ONLY, {"id": run.storage_id, "tags": kept}
            )

    # ---- metrics ------------------------------------------------------------------------

    def log_metric(self, run_id: str, key: str, value: float, step: int) -> None:
        self.log_metrics(run_id, {key: value}, step)

    def log_metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        run = self._own_run(run_id, next(iter(values), "a metric"))
        row = {wandb_key(k): float(v) for k, v in values.items()}
        if METRIC_PARAMS_VERSION in values:
            row[WANDB_METRIC_APPLIED_STEP] = step
        with _translated(run_id):
            if METRIC_PARAMS_VERSION in values and run.step == 0:
                # Nothing logged yet: the marker's own row, at the step it was applied.
                run.log(row, step=step, commit=True)
            else:
                # Join the row the script is building rather than move its steps (W&B's
                # steps only go forward, and a step logged ahead would drop the script's).
                run.log(row, commit=False)

    # ---- artifacts ----------------------------------------------------------------------

    def read_json(self, run_id: str, path: str) -> Any | None:
        where = f"artifact {path} of run {run_id}"
        raw = self._read_bytes(run_id, path, where)
        if raw is None:
            return None
        return strict_json.parse(raw, where)

    def _read_bytes(self, run_id: str, path: str, where: str | None = None) -> bytes | None:
        """The artifact's bytes; with ``where``, refused (CorruptArtifact) before download
        when its manifest gives a size over the limit."""
        _, name = self._artifact(run_id, path)
        reference = f"{self.entity}/{self.project}/{name}:{wandb_alias(path)}"
        with _translated(run_id):
            try:
                artifact = shared_api().artifact(reference)
            except (CommError, ValueError) as exc:
                if _is_missing(exc):
                    return None
                raise
            entry = artifact.get_entry(_file_name(path))
            size = getattr(entry, "size", None)
            if where and isinstance(size, int) and (refused := strict_json.too_large(size, where)):
                raise refused
            with tempfile.TemporaryDirectory() as tmp:
                return Path(entry.download(root=tmp)).read_bytes()

    def write_json(self, run_id: str, path: str, payload: Any) -> None:
        text = json.dumps(payload, allow_nan=False)
        metadata = {"path": path}
        if isinstance(payload, dict):
            metadata |= {k: payload[k] for k in _METADATA_FIELDS if k in payload}
        self.put_text(run_id, path, text, metadata)

    def put_text(
        self, run_id: str, path: str, text: str, metadata: dict[str, Any] | None = None
    ) -> None:
        """Store an artifact's text, as a new version of its kind's artifact with the alias
        that names ``path``, logged by the run that writes it."""
        self._log_file(run_id, path, text.encode("utf-8"), metadata)

    def write_file(self, run_id: str, path: str, data: bytes) -> None:
        self._log_file(run_id, path, data, None)

    def _log_file(
        self, run_id: str, path: str, data: bytes, metadata: dict[str, Any] | None
    ) -> None:
        kind, name = self._artifact(run_id, path)
        artifact = wandb.Artifact(name, type=kind)
        artifact.metadata = metadata or {"path": path}
        with artifact.new_file(_file_name(path), mode="wb") as f:
            f.write(data)
        # The spec is the training run's own output; params and audit records are the
        # daemon's, logged through its writer run.
        owner = live_run(run_id) if path == SPEC_PATH else None
        writer = owner or _writer_run(self.entity, self.project)
        with _translated(run_id):
            writer.log_artifact(artifact, aliases=[wandb_alias(path)]).wait()

    def list_artifacts(self, run_id: str, directory: str) -> list[str]:
        kind, name = self._artifact(run_id, directory)
        qualified = f"{self.entity}/{self.project}/{name}"
        with _translated(run_id):
            api = shared_api()
            # A listing of an artifact never logged fails to parse instead of being empty.
            if not api.artifact_collection_exists(qualified, kind):
                return []
            versions = list(api.artifacts(kind, qualified))
        prefix = directory.rstrip("/") + "/"
        paths = {
            path
            for version in versions
            for alias in version.aliases
            if (path := wandb_path(alias)) and path.startswith(prefix)
        }
        return sorted(paths)

    def _mark_used(self, run_id: str, version: int) -> None:
        """Record in the training run the params ``version`` it applied: the version as an
        input of the run (lineage) and its values in the run's config."""
        run = live_run(run_id)
        if run is None:
            return
        path = params_path(version)
        _, name = self._artifact(run_id, path)
        try:
            used = run.use_artifact(f"{self.entity}/{self.project}/{name}:{wandb_alias(path)}")
            values = (used.metadata or {}).get("values")
            if isinstance(values, dict):
                run.config.update(values, allow_val_change=True)
        except Exception as exc:  # a record for people; the ack stands without it
            log.warning("run %s: could not record params v%d as used: %s", run_id, version, exc)


_writers: dict[tuple[str, str], Any] = {}
_writers_lock = threading.Lock()


def _writer_run(entity: str, project: str) -> Any:
    """The run of this process through which it logs the daemon's artifacts: one per
    process and project, so ``log_artifact`` never makes a throwaway run per write."""
    with _writers_lock:
        writer = _writers.get((entity, project))
        if writer is None or getattr(writer, "_is_finished", False):
            writer = wandb.init(
                entity=entity,
                project=project,
                job_type=WANDB_WRITER_JOB_TYPE,
                name=f"atm-daemon-{os.getpid()}",
                reinit="create_new",
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
            _writers[(entity, project)] = writer
        return writer


def finish_writers() -> None:
    """Finish this process's writer runs (a process that exits finishes them itself)."""
    with _writers_lock:
        writers = list(_writers.values())
        _writers.clear()
    for writer in writers:
        writer.finish()


def _file_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _names_tag(tag: str, names: set[str]) -> bool:
    if TAG_MANAGED in names and tag == WANDB_TAG_MANAGED:
        return True
    key, sep, _ = tag.partition("=")
    return bool(sep) and key.partition(_CONTINUED)[0] in names


def _encode_tags(name: str, value: str) -> list[str]:
    """``NAME=VALUE`` as W&B run tags: a value longer than one tag holds goes on in tags
    ``NAME~1=…``, ``NAME~2=…``."""
    tags, rest, part = [], value, 0
    while True:
        head = f"{name}=" if part == 0 else f"{name}{_CONTINUED}{part}="
        room = WANDB_TAG_MAX - len(head)
        if room < 1:
            raise TrackerError(f"tag name {name!r} leaves no room for a value in a W&B tag")
        tags.append(head + rest[:room])
        rest, part = rest[room:], part + 1
        if not rest:
            return tags


def _decode_tags(tags: list[str]) -> dict[str, str]:
    """The ``NAME=VALUE`` tags of the contract (``_encode_tags`` reversed)."""
    parts: dict[str, dict[int, str]] = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        name, _, part = key.partition(_CONTINUED)
        if sep and name.startswith("atm.") and (part == "" or part.isdigit()):
            parts.setdefault(name, {})[int(part or 0)] = value
    return {name: "".join(p[i] for i in sorted(p)) for name, p in parts.items()}


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)


def _number(text: str) -> Any:
    """A summary value as W&B charts it: a number when the text is one."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if isinstance(value, int) or math.isfinite(value):
            return value
    return text


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _millis(created: Any) -> int | None:
    if not created:
        return None
    try:
        return int(datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def _is_missing(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        words in text for words in ("not found", "could not find", "does not exist", "no such")
    )


@contextmanager
def _translated(run_id: str | None = None) -> Iterator[None]:
    """Turn W&B and network exceptions into the tracker's own."""
    try:
        yield
    except TrackerError:
        raise
    except (
        CommError,
        WandbApiFailedError,  # wandb-core gave up or did not answer in time
        requests.RequestException,
        ConnectionError,
        TimeoutError,
    ) as exc:
        if run_id is not None and _is_missing(exc):
            raise RunNotFound(f"no run {run_id!r} on this tracker") from exc
        raise TrackerUnavailable(f"W&B unreachable: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        if run_id is not None and _is_missing(exc):
            raise RunNotFound(f"no run {run_id!r} on this tracker") from exc
        raise TrackerError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from exc


class WandbBackend:
    """How a process finds the W&B run it logs to, and how a launched script is pointed at
    a W&B project."""

    name = "wandb"

    def open(self, uri: str, *, fail_fast: bool = False) -> Tracker:
        parse_uri(uri)
        return WandbTracker(uri)

    def current_run(self, run_id: str | None, uri: str | None) -> RunBinding | None:
        run = script_run() if run_id is None else live_run(run_id)
        if run is None and run_id is None:
            return None
        if run is not None:
            run_id = run.id
            uri = uri or f"{SCHEME}{run.entity}/{run.project}"
        uri = uri or self.default_uri()
        if uri is None or run_id is None:
            return None
        return RunBinding(WandbTracker(uri), run_id, poll_interval=suited_poll_interval())

    def launch_env(self, uri: str, run_id: str | None) -> dict[str, str]:
        entity, project = parse_uri(uri)
        env = {"WANDB_PROJECT": project}
        if entity:
            env["WANDB_ENTITY"] = entity
        if run_id:
            env["WANDB_RUN_ID"] = run_id
            env["WANDB_RESUME"] = "allow"
        return env

    def default_uri(self) -> str | None:
        project = os.environ.get("WANDB_PROJECT")
        if not project:
            return None
        entity = os.environ.get("WANDB_ENTITY")
        return f"{SCHEME}{entity}/{project}" if entity else f"{SCHEME}{project}"


BACKEND = WandbBackend()
