"""Faults: the tracker going away mid-training, and the daemon dying mid-decision."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from integrations.protocol import (
    AUDIT_DIR,
    PARAMS_DIR,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
    TAG_PARAMS_VERSION,
    AuditRecord,
    ParamsVersion,
    audit_path,
    params_path,
)
from integrations.trackers import open_tracker
from manager_daemon.daemon import Daemon
from manager_daemon.mlflow_server import MlflowServer, free_port
from manager_daemon.policies import RulesPolicy
from tests.helpers import LoopThread, issue, overfitting_run, wait_for


def test_training_never_waits_while_the_tracker_is_down(
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


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


class DiesOnce:
    """A tracker that dies the first time it would write ``fatal_path`` (or the version tag)."""

    def __init__(self, inner, fatal: str) -> None:
        self.inner, self.fatal, self.armed = inner, fatal, True
        self.uri = inner.uri

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def write_json(self, run_id: str, path: str, payload: object) -> None:
        if self.armed and path.startswith(self.fatal):
            self.armed = False
            raise Killed
        self.inner.write_json(run_id, path, payload)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        if self.armed and self.fatal == "tag" and TAG_PARAMS_VERSION in tags:
            self.armed = False
            raise Killed
        self.inner.set_tags(run_id, tags)


@pytest.mark.parametrize("dies_before", [AUDIT_DIR, "tag"])
def test_daemon_killed_mid_decision_loses_nothing_and_repeats_nothing(
    tracking_uri: str,
    new_run,
    dies_before: str,
) -> None:
    run_id = overfitting_run(tracking_uri, new_run)
    tracker = open_tracker(tracking_uri)
    first = Daemon(DiesOnce(tracker, dies_before), RulesPolicy())
    with pytest.raises(Killed):
        first.run_once()
    assert tracker.list_artifacts(run_id, PARAMS_DIR) == [params_path(1)]
    assert TAG_PARAMS_VERSION not in tracker.get_run(run_id).tags

    # A fresh daemon process completes the interrupted decision and decides nothing twice.
    second = Daemon(tracker, RulesPolicy())
    for _ in range(3):
        second.run_once()
    assert tracker.get_run(run_id).tags[TAG_PARAMS_VERSION] == "1"
    assert tracker.list_artifacts(run_id, PARAMS_DIR) == [params_path(1)]
    params = ParamsVersion.model_validate(tracker.read_json(run_id, params_path(1)))
    record = AuditRecord.model_validate(tracker.read_json(run_id, audit_path(params.decision_id)))
    assert record.params_version == 1
    assert tracker.list_artifacts(run_id, AUDIT_DIR) == [audit_path(params.decision_id)]

    # New evidence later gets a new decision, continuing the chain.
    client = MlflowClient(tracking_uri)
    client.log_metric(run_id, "eval_loss", 2.6, step=200)
    second.run_once()
    tags = tracker.get_run(run_id).tags
    assert tags[TAG_PARAMS_VERSION] == "2"
    v2 = ParamsVersion.model_validate(tracker.read_json(run_id, params_path(2)))
    assert v2.parent_version == 1 and v2.decision_id != params.decision_id
