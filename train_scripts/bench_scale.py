"""What one daemon costs at scale: time and tracker requests per tick for many runs.

MLflow backed by PostgreSQL, as teams deploy it (Debian's package, started here on loopback;
sqlite where PostgreSQL is not installed), N synthetic runs published exactly as a client
publishes them, and an in-process daemon with the rules policy (auditing every decision, "no
action" included, so that a tick with news writes a decision for every run). Measured side by
side in one run:

- runs: 10, 100 and 1,000 runs of about 1k points each; per tick: a restart (a fresh daemon's
  first pass), a quiet tick (nothing new), a tick after every run logged a new evaluation;
- history: 20 runs of 1k against 20 runs of 50k points, the same ticks, with three restarts;
- for each: wall time, HTTP requests the daemon made, its CPU time per run-tick and its memory;
  and, from the ticks with news, how many runs one daemon can serve within a 60 s tick.

    python train_scripts/bench_scale.py --out bench/scale           # postgres, the full set
    python train_scripts/bench_scale.py --runs 10,100 --long-points 5000 --store sqlite

Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import requests.adapters

from integrations.client import ManagerClient
from integrations.knobs import Knob, derive_knob
from integrations.protocol import RunSpec
from integrations.settings import DEFAULT_POLL_INTERVAL_S
from integrations.trackers import Tracker, open_tracker
from manager_daemon.daemon import Daemon
from manager_daemon.mlflow_server import MlflowServer, free_port
from manager_daemon.policies import RulesPolicy
from manager_daemon.supervisor import SupervisorConfig

log = logging.getLogger("bench_scale")

EVAL_EVERY = 20  # a healthy run evaluates every 20 steps and keeps improving
TICK_S = 60.0
OBJECTIVE = "minimize:eval_loss"
SPEC = RunSpec(
    framework="torch",
    knobs=[derive_knob(Knob.LEARNING_RATE, 1e-3), derive_knob(Knob.WEIGHT_DECAY, 0.0)],
)


# ---- counting what the daemon asks of the tracker ----------------------------------------


class RequestCounter:
    """Counts HTTP requests made by this process, at the ``requests`` transport."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._send = requests.adapters.HTTPAdapter.send

    def __enter__(self) -> RequestCounter:
        counter, send = self, self._send

        def counting(adapter, request, *args, **kwargs):  # type: ignore[no-untyped-def]
            with counter._lock:
                counter.count += 1
            return send(adapter, request, *args, **kwargs)

        requests.adapters.HTTPAdapter.send = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        requests.adapters.HTTPAdapter.send = self._send  # type: ignore[method-assign]


# ---- the store ---------------------------------------------------------------------------


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[str]:
    """A PostgreSQL cluster on a loopback port under ``root``; yields an MLflow store URI."""
    bindir = next(Path("/usr/lib/postgresql").glob("*/bin"), None)
    if bindir is None:
        raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
    data, sockets = root / "pgdata", root / "pgsock"
    sockets.mkdir(parents=True, exist_ok=True)
    user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def run(*cmd: str) -> None:
        # PostgreSQL refuses to run as root: run it as its own system user then.
        prefix = ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {done.stderr.strip()[-1000:]}")

    if os.geteuid() == 0:
        for folder in (root.parent, root, sockets):
            folder.chmod(0o755)  # the postgres user must reach its data directory
        shutil.chown(root, user)
        shutil.chown(sockets, user)
    port = free_port()
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    run(
        str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"), "-w",
        "-o", f"-p {port} -h 127.0.0.1 -k {sockets} -c fsync=off", "start",
    )  # fmt: skip
    try:
        run(
            str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"
        )
        # SQLAlchemy 2.1 reads postgresql:// as psycopg 3; psycopg2 is the driver installed.
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")


@contextlib.contextmanager
def tracker_server(store: str, root: Path) -> Iterator[str]:
    """An MLflow server on the chosen store; yields its URI."""
    with contextlib.ExitStack() as stack:
        backend = None
        if store == "postgresql":
            backend = stack.enter_context(postgres(root / "pg"))
        server = MlflowServer(root=root / "mlflow", port=free_port(), backend_store_uri=backend)
        server.start(timeout=300)
        stack.callback(server.stop)
        yield server.uri


# ---- synthetic runs ----------------------------------------------------------------------


def publish(tracker: Tracker, client_mlflow, experiment_id: str, points: int, seed: int) -> str:
    """A run with ``points`` steps of history, published as a client publishes it."""
    from mlflow.entities import Metric

    run_id = client_mlflow.create_run(experiment_id).info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for step in range(points):
        metrics.append(Metric("loss", 2.0 / (1 + step / 500), now + step, step))
        if step % EVAL_EVERY == 0:
            metrics.append(Metric("eval_loss", 2.2 / (1 + step / 500), now + step, step))
    for i in range(0, len(metrics), 1000):
        client_mlflow.log_batch(run_id, metrics=metrics[i : i + 1000])
    # The client's own first poll: heartbeat and objective, spec, then the managed tag.
    ManagerClient(run_id, SPEC, tracker=tracker, objective=OBJECTIVE).poll_once()
    return run_id


def publish_many(uri: str, name: str, runs: int, points: int) -> tuple[str, list[str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.create_experiment(name)
    tracker = open_tracker(uri)
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        ids = list(
            pool.map(lambda i: publish(tracker, client, experiment_id, points, i), range(runs))
        )
    log.info(
        "%s: %d runs × %d steps published in %.0f s", name, runs, points, time.monotonic() - started
    )
    return name, ids


def evaluate_all(uri: str, run_ids: list[str], points: int, tick: int) -> None:
    """Every run trains ``EVAL_EVERY`` more steps and logs a new evaluation."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    first = points + tick * EVAL_EVERY

    def log_one(run_id: str) -> None:
        steps = range(first, first + EVAL_EVERY)
        metrics = [Metric("loss", 2.0 / (1 + s / 500), now + s, s) for s in steps]
        last = steps[-1]
        metrics.append(Metric("eval_loss", 2.2 / (1 + last / 500), now + last, last))
        client.log_batch(run_id, metrics=metrics)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(log_one, run_ids))


# ---- measuring ---------------------------------------------------------------------------


@dataclass
class Tick:
    scenario: str
    runs: int
    points: int
    kind: str  # restart, quiet, new evaluation
    seconds: float
    requests: int
    cpu_s_per_run: float
    rss_mb: float
    decisions: int


def measure(daemon: Daemon, scenario: str, runs: int, points: int, kind: str) -> Tick:
    process = psutil.Process()
    cpu = process.cpu_times()
    with RequestCounter() as counter:
        started = time.monotonic()
        report = daemon.run_once()
        seconds = time.monotonic() - started
    used = process.cpu_times()
    cpu_s = (used.user - cpu.user) + (used.system - cpu.system)
    tick = Tick(
        scenario,
        runs,
        points,
        kind,
        round(seconds, 3),
        counter.count,
        round(cpu_s / max(runs, 1), 5),
        round(process.memory_info().rss / 2**20, 1),
        len(report.decisions),
    )
    if report.runs != runs or report.errors:
        raise RuntimeError(f"{scenario}: saw {report.runs} runs of {runs}, errors {report.errors}")
    log.info("%s", tick)
    return tick


def scenario(
    uri: str, name: str, run_ids: list[str], points: int, workers: int, restarts: int = 1
) -> list[Tick]:
    """``restarts`` fresh daemons' first passes (the first decides for every run, the others
    find that decision), then the last one's quiet tick and two ticks with news."""
    tracker = open_tracker(uri, fail_fast=True)
    # Every decision is audited, "no action" included: a tick with news writes a record per
    # run, the cost of deciding for every run.
    config = SupervisorConfig(audit_no_action=True)
    ticks = []
    for restart in range(restarts):
        daemon = Daemon(tracker, RulesPolicy(), config, workers=workers, experiments=[name])
        ticks.append(measure(daemon, name, len(run_ids), points, "restart"))
        if restart < restarts - 1:
            daemon.close()
    ticks.append(measure(daemon, name, len(run_ids), points, "quiet"))
    for tick in range(1, 3):
        evaluate_all(uri, run_ids, points, tick)
        ticks.append(measure(daemon, name, len(run_ids), points, "new evaluation"))
    daemon.close()
    return ticks


def client_polls(uri: str, run_ids: list[str], seconds: float, pollers: int) -> float:
    """Quiet client polls per second the tracker sustains: ``pollers`` threads, each polling
    its runs' clients in turn as a client's background thread does."""
    tracker = open_tracker(uri)
    clients = [ManagerClient(r, SPEC, tracker=tracker, objective=OBJECTIVE) for r in run_ids]
    for client in clients:
        client.poll_once()  # published and heartbeat sent: what follows are quiet polls
    done = [0] * pollers
    deadline = time.monotonic() + seconds

    def poll(index: int) -> None:
        mine = clients[index::pollers]
        while time.monotonic() < deadline:
            mine[done[index] % len(mine)].poll_once()
            done[index] += 1

    with ThreadPoolExecutor(pollers) as pool:
        list(pool.map(poll, range(pollers)))
    return sum(done) / seconds


def run(args: argparse.Namespace) -> tuple[list[Tick], float]:
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tracker_server(args.store, Path(tmp)) as uri:
        log.info("MLflow on %s at %s", args.store, uri)
        plan = [(f"runs-{n}", n, args.points) for n in args.runs]
        plan += [(f"history-{p}", args.history_runs, p) for p in (args.points, args.long_points)]
        ticks: list[Tick] = []
        pollable: list[str] = []
        for name, runs, points in plan:
            _, ids = publish_many(uri, name, runs, points)
            # The history comparison is of restarts: three of each, the fastest compared.
            restarts = 3 if name.startswith("history-") else 1
            ticks += scenario(uri, name, ids, points, args.workers, restarts)
            pollable = max(pollable, ids, key=len)
        polls = client_polls(uri, pollable[:100], seconds=20, pollers=16)
        log.info("quiet client polls: %.0f per second", polls)
    return ticks, polls


def summarise(ticks: list[Tick], polls: float, args: argparse.Namespace) -> str:
    lines = [
        f"Store: {args.store}; daemon workers: {args.workers}; rules policy, every decision "
        f"audited; a tick with news follows {EVAL_EVERY} new steps and one new evaluation in "
        "every run.",
        "",
        "| scenario | runs | points per run | tick | time (s) | requests | requests per run "
        "| daemon CPU per run-tick (ms) | RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in ticks:
        lines.append(
            f"| {t.scenario} | {t.runs} | {t.points} | {t.kind} | {t.seconds:.2f} | {t.requests} "
            f"| {t.requests / t.runs:.1f} | {1000 * t.cpu_s_per_run:.1f} | {t.rss_mb:.0f} |"
        )
    lines.append("")
    news = [t for t in ticks if t.kind == "new evaluation" and t.scenario.startswith("runs-")]
    if news:
        runs = max(t.runs for t in news)
        slowest = max((t for t in news if t.runs == runs), key=lambda t: t.seconds)
        per_run = slowest.seconds / runs
        restart = [t.seconds for t in ticks if t.runs == runs and t.kind == "restart"]
        lines.append(
            f"One daemon, the slower tick with news at {runs} runs: {per_run * 1000:.1f} ms per "
            f"run, so about {TICK_S / per_run:,.0f} runs fit in a {TICK_S:.0f} s tick"
            + (f"; a restart took {max(restart):.0f} s." if restart else ".")
        )
    lines.append(
        f"Clients: a quiet poll is one request; the server sustained {polls:.0f} quiet polls a "
        f"second from 16 pollers, so about {polls * DEFAULT_POLL_INTERVAL_S:,.0f} clients at the "
        f"default {DEFAULT_POLL_INTERVAL_S:g} s poll interval."
    )
    for kind in ("restart", "quiet", "new evaluation"):
        short = [t for t in ticks if t.scenario == f"history-{args.points}" and t.kind == kind]
        long = [t for t in ticks if t.scenario == f"history-{args.long_points}" and t.kind == kind]
        if short and long:
            ratio = min(t.seconds for t in long) / min(t.seconds for t in short)
            requests_ratio = long[0].requests / max(short[0].requests, 1)
            lines.append(
                f"{kind}: {args.long_points} vs {args.points} points per run: time ×{ratio:.2f}, "
                f"requests ×{requests_ratio:.2f}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Tick]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument(
        "--runs", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 1000]
    )
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--long-points", type=int, default=50_000)
    parser.add_argument("--history-runs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench-out/scale"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("urllib3", "mlflow", "alembic", "manager_daemon", "integrations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ticks, polls = run(args)
    results = {"ticks": [asdict(t) for t in ticks], "quiet_client_polls_per_s": polls}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = summarise(ticks, polls, args)
    (args.out / "results.md").write_text(table)
    print(table)
    return ticks


if __name__ == "__main__":
    main()
