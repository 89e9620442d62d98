"""What a report shows, read from the tracker: the run, its metrics and its audit trail.

Everything here goes through the ``Tracker`` seam, so a report reads the same from any
backend; the rest of the package works on these plain values and never asks a tracker.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from pydantic import ValidationError

from integrations.health import objective_missing
from integrations.protocol import (
    DEFAULT_OBJECTIVE,
    METRIC_PARAMS_VERSION,
    SPEC_PATH,
    TAG_HEALTH,
    TAG_MANAGED,
    TAG_OBJECTIVE,
    AuditRecord,
    Health,
    HealthState,
    Objective,
    RunSpec,
)
from integrations.trackers import CorruptArtifact, MetricPoint, RunInfo, Tracker
from manager_daemon.audit import AuditLog
from manager_daemon.telemetry import TRAIN_LOSS_KEYS

# Metric keys that hold evaluations: ``eval_loss``, ``eval/success``, ``val_acc``, ``test/…``.
_EVALUATED = re.compile(r"^(eval|evaluation|val|valid|validation|test)([_/.\-]|$)")
# Counters of how fast or how big, not of how well: ``eval_runtime``,
# ``eval_samples_per_second``, ``total_flos``, ``eval/mem_gb``, ``time/fps``.
_THROUGHPUT = re.compile(
    r"(^|[_/.\-])(runtime|time|duration|fps|flos|flops|mem|memory)([_/.\-]|$)"
    r"|per_second|per_sec([_/.\-]|$)|throughput",
    re.IGNORECASE,
)
# Other evaluated metrics a report plots at most, besides the objective.
MAX_OTHER_METRICS = 6

Series = list[tuple[int, float]]


@dataclass
class RunData:
    """One run as a report sees it."""

    run: RunInfo
    objective: Objective
    managed: bool
    spec: RunSpec | None
    records: list[AuditRecord]
    # Metric key → (step, value) in step order: the objective, the other evaluated metrics,
    # and the train loss where the run logs one.
    series: dict[str, Series] = field(default_factory=dict)
    # Params version → the step at which the client applied it (its acknowledgement).
    applied: dict[int, int] = field(default_factory=dict)
    train_key: str | None = None
    spec_error: str | None = None
    # The params versions after whose application the objective was evaluated again.
    evaluated_after: set[int] = field(default_factory=set)
    health: Health | None = None
    # Metrics logged without steps: their series are numbered in the order logged.
    stepless: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run.name or self.run.run_id

    @property
    def objective_series(self) -> Series:
        return self.series.get(self.objective.metric, [])

    @property
    def objective_note(self) -> str | None:
        """Why the report shows no objective (it was never logged), unless the run's health
        says so already; else None."""
        waiting = self.health is not None and self.health.state is HealthState.WAITING_OBJECTIVE
        if self.objective_series or waiting:
            return None
        return objective_missing(self.objective.metric, self.run.latest_metrics)

    @property
    def notes(self) -> list[str]:
        """What a report says first: the manager not deciding for the run, and why; then the
        ``remarks``."""
        if self.health is None or self.health.ok:
            return self.remarks
        reason = f" — {self.health.reason}" if self.health.reason else ""
        return [f"Not deciding: {self.health.state.value}{reason}", *self.remarks]

    @property
    def remarks(self) -> list[str]:
        """What the report cannot show as the run meant it: an objective never logged,
        metrics logged without steps."""
        found = [self.objective_note] if self.objective_note else []
        if self.stepless:
            found.append(
                f"{', '.join(self.stepless)} logged without steps (every point at one step): "
                "numbered here in the order logged"
            )
        return found

    @property
    def other_metrics(self) -> list[str]:
        skip = {self.objective.metric, self.train_key}
        return [k for k in self.series if k not in skip]

    @property
    def knob_names(self) -> list[str]:
        """Knobs of the spec, then any other knob a decision changed."""
        names = [k.name for k in self.spec.knobs] if self.spec else []
        for record in self.records:
            for value in record.values:
                if value not in names:
                    names.append(value)
        return names


def evaluated_metrics(keys: list[str]) -> list[str]:
    """The keys of ``keys`` that hold evaluations, by their names; throughput counters
    (runtimes, rates, FLOPs, memory) are left out."""
    return sorted(k for k in keys if _EVALUATED.match(k) and not _THROUGHPUT.search(k))


def collect_run(
    tracker: Tracker,
    run_id: str,
    audit: AuditLog | None = None,
    *,
    objective: Objective | None = None,
) -> RunData:
    """Read one run's report data, on ``objective`` (default: the run's own, from its tag);
    raises RunNotFound for a run the tracker does not have."""
    run = tracker.get_run(run_id)
    objective = objective or Objective.parse(run.tags.get(TAG_OBJECTIVE) or DEFAULT_OBJECTIVE)
    audit = audit or AuditLog(tracker)
    records = audit.records(run_id)
    spec, spec_error = _spec(tracker, run_id)
    available = list(run.latest_metrics)
    train_key = next((k for k in TRAIN_LOSS_KEYS if k in available), None)
    others = [k for k in evaluated_metrics(available) if k != objective.metric]
    keys = [objective.metric, *others[:MAX_OTHER_METRICS]]
    keys += [k for k in (train_key, METRIC_PARAMS_VERSION) if k is not None and k in available]
    points, _ = tracker.read_new_points(run_id, keys, None)
    read = _Read(objective.metric, points)
    return RunData(
        run=run,
        objective=objective,
        managed=run.tags.get(TAG_MANAGED) == "true" or bool(records),
        spec=spec,
        records=records,
        series={
            k: read.series.get(k, [])
            for k in keys
            if k != METRIC_PARAMS_VERSION and (read.series.get(k) or k == objective.metric)
        },
        applied=read.applied,
        train_key=train_key,
        spec_error=spec_error,
        evaluated_after=read.evaluated_after,
        health=Health.parse(run.tags.get(TAG_HEALTH)),
        stepless=read.stepless,
    )


class _Read:
    """A run's points sorted out: the series of each metric, the step each params version was
    applied at, and the versions the objective was evaluated after.

    A metric logged without steps (every point at the same step, as ``mlflow.log_metric``
    without ``step=`` logs) is numbered in the order it was logged, and read in that order.
    """

    def __init__(self, metric: str, points: list[MetricPoint]) -> None:
        steps: dict[str, set[int]] = defaultdict(set)
        counts: Counter[str] = Counter()
        for point in points:
            steps[point.key].add(point.step)
            counts[point.key] += 1
        self.stepless = sorted(
            k for k, found in steps.items()
            if k != METRIC_PARAMS_VERSION and counts[k] > 1 and len(found) == 1
        )  # fmt: skip
        self.series: dict[str, Series] = defaultdict(list)
        self.applied: dict[int, int] = {}
        self.evaluated_after: set[int] = set()
        in_order = metric in self.stepless  # then the order logged is the only order there is
        for point in sorted(points, key=lambda p: (0 if in_order else p.step, p.timestamp)):
            if point.key == METRIC_PARAMS_VERSION:
                self.applied.setdefault(int(point.value), point.step)
                continue
            step = len(self.series[point.key]) if point.key in self.stepless else point.step
            self.series[point.key].append((step, point.value))
            if point.key == metric:
                self.evaluated_after.update(self.applied)


def collect_experiment(
    tracker: Tracker, experiment: str, objective: Objective | None = None
) -> list[RunData]:
    """Report data of every run of an experiment, managed or not, oldest first, each read on
    ``objective``; without it, a run that declared an objective (``atm.objective``) is read on
    its own, any other on the objective the declared ones share (else the default)."""
    runs = sorted(tracker.list_runs(experiment), key=lambda r: r.start_time or 0)
    declared = {r.tags[TAG_OBJECTIVE] for r in runs if r.tags.get(TAG_OBJECTIVE)}
    shared = declared.pop() if len(declared) == 1 else DEFAULT_OBJECTIVE
    audit = AuditLog(tracker)
    return [
        collect_run(
            tracker,
            r.run_id,
            audit,
            objective=objective or Objective.parse(r.tags.get(TAG_OBJECTIVE) or shared),
        )
        for r in runs
    ]


def _spec(tracker: Tracker, run_id: str) -> tuple[RunSpec | None, str | None]:
    try:
        raw = tracker.read_json(run_id, SPEC_PATH)
        return (None if raw is None else RunSpec.model_validate(raw)), None
    except (ValidationError, CorruptArtifact) as exc:
        return None, f"unreadable {SPEC_PATH}: {exc}"
