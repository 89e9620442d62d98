"""Shared fixtures: a real MLflow server on loopback, and runs on it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from integrations.trackers import Tracker, open_tracker
from manager_daemon.mlflow_server import MlflowServer, start_server

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
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
