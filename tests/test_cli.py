"""The ``atm`` CLI on every backend: verbs, verdicts, and one-line errors."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from integrations.protocol import (
    SPEC_PATH,
    TAG_CLIENT_HEARTBEAT,
    TAG_LAST_INTERVENTION,
    TAG_MANAGED,
    TAG_OBJECTIVE,
    TAG_PARAMS_VERSION,
    AuditRecord,
    Command,
    KnobSpec,
    ParamsVersion,
    RunSpec,
    params_path,
)
from manager_daemon import cli
from manager_daemon.cli import app
from manager_daemon.mlflow_server import free_port
from tests.conftest import Backend

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables and error lines wide enough that they are not wrapped in the captured output."""
    monkeypatch.setattr(cli.console, "width", 250)
    monkeypatch.setattr(cli.err_console, "width", 250)


def atm(uri: str, *args: str):
    return runner.invoke(app, [*args, "--tracking-uri", uri])


def publish_spec(tracker, run_id: str) -> None:
    spec = RunSpec(
        framework="torch",
        knobs=[
            KnobSpec(
                name="learning_rate", value=1e-3, min=1e-6, max=1e-2, max_rel_step=3.0, scale="log"
            ),
            KnobSpec(name="weight_decay", value=0.0, min=0.0, max=0.5, max_rel_step=0.2),
        ],
        commands=[Command.STOP],
    )
    tracker.write_json(run_id, SPEC_PATH, spec.model_dump(mode="json"))
    tracker.set_tags(run_id, {TAG_CLIENT_HEARTBEAT: str(time.time())})


def test_attach_status_detach(backend: Backend) -> None:
    tracking_uri, tracker, new_run = backend.uri, backend.tracker, backend.new_run
    run_id = new_run("attach-me")
    result = atm(tracking_uri, "attach", run_id, "--objective", "maximize:eval/acc")
    assert result.exit_code == 0, result.output
    assert "advisory" in result.output
    tags = tracker.get_run(run_id).tags
    assert tags[TAG_MANAGED] == "true" and tags[TAG_OBJECTIVE] == "maximize:eval/acc"
    result = runner.invoke(app, ["status", "--tracking-uri", tracking_uri])
    assert result.exit_code == 0 and run_id[:12] in result.output and "advisory" in result.output
    assert atm(tracking_uri, "detach", run_id).exit_code == 0
    assert tracker.get_run(run_id).tags[TAG_MANAGED] == "false"


def test_set_issues_a_validated_audited_version(backend: Backend) -> None:
    tracking_uri, tracker, new_run = backend.uri, backend.tracker, backend.new_run
    run_id = new_run()
    publish_spec(tracker, run_id)
    result = atm(
        tracking_uri, "set", run_id, "learning_rate=5e-4", "weight_decay=0.4", "--reason", "too hot"
    )
    assert result.exit_code == 0, result.output
    assert "issued params v1" in result.output
    tags = tracker.get_run(run_id).tags
    assert tags[TAG_PARAMS_VERSION] == "1" and "too hot" in tags[TAG_LAST_INTERVENTION]
    params = ParamsVersion.model_validate(tracker.read_json(run_id, params_path(1)))
    assert params.source == "human" and params.parent_version == 0
    # weight_decay 0.4 is more than one step (0.1) away: clamped, not refused.
    assert params.values == {"learning_rate": 5e-4, "weight_decay": pytest.approx(0.1)}
    assert params.signature_problem(None) is None


def test_set_rejections_are_audited_and_issue_nothing(backend: Backend) -> None:
    tracking_uri, tracker, new_run = backend.uri, backend.tracker, backend.new_run
    run_id = new_run()
    publish_spec(tracker, run_id)
    assert atm(tracking_uri, "set", run_id, "learning_rate=5e-4").exit_code == 0
    result = atm(tracking_uri, "set", run_id, "learning_rate=2.5e-4")  # within the cooldown
    assert result.exit_code == 1
    assert "inside cooldown" in result.output
    assert tracker.get_run(run_id).tags[TAG_PARAMS_VERSION] == "1"
    lines = atm(tracking_uri, "log", run_id, "--json").output.strip().splitlines()
    record = AuditRecord.model_validate_json(lines[-1])
    assert record.status == "rejected" and record.params_version is None
    assert {v.knob: v.verdict for v in record.verdicts} == {"learning_rate": "rejected"}
    assert record.telemetry is not None and "objective" in record.telemetry


@pytest.mark.parametrize(
    ("assignments", "message"),
    [
        (["learning_rate=-1"], "learning_rate=-1 is outside its bounds [1e-06, 0.01]"),
        (["learning_rate=0.5", "stop"], "learning_rate=0.5 is outside its bounds [1e-06, 0.01]"),
        (["learning_rate=nan"], "learning_rate=nan is not a finite number"),
        (["learning_rate=inf"], "learning_rate=inf is not a finite number"),
        (["learning_rat=1e-4"], "learning_rat is not a knob of this run (did you mean"),
        (["rollback_to_best"], "this run does not carry out rollback_to_best (its commands: stop)"),
    ],
)
def test_set_refuses_what_the_run_cannot_take_and_starts_no_cooldown(
    backend: Backend, assignments: list[str], message: str
) -> None:
    tracking_uri, tracker, new_run = backend.uri, backend.tracker, backend.new_run
    run_id = new_run()
    publish_spec(tracker, run_id)
    result = atm(tracking_uri, "set", run_id, *assignments)
    assert result.exit_code == 2, result.output
    assert message in result.output and "nothing issued" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert TAG_PARAMS_VERSION not in tracker.get_run(run_id).tags
    assert tracker.read_json(run_id, params_path(1)) is None
    # Nothing was decided, so nothing holds up the change meant.
    result = atm(tracking_uri, "set", run_id, "learning_rate=5e-4")
    assert result.exit_code == 0 and "issued params v1" in result.output, result.output
    params = ParamsVersion.model_validate(tracker.read_json(run_id, params_path(1)))
    assert params.values["learning_rate"] == 5e-4


def test_log_table_shows_each_decision(backend: Backend) -> None:
    tracking_uri, tracker, new_run = backend.uri, backend.tracker, backend.new_run
    run_id = new_run()
    publish_spec(tracker, run_id)
    atm(tracking_uri, "set", run_id, "learning_rate=2e-3")
    result = runner.invoke(app, ["log", run_id, "--tracking-uri", tracking_uri])
    assert result.exit_code == 0
    assert (
        "d000001" in result.output
        and "issued v1" in result.output
        and "learning_rate" in result.output
    )


def test_set_without_a_client_is_advisory(backend: Backend) -> None:
    tracking_uri, tracker, new_run = backend.uri, backend.tracker, backend.new_run
    run_id = new_run()
    publish_spec(tracker, run_id)
    tracker.delete_tag(run_id, TAG_CLIENT_HEARTBEAT)
    result = atm(tracking_uri, "set", run_id, "learning_rate=2e-3")
    assert result.exit_code == 0 and "advisory" in result.output
    assert TAG_PARAMS_VERSION not in tracker.get_run(run_id).tags


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["set", "RUN", "learning_rate=fast"], 2, "is not a number"),
        (["set", "RUN", "explode"], 2, "neither KNOB=VALUE nor a command"),
        (["attach", "RUN", "--objective", "eval_loss"], 2, "minimize:METRIC"),
        (["log", "0123456789abcdef0123456789abcdef"], 1, "no run"),
        (["set", "RUN", "learning_rate=1e-3"], 2, "no knob spec"),
    ],
)
def test_bad_input_gives_one_clear_line(backend: Backend, args, code, message) -> None:
    run_id = backend.new_run()
    result = atm(backend.uri, *[run_id if a == "RUN" else a for a in args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) <= 2 and "Traceback" not in result.output


def test_unreachable_tracker_is_one_line_and_exit_3() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    for args in (["status"], ["log", "abc"], ["daemon", "--once"]):
        result = runner.invoke(app, [*args, "--tracking-uri", uri])
        assert result.exit_code == 3, (args, result.output)
        assert "unreachable" in result.output and "Traceback" not in result.output


def test_no_tracker_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ATM_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2 and "MLFLOW_TRACKING_URI" in result.output


def test_log_json_is_one_object_per_line(backend: Backend) -> None:
    tracking_uri, tracker, new_run = backend.uri, backend.tracker, backend.new_run
    run_id = new_run()
    publish_spec(tracker, run_id)
    atm(tracking_uri, "set", run_id, "learning_rate=2e-3")
    atm(tracking_uri, "set", run_id, "stop")
    lines = atm(tracking_uri, "log", run_id, "--json").output.strip().splitlines()
    assert [json.loads(line)["decision_id"] for line in lines] == [1, 2]
    assert json.loads(lines[1])["command_verdicts"][0]["command"] == "stop"
