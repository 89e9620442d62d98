"""Which daemon replica supervises which run: a lease per run, kept in a run tag.

The tracker is the only store the replicas share, and its tags have no compare-and-set, so
a lease is taken with Fischer's timed mutual exclusion: read the tag and see the lease free,
write our lease within ``write_bound_s`` of the start of that read, wait ``settle_s``
(longer than the bound), read it back. Of several replicas that saw it free, only the last
writer reads its own lease back, and every write lands before any of them reads back. The
owner renews the lease every quarter of its TTL; the others judge expiry by their own clocks
(the tag's value unchanged for the TTL since they first saw it), so no clocks need to agree.
A stable hash of the run id orders the replicas for each run (rendezvous hashing): the first
in that order takes a free lease at once, the k-th only ``k`` steps later, so replicas rarely
contend and a dead replica's runs spread over the living. A decision is written only while
the lease has a third of its TTL left (``check``); the audit's version check stays the last
guard.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from integrations.protocol import TAG_DAEMON_LEASE, Lease
from integrations.trackers import RunInfo, Tracker, TrackerError
from manager_daemon.metrics import DaemonMetrics

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """This replica no longer holds (or never held) the run's lease: it must not write."""


@dataclass(frozen=True)
class Replica:
    """Who this daemon is among its replicas: a name, its ordinal and how many there are."""

    name: str
    ordinal: int
    count: int

    @classmethod
    def from_name(cls, name: str, ordinal: int | None, count: int) -> Replica:
        """The replica named ``name``; its ordinal, unless given, is the name's ``-N`` suffix
        (a StatefulSet pod's name), else 0."""
        if ordinal is None:
            match = re.search(r"-(\d+)$", name)
            ordinal = int(match.group(1)) if match else 0
        if ordinal >= count:
            log.warning(
                "replica %s has ordinal %d but %d replica(s) are configured: counting %d",
                name,
                ordinal,
                count,
                ordinal + 1,
            )
        return cls(re.sub(r"\s+", "-", name) or "atm", ordinal, max(count, ordinal + 1))

    def rank(self, run_id: str) -> int:
        """This replica's place in the run's order of replicas (0: the run's first choice)."""
        mine = _score(run_id, self.ordinal)
        return sum(1 for other in range(self.count) if _score(run_id, other) > mine)


def _score(run_id: str, ordinal: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{run_id}/{ordinal}".encode()).digest()[:8], "big")


@dataclass
class _Held:
    value: str
    renewed: float  # monotonic time the write of ``value`` started


@dataclass
class _Pending:
    value: str
    write_started: float
    write_done: float


class Leases:
    """This replica's leases: observed each tick, renewed, taken, checked before a write."""

    def __init__(
        self,
        tracker: Tracker,
        replica: Replica,
        *,
        ttl_s: float,
        settle_s: float,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        threads: int = 8,
        metrics: DaemonMetrics | None = None,
    ) -> None:
        if ttl_s < 3 * interval_s:
            raise ValueError(
                f"lease_ttl ({ttl_s:g} s) must be at least three ticks ({3 * interval_s:g} s): "
                "a lease is renewed at ticks, every quarter of its TTL"
            )
        self.tracker = tracker
        self.replica = replica
        self.owner = f"{replica.name}.{secrets.token_hex(3)}"
        self.ttl_s = ttl_s
        self.settle_s = settle_s
        self.write_bound_s = settle_s / 2
        # How much later the next replica in a run's order may take its free lease.
        self.rank_step_s = settle_s + 2 * interval_s
        self._clock = clock
        self._metrics = metrics
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._pending: dict[str, _Pending] = {}
        self._seen: dict[str, tuple[str | None, float]] = {}
        self._stamp = 0.0
        self._io = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="atm-lease")

    # ---- each tick ----------------------------------------------------------------------

    def refresh(self, runs: Iterable[RunInfo], read_started: float, read_done: float) -> set[str]:
        """Update the leases from one listing of the managed runs (read between
        ``read_started`` and ``read_done``, monotonic): confirm, renew and take leases. Returns
        the runs this replica may decide for now."""
        listed = {run.run_id: run.tags.get(TAG_DAEMON_LEASE) for run in runs}
        with self._lock:
            for run_id in set(self._seen) - set(listed):
                self._seen.pop(run_id, None)
                self._held.pop(run_id, None)
                self._pending.pop(run_id, None)
            for run_id, value in listed.items():
                if self._seen.get(run_id, (object(), 0.0))[0] != value:
                    # read_done, not read_started: no later than the value's landing + ttl.
                    self._seen[run_id] = (value, read_done)
                self._confirm(run_id, value, read_started)
            take = [(r, v) for r, v in listed.items() if self._may_take(r, v)]
        self.renew()
        list(self._io.map(lambda item: self._take(*item), take))
        return self.held()

    def renew(self) -> None:
        """Renew the leases a quarter of whose TTL has passed since their last renewal (well
        before the last third, in which the replica stops writing decisions)."""
        with self._lock:
            due = [r for r, h in self._held.items() if self._clock() >= h.renewed + self.ttl_s / 4]
        list(self._io.map(self._renew, due))

    def _confirm(self, run_id: str, value: str | None, read_started: float) -> None:
        held = self._held.get(run_id)
        if held is not None and value != held.value:
            log.warning("run %s: lease taken over (%s); no longer supervising it", run_id, value)
            del self._held[run_id]
            self._count("lost")
        pending = self._pending.get(run_id)
        if pending is None or read_started < pending.write_done + self.settle_s:
            return
        del self._pending[run_id]
        if value == pending.value:
            self._held[run_id] = _Held(pending.value, pending.write_started)
            log.info("run %s: lease taken by %s", run_id, self.owner)
            self._count("taken")

    def _may_take(self, run_id: str, value: str | None) -> bool:
        if run_id in self._held or run_id in self._pending:
            return False
        lease = Lease.parse(value)
        first_seen = self._seen[run_id][1]
        free_since = first_seen if lease is None else first_seen + lease.ttl_s
        wait = self.replica.rank(run_id) * self.rank_step_s
        return self._clock() >= free_since + wait

    def _renew(self, run_id: str) -> None:
        with self._lock:
            held = self._held.get(run_id)
        if held is None:
            return
        value = self._lease_value()
        started = self._clock()
        try:
            self.tracker.set_tags(run_id, {TAG_DAEMON_LEASE: value})
        except TrackerError as exc:
            log.warning("run %s: lease renewal failed: %s", run_id, exc)
            self._count("error")
            return
        done = self._clock()
        with self._lock:
            if self._held.get(run_id) is not held:
                return
            if done < held.renewed + self.ttl_s or self.replica.count == 1:
                # A lone replica renews late after an outage, or after its process was held
                # up: no other replica can have taken the run meanwhile, so it keeps it (were
                # a stray second daemon there, the next listing shows its lease: "taken over").
                self._held[run_id] = _Held(value, started)
            else:
                # It may have landed after another replica saw the lease expire.
                log.warning("run %s: lease renewal came too late; giving the run up", run_id)
                del self._held[run_id]
                self._count("lost")

    def _take(self, run_id: str, listed: str | None) -> None:
        # Read the one tag again just before writing: Fischer's bound then covers two small
        # requests, not a listing of every run.
        read_started = self._clock()
        try:
            if self.tracker.get_run(run_id).tags.get(TAG_DAEMON_LEASE) != listed:
                return  # changed since the listing: judged again next tick
            value = self._lease_value()
            started = self._clock()
            self.tracker.set_tags(run_id, {TAG_DAEMON_LEASE: value})
        except TrackerError as exc:
            log.warning("run %s: cannot take the lease: %s", run_id, exc)
            self._count("error")
            return
        done = self._clock()
        if done - read_started > self.write_bound_s:
            # Fischer's bound broken: another replica may have taken it meanwhile. Claim
            # nothing; our lease expires untouched and is taken again later.
            log.info(
                "run %s: reading and writing the lease took %.1f s; not claiming it",
                run_id,
                done - read_started,
            )
            return
        with self._lock:
            self._pending[run_id] = _Pending(value, started, done)

    def _count(self, event: str) -> None:
        if self._metrics is None:
            return
        if event == "error":
            self._metrics.tracker_errors.labels("lease").inc()
        else:
            self._metrics.lease_events.labels(event).inc()

    def _lease_value(self) -> str:
        # Every renewal must change the tag (others see an unchanged value as expiring), even
        # two within one millisecond of each other.
        with self._lock:
            self._stamp = max(round(time.time(), 3), self._stamp + 0.001)
            stamp = self._stamp
        return Lease(owner=self.owner, renewed_at=stamp, ttl_s=self.ttl_s).tag_value()

    # ---- queries ------------------------------------------------------------------------

    def held(self) -> set[str]:
        """The runs whose lease this replica holds with a third of its TTL left."""
        now = self._clock()
        with self._lock:
            return {r for r, h in self._held.items() if now < h.renewed + self.ttl_s * 2 / 3}

    @property
    def pending(self) -> int:
        """Leases written and waiting to be read back."""
        with self._lock:
            return len(self._pending)

    def settle_deadline(self) -> float | None:
        """When the last pending lease can be read back (monotonic), or None."""
        with self._lock:
            return max((p.write_done + self.settle_s for p in self._pending.values()), default=None)

    def check(self, run_id: str) -> None:
        """Raise LeaseLost unless this replica may write a decision for ``run_id`` now."""
        if run_id not in self.held():
            raise LeaseLost(f"run {run_id}: this replica ({self.owner}) does not hold its lease")

    # ---- shutdown -----------------------------------------------------------------------

    def release(self) -> int:
        """Give up every lease still held (on shutdown, after the decisions in flight), so
        that the next replica takes the runs at once. Returns how many were released."""
        released = 0
        for run_id in self.held():
            with self._lock:
                self._held.pop(run_id, None)
            try:
                self.tracker.delete_tag(run_id, TAG_DAEMON_LEASE)
                released += 1
                self._count("released")
            except TrackerError as exc:
                log.warning("run %s: cannot release the lease (it will expire): %s", run_id, exc)
        self._io.shutdown(wait=False, cancel_futures=True)
        return released
