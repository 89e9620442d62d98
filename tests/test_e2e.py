"""End to end: a transformers training subprocess, an `atm daemon` subprocess, a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from integrations.protocol import (
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_PARAMS_VERSION,
    AuditRecord,
    ParamsVersion,
    params_path,
)


@pytest.mark.slow
def test_daemon_corrects_an_overfitting_trainer(tracking_uri: str, tracker, tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    train = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "manager_daemon.demo.train_lm",
            "--managed",
            "--experiment",
            "e2e",
            "--run-name",
            "e2e-overfit",
            "--poll-interval",
            "1",
            "--max-steps",
            "240",
            "--eval-steps",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "train.log").open("w"),
        text=True,
        env=env,
    )
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "manager_daemon.cli",
            "daemon",
            "--interval",
            "1",
            "--cooldown-steps",
            "30",
            "--policy",
            "rules",
        ],
        stdout=(tmp_path / "daemon.out").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        out, _ = train.communicate(timeout=400)
    finally:
        daemon.terminate()
        daemon.wait(30)
        if train.poll() is None:
            train.kill()
    assert train.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    run_id = summary["run_id"]

    tags = tracker.get_run(run_id).tags
    issued = int(tags[TAG_PARAMS_VERSION])
    assert issued >= 1, (tmp_path / "daemon.out").read_text()[-3000:]
    applied = int(tags[TAG_CLIENT_APPLIED_VERSION])
    assert 1 <= applied <= issued

    # The first version: the lr the trainer itself logs changes from the applied step on.
    v1 = ParamsVersion.model_validate(tracker.read_json(run_id, params_path(1)))
    client = MlflowClient(tracking_uri)
    applied_steps = {
        int(m.value): m.step for m in client.get_metric_history(run_id, "atm.params_version")
    }
    step1 = applied_steps[1]
    if applied == 1:
        assert int(tags[TAG_CLIENT_APPLIED_STEP]) == step1
    lr_log = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "learning_rate"))
    # Until a later version changes the lr again (a rollback alone, say, leaves it as v1 set it).
    next_lr_change = min(
        (
            step
            for version, step in applied_steps.items()
            if version > 1
            and ParamsVersion.model_validate(
                tracker.read_json(run_id, params_path(version))
            ).values.get("learning_rate")
            != v1.values["learning_rate"]
        ),
        default=10**9,
    )
    before = [v for s, v in lr_log if 10 < s < step1]
    after = [v for s, v in lr_log if step1 <= s < next_lr_change]
    assert before and after
    assert all(abs(v - before[0]) < 1e-12 for v in before)
    assert abs(after[0] - v1.values["learning_rate"]) / v1.values["learning_rate"] < 1e-6
    assert after[0] < before[0]

    # `atm log --json` shows the decision and the telemetry it was based on.
    log = subprocess.run(
        [sys.executable, "-m", "manager_daemon.cli", "log", run_id, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    records = [AuditRecord.model_validate_json(line) for line in log.stdout.splitlines()]
    first = next(r for r in records if r.params_version == 1)
    assert first.source == "rules" and first.status == "issued"
    assert first.proposal is not None and first.proposal.reason
    objective = first.telemetry["objective"]
    assert objective["metric"] == "eval_loss" and objective["evaluations"] >= 3
    assert objective["evals_since_best"] >= 1
    assert first.step is not None and first.step < step1 <= first.step + 60
