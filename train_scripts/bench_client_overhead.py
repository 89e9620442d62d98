"""Benchmark: what the training-side client costs a training loop, and how fast updates land.

Same process, same model, side by side: blocks of training steps without the client and with
it (polling every ``--poll-interval`` seconds against a real MLflow server), interleaved so
that drift in machine speed hits both alike. During the client blocks a writer thread issues
params versions at random moments; the latency from the version tag being set to the step at
which the loop applied it is measured.

    python train_scripts/bench_client_overhead.py --blocks 6 --steps 500 --out bench-out

Prints steps/s off and on, their ratio, and the apply-latency percentiles; writes JSON with
``--out``. Starts its own MLflow server on loopback unless ``--tracking-uri`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from integrations.client import ManagerClient
from integrations.protocol import TAG_PARAMS_VERSION, ParamsVersion, Source, params_path
from integrations.torch_hooks import TorchKnobs
from integrations.trackers import open_tracker
from manager_daemon.mlflow_server import start_server


def make_model(width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width),
        torch.nn.GELU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, 1),
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


class Loop:
    """One model and optimizer, trained in blocks of steps, with or without the client."""

    def __init__(self, width: int, batch: int) -> None:
        self.model, self.optimizer = make_model(width)
        self.x, self.y = torch.randn(batch, width), torch.randn(batch, 1)
        self.step = 0
        self.applied_at: dict[int, float] = {}

    def block(self, steps: int, knobs: TorchKnobs | None) -> float:
        """Run ``steps`` training steps; returns steps per second."""
        started = time.perf_counter()
        for _ in range(steps):
            if knobs is not None and (version := knobs.step(self.step)) is not None:
                self.applied_at[version.version] = time.time()
            loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.step += 1
        return steps / (time.perf_counter() - started)

    def knobs(self, uri: str, run_id: str, poll_interval: float) -> TorchKnobs:
        knobs = TorchKnobs(optimizer=self.optimizer, model=self.model)
        knobs.client = ManagerClient(
            run_id, knobs.spec(), tracking_uri=uri, poll_interval=poll_interval
        ).start()
        time.sleep(2 * poll_interval)  # the first polls publish the spec and heartbeat
        return knobs


class Writer(threading.Thread):
    """Issues a params version at random moments, recording when each tag was set."""

    def __init__(self, uri: str, run_id: str, start_version: int, mean_gap_s: float) -> None:
        super().__init__(daemon=True)
        self.tracker = open_tracker(uri)
        self.run_id, self.version, self.mean_gap_s = run_id, start_version, mean_gap_s
        self.tagged_at: dict[int, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        rng = random.Random(self.version)
        while not self.halt.wait(rng.uniform(0.5, 1.5) * self.mean_gap_s):
            self.version += 1
            lr = 1e-3 * (1.1 if self.version % 2 else 1 / 1.1)
            params = ParamsVersion(
                version=self.version,
                parent_version=self.version - 1,
                issued_at=time.time(),
                source=Source.HUMAN,
                decision_id=self.version,
                values={"learning_rate": lr},
            ).signed(None)
            self.tracker.write_json(
                self.run_id, params_path(self.version), params.model_dump(mode="json")
            )
            self.tracker.set_tags(self.run_id, {TAG_PARAMS_VERSION: str(self.version)})
            self.tagged_at[self.version] = time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--blocks", type=int, default=6, help="pairs of off/on blocks")
    parser.add_argument("--steps", type=int, default=500, help="steps per block")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--latency-steps", type=int, default=1500, help="steps of the latency run")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the local MLflow server share the training cores (counts its work too)",
    )
    args = parser.parse_args()

    server = None
    if args.tracking_uri is None:
        cpus = sorted(os.sched_getaffinity(0))
        server_cpus = None
        if args.pin and len(cpus) > 1:
            # The tracker normally runs elsewhere: give it a core of its own so that its work
            # is not counted as the client's, and train on the others.
            server_cpus = {cpus[-1]}
            os.sched_setaffinity(0, set(cpus[:-1]))
            torch.set_num_threads(len(cpus) - 1)
        server = start_server(Path(tempfile.mkdtemp(prefix="atm-bench-")), cpus=server_cpus)
    uri = args.tracking_uri or server.uri  # type: ignore[union-attr]
    try:
        result = run(uri, args)
    finally:
        if server is not None:
            server.stop()
    result["server_pinned_apart"] = bool(args.pin and args.tracking_uri is None)
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "client_overhead.json").write_text(json.dumps(result, indent=2))


def run(uri: str, args: argparse.Namespace) -> dict[str, object]:
    mlflow = MlflowClient(uri)
    found = mlflow.get_experiment_by_name("atm-bench")
    experiment_id = found.experiment_id if found else mlflow.create_experiment("atm-bench")
    run_id = mlflow.create_run(experiment_id, run_name="client-overhead").info.run_id
    loop = Loop(args.width, args.batch)
    loop.block(20, None)  # warm-up
    # Overhead: blocks without and with a polling client, interleaved.
    off, on = [], []
    for _ in range(args.blocks):
        off.append(loop.block(args.steps, None))
        knobs = loop.knobs(uri, run_id, args.poll_interval)
        on.append(loop.block(args.steps, knobs))
        knobs.close()
    # Latency: a writer issues versions at random moments while the loop trains.
    knobs = loop.knobs(uri, run_id, args.poll_interval)
    writer = Writer(uri, run_id, 0, mean_gap_s=3 * args.poll_interval)
    writer.start()
    loop.block(args.latency_steps, knobs)
    writer.halt.set()
    writer.join()
    knobs.close()
    tagged = writer.tagged_at
    latencies = sorted(loop.applied_at[v] - tagged[v] for v in tagged if v in loop.applied_at)
    step_s = 1 / statistics.fmean(on)
    return {
        "steps_per_s_off": round(statistics.fmean(off), 3),
        "steps_per_s_on": round(statistics.fmean(on), 3),
        "slowdown": round(1 - statistics.fmean(on) / statistics.fmean(off), 4),
        "blocks": args.blocks,
        "steps_per_block": args.steps,
        "poll_interval_s": args.poll_interval,
        "step_time_s": round(step_s, 4),
        "versions_issued": len(tagged),
        "versions_applied": len(latencies),
        "apply_latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "apply_latency_p95_s": (
            round(latencies[math.ceil(0.95 * len(latencies)) - 1], 3) if latencies else None
        ),
        "apply_latency_target_s": round(args.poll_interval + step_s, 3),
    }


if __name__ == "__main__":
    main()
