"""W&B answering 429 and 500, or gone for 30 s, while a run is managed: no training step
waits, the client and the daemon carry on once it answers again, and nothing is issued or
applied twice. The real ``wandb`` SDK against the loopback W&B server."""

from __future__ import annotations

import logging
import time

import pytest

from integrations.protocol import (
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
    TAG_PARAMS_VERSION,
    params_path,
)
from manager_daemon.audit import AuditLog
from manager_daemon.daemon import Daemon
from manager_daemon.policies import RulesPolicy
from tests.conftest import Backend, _wandb_backend
from tests.helpers import LoopThread, issue, overfitting_run, wait_for
from tests.wandb_server import WandbServer

pytestmark = pytest.mark.slow


@pytest.fixture
def on_wandb(request: pytest.FixtureRequest) -> Backend:
    return _wandb_backend(request)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"status": 429, "retry_after": 1, "seconds": 8}, id="429"),
        pytest.param({"status": 500, "seconds": 8}, id="500"),
        pytest.param(None, id="gone-30s"),
    ],
)
def test_training_never_waits_and_each_version_is_applied_once(
    on_wandb: Backend,
    wandb_server: WandbServer,
    fault: dict[str, float] | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = on_wandb.tracker
    run_id = on_wandb.new_run()
    loop = LoopThread(run_id, on_wandb.uri, sleep=0.005)
    applied: list[int] = []
    original = loop.knobs.client.apply_pending

    def recording(*args, **kwargs):
        version = original(*args, **kwargs)
        if version is not None:
            applied.append(version.version)
        return version

    loop.knobs.client.apply_pending = recording  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="integrations.client")
    loop.start()
    try:
        wait_for(lambda: TAG_CLIENT_HEARTBEAT in tracker.get_run(run_id).tags, 60)
        issue(tracker, run_id, 1, {"learning_rate": 0.02})
        wait_for(lambda: tracker.get_run(run_id).tags.get(TAG_CLIENT_APPLIED_VERSION) == "1", 60)
        down_from = len(loop.step_times)
        if fault is None:
            wandb_server.refuse_connections(seconds=30)
            time.sleep(30)
        else:
            wandb_server.inject(**fault)  # every request, for a while
            time.sleep(fault["seconds"])
        during = loop.step_times[down_from:]
        # Back: the next version is applied, and the first is not applied again.
        issue(tracker, run_id, 2, {"learning_rate": 0.015}, commands=[])
        wait_for(lambda: tracker.get_run(run_id).tags.get(TAG_CLIENT_APPLIED_VERSION) == "2", 120)
        assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(0.015)
    finally:
        wandb_server.clear_faults()
        loop.stop()
    assert loop.error is None
    assert applied == [1, 2], "each version applied once, in order"
    assert len(during) > 100, "training kept stepping while W&B did not answer"
    # A step that waited on W&B would take the retry or outage's seconds; the bound leaves
    # room for a busy machine's scheduling, far below that.
    assert max(during) < 2.0, f"a training step waited {max(during):.3f} s"


def test_a_daemon_through_an_outage_issues_nothing_twice(
    on_wandb: Backend, wandb_server: WandbServer
) -> None:
    tracker = on_wandb.tracker
    run_id = overfitting_run(on_wandb)
    daemon = Daemon(tracker, RulesPolicy(), experiments=[on_wandb.experiment])
    wandb_server.inject(status=500, seconds=5)
    try:
        daemon.run_once()  # fails to reach W&B: decides nothing, writes nothing
    finally:
        wandb_server.clear_faults()
    for _ in range(3):
        daemon.run_once()
    assert tracker.get_run(run_id).tags[TAG_PARAMS_VERSION] == "1"
    assert tracker.list_artifacts(run_id, "atm/params") == [params_path(1)]
    issued = [r for r in AuditLog(tracker).records(run_id) if r.status == "issued"]
    assert [r.params_version for r in issued] == [1]
