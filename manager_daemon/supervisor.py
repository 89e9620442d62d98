"""One managed run as the daemon sees it: read new points, decide, validate, write.

A supervisor holds no state the tracker does not hold: when a run first has news for it (or
after a restart) it completes an interrupted write, reloads the audit trail and reads a bounded
recent window of the run's metrics; after that a tick costs what is new. A tick whose run
listing shows no new evaluation of the objective (and no new spec or objective) reads nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable

from pydantic import BaseModel, Field, ValidationError

from integrations.protocol import (
    DEFAULT_OBJECTIVE,
    SPEC_PATH,
    TAG_CLIENT_HEARTBEAT,
    TAG_CLIENT_REJECTED,
    TAG_OBJECTIVE,
    TAG_PARAMS_VERSION,
    TAG_SPEC_DIGEST,
    AuditRecord,
    Command,
    Health,
    Objective,
    ParamsVersion,
    Proposal,
    RunSpec,
    Source,
)
from integrations.trackers import (
    CorruptArtifact,
    Cursor,
    MetricPoint,
    PointsRead,
    RunInfo,
    Tracker,
)
from manager_daemon.audit import AuditLog, VersionConflict, current_version
from manager_daemon.crashpoints import crash_point
from manager_daemon.health import ModelAnswer, RunView, assess
from manager_daemon.leases import LeaseLost
from manager_daemon.metrics import DaemonMetrics
from manager_daemon.policies.base import Policy, PolicyAnswer
from manager_daemon.telemetry import (
    EVALS_FOR_OUTCOME,
    Intervention,
    ObjectiveView,
    RunTelemetry,
    Snapshot,
    TrainView,
)
from manager_daemon.validation import Menu, RunState, ValidationConfig, build_menu, validate

log = logging.getLogger(__name__)

# The model answers a supervisor remembers, for telling a run whose answers keep arriving late.
ANSWERS_KEPT = 8
# Evaluations of the objective at one step that say it is logged without steps (a run may log
# its last evaluation twice, as a Trainer's final evaluate() does).
REPEATS_FOR_NO_STEPS = 3


class SupervisorConfig(BaseModel):
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    audit_no_action: bool = Field(False, description="Also audit decisions to do nothing")
    stale_evals: int = Field(
        2,
        ge=0,
        description="An answer is discarded (audited as stale) when the run moved on by more "
        "than this many evaluations while the policy was deciding",
    )
    stale_steps: int | None = Field(None, ge=0, description="The same, in steps (off if unset)")


class RunSupervisor:
    """Decision cycles for one run."""

    def __init__(
        self,
        run_id: str,
        tracker: Tracker,
        audit: AuditLog,
        config: SupervisorConfig | None = None,
        *,
        guard: Callable[[], None] | None = None,
        metrics: DaemonMetrics | None = None,
    ) -> None:
        """``guard`` raises ``LeaseLost`` when this process may no longer write a decision
        for the run (another daemon replica supervises it now)."""
        self.run_id = run_id
        self.tracker = tracker
        self.audit = audit
        self.config = config or SupervisorConfig()
        self.guard = guard
        self.metrics = metrics
        self.spec: RunSpec | None = None
        self.spec_error: str | None = None
        self.spec_digest: str | None = None
        self.telemetry: RunTelemetry | None = None
        self.cursor: Cursor | None = None
        # The records of the issued versions (and, from a start, the last decision's): what
        # outcomes are written into and the next decision builds on, not every decision.
        self.records: dict[int, AuditRecord] = {}
        self.last_decision_id = 0
        self.history: list[Intervention] = []
        self.last_decision_step = -1
        # Where to start again when a decision could not be written (the lease was short).
        self._undecided_step = -1
        # The trusted params version, and the tags and spec it was judged under.
        self._trusted: tuple[tuple[str | None, ...], ParamsVersion | None] | None = None
        # For the run's health: the model's recent answers, the objective logged again and
        # again at one step, and why the last decision was made by whom it was.
        self.answers: deque[ModelAnswer] = deque(maxlen=ANSWERS_KEPT)
        self.repeats_at_step: tuple[int, int] | None = None  # (step, evaluations seen there)
        self._listed: tuple[int | None, float | None] | None = None  # the objective's, listed
        self.last_note: str | None = None
        self.active = False  # a client heartbeats: versions are applied, at steps it records

    # ---- loading ------------------------------------------------------------------------

    def load(self, run: RunInfo) -> RunInfo:
        """Rebuild this run's state from the tracker; returns the run as it is now (an
        interrupted decision completed moves its version tag)."""
        self._load_spec(run)
        if self.audit.recover(self.run_id, run.tags, self.spec) is not None:
            run = self.tracker.get_run(self.run_id)
        objective = Objective.parse(run.tags.get(TAG_OBJECTIVE) or DEFAULT_OBJECTIVE)
        self.telemetry = RunTelemetry(objective)
        self.cursor = None
        records, self.last_decision_id = self.audit.records_at_start(self.run_id, run.tags)
        self.records = {r.decision_id: r for r in records}
        self._remember_earlier_evaluations()
        self.history = [_intervention(r) for r in self.records.values() if r.params_version]
        self.history.sort(key=lambda i: i.version)
        steps = [
            r.step for r in self.records.values() if r.step is not None and r.source != Source.HUMAN
        ]
        self.last_decision_step = max(steps, default=-1)
        return run

    def _remember_earlier_evaluations(self) -> None:
        # The metrics are read from a recent window only: the best and first evaluations
        # before it, and the train loss's starting level, are in the last decision's snapshot.
        assert self.telemetry is not None
        for record in sorted(self.records.values(), key=lambda r: r.decision_id, reverse=True):
            earlier = (record.telemetry or {}).get("objective")
            if earlier and earlier.get("metric") == self.telemetry.objective.metric:
                train = (record.telemetry or {}).get("train")
                self.telemetry.remember(
                    ObjectiveView.model_validate(earlier),
                    TrainView.model_validate(train) if train else None,
                )
                return

    def _load_spec(self, run: RunInfo) -> None:
        self.spec_digest = run.tags.get(TAG_SPEC_DIGEST)
        try:
            raw = self.tracker.read_json(self.run_id, SPEC_PATH)
            self.spec = None if raw is None else RunSpec.model_validate(raw)
            self.spec_error = None
        except (ValidationError, CorruptArtifact) as exc:
            self.spec, self.spec_error = None, f"unreadable {SPEC_PATH}: {exc}"
            log.warning("run %s: %s", self.run_id, self.spec_error)

    def has_news(self, run: RunInfo) -> bool:
        """Whether the run listing shows what this supervisor has not read: a new evaluation
        of the objective, a new objective or a new spec. Asks the tracker nothing."""
        if self.telemetry is None:
            return True
        objective = run.tags.get(TAG_OBJECTIVE)
        if objective and objective != str(self.telemetry.objective):
            return True
        if run.tags.get(TAG_SPEC_DIGEST) != self.spec_digest:
            return True
        if not run.latest_steps:
            return True  # a listing without latest steps: only a read can tell
        read = self.telemetry.evals[-1][0] if self.telemetry.evals else -1
        if read > self.last_decision_step:
            return True  # read, but its decision could not be written yet
        metric = self.telemetry.objective.metric
        latest = run.latest_steps.get(metric)
        listed = (latest, run.latest_metrics.get(metric))
        if latest == read and listed != self._listed and listed[1] != self.telemetry.evals[-1][1]:
            # A new value at the step already read: the objective is logged without steps,
            # and a read by step would never return it.
            self._repeated(read)
        self._listed = listed
        return latest is not None and latest > read

    def pending_read(self, run: RunInfo) -> PointsRead | None:
        """The read of new points the next refresh would make, when that is all it would do
        (nothing to load, the same objective and spec), for the daemon to batch across runs."""
        if self.telemetry is None or self.cursor is None:
            return None
        objective = run.tags.get(TAG_OBJECTIVE)
        if objective and objective != str(self.telemetry.objective):
            return None
        if run.tags.get(TAG_SPEC_DIGEST) != self.spec_digest:
            return None
        return self.run_id, self.telemetry.keys_to_read(run.latest_metrics), self.cursor

    def refresh(
        self, run: RunInfo | None = None, read: tuple[list[MetricPoint], Cursor] | None = None
    ) -> RunInfo:
        """Read the run and its new metric points (or take ``read``, made for this refresh's
        ``pending_read``)."""
        run = run or self.tracker.get_run(self.run_id)
        objective = run.tags.get(TAG_OBJECTIVE)
        if self.telemetry is None or (objective and str(self.telemetry.objective) != objective):
            # First sight, or the objective was set after the run was first read.
            run = self.load(run)
        elif run.tags.get(TAG_SPEC_DIGEST) != self.spec_digest:
            self._load_spec(run)  # a client (re)started and published its knobs
        assert self.telemetry is not None
        if read is None:
            keys = self.telemetry.keys_to_read(run.latest_metrics)
            read = self.tracker.read_new_points(
                self.run_id, keys, self.cursor, window=self.telemetry.read_window
            )
        first = self.cursor is None
        points, self.cursor = read
        self._note_repeats(points)
        if first:
            self.telemetry.read_first(points)
        else:
            self.telemetry.add(points)
        self.active = TAG_CLIENT_HEARTBEAT in run.tags
        self._note_applied()
        self._write_outcomes()
        return run

    def _note_applied(self) -> None:
        """The step each version was applied at, from the client's markers; a version a
        newer one superseded before it reached the client counts as applied with it."""
        assert self.telemetry is not None
        later: int | None = None
        for item in sorted(self.history, key=lambda i: i.version, reverse=True):
            if item.applied_step is None:
                item.applied_step = self.telemetry.applied_steps.get(item.version, later)
            if item.applied_step is not None:
                later = item.applied_step if later is None else min(later, item.applied_step)

    def _note_repeats(self, points: list[MetricPoint]) -> None:
        """Count evaluations of the objective logged at a step already seen; forget them once
        the objective's steps move on."""
        assert self.telemetry is not None
        metric = self.telemetry.objective.metric
        last = self.telemetry.evals[-1][0] if self.telemetry.evals else None
        for point in points:
            if point.key != metric:
                continue
            if last is not None and point.step <= last:
                self._repeated(point.step)
            else:
                self.repeats_at_step = None
            last = point.step

    def _repeated(self, step: int) -> None:
        seen = self.repeats_at_step
        count = seen[1] + 1 if seen is not None and seen[0] == step else 2
        self.repeats_at_step = (step, count)

    # ---- health -------------------------------------------------------------------------

    def health(self, run: RunInfo) -> Health:
        """Whether the manager can do its job for this run, from what this supervisor holds."""
        objective = (
            self.telemetry.objective
            if self.telemetry is not None
            else Objective.parse(run.tags.get(TAG_OBJECTIVE) or DEFAULT_OBJECTIVE)
        )
        repeats = self.repeats_at_step
        stuck = repeats is not None and repeats[1] >= REPEATS_FOR_NO_STEPS
        view = RunView(
            objective=objective,
            has_spec=self.spec is not None,
            spec_error=self.spec_error,
            steps_stuck_at=repeats[0] if stuck and repeats else None,
            seconds_per_eval=self.telemetry.seconds_per_eval() if self.telemetry else None,
            decisions=self.last_decision_id,
            issued=max([current_version(run.tags), *(i.version for i in self.history)]),
            last_note=self.last_note,
        )
        return assess(run, view, self.answers)

    # ---- deciding -----------------------------------------------------------------------

    def tick(
        self,
        policy: Policy,
        run: RunInfo | None = None,
        read: tuple[list[MetricPoint], Cursor] | None = None,
    ) -> AuditRecord | None:
        """One decision cycle: decide when a new evaluation of the objective arrived."""
        run = run or self.tracker.get_run(self.run_id)
        if not self.has_news(run):
            return None
        run = self.refresh(run, read)
        crash_point("after_read")
        assert self.telemetry is not None
        if self.spec is None or not self.telemetry.evals:
            return None
        latest_eval_step = self.telemetry.evals[-1][0]
        if latest_eval_step <= self.last_decision_step:
            return None
        self._undecided_step = self.last_decision_step
        self.last_decision_step = latest_eval_step
        if any(Command.STOP.value in item.commands for item in self.history):
            return None  # the run is ending: nothing a policy issues now would take effect
        return self.decide(run, policy.source, policy.name, policy.propose, policy.fallback)

    def decide(
        self,
        run: RunInfo,
        source: Source,
        policy_name: str,
        propose: Callable[[Snapshot, Menu], PolicyAnswer],
        fallback: Policy | None = None,
    ) -> AuditRecord | None:
        """Snapshot → menu → proposal → validation → params version and audit record.

        An answer that comes after the run has moved on is stale: ``fallback`` (the rules)
        then decides on the run's current state, and the late answer stays in the record.
        """
        assert self.telemetry is not None and self.spec is not None
        version = current_version(run.tags)
        trusted = self.trusted(run.tags)
        state = self.run_state(trusted)
        menu = build_menu(state, self.config.validation, source)
        snapshot = self.telemetry.snapshot(self.spec, state.values, self.history)
        started = time.monotonic()
        answer: PolicyAnswer = propose(snapshot, menu)
        decided = time.monotonic() - started
        crash_point("after_answer")
        if self.metrics is not None:
            self.metrics.policy_answered(answer, llm_policy=source == Source.LLM)
        stale = self._staleness(snapshot, decided)
        late = stale
        if stale and fallback is not None:
            state = self.run_state(trusted)
            menu = build_menu(state, self.config.validation, fallback.source)
            snapshot = self.telemetry.snapshot(self.spec, state.values, self.history)
            instead = fallback.propose(snapshot, menu)
            if instead.proposal.action != "no_action":
                answer = _instead_of_late(answer, instead, fallback.source, stale)
                stale = None
        if answer.timings:  # a model answered (a rules or human answer takes no model time)
            self.answers.append(ModelAnswer(decided, late, replaced=late is not None and not stale))
        self.last_note = answer.note
        proposal = answer.proposal
        if proposal.action == "no_action" and not answer.error and not self.config.audit_no_action:
            log.debug(
                "run %s @ step %d: no action (%s)",
                self.run_id,
                self.telemetry.step,
                proposal.reason,
            )
            return None
        result = validate(proposal, state, self.config.validation, source)
        active = TAG_CLIENT_HEARTBEAT in run.tags
        if stale:
            status = "stale"
            answer.error = "; ".join(filter(None, [answer.error, stale]))
        elif not result.issues_version:
            status = "no_action" if proposal.action == "no_action" else "rejected"
        else:
            status = "issued" if active else "advisory"
        record = AuditRecord(
            decision_id=self._next_decision_id(),
            run_id=self.run_id,
            created_at=time.time(),
            source=answer.source or source,
            policy=policy_name,
            model=answer.model,
            status=status,
            step=self.telemetry.step,
            telemetry=snapshot.model_dump(mode="json"),
            prompt=answer.prompt,
            prompt_digest=_digest(answer.prompt),
            raw_response=answer.raw_response,
            proposal=proposal,
            verdicts=result.verdicts,
            command_verdicts=result.command_verdicts,
            values=result.values,
            timings={"policy_s": round(decided, 4), **answer.timings},
            usage=answer.usage,
            error=answer.error,
            note=answer.note,
        )
        issued = None
        try:
            record, issued = self.audit.commit(
                record,
                expected_version=version,
                parent=trusted.version if trusted else 0,
                values=result.values,
                commands=result.commands,
                issue=status == "issued",
                guard=self.guard,
            )
        except VersionConflict as exc:
            record = record.model_copy(update={"status": "stale", "error": str(exc)})
            self.audit.write_record(record)
        except LeaseLost as exc:
            # Another replica supervises the run now: it writes the run's decisions.
            log.warning("%s; decision dropped unwritten (%s)", exc, record.summary())
            self.last_decision_step = self._undecided_step  # decided again while held
            return None
        if self.metrics is not None:
            self.metrics.decided(record)
        self.last_decision_id = max(self.last_decision_id, record.decision_id)
        if record.params_version:
            self.records[record.decision_id] = record
        if issued is not None:
            self.history.append(_intervention(record))
            judged = (str(issued.version), run.tags.get(TAG_CLIENT_REJECTED), self.spec_digest)
            self._trusted = (judged, issued)
        log.info("run %s: %s", self.run_id, record.summary())
        return record

    def _staleness(self, snapshot: Snapshot, decided_s: float) -> str | None:
        """Why an answer that took ``decided_s`` is too late for the run, or None."""
        if decided_s < 1.0:
            return None  # nothing can have moved on (rules, humans)
        assert self.telemetry is not None
        self.refresh()
        new_evals = self.telemetry.evaluations - snapshot.objective.evaluations
        new_steps = self.telemetry.step - snapshot.step
        limit_steps = self.config.stale_steps
        if new_evals > self.config.stale_evals or (
            limit_steps is not None and new_steps > limit_steps
        ):
            return (
                f"stale: the answer took {decided_s:.1f} s while the run moved on "
                f"{new_steps} steps and {new_evals} evaluations"
            )
        return None

    def run_state(self, trusted: ParamsVersion | None) -> RunState:
        assert self.spec is not None and self.telemetry is not None
        last_changed: dict[str, int] = {}
        for item in self.history:
            for knob in item.changes:
                last_changed[knob] = item.decision_step
        automatic = sum(1 for i in self.history if i.source != Source.HUMAN.value)
        rolled_back = [
            i.decision_step for i in self.history if Command.ROLLBACK_TO_BEST.value in i.commands
        ]
        return RunState(
            spec=self.spec,
            values=self._values(trusted),
            step=self.telemetry.step,
            last_changed_step=last_changed,
            interventions_used=automatic,
            evals_since_best=self.telemetry.objective_view().evals_since_best,
            regressed_evals=self.telemetry.regressed_evals(
                self.config.validation.rollback_min_regression, max(rolled_back, default=-1)
            ),
            stop_issued=any(Command.STOP.value in item.commands for item in self.history),
            settling=self._settling(),
        )

    def _settling(self) -> dict[str, str]:
        """The knobs a change has not yet shown its effect on (``settle_evals`` evaluations
        after it was applied), and why a policy waits; none while the run has non-finite
        values after that change (that cannot wait)."""
        assert self.telemetry is not None
        wanted = self.config.validation.settle_evals
        settling: dict[str, str] = {}
        if not wanted:
            return settling
        for item in self.history:
            if not item.changes:
                continue
            if any(s > item.decision_step for s in self.telemetry.non_finite_steps):
                continue
            if item.applied_step is None and self.active:
                why = f"waiting for v{item.version} (step {item.decision_step}) to be applied"
            elif (seen := self.telemetry.evaluations_since(_in_force(item))) < wanted:
                why = (
                    f"waiting for the effect of v{item.version}, in force from step "
                    f"{_in_force(item)} ({seen} of {wanted} evaluations since)"
                )
            else:
                continue
            settling.update(dict.fromkeys(item.changes, why))
        return settling

    def trusted(self, tags: dict[str, str]) -> ParamsVersion | None:
        """The run's newest trusted params version (``AuditLog.trusted``), judged again only
        when the version tag, the client's last refusal or the spec changed."""
        key = (tags.get(TAG_PARAMS_VERSION), tags.get(TAG_CLIENT_REJECTED), self.spec_digest)
        if self._trusted is None or self._trusted[0] != key:
            self._trusted = (key, self.audit.trusted(self.run_id, tags, self.spec))
        return self._trusted[1]

    def _values(self, trusted: ParamsVersion | None) -> dict[str, float]:
        """The values in force: the spec's, overlaid with the trusted version's."""
        assert self.spec is not None
        values = self.spec.knob_values
        if trusted is not None:
            values.update({k: v for k, v in trusted.values.items() if k in values})
        return values

    def _next_decision_id(self) -> int:
        known = self.last_decision_id
        listed = max(self.audit.decision_ids(self.run_id), default=0)
        return max(known, listed) + 1

    def _write_outcomes(self) -> None:
        """Measure the outcome of each version that has had its evaluations: after the step it
        was applied at (where a client applies versions), else after its decision."""
        assert self.telemetry is not None
        for item in self.history:
            if item.outcome is not None or (self.active and item.applied_step is None):
                continue
            outcome = self.telemetry.outcome(item)
            if outcome.evaluations_after < EVALS_FOR_OUTCOME:
                continue
            item.outcome = outcome
            record = self.records.get(item.decision_id)
            if record is not None and record.outcome is None:
                record = record.model_copy(update={"outcome": outcome})
                self.records[item.decision_id] = record
                self.audit.write_record(record)


def _in_force(item: Intervention) -> int:
    """The step from which a version is in force: where it was applied, else (no client to
    apply it) where it was decided."""
    return item.applied_step if item.applied_step is not None else item.decision_step


def _instead_of_late(
    late: PolicyAnswer, instead: PolicyAnswer, source: Source, why: str
) -> PolicyAnswer:
    """``instead`` (the fallback's answer on the current state) in place of ``late``, whose
    model, prompt, answer and timings the audit record keeps."""
    return PolicyAnswer(
        proposal=instead.proposal,
        model=late.model,
        prompt=late.prompt,
        raw_response=late.raw_response,
        timings=late.timings,
        usage=late.usage,
        error=late.error,
        source=instead.source or source,
        note=f"{why}; the rules decided on the run's current state instead",
    )


def human_proposal(changes: dict[str, float], commands: list[str], reason: str) -> Proposal:
    action = "adjust" if changes else "command"
    return Proposal(action=action, changes=changes, commands=commands, reason=reason)


def _intervention(record: AuditRecord) -> Intervention:
    changes = {
        v.knob: (v.current, v.final)
        for v in record.verdicts
        if v.verdict in ("accepted", "clamped")
    }
    return Intervention(
        version=record.params_version or 0,
        decision_id=record.decision_id,
        decision_step=record.step or 0,
        source=record.source.value,
        changes=changes,
        commands=[c.command for c in record.command_verdicts if c.verdict == "accepted"],
        expected_effect=record.proposal.expected_effect if record.proposal else "",
        outcome=record.outcome,
    )


def _digest(text: str | None) -> str | None:
    return None if text is None else "sha256:" + hashlib.sha256(text.encode()).hexdigest()
