"""Chaos: a live managed training run on a real MLflow server, and `atm daemon` SIGKILLed at
every point of a decision and at random moments, started again each time.

At the end every decision ended either not issued or issued exactly once (no two versions for
one decision or one evaluation, versions contiguous, each with its audit record, the tag on an
existing file) and the training applied each version at most once, in order. The same kills,
one per point, in process on the in-memory tracker, are in ``test_crash_points``.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from integrations.protocol import (
    METRIC_PARAMS_VERSION,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_PARAMS_VERSION,
)
from integrations.trackers import open_tracker
from manager_daemon import crashpoints
from manager_daemon.mlflow_server import MlflowServer, free_port
from tests.helpers import LoopThread, wait_for
from tests.ledger import Ledger
from tests.openai_replay import ReplayServer, turning_lr

log = logging.getLogger(__name__)

RANDOM_KILLS = 8


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A server of this test's own: nothing else's teardown stops it mid-test."""
    server = MlflowServer(root=tmp_path / "mlflow", port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def replay(replay: ReplayServer) -> ReplayServer:
    """The shared endpoint, answering every call with a new lr."""
    replay.answer = turning_lr()
    return replay


def daemon_command(experiment: str, replay: ReplayServer) -> list[str]:
    """`atm daemon` on one experiment, ticking fast, deciding at every evaluation."""
    return [
        *(sys.executable, "-m", "manager_daemon.cli", "daemon"),
        *("--experiment", experiment, "--interval", "0.5"),
        *("--lease-ttl", "6", "--lease-settle", "4"),
        *("--policy", "llm", "--llm-base-url", replay.base_url, "--llm-model", "replay"),
        *("--cooldown-steps", "0", "--budget", "100000", "--stale-evals", "1000"),
    ]


def kill_plan(seed: int) -> list[str | None]:
    """Each crash point twice (its first and its second time), then kills at random moments
    (None), shuffled."""
    plan: list[str | None] = [f"{p}:{n}" for p in crashpoints.POINTS for n in (1, 2)]
    plan += [None] * RANDOM_KILLS
    random.Random(seed).shuffle(plan)
    return plan


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_daemon_killed_over_and_over_loses_no_decision_and_repeats_none(
    server: MlflowServer, replay: ReplayServer, tmp_path: Path
) -> None:
    tracker = open_tracker(server.uri)
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("chaos"), run_name="chaos").info.run_id
    loop = LoopThread(run_id, server.uri, sleep=0.02, evaluate_every=5)
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "OPENAI_API_KEY": "x"}
    command = daemon_command("chaos", replay)
    rng = random.Random(7)
    kills: Counter[str] = Counter()
    daemon: subprocess.Popen[bytes] | None = None
    loop.start()
    try:
        for i, point in enumerate(kill_plan(seed=7)):
            out = (tmp_path / f"daemon-{i:02d}.log").open("w")
            crash = {crashpoints.ENV: point} if point else {}
            daemon = subprocess.Popen(
                command, env={**env, **crash}, stdout=out, stderr=subprocess.STDOUT
            )
            if point is None:
                time.sleep(rng.uniform(5.0, 15.0))
                daemon.send_signal(signal.SIGKILL)
            rc = daemon.wait(240)
            assert rc == -signal.SIGKILL, (tmp_path / f"daemon-{i:02d}.log").read_text()[-3000:]
            kills[point.split(":")[0] if point else "random"] += 1
        # A last daemon, left alone, completes what the last kill interrupted.
        final_log = tmp_path / "daemon-final.log"
        daemon = subprocess.Popen(
            command, env=env, stdout=final_log.open("w"), stderr=subprocess.STDOUT
        )
        wait_for(lambda: "atm daemon: policy" in final_log.read_text(), 120)
        time.sleep(15)
        daemon.terminate()  # SIGTERM: it drains the decisions in flight
        assert daemon.wait(120) == 0
        tag = tracker.get_run(run_id).tags.get(TAG_PARAMS_VERSION)
        wait_for(lambda: tracker.get_run(run_id).tags.get(TAG_CLIENT_APPLIED_VERSION) == tag, 60)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(30)
        loop.stop()
    assert loop.error is None
    wait_for(lambda: Ledger.read(tracker, run_id).applied[-1:] == [int(tag or 0)], 30)
    ledger = Ledger.read(tracker, run_id)
    problems = ledger.problems(tracker, run_id)
    statuses = Counter(r.status for r in ledger.records)
    recovered = sum(1 for r in ledger.records if r.policy == "recovered")
    history = client.get_metric_history(run_id, METRIC_PARAMS_VERSION)
    log.warning(
        "chaos: %d kills %s; %d versions issued, %d applied (%d marker points), audit %s, "
        "%d completed after a kill; problems: %s",
        sum(kills.values()),
        dict(kills),
        ledger.tag,
        len(set(ledger.applied)),
        len(history),
        dict(statuses),
        recovered,
        problems or "none",
    )
    assert problems == []
    assert sum(kills.values()) >= 20 and set(kills) == {*crashpoints.POINTS, "random"}
    assert ledger.tag >= 10, "the run was managed throughout, decisions kept coming"
    assert recovered >= 1, "some kills left a params file that a restart completed"
    assert len(history) == len(set(ledger.applied)), "each version applied at most once"
