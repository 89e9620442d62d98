"""`atm run` on Weights & Biases: unmodified scripts that log only with ``wandb``
(tests/data/scripts, importing nothing from this project) are supervised by `atm daemon
--tracking-uri wandb://…` through the loopback W&B server, read back with ``wandb.Api``.
The daemon's LLM is a loopback OpenAI-compatible server replaying one decision: halve the
learning rate."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import wandb

from integrations.protocol import (
    SPEC_PATH,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_MANAGED,
    TAG_PARAMS_VERSION,
    ParamsVersion,
    RunSpec,
    params_path,
    wandb_key,
)
from integrations.trackers import open_tracker
from tests.openai_replay import ReplayServer, halve_lr
from tests.wandb_fixtures import child_env, wandb_env, wandb_server  # noqa: F401  (a fixture)
from tests.wandb_server import WandbServer

SCRIPTS = Path(__file__).parent / "data" / "scripts"
ATM = [sys.executable, "-m", "manager_daemon.cli"]


@pytest.fixture
def replay() -> Iterator[ReplayServer]:
    server = ReplayServer()
    yield server
    server.close()


def supervise(
    server: WandbServer,
    replay: ReplayServer,
    tmp_path: Path,
    script: list[str],
    objective: str,
    *,
    timeout: float = 300,
) -> tuple[str, str]:
    """Run ``script`` under `atm run` beside `atm daemon` on a fresh W&B project; return the
    tracking URI and the id of the run the script logged to."""
    project = f"atm-run-{uuid.uuid4().hex[:8]}"
    uri = f"wandb://{server.state.default_entity}/{project}"
    env = {
        **child_env(),
        **wandb_env(server, tmp_path / "wandb"),
        "OPENAI_API_KEY": "unused",
        "ATM_TRACKING_URI": uri,
    }
    daemon_log = tmp_path / "daemon.log"
    daemon = subprocess.Popen(
        [
            *ATM,
            "daemon",
            "--experiment",
            project,
            "--interval",
            "1",
            "--policy",
            "llm",
            "--llm-base-url",
            replay.base_url,
            "--llm-model",
            "replay",
            "--llm-fallback",
            "none",
            "--stale-evals",
            "100",
        ],
        stdout=daemon_log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        train = subprocess.run(
            [*ATM, "run", "--objective", objective, "--poll-interval", "0.5", "--", *script],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=tmp_path,
        )
    finally:
        daemon.terminate()
        daemon.wait(60)
    assert train.returncode == 0, train.stderr[-3000:]
    runs = [
        r for r in server.state.runs.values() if r.project == project and r.job_type != "atm-daemon"
    ]
    assert len(runs) == 1, [r.name for r in runs] + [daemon_log.read_text()[-2000:]]
    return uri, runs[0].name


def assert_lr_halved(uri: str, run_id: str, lr_key: str, start: float) -> None:
    """Version 1 was issued and applied, the acks are in the run, and the lr the script
    itself logs went from ``start`` to half and stayed there."""
    tracker = open_tracker(uri)
    tags = tracker.get_run(run_id).tags
    assert tags[TAG_MANAGED] == "true" and int(tags[TAG_PARAMS_VERSION]) >= 1
    assert int(tags[TAG_CLIENT_APPLIED_VERSION]) >= 1
    v1 = ParamsVersion.model_validate(tracker.read_json(run_id, params_path(1)))
    assert v1.values["learning_rate"] == pytest.approx(start / 2)
    entity, project = uri.removeprefix("wandb://").split("/")
    run = wandb.Api().run(f"{entity}/{project}/{run_id}")
    # The ack and the applied value are in the run, which used the version it applied.
    assert run.summary[wandb_key(TAG_CLIENT_APPLIED_VERSION)] >= 1
    assert run.config["learning_rate"] == pytest.approx(start / 2)
    assert f"atm-params-{run_id}" in {a.name.split(":")[0] for a in run.used_artifacts()}
    logged = [row[lr_key] for row in run.scan_history(keys=[lr_key])]
    assert logged[0] == pytest.approx(start)
    assert logged[-1] == pytest.approx(start / 2), logged
    first_half = next(i for i, v in enumerate(logged) if v == pytest.approx(start / 2))
    assert all(v == pytest.approx(start / 2) for v in logged[first_half:])


def published_spec(uri: str, run_id: str) -> RunSpec:
    return RunSpec.model_validate(open_tracker(uri).read_json(run_id, SPEC_PATH))


@pytest.mark.slow
def test_plain_torch_loop_logging_to_wandb_is_supervised(
    wandb_server: WandbServer,  # noqa: F811
    replay: ReplayServer,
    tmp_path: Path,
) -> None:
    replay.replies = [halve_lr(0.01)]
    uri, run_id = supervise(
        wandb_server,
        replay,
        tmp_path,
        [sys.executable, str(SCRIPTS / "wandb_torch_loop.py"), "400", "0.03"],
        "minimize:eval_loss",
    )
    spec = published_spec(uri, run_id)
    assert spec.framework == "torch"
    assert {k.name for k in spec.knobs} == {"learning_rate", "weight_decay"}
    assert_lr_halved(uri, run_id, "lr", 0.01)
