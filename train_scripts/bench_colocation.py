"""Does the manager slow the training beside it? The same training alone, under the client,
and under the client with the daemon and its embedded model on the same cores.

The training is the demo's unmodified transformers script (a tiny GPT-2 on an overfitting
recipe, torch on every core), which times its own optimizer steps. Variants, interleaved:

- ``alone``: the script by itself (it logs to MLflow, as every variant does);
- ``client``: under ``atm run``, the client polling, no daemon;
- ``managed``: under ``atm run`` with ``atm daemon`` and the embedded model deciding beside it,
  with the co-location defaults (one model thread, passive OpenMP waits, decision work at
  nice 10);
- ``managed-idle``: the same with decision work at nice 19 in the idle scheduling class, where
  it gets only the CPU training leaves;
- ``managed-unshared``: the same with the daemon set up as for a machine of its own
  (llama.cpp's thread choice, busy waits, no nice): what the defaults avoid.

Knobs that change the cost of a step (dropout, label smoothing) are pinned, so that what the
manager decides does not change what a step computes; what is left is its own cost.

    python train_scripts/bench_colocation.py --repeats 3 --steps 1500 --out bench/colocation

Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from integrations.knobs import Knob
from integrations.trackers import open_tracker
from manager_daemon.audit import AuditLog
from manager_daemon.daemon import IDLE_NICE
from manager_daemon.mlflow_server import start_server
from train_scripts.bench_common import run_script

log = logging.getLogger("bench_colocation")

# Each variant and the flags of its daemon (None: no daemon).
VARIANTS: dict[str, list[str] | None] = {
    "alone": None,
    "client": None,
    "managed": [],
    "managed-idle": ["--nice", str(IDLE_NICE)],
    "managed-unshared": ["--llm-threads", "0", "--llm-busy-wait", "--nice", "0"],
}
# Dropout and label smoothing change what a step computes; pinned at their starting values.
PINNED = {k.value: {"min": 0.0, "max": 0.0} for k in (Knob.DROPOUT, Knob.LABEL_SMOOTHING)}


@dataclass
class Trial:
    variant: str
    repeat: int
    steps: int
    median_s: float
    p99_s: float
    max_s: float
    steps_per_s: float
    decisions: int
    model_calls: int
    model_s_median: float | None


def daemon(uri: str, experiment: str, out: Path, flags: list[str]) -> subprocess.Popen[bytes]:
    """``atm daemon`` with the embedded model, once it has loaded it."""
    log_path = out / f"daemon-{experiment}.log"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "manager_daemon.cli", "daemon", "--tracking-uri", uri,
            "--policy", "llm", "--interval", "2", "--experiment", experiment,
            "--cooldown-steps", "20", "--stale-evals", "8",
            *flags,
        ],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while "policy: llm" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.5)
    return process


def trial(uri: str, variant: str, repeat: int, args: argparse.Namespace) -> Trial:
    name = f"{variant}-{repeat}"
    experiment = f"colocation-{name}"
    times = args.out / f"steps-{name}.json"
    script = [
        sys.executable, "-m", "manager_daemon.demo.train_lm", "--tracking-uri", uri,
        "--experiment", experiment, "--run-name", name, "--threads", str(args.threads),
        "--max-steps", str(args.steps), "--step-times", str(times),
    ]  # fmt: skip
    bounds = args.out / "pinned.json"
    bounds.write_text(json.dumps(PINNED))  # YAML reads JSON
    command = script
    if variant != "alone":
        command = [
            sys.executable, "-m", "manager_daemon.cli", "run", "--tracking-uri", uri,
            "--bounds", str(bounds), "--", *script,
        ]  # fmt: skip
    helper = None
    if (flags := VARIANTS[variant]) is not None:
        helper = daemon(uri, experiment, args.out, flags)
    try:
        summary = run_script(command, args.out / f"train-{name}.log")
    finally:
        if helper is not None:
            helper.terminate()
            helper.wait(60)
    seconds = sorted(json.loads(times.read_text())[args.warmup :])
    records = AuditLog(open_tracker(uri)).records(str(summary["run_id"]))
    calls = [v for r in records for k, v in r.timings.items() if k.startswith("llm_call_")]
    result = Trial(
        variant,
        repeat,
        len(seconds),
        round(statistics.median(seconds), 5),
        round(seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))], 5),
        round(seconds[-1], 5),
        round(len(seconds) / sum(seconds), 3),
        len(records),
        len(calls),
        round(statistics.median(calls), 2) if calls else None,
    )
    log.info("%s", result)
    return result


def summarise(trials: list[Trial], args: argparse.Namespace) -> str:
    by_variant: dict[str, list[Trial]] = {}
    for t in trials:
        by_variant.setdefault(t.variant, []).append(t)
    base = by_variant[args.variants[0]]
    base_median = statistics.median(t.median_s for t in base)
    base_p99 = statistics.median(t.p99_s for t in base)
    lines = [
        f"{args.repeats} interleaved trials per variant, {args.steps} steps each (the first "
        f"{args.warmup} left out), torch on {args.threads} threads, on {os.cpu_count()} cores.",
        "",
        "| variant | median step (ms) | p99 step (ms) | slowest step (ms) | steps/s | slowdown, "
        "median step | slowdown, p99 step | decisions | model calls, median s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, group in by_variant.items():
        median = statistics.median(t.median_s for t in group)
        p99 = statistics.median(t.p99_s for t in group)
        calls = [t.model_s_median for t in group if t.model_s_median is not None]
        lines.append(
            f"| {variant} | {1000 * median:.1f} | {1000 * p99:.1f} "
            f"| {1000 * max(t.max_s for t in group):.0f} "
            f"| {statistics.median(t.steps_per_s for t in group):.2f} "
            f"| {100 * (median / base_median - 1):+.1f} % | {100 * (p99 / base_p99 - 1):+.1f} % "
            f"| {sum(t.decisions for t in group) / len(group):.1f} "
            f"| {f'{statistics.median(calls):.1f}' if calls else '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Trial]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        default=["alone", "client", "managed"],
        help=f"comma-separated, the first the baseline; of: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out/colocation"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = args.variants
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    server = start_server(args.out / "mlflow")
    trials: list[Trial] = []
    try:
        for repeat in range(args.repeats):
            # Each round starts with a different variant: drift over time spreads evenly.
            order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
            trials += [trial(server.uri, v, repeat, args) for v in order]
    finally:
        server.stop()
    (args.out / "results.json").write_text(json.dumps([asdict(t) for t in trials], indent=1))
    table = summarise(trials, args)
    (args.out / "results.md").write_text(table)
    print(table)
    return trials


if __name__ == "__main__":
    main()
