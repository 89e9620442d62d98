"""The daemon's operations surface: /healthz, /readyz, /metrics.

Fast tests on the in-memory tracker say when the probes fail; the slow one runs a real `atm
daemon` on a real MLflow server, lints its exposition with promtool, has a real Prometheus
scrape it, and stops it with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from integrations.protocol import TAG_DAEMON_LEASE
from integrations.trackers import TrackerUnavailable
from manager_daemon.daemon import Daemon
from manager_daemon.mlflow_server import free_port
from manager_daemon.ops import OpsServer
from manager_daemon.policies.rules import RulesPolicy
from tests import tools
from tests.conftest import Backend, _mlflow_backend
from tests.helpers import overfitting_run, wait_for


def serve(daemon: Daemon) -> OpsServer:
    return OpsServer("127.0.0.1", free_port(), daemon.metrics, daemon.health, daemon.ready).start()


def test_probes_say_when_the_tracker_stops_answering(memory: Backend) -> None:
    overfitting_run(memory)
    daemon = Daemon(memory.tracker, RulesPolicy(), experiments=[memory.experiment])
    ops = serve(daemon)
    try:
        ready = requests.get(ops.address + "/readyz", timeout=5)
        assert ready.status_code == 503 and "no tick yet" in ready.text
        assert requests.get(ops.address + "/healthz", timeout=5).status_code == 200
        daemon.run_once()
        assert requests.get(ops.address + "/readyz", timeout=5).status_code == 200

        def down(operation: str, run_id: str | None) -> None:
            raise TrackerUnavailable("connection refused")

        memory.tracker.fault = down
        calls = sum(memory.tracker.calls.values())
        daemon.run_once()
        ready = requests.get(ops.address + "/readyz", timeout=5)
        assert ready.status_code == 503 and "connection refused" in ready.text
        # A probe is answered from what the ticks saw: it costs the tracker nothing.
        assert sum(memory.tracker.calls.values()) == calls + 1
        assert requests.get(ops.address + "/healthz", timeout=5).status_code == 200
        metrics = requests.get(ops.address + "/metrics", timeout=5).text
        assert 'atm_tracker_errors_total{where="list"} 1.0' in metrics
        assert 'atm_decisions_total{source="rules",status="issued"} 1.0' in metrics
        assert requests.get(ops.address + "/nothing", timeout=5).status_code == 404
    finally:
        ops.stop()
        daemon.close()


def test_health_fails_when_the_scheduler_stops_ticking(memory: Backend) -> None:
    daemon = Daemon(memory.tracker, RulesPolicy(), interval_s=1.0)
    daemon.run_once()
    assert daemon.health().ok
    daemon._last_tick = time.monotonic() - 61  # no tick for a minute: three intervals long past
    probe = daemon.health()
    assert not probe.ok and "since the last tick" in probe.detail
    daemon.close()


def test_a_busy_ops_port_is_a_one_line_error(memory: Backend) -> None:
    daemon = Daemon(memory.tracker, RulesPolicy())
    ops = serve(daemon)
    port = int(ops.address.rsplit(":", 1)[1])
    with pytest.raises(
        ValueError, match=f"cannot serve the operations endpoints on 127.0.0.1:{port}"
    ):
        OpsServer("127.0.0.1", port, daemon.metrics, daemon.health, daemon.ready)
    ops.stop()
    daemon.close()


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
def test_prometheus_scrapes_a_running_daemon(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    try:
        prometheus, promtool = tools.prometheus()
    except tools.ToolMissing as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    backend = _mlflow_backend(request)
    run_id = overfitting_run(backend)
    ops_port, prom_port = free_port(), free_port()
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "manager_daemon.cli", "daemon", "--tracking-uri", backend.uri,
         "--experiment", backend.experiment, "--policy", "rules", "--interval", "1",
         "--ops-port", str(ops_port), "--ops-host", "127.0.0.1", "--lease-settle", "0.5",
         "--log-format", "json", "--replica-name", "atm-test-0"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    ops = f"http://127.0.0.1:{ops_port}"
    prom = None
    try:

        def issued() -> float:
            try:
                text = requests.get(ops + "/metrics", timeout=5).text
            except requests.RequestException:
                return 0.0
            return _metric(text, 'atm_decisions_total{source="rules",status="issued"}')

        wait_for(issued, timeout=90)
        assert requests.get(ops + "/readyz", timeout=5).status_code == 200
        assert requests.get(ops + "/healthz", timeout=5).status_code == 200
        exposition = requests.get(ops + "/metrics", timeout=5).text
        lint = subprocess.run(
            [str(promtool), "check", "metrics"], input=exposition, capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert _metric(exposition, "atm_params_versions_issued_total") == 1
        assert _metric(exposition, 'atm_managed_runs{health="deciding"}') == 1
        assert _metric(exposition, 'atm_lease_events_total{event="taken"}') == 1

        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: atm, static_configs: [{{targets: ['127.0.0.1:{ops_port}']}}]}}]\n"
        )
        prom = subprocess.Popen(
            [str(prometheus), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
        )  # fmt: skip
        api = f"http://127.0.0.1:{prom_port}"

        def scraped() -> list:
            try:
                answer = requests.get(
                    api + "/api/v1/query",
                    params={"query": 'atm_decisions_total{status="issued",source="rules"}'},
                    timeout=5,
                ).json()
            except (requests.RequestException, ValueError):
                return []
            return [r for r in answer["data"]["result"] if float(r["value"][1]) >= 1]

        (series,) = wait_for(scraped, timeout=60)
        assert series["metric"]["job"] == "atm"
        versions = requests.get(
            api + "/api/v1/query", params={"query": "atm_params_versions_issued_total"}, timeout=5
        ).json()["data"]["result"]
        assert float(versions[0]["value"][1]) == 1

        # SIGTERM: the daemon stops, releasing its lease for the next replica.
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
        assert TAG_DAEMON_LEASE not in backend.tracker.get_run(run_id).tags
        lines = (tmp_path / "daemon.log").read_text().splitlines()
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        assert entries and {"time", "level", "logger", "message"} <= set(entries[0])
        assert any("released 1 lease" in e["message"] for e in entries)
    finally:
        for process in (daemon, prom):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)


BLOCK_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "stable_baselines3"):
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, NoTorch())
from manager_daemon.cli import app
app(sys.argv[1:])
"""


def test_the_daemon_runs_without_torch(request: pytest.FixtureRequest) -> None:
    backend = _mlflow_backend(request)
    run_id = overfitting_run(backend)
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, "daemon", "--once", "--tracking-uri", backend.uri,
         "--experiment", backend.experiment, "--policy", "rules"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 managed run(s), 1 decision(s)" in done.stdout
    assert backend.tracker.get_run(run_id).tags["atm.params.version"] == "1"
    # The single pass gave its lease back.
    assert TAG_DAEMON_LEASE not in backend.tracker.get_run(run_id).tags
