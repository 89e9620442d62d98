"""Launching real training processes for tests: `atm run`, torchrun ranks, their traces, and
issuing versions the way a person does (`atm set`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from integrations.protocol import METRIC_PARAMS_VERSION
from manager_daemon.cli import app

SCRIPTS = Path(__file__).parent / "data" / "scripts"
ATM = [sys.executable, "-m", "manager_daemon.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def atm_run(
    tracking_uri: str,
    run_id: str,
    command: list[str],
    log: Path,
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``atm run --run-id RUN -- COMMAND``, polling every half second; output to ``log``."""
    return subprocess.Popen(
        [
            *ATM,
            "run",
            "--run-id",
            run_id,
            "--tracking-uri",
            tracking_uri,
            "--poll-interval",
            "0.5",
            "--",
            *command,
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def atm_set(tracking_uri: str, run_id: str, *assignments: str) -> None:
    """``atm set RUN k=v…``: a version validated, audited and issued as a person issues it."""
    result = CliRunner().invoke(
        app,
        ["set", run_id, *assignments, "--tracking-uri", tracking_uri, "--cooldown-steps", "0"],
    )
    assert result.exit_code == 0, result.output


def trace(path: Path) -> list[tuple[int, float]]:
    """(step, learning rate) as a training script recorded them, in order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(row["step"], row["lr"]) for row in rows if "step" in row]


def applied(client: MlflowClient, run_id: str) -> list[tuple[int, int]]:
    """(version, step) of every acknowledged application, in the order they were logged."""
    history = client.get_metric_history(run_id, METRIC_PARAMS_VERSION)
    return [(int(m.value), m.step) for m in sorted(history, key=lambda m: m.timestamp)]


def lr_from(points: list[tuple[int, float]], changes: list[tuple[int, float]]) -> bool:
    """Whether every (step, lr) is the lr of the last change at or before that step."""
    for step, lr in points:
        expected = [value for at, value in changes if at <= step][-1]
        if abs(lr - expected) > 1e-12:
            return False
    return True
