"""What a daemon tick costs the tracker, counted in calls, requests and points read (never
timed): a tick that finds no new evaluation reads nothing, a restart reads a bounded window of
each metric, and a tick with news reads only what is new."""

from __future__ import annotations

import pytest

from integrations.protocol import (
    SPEC_PATH,
    TAG_CLIENT_HEARTBEAT,
    TAG_MANAGED,
    TAG_OBJECTIVE,
    Source,
)
from integrations.trackers.memory import MemoryTracker
from integrations.trackers.mlflow_backend import MlflowTracker
from manager_daemon.audit import AuditLog
from manager_daemon.daemon import Daemon
from manager_daemon.policies import RulesPolicy
from manager_daemon.policies.base import PolicyAnswer
from manager_daemon.supervisor import RunSupervisor, SupervisorConfig, human_proposal
from manager_daemon.telemetry import METRIC_WINDOW, OBJECTIVE_WINDOW
from tests.conftest import Backend
from tests.helpers import OVERFIT_SPEC
from train_scripts.bench_scale import RequestCounter

STEPS = 5000
EVAL_EVERY = 50


def long_healthy_run(backend: Backend, eval_every: int = EVAL_EVERY) -> str:
    """A managed run with a long history whose eval loss keeps improving (no decision)."""
    run_id = backend.new_run()
    rows = [(s, {"loss": 2.0 / (1 + s / 500)}) for s in range(STEPS)]
    rows += [(s, {"eval_loss": 2.2 / (1 + s / 500)}) for s in range(0, STEPS, eval_every)]
    backend.log_history(run_id, rows)
    backend.tracker.write_json(run_id, SPEC_PATH, OVERFIT_SPEC.model_dump(mode="json"))
    backend.tracker.set_tags(
        run_id,
        {TAG_CLIENT_HEARTBEAT: "1", TAG_OBJECTIVE: "minimize:eval_loss", TAG_MANAGED: "true"},
    )
    return run_id


def test_quiet_ticks_read_nothing_and_a_restart_reads_a_window(memory: Backend) -> None:
    tracker = memory.tracker
    assert isinstance(tracker, MemoryTracker)
    runs = [long_healthy_run(memory) for _ in range(3)]

    daemon = Daemon(tracker, RulesPolicy(), experiments=[memory.experiment])
    tracker.points_read = 0
    daemon.run_once()  # a start, or a restart: every run is new to this daemon
    # The last points of the train loss and the last evaluations: a window of each key.
    assert tracker.points_read == len(runs) * (METRIC_WINDOW + OBJECTIVE_WINDOW)

    calls, points = tracker.calls.copy(), tracker.points_read
    for _ in range(3):
        daemon.run_once()  # nothing new
    spent = tracker.calls - calls
    assert spent == {"find_managed_runs": 3}, f"quiet ticks cost only the listing, not {spent}"
    assert tracker.points_read == points

    memory.log_history(
        runs[0], [(STEPS, {"loss": 0.3}), (STEPS + 1, {"loss": 0.3, "eval_loss": 0.4})]
    )
    daemon.run_once()
    assert tracker.points_read - points == 3, "a tick with news reads only the new points"
    assert (tracker.calls - calls)["read_new_points"] == 1, "and only for the run that has news"


def test_a_restart_reads_the_records_of_issued_versions_not_every_decision(
    memory: Backend,
) -> None:
    tracker = memory.tracker
    assert isinstance(tracker, MemoryTracker)
    run_id = long_healthy_run(memory)
    config = SupervisorConfig(audit_no_action=True)  # a record for every evaluation
    person = RunSupervisor(run_id, tracker, AuditLog(tracker), config)
    change = human_proposal({"learning_rate": 5e-4}, [], "by hand")
    issued = person.decide(person.refresh(), Source.HUMAN, "human", lambda *_: PolicyAnswer(change))
    assert issued is not None and issued.status == "issued"
    daemon = Daemon(tracker, RulesPolicy(), config, experiments=[memory.experiment])
    for i in range(1, 31):  # still improving: 30 "no action" decisions after the person's
        memory.log_history(run_id, [(STEPS + i, {"loss": 0.17, "eval_loss": 0.2 - i / 1000})])
        daemon.run_once()
    decisions = AuditLog(tracker).decision_ids(run_id)
    assert len(decisions) == 31

    calls = tracker.calls.copy()
    restarted = Daemon(tracker, RulesPolicy(), config, experiments=[memory.experiment])
    report = restarted.run_once()
    assert report.runs == 1 and not report.errors and not report.decisions
    reads = (tracker.calls - calls)["read_json"]
    # The spec, version 1's params file and its record, the newest record: not 31 records.
    assert reads <= 5, f"a restart read {reads} files"
    supervisor = restarted.supervisors[run_id]
    assert [i.version for i in supervisor.history] == [1], "the issued version is known"
    assert supervisor.last_decision_step == STEPS + 30, "and the last decision's step"
    assert supervisor.last_decision_id == decisions[-1]


def test_a_quiet_tick_on_mlflow_is_the_listing_alone(mlflow_backend: Backend) -> None:
    backend = mlflow_backend
    run_id = long_healthy_run(backend)
    daemon = Daemon(backend.tracker, RulesPolicy(), experiments=[backend.experiment])
    daemon.run_once()
    with RequestCounter() as listing:
        backend.tracker.find_managed_runs([backend.experiment])
    with RequestCounter() as quiet:
        report = daemon.run_once()
    assert report.runs == 1 and not report.errors
    assert quiet.count == listing.count, "a quiet tick makes no request beyond the listing"

    backend.log_history(run_id, [(STEPS, {"loss": 0.3, "eval_loss": 0.4})])
    with RequestCounter() as news:
        daemon.run_once()
    # The listing, then one step-range read per metric the run logs: no history re-read.
    assert news.count <= listing.count + 4


@pytest.mark.parametrize("eval_every", [3, 50])
def test_a_restart_on_mlflow_reads_about_a_window_of_each_key(
    mlflow_backend: Backend, monkeypatch: pytest.MonkeyPatch, eval_every: int
) -> None:
    backend = mlflow_backend
    tracker = backend.tracker
    assert isinstance(tracker, MlflowTracker)
    run_id = long_healthy_run(backend, eval_every)
    fetched: dict[str, int] = {}
    ranges = tracker._range_many

    def counting(run_ids: list[str], key: str, *args: int, **kwargs: int):  # type: ignore[no-untyped-def]
        found = ranges(run_ids, key, *args, **kwargs)
        fetched[key] = fetched.get(key, 0) + sum(len(points) for points in found.values())
        return found

    monkeypatch.setattr(tracker, "_range_many", counting)
    daemon = Daemon(tracker, RulesPolicy(), experiments=[backend.experiment])
    report = daemon.run_once()  # a start, or a restart
    assert report.runs == 1 and not report.errors
    supervisor = daemon.supervisors[run_id]
    assert supervisor.telemetry is not None
    assert len(supervisor.telemetry.train) == METRIC_WINDOW
    assert len(supervisor.telemetry.evals) == OBJECTIVE_WINDOW
    # What the server returned: the dense key's window in one read; the sparse key's found
    # in a read or two more, sized by the density the first read saw, not by history.
    assert fetched["loss"] == METRIC_WINDOW
    assert fetched["eval_loss"] <= 2.5 * OBJECTIVE_WINDOW, fetched
