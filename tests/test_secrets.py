"""No secret is ever written, shown or logged: API keys, the signing key, tracker passwords
(in the environment or in a URI's ``user:password@``) stay out of audit records, params, tags,
logs, prompts, CLI output and error messages, on the error paths too."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from typer.testing import CliRunner

from integrations.protocol import AUDIT_DIR, PARAMS_DIR, SPEC_PATH
from integrations.trackers import open_tracker
from manager_daemon import cli
from manager_daemon.cli import app
from manager_daemon.mlflow_server import free_port
from tests.conftest import Backend
from tests.helpers import overfitting_run
from tests.openai_replay import ReplayServer, Reply, halve_lr

SECRETS = {
    "OPENAI_API_KEY": "sk-test-0PENAIKEY7c1d9e",
    "ATM_SIGNING_KEY": "SIGNINGKEY51b0c3SIGNINGKEY51b0c3",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOWPASS9a8e77",
    "WANDB_API_KEY": "WANDBKEY0d3f" * 4,
}
TRACKER_PASSWORD = "URIPASS44e1f0"
ENDPOINT_PASSWORD = "LLMPASS1f2a5c"
EVERY_SECRET = [
    *SECRETS.values(),
    TRACKER_PASSWORD,
    ENDPOINT_PASSWORD,
    # As HTTP basic authentication sends them.
    base64.b64encode(f"atm:{TRACKER_PASSWORD}".encode()).decode(),
    base64.b64encode(f"atm:{ENDPOINT_PASSWORD}".encode()).decode(),
]


def with_password(uri: str, password: str) -> str:
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://atm:{password}@{rest}"


def leaks(text: str) -> list[str]:
    return [secret for secret in EVERY_SECRET if secret in text]


@pytest.mark.slow
def test_no_secret_is_written_shown_or_logged(
    mlflow_backend: Backend,
    replay: ReplayServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "atm")
    monkeypatch.setattr(cli.console, "width", 250)
    caplog.set_level(logging.DEBUG)
    uri = with_password(mlflow_backend.uri, TRACKER_PASSWORD)
    runs = [overfitting_run(mlflow_backend) for _ in range(2)]
    shown: list[str] = []

    def atm(*args: str) -> int:
        result = CliRunner().invoke(app, [*args])
        shown.append(result.output)
        if result.exception and not isinstance(result.exception, SystemExit):
            shown.append(repr(result.exception))
        return result.exit_code

    def daemon(endpoint: str) -> int:
        return atm(
            *("daemon", "--once", "--tracking-uri", uri, "--experiment", mlflow_backend.experiment),
            *("--llm-base-url", endpoint, "--llm-model", "replay", "--llm-fallback", "rules"),
        )

    # A server error that echoes the credentials it was sent, and a good answer.
    replay.replies = [Reply(status=500, echo_credentials=True), halve_lr(1e-3)]
    assert daemon(with_password(replay.base_url, ENDPOINT_PASSWORD)) == 0
    # An endpoint that does not answer at all.
    mlflow_backend.log_history(runs[0], [(80, {"eval_loss": 2.6})])
    mlflow_backend.log_history(runs[1], [(80, {"eval_loss": 2.6})])
    closed = with_password(f"http://127.0.0.1:{free_port()}/v1", ENDPOINT_PASSWORD)
    assert daemon(closed) == 0
    assert len(replay.requests) == 2, "the model was asked once per run"

    assert atm("status", "--tracking-uri", uri) == 0
    for run_id in runs:
        assert atm("log", run_id, "--tracking-uri", uri) == 0
        assert atm("log", run_id, "--json", "--tracking-uri", uri) == 0
    assert (
        atm("set", runs[0], "learning_rate=2e-4", "--cooldown-steps", "0", "--tracking-uri", uri)
        == 0
    ), shown[-1]
    # Error paths: an unreachable tracker, a run that does not exist.
    unreachable = with_password(f"http://127.0.0.1:{free_port()}", TRACKER_PASSWORD)
    assert atm("status", "--tracking-uri", unreachable) == 3
    assert atm("set", "no-such-run", "learning_rate=5e-4", "--tracking-uri", uri) != 0

    tracker = open_tracker(mlflow_backend.uri)
    written: list[str] = []
    errors = []
    for run_id in runs:
        written.append(json.dumps(tracker.get_run(run_id).tags))
        paths = [SPEC_PATH, *tracker.list_artifacts(run_id, PARAMS_DIR)]
        paths += tracker.list_artifacts(run_id, AUDIT_DIR)
        for path in paths:
            payload = tracker.read_json(run_id, path)
            written.append(json.dumps(payload, ensure_ascii=False))
            if path.startswith(AUDIT_DIR) and payload.get("error"):
                errors.append(payload["error"])
    prompts = json.dumps(replay.requests, ensure_ascii=False)

    # The error paths were taken and recorded.
    assert any("server_error" in e for e in errors) and any("unavailable" in e for e in errors)
    assert any("***" in e for e in errors), "the echoed credentials were masked"
    assert "tracker unreachable at http://***@" in "".join(shown)
    assert {"written": leaks("\n".join(written))} == {"written": []}
    assert {"prompts": leaks(prompts)} == {"prompts": []}
    assert {"logs": leaks(caplog.text)} == {"logs": []}
    assert {"cli": leaks("\n".join(shown))} == {"cli": []}
