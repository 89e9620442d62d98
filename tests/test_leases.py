"""Run leases between daemon replicas, on the in-memory tracker with a hand-moved clock: who
takes a free run, that two replicas never both hold one, expiry, a late write, release, and
the guard that keeps a replica without the lease from writing a decision.

The same leases between real `atm daemon` processes on a real MLflow server are in
``test_replicas.py``."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from integrations.protocol import TAG_DAEMON_LEASE, TAG_PARAMS_VERSION, Lease, params_path
from integrations.trackers.memory import MemoryTracker
from manager_daemon.daemon import Daemon
from manager_daemon.leases import LeaseLost, Leases, Replica
from manager_daemon.policies.rules import RulesPolicy
from tests.conftest import Backend
from tests.helpers import overfitting_run

TTL, SETTLE, INTERVAL = 6.0, 1.0, 1.0


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replica(tracker: MemoryTracker, clock: Clock, ordinal: int, count: int) -> Leases:
    return Leases(
        tracker,
        Replica(f"atm-{ordinal}", ordinal, count),
        ttl_s=TTL,
        settle_s=SETTLE,
        interval_s=INTERVAL,
        clock=clock,
    )


def tick(leases: Leases, tracker: MemoryTracker, clock: Clock) -> set[str]:
    return leases.refresh(tracker.find_managed_runs(), clock(), clock())


def managed_runs(memory: Backend, n: int) -> list[str]:
    return [overfitting_run(memory) for _ in range(n)]


def test_a_stable_order_of_replicas_per_run() -> None:
    replicas = [Replica(f"atm-{i}", i, 3) for i in range(3)]
    firsts = Counter()
    for i in range(300):
        ranks = sorted(r.rank(f"run-{i}") for r in replicas)
        assert ranks == [0, 1, 2]
        firsts[next(r.ordinal for r in replicas if r.rank(f"run-{i}") == 0)] += 1
    assert all(60 <= n <= 140 for n in firsts.values()), firsts
    assert Replica.from_name("atm-ai-training-manager-2", None, 3).ordinal == 2
    # A pod beyond the configured count still gets a place of its own.
    assert Replica.from_name("atm-4", None, 3).count == 5


def test_replicas_split_the_runs_each_to_its_first_choice(memory: Backend) -> None:
    tracker, clock = memory.tracker, Clock()
    runs = managed_runs(memory, 12)
    replicas = [replica(tracker, clock, i, 3) for i in range(3)]
    for r in replicas:
        assert tick(r, tracker, clock) == set()  # written, not yet read back
    clock.now += SETTLE
    held = [tick(r, tracker, clock) for r in replicas]
    assert sorted(run for h in held for run in h) == sorted(runs)
    for r, mine in zip(replicas, held, strict=True):
        assert all(r.replica.rank(run) == 0 for run in mine)
        for run in mine:
            assert Lease.parse(tracker.get_run(run).tags[TAG_DAEMON_LEASE]).owner == r.owner


def test_two_replicas_that_both_see_a_run_free_never_both_hold_it(memory: Backend) -> None:
    # Both think they are the only replica (a scale change under way): both are first choice.
    tracker, clock = memory.tracker, Clock()
    (run,) = managed_runs(memory, 1)
    a, b = replica(tracker, clock, 0, 1), replica(tracker, clock, 0, 1)

    interleaved: list[str] = []

    def b_reads_and_writes_before_a_writes(operation: str, run_id: str | None) -> None:
        if operation == "set_tags" and not interleaved:
            interleaved.append(operation)
            b._take(run, None)  # b reads the lease free too, and writes first

    tracker.fault = b_reads_and_writes_before_a_writes
    a._take(run, None)  # a read the lease free, then b did, b wrote, a wrote
    tracker.fault = None
    assert a.pending == b.pending == 1  # both wrote a lease after seeing it free
    clock.now += SETTLE
    assert tick(b, tracker, clock) == set()
    assert tick(a, tracker, clock) == {run}  # the last writer, alone
    for _ in range(3 * int(TTL)):  # and it stays that way while a renews
        clock.now += INTERVAL
        assert tick(b, tracker, clock) == set()
        assert tick(a, tracker, clock) == {run}


def test_a_replica_that_sees_the_lease_taken_since_its_listing_does_not_write(
    memory: Backend,
) -> None:
    tracker, clock = memory.tracker, Clock()
    runs = managed_runs(memory, 4)
    a, b = replica(tracker, clock, 0, 1), replica(tracker, clock, 0, 1)
    listing = tracker.find_managed_runs()
    a.refresh(listing, clock(), clock())
    b.refresh(listing, clock(), clock())  # its listing is stale: a wrote since
    assert b.pending == 0
    clock.now += SETTLE
    assert tick(a, tracker, clock) == set(runs)
    assert tick(b, tracker, clock) == set()


def test_the_runs_of_a_dead_replica_are_taken_after_the_ttl(memory: Backend) -> None:
    tracker, clock = memory.tracker, Clock()
    managed_runs(memory, 10)
    a, b = replica(tracker, clock, 0, 2), replica(tracker, clock, 1, 2)
    tick(a, tracker, clock), tick(b, tracker, clock)
    clock.now += SETTLE
    held_a, held_b = tick(a, tracker, clock), tick(b, tracker, clock)
    assert held_a and held_b
    # a dies: it no longer ticks. b is the second choice of a's runs.
    died = clock.now
    while not held_a <= tick(b, tracker, clock):
        clock.now += INTERVAL
        assert clock.now - died < 30, "a's runs never taken"
    waited = clock.now - died
    assert TTL + b.rank_step_s <= waited <= TTL + b.rank_step_s + SETTLE + 2 * INTERVAL
    # a's own clock says its leases lapsed long before b could take them.
    with pytest.raises(LeaseLost):
        a.check(next(iter(held_a)))


def test_a_holder_stops_deciding_before_others_may_take_over(memory: Backend) -> None:
    tracker, clock = memory.tracker, Clock()
    (run,) = managed_runs(memory, 1)
    a = replica(tracker, clock, 0, 1)
    tick(a, tracker, clock)
    clock.now += SETTLE
    assert tick(a, tracker, clock) == {run}
    a.check(run)
    clock.now += TTL * 2 / 3  # no renewal since: a third of the TTL is the writing margin
    with pytest.raises(LeaseLost):
        a.check(run)


def test_a_lease_write_that_lands_late_is_not_claimed(memory: Backend) -> None:
    tracker, clock = memory.tracker, Clock()
    (run,) = managed_runs(memory, 1)

    def slow_lease_write(operation: str, run_id: str | None) -> None:
        if operation == "set_tags":
            clock.now += SETTLE  # longer than the write bound (half the settle time)

    a = replica(tracker, clock, 0, 1)
    tracker.fault = slow_lease_write
    tick(a, tracker, clock)
    tracker.fault = None
    clock.now += SETTLE
    assert tick(a, tracker, clock) == set()
    assert a.pending == 0  # the lease it wrote expires untouched, then is taken again
    clock.now += TTL
    tick(a, tracker, clock)
    clock.now += SETTLE
    assert tick(a, tracker, clock) == {run}


@pytest.mark.parametrize(("count", "kept"), [(1, True), (2, False)])
def test_a_renewal_after_an_outage_keeps_the_run_only_for_a_lone_replica(
    memory: Backend, count: int, kept: bool
) -> None:
    tracker, clock = memory.tracker, Clock()
    (run,) = managed_runs(memory, 1)
    first = next(i for i in range(count) if Replica("atm", i, count).rank(run) == 0)
    leases = replica(tracker, clock, first, count)  # the run's first choice
    tick(leases, tracker, clock)
    clock.now += SETTLE
    assert tick(leases, tracker, clock) == {run}
    clock.now += 3 * TTL  # the tracker unreachable: no listing, no renewal, for three TTLs
    assert tick(leases, tracker, clock) == ({run} if kept else set())
    # Another replica may have seen the lease expire and taken the run meanwhile: one that
    # is not alone gives it up and takes it again only after a whole TTL.
    clock.now += INTERVAL
    assert tick(leases, tracker, clock) == ({run} if kept else set())


def test_released_runs_are_taken_at_once(memory: Backend) -> None:
    tracker, clock = memory.tracker, Clock()
    runs = managed_runs(memory, 10)
    a, b = replica(tracker, clock, 0, 2), replica(tracker, clock, 1, 2)
    tick(a, tracker, clock), tick(b, tracker, clock)
    clock.now += SETTLE
    held_a = tick(a, tracker, clock)
    tick(b, tracker, clock)
    assert a.release() == len(held_a)
    assert all(TAG_DAEMON_LEASE not in tracker.get_run(r).tags for r in held_a)
    tick(b, tracker, clock)  # sees them free
    clock.now += b.rank_step_s  # b is their second choice: it waits one rank step, no TTL
    tick(b, tracker, clock)
    clock.now += SETTLE
    assert tick(b, tracker, clock) == set(runs)


def test_a_replica_that_lost_the_lease_while_deciding_writes_nothing(memory: Backend) -> None:
    tracker = memory.tracker
    run = overfitting_run(memory)
    leases = Leases(tracker, Replica("atm-0", 0, 1), ttl_s=TTL, settle_s=0.05, interval_s=1.0)

    class TakenOverWhileThinking(RulesPolicy):
        """Another replica takes the run while this one's policy decides (the first time)."""

        taken_over = False

        def propose(self, snapshot, menu):
            if self.taken_over:
                return super().propose(snapshot, menu)
            self.taken_over = True
            other = Lease(owner="atm-1.abc", renewed_at=time.time(), ttl_s=TTL)
            tracker.set_tags(run, {TAG_DAEMON_LEASE: other.tag_value()})
            now = time.monotonic()
            leases.refresh(tracker.find_managed_runs(), now, now)
            return super().propose(snapshot, menu)

    daemon = Daemon(
        tracker, TakenOverWhileThinking(), leases=leases, experiments=[memory.experiment]
    )
    report = daemon.run_once()  # takes the lease, reads it back, decides, loses it
    assert report.runs == 1 and report.decisions == []
    assert TAG_PARAMS_VERSION not in tracker.get_run(run).tags
    assert tracker.read_json(run, params_path(1)) is None
    assert daemon.audit.records(run) == []
    # The other replica lets go: this one takes the run again and makes the dropped decision.
    tracker.delete_tag(run, TAG_DAEMON_LEASE)
    report = daemon.run_once()
    assert [(r.step, r.params_version) for r in report.decisions] == [(70, 1)]
    daemon.close()
