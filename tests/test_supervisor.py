"""The per-run supervisor, on every backend: when it decides and when it keeps out."""

from __future__ import annotations

import os
import threading
import time

import pytest

from integrations.protocol import TAG_OBJECTIVE
from manager_daemon.audit import AuditLog
from manager_daemon.daemon import Daemon, TickReport, in_background, lower_priority
from manager_daemon.policies import RulesPolicy
from manager_daemon.supervisor import RunSupervisor, SupervisorConfig
from manager_daemon.validation import ValidationConfig
from tests.conftest import Backend
from tests.helpers import overfitting_run, wait_for


def test_no_policy_decision_after_a_stop_was_issued(backend: Backend) -> None:
    tracker = backend.tracker
    run_id = overfitting_run(backend)
    config = SupervisorConfig(validation=ValidationConfig(cooldown_steps=0, stop_after_evals=0))
    supervisor = RunSupervisor(run_id, tracker, AuditLog(tracker), config)
    policy = RulesPolicy()
    policy.config.stop_patience = 1
    policy.config.stop_after_interventions = 0
    first = supervisor.tick(policy)
    assert first is not None and [c.command for c in first.command_verdicts] == ["stop"]

    # The run keeps evaluating (and getting worse) while it winds down.
    backend.log_history(run_id, [(80, {"eval_loss": 2.6}), (90, {"eval_loss": 2.8})])
    assert supervisor.tick(policy) is None
    assert len(AuditLog(tracker).records(run_id)) == 1


def test_an_objective_tag_set_after_the_run_was_first_read_is_picked_up(
    backend: Backend,
) -> None:
    tracker = backend.tracker
    run_id = overfitting_run(backend)
    supervisor = RunSupervisor(run_id, tracker, AuditLog(tracker))
    supervisor.refresh()
    assert str(supervisor.telemetry.objective) == "minimize:eval_loss"  # the default
    # Logged after the run's history so far, as a script logs (W&B's steps only go forward).
    backend.log_history(run_id, [(80, {"accuracy": 0.5}), (90, {"accuracy": 0.6})])
    tracker.set_tags(run_id, {TAG_OBJECTIVE: "maximize:accuracy"})
    supervisor.refresh()
    assert str(supervisor.telemetry.objective) == "maximize:accuracy"
    assert [v for _, v in supervisor.telemetry.evals] == [0.5, 0.6]


def test_daemons_in_background_decide_while_the_block_runs_and_stop_after(
    backend: Backend,
) -> None:
    tracker = backend.tracker
    run_id = overfitting_run(backend)

    class Counting(Daemon):
        ticks = 0

        def run_once(self, wait: bool = True) -> TickReport:
            self.ticks += 1
            return super().run_once(wait)

    daemon = Counting(tracker, RulesPolicy(), experiments=[backend.experiment])
    with in_background([daemon], interval_s=0.2):
        wait_for(lambda: AuditLog(tracker).records(run_id), 30)
    decided = AuditLog(tracker).records(run_id)
    assert decided[0].status == "issued" and decided[0].source == "rules"
    ticks = daemon.ticks
    time.sleep(1.0)
    assert daemon.ticks == ticks, "no tick after the block ended"


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's idle scheduling class")
def test_decision_threads_yield_the_cpu_and_leave_the_process_as_it_was() -> None:
    seen: dict[int, tuple[int, int]] = {}

    def worker(nice: int) -> None:
        lower_priority(nice)
        thread = threading.get_native_id()
        seen[nice] = (os.getpriority(os.PRIO_PROCESS, thread), os.sched_getscheduler(thread))

    for nice in (0, 10, 19):
        thread = threading.Thread(target=worker, args=(nice,))
        thread.start()
        thread.join()
    before = os.getpriority(os.PRIO_PROCESS, 0)
    assert seen[0] == (before, os.SCHED_OTHER)
    assert seen[10] == (max(10, before), os.SCHED_OTHER)
    assert seen[19] == (19, os.SCHED_IDLE)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the calling thread is untouched"
