"""The training-side client: publish the knob spec, poll for params versions, stage, ack.

All tracker I/O happens on one daemon thread. The training thread only calls
``apply_pending`` at a boundary, which reads a staged version from memory and never touches
the network: if the tracker is slow or down, training does not notice.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from integrations.chain import ParamsRejected, chain_problem, load
from integrations.protocol import (
    METRIC_PARAMS_VERSION,
    SPEC_PATH,
    TAG_CLIENT_APPLIED_STEP,
    TAG_CLIENT_APPLIED_VERSION,
    TAG_CLIENT_HEARTBEAT,
    TAG_CLIENT_REJECTED,
    TAG_MANAGED,
    TAG_OBJECTIVE,
    TAG_PARAMS_VERSION,
    TAG_SPEC_DIGEST,
    Boundary,
    Command,
    Objective,
    ParamsVersion,
    RunSpec,
)
from integrations.settings import DEFAULT_OBJECTIVE_GRACE_S, DEFAULT_POLL_INTERVAL_S
from integrations.trackers import RunInfo, Tracker, TrackerError, open_tracker
from integrations.trackers.outage import outage_over, outage_reported
from integrations.watch import DaemonWatch, ObjectiveWatch, RunSteps

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
# The heartbeat only says "a client is alive" (and how recently, in `atm status`); refreshing
# it far less often than the poll keeps the cost of a quiet poll to one read.
HEARTBEAT_EVERY_S = 60.0
# Each wait is drawn within ±JITTER of its length: a thousand clients started together, or
# coming back together after an outage, spread their requests instead of arriving at once.
JITTER = 0.2

# Applies changed knob values and commands in the training process; raises if it cannot.
ApplyFn = Callable[[dict[str, float], list[Command]], None]


@dataclass
class _Ack:
    version: int
    step: int
    rejected: str | None = None


class ParamsApplier:
    """The training-thread half of a client: the values in force, and applying a version.

    A process that takes its versions from elsewhere (a rank other than 0, which follows rank
    0) uses this alone: it never talks to the tracker and acknowledges nothing.
    """

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.values: dict[str, float] = spec.knob_values
        self.applied_version = 0
        self.training_step: int | None = None  # the latest step a boundary was reached at
        self._staged: ParamsVersion | None = None
        self._lock = threading.Lock()

    def value(self, name: str) -> float:
        """The current value of a knob, as last applied."""
        return self.values[name]

    @property
    def staged_version(self) -> int | None:
        """The version waiting for its boundary, if any."""
        staged = self._staged
        return staged.version if staged is not None else None

    def take_staged(self, boundary: Boundary) -> ParamsVersion | None:
        """The staged version, now no longer staged, if ``boundary`` is where it applies."""
        if self._staged is None or boundary is not self.spec.apply_at:
            return None
        with self._lock:
            staged, self._staged = self._staged, None
        return staged

    def apply_pending(self, boundary: Boundary, step: int, apply: ApplyFn) -> ParamsVersion | None:
        """Apply the staged version if this is its boundary; returns it when applied."""
        self.training_step = step
        staged = self.take_staged(boundary)
        return self.apply_version(staged, step, apply) if staged is not None else None

    def apply_version(
        self, version: ParamsVersion, step: int, apply: ApplyFn
    ) -> ParamsVersion | None:
        """Apply ``version`` now, at ``step``; returns it when applied.

        Only knobs whose value changes are passed to ``apply``. If ``apply`` raises, the version
        is reported as rejected and the previous values stay in force.
        """
        changed = {k: v for k, v in version.values.items() if self.values.get(k) != v}
        try:
            apply(changed, list(version.commands))
        except Exception as exc:  # the training run must survive a failed apply
            reason = f"v{version.version}: could not apply: {exc}"
            log.warning("atm: %s", reason)
            self._acknowledge(_Ack(version.version, step, rejected=reason))
            return None
        self.values.update(changed)
        self.applied_version = version.version
        log.info("atm: applied params v%d at step %d: %s", version.version, step, changed)
        self._acknowledge(_Ack(version.version, step))
        return version

    def reject(self, version: ParamsVersion, step: int, reason: str) -> None:
        """Report a taken version as not applied."""
        self._acknowledge(_Ack(version.version, step, rejected=f"v{version.version}: {reason}"))

    def _acknowledge(self, ack: _Ack) -> None:
        """Acknowledgements go nowhere here; a client sends them to the tracker."""


class ManagerClient(ParamsApplier):
    """Connects one training run to the manager through its tracker.

    Args:
        run_id: the tracker run the training process logs to.
        spec: the knobs and commands this process exposes, with their bounds.
        tracker: a tracker backend, or None to open one from ``tracking_uri``.
        objective: written to ``atm.objective`` when given; the client then says once if
            the run never logs its metric (``integrations.watch``).
        poll_interval: seconds between polls of ``atm.params.version``.
        resume: re-apply the version this run had applied before (a restart from a checkpoint).
        signing_key: the key params versions must be signed with (``ClientSettings.key()``);
            without one, versions signed with a key are refused.
        objective_grace: seconds the run may log other metrics without the objective before
            the client says so (``ClientSettings.objective_grace``).
    """

    def __init__(
        self,
        run_id: str,
        spec: RunSpec,
        *,
        tracker: Tracker | None = None,
        tracking_uri: str | None = None,
        objective: str | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        resume: bool = True,
        signing_key: str | None = None,
        objective_grace: float = DEFAULT_OBJECTIVE_GRACE_S,
    ) -> None:
        if tracker is None:
            if not tracking_uri:
                raise ValueError("ManagerClient needs a tracker or a tracking_uri")
            tracker = open_tracker(tracking_uri)
        super().__init__(spec.model_copy(update={"poll_interval_s": poll_interval}))
        self.run_id = run_id
        self.tracker = tracker
        self.objective = objective
        self.poll_interval = poll_interval
        self.resume = resume
        self.signing_key = signing_key or None
        self.objective_watch = (
            ObjectiveWatch(Objective.parse(objective), objective_grace) if objective else None
        )
        self.daemon_watch = DaemonWatch()
        self.run_steps = RunSteps()

        self._resume_pending = resume
        # The version re-applied on resume, until it is applied: newer ones wait behind it.
        self._resuming: ParamsVersion | None = None
        self._seen_version = 0
        self._acks: list[_Ack] = []
        self._published = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable_since: float | None = None
        self._last_heartbeat = 0.0
        self.rejections: list[str] = []
        # Versions this process refused: a later version may skip them (``chain_problem``).
        self._refused: set[int] = set()

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> ManagerClient:
        """Start the background poller. Returns at once; the first poll publishes the spec."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="atm-client", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop polling, after a last bounded attempt to deliver pending acks."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        outage_over(self)

    # ---- background thread --------------------------------------------------------------

    def _acknowledge(self, ack: _Ack) -> None:
        ack.step = self.run_steps.step(ack.step)
        with self._lock:
            if ack.rejected:
                self._refused.add(ack.version)
            self._acks.append(ack)
        self._wake.set()

    def _run(self) -> None:
        backoff = self.poll_interval
        while True:
            stopping = self._stop.is_set()
            started = time.monotonic()
            try:
                self.poll_once(last=stopping)
            except TrackerError as exc:
                self._note_unreachable(exc)
                backoff = min(max(backoff * 2, self.poll_interval), MAX_BACKOFF_S)
            except Exception:
                log.exception("atm: unexpected error in the client poller; will retry")
                backoff = min(max(backoff * 2, self.poll_interval), MAX_BACKOFF_S)
            else:
                backoff = self.poll_interval
            if stopping:
                return
            # Fixed rate: a tag set just after a read waits one interval, not one plus a poll.
            wait = backoff * random.uniform(1 - JITTER, 1 + JITTER)
            self._wake.wait(max(0.0, wait - (time.monotonic() - started)))
            self._wake.clear()

    def _note_unreachable(self, exc: Exception) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = time.time()
            log.warning(
                "atm: tracker unreachable (%s); training continues, the client retries with "
                "backoff up to %.0f s",
                exc,
                MAX_BACKOFF_S,
            )
            if not self._stop.is_set():  # a client closing reports nothing it must take back
                outage_reported(self)

    def evaluated(self, keys: Iterable[str]) -> None:
        """The integration was told of an evaluation with these metric keys."""
        if self.objective_watch is not None:
            self.objective_watch.evaluated(keys)

    def poll_once(self, *, last: bool = False) -> None:
        """One poll: publish if needed, deliver acks, heartbeat, fetch a new version; the
        ``last`` one, when the client closes, also says if the objective was never logged."""
        if self._unreachable_since is not None and not self.tracker.ping():
            raise TrackerError("tracker still unreachable")
        if not self._published:
            self._publish()
        self._flush_acks()
        run = self.tracker.get_run(self.run_id)
        if time.time() - self._last_heartbeat >= max(HEARTBEAT_EVERY_S, self.poll_interval):
            self.tracker.set_tags(self.run_id, {TAG_CLIENT_HEARTBEAT: f"{time.time():.3f}"})
            self._last_heartbeat = time.time()
        if self._unreachable_since is not None:
            log.warning(
                "atm: tracker reachable again after %.0f s", time.time() - self._unreachable_since
            )
            outage_over(self)
            self._unreachable_since = None
        self._watch_objective(run, last)
        for said in self.daemon_watch.polled(run.tags, last=last):
            log.warning("atm: %s", said)
        if self.objective_watch is not None and self.daemon_watch.said_objective_missing:
            self.objective_watch.said_elsewhere()
        if said_steps := self.run_steps.polled(run.latest_steps, self.training_step):
            log.warning("atm: %s", said_steps)
        if self._resume_pending:
            self._stage_resume(run.tags)
        if self._resuming is not None and self._staged is self._resuming:
            return  # the version re-applied on resume goes first, on its own
        latest = _int_tag(run.tags.get(TAG_PARAMS_VERSION))
        if latest > max(self._seen_version, self.applied_version):
            self._fetch(latest)

    def _watch_objective(self, run: RunInfo, last: bool) -> None:
        if self.objective_watch is not None:
            said = self.objective_watch.polled(run.latest_metrics, last=last)
            if said is not None:
                log.warning("atm: %s", said)
                self.daemon_watch.objective_said()

    def _publish(self) -> None:
        # The heartbeat first: a daemon that sees the spec must also see a live client, or it
        # would take the run for one without a client and make its decision advisory.
        # The objective too: a daemon reads it once, when it first sees the run managed.
        now = time.time()
        first = {TAG_CLIENT_HEARTBEAT: f"{now:.3f}"}
        if self.objective:
            first[TAG_OBJECTIVE] = self.objective
        self.tracker.set_tags(self.run_id, first)
        self._last_heartbeat = now
        self.tracker.write_json(self.run_id, SPEC_PATH, self.spec.model_dump(mode="json"))
        self.tracker.set_tags(
            self.run_id, {TAG_MANAGED: "true", TAG_SPEC_DIGEST: self.spec.digest()}
        )
        self._published = True
        log.info(
            "atm: published knob spec for run %s (%d knobs)", self.run_id, len(self.spec.knobs)
        )

    def _flush_acks(self) -> None:
        with self._lock:
            acks, self._acks = self._acks, []
        for i, ack in enumerate(acks):
            try:
                if ack.rejected:
                    self.tracker.set_tags(self.run_id, {TAG_CLIENT_REJECTED: ack.rejected})
                    continue
                # The marker first: a reader that sees the ack finds the marker too.
                self.tracker.log_metric(self.run_id, METRIC_PARAMS_VERSION, ack.version, ack.step)
                self.tracker.set_tags(
                    self.run_id,
                    {
                        TAG_CLIENT_APPLIED_VERSION: str(ack.version),
                        TAG_CLIENT_APPLIED_STEP: str(ack.step),
                    },
                )
            except TrackerError:
                with self._lock:
                    self._acks[:0] = acks[i:]
                raise

    def _stage_resume(self, tags: dict[str, str]) -> None:
        applied = _int_tag(tags.get(TAG_CLIENT_APPLIED_VERSION))
        self._resume_pending = False
        if applied <= 0 or self.applied_version:
            return
        try:
            version = self._load(applied, check_parent=False)
        except ParamsRejected as exc:
            log.warning("atm: cannot re-apply v%d on resume: %s", applied, exc)
            return
        # Values only: a command (stop, checkpoint) was meant for the earlier process.
        self._resuming = version.model_copy(update={"commands": []})
        self._stage(self._resuming)
        self._seen_version = max(self._seen_version, applied)
        log.info("atm: resuming run %s: re-applying params v%d", self.run_id, applied)

    def _fetch(self, version: int) -> None:
        try:
            params = self._load(version, check_parent=True)
        except ParamsRejected as exc:
            self._seen_version = version
            self._refused.add(version)
            reason = f"v{version}: {exc}"
            self.rejections.append(reason)
            log.warning("atm: refused params %s", reason)
            self.tracker.set_tags(self.run_id, {TAG_CLIENT_REJECTED: reason})
            return
        self._seen_version = version
        self._stage(params)

    def _stage(self, params: ParamsVersion) -> None:
        with self._lock:
            previous = self._staged
            if previous is not None:
                # Values are absolute, so the newer version supersedes; keep its commands too.
                merged = list(dict.fromkeys([*previous.commands, *params.commands]))
                params = params.model_copy(update={"commands": merged})
            self._staged = params

    def _load(self, version: int, *, check_parent: bool) -> ParamsVersion:
        params = load(self.tracker, self.run_id, version, self.spec, self.signing_key)
        if check_parent:
            problem = chain_problem(
                self.tracker, self.run_id, params, self.spec, self.signing_key, self._refused
            )
            if problem:
                raise ParamsRejected(problem)
        return params


def _int_tag(text: str | None) -> int:
    try:
        return int(text) if text else 0
    except ValueError:
        return 0
