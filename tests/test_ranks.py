"""Multi-rank training: under torchrun (gloo, on the CPU) only rank 0 talks to the tracker,
every rank applies each version at the same step, and a rank that dies leaves the others
training, not waiting on the manager.

Real ranks (``torch.distributed.run`` or the variables it sets), a real MLflow server, versions
issued with `atm set`; each rank records the learning rate it used at every step."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from integrations.protocol import (
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_MANAGED,
    Boundary,
)
from integrations.ranks import RankSync
from tests.helpers import wait_for
from tests.trainers import SCRIPTS, TORCHRUN, applied, atm_run, atm_set, lr_from, trace

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 8.0  # ATM_RANK_TIMEOUT for the fault tests
EVERY = 10  # ATM_RANK_SYNC_EVERY's default: versions apply at multiples of it


def _tags(client: MlflowClient, run_id: str) -> dict[str, str]:
    return client.get_run(run_id).data.tags


def _issue_and_wait(uri: str, client: MlflowClient, run_id: str, version: int, *what: str) -> int:
    """Issue the next version with `atm set`; the step at which rank 0 acknowledged it."""
    atm_set(uri, run_id, *what)
    wait_for(lambda: _tags(client, run_id).get(TAG_CLIENT_APPLIED_VERSION) == str(version), 90)
    return int(_tags(client, run_id)[TAG_CLIENT_APPLIED_STEP])


def _rank_logs(log_dir: Path, rank: int) -> str:
    return "".join(p.read_text() for p in log_dir.glob(f"*/attempt_*/{rank}/std*.log"))


def _torchrun(log_dir: Path, *script: str) -> list[str]:
    return [
        *TORCHRUN,
        "--nproc-per-node",
        "2",
        "--log-dir",
        str(log_dir),
        "--redirects",
        "3",
        *script,
    ]


def _assert_ranks_agree(
    traces: Path, applications: list[tuple[int, int]], lrs: list[float], start: float
) -> None:
    rank0, rank1 = trace(traces / "rank0.jsonl"), trace(traces / "rank1.jsonl")
    assert rank0 == rank1, "both ranks used the same learning rate at every step"
    changes = [(0, start), *((step, lr) for (_, step), lr in zip(applications, lrs, strict=True))]
    assert lr_from(rank0, changes), (applications, rank0[::EVERY])
    assert all(step % EVERY == 0 for _, step in applications), applications


def _only_rank0_talked(log_dir: Path) -> None:
    assert "published knob spec" in _rank_logs(log_dir, 0)
    follower = _rank_logs(log_dir, 1)
    assert "rank 1 follows rank 0" in follower
    assert "published knob spec" not in follower


@pytest.mark.slow
def test_trainer_ranks_apply_each_version_at_the_same_step(
    tracking_uri: str, new_run, tmp_path: Path
) -> None:
    run_id, client = new_run(), MlflowClient(tracking_uri)
    logs, traces = tmp_path / "ranks", tmp_path / "trace"
    script = [str(SCRIPTS / "hf_trainer.py"), str(tmp_path / "out"), "5000", "0.02"]
    train = atm_run(
        tracking_uri,
        run_id,
        _torchrun(logs, *script, "--trace", str(traces)),
        tmp_path / "train.log",
        cwd=tmp_path,
    )
    try:
        wait_for(lambda: _tags(client, run_id).get(TAG_MANAGED) == "true", 120)
        steps = [
            _issue_and_wait(tracking_uri, client, run_id, 1, "learning_rate=5e-4"),
            _issue_and_wait(tracking_uri, client, run_id, 2, "learning_rate=2.5e-4"),
            _issue_and_wait(tracking_uri, client, run_id, 3, "stop"),
        ]
        # Every rank stops at the same step, or the other would wait in DDP for ever.
        assert train.wait(60) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        train.kill()
    assert applied(client, run_id) == list(zip([1, 2, 3], steps, strict=True)), (
        "one ack per version"
    )
    _assert_ranks_agree(traces, applied(client, run_id), [5e-4, 2.5e-4, 2.5e-4], 1e-3)
    last = trace(traces / "rank0.jsonl")[-1][0]
    assert last == steps[2], "the stop applies at its step on every rank"
    _only_rank0_talked(logs)


@pytest.mark.slow
def test_a_plain_ddp_loop_under_atm_run_applies_on_every_rank_at_once(
    tracking_uri: str, new_run, tmp_path: Path
) -> None:
    run_id, client = new_run(), MlflowClient(tracking_uri)
    logs, traces = tmp_path / "ranks", tmp_path / "trace"
    script = [str(SCRIPTS / "ddp_loop.py"), str(traces), "400", "0.02"]
    train = atm_run(
        tracking_uri, run_id, _torchrun(logs, *script), tmp_path / "train.log", cwd=tmp_path
    )
    try:
        wait_for(lambda: _tags(client, run_id).get(TAG_MANAGED) == "true", 120)
        _issue_and_wait(tracking_uri, client, run_id, 1, "learning_rate=5e-3")
        _issue_and_wait(tracking_uri, client, run_id, 2, "learning_rate=2.5e-3")
        assert train.wait(120) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        train.kill()
    applications = applied(client, run_id)
    assert [version for version, _ in applications] == [1, 2], "one ack per version"
    _assert_ranks_agree(traces, applications, [5e-3, 2.5e-3], 0.01)
    _only_rank0_talked(logs)


@pytest.mark.slow
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["dead", "hung"])
def test_a_dead_or_hung_rank_leaves_the_others_training(
    fault: signal.Signals, tracking_uri: str, new_run, tmp_path: Path
) -> None:
    run_id, client = new_run(), MlflowClient(tracking_uri)
    traces = tmp_path / "trace"
    port = _free_port()
    ranks = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_RUN_ID": run_id,
            "ATM_POLL_INTERVAL": "0.5",
            "ATM_RANK_TIMEOUT": str(TIMEOUT_S),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [sys.executable, str(SCRIPTS / "ranks_loop.py"), str(traces), "400", "0.02"]
        log = (tmp_path / f"rank{rank}.log").open("w")
        ranks.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        wait_for(lambda: _tags(client, run_id).get(TAG_MANAGED) == "true", 90)
        step = _issue_and_wait(tracking_uri, client, run_id, 1, "learning_rate=5e-3")
        ranks[1].send_signal(fault)
        faulted_at = time.monotonic()
        assert ranks[0].wait(90) == 0, (tmp_path / "rank0.log").read_text()[-3000:]
    finally:
        for process in ranks:
            process.kill()
    rank0 = trace(traces / "rank0.jsonl")
    assert rank0[-1][0] == 400, "rank 0 trained to its last step"
    assert "cannot reach the other ranks" in (tmp_path / "rank0.log").read_text()
    # Up to the fault, both applied the version at the same step.
    rank1 = trace(traces / "rank1.jsonl")
    assert rank0[: len(rank1)] == rank1
    assert lr_from(rank0, [(0, 0.01), (step, 5e-3)])
    # The longest rank 0 waited at one step after the fault: a dead rank's connections close
    # at once; a hung one is given up after ATM_RANK_TIMEOUT.
    began = [row["t"] for row in _rows(traces / "rank0.jsonl") if "t" in row]
    waits = [b - a for a, b in itertools.pairwise(began) if b > faulted_at]
    longest = max(waits)
    print(f"{fault.name}: rank 0's longest step after the fault took {longest:.2f} s")
    if fault is signal.SIGKILL:
        assert longest < TIMEOUT_S / 2
    else:
        assert TIMEOUT_S * 0.9 <= longest < TIMEOUT_S + 10


def test_exchange_points_are_the_same_on_every_rank() -> None:
    sync = RankSync(rank=1, world_size=2, apply_at=Boundary.STEP, every=EVERY)
    assert [s for s in range(1, 35) if sync.due(Boundary.STEP, s)] == [10, 20, 30]
    assert not sync.due(Boundary.EVAL, 10)
    at_evals = RankSync(rank=0, world_size=2, apply_at=Boundary.EVAL, every=EVERY)
    assert at_evals.due(Boundary.EVAL, 7) and not at_evals.due(Boundary.STEP, 10)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
