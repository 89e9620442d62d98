"""Keeping runs' reports current from the daemon, off the decision path.

Reports are written on one thread of their own, at a low priority: a report being drawn
never holds up a decision, of its run or of any other, and never touches the training
process (it reads and writes the tracker only). A run has at most one report waiting; asking
again while one waits changes nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from integrations.protocol import AuditRecord
from integrations.trackers import Tracker

log = logging.getLogger(__name__)


class ReportKeeper:
    """Writes a run's report after every ``every`` decisions (0: never) and, with ``at_end``,
    once the run has ended."""

    def __init__(
        self,
        tracker: Tracker,
        *,
        every: int = 0,
        at_end: bool = False,
        budget: int | None = None,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        self.tracker = tracker
        self.every = every
        self.at_end = at_end
        self.budget = budget
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="atm-report", initializer=initializer
        )
        self._lock = threading.Lock()
        self._waiting: set[str] = set()  # runs whose report is asked for, not yet started
        self._futures: set[Future[None]] = set()
        # The decision id each run's last report was asked at.
        self._reported_at: dict[str, int] = {}
        self.written = 0

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.at_end

    def decided(self, record: AuditRecord) -> None:
        """Note a decision; ask for the run's report when ``every`` decisions passed."""
        if self.every <= 0:
            return
        last = self._reported_at.get(record.run_id, 0)
        if record.decision_id - last >= self.every:
            self._reported_at[record.run_id] = record.decision_id
            self._ask(record.run_id, only_ended=False)

    def gone(self, run_id: str) -> None:
        """A run left this daemon's managed runs: report it if it ended (not if it was
        detached or another replica supervises it now)."""
        if self.at_end:
            self._ask(run_id, only_ended=True)

    def _ask(self, run_id: str, *, only_ended: bool) -> None:
        with self._lock:
            if run_id in self._waiting:
                return
            self._waiting.add(run_id)
            future = self._pool.submit(self._write, run_id, only_ended)
            self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    def _write(self, run_id: str, only_ended: bool) -> None:
        from manager_daemon.report import publish_run_report

        with self._lock:
            self._waiting.discard(run_id)  # a decision from now on asks for a newer report
        try:
            if only_ended and self.tracker.get_run(run_id).is_running:
                return
            publish_run_report(self.tracker, run_id, budget=self.budget)
            self.written += 1
        except Exception as exc:  # a report must never stop the daemon
            log.warning("run %s: report not written: %s", run_id, exc)

    def close(self, timeout: float | None = None) -> None:
        """Finish the reports asked for (waiting up to ``timeout`` seconds), then stop."""
        with self._lock:
            waiting = list(self._futures)
        for future in waiting:
            try:
                future.result(timeout=timeout)
            except Exception as exc:
                log.warning("a report was not finished: %s", exc)
        self._pool.shutdown(wait=False, cancel_futures=True)
