"""The daemon's Prometheus metrics, counted where things happen and served on ``/metrics``.

One ``DaemonMetrics`` per daemon, on a registry of its own (several daemons in one process,
as in the tests, do not mix their counts). The daemon counts ticks, runs and tracker errors;
the supervisor counts policy answers (model calls, latency, tokens, fallbacks) and decisions;
the leases count what they take and lose.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from integrations.protocol import AuditRecord, HealthState, Source
from manager_daemon.policies.base import PolicyAnswer

# LLM calls take from well under a second (a small local model) to minutes (a large one).
_LLM_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_TICK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class DaemonMetrics:
    """Counters, gauges and histograms of one daemon."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Info("atm_daemon", "This daemon replica", registry=r)
        self.decisions = Counter(
            "atm_decisions",
            "Audited decisions, by who decided (llm, rules, human) and their status "
            "(issued, advisory, rejected, no_action, stale)",
            ["source", "status"],
            registry=r,
        )
        self.params_versions = Counter(
            "atm_params_versions_issued", "Params versions written", registry=r
        )
        self.llm_calls = Counter(
            "atm_llm_calls", "Model calls, by outcome (ok, error)", ["outcome"], registry=r
        )
        self.llm_latency = Histogram(
            "atm_llm_call_duration_seconds",
            "Latency of one model call",
            buckets=_LLM_BUCKETS,
            registry=r,
        )
        self.llm_tokens = Counter(
            "atm_llm_tokens",
            "Tokens used by model calls, by kind (prompt, completion)",
            ["kind"],
            registry=r,
        )
        self.fallbacks = Counter(
            "atm_llm_fallbacks",
            "Decisions the LLM policy handed to its fallback (a failed call or an answer "
            "still invalid on retry)",
            registry=r,
        )
        self.tick_duration = Histogram(
            "atm_tick_duration_seconds",
            "One tick: list the managed runs, keep the leases, start the decision cycles",
            buckets=_TICK_BUCKETS,
            registry=r,
        )
        self.cycle_duration = Histogram(
            "atm_decision_cycle_duration_seconds",
            "One run's decision cycle: read new points, decide, write",
            buckets=_LLM_BUCKETS,
            registry=r,
        )
        self.last_tick = Gauge(
            "atm_last_tick_timestamp_seconds", "Unix time the last tick ended", registry=r
        )
        self.managed_runs = Gauge(
            "atm_managed_runs",
            "Managed runs this replica supervises (holds the lease of), by health (deciding, "
            "waiting_objective, no_steps, stale_answers, advisory, no_knobs)",
            ["health"],
            registry=r,
        )
        self.tracker_runs = Gauge(
            "atm_tracker_managed_runs", "Managed, running runs on the tracker", registry=r
        )
        self.busy = Counter(
            "atm_runs_skipped_busy",
            "Runs skipped by a tick because their previous decision cycle was in flight",
            registry=r,
        )
        self.tracker_errors = Counter(
            "atm_tracker_errors",
            "Failed tracker operations, by where (list: listing the runs, cycle: a decision "
            "cycle, lease: a lease write)",
            ["where"],
            registry=r,
        )
        self.lease_events = Counter(
            "atm_lease_events",
            "Run leases taken, lost (taken over, or renewed too late) and released",
            ["event"],
            registry=r,
        )
        for status in ("issued", "advisory", "rejected", "no_action", "stale"):
            for source in Source:
                self.decisions.labels(source.value, status)
        for where in ("list", "cycle", "lease"):
            self.tracker_errors.labels(where)
        for event in ("taken", "lost", "released"):
            self.lease_events.labels(event)
        for kind in ("prompt", "completion"):
            self.llm_tokens.labels(kind)
        for outcome in ("ok", "error"):
            self.llm_calls.labels(outcome)
        for state in HealthState:
            self.managed_runs.labels(state.value)

    def policy_answered(self, answer: PolicyAnswer, llm_policy: bool) -> None:
        """Count a policy's answer: its model calls, their latency and tokens, a fallback."""
        calls = sorted(k for k in answer.timings if k.startswith("llm_call_"))
        failed_last = bool(answer.error and "model call failed" in answer.error)
        for i, key in enumerate(calls):
            self.llm_latency.observe(answer.timings[key])
            failed = failed_last and i == len(calls) - 1
            self.llm_calls.labels("error" if failed else "ok").inc()
        for kind in ("prompt", "completion"):
            self.llm_tokens.labels(kind).inc(answer.usage.get(f"{kind}_tokens", 0))
        if llm_policy and answer.error:
            self.fallbacks.inc()

    def decided(self, record: AuditRecord) -> None:
        """Count an audited decision and the version it issued."""
        self.decisions.labels(record.source.value, record.status).inc()
        if record.params_version:
            self.params_versions.inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
