"""Benchmark: what `atm run`'s injection costs a process.

1. Start-up: wall time of ``python -c pass`` and of ``python -c "import torch"`` launched
   plainly and launched with the injection switched on (the ``sitecustomize`` on
   ``PYTHONPATH`` and ``ATM_RUN`` set, exactly as `atm run` sets them), interleaved,
   ``--starts`` times each; the median difference. The first isolates the injection's own
   cost; the second includes hooking ``torch.optim`` as it loads.
2. Throughput: a plain PyTorch loop (an MLP, no manager code in it) run as a child process
   plainly and under the injection, logging to a run on a real MLflow server (pinned to a core
   of its own, as in ``bench_client_overhead.py``), interleaved, ``--repeats`` times each;
   steps/s reported by the loop itself, timed after a warm-up.

    python train_scripts/bench_injection.py [--starts 15] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

import integrations.autoinject
from integrations.inject import ENV, InjectConfig
from manager_daemon.mlflow_server import start_server

LOOP = """
import json, os, sys, time
import mlflow, torch
torch.manual_seed(0)
torch.set_num_threads(1)
steps, warmup = int(sys.argv[1]), int(sys.argv[2])
model = torch.nn.Sequential(
    torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(),
    torch.nn.Linear(512, 1),
)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
x, y = torch.randn(128, 512), torch.randn(128, 1)
with mlflow.start_run(run_id=os.environ["BENCH_RUN_ID"]):
    for step in range(steps + warmup):
        if step == warmup:
            started = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - started
print(json.dumps({"steps_per_s": steps / elapsed}))
"""


def injected_env(base: dict[str, str], poll_interval: float) -> dict[str, str]:
    """The environment `atm run` gives the command it launches."""
    env = dict(base)
    autoinject = os.path.dirname(integrations.autoinject.__file__)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (autoinject, env.get("PYTHONPATH")) if p)
    env[ENV] = InjectConfig(poll_interval=poll_interval).to_env()
    return env


def time_start(env: dict[str, str], code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    plain = {k: v for k, v in os.environ.items() if k != ENV}
    injected = injected_env(plain, args.poll_interval)
    codes = {"pass": "pass", "torch": "import torch"}
    time_start(plain, codes["torch"])  # warm the file cache
    starts: dict[str, list[float]] = {
        f"{what}_{how}": [] for what in codes for how in ("plain", "injected")
    }
    for _ in range(args.starts):
        for what, code in codes.items():
            starts[f"{what}_plain"].append(time_start(plain, code))
            starts[f"{what}_injected"].append(time_start(injected, code))

    cores = os.sched_getaffinity(0)
    server_cpus = {max(cores)} if len(cores) > 1 else None
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "mlflow", cpus=server_cpus)
        try:
            client = MlflowClient(server.uri)
            script = Path(tmp) / "loop.py"
            script.write_text(LOOP)
            rates: dict[str, list[float]] = {"plain": [], "injected": []}
            for _ in range(args.repeats):
                for name, env in (("plain", plain), ("injected", injected)):
                    run_id = client.create_run("0", run_name=f"bench-{name}").info.run_id
                    child_env = {
                        **env,
                        "MLFLOW_TRACKING_URI": server.uri,
                        "BENCH_RUN_ID": run_id,
                    }
                    cmd = [sys.executable, str(script), str(args.steps), str(args.warmup)]
                    if server_cpus:
                        cmd = ["taskset", "-c", ",".join(map(str, cores - server_cpus)), *cmd]
                    out = subprocess.run(
                        cmd, env=child_env, capture_output=True, text=True, check=True
                    )
                    rates[name].append(
                        json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"]
                    )
                    managed = client.get_run(run_id).data.tags.get("atm.managed")
                    assert (managed == "true") == (name == "injected"), (name, managed)
        finally:
            server.stop()

    start = {key: statistics.median(values) for key, values in starts.items()}
    rate_plain = statistics.median(rates["plain"])
    rate_injected = statistics.median(rates["injected"])
    summary = {
        **{f"startup_{key}_s": round(value, 3) for key, value in start.items()},
        "startup_added_pass_s": round(start["pass_injected"] - start["pass_plain"], 3),
        "startup_added_torch_s": round(start["torch_injected"] - start["torch_plain"], 3),
        "startup_target_s": 0.3,
        "steps_per_s_plain": round(rate_plain, 2),
        "steps_per_s_injected": round(rate_injected, 2),
        "slowdown": round(1 - rate_injected / rate_plain, 4),
        # Each injected run against the plain run just before it: drift hits both alike.
        "slowdown_paired_median": round(
            1
            - statistics.median(
                i / p for p, i in zip(rates["plain"], rates["injected"], strict=True)
            ),
            4,
        ),
        "rates": rates,
        "poll_interval_s": args.poll_interval,
        "server_pinned_apart": server_cpus is not None,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "injection.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
