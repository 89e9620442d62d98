"""Fixtures for tests that drive the real ``wandb`` SDK against the W&B test server.

Import the fixtures a test module needs (``from tests.wandb_fixtures import wandb_server``).
The session's server is the SDK's only W&B: the environment that points the SDK at it is
set for the whole session (``wandb`` reads it once per process) and handed to child
processes through :func:`wandb_env`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import wandb

from integrations.trackers.wandb_backend import finish_writers
from tests.wandb_server import WandbServer

# Any 40 characters pass the SDK's key check; the test server accepts every key.
API_KEY = "0" * 40


def wandb_env(server: WandbServer, root: Path) -> dict[str, str]:
    """The environment that sends the SDK, in this process or a child, to ``server``."""
    dirs = {name: root / name for name in ("runs", "cache", "config", "data")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return {
        "WANDB_BASE_URL": server.url,
        "WANDB_API_KEY": API_KEY,
        "WANDB_MODE": "online",
        "WANDB_DIR": str(dirs["runs"]),
        "WANDB_CACHE_DIR": str(dirs["cache"]),
        "WANDB_CONFIG_DIR": str(dirs["config"]),
        "WANDB_DATA_DIR": str(dirs["data"]),
        # History reaches the server within about a second instead of 15 s.
        "WANDB__FILE_STREAM_TRANSMIT_INTERVAL": "1",
        # No system metrics: fewer posts, and nothing a test would wait for.
        "WANDB__DISABLE_STATS": "true",
        "WANDB_SILENT": "true",
    }


def child_env() -> dict[str, str]:
    """This process's environment for a child that must run a ``wandb`` of its own.

    Once this process has started ``wandb-core`` (``wandb.Api()`` does), ``WANDB_SERVICE``
    in its environment makes every child attach to that same ``wandb-core``: a child's
    run then lives and dies with this process's service (kill the child and the parent
    hangs at exit waiting for the child's run to finish).
    """
    return {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"}


@pytest.fixture(scope="session")
def wandb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WandbServer]:
    """The session's W&B test server, with this process's environment pointing at it."""
    server = WandbServer().start()
    env = wandb_env(server, tmp_path_factory.mktemp("wandb"))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield server
    # Runs the session left open are finished while their server is still there: torn down
    # at exit instead, wandb-core would retry a stopped server and the process never ends.
    finish_writers()
    wandb.teardown()
    server.stop()
