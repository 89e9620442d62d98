"""What the benchmark scripts share: a tracking server, daemons on a scheduler, training runs
as subprocesses, and reading back curves and interventions from MLflow."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from integrations.protocol import METRIC_PARAMS_VERSION, AuditRecord
from integrations.trackers import Tracker, open_tracker
from manager_daemon.audit import AuditLog
from manager_daemon.daemon import Daemon, in_background
from manager_daemon.mlflow_server import start_server
from manager_daemon.policies.factory import make_policy
from manager_daemon.settings import DaemonSettings
from manager_daemon.supervisor import SupervisorConfig

log = logging.getLogger("bench")

DAEMON_INTERVAL_S = 2.0


@contextlib.contextmanager
def tracking_uri(out: Path) -> Iterator[str]:
    """``MLFLOW_TRACKING_URI`` if set, else a local server whose store stays under ``out``."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        yield uri
        return
    server = start_server(out / "mlflow")
    try:
        yield server.uri
    finally:
        server.stop()


@contextlib.contextmanager
def daemons(
    uri: str,
    policies: dict[str, DaemonSettings],
    config_of: dict[str, SupervisorConfig],
    experiment_of: dict[str, str],
) -> Iterator[None]:
    """One daemon per policy, each with its own settings managing the runs of its own
    experiment, until exit."""
    tracker = open_tracker(uri)
    running: list[Daemon] = []
    for name, settings in policies.items():
        policy, why = make_policy(settings)
        log.info("%s: %s", name, why)
        running.append(
            Daemon(
                tracker,
                policy,
                config_of[name],
                experiments=[experiment_of[name]],
                signing_key=settings.key(),
                nice=settings.nice,
            )
        )
    with in_background(running, DAEMON_INTERVAL_S):
        yield


def run_script(cmd: list[str], log_path: Path) -> dict[str, object]:
    """Run a training script; its last JSON line on stdout is its summary."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{cmd} failed (exit {proc.returncode}, log {log_path}):\n{tail}")
    return json.loads(lines[-1])


def metric_curve(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    history = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def metric_timeline(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, wall-clock seconds) of each point logged under ``key``."""
    history = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.timestamp / 1000) for m in history)


def interventions(tracker: Tracker, uri: str, run_id: str) -> list[dict[str, object]]:
    """Issued params versions, each at the step the training side applied it."""
    applied = {int(v): s for s, v in metric_curve(uri, run_id, METRIC_PARAMS_VERSION)}
    records = [r for r in AuditLog(tracker).records(run_id) if r.params_version]
    return [describe(r, applied.get(r.params_version or 0)) for r in records]


def describe(record: AuditRecord, applied_step: int | None) -> dict[str, object]:
    changes = {
        v.knob: [v.current, v.final]
        for v in record.verdicts
        if v.verdict in ("accepted", "clamped")
    }
    return {
        "version": record.params_version,
        "decision_step": record.step,
        "applied_step": applied_step,
        "source": record.source.value,
        "model": record.model,
        "changes": changes,
        "commands": [c.command for c in record.command_verdicts if c.verdict == "accepted"],
        "reason": record.proposal.reason if record.proposal else "",
    }


def mean_sd(values: list[float] | list[int], fmt: str = ".3f") -> str:
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{mean:{fmt}} ± {statistics.stdev(values):{fmt}}"


def log_summary(uri: str, experiment: str, name: str, files: list[Path], tags: dict) -> None:
    """Log the benchmark's tables and plots to a summary run of ``experiment``."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=name):
        mlflow.set_tags(tags)
        for path in files:
            if path.exists():
                mlflow.log_artifact(str(path))
