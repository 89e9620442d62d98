"""The daemon killed at each point of a decision, then started again: every decision ends
either not issued or issued exactly once, with its audit record, and the chain goes on.

In process on the in-memory tracker (the kill stands in for SIGKILL: nothing after it runs),
and once for real: ``atm daemon`` SIGKILLed by ``ATM_TEST_CRASH_AT`` on a real MLflow server.
The chaos test (a live training run, the daemon killed at every point and at random moments)
is in ``test_chaos``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from integrations.protocol import PARAMS_DIR, TAG_PARAMS_VERSION, params_path
from manager_daemon import crashpoints
from manager_daemon.daemon import Daemon
from manager_daemon.policies import RulesPolicy
from tests.conftest import Backend
from tests.helpers import applied_then_evaluated, overfitting_run
from tests.ledger import Ledger


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


def _die() -> None:
    raise Killed


@pytest.mark.parametrize("point", crashpoints.POINTS)
def test_a_daemon_killed_at_each_point_issues_the_decision_once_or_not_at_all(
    memory: Backend, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = memory.tracker
    run_id = overfitting_run(memory)
    monkeypatch.setattr(crashpoints, "_target", (point, 1))
    monkeypatch.setattr(crashpoints, "_reached", 0)
    monkeypatch.setattr(crashpoints, "_die", _die)
    with pytest.raises(Killed):
        Daemon(tracker, RulesPolicy()).run_once()
    written = tracker.list_artifacts(run_id, PARAMS_DIR)
    assert written == ([] if point in ("after_read", "after_answer") else [params_path(1)])

    monkeypatch.setattr(crashpoints, "_target", None)
    restarted = Daemon(tracker, RulesPolicy())
    for _ in range(3):
        restarted.run_once()
    ledger = Ledger.read(tracker, run_id)
    assert ledger.problems(tracker, run_id) == []
    assert [v.version for v in ledger.versions] == [1], "the decision is issued exactly once"
    assert [r.params_version for r in ledger.records] == [1]

    # The client applies v1; new evidence gets a new decision, continuing the chain.
    applied_then_evaluated(memory, run_id, 1, 2.5, 2.6)
    restarted.run_once()
    ledger = Ledger.read(tracker, run_id)
    assert ledger.problems(tracker, run_id) == []
    assert ledger.tag == 2


def test_the_crash_hook_reads_point_and_turn_and_refuses_a_bad_one() -> None:
    assert crashpoints._parse(None) is None
    assert crashpoints._parse("after_params") == ("after_params", 1)
    assert crashpoints._parse("before_tag:3") == ("before_tag", 3)
    with pytest.raises(ValueError, match="after_read"):
        crashpoints._parse("after_lunch")
    with pytest.raises(ValueError, match="<nth>"):
        crashpoints._parse("after_read:x")


def test_atm_daemon_sigkilled_after_the_params_file_is_completed_by_the_next(
    mlflow_backend: Backend,
) -> None:
    tracker = mlflow_backend.tracker
    run_id = overfitting_run(mlflow_backend)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_backend.uri,
        crashpoints.ENV: "after_params",
    }
    command = [sys.executable, "-m", "manager_daemon.cli", "daemon", "--once", "--policy", "rules"]
    command += ["--experiment", mlflow_backend.experiment]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert tracker.list_artifacts(run_id, PARAMS_DIR) == [params_path(1)]
    assert TAG_PARAMS_VERSION not in tracker.get_run(run_id).tags

    Daemon(tracker, RulesPolicy(), experiments=[mlflow_backend.experiment]).run_once()
    ledger = Ledger.read(tracker, run_id)
    assert ledger.problems(tracker, run_id) == []
    assert ledger.tag == 1 and ledger.records[0].policy == "recovered"


@pytest.mark.parametrize("point", ["after_params", "after_audit"])
def test_a_restart_completes_the_interrupted_decision_and_then_decides_the_news(
    memory: Backend, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evaluations logged while the daemon was down are decided by the restarted daemon right
    after it completes the interrupted decision: no conflict with the version it completed."""
    tracker = memory.tracker
    run_id = overfitting_run(memory)
    monkeypatch.setattr(crashpoints, "_target", (point, 1))
    monkeypatch.setattr(crashpoints, "_reached", 0)
    monkeypatch.setattr(crashpoints, "_die", _die)
    with pytest.raises(Killed):
        Daemon(tracker, RulesPolicy()).run_once()
    monkeypatch.setattr(crashpoints, "_target", None)
    applied_then_evaluated(memory, run_id, 1, 2.5, 2.6)

    report = Daemon(tracker, RulesPolicy()).run_once()
    assert [(r.status, r.params_version) for r in report.decisions] == [("issued", 2)]
    ledger = Ledger.read(tracker, run_id)
    assert ledger.problems(tracker, run_id) == []
    assert ledger.tag == 2
