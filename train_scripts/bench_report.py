"""Benchmark: how long ``atm report`` takes for a run with many decisions.

A run on the in-memory tracker gets ``--decisions`` decisions through the real writers: the
training-side client publishing its knobs and applying each version at the next step, a
supervisor auditing every rules decision (no action included), and every fifth decision a
human change made as ``atm set`` makes it. Then its report is made: read from the tracker,
rendered (table, summary, plots, page), and written back into the run.

    python train_scripts/bench_report.py --decisions 500

Prints the time of each phase and one JSON line of the figures; the target is a render of
500 decisions in under 10 s.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import uuid
from pathlib import Path

from integrations.client import ManagerClient
from integrations.knobs import Knob
from integrations.protocol import Boundary, Command, KnobSpec, RunSpec, Source
from integrations.trackers import open_tracker
from integrations.trackers.memory import MemoryTracker
from manager_daemon.audit import AuditLog
from manager_daemon.policies.base import PolicyAnswer
from manager_daemon.policies.rules import RulesPolicy
from manager_daemon.report import publish_run_report, report_from
from manager_daemon.report.data import collect_run
from manager_daemon.supervisor import RunSupervisor, SupervisorConfig, human_proposal
from manager_daemon.validation import ValidationConfig

SPEC = RunSpec(
    framework="torch",
    knobs=[
        KnobSpec(
            name=Knob.LEARNING_RATE, value=1e-3, min=1e-6, max=1e-2, max_rel_step=3.0, scale="log"
        ),
        KnobSpec(name=Knob.WEIGHT_DECAY, value=0.0, min=0.0, max=0.5, max_rel_step=0.2),
    ],
    # No stop: a run that was told to stop gets no more decisions.
    commands=[Command.ROLLBACK_TO_BEST],
)
EVAL_EVERY = 10


def make_run(tracker: MemoryTracker, decisions: int) -> str:
    """A managed run with ``decisions`` audited decisions."""
    run_id = tracker.create_run("bench-report")
    client = ManagerClient(run_id, SPEC, tracker=tracker, objective="minimize:eval_loss")
    client.poll_once()
    config = SupervisorConfig(
        validation=ValidationConfig(cooldown_steps=0, budget=decisions), audit_no_action=True
    )
    supervisor = RunSupervisor(run_id, tracker, AuditLog(tracker), config)
    rules = RulesPolicy()
    made, step = 0, 0
    while made < decisions:
        if step > 100 * EVAL_EVERY * (made + 1):
            raise RuntimeError(f"the supervisor stopped deciding after {made} decisions")
        for _ in range(EVAL_EVERY):
            step += 1
            client.poll_once()
            client.apply_pending(Boundary.STEP, step, lambda _c, _k: None)
            tracker.log_metrics(run_id, {"loss": 3.0 * math.exp(-step / 3000) + 0.1}, step)
        # An evaluation that wanders, so that the rules see plateaus, rises and recoveries.
        wobble = 0.15 * math.sin(step / 170) + 0.05 * math.sin(step / 23)
        tracker.log_metrics(run_id, {"eval_loss": 3.2 * math.exp(-step / 3000) + wobble}, step)
        if made % 5 == 4:
            run = supervisor.refresh()
            value = 1e-3 if made % 10 == 4 else 5e-4
            proposal = human_proposal({Knob.LEARNING_RATE: value}, [], "set by hand")
            record = supervisor.decide(
                run, Source.HUMAN, "human", lambda _s, _m, p=proposal: PolicyAnswer(p)
            )
        else:
            record = supervisor.tick(rules)
        made += record is not None
    client.poll_once()
    return run_id


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=500)
    parser.add_argument("--out", type=Path, help="also write the report into this folder")
    args = parser.parse_args(argv)

    tracker = open_tracker(f"memory://bench-report-{uuid.uuid4().hex}")
    assert isinstance(tracker, MemoryTracker)
    started = time.perf_counter()
    run_id = make_run(tracker, args.decisions)
    made_s = time.perf_counter() - started

    started = time.perf_counter()
    data = collect_run(tracker, run_id)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    report = report_from(data, budget=args.decisions)
    render_s = time.perf_counter() - started
    started = time.perf_counter()
    publish_run_report(tracker, run_id, budget=args.decisions, out=args.out)
    publish_s = time.perf_counter() - started

    figures = {
        "decisions": len(data.records),
        "rows": len(report.rows),
        "issued": report.summary.issued,
        "steps": max(s for s, _ in data.objective_series),
        "page_kb": round(len(report.html) / 1024, 1),
        "make_run_s": round(made_s, 2),
        "read_s": round(read_s, 3),
        "render_s": round(render_s, 3),
        "publish_s": round(publish_s, 3),
    }
    print(
        f"{figures['decisions']} decisions ({figures['issued']} issued) over "
        f"{figures['steps']} steps: read {read_s:.2f} s, render {render_s:.2f} s "
        f"(table, summary, {len(report.plots)} plots, a {figures['page_kb']} KB page), "
        f"read + render + write {publish_s:.2f} s"
    )
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
