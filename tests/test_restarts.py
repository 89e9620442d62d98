"""A trainer restarted from a checkpoint: an unmodified transformers ``Trainer`` script under
`atm run --run-id RUN`, killed, then resumed with ``resume_from_checkpoint``, on a real MLflow
server. The restart re-applies the last version exactly once, and the version issued while it
was down is applied after."""

from __future__ import annotations

import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from integrations.protocol import TAG_CLIENT_APPLIED_STEP, TAG_CLIENT_APPLIED_VERSION, TAG_MANAGED
from tests.helpers import wait_for
from tests.trainers import SCRIPTS, applied, atm_run, atm_set, lr_from, trace


def _tags(client: MlflowClient, run_id: str) -> dict[str, str]:
    return client.get_run(run_id).data.tags


def _checkpoints(out: Path) -> list[int]:
    return sorted(
        int(m.group(1)) for p in out.glob("checkpoint-*") if (m := re.search(r"-(\d+)$", p.name))
    )


@pytest.mark.slow
def test_a_restarted_trainer_reapplies_its_last_version_once_then_the_one_issued_meanwhile(
    tracking_uri: str, new_run, tmp_path: Path
) -> None:
    run_id, client = new_run(), MlflowClient(tracking_uri)
    out = tmp_path / "out"

    def trainer(name: str, *extra: str):
        script = [sys.executable, str(SCRIPTS / "hf_trainer.py"), str(out), "5000", "0.03"]
        command = [*script, "--save-steps", "10", "--trace", str(tmp_path / name), *extra]
        return atm_run(tracking_uri, run_id, command, tmp_path / f"{name}.log", cwd=tmp_path)

    first = trainer("first")
    try:
        wait_for(lambda: _tags(client, run_id).get(TAG_MANAGED) == "true", 120)
        atm_set(tracking_uri, run_id, "learning_rate=5e-4")
        wait_for(lambda: _tags(client, run_id).get(TAG_CLIENT_APPLIED_VERSION) == "1", 60)
        applied_at = int(_tags(client, run_id)[TAG_CLIENT_APPLIED_STEP])
        # A checkpoint taken under version 1 (its optimizer state holds the new lr already),
        # known complete: the trainer has begun the next one since.
        wait_for(lambda: len([s for s in _checkpoints(out) if s > applied_at]) >= 2, 60)
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: nothing of the process runs any more
        first.wait(30)
    resumed_from = next(s for s in _checkpoints(out) if s > applied_at)
    for step in _checkpoints(out):
        if step > resumed_from:  # perhaps cut short by the crash: resume from the one before
            shutil.rmtree(out / f"checkpoint-{step}")
    atm_set(tracking_uri, run_id, "learning_rate=2.5e-4")  # version 2, while no trainer runs

    second = trainer("second", "--resume")
    try:
        wait_for(lambda: _tags(client, run_id).get(TAG_CLIENT_APPLIED_VERSION) == "2", 120)
        atm_set(tracking_uri, run_id, "stop")
        assert second.wait(60) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        second.kill()

    history = applied(client, run_id)
    assert history[0] == (1, applied_at)
    after = history[1:]
    assert [version for version, _ in after] == [1, 2, 3], "v1 once again, then v2, then stop"
    steps = [step for _, step in after]
    assert resumed_from < steps[0] < steps[1] < steps[2], (resumed_from, history)
    # The lr the resumed trainer used: the checkpoint's (version 1's), unchanged by re-applying
    # version 1 (not halved again), then version 2's.
    resumed = trace(tmp_path / "second" / "rank0.jsonl")
    assert resumed[0][0] == resumed_from + 1
    assert lr_from(resumed, [(0, 5e-4), (steps[1], 2.5e-4)]), (history, resumed[::5])
