"""The training-side client against a real MLflow server."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from integrations.protocol import (
    METRIC_PARAMS_VERSION,
    SPEC_PATH,
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
    TAG_CLIENT_REJECTED,
    TAG_MANAGED,
    TAG_PARAMS_VERSION,
    ParamsVersion,
    RunSpec,
    Source,
    params_path,
)
from tests.helpers import LoopThread, issue, wait_for


@pytest.fixture
def loop(new_run, tracking_uri):
    run_id = new_run()
    thread = LoopThread(run_id, tracking_uri)
    thread.start()
    yield thread
    thread.stop()
    assert thread.error is None


def tags(tracker, run_id):
    return tracker.get_run(run_id).tags


def test_client_publishes_spec_and_heartbeats(loop, tracker) -> None:
    run_id = loop.knobs.client.run_id
    # Heartbeat first, then the spec, then the managed tag: a daemon never sees a spec
    # without a live client.
    wait_for(lambda: TAG_MANAGED in tags(tracker, run_id))
    assert tags(tracker, run_id)[TAG_MANAGED] == "true"
    assert TAG_CLIENT_HEARTBEAT in tags(tracker, run_id)
    spec = RunSpec.model_validate(tracker.read_json(run_id, SPEC_PATH))
    assert spec.framework == "torch"
    assert {k.name for k in spec.knobs} == {
        "learning_rate",
        "weight_decay",
        "dropout",
        "aux_weight",
    }
    assert spec.knob("learning_rate").value == pytest.approx(0.01)


def test_valid_version_is_applied_and_acknowledged(loop, tracker, tracking_uri) -> None:
    run_id = loop.knobs.client.run_id
    wait_for(lambda: TAG_CLIENT_HEARTBEAT in tags(tracker, run_id))
    issue(tracker, run_id, 1, {"learning_rate": 0.005, "aux_weight": 0.8, "dropout": 0.2})
    wait_for(lambda: tags(tracker, run_id).get(TAG_CLIENT_APPLIED_VERSION) == "1")
    applied_step = int(tags(tracker, run_id)[TAG_CLIENT_APPLIED_STEP])
    lrs = dict(loop.lrs)
    assert lrs[applied_step - 1] == pytest.approx(0.01)
    assert lrs[applied_step] == pytest.approx(0.005)
    assert loop.knobs["aux_weight"] == 0.8
    assert loop.model[1].p == 0.2
    history = MlflowClient(tracking_uri).get_metric_history(run_id, METRIC_PARAMS_VERSION)
    assert [(m.step, m.value) for m in history] == [(applied_step, 1.0)]


def test_client_refuses_bad_params_files_and_keeps_training(loop, tracker, tracking_uri) -> None:
    run_id = loop.knobs.client.run_id
    wait_for(lambda: TAG_CLIENT_HEARTBEAT in tags(tracker, run_id))
    mlflow = MlflowClient(tracking_uri)

    def refused(version: int) -> str:
        return wait_for(
            lambda: (
                (t := tags(tracker, run_id).get(TAG_CLIENT_REJECTED, "")).startswith(f"v{version}:")
                and t
            )
        )

    # 1: not JSON at all.
    mlflow.log_text(run_id, "{this is not json", params_path(1))
    tracker.set_tags(run_id, {TAG_PARAMS_VERSION: "1"})
    assert "malformed" in refused(1)
    # 2: a knob this run does not expose.
    issue(tracker, run_id, 2, {"momentum": 0.9})
    assert "unknown knob 'momentum'" in refused(2)
    # 3: outside the client's own bounds (learning_rate max is 10 × 0.01).
    issue(tracker, run_id, 3, {"learning_rate": 5.0})
    assert "outside" in refused(3)
    # 4: does not continue the chain.
    issue(tracker, run_id, 4, {"learning_rate": 0.005}, parent_version=1)
    assert "parent version 1" in refused(4)
    # 5: edited after signing.
    good = ParamsVersion(
        version=5,
        parent_version=4,
        issued_at=1.0,
        source=Source.HUMAN,
        decision_id=5,
        values={"learning_rate": 0.005},
    ).signed(None)
    tampered = good.model_dump(mode="json") | {"values": {"learning_rate": 0.1}}
    tracker.write_json(run_id, params_path(5), tampered)
    tracker.set_tags(run_id, {TAG_PARAMS_VERSION: "5"})
    assert "tampered" in refused(5)
    # 6: wrong type inside an otherwise well-formed file.
    tracker.write_json(
        run_id,
        params_path(6),
        good.model_dump(mode="json") | {"version": 6, "values": {"learning_rate": "fast"}},
    )
    tracker.set_tags(run_id, {TAG_PARAMS_VERSION: "6"})
    assert "invalid params file" in refused(6)

    assert TAG_CLIENT_APPLIED_VERSION not in tags(tracker, run_id)
    assert all(lr == pytest.approx(0.01) for _, lr in loop.lrs)
    step_before = loop.step
    wait_for(lambda: loop.step > step_before + 20)
    assert loop.is_alive() and loop.error is None
    # A good version after all that is applied.
    issue(tracker, run_id, 7, {"learning_rate": 0.02})
    wait_for(lambda: tags(tracker, run_id).get(TAG_CLIENT_APPLIED_VERSION) == "7")
    assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(0.02)


def test_stop_command_stops_the_loop(loop, tracker) -> None:
    run_id = loop.knobs.client.run_id
    wait_for(lambda: TAG_CLIENT_HEARTBEAT in tags(tracker, run_id))
    issue(tracker, run_id, 1, {}, commands=["stop"])
    loop.join(30)
    assert not loop.is_alive() and loop.knobs.stop_requested


def test_resume_reapplies_the_last_applied_version(new_run, tracker, tracking_uri) -> None:
    run_id = new_run()
    first = LoopThread(run_id, tracking_uri)
    first.start()
    wait_for(lambda: TAG_CLIENT_HEARTBEAT in tags(tracker, run_id))
    issue(tracker, run_id, 1, {"learning_rate": 0.004}, commands=["stop"])
    first.join(30)
    assert first.knobs.stop_requested
    # A new process on the same run, from a checkpoint: the lr comes back, the stop does not.
    second = LoopThread(run_id, tracking_uri)
    second.start()
    try:
        wait_for(lambda: second.optimizer.param_groups[0]["lr"] == pytest.approx(0.004))
        wait_for(lambda: second.step > 50)
        assert not second.knobs.stop_requested
    finally:
        second.stop()
