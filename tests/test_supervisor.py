"""The per-run supervisor against a real MLflow server: when it decides and when it keeps out."""

from __future__ import annotations

import time

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from manager_daemon.audit import AuditLog
from manager_daemon.policies import RulesPolicy
from manager_daemon.supervisor import RunSupervisor, SupervisorConfig
from manager_daemon.validation import ValidationConfig
from tests.helpers import overfitting_run


def test_no_policy_decision_after_a_stop_was_issued(tracking_uri, tracker, new_run) -> None:
    run_id = overfitting_run(tracking_uri, new_run)
    config = SupervisorConfig(validation=ValidationConfig(cooldown_steps=0, stop_after_evals=0))
    supervisor = RunSupervisor(run_id, tracker, AuditLog(tracker), config)
    policy = RulesPolicy()
    policy.config.stop_patience = 1
    policy.config.stop_after_interventions = 0
    first = supervisor.tick(policy)
    assert first is not None and [c.command for c in first.command_verdicts] == ["stop"]

    # The run keeps evaluating (and getting worse) while it winds down.
    now = int(time.time() * 1000)
    MlflowClient(tracking_uri).log_batch(
        run_id, metrics=[Metric("eval_loss", 2.6, now, 80), Metric("eval_loss", 2.8, now + 1, 90)]
    )
    assert supervisor.tick(policy) is None
    assert len(AuditLog(tracker).records(run_id)) == 1
