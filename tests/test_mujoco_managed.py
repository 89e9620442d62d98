"""The ReacherObstacle script under the manager, on a real MLflow server and real MuJoCo: a human
`atm set` carrying `rollback_to_best` and a new collision penalty is applied at an evaluation's
boundary (the evaluation itself or one of the two rollouts after it, the script's window at
`--eval-every 4`),
and the run's own records show it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mujoco")

from mlflow.tracking import MlflowClient

from integrations.protocol import (
    METRIC_PARAMS_VERSION,
    SPEC_PATH,
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_MANAGED,
)
from integrations.trackers import Tracker
from manager_daemon.audit import AuditLog
from tests.helpers import wait_for

ATM = [sys.executable, "-m", "manager_daemon.cli"]


def test_rollback_and_reward_weight_apply_at_an_evaluation_boundary(
    tracking_uri: str, tracker: Tracker, repo_root: Path, tmp_path: Path
) -> None:
    log = tmp_path / "train.log"
    train = subprocess.Popen(
        [
            sys.executable,
            str(repo_root / "train_scripts" / "mujoco_reacher.py"),
            *("--recipe", "baseline", "--preset", "tiny", "--updates", "160", "--eval-every", "4"),
            *("--tracking-uri", tracking_uri, "--experiment", "mujoco-managed", "--managed"),
        ],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    client = MlflowClient(tracking_uri)
    try:
        experiment = wait_for(lambda: client.get_experiment_by_name("mujoco-managed"), 120)
        run_id = wait_for(
            lambda: next(iter(client.search_runs([experiment.experiment_id])), None), 60
        ).info.run_id
        wait_for(lambda: TAG_MANAGED in tracker.get_run(run_id).tags, 60)  # set after the spec
        spec = tracker.read_json(run_id, SPEC_PATH)
        assert "rollback_to_best" in spec["commands"]
        assert {"collision_penalty", "success_bonus", "progress_scale"} <= {
            k["name"] for k in spec["knobs"]
        }
        wait_for(lambda: client.get_metric_history(run_id, "eval/safe_success"), 120)
        done = subprocess.run(
            [*ATM, "set", run_id, "rollback_to_best", "collision_penalty=10",
             "--tracking-uri", tracking_uri],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        wait_for(lambda: TAG_CLIENT_APPLIED_VERSION in tracker.get_run(run_id).tags, 120)
        out, _ = train.communicate(timeout=300)
    finally:
        if train.poll() is None:
            train.kill()
    assert train.returncode == 0, log.read_text()[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["run_id"] == run_id

    tags = tracker.get_run(run_id).tags
    applied_at = int(tags[TAG_CLIENT_APPLIED_STEP])
    eval_steps = {m.step for m in client.get_metric_history(run_id, "eval/safe_success")}
    window = 2 * (2 * 64)  # half of 4 updates, each of 2 envs × 64 steps
    assert any(0 <= applied_at - step <= window for step in eval_steps), (
        f"applied at {applied_at}, not within two rollouts of an evaluation {sorted(eval_steps)}"
    )
    assert {m.step for m in client.get_metric_history(run_id, METRIC_PARAMS_VERSION)} == {
        applied_at
    }
    for split in ("easy", "medium", "hard"):
        assert client.get_metric_history(run_id, f"eval/{split}/collision")
    record = AuditLog(tracker).records(run_id)[-1]
    assert [c.command for c in record.command_verdicts if c.verdict == "accepted"] == [
        "rollback_to_best"
    ]
    assert "atm: rolled back to the best evaluation" in log.read_text()
    assert "collision_penalty" in log.read_text().split("applied params v1")[1].splitlines()[0]
