"""How a training process finds its W&B run, and what ``atm run`` hands a script for W&B."""

from __future__ import annotations

import mlflow
import pytest
import wandb
from typer.testing import CliRunner

from integrations.settings import ClientSettings
from integrations.trackers import RunBinding, bind_run, default_tracking_uri, launch_env
from integrations.trackers.wandb_backend import WandbTracker, suited_poll_interval
from manager_daemon.cli import app
from tests.wandb_server import WandbServer


@pytest.mark.slow
def test_a_script_logging_to_mlflow_and_wandb_is_managed_once_through_mlflow(
    tracking_uri: str, wandb_server: WandbServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    # A run of its own beside any the session's other tests left active (a plain init would
    # hand back one of those).
    run = wandb.init(
        entity=wandb_server.state.default_entity, project="binding", reinit="create_new"
    )
    try:
        with mlflow.start_run() as active:
            both = bind_run()
            assert both is not None and both.run_id == active.info.run_id
        only_wandb = bind_run()
        assert only_wandb is not None and only_wandb.run_id == run.id
        assert isinstance(only_wandb.tracker, WandbTracker)
        assert only_wandb.tracker.uri == f"wandb://{run.entity}/binding"
        # A loopback server is not the hosted service: the client's own default applies.
        assert only_wandb.poll_interval is None
    finally:
        run.finish()
    assert bind_run() is None, "a finished run is no longer the one the process logs to"


def test_wandb_environment_names_the_tracker_and_launches_into_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("ATM_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.setenv("WANDB_PROJECT", "vision")
    assert default_tracking_uri() == "wandb://team/vision"
    assert launch_env("wandb://team/vision", "abc123") == {
        "WANDB_ENTITY": "team",
        "WANDB_PROJECT": "vision",
        "WANDB_RUN_ID": "abc123",
        "WANDB_RESUME": "allow",
    }
    with pytest.raises(ValueError, match="wandb://ENTITY/PROJECT"):
        launch_env("wandb://a/b/c", None)


def test_clients_poll_the_hosted_service_less_often_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ATM_POLL_INTERVAL", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    hosted = RunBinding(WandbTracker("wandb://team/vision"), "r1", suited_poll_interval())
    assert hosted.poll_interval == 30.0
    assert ClientSettings().poll_interval_for(hosted) == 30.0
    monkeypatch.setenv("ATM_POLL_INTERVAL", "2")
    assert ClientSettings().poll_interval_for(hosted) == 2.0
    monkeypatch.delenv("ATM_POLL_INTERVAL")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:8080")
    own = RunBinding(WandbTracker("wandb://team/vision"), "r1", suited_poll_interval())
    assert ClientSettings().poll_interval_for(own) == ClientSettings().poll_interval == 5.0


def test_replicas_are_refused_on_wandb_before_anything_starts(wandb_server: WandbServer) -> None:
    uri = f"wandb://{wandb_server.state.default_entity}/replicas"
    args = ["daemon", "--tracking-uri", uri, "--policy", "rules", "--once"]
    result = CliRunner().invoke(app, [*args, "--replicas", "3", "--replica", "0"])
    assert result.exit_code == 2, result.output
    assert "3 replicas cannot share wandb://" in " ".join(result.output.split())
    alone = CliRunner().invoke(app, args)
    assert alone.exit_code == 0, alone.output
