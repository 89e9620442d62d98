"""The standalone daemon: every tick, find managed runs and run a decision cycle for each."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler

from integrations.protocol import AuditRecord
from integrations.trackers import Cursor, MetricPoint, PointsRead, RunInfo, Tracker, TrackerError
from integrations.trackers.outage import outage_over, outage_reported
from manager_daemon.audit import AuditLog
from manager_daemon.health import HealthReporter
from manager_daemon.leases import Leases
from manager_daemon.metrics import DaemonMetrics
from manager_daemon.policies.base import Policy
from manager_daemon.supervisor import RunSupervisor, SupervisorConfig
from manager_daemon.telemetry import METRIC_WINDOW

if TYPE_CHECKING:  # the report package (matplotlib) loads only when reports are asked for
    from manager_daemon.report.keeper import ReportKeeper

log = logging.getLogger(__name__)

# Runs whose new points one worker reads together.
_READ_CHUNK = 100


# The lowest nice value, at which decision work also moves to the idle scheduling class.
IDLE_NICE = 19


def lower_priority(nice: int) -> None:
    """Give the calling thread the nice value ``nice`` (never a higher priority than it has);
    at 19, the lowest, also Linux's idle scheduling class (SCHED_IDLE): the thread then runs
    only on CPU that nothing else wants, and yields it at once when training wakes.

    The decision work (policies, the embedded model) runs on the daemon's worker threads, which
    call this first: Linux keeps a nice value and a scheduling class per thread and the threads
    a worker starts (the embedded model's OpenMP team) inherit them, so training beside the
    daemon keeps the cores.
    """
    if nice <= 0:
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, max(nice, os.getpriority(os.PRIO_PROCESS, thread)))
        if nice >= IDLE_NICE and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        log.warning("cannot lower the daemon's CPU priority: %s", exc)


class _OverlappingTicks(logging.Filter):
    """Ticks run one at a time (``Daemon.schedule``): one that comes while the previous is
    still running (a slow tracker, an outage already reported) is skipped by design, and the
    scheduler's warning for each would only repeat itself every interval."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in str(record.msg)


_OVERLAPPING_TICKS = _OverlappingTicks()


@dataclass
class TickReport:
    runs: int = 0
    decisions: list[AuditRecord] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    busy: list[str] = field(default_factory=list)
    # Managed runs another replica supervises (or whose lease this one is still taking).
    elsewhere: int = 0


@dataclass(frozen=True)
class Probe:
    """The answer of a health or readiness probe."""

    ok: bool
    detail: str


class Daemon:
    """Supervises every managed run on one tracker with one policy.

    With ``leases`` it supervises only the runs whose lease it holds, sharing the tracker's
    runs with other replicas; without, every managed run (one daemon, or tests in-process).
    """

    def __init__(
        self,
        tracker: Tracker,
        policy: Policy,
        config: SupervisorConfig | None = None,
        *,
        workers: int = 4,
        signing_key: str | None = None,
        experiments: list[str] | None = None,
        nice: int = 0,
        leases: Leases | None = None,
        metrics: DaemonMetrics | None = None,
        interval_s: float = 10.0,
        reports: ReportKeeper | None = None,
    ) -> None:
        """``reports`` keeps the runs' reports current, on a thread of its own."""
        self.tracker = tracker
        self.experiments = experiments or None
        self.policy = policy
        self.config = config or SupervisorConfig()
        self.audit = AuditLog(tracker, signing_key)
        self.supervisors: dict[str, RunSupervisor] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="atm-run",
            initializer=lower_priority,
            initargs=(nice,),
        )
        self._tracker_down = False
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future[AuditRecord | None]] = {}
        self.totals: Counter[str] = Counter()
        self._ticks = 0
        self.leases = leases
        self.metrics = metrics or DaemonMetrics()
        self.interval_s = interval_s
        self._started = time.monotonic()
        self._last_tick: float | None = None
        self._last_tracker_ok: float | None = None
        self._tracker_problem = "no tick yet"
        self.reports = reports
        self.run_health = HealthReporter(tracker, self.metrics.managed_runs)

    def run_once(self, wait: bool = True) -> TickReport:
        """One pass over every managed run. Never raises for one run's failure.

        A run whose previous cycle is still in flight (a slow model call) is skipped, so one
        run never holds up the others or the scheduler. With ``wait`` the pass waits for the
        cycles it started; otherwise their results are collected by later passes.
        """
        started = time.monotonic()
        report = TickReport()
        with self._lock:
            self._ticks += 1
            if self._ticks % 30 == 0 and self.totals:
                log.info(self.totals_line())
            self._collect(report)
            try:
                runs = self.tracker.find_managed_runs(self.experiments)
            except TrackerError as exc:
                if not self._tracker_down:
                    problem = str(exc).removeprefix("tracker unreachable: ")
                    log.warning("tracker unreachable: %s; retrying every tick", problem)
                    outage_reported(self)
                self._tracker_down = True
                self._tracker_problem = str(exc)
                self.metrics.tracker_errors.labels("list").inc()
                report.errors["*"] = str(exc)
                self._tick_done(started)
                return report
            listed = time.monotonic()
            self._last_tracker_ok = listed
            if self._tracker_down:
                log.warning("tracker reachable again")
                outage_over(self)
                self._tracker_down = False
            self.metrics.tracker_runs.set(len(runs))
            if self.leases is not None:
                mine = self.leases.refresh(runs, started, listed)
                if wait and self.leases.pending:
                    mine = self._settle_leases(mine)
                report.elsewhere = sum(1 for r in runs if r.run_id not in mine)
                runs = [r for r in runs if r.run_id in mine]
            live = {r.run_id for r in runs}
            for gone in set(self.supervisors) - live - set(self._in_flight):
                del self.supervisors[gone]
                self.run_health.forget(gone)
                if self.reports is not None:
                    self.reports.gone(gone)
            report.runs = len(runs)
            news: list[tuple[RunSupervisor, RunInfo]] = []
            for run in runs:
                if run.run_id in self._in_flight:
                    report.busy.append(run.run_id)
                    self.metrics.busy.inc()
                    continue
                supervisor = self.supervisors.get(run.run_id) or self._supervisor(run.run_id)
                # A run whose listing shows nothing new costs this tick nothing more.
                if supervisor.has_news(run):
                    news.append((supervisor, run))
                else:
                    self.run_health.report(run, supervisor.health(run))
            read = self._read_together(news)
            for supervisor, run in news:
                self._in_flight[run.run_id] = self._pool.submit(
                    self._cycle, supervisor, run, read.get(run.run_id)
                )
            if wait:
                for future in list(self._in_flight.values()):
                    with contextlib.suppress(Exception):
                        future.result()
                self._collect(report)
            self._tick_done(started)
        return report

    def _read_together(
        self, news: list[tuple[RunSupervisor, RunInfo]]
    ) -> dict[str, tuple[list[MetricPoint], Cursor]]:
        """The new points of the runs with news, read in batches (one request per metric for
        many runs, where the tracker has a batch read) on the worker threads. A batch that
        fails is left to each run's own read, so that one run's error stays its own."""
        pending: list[tuple[str, PointsRead]] = []
        for supervisor, run in news:
            request = supervisor.pending_read(run)
            if request is not None:
                pending.append((run.run_id, request))
        chunks = [pending[i : i + _READ_CHUNK] for i in range(0, len(pending), _READ_CHUNK)]
        # A key first logged after a run's first read (a late signal) starts at a window too;
        # its history is as short as it is recent.
        futures = [
            self._pool.submit(
                self.tracker.read_new_points_many, [r for _, r in chunk], window=METRIC_WINDOW
            )
            for chunk in chunks
        ]
        read: dict[str, tuple[list[MetricPoint], Cursor]] = {}
        for chunk, future in zip(chunks, futures, strict=True):
            try:
                read.update(zip([run_id for run_id, _ in chunk], future.result(), strict=True))
            except TrackerError as exc:
                log.debug("a batched read failed (%s); each run reads its own", exc)
        return read

    def _supervisor(self, run_id: str) -> RunSupervisor:
        leases = self.leases
        guard = (lambda: leases.check(run_id)) if leases is not None else None
        supervisor = RunSupervisor(
            run_id, self.tracker, self.audit, self.config, guard=guard, metrics=self.metrics
        )
        self.supervisors[run_id] = supervisor
        return supervisor

    def _cycle(
        self,
        supervisor: RunSupervisor,
        run: RunInfo,
        read: tuple[list[MetricPoint], Cursor] | None,
    ) -> AuditRecord | None:
        with self.metrics.cycle_duration.time():
            try:
                return supervisor.tick(self.policy, run, read)
            finally:
                self.run_health.report(run, supervisor.health(run))

    def _settle_leases(self, mine: set[str]) -> set[str]:
        """For a single pass (``--once``): wait until the leases just written can be read
        back, and read them back."""
        assert self.leases is not None
        deadline = self.leases.settle_deadline()
        if deadline is not None:
            time.sleep(max(0.0, deadline - time.monotonic()))
        started = time.monotonic()
        try:
            runs = self.tracker.find_managed_runs(self.experiments)
        except TrackerError as exc:
            log.warning("cannot read back the leases just taken: %s", exc)
            return mine
        return self.leases.refresh(runs, started, time.monotonic())

    def _tick_done(self, started: float) -> None:
        self._last_tick = time.monotonic()
        self.metrics.tick_duration.observe(self._last_tick - started)
        self.metrics.last_tick.set_to_current_time()

    def health(self) -> Probe:
        """Alive: the scheduler ticked recently (or the daemon is just starting)."""
        limit = self._stale_after()
        since = time.monotonic() - (self._last_tick or self._started)
        if since > limit:
            what = "last tick" if self._last_tick else "start, and no tick yet"
            return Probe(False, f"{since:.0f} s since the {what} (limit {limit:.0f} s)")
        return Probe(True, f"ticking: last tick {since:.1f} s ago, every {self.interval_s:g} s")

    def ready(self) -> Probe:
        """Ready: the tracker answered the last tick's listing, recently. Answers from what
        the ticks saw: a probe costs the tracker nothing."""
        if self._last_tracker_ok is None or self._tracker_down:
            return Probe(False, f"tracker not answering: {self._tracker_problem}")
        since = time.monotonic() - self._last_tracker_ok
        if since > self._stale_after():
            return Probe(False, f"tracker last answered {since:.0f} s ago")
        return Probe(True, f"tracker answered {since:.1f} s ago")

    def _stale_after(self) -> float:
        # Three missed ticks, and at least a minute: a slow tracker listing is no death.
        return max(3 * self.interval_s, 60.0)

    def _collect(self, report: TickReport) -> None:
        for run_id, future in list(self._in_flight.items()):
            if not future.done():
                continue
            del self._in_flight[run_id]
            try:
                record = future.result()
            except Exception as exc:  # one run's failure must not stop the others
                quiet = isinstance(exc, TrackerError)
                if quiet:
                    self.metrics.tracker_errors.labels("cycle").inc()
                log.warning("run %s: decision cycle failed: %s", run_id, exc, exc_info=not quiet)
                report.errors[run_id] = str(exc)
                # Rebuild from the tracker next tick rather than trust partial state.
                self.supervisors.pop(run_id, None)
                continue
            if record is not None:
                report.decisions.append(record)
                self._count(record)
                if self.reports is not None:
                    self.reports.decided(record)

    def _count(self, record: AuditRecord) -> None:
        self.totals["decisions"] += 1
        self.totals[f"status_{record.status}"] += 1
        calls = [v for k, v in record.timings.items() if k.startswith("llm_call_")]
        self.totals["llm_calls"] += len(calls)
        self.totals["llm_ms"] += round(1000 * sum(calls))
        self.totals["prompt_tokens"] += record.usage.get("prompt_tokens", 0)
        self.totals["completion_tokens"] += record.usage.get("completion_tokens", 0)
        self.totals["fallbacks"] += bool(record.error and "fell back" in record.error)

    def totals_line(self) -> str:
        """Totals since start: decisions by outcome, model calls, latency and tokens."""
        t = self.totals
        statuses = ", ".join(
            f"{k.removeprefix('status_')} {v}"
            for k, v in sorted(t.items())
            if k.startswith("status_")
        )
        mean = t["llm_ms"] / t["llm_calls"] / 1000 if t["llm_calls"] else 0.0
        return (
            f"totals: {t['decisions']} decisions ({statuses or 'none'}); {t['llm_calls']} model "
            f"calls, mean {mean:.2f} s, {t['prompt_tokens']} prompt + {t['completion_tokens']} "
            f"completion tokens; {t['fallbacks']} fallbacks"
        )

    def schedule(self, scheduler: BaseScheduler, interval_s: float) -> None:
        """Add this daemon's tick to ``scheduler``: every ``interval_s`` seconds, one at a time,
        missed ticks coalesced into one."""
        logging.getLogger("apscheduler.scheduler").addFilter(_OVERLAPPING_TICKS)  # once
        scheduler.add_job(
            self.run_once,
            "interval",
            kwargs={"wait": False},
            seconds=interval_s,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            id=f"atm-tick-{id(self)}",
        )

    def serve(self, interval_s: float, drain_timeout: float = 90.0) -> None:
        """Run ``run_once`` every ``interval_s`` seconds until SIGTERM or Ctrl-C; then let the
        decisions in flight finish (up to ``drain_timeout`` seconds), release this replica's
        leases so that the others take its runs at once, and return."""
        scheduler = BlockingScheduler()
        self.schedule(scheduler, interval_s)
        log.info(
            "atm daemon: policy %s, tracker %s, every %.1f s",
            self.policy.name,
            self.tracker.uri,
            interval_s,
        )
        self.run_once(wait=False)
        # SIGTERM (Kubernetes, systemd) ends the loop after the tick in progress.
        signal.signal(signal.SIGTERM, lambda *_: scheduler.shutdown(wait=False))
        try:
            scheduler.start()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            log.info("stopping: %d decision(s) in flight", len(self._in_flight))
            self.drain(drain_timeout)
            if self.leases is not None:
                released = self.leases.release()
                log.info("released %d lease(s)", released)
            self.close()

    def drain(self, timeout: float) -> TickReport:
        """Wait up to ``timeout`` seconds for decisions in flight, renewing the leases they
        need meanwhile; collect what finished."""
        deadline = time.monotonic() + timeout
        step = self.leases.ttl_s / 6 if self.leases is not None else timeout
        for future in list(self._in_flight.values()):
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    future.result(timeout=max(0.0, min(step, deadline - time.monotonic())))
                if future.done():
                    break
                if self.leases is not None:
                    self.leases.renew()
        report = TickReport()
        with self._lock:
            self._collect(report)
        return report

    def close(self, reports_timeout: float | None = 60.0) -> None:
        """Stop; the reports asked for are finished first (up to ``reports_timeout``)."""
        if self.totals:
            log.info(self.totals_line())
        self._pool.shutdown(wait=False, cancel_futures=True)
        outage_over(self)
        if self.reports is not None:
            self.reports.close(reports_timeout)


@contextlib.contextmanager
def in_background(daemons: Sequence[Daemon], interval_s: float) -> Iterator[None]:
    """Run the daemons' ticks on a background thread of this process until the block exits;
    then wait up to a minute for decisions in flight and close the daemons."""
    scheduler = BackgroundScheduler()
    for daemon in daemons:
        daemon.schedule(scheduler, interval_s)
    scheduler.start()
    try:
        yield
    finally:
        scheduler.shutdown(wait=True)
        for daemon in daemons:
            daemon.drain(timeout=60)
            if daemon.leases is not None:
                daemon.leases.release()
            daemon.close()
