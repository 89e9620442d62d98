"""Start and stop a local MLflow server on loopback (for the demo and the tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MlflowServer:
    """An ``mlflow server`` subprocess with local artifacts under ``root`` and a sqlite store
    there, or the database ``backend_store_uri`` names (PostgreSQL, as teams deploy it)."""

    root: Path
    port: int
    cpus: set[int] | None = None
    backend_store_uri: str | None = None
    workers: int = 1
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        store = self.backend_store_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        # Create the schema once, before the server's workers race to create it.
        subprocess.run(
            [sys.executable, "-m", "mlflow", "db", "upgrade", store],
            check=True,
            capture_output=True,
        )
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                store,
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # The server's background job runner (a pool of worker processes) serves features
            # this project does not use; on a 2-core machine it competes with training.
            env={
                **os.environ,
                "MLFLOW_TRACKING_URI": "",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            },
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None,
        )
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{tail}")
            try:
                if requests.get(self.uri + "/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"mlflow server at {self.uri} not healthy after {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, 15)
        except ProcessLookupError:
            return
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(10)


def start_server(root: Path, port: int | None = None, cpus: set[int] | None = None) -> MlflowServer:
    """Start a server on a free loopback port (or ``port``) and wait until it is healthy.

    ``cpus`` pins the server (and its workers) to those cores, for benchmarks that must not
    count the server's work against the process they measure.
    """
    return MlflowServer(root=root, port=port or free_port(), cpus=cpus).start()
