"""The tracker contract, on every backend: what the client and the daemon promise each other
through a tracker, whichever tracker it is.

Write order, recovery after a writer dies between writes, tampered and replayed params
refused, advisory decisions for a run without a client, a restarted trainer re-applying its
last version, and training carrying on through an outage.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from integrations.protocol import (
    AUDIT_DIR,
    METRIC_PARAMS_VERSION,
    PARAMS_DIR,
    SPEC_PATH,
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
    TAG_CLIENT_REJECTED,
    TAG_MANAGED,
    TAG_PARAMS_VERSION,
    AuditRecord,
    ParamsVersion,
    RunSpec,
    Source,
    audit_path,
    params_path,
)
from integrations.trackers import TrackerUnavailable, Window
from integrations.trackers.memory import MemoryTracker
from manager_daemon.audit import AuditLog
from manager_daemon.daemon import Daemon
from manager_daemon.policies import RulesPolicy
from tests.conftest import Backend
from tests.helpers import LoopThread, issue, overfitting_run, wait_for


@pytest.fixture
def loop(backend: Backend):
    run_id = backend.new_run()
    thread = LoopThread(run_id, backend.uri)
    thread.start()
    yield thread
    thread.stop()
    assert thread.error is None


def tags(backend: Backend, run_id: str) -> dict[str, str]:
    return backend.tracker.get_run(run_id).tags


def test_client_publishes_spec_after_its_heartbeat(loop: LoopThread, backend: Backend) -> None:
    run_id = loop.knobs.client.run_id
    # Heartbeat first, then the spec, then the managed tag: a daemon never sees a spec
    # without a live client.
    wait_for(lambda: TAG_MANAGED in tags(backend, run_id))
    assert tags(backend, run_id)[TAG_MANAGED] == "true"
    assert TAG_CLIENT_HEARTBEAT in tags(backend, run_id)
    spec = RunSpec.model_validate(backend.tracker.read_json(run_id, SPEC_PATH))
    assert spec.framework == "torch"
    assert {k.name for k in spec.knobs} == {
        "learning_rate",
        "weight_decay",
        "dropout",
        "aux_weight",
    }
    assert spec.knob("learning_rate").value == pytest.approx(0.01)


def test_valid_version_is_applied_once_and_acknowledged(loop: LoopThread, backend: Backend) -> None:
    run_id = loop.knobs.client.run_id
    wait_for(lambda: TAG_CLIENT_HEARTBEAT in tags(backend, run_id))
    issue(backend.tracker, run_id, 1, {"learning_rate": 0.005, "aux_weight": 0.8, "dropout": 0.2})
    wait_for(lambda: tags(backend, run_id).get(TAG_CLIENT_APPLIED_VERSION) == "1")
    applied_step = int(tags(backend, run_id)[TAG_CLIENT_APPLIED_STEP])
    # The ack is written during the step that applied it; the loop records that step's lr
    # once the step is done.
    wait_for(lambda: loop.step >= applied_step)
    lrs = dict(loop.lrs)
    assert lrs[applied_step - 1] == pytest.approx(0.01)
    assert lrs[applied_step] == pytest.approx(0.005)
    assert loop.knobs["aux_weight"] == 0.8
    assert loop.model[1].p == 0.2
    markers, _ = backend.tracker.read_new_points(run_id, [METRIC_PARAMS_VERSION], None)
    assert [(p.step, p.value) for p in markers] == [(applied_step, 1.0)]


def test_client_refuses_tampered_and_replayed_params(loop: LoopThread, backend: Backend) -> None:
    run_id = loop.knobs.client.run_id
    tracker = backend.tracker
    wait_for(lambda: TAG_CLIENT_HEARTBEAT in tags(backend, run_id))

    def refused(version: int) -> str:
        return wait_for(
            lambda: (
                (t := tags(backend, run_id).get(TAG_CLIENT_REJECTED, "")).startswith(f"v{version}:")
                and t
            )
        )

    # 1: not JSON at all.
    backend.put_text(run_id, params_path(1), "{this is not json")
    tracker.set_tags(run_id, {TAG_PARAMS_VERSION: "1"})
    assert "malformed" in refused(1)
    # 2: a knob this run does not expose.
    issue(tracker, run_id, 2, {"momentum": 0.9})
    assert "unknown knob 'momentum'" in refused(2)
    # 3: outside the client's own bounds (learning_rate max is 10 × 0.01).
    issue(tracker, run_id, 3, {"learning_rate": 5.0})
    assert "outside" in refused(3)
    # 4: does not continue the chain.
    issue(tracker, run_id, 4, {"learning_rate": 0.005}, parent_version=1)
    assert "parent version 1" in refused(4)
    # 5: edited after signing.
    good = ParamsVersion(
        version=5,
        parent_version=4,
        issued_at=1.0,
        source=Source.HUMAN,
        decision_id=5,
        values={"learning_rate": 0.005},
    ).signed(None)
    tampered = good.model_dump(mode="json") | {"values": {"learning_rate": 0.1}}
    tracker.write_json(run_id, params_path(5), tampered)
    tracker.set_tags(run_id, {TAG_PARAMS_VERSION: "5"})
    assert "tampered" in refused(5)
    # 6: wrong type inside an otherwise well-formed file.
    tracker.write_json(
        run_id,
        params_path(6),
        good.model_dump(mode="json") | {"version": 6, "values": {"learning_rate": "fast"}},
    )
    tracker.set_tags(run_id, {TAG_PARAMS_VERSION: "6"})
    assert "invalid params file" in refused(6)
    # 7: a replay: version 5's file, correctly signed, put up again as version 7.
    tracker.write_json(run_id, params_path(7), good.model_dump(mode="json"))
    tracker.set_tags(run_id, {TAG_PARAMS_VERSION: "7"})
    assert "claims version 5" in refused(7)

    assert TAG_CLIENT_APPLIED_VERSION not in tags(backend, run_id)
    assert all(lr == pytest.approx(0.01) for _, lr in loop.lrs)
    step_before = loop.step
    wait_for(lambda: loop.step > step_before + 20)
    assert loop.is_alive() and loop.error is None
    # A good version after all that is applied.
    issue(tracker, run_id, 8, {"learning_rate": 0.02})
    wait_for(lambda: tags(backend, run_id).get(TAG_CLIENT_APPLIED_VERSION) == "8")
    assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    # The tag going back to an older version changes nothing.
    tracker.set_tags(run_id, {TAG_PARAMS_VERSION: "2"})
    time.sleep(1.5)
    assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    assert tags(backend, run_id)[TAG_CLIENT_APPLIED_VERSION] == "8"


def test_stop_command_stops_the_loop(loop: LoopThread, backend: Backend) -> None:
    run_id = loop.knobs.client.run_id
    wait_for(lambda: TAG_CLIENT_HEARTBEAT in tags(backend, run_id))
    issue(backend.tracker, run_id, 1, {}, commands=["stop"])
    loop.join(30)
    assert not loop.is_alive() and loop.knobs.stop_requested


def test_a_restarted_trainer_reapplies_its_last_version_and_then_a_new_one(
    backend: Backend,
) -> None:
    run_id = backend.new_run()
    first = LoopThread(run_id, backend.uri)
    first.start()
    wait_for(lambda: TAG_CLIENT_HEARTBEAT in tags(backend, run_id))
    issue(backend.tracker, run_id, 1, {"learning_rate": 0.004}, commands=["stop"])
    first.join(60)  # a poll or two; more on a busy machine with W&B's slower reads
    assert first.knobs.stop_requested
    # Version 2 is issued while no trainer runs.
    issue(backend.tracker, run_id, 2, {"learning_rate": 0.003})
    # A new process on the same run, from a checkpoint: its last values come back, the stop
    # does not, and the version issued while it was down is applied after.
    second = LoopThread(run_id, backend.uri)
    applied: list[int] = []
    original = second.knobs.client.apply_pending

    def recording(*args, **kwargs):
        version = original(*args, **kwargs)
        if version is not None:
            applied.append(version.version)
        return version

    second.knobs.client.apply_pending = recording  # type: ignore[method-assign]
    second.start()
    try:
        wait_for(lambda: tags(backend, run_id).get(TAG_CLIENT_APPLIED_VERSION) == "2")
        wait_for(lambda: second.step > 50)
        assert not second.knobs.stop_requested
        assert second.optimizer.param_groups[0]["lr"] == pytest.approx(0.003)
    finally:
        second.stop()
    assert applied == [1, 2], "the last version re-applied once, then the new one"


def test_params_audit_and_tag_are_written_in_that_order(backend: Backend) -> None:
    run_id = overfitting_run(backend)
    writes: list[str] = []
    inner = backend.tracker

    class Recording:
        uri = inner.uri

        def __getattr__(self, name: str):
            return getattr(inner, name)

        def write_json(self, to: str, path: str, payload: object) -> None:
            assert to == run_id
            writes.append(path.rsplit("/", 1)[0])
            inner.write_json(to, path, payload)

        def set_tags(self, to: str, new: dict[str, str]) -> None:
            assert to == run_id
            if TAG_PARAMS_VERSION in new:
                # A reader that sees tag N can read file N.
                assert inner.read_json(to, params_path(int(new[TAG_PARAMS_VERSION])))
                writes.append("tag")
            inner.set_tags(to, new)

    report = Daemon(Recording(), RulesPolicy(), experiments=[backend.experiment]).run_once()
    assert [r.status for r in report.decisions] == ["issued"]
    assert writes == [PARAMS_DIR, AUDIT_DIR, "tag"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


class DiesOnce:
    """A tracker that dies the first time it would write ``fatal_path`` (or the version tag)."""

    def __init__(self, inner, fatal: str) -> None:
        self.inner, self.fatal, self.armed = inner, fatal, True
        self.uri = inner.uri

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def write_json(self, run_id: str, path: str, payload: object) -> None:
        if self.armed and path.startswith(self.fatal):
            self.armed = False
            raise Killed
        self.inner.write_json(run_id, path, payload)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        if self.armed and self.fatal == "tag" and TAG_PARAMS_VERSION in tags:
            self.armed = False
            raise Killed
        self.inner.set_tags(run_id, tags)


@pytest.mark.parametrize("dies_before", [AUDIT_DIR, "tag"])
def test_daemon_killed_mid_decision_loses_nothing_and_repeats_nothing(
    backend: Backend, dies_before: str
) -> None:
    tracker = backend.tracker
    run_id = overfitting_run(backend)
    first = Daemon(DiesOnce(tracker, dies_before), RulesPolicy(), experiments=[backend.experiment])
    with pytest.raises(Killed):
        first.run_once()
    assert tracker.list_artifacts(run_id, PARAMS_DIR) == [params_path(1)]
    assert TAG_PARAMS_VERSION not in tracker.get_run(run_id).tags

    # A fresh daemon process completes the interrupted decision and decides nothing twice.
    second = Daemon(tracker, RulesPolicy(), experiments=[backend.experiment])
    for _ in range(3):
        second.run_once()
    assert tracker.get_run(run_id).tags[TAG_PARAMS_VERSION] == "1"
    assert tracker.list_artifacts(run_id, PARAMS_DIR) == [params_path(1)]
    params = ParamsVersion.model_validate(tracker.read_json(run_id, params_path(1)))
    record = AuditRecord.model_validate(tracker.read_json(run_id, audit_path(params.decision_id)))
    assert record.params_version == 1
    assert tracker.list_artifacts(run_id, AUDIT_DIR) == [audit_path(params.decision_id)]

    # The client applies v1; new evidence later gets a new decision, continuing the chain.
    backend.log_metrics(run_id, {METRIC_PARAMS_VERSION: 1}, 71)
    backend.log_metrics(run_id, {"eval_loss": 2.5}, 100)
    backend.log_metrics(run_id, {"eval_loss": 2.6}, 200)
    second.run_once()
    assert tracker.get_run(run_id).tags[TAG_PARAMS_VERSION] == "2"
    v2 = ParamsVersion.model_validate(tracker.read_json(run_id, params_path(2)))
    assert v2.parent_version == 1 and v2.decision_id != params.decision_id


def test_a_run_without_a_client_gets_advisory_decisions_only(backend: Backend) -> None:
    tracker = backend.tracker
    run_id = overfitting_run(backend)
    tracker.delete_tag(run_id, TAG_CLIENT_HEARTBEAT)
    report = Daemon(tracker, RulesPolicy(), experiments=[backend.experiment]).run_once()
    assert [r.status for r in report.decisions] == ["advisory"]
    assert report.decisions[0].verdicts, "the decision and its verdicts are audited"
    assert TAG_PARAMS_VERSION not in tracker.get_run(run_id).tags
    assert tracker.list_artifacts(run_id, PARAMS_DIR) == []
    assert [r.status for r in AuditLog(tracker).records(run_id)] == ["advisory"]


class Outage:
    """A fault handler for the in-memory tracker: every call fails while ``down`` is set."""

    def __init__(self) -> None:
        self.down = threading.Event()

    def __call__(self, operation: str, run_id: str | None) -> None:
        if self.down.is_set():
            raise TrackerUnavailable("connection refused")


def test_training_never_waits_while_the_tracker_is_down(
    memory: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """The outage on the in-memory tracker; on a real server stopped and started again, in
    ``test_faults``."""
    tracker = memory.tracker
    assert isinstance(tracker, MemoryTracker)
    outage = Outage()
    tracker.fault = outage
    run_id = memory.new_run()
    loop = LoopThread(run_id, memory.uri, sleep=0.005)
    caplog.set_level(logging.WARNING, logger="integrations.client")
    loop.start()
    try:
        wait_for(lambda: TAG_CLIENT_HEARTBEAT in tracker.get_run(run_id).tags)
        outage.down.set()
        down_from = len(loop.step_times)
        time.sleep(3)
        during = loop.step_times[down_from:]
        outage.down.clear()
        issue(tracker, run_id, 1, {"learning_rate": 0.02})
        wait_for(lambda: tracker.get_run(run_id).tags.get(TAG_CLIENT_APPLIED_VERSION) == "1", 40)
        assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    finally:
        loop.stop()
    assert loop.error is None
    assert len(during) > 100, "training kept stepping while the tracker was down"
    assert max(during) < 0.25, f"a training step waited {max(during):.3f} s"
    warnings = [r for r in caplog.records if "tracker unreachable" in r.getMessage()]
    assert len(warnings) == 1, "the client warns once per outage"


def test_reads_return_what_is_new_and_a_first_read_is_bounded(backend: Backend) -> None:
    tracker = backend.tracker
    run_id = backend.new_run()
    rows = [(s, {"loss": float(s)}) for s in range(3000)]
    rows += [(s, {"eval_loss": float(s)}) for s in range(0, 3000, 100)]
    backend.log_history(run_id, rows)
    keys = ["loss", "eval_loss"]

    def steps(points, key: str) -> list[int]:
        return [p.step for p in points if p.key == key]

    # A first read with a window: the last points of each key, however long its history.
    points, cursor = tracker.read_new_points(run_id, keys, None, window=50)
    assert steps(points, "loss") == list(range(2950, 3000))
    assert steps(points, "eval_loss") == list(range(0, 3000, 100))  # 30: fewer than the window
    everything, _ = tracker.read_new_points(run_id, ["loss"], None)
    assert steps(everything, "loss") == list(range(3000))

    backend.log_history(run_id, [(3000, {"loss": 1.0}), (3001, {"loss": 2.0, "eval_loss": 3.0})])
    new, after = tracker.read_new_points(run_id, keys, cursor, window=50)
    assert steps(new, "loss") == [3000, 3001] and steps(new, "eval_loss") == [3001]
    again, _ = tracker.read_new_points(run_id, keys, cursor, window=50)
    assert [(p.key, p.step) for p in again] == [(p.key, p.step) for p in new], "cursor unchanged"
    nothing, _ = tracker.read_new_points(run_id, keys, after, window=50)
    assert nothing == []


def test_a_first_read_takes_each_key_s_own_window(backend: Backend) -> None:
    tracker = backend.tracker
    run_id = backend.new_run()
    rows = [(s, {"loss": float(s)}) for s in range(4000)]
    rows += [(s, {"eval_loss": float(s)}) for s in range(0, 4000, 40)]  # sparse: every 40
    backend.log_history(run_id, rows)
    window = Window(30, {"eval_loss": 12})
    points, _ = tracker.read_new_points(run_id, ["loss", "eval_loss"], None, window=window)
    assert [p.step for p in points if p.key == "loss"] == list(range(3970, 4000))
    assert [p.step for p in points if p.key == "eval_loss"] == list(range(3520, 4000, 40))


def test_a_batched_read_gives_each_run_its_own_new_points(backend: Backend) -> None:
    tracker = backend.tracker
    runs = [backend.new_run() for _ in range(3)]
    for i, run_id in enumerate(runs):
        backend.log_history(run_id, [(s, {"loss": 10.0 * i + s}) for s in range(20 * (i + 1))])
    first = tracker.read_new_points_many([(r, ["loss"], None) for r in runs], window=5)
    assert [[p.step for p in points] for points, _ in first] == [
        list(range(15, 20)),
        list(range(35, 40)),
        list(range(55, 60)),
    ]
    # Each run moves on by a different amount; one run has nothing new.
    backend.log_history(runs[0], [(20, {"loss": 0.5}), (21, {"loss": 0.4})])
    backend.log_history(runs[2], [(60, {"loss": 0.3})])
    reads = [(r, ["loss"], cursor) for r, (_, cursor) in zip(runs, first, strict=True)]
    second = tracker.read_new_points_many(reads, window=5)
    assert [[(p.step, p.value) for p in points] for points, _ in second] == [
        [(20, 0.5), (21, 0.4)],
        [],
        [(60, 0.3)],
    ]
