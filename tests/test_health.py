"""A run's health: the daemon says what it cannot do for a run, once, where users look (the
run tag, its log, `atm status`, the Prometheus gauge), and a model too slow for a run leaves its
decisions to the rules."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from typer.testing import CliRunner

from integrations.protocol import (
    SPEC_PATH,
    TAG_CLIENT_HEARTBEAT,
    TAG_DAEMON_LEASE,
    TAG_HEALTH,
    TAG_MANAGED,
    TAG_OBJECTIVE,
    Health,
    HealthState,
    Lease,
    Source,
)
from integrations.watch import DaemonWatch
from manager_daemon import cli, health
from manager_daemon.audit import AuditLog
from manager_daemon.cli import app
from manager_daemon.daemon import Daemon
from manager_daemon.policies.llm import LLMConfig, LLMPolicy
from manager_daemon.policies.openai_chat import OpenAIChat
from manager_daemon.policies.rules import RulesPolicy
from manager_daemon.supervisor import RunSupervisor, SupervisorConfig
from tests.conftest import Backend
from tests.helpers import OVERFIT_SPEC, overfitting_run, snapshot_and_menu, telemetry
from tests.openai_replay import ReplayServer, Reply

runner = CliRunner()


def managed_run(backend: Backend, objective: str, rows: list[tuple[int, dict[str, float]]]) -> str:
    """A run with a client (a spec and a heartbeat) that logged ``rows``."""
    run_id = backend.new_run()
    backend.log_history(run_id, rows)
    tracker = backend.tracker
    tracker.write_json(run_id, SPEC_PATH, OVERFIT_SPEC.model_dump(mode="json"))
    tracker.set_tags(
        run_id,
        {TAG_MANAGED: "true", TAG_OBJECTIVE: objective, TAG_CLIENT_HEARTBEAT: str(time.time())},
    )
    return run_id


def health_of(backend: Backend, run_id: str) -> Health:
    found = Health.parse(backend.tracker.get_run(run_id).tags.get(TAG_HEALTH))
    assert found is not None
    return found


def test_an_objective_the_run_never_logs_is_named_once_with_the_closest_key(
    backend: Backend, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [(s, {"train_loss": 2.0 - s / 100}) for s in range(40)]
    rows += [(s, {"val_loss": 2.1 - s / 200}) for s in (10, 20, 30)]
    run_id = managed_run(backend, "minimize:val_los", rows)
    daemon = Daemon(backend.tracker, RulesPolicy(), experiments=[backend.experiment])
    monkeypatch.setattr(health, "OBJECTIVE_WAIT_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="manager_daemon.health"):
        for _ in range(3):
            report = daemon.run_once()
    daemon.close()
    assert report.decisions == []
    found = health_of(backend, run_id)
    assert found.state is HealthState.WAITING_OBJECTIVE
    assert "val_los never logged" in found.reason and "closest: val_loss" in found.reason
    warnings = [r.getMessage() for r in caplog.records if run_id[:12] in r.getMessage()]
    assert len(warnings) == 1 and "closest: val_loss" in warnings[0]
    shown = runner.invoke(app, ["status", "--tracking-uri", backend.uri])
    assert shown.exit_code == 0 and "waiting_objective" in shown.output
    assert "closest: val_loss" in shown.output


def test_a_run_that_only_started_is_waiting_without_a_warning(
    memory: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = managed_run(memory, "minimize:eval_loss", [(1, {"loss": 2.0})])
    daemon = Daemon(memory.tracker, RulesPolicy())
    with caplog.at_level(logging.WARNING, logger="manager_daemon.health"):
        daemon.run_once()
    daemon.close()
    assert health_of(memory, run_id).state is HealthState.WAITING_OBJECTIVE
    assert not [r for r in caplog.records if r.name == "manager_daemon.health"]


@pytest.fixture(params=["memory", "mlflow"])
def stepped_backend(request: pytest.FixtureRequest) -> Backend:
    """The trackers on which a script can log a point at a step it has passed (W&B's steps
    only go forward: `wandb.log` without a step counts on)."""
    name = "memory" if request.param == "memory" else "mlflow_backend"
    return request.getfixturevalue(name)


def test_an_objective_logged_without_steps_is_named(stepped_backend: Backend) -> None:
    """Every evaluation at step 0 (`mlflow.log_metric` without `step=`): after the third, the
    daemon says why it decides nothing more."""
    backend = stepped_backend
    run_id = managed_run(backend, "minimize:eval_loss", [(s, {"loss": 2.0}) for s in range(30)])
    daemon = Daemon(backend.tracker, RulesPolicy(), experiments=[backend.experiment])
    for value in (2.0, 1.9, 1.95, 2.1):
        backend.log_metrics(run_id, {"eval_loss": value}, 0)
        daemon.run_once()
    daemon.close()
    found = health_of(backend, run_id)
    assert found.state is HealthState.NO_STEPS, found
    assert "eval_loss is logged at step 0 over and over" in found.reason
    assert "step=step" in found.reason


def test_a_run_without_a_client_is_advisory_and_one_without_knobs_says_so(
    memory: Backend,
) -> None:
    advisory = overfitting_run(memory)
    memory.tracker.delete_tag(advisory, TAG_CLIENT_HEARTBEAT)
    bare = memory.new_run()
    memory.tracker.set_tags(bare, {TAG_MANAGED: "true"})
    daemon = Daemon(memory.tracker, RulesPolicy())
    daemon.run_once()
    gauge = {
        state: daemon.metrics.managed_runs.labels(state.value)._value.get() for state in HealthState
    }
    daemon.close()
    assert health_of(memory, advisory).state is HealthState.ADVISORY
    assert "never applied" in health_of(memory, advisory).reason
    no_knobs = health_of(memory, bare)
    assert no_knobs.state is HealthState.NO_KNOBS and "atm attach" in no_knobs.reason
    assert gauge[HealthState.ADVISORY] == 1 and gauge[HealthState.NO_KNOBS] == 1
    assert gauge[HealthState.DECIDING] == 0


def test_a_deciding_run_is_said_to_be_deciding_and_the_tag_is_written_once(
    memory: Backend,
) -> None:
    run_id = overfitting_run(memory)
    daemon = Daemon(memory.tracker, RulesPolicy())
    daemon.run_once()
    writes = memory.tracker.calls["set_tags"]
    daemon.run_once()
    daemon.run_once()
    daemon.close()
    found = health_of(memory, run_id)
    assert found.state is HealthState.DECIDING and "1 version(s) issued" in found.reason
    assert memory.tracker.calls["set_tags"] == writes, "an unchanged health is not written again"


def test_answers_that_keep_coming_too_late_are_named_with_the_fix(
    memory: Backend, replay: ReplayServer
) -> None:
    run_id = overfitting_run(memory)
    change = {"action": "adjust", "changes": {"learning_rate": 5e-4}, "reason": "rising"}
    replay.replies = [Reply(json.dumps(change), delay_s=1.5)]
    tracker = memory.tracker
    supervisor = RunSupervisor(run_id, tracker, AuditLog(tracker), SupervisorConfig(stale_evals=0))
    policy = LLMPolicy(OpenAIChat("slow", base_url=replay.base_url), LLMConfig(fallback="none"))

    def run_moves_on() -> None:
        time.sleep(0.5)
        memory.log_metrics(run_id, {"eval_loss": 2.6}, 80)

    mover = threading.Thread(target=run_moves_on)
    mover.start()
    record = supervisor.tick(policy)
    mover.join()
    assert record is not None and record.status == "stale"
    found = supervisor.health(tracker.get_run(run_id))
    assert found.state is HealthState.STALE_ANSWERS
    assert "1 of the last 1 model answers came too late" in found.reason
    assert "--policy rules" in found.reason


def test_a_model_slower_than_the_run_leaves_the_decision_to_the_rules(
    replay: ReplayServer,
) -> None:
    t = telemetry([3.0 - i / 50 for i in range(70)], [3.0, 2.5, 2.2, 2.1, 2.15, 2.25, 2.4])
    snapshot, menu = snapshot_and_menu(t, OVERFIT_SPEC, Source.LLM)
    assert snapshot.objective.seconds_per_eval == pytest.approx(0.01)
    replay.replies = [Reply(json.dumps({"action": "no_action", "reason": "fine"}), delay_s=0.2)]
    policy = LLMPolicy(OpenAIChat("slow", base_url=replay.base_url), LLMConfig(consult="always"))
    first = policy.propose(snapshot, menu)  # its pace is unknown: asked, and timed
    assert first.model == "slow" and len(replay.requests) == 1
    second = policy.propose(snapshot, menu)
    assert len(replay.requests) == 1, "not asked again: its answers come after the next evaluation"
    assert second.source is Source.RULES and second.proposal.action == "adjust"
    assert "the rules acted at once" in second.note and "every 0.0 s" in second.note
    slower = snapshot.model_copy(deep=True)
    slower.objective.seconds_per_eval = 60.0
    policy.propose(slower, menu)
    assert len(replay.requests) == 2, "a run that evaluates once a minute is worth asking about"


def test_status_fits_80_columns_and_takes_short_ids_finished_runs_with_all(
    memory: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = overfitting_run(memory)
    daemon = Daemon(memory.tracker, RulesPolicy())
    daemon.run_once()
    daemon.close()
    monkeypatch.setattr(cli.console, "width", 80)
    shown = runner.invoke(app, ["status", "--tracking-uri", memory.uri])
    assert shown.exit_code == 0 and run_id[:12] in shown.output
    assert max(len(line) for line in shown.output.splitlines()) <= 80
    log = runner.invoke(app, ["log", run_id[:12], "--tracking-uri", memory.uri])
    assert log.exit_code == 0 and "d000001" in log.output
    memory.tracker.set_status(run_id, "FINISHED")
    assert run_id[:12] not in runner.invoke(app, ["status", "--tracking-uri", memory.uri]).output
    ended = runner.invoke(app, ["status", "--all", "--tracking-uri", memory.uri])
    assert run_id[:12] in ended.output and "finished" in ended.output
    missing = runner.invoke(app, ["log", "ffffffffffff", "--tracking-uri", memory.uri])
    assert missing.exit_code == 1 and "no run" in missing.output


def test_an_acute_symptom_is_treated_by_the_rules_at_once(replay: ReplayServer) -> None:
    """Non-finite losses do not wait for a model's answer, however fast the model."""
    t = telemetry([3.0 - i / 50 for i in range(60)] + [float("nan")] * 5, [3.0, 2.5, 2.2])
    snapshot, menu = snapshot_and_menu(t, OVERFIT_SPEC, Source.LLM)
    policy = LLMPolicy(OpenAIChat("m", base_url=replay.base_url), LLMConfig(consult="always"))
    answer = policy.propose(snapshot, menu)
    assert replay.requests == [], "the model is not asked"
    assert answer.source is Source.RULES and answer.proposal.reason.startswith("divergence")
    assert "learning_rate" in answer.proposal.changes and "acute symptom" in answer.note


def test_the_client_says_what_the_daemon_says_and_when_no_daemon_watches() -> None:
    clock = [1000.0]
    watch = DaemonWatch(grace_s=120, clock=lambda: clock[0])
    assert watch.polled({}) == [], "a daemon may not have looked yet"
    clock[0] += 121
    (said,) = watch.polled({})
    assert "no daemon has looked at this run in 2 min" in said and "atm daemon" in said
    assert watch.polled({}) == [], "said once"
    lease = Lease(owner="atm-0.abc", renewed_at=clock[0], ttl_s=60).tag_value()
    stale = Health(state=HealthState.STALE_ANSWERS, reason="3 of the last 3 answers came late")
    said = watch.polled({TAG_DAEMON_LEASE: lease, TAG_HEALTH: stale.tag_value()})
    assert said == [
        "a daemon is watching this run now",
        "the manager says: stale_answers: 3 of the last 3 answers came late",
    ]
    assert watch.polled({TAG_DAEMON_LEASE: lease, TAG_HEALTH: stale.tag_value()}) == []
    deciding = Health(state=HealthState.DECIDING, reason="1 decision(s)").tag_value()
    assert watch.polled({TAG_DAEMON_LEASE: lease, TAG_HEALTH: deciding}) == [
        "the manager is deciding for this run again"
    ]
    waiting = Health(state=HealthState.WAITING_OBJECTIVE, reason="eval_loss never logged")
    assert watch.polled({TAG_DAEMON_LEASE: lease, TAG_HEALTH: waiting.tag_value()}) == []
    clock[0] += 1000  # the lease left to expire: its daemon is gone
    (gone,) = watch.polled({TAG_DAEMON_LEASE: lease, TAG_HEALTH: deciding})
    assert "no daemon has looked at this run" in gone


def test_the_client_repeats_a_missing_objective_after_a_minute_and_says_a_run_ended_unseen() -> (
    None
):
    clock = [0.0]
    watch = DaemonWatch(grace_s=120, clock=lambda: clock[0])
    lease = Lease(owner="atm-0.abc", renewed_at=0.0, ttl_s=60).tag_value()
    waiting = Health(
        state=HealthState.WAITING_OBJECTIVE, reason="val_los never logged; closest: val_loss"
    )
    tags = {TAG_DAEMON_LEASE: lease, TAG_HEALTH: waiting.tag_value()}
    assert watch.polled(tags) == [], "every run waits for its first evaluation"
    clock[0] = 61
    assert watch.polled(tags) == [f"the manager says: {waiting}"]
    assert watch.polled(tags) == [] and watch.said_objective_missing

    short = DaemonWatch(grace_s=120, clock=lambda: clock[0])
    clock[0] += 4
    (said,) = short.polled({}, last=True)
    assert "the run ended after 4 s, before any daemon looked at it" in said
