"""`atm run` on Weights & Biases: unmodified scripts that log only with ``wandb``
(tests/data/scripts, importing nothing from this project) are supervised by `atm daemon
--tracking-uri wandb://…` through the loopback W&B server, read back with ``wandb.Api``.
The daemon's LLM is a loopback OpenAI-compatible server replaying one decision: halve the
learning rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from integrations.protocol import (
    TAG_CLIENT_APPLIED_VERSION,
    TAG_MANAGED,
    TAG_PARAMS_VERSION,
    ParamsVersion,
    RunSpec,
    wandb_key,
)
from tests.openai_replay import ReplayServer, halve_lr
from tests.wandb_fixtures import child_env, wandb_env, wandb_server  # noqa: F401  (a fixture)
from tests.wandb_server import WandbServer

SCRIPTS = Path(__file__).parent / "data" / "scripts"
ATM = [sys.executable, "-m", "manager_daemon.cli"]


def supervise(
    uri: str,
    tracker_env: dict[str, str],
    replay: ReplayServer,
    tmp_path: Path,
    script: list[str],
    objective: str,
    *,
    timeout: float = 600,
) -> dict[str, Any]:
    """Run ``script`` under `atm run` beside `atm daemon --tracking-uri URI` (a project of
    its own); return what ``inspect_run`` reads of the one training run it logged to."""
    project = uri.rsplit("/", 1)[-1]
    env = {**tracker_env, "OPENAI_API_KEY": "unused", "ATM_TRACKING_URI": uri}
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
    seen = subprocess.run(
        [sys.executable, "-c", INSPECT, uri],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert seen.returncode == 0, seen.stderr[-3000:] + daemon_log.read_text()[-3000:]
    return json.loads(seen.stdout.strip().splitlines()[-1])


# What a reader in a process of its own (with the tracker's environment) sees of the project's
# one training run: through the tracker backend, and through wandb.Api as a W&B user would.
INSPECT = """
import json, sys
import wandb
from integrations.protocol import SPEC_PATH, params_path
from integrations.trackers import open_tracker

uri = sys.argv[1]
entity, project = uri.removeprefix("wandb://").split("/")
api = wandb.Api()
runs = [r for r in api.runs(f"{entity}/{project}") if r.job_type != "atm-daemon"]
assert len(runs) == 1, [r.id for r in runs]
run = runs[0]
tracker = open_tracker(uri)
history = {
    key: [row[key] for row in run.scan_history(keys=[key])]
    for key in ("lr", "train/learning_rate")
}
print(json.dumps({
    "run_id": run.id,
    "tags": tracker.get_run(run.id).tags,
    "spec": tracker.read_json(run.id, SPEC_PATH),
    "v1": tracker.read_json(run.id, params_path(1)),
    "summary": {k: v for k, v in run.summary.items() if k.startswith("atm/")},
    "config": dict(run.config),
    "used": [a.name for a in run.used_artifacts()],
    "history": history,
}))
"""


def assert_lr_halved(seen: dict[str, Any], lr_key: str, start: float) -> None:
    """Version 1 was issued and applied, the acks are in the run, and the lr the script
    itself logs went from ``start`` to half and stayed there."""
    tags = seen["tags"]
    assert tags[TAG_MANAGED] == "true" and int(tags[TAG_PARAMS_VERSION]) >= 1
    assert int(tags[TAG_CLIENT_APPLIED_VERSION]) >= 1
    v1 = ParamsVersion.model_validate(seen["v1"])
    assert v1.values["learning_rate"] == pytest.approx(start / 2)
    # The ack and the applied value are in the run, which used the version it applied.
    assert seen["summary"][wandb_key(TAG_CLIENT_APPLIED_VERSION)] >= 1
    assert seen["config"]["learning_rate"] == pytest.approx(start / 2)
    assert any(name.startswith(f"atm-params-{seen['run_id']}:") for name in seen["used"])
    logged = seen["history"][lr_key]
    assert logged[0] == pytest.approx(start)
    assert logged[-1] == pytest.approx(start / 2), logged
    first_half = next(i for i, v in enumerate(logged) if v == pytest.approx(start / 2))
    assert all(v == pytest.approx(start / 2) for v in logged[first_half:])


def loopback(server: WandbServer, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A fresh project on the loopback server, and the environment that reaches it."""
    uri = f"wandb://{server.state.default_entity}/atm-run-{uuid.uuid4().hex[:8]}"
    return uri, {**child_env(), **wandb_env(server, tmp_path / "wandb")}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_plain_torch_loop_logging_to_wandb_is_supervised(
    wandb_server: WandbServer,  # noqa: F811
    replay: ReplayServer,
    tmp_path: Path,
) -> None:
    replay.replies = [halve_lr(0.01)]
    seen = supervise(
        *loopback(wandb_server, tmp_path),
        replay,
        tmp_path,
        [sys.executable, str(SCRIPTS / "wandb_torch_loop.py"), "1200", "0.04"],
        "minimize:eval_loss",
    )
    spec = RunSpec.model_validate(seen["spec"])
    assert spec.framework == "torch"
    assert {k.name for k in spec.knobs} == {"learning_rate", "weight_decay"}
    assert_lr_halved(seen, "lr", 0.01)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_transformers_trainer_reporting_to_wandb_is_supervised(
    wandb_server: WandbServer,  # noqa: F811
    replay: ReplayServer,
    tmp_path: Path,
) -> None:
    replay.replies = [halve_lr(1e-3)]
    seen = supervise(
        *loopback(wandb_server, tmp_path),
        replay,
        tmp_path,
        [
            sys.executable,
            str(SCRIPTS / "wandb_hf_trainer.py"),
            str(tmp_path / "out"),
            "400",
            "0.08",
        ],
        # The Trainer's W&B integration logs eval_loss as eval/loss.
        "minimize:eval/loss",
    )
    assert RunSpec.model_validate(seen["spec"]).framework == "transformers"
    assert_lr_halved(seen, "train/learning_rate", 1e-3)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_stable_baselines3_ppo_logging_to_wandb_is_supervised(
    wandb_server: WandbServer,  # noqa: F811
    replay: ReplayServer,
    tmp_path: Path,
) -> None:
    replay.replies = [halve_lr(3e-4)]
    seen = supervise(
        *loopback(wandb_server, tmp_path),
        replay,
        tmp_path,
        [sys.executable, str(SCRIPTS / "wandb_sb3_ppo.py"), "20480", "0.3"],
        "maximize:mean_reward",
    )
    spec = RunSpec.model_validate(seen["spec"])
    assert spec.framework == "stable-baselines3"
    assert {"learning_rate", "ent_coef", "clip_range"} <= {k.name for k in spec.knobs}
    assert_lr_halved(seen, "lr", 3e-4)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_lightning_script_logging_through_wandblogger_is_supervised(
    wandb_server: WandbServer,  # noqa: F811
    replay: ReplayServer,
    tmp_path: Path,
) -> None:
    replay.replies = [halve_lr(0.01)]
    seen = supervise(
        *loopback(wandb_server, tmp_path),
        replay,
        tmp_path,
        [sys.executable, str(SCRIPTS / "wandb_lightning.py"), "1200", "0.04"],
        "minimize:val_loss",
    )
    spec = RunSpec.model_validate(seen["spec"])
    assert spec.framework == "lightning"
    assert {k.name for k in spec.knobs} == {
        "learning_rate",
        "weight_decay",
        "dropout",
        "max_grad_norm",
    }
    assert_lr_halved(seen, "lr", 0.01)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_an_accelerate_loop_logging_through_its_wandb_tracker_is_supervised(
    wandb_server: WandbServer,  # noqa: F811
    replay: ReplayServer,
    tmp_path: Path,
) -> None:
    replay.replies = [halve_lr(0.01)]
    seen = supervise(
        *loopback(wandb_server, tmp_path),
        replay,
        tmp_path,
        [sys.executable, str(SCRIPTS / "accelerate_loop.py"), "1200", "0.04", "wandb"],
        "minimize:eval_loss",
    )
    assert RunSpec.model_validate(seen["spec"]).framework == "torch"
    assert_lr_halved(seen, "lr", 0.01)


# The environment before any fixture points W&B at the loopback server.
LIVE_ENV = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}


def _why_not_live() -> str | None:
    base = LIVE_ENV.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not LIVE_ENV.get("WANDB_API_KEY"):
        return "set WANDB_API_KEY (and WANDB_ENTITY) to run the scenario against W&B itself"
    if "127.0.0.1" in base or "localhost" in base:
        return "WANDB_BASE_URL points at a loopback server, not at W&B"
    if not LIVE_ENV.get("WANDB_ENTITY"):
        return "set WANDB_ENTITY: the live scenario makes a project of its own there"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_why_not_live() is not None, reason=_why_not_live() or "")
def test_plain_torch_loop_is_supervised_on_the_live_service(
    replay: ReplayServer, tmp_path: Path
) -> None:
    """The loopback scenario against W&B itself (hosted or a server of one's own)."""
    replay.replies = [halve_lr(0.01)]
    uri = f"wandb://{LIVE_ENV['WANDB_ENTITY']}/atm-live-{uuid.uuid4().hex[:8]}"
    env = {**LIVE_ENV, "ATM_POLL_INTERVAL": "5"}
    seen = supervise(
        uri,
        env,
        replay,
        tmp_path,
        [sys.executable, str(SCRIPTS / "wandb_torch_loop.py"), "3000", "0.05"],
        "minimize:eval_loss",
    )
    assert_lr_halved(seen, "lr", 0.01)
