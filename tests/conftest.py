"""Shared fixtures: a real MLflow server on loopback and runs on it, an in-memory tracker,
and each tracker backend in turn."""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from integrations.protocol import METRIC_PARAMS_VERSION, WANDB_METRIC_APPLIED_STEP, wandb_key
from integrations.trackers import Tracker, open_tracker
from integrations.trackers.memory import MemoryTracker
from manager_daemon.mlflow_server import MlflowServer, start_server
from tests.helpers import wait_for
from tests.openai_replay import ReplayServer
from tests.wandb_fixtures import wandb_server  # noqa: F401  (a fixture)

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Tests fail fast instead of waiting out MLflow's default retries against a stopped server.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = start_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tracking_uri(mlflow_server: MlflowServer) -> str:
    return mlflow_server.uri


@pytest.fixture
def tracker(tracking_uri: str) -> Tracker:
    return open_tracker(tracking_uri)


@pytest.fixture
def new_run(tracking_uri: str, request: pytest.FixtureRequest):
    """A factory of fresh RUNNING runs on the test server."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tests") or None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("tests")

    def make(name: str | None = None) -> str:
        run = client.create_run(experiment_id, run_name=name or request.node.name[:60])
        return run.info.run_id

    return make


@pytest.fixture
def replay() -> Iterator[ReplayServer]:
    """An OpenAI-compatible endpoint on loopback that replays scripted answers."""
    server = ReplayServer()
    yield server
    server.close()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@dataclass
class Backend:
    """A tracker of one kind for a test, with what a training script would do to it."""

    name: str
    uri: str
    tracker: Tracker
    # The experiment this test's runs are in: a daemon told to watch it sees only them.
    experiment: str
    new_run: Callable[..., str]
    # A raw text artifact (a tampered or truncated file, say).
    put_text: Callable[[str, str, str], None]

    # Many steps' metrics at once, in as few requests as the tracker allows.
    log_history: Callable[[str, list[tuple[int, dict[str, float]]]], None]
    # An artifact's bytes as a person downloading it gets them (None if absent).
    read_file: Callable[[str, str], bytes | None]

    def log_metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        """Metrics logged at ``step``, as the script logs them."""
        self.tracker.log_metrics(run_id, values, step)


def _memory_backend() -> Backend:
    tracker = open_tracker(f"memory://{uuid.uuid4().hex}")
    assert isinstance(tracker, MemoryTracker)

    def log_history(run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in rows:
            tracker.log_metrics(run_id, values, step)

    experiment = "default"
    return Backend(
        "memory",
        tracker.uri,
        tracker,
        experiment,
        lambda name="": tracker.create_run(name, experiment),
        tracker.put_text,
        log_history,
        tracker.read_file,
    )


def _mlflow_backend(request: pytest.FixtureRequest) -> Backend:
    uri = request.getfixturevalue("tracking_uri")
    client = MlflowClient(uri)
    experiment = f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(experiment)

    def make(name: str | None = None) -> str:
        return client.create_run(experiment_id, run_name=name or request.node.name[:60]).info.run_id

    def log_history(run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now + step, step)
            for step, values in rows
            for key, value in values.items()
        ]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])

    return Backend(
        "mlflow",
        uri,
        open_tracker(uri),
        experiment,
        make,
        lambda run_id, path, text: client.log_text(run_id, text, path),
        log_history,
        lambda run_id, path: _download(client, run_id, path),
    )


def _download(client: MlflowClient, run_id: str, path: str) -> bytes | None:
    parent = path.rpartition("/")[0] or None
    if path not in {f.path for f in client.list_artifacts(run_id, parent)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()


class _WandbScript(Backend):
    """W&B runs that a script in this process logs to with the real SDK (``wandb.init``)."""

    def log_metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        row = {wandb_key(k): v for k, v in values.items()}
        if METRIC_PARAMS_VERSION in values:  # the marker as the client logs it
            row[WANDB_METRIC_APPLIED_STEP] = step
        self.log_history(run_id, [(step, row)])


def _wandb_backend(request: pytest.FixtureRequest) -> Backend:
    import wandb

    from tests.wandb_server import WandbServer

    server: WandbServer = request.getfixturevalue("wandb_server")
    entity = server.state.default_entity
    project = f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").strip("]")
    project = project.replace("]", "")
    uri = f"wandb://{entity}/{project}"
    runs: dict[str, wandb.Run] = {}

    def make(name: str | None = None) -> str:
        run = wandb.init(
            entity=entity,
            project=project,
            id=uuid.uuid4().hex[:12],
            name=name or request.node.name[:60],
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        runs[run.id] = run
        return run.id

    def log_history(run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        merged: dict[int, dict[str, float]] = {}
        for step, values in rows:
            merged.setdefault(step, {}).update(values)
        for step in sorted(merged):
            # Committed at once: without commit the SDK holds a row until the next step.
            runs[run_id].log(merged[step], step=step, commit=True)
        last = max(merged)
        stored = server.state.runs

        def arrived() -> bool:
            record = stored.get((entity, project, run_id))
            return record is not None and max(record.history, default=-1) >= last

        wait_for(arrived, timeout=60)

    def finish_all() -> None:
        for run in runs.values():
            run.finish()

    request.addfinalizer(finish_all)
    tracker = open_tracker(uri)
    return _WandbScript(
        "wandb",
        uri,
        tracker,
        project,
        make,
        lambda run_id, path, text: tracker.put_text(run_id, path, text),  # type: ignore[attr-defined]
        log_history,
        lambda run_id, path: tracker._read_bytes(run_id, path),  # type: ignore[attr-defined]
    )


# W&B's runs are real SDK runs (a service process, an upload every second): its share of the
# contract runs with the slow tests.
BACKENDS = ["memory", "mlflow", pytest.param("wandb", marks=pytest.mark.slow)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each tracker backend in turn: the contract holds on every one."""
    if request.param == "memory":
        return _memory_backend()
    if request.param == "wandb":
        return _wandb_backend(request)
    return _mlflow_backend(request)


@pytest.fixture
def mlflow_backend(request: pytest.FixtureRequest) -> Backend:
    """The MLflow backend on the session's server, for what only a real server can show."""
    return _mlflow_backend(request)


@pytest.fixture
def memory() -> Backend:
    """A fresh in-memory tracker, for fast tests of what sits above the seam."""
    return _memory_backend()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A benchmark is slow too: ``-m "not slow"`` leaves it out as ``-m "not bench"`` does."""
    for item in items:
        if item.get_closest_marker("bench") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


def pytest_unconfigure(config: pytest.Config) -> None:
    """A test process that does not end within two minutes of its session is stuck on what a
    test left behind (a service still retrying a stopped server, say): name the processes,
    dump every thread's stack and exit with 1, rather than hang until CI gives up."""
    if children := psutil.Process().children(recursive=True):
        names = [f"{c.pid}: {' '.join(c.cmdline())[:160]}" for c in children]
        print("\nprocesses still running after the tests:", *names, sep="\n  ", file=sys.stderr)
    faulthandler.dump_traceback_later(120, exit=True, file=sys.stderr)
