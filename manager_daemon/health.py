"""A run's health as the daemon sees it: whether it can do its job for the run, and if not, why.

Worked out from what a supervisor already holds (the run listing, its knob spec, the
evaluations read, the policy's recent answers), so it costs the tracker nothing but a tag write
when it changes (``TAG_HEALTH``). One state, the most pressing, and one line saying why and what
to do; the daemon's log says it once per run and cause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from integrations.health import objective_missing, script_keys
from integrations.protocol import (
    TAG_CLIENT_HEARTBEAT,
    TAG_HEALTH,
    Health,
    HealthState,
    Objective,
)
from integrations.trackers import RunInfo, Tracker, TrackerError

if TYPE_CHECKING:
    from prometheus_client import Gauge

log = logging.getLogger(__name__)

# A client heartbeats every minute: three missed beats and it is taken for gone.
HEARTBEAT_LOST_S = 180.0
# A run that has logged metrics but not its objective for this long is warned about (before,
# the objective may simply not have been evaluated yet).
OBJECTIVE_WAIT_S = 60.0


@dataclass(frozen=True)
class ModelAnswer:
    """How one answer of a model went: how long it took, and why it came too late (if so)."""

    seconds: float
    stale: str | None = None
    replaced: bool = False  # the rules decided on the current state in its place


@dataclass
class RunView:
    """What a supervisor knows of a run, for judging its health."""

    objective: Objective
    has_spec: bool
    spec_error: str | None = None
    steps_stuck_at: int | None = None  # the step the objective keeps being logged at
    seconds_per_eval: float | None = None
    decisions: int = 0
    issued: int = 0
    last_note: str | None = None


def assess(
    run: RunInfo, view: RunView, answers: Sequence[ModelAnswer], now: float | None = None
) -> Health:
    """The run's health: the first of the states below that holds, in order of urgency."""
    now = time.time() if now is None else now
    if not view.has_spec:
        return Health(state=HealthState.NO_KNOBS, reason=_no_knobs(view.spec_error))
    if (advisory := _advisory(run, now)) is not None:
        return Health(state=HealthState.ADVISORY, reason=advisory)
    metric = view.objective.metric
    if metric not in run.latest_metrics:
        waiting = objective_missing(metric, run.latest_metrics)
        return Health(state=HealthState.WAITING_OBJECTIVE, reason=waiting)
    if view.steps_stuck_at is not None:
        return Health(state=HealthState.NO_STEPS, reason=_no_steps(metric, view))
    if answers and answers[-1].stale and not answers[-1].replaced:
        return Health(state=HealthState.STALE_ANSWERS, reason=_stale(answers, view))
    return Health(state=HealthState.DECIDING, reason=_deciding(view))


def _no_knobs(error: str | None) -> str:
    if error:
        return f"{error}; nothing can be set until a client publishes a readable spec"
    return (
        "no knob spec: no client has published one and `atm attach` was given none; run the "
        "script under `atm run`, or `atm attach RUN --knob learning_rate=VALUE`"
    )


def _advisory(run: RunInfo, now: float) -> str | None:
    beat = run.tags.get(TAG_CLIENT_HEARTBEAT)
    if not beat:
        return (
            "no client heartbeat: decisions are audited, never applied; run the script under "
            "`atm run` (or add the manager's callback) for them to apply"
        )
    try:
        age = now - float(beat)
    except ValueError:
        return None
    if run.is_running and age > HEARTBEAT_LOST_S:
        return (
            f"no client heartbeat for over {HEARTBEAT_LOST_S / 60:.0f} min: versions issued now "
            "may never be applied (the training process is stuck, gone, or cannot reach the "
            "tracker)"
        )
    return None


def _no_steps(metric: str, view: RunView) -> str:
    return (
        f"{metric} is logged at step {view.steps_stuck_at} over and over, so a new evaluation "
        f"looks like an old one and none is decided on: log it with its step "
        f"(mlflow.log_metric({metric!r}, value, step=step)), or run the script under `atm run`, "
        "which records the training step"
    )


def _stale(answers: Sequence[ModelAnswer], view: RunView) -> str:
    late = [a for a in answers if a.stale]
    took = sorted(a.seconds for a in late)
    spread = f"{took[0]:.0f} s" if took[0] == took[-1] else f"{took[0]:.0f}–{took[-1]:.0f} s"
    pace = (
        f"; the run evaluates every {view.seconds_per_eval:.1f} s"
        if view.seconds_per_eval is not None
        else ""
    )
    return (
        f"{len(late)} of the last {len(answers)} model answers came too late (took {spread}"
        f"{pace}) and were discarded: use a faster endpoint, `--policy rules`, a larger "
        "`--stale-evals`, or evaluate less often"
    )


def _deciding(view: RunView) -> str:
    if view.decisions == 0:
        text = "watching: no decision needed so far"
    else:
        text = f"{view.decisions} decision(s), {view.issued} version(s) issued"
    if view.last_note:
        text += f"; {view.last_note}"
    return text


@dataclass
class _Said:
    """What the daemon has said of one run."""

    tag: str | None = None  # the health tag value written (or found) last
    warned: set[HealthState] = field(default_factory=set)
    waiting_since: float | None = None


class HealthReporter:
    """Says each run's health where users look: the run tag ``TAG_HEALTH`` (written only when
    it changes) and the daemon's log (once per run and cause; a missing objective only after
    the run has gone on without it for ``OBJECTIVE_WAIT_S``, since it may just not have been
    evaluated yet)."""

    def __init__(self, tracker: Tracker, gauge: Gauge | None = None) -> None:
        """``gauge`` (labelled by state) counts the runs in each state, kept current."""
        self.tracker = tracker
        self.gauge = gauge
        self.runs: dict[str, _Said] = {}
        self.latest: dict[str, Health] = {}
        self._lock = threading.Lock()  # reports come from the tick and the worker threads

    def report(self, run: RunInfo, health: Health) -> None:
        with self._lock:
            said = self.runs.setdefault(run.run_id, _Said(tag=run.tags.get(TAG_HEALTH)))
            self.latest[run.run_id] = health
            self._count()
        self._log(run, health, said)
        value = health.tag_value()
        if value not in (said.tag, run.tags.get(TAG_HEALTH)):
            try:
                self.tracker.set_tags(run.run_id, {TAG_HEALTH: value})
            except TrackerError as exc:
                log.debug("run %s: health not written (%s); next tick", run.run_id, exc)
                return
        said.tag = value

    def _log(self, run: RunInfo, health: Health, said: _Said) -> None:
        name = f"run {run.run_id[:12]} ({run.name})" if run.name else f"run {run.run_id[:12]}"
        if health.ok:
            said.waiting_since = None
            if said.warned and health.state not in said.warned:
                log.info("%s: deciding again", name)
                said.warned.add(health.state)
            return
        if health.state is HealthState.WAITING_OBJECTIVE:
            now = time.monotonic()
            if said.waiting_since is None:
                said.waiting_since = now
            if now - said.waiting_since < OBJECTIVE_WAIT_S or not script_keys(run.latest_metrics):
                return
        if health.state not in said.warned:
            said.warned.add(health.state)
            said.warned.discard(HealthState.DECIDING)
            log.warning("%s: %s", name, health)

    def forget(self, run_id: str) -> None:
        """A run no longer supervised here."""
        with self._lock:
            self.runs.pop(run_id, None)
            self.latest.pop(run_id, None)
            self._count()

    def _count(self) -> None:
        if self.gauge is None:
            return
        counts = dict.fromkeys(HealthState, 0)
        for health in self.latest.values():
            counts[health.state] += 1
        for state, count in counts.items():
            self.gauge.labels(state.value).set(count)
