"""A change gets its effect measured before a policy moves the same knob again: not applied yet,
or applied fewer evaluations ago than ``settle_evals``, a knob is off a policy's menu (a person is
never held up), and a run that has gone non-finite is not kept waiting."""

from __future__ import annotations

from integrations.protocol import METRIC_PARAMS_VERSION, TAG_PARAMS_VERSION, Source
from manager_daemon.audit import AuditLog
from manager_daemon.policies.base import PolicyAnswer
from manager_daemon.policies.rules import RulesPolicy
from manager_daemon.supervisor import RunSupervisor, SupervisorConfig, human_proposal
from manager_daemon.validation import ValidationConfig
from tests.conftest import Backend
from tests.helpers import overfitting_run

CONFIG = SupervisorConfig(validation=ValidationConfig(cooldown_steps=0, settle_evals=2))


def supervisor(memory: Backend, run_id: str) -> RunSupervisor:
    return RunSupervisor(run_id, memory.tracker, AuditLog(memory.tracker), CONFIG)


def test_a_person_s_change_is_not_undone_before_it_has_shown_its_effect(memory: Backend) -> None:
    run_id = overfitting_run(memory)
    person = supervisor(memory, run_id)
    run = person.refresh()
    proposal = human_proposal({"learning_rate": 2e-3}, [], "try a higher lr")
    record = person.decide(run, Source.HUMAN, "human", lambda _s, _m: PolicyAnswer(proposal))
    assert record is not None and record.params_version == 1

    rules = supervisor(memory, run_id)
    memory.log_metrics(run_id, {"eval_loss": 2.6}, 80)
    record = rules.tick(RulesPolicy())
    assert record is not None and record.values["learning_rate"] == 2e-3, "the lr stays"
    assert "learning_rate" not in {v.knob for v in record.verdicts}
    state = rules.run_state(rules.trusted(memory.tracker.get_run(run_id).tags))
    assert state.settling["learning_rate"] == "waiting for v1 (step 70) to be applied"

    # Applied at step 81, then two evaluations: the rules may move it again.
    memory.log_metrics(run_id, {METRIC_PARAMS_VERSION: 1}, 81)
    memory.log_metrics(run_id, {"eval_loss": 2.7}, 90)
    rules.refresh()
    state = rules.run_state(rules.trusted(memory.tracker.get_run(run_id).tags))
    assert "(1 of 2 evaluations since)" in state.settling["learning_rate"]
    memory.log_metrics(run_id, {"eval_loss": 2.8}, 100)
    rules.refresh()
    state = rules.run_state(rules.trusted(memory.tracker.get_run(run_id).tags))
    assert "learning_rate" not in state.settling


def test_a_version_superseded_before_it_was_applied_counts_as_applied_with_the_newer(
    memory: Backend,
) -> None:
    run_id = overfitting_run(memory)
    person = supervisor(memory, run_id)
    for version, lr in ((1, 2e-3), (2, 1.5e-3)):
        run = person.refresh()
        proposal = human_proposal({"learning_rate": lr}, [], "by hand")
        record = person.decide(
            run, Source.HUMAN, "human", lambda _s, _m, p=proposal: PolicyAnswer(p)
        )
        assert record is not None and record.params_version == version
    memory.log_metrics(run_id, {METRIC_PARAMS_VERSION: 2}, 75)  # v1 never reached the client
    for step in (80, 90):
        memory.log_metrics(run_id, {"eval_loss": 2.5}, step)
    person.refresh()
    assert [i.applied_step for i in person.history] == [75, 75]
    state = person.run_state(person.trusted(memory.tracker.get_run(run_id).tags))
    assert state.settling == {}


def test_non_finite_values_after_a_change_end_the_wait(memory: Backend) -> None:
    run_id = overfitting_run(memory)
    person = supervisor(memory, run_id)
    run = person.refresh()
    proposal = human_proposal({"learning_rate": 4e-3}, [], "bolder")
    person.decide(run, Source.HUMAN, "human", lambda _s, _m: PolicyAnswer(proposal))
    memory.log_metrics(run_id, {"loss": float("nan"), "eval_loss": float("nan")}, 80)
    record = supervisor(memory, run_id).tick(RulesPolicy())
    assert record is not None and record.proposal is not None
    assert record.proposal.reason.startswith("divergence")
    assert record.values["learning_rate"] < 4e-3, "the lr just raised is cut at once"
    assert memory.tracker.get_run(run_id).tags[TAG_PARAMS_VERSION] == "2"
