"""The report's reading of an audit trail: one row per decision, and the run's summary."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

from integrations.protocol import AuditRecord, Command, Source
from manager_daemon.report.data import RunData

# The verdicts a decision's changes can get, and its statuses, in the order a summary shows.
VERDICTS = ("accepted", "clamped", "rejected", "noop")
STATUSES = ("issued", "advisory", "rejected", "no_action", "stale", "error")


@dataclass(frozen=True)
class VerdictLine:
    """What validation did with one proposed change or command."""

    what: str  # a knob or a command
    proposed: str
    verdict: str
    change: str  # "current → final" for a knob that changes
    reason: str


@dataclass(frozen=True)
class Row:
    """One decision, as the report's table shows it."""

    decision_id: int
    step: int | None
    applied_step: int | None
    source: str
    policy: str
    model: str | None
    status: str
    version: int | None
    proposed: list[str]
    verdicts: list[VerdictLine]
    commands: list[str]  # the commands issued (accepted)
    reason: str
    error: str | None
    before: float | None
    after: float | None
    measured: bool  # an outcome entry was written (else ``after`` is unknown)
    latency_s: float | None
    tokens: int | None
    attempts: int | None
    # An issued version the client never applied because a later one reached it first.
    superseded: bool = False

    @property
    def label(self) -> str:
        return f"d{self.decision_id:06d}"

    @property
    def intervention(self) -> bool:
        """Issued, or would have been (advisory)."""
        return self.status in ("issued", "advisory")


def rows(data: RunData) -> list[Row]:
    """Every decision of the run, oldest first."""
    table = [_row(r, data) for r in sorted(data.records, key=lambda r: r.decision_id)]
    latest_applied = max(data.applied, default=0)
    return [
        replace(row, superseded=True)
        if row.version and row.applied_step is None and row.version < latest_applied
        else row
        for row in table
    ]


def _row(r: AuditRecord, data: RunData) -> Row:
    proposal = r.proposal
    proposed = [f"{k} = {_text(v)}" for k, v in (proposal.changes if proposal else {}).items()]
    proposed += list(proposal.commands if proposal else [])
    verdicts = [
        VerdictLine(
            what=v.knob,
            proposed=_text(v.proposed),
            verdict=v.verdict,
            change=f"{_g(v.current)} → {_g(v.final)}" if v.final is not None else "",
            reason=v.reason,
        )
        for v in r.verdicts
    ]
    verdicts += [
        VerdictLine(what=c.command, proposed="", verdict=c.verdict, change="", reason=c.reason)
        for c in r.command_verdicts
    ]
    before, after, measured = _objective(r)
    calls = [v for k, v in r.timings.items() if k.startswith("llm_call_")]
    llm = r.model is not None or bool(calls)
    tokens = r.usage.get("prompt_tokens", 0) + r.usage.get("completion_tokens", 0)
    return Row(
        decision_id=r.decision_id,
        step=r.step,
        applied_step=data.applied.get(r.params_version) if r.params_version else None,
        source=r.source.value,
        policy=r.policy,
        model=r.model,
        status=r.status,
        version=r.params_version,
        proposed=proposed,
        verdicts=verdicts,
        commands=[c.command for c in r.command_verdicts if c.verdict == "accepted"],
        reason=proposal.reason if proposal else "",
        error=r.error,
        before=before,
        after=after,
        measured=measured,
        latency_s=round(sum(calls), 3) if calls else None,
        tokens=tokens if llm else None,
        attempts=r.usage.get("attempts") if llm else None,
    )


def _objective(r: AuditRecord) -> tuple[float | None, float | None, bool]:
    """The objective before the decision and after it: the outcome the daemon measured, else
    the value the decision saw (its telemetry) and no after."""
    if r.outcome is not None:
        return r.outcome.before, r.outcome.after, r.outcome.after is not None
    seen = (r.telemetry or {}).get("objective") or {}
    last = seen.get("last")
    return (float(last) if isinstance(last, int | float) else None), None, False


@dataclass
class Summary:
    """The run at a glance."""

    decisions: int
    # (source, status) → count, and (source, verdict) → count of proposed changes.
    by_status: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_verdict: Counter[tuple[str, str]] = field(default_factory=Counter)
    issued: int = 0
    automatic_issued: int = 0
    budget: int | None = None
    rollbacks: int = 0
    stops: int = 0
    first: tuple[int, float] | None = None
    best: tuple[int, float] | None = None
    # The objective of the weights the run ends with: its last evaluation, or, where the run
    # was rolled back to its best state and not evaluated since, that state's evaluation.
    final: tuple[int, float] | None = None
    last: tuple[int, float] | None = None  # the last evaluation logged
    restored_at: int | None = None  # the step the final (best) state was restored at
    llm_calls: int = 0
    llm_seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def sources(self) -> list[str]:
        seen = {s for s, _ in self.by_status}
        return [s.value for s in Source if s.value in seen]


def summarize(data: RunData, table: list[Row], budget: int | None = None) -> Summary:
    """Interventions by source and verdict, the best and final objective, the budget used."""
    summary = Summary(decisions=len(table), budget=budget)
    for row in table:
        summary.by_status[(row.source, row.status)] += 1
        for line in row.verdicts:
            summary.by_verdict[(row.source, line.verdict)] += 1
        if row.status == "issued":
            summary.issued += 1
            summary.automatic_issued += row.source != Source.HUMAN.value
            summary.rollbacks += Command.ROLLBACK_TO_BEST.value in row.commands
            summary.stops += Command.STOP.value in row.commands
    for r in data.records:
        calls = [v for k, v in r.timings.items() if k.startswith("llm_call_")]
        summary.llm_calls += len(calls)
        summary.llm_seconds += sum(calls)
        summary.prompt_tokens += r.usage.get("prompt_tokens", 0)
        summary.completion_tokens += r.usage.get("completion_tokens", 0)
    finite = [(s, v) for s, v in data.objective_series if math.isfinite(v)]
    if finite:
        summary.first, summary.last = finite[0], finite[-1]
        summary.best = _best(data, finite)
        summary.final = summary.last
        summary.restored_at = _restored_at(data, table)
        restored = [p for p in finite if p[0] <= (summary.restored_at or -1)]
        if restored:
            summary.final = _best(data, restored)
        else:
            summary.restored_at = None
    return summary


def _best(data: RunData, points: list[tuple[int, float]]) -> tuple[int, float]:
    best = points[0]
    for step, value in points:
        if data.objective.better(value, best[1]):
            best = (step, value)
    return best


def _restored_at(data: RunData, table: list[Row]) -> int | None:
    """The step at which the run's weights were last restored to its best state, when it has
    not been evaluated since (a stop or a checkpoint after it leaves the weights as they
    were); else None."""
    restored = [
        r
        for r in table
        if Command.ROLLBACK_TO_BEST.value in r.commands and r.applied_step is not None
    ]
    if not restored:
        return None
    last = max(restored, key=lambda r: (r.applied_step or 0, r.version or 0))
    return None if last.version in data.evaluated_after else last.applied_step


def _text(value: object) -> str:
    return _g(value) if isinstance(value, float) else str(value)


def _g(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"
