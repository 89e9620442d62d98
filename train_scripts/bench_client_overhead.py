"""Benchmark: what the training-side client costs a training loop, and how fast updates land.

Same process, same model, side by side: blocks of training steps without the client and with
it (polling every ``--poll-interval`` seconds against a real MLflow server), interleaved so
that drift in machine speed hits both alike. During the client blocks a writer thread issues
params versions at random moments; the latency from the version tag being set to the step at
which the loop applied it is measured.

    python train_scripts/bench_client_overhead.py --blocks 6 --steps 400 --out bench-out

Prints steps/s off and on, their ratio, and the apply-latency percentiles; writes JSON with
``--out``. Starts its own MLflow server on loopback unless ``--tracking-uri`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
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


def train_block(
    model,
    optimizer,
    steps: int,
    width: int,
    knobs: TorchKnobs | None,
    first: int,
    applied_at: dict[int, float],
) -> float:
    """Run ``steps`` training steps; returns steps per second."""
    x, y = torch.randn(64, width), torch.randn(64, 1)
    started = time.perf_counter()
    for step in range(first, first + steps):
        if knobs is not None and (version := knobs.step(step)) is not None:
            applied_at[version.version] = time.time()
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - started)


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
    parser.add_argument("--steps", type=int, default=400, help="steps per block")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    server = None
    if args.tracking_uri is None:
        server = start_server(Path(tempfile.mkdtemp(prefix="atm-bench-")))
    uri = args.tracking_uri or server.uri  # type: ignore[union-attr]
    try:
        result = run(uri, args)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "client_overhead.json").write_text(json.dumps(result, indent=2))


def run(uri: str, args: argparse.Namespace) -> dict[str, object]:
    mlflow = MlflowClient(uri)
    experiment = mlflow.get_experiment_by_name("atm-bench")
    experiment_id = (
        experiment.experiment_id if experiment else mlflow.create_experiment("atm-bench")
    )
    run_id = mlflow.create_run(experiment_id, run_name="client-overhead").info.run_id
    model, optimizer = make_model(args.width)
    train_block(model, optimizer, 50, args.width, None, 0, {})  # warm-up
    off, on, applied_at, tagged_at = [], [], {}, {}
    step, version = 0, 0
    for _ in range(args.blocks):
        off.append(train_block(model, optimizer, args.steps, args.width, None, step, {}))
        step += args.steps
        knobs = TorchKnobs(optimizer=optimizer, model=model)
        knobs.client = ManagerClient(
            run_id, knobs.spec(), tracking_uri=uri, poll_interval=args.poll_interval
        ).start()
        time.sleep(2 * args.poll_interval)  # the first poll publishes the spec
        writer = Writer(uri, run_id, version, mean_gap_s=3 * args.poll_interval)
        writer.start()
        on.append(train_block(model, optimizer, args.steps, args.width, knobs, step, applied_at))
        step += args.steps
        writer.halt.set()
        writer.join()
        version = writer.version
        tagged_at.update(writer.tagged_at)
        # Versions tagged too late in the block to be applied in it are left out.
        knobs.close()
    latencies = sorted(applied_at[v] - tagged_at[v] for v in tagged_at if v in applied_at)
    step_s = 1 / statistics.fmean(on)
    p95 = latencies[math.ceil(0.95 * len(latencies)) - 1] if latencies else None
    return {
        "steps_per_s_off": statistics.fmean(off),
        "steps_per_s_on": statistics.fmean(on),
        "slowdown": 1 - statistics.fmean(on) / statistics.fmean(off),
        "blocks": args.blocks,
        "steps_per_block": args.steps,
        "poll_interval_s": args.poll_interval,
        "step_time_s": step_s,
        "versions_issued": len(tagged_at),
        "versions_applied": len(latencies),
        "apply_latency_p50_s": statistics.median(latencies) if latencies else None,
        "apply_latency_p95_s": p95,
        "apply_latency_target_s": args.poll_interval + step_s,
    }


if __name__ == "__main__":
    main()
