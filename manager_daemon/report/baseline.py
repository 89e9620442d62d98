"""The run a managed run is measured against: an unmanaged run of the same experiment that logs
the same objective, or one the user names.

Choosing it is deterministic: the unmanaged run closest in start time (a run started beside
the managed one, like the demo's pair), ties to the earlier, then to the smaller run id.
"""

from __future__ import annotations

from dataclasses import dataclass

from integrations.health import objective_missing
from integrations.protocol import TAG_MANAGED
from integrations.trackers import RunInfo, Tracker
from manager_daemon.audit import AuditLog
from manager_daemon.report.data import RunData, collect_run
from manager_daemon.report.decisions import Summary, rows, summarize


@dataclass(frozen=True)
class Baseline:
    """The run a report compares with, and how it was chosen."""

    data: RunData
    summary: Summary
    chosen: str  # one line: given by the user, or why this run


def ratio(managed: tuple[int, float] | None, baseline: tuple[int, float] | None) -> float | None:
    """Managed ÷ baseline of two (step, value) points; None where either is missing or the
    baseline is 0."""
    if managed is None or baseline is None or baseline[1] == 0:
        return None
    return managed[1] / baseline[1]


def ratio_text(x: float | None) -> str:
    """A ratio as the report shows it: ``×0.802 (-19.8%)``."""
    return "-" if x is None else f"×{x:.3f} ({x - 1:+.1%})"


def compared(summary: Summary, baseline: Baseline) -> str:
    """One line: the baseline, how it was chosen, and the final objectives side by side."""
    other = baseline.summary
    x = ratio(summary.final, other.final)
    verdict = ""
    if x is not None and x != 1:
        better = (x < 1) == (baseline.data.objective.direction == "minimize")
        verdict = f": {'better' if better else 'worse'} than the baseline"
    return (
        f"baseline {baseline.data.name} ({baseline.data.run.run_id}), {baseline.chosen}: "
        f"final {_value(summary.final)} against {_value(other.final)}, {ratio_text(x)}{verdict}"
    )


def _value(point: tuple[int, float] | None) -> str:
    return "-" if point is None else f"{point[1]:.4g}"


def choose(tracker: Tracker, data: RunData) -> Baseline | None:
    """The unmanaged run of ``data``'s experiment, closest to it in start time, that logs its
    objective; None when the run is not managed or there is no such run."""
    if not data.managed:
        return None
    metric = data.objective.metric
    runs = [
        r
        for r in tracker.list_runs(data.run.experiment_id)
        # The experiment id is checked too: a tracker may list by name first.
        if r.experiment_id == data.run.experiment_id
        and r.run_id != data.run.run_id
        and r.tags.get(TAG_MANAGED) != "true"
        and metric in r.latest_metrics
    ]
    audit = AuditLog(tracker)
    for run in sorted(runs, key=lambda r: _distance(r, data.run)):
        found = collect_run(tracker, run.run_id, audit, objective=data.objective)
        if not found.managed and _comparable(found, data):  # a detached run has decisions
            return _baseline(found, f"the unmanaged run closest in start time ({_when(run, data)})")
    return None


# Evaluations a run needs to be compared with: one point (a trailing evaluate() of a script,
# logged as a run of its own) is no training.
MIN_EVALUATIONS = 3


def _comparable(found: RunData, data: RunData) -> bool:
    """Whether ``found`` trained on about the same steps as ``data``: evaluations over at
    least half of the steps ``data`` evaluated over."""
    theirs, ours = found.objective_series, data.objective_series
    if len(theirs) < MIN_EVALUATIONS:
        return False
    return not ours or max(s for s, _ in theirs) >= max(s for s, _ in ours) / 2


def given(tracker: Tracker, data: RunData, run_id: str) -> Baseline:
    """The run named by the user as the baseline, read on ``data``'s objective; raises
    ValueError when it is the run itself or never logged that objective."""
    if run_id == data.run.run_id:
        raise ValueError(f"the baseline {run_id} is the run reported; name another run")
    found = collect_run(tracker, run_id, objective=data.objective)
    if not found.objective_series:
        missing = objective_missing(data.objective.metric, found.run.latest_metrics)
        raise ValueError(f"the baseline {found.name} ({run_id}) cannot be compared: {missing}")
    return _baseline(found, "given with --baseline")


def _baseline(data: RunData, chosen: str) -> Baseline:
    return Baseline(data, summarize(data, rows(data)), chosen)


def _distance(run: RunInfo, managed: RunInfo) -> tuple[float, float, str]:
    if run.start_time is None or managed.start_time is None:
        return (float("inf"), 0, run.run_id)
    return (abs(run.start_time - managed.start_time), run.start_time, run.run_id)


def _when(run: RunInfo, data: RunData) -> str:
    if run.start_time is None or data.run.start_time is None:
        return "start time unknown"
    seconds = (run.start_time - data.run.start_time) / 1000
    if abs(seconds) < 1:
        return "started together"
    return f"started {_duration(abs(seconds))} {'after' if seconds > 0 else 'before'} this run"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
