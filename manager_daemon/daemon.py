"""The standalone daemon: every tick, find managed runs and run a decision cycle for each."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from apscheduler.schedulers.blocking import BlockingScheduler

from integrations.protocol import AuditRecord
from integrations.trackers import Tracker, TrackerError
from manager_daemon.audit import AuditLog
from manager_daemon.policies.base import Policy
from manager_daemon.supervisor import RunSupervisor, SupervisorConfig

log = logging.getLogger(__name__)


@dataclass
class TickReport:
    runs: int = 0
    decisions: list[AuditRecord] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


class Daemon:
    """Supervises every managed run on one tracker with one policy."""

    def __init__(
        self,
        tracker: Tracker,
        policy: Policy,
        config: SupervisorConfig | None = None,
        *,
        workers: int = 4,
        signing_key: str | None = None,
    ) -> None:
        self.tracker = tracker
        self.policy = policy
        self.config = config or SupervisorConfig()
        self.audit = AuditLog(tracker, signing_key)
        self.supervisors: dict[str, RunSupervisor] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="atm-run")
        self._tracker_down = False
        self._lock = threading.Lock()

    def run_once(self) -> TickReport:
        """One pass over every managed run. Never raises for one run's failure."""
        report = TickReport()
        with self._lock:
            try:
                runs = self.tracker.find_managed_runs()
            except TrackerError as exc:
                if not self._tracker_down:
                    log.warning("tracker unreachable: %s; retrying every tick", exc)
                self._tracker_down = True
                report.errors["*"] = str(exc)
                return report
            if self._tracker_down:
                log.warning("tracker reachable again")
                self._tracker_down = False
            live = {r.run_id for r in runs}
            for gone in set(self.supervisors) - live:
                del self.supervisors[gone]
            for run in runs:
                self.supervisors.setdefault(
                    run.run_id, RunSupervisor(run.run_id, self.tracker, self.audit, self.config)
                )
            futures = {
                r.run_id: self._pool.submit(self.supervisors[r.run_id].tick, self.policy, r)
                for r in runs
            }
            report.runs = len(runs)
            for run_id, future in futures.items():
                try:
                    record = future.result()
                except Exception as exc:  # one run's failure must not stop the others
                    log.warning(
                        "run %s: decision cycle failed: %s",
                        run_id,
                        exc,
                        exc_info=not isinstance(exc, TrackerError),
                    )
                    report.errors[run_id] = str(exc)
                    # Rebuild from the tracker next tick rather than trust partial state.
                    self.supervisors.pop(run_id, None)
                    continue
                if record is not None:
                    report.decisions.append(record)
        return report

    def serve(self, interval_s: float) -> None:
        """Run ``run_once`` every ``interval_s`` seconds until interrupted."""
        scheduler = BlockingScheduler()
        scheduler.add_job(
            self.run_once,
            "interval",
            seconds=interval_s,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            id="atm-tick",
        )
        log.info(
            "atm daemon: policy %s, tracker %s, every %.1f s",
            self.policy.name,
            self.tracker.uri,
            interval_s,
        )
        self.run_once()
        # SIGTERM (Kubernetes, systemd) ends the loop after the tick in progress.
        signal.signal(signal.SIGTERM, lambda *_: scheduler.shutdown(wait=False))
        try:
            scheduler.start()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
