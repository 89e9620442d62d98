"""Faults on a real MLflow server: the server stopped mid-training and started again.

The same outage on the in-memory tracker, and the daemon dying between writes on every
backend, are in ``test_contract``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from integrations.protocol import (
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
)
from integrations.trackers import open_tracker
from manager_daemon.mlflow_server import MlflowServer, free_port
from tests.helpers import LoopThread, issue, wait_for


@pytest.mark.slow
def test_training_never_waits_while_the_mlflow_server_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = MlflowServer(root=tmp_path / "mlflow", port=free_port()).start()
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    tracker = open_tracker(server.uri)
    loop = LoopThread(run_id, server.uri, sleep=0.005)
    caplog.set_level(logging.WARNING, logger="integrations.client")
    loop.start()
    try:
        wait_for(lambda: TAG_CLIENT_HEARTBEAT in tracker.get_run(run_id).tags)
        server.stop()
        down_from = len(loop.step_times)
        time.sleep(12)
        during = loop.step_times[down_from:]
        server.start()
        issue(tracker, run_id, 1, {"learning_rate": 0.02})
        # Back-off is capped at 30 s, so the client sees the server again within that.
        wait_for(lambda: tracker.get_run(run_id).tags.get(TAG_CLIENT_APPLIED_VERSION) == "1", 60)
        assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    finally:
        loop.stop()
        server.stop()
    assert loop.error is None
    assert len(during) > 200, "training kept stepping while the tracker was down"
    assert max(during) < 0.25, f"a training step waited {max(during):.3f} s"
    warnings = [r for r in caplog.records if "tracker unreachable" in r.getMessage()]
    assert len(warnings) == 1, "the client warns once per outage"
