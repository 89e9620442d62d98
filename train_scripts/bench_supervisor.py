"""Benchmark: does the supervisor leave healthy runs alone, and catch the sick ones?

Every run of the corpus (``train_scripts/supervisor_tasks.py``: four tasks with tuned recipes,
and the same recipes with injected faults) trains once unmanaged and once under each policy
asked for, seed by seed. A managed run is connected by its framework's own integration to a
tracker run (the in-memory tracker: this benchmark measures decisions, not I/O) that a real
``Daemon`` supervises. The daemon is driven synchronously: at each evaluation the run waits
while the client delivers its acknowledgements, the daemon makes one pass, and the client
fetches what was decided, which applies at the run's next boundary. So the decisions do not
depend on thread timing, and a policy's latency does not delay its decisions here (on a live
run it does).

Measured, per policy: interventions per healthy run and the share of healthy runs left alone;
on sick runs the detection rate (a fitting intervention: the learning rate lowered for one too
high or spiked, raised for one too low, regularisation, rollback or stop for overfitting, the
entropy coefficient raised for a collapse) and its latency, in evaluations from the fault's
onset (its first step; for overfitting, the unmanaged run's best evaluation) to the one the
intervention was decided at; and the final objective (of the weights each run ends with)
managed ÷ unmanaged.

    python train_scripts/bench_supervisor.py            # the whole corpus, both policies
    python train_scripts/bench_supervisor.py --tasks digits --faults none,lr_spike \\
        --seeds 0 --policy rules                           # a quick part of it

Prints a line per run and the summary tables; writes ``results.json`` and ``results.md``
under ``--out`` (default ``docs/bench/supervisor``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from integrations.adapter import ManagedTraining
from integrations.client import ManagerClient
from integrations.protocol import Command, Objective
from integrations.trackers import open_tracker
from manager_daemon.audit import AuditLog
from manager_daemon.daemon import Daemon
from manager_daemon.policies.base import Policy
from manager_daemon.policies.factory import make_policy
from manager_daemon.policies.rules import RulesPolicy
from manager_daemon.settings import DaemonSettings, PolicyName
from manager_daemon.supervisor import SupervisorConfig
from train_scripts.bench_common import describe
from train_scripts.supervisor_tasks import FAULTS, TASKS, Fault, onset_step

OUT = Path(__file__).resolve().parents[1] / "docs" / "bench" / "supervisor"
POLICIES = ("rules", "default")
UNMANAGED = "unmanaged"
# Within this share of the unmanaged run's final objective counts as the same.
SAME = 0.01


class Supervision:
    """One run's tracker run and, when managed, its daemon, driven at each evaluation."""

    def __init__(self, name: str, policy: Policy | None) -> None:
        self.tracker = open_tracker(f"memory://bench-supervisor-{uuid.uuid4().hex}")
        self.run_id = self.tracker.create_run(name)  # type: ignore[attr-defined]
        self.policy = policy
        self.daemon: Daemon | None = None
        self.integration: ManagedTraining | None = None
        self.client: ManagerClient | None = None
        self.evaluations: list[tuple[int, float]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)

    def manage(self, integration: ManagedTraining, start: Callable[[str, str], Any]) -> bool:
        if self.policy is None:
            return False
        self.integration = integration
        self.daemon = Daemon(self.tracker, self.policy, SupervisorConfig(), workers=1)
        start(self.run_id, self.tracker.uri)
        return True

    def evaluated(self, step: int, value: float) -> None:
        self.evaluations.append((step, value))
        client = self._client()
        if client is None or self.daemon is None:
            return
        writer = getattr(self.integration, "writer", None)
        if writer is not None:
            writer.flush()  # SB3's own metrics, sent on a thread of their own
        client.poll_once()  # acknowledgements of what was applied since the last evaluation
        self.daemon.run_once()
        client.poll_once()  # what was just decided, staged for the next boundary

    def _client(self) -> ManagerClient | None:
        if self.client is None and self.integration is not None:
            client = self.integration.client
            if isinstance(client, ManagerClient):
                client.close()  # from here on the benchmark polls for it
                self.client = client
        return self.client

    def interventions(self) -> list[dict[str, Any]]:
        records = [r for r in AuditLog(self.tracker).records(self.run_id) if r.params_version]
        steps = [s for s, _ in self.evaluations]
        found = []
        for record in records:
            item = describe(record, None)
            item["evaluation"] = sum(1 for s in steps if s <= (record.step or 0))
            found.append(item)
        return found

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.close()


@dataclass
class RunResult:
    task: str
    fault: str
    seed: int
    policy: str
    final: float
    seconds: float
    evaluations: list[tuple[int, float]]
    interventions: list[dict[str, Any]] = field(default_factory=list)
    onset_step: int | None = None
    detected_at: int | None = None  # the evaluation (1-based) of the first fitting intervention
    latency: int | None = None
    ratio: float | None = None  # final ÷ the unmanaged run's


def fitting(fault: str, item: dict[str, Any]) -> bool:
    """Whether an intervention is a remedy for ``fault``."""

    def moved(knob: str) -> float:
        before, after = item["changes"].get(knob, (0.0, 0.0))
        return (after or 0.0) - (before or 0.0)

    commands = item["commands"]
    if fault in ("lr_high", "lr_spike"):
        return moved("learning_rate") < 0
    if fault == "lr_low":
        return moved("learning_rate") > 0
    if fault == "overfit":
        return (
            moved("weight_decay") > 0
            or moved("dropout") > 0
            or Command.ROLLBACK_TO_BEST.value in commands
            or Command.STOP.value in commands
        )
    if fault == "entropy_collapse":
        return moved("ent_coef") > 0
    return False


def run_one(
    task: str, fault: Fault, seed: int, policy_name: str, policy: Policy | None
) -> RunResult:
    watch = Supervision(f"{task}-{fault.name}-{seed}-{policy_name}", policy)
    started = time.perf_counter()
    try:
        final = TASKS[task].train(seed, fault, watch)
    finally:
        watch.close()
    return RunResult(
        task=task,
        fault=fault.name,
        seed=seed,
        policy=policy_name,
        final=final,
        seconds=round(time.perf_counter() - started, 2),
        evaluations=watch.evaluations,
        interventions=watch.interventions(),
    )


def judge(result: RunResult, baseline: RunResult) -> None:
    """Onset, detection and latency against the fault, and the ratio to the unmanaged run."""
    task = TASKS[result.task]
    result.ratio = result.final / baseline.final if baseline.final else None
    if result.fault == "none":
        return
    if result.fault == "overfit":
        objective = Objective.parse(task.objective)
        best = baseline.evaluations[0]
        for step, value in baseline.evaluations:
            if objective.better(value, best[1]):
                best = (step, value)
        onset = best[0]
    else:
        onset = onset_step(FAULTS[result.fault], task.steps)
    result.onset_step = onset
    steps = [s for s, _ in result.evaluations]
    for item in result.interventions:
        decided = item["decision_step"] or 0
        if fitting(result.fault, item) and (decided > onset or result.fault == "overfit"):
            result.detected_at = item["evaluation"]
            result.latency = sum(1 for s in steps if onset < s <= decided)
            return


def better(task: str, managed: float, unmanaged: float) -> bool:
    return Objective.parse(TASKS[task].objective).better(managed, unmanaged) and not (
        abs(managed - unmanaged) <= SAME * abs(unmanaged)
    )


def summarise(results: list[RunResult]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for policy in sorted({r.policy for r in results} - {UNMANAGED}):
        mine = [r for r in results if r.policy == policy]
        healthy = [r for r in mine if r.fault == "none"]
        sick = [r for r in mine if r.fault != "none"]
        ratios = [r.ratio for r in healthy if r.ratio is not None]
        latencies = [r.latency for r in sick if r.latency is not None]
        summary[policy] = {
            "healthy_runs": len(healthy),
            "healthy_left_alone": _share([not r.interventions for r in healthy]),
            "interventions_per_healthy_run": _mean([len(r.interventions) for r in healthy]),
            "healthy_within_1pct": _share([abs(x - 1) <= SAME for x in ratios]),
            "healthy_ratio_range": [min(ratios), max(ratios)] if ratios else None,
            "sick_runs": len(sick),
            "detected": _share([r.detected_at is not None for r in sick]),
            "median_latency_evals": statistics.median(latencies) if latencies else None,
            "sick_better_than_unmanaged": _share(
                [r.ratio is not None and _improved(r) for r in sick]
            ),
            "sick_median_ratio": statistics.median(
                [r.ratio for r in sick if r.ratio is not None] or [float("nan")]
            ),
        }
    return summary


def _improved(r: RunResult) -> bool:
    assert r.ratio is not None
    return better(r.task, r.final, r.final / r.ratio)


def _share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 3) if flags else None


def _mean(values: list[int]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def table(results: list[RunResult]) -> str:
    """Markdown: one row per task, fault and policy, over its seeds."""
    rows = [
        "| task | fault | policy | runs | interventions | detected | latency (evals) | "
        "final (mean) | managed ÷ unmanaged | better |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted({(r.task, r.fault, r.policy) for r in results}, key=_order):
        group = [r for r in results if (r.task, r.fault, r.policy) == key]
        rows.append("| " + " | ".join([*key, *_cells(group)]) + " |")
    return "\n".join(rows)


def _cells(group: list[RunResult]) -> list[str]:
    """A row's figures; a dash where one does not apply (unmanaged runs, healthy runs)."""
    first = group[0]
    final = f"{statistics.fmean(r.final for r in group):.4g}"
    if first.policy == UNMANAGED:
        return [str(len(group)), "–", "–", "–", final, "–", "–"]
    interventions = str(sum(len(r.interventions) for r in group))
    ratios = ", ".join(f"{r.ratio:.3f}" for r in group if r.ratio is not None)
    if first.fault == "none":
        return [str(len(group)), interventions, "–", "–", final, ratios, "–"]
    detected = f"{sum(r.detected_at is not None for r in group)}/{len(group)}"
    latencies = ", ".join(str(r.latency) for r in group if r.latency is not None) or "–"
    improved = f"{sum(_improved(r) for r in group)}/{len(group)}"
    return [str(len(group)), interventions, detected, latencies, final, ratios, improved]


def _order(key: tuple[str, str, str]) -> tuple[int, int, int]:
    task, fault, policy = key
    policies = (UNMANAGED, *POLICIES)
    return list(TASKS).index(task), list(FAULTS).index(fault), policies.index(policy)


def summary_table(summary: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| policy | healthy runs left alone | interventions / healthy run | healthy within ±1 % "
        "| faults detected | median latency (evals) | sick runs better than unmanaged |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy, s in summary.items():
        rows.append(
            f"| {policy} | {_pct(s['healthy_left_alone'])} of {s['healthy_runs']} | "
            f"{s['interventions_per_healthy_run']} | {_pct(s['healthy_within_1pct'])} | "
            f"{_pct(s['detected'])} of {s['sick_runs']} | {s['median_latency_evals']} | "
            f"{_pct(s['sick_better_than_unmanaged'])} |"
        )
    return "\n".join(rows)


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def policies_for(names: list[str]) -> dict[str, tuple[Policy, str]]:
    chosen: dict[str, tuple[Policy, str]] = {}
    for name in names:
        if name == "rules":
            chosen[name] = (RulesPolicy(), "policy: rules")
        else:  # what `atm daemon` runs with no policy named
            chosen[name] = make_policy(DaemonSettings(policy=PolicyName.AUTO))
    return chosen


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"of {', '.join(TASKS)}")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"of {', '.join(FAULTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--policy", default=",".join(POLICIES), help="rules, default, or both")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("-v", "--verbose", action="store_true", help="the manager's own logs")
    args = parser.parse_args(argv)
    args.tasks, args.faults = args.tasks.split(","), args.faults.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.policy = args.policy.split(",")
    for given, known in ((args.tasks, TASKS), (args.faults, FAULTS), (args.policy, POLICIES)):
        if unknown := sorted(set(given) - set(known)):
            parser.error(f"unknown {', '.join(unknown)}: choose from {', '.join(known)}")
    return args


def run_corpus(
    tasks: list[str], faults: list[str], seeds: list[int], policies: dict[str, Policy]
) -> list[RunResult]:
    """Each run unmanaged, then under each policy; prints a line per run."""
    results: list[RunResult] = []
    for task in tasks:
        for fault in (f for f in faults if f in TASKS[task].faults):
            for seed in seeds:
                baseline = run_one(task, FAULTS[fault], seed, UNMANAGED, None)
                results.append(baseline)
                _report(baseline)
                for name, policy in policies.items():
                    result = run_one(task, FAULTS[fault], seed, name, policy)
                    judge(result, baseline)
                    results.append(result)
                    _report(result)
    return results


def main(argv: list[str] | None = None) -> list[RunResult]:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    # The client's notices about daemons are about live runs: here the daemon is driven by
    # the benchmark itself, holds no lease, and the client would say each run was unwatched.
    logging.getLogger("integrations.client").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    policies = policies_for(args.policy)
    for name, (_, why) in policies.items():
        print(f"{name}: {why}")
    started = time.perf_counter()
    results = run_corpus(
        args.tasks, args.faults, args.seeds, {n: p for n, (p, _) in policies.items()}
    )
    minutes = (time.perf_counter() - started) / 60
    summary = summarise(results)
    print(table(results))
    print(summary_table(summary))
    print(f"{len(results)} runs in {minutes:.1f} min")
    setup = {
        "command": " ".join(["python train_scripts/bench_supervisor.py", *(argv or [])]),
        "tasks": {t: _setup(t) for t in args.tasks},
        "faults": {f: asdict(FAULTS[f]) for f in args.faults},
        "seeds": args.seeds,
        "policies": {name: why for name, (_, why) in policies.items()},
        "daemon": "driven synchronously at each evaluation (SupervisorConfig defaults)",
        "minutes": round(minutes, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"setup": setup, "summary": summary, "runs": [asdict(r) for r in results]}
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    (args.out / "results.md").write_text(summary_table(summary) + "\n\n" + table(results) + "\n")
    return results


def _setup(task: str) -> dict[str, Any]:
    t = TASKS[task]
    return {
        "objective": t.objective,
        "steps": t.steps,
        "eval_every": t.eval_every,
        "faults": list(t.faults),
    }


def _report(r: RunResult) -> None:
    line = f"{r.task:10} {r.fault:16} seed {r.seed} {r.policy:9}: final {r.final:.4g}"
    if r.policy != UNMANAGED:
        first = r.interventions[0] if r.interventions else None
        line += f" (× {r.ratio:.3f}), {len(r.interventions)} interventions"
        if first is not None:
            line += f", the first at evaluation {first['evaluation']}: {first['reason'][:90]}"
        if r.detected_at is not None:
            line += f"; detected at evaluation {r.detected_at}, latency {r.latency}"
    print(f"{line} ({r.seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
