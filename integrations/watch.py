"""Whether a run logs its objective, as the training-side client sees it.

A run whose objective is never logged gets no decisions: the objective misspelled
(``minimize:val_los``), or left at the default ``eval_loss`` by a loop that logs
``val_loss``. The client says so once, in its output, naming the keys the run does log and
the closest one (``integrations.health.objective_missing``):

- at the first poll after an evaluation reported to the integration without the objective
  (a Trainer's, SB3's, ``TorchKnobs.evaluated``) when the run has not logged it either;
- for a loop that reports no evaluations, once the run has logged other metrics for
  ``grace_s`` seconds (``ATM_OBJECTIVE_GRACE``) without it: an evaluation usually comes
  within minutes of the first training metrics, so an objective simply logged later than
  them is not reported at once;
- at the client's last poll (the end of training), for a run shorter than that.

If the objective turns up after all, that is said too, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from integrations.health import closest, objective_missing, script_keys
from integrations.protocol import (
    TAG_DAEMON_LEASE,
    TAG_HEALTH,
    Health,
    HealthState,
    Lease,
    Objective,
)


class ObjectiveWatch:
    """Says once when the objective's metric is missing from what a run logs, and once when
    it arrives.

    ``evaluated`` is called on the training thread, ``polled`` on the client's poller.
    """

    def __init__(
        self, objective: Objective, grace_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.objective = objective
        self.metric = objective.metric
        self.grace_s = grace_s
        self._clock = clock
        self._seen = False
        self._said_missing = False
        # When a poll first saw metrics of the script's own.
        self._logging_since: float | None = None
        # The keys of an evaluation reported without the objective.
        self._evaluation_keys: frozenset[str] | None = None

    def evaluated(self, keys: Iterable[str]) -> None:
        """An evaluation was reported with these metric keys (none: it said nothing)."""
        keys = frozenset(keys)
        if self.metric in keys:
            self._seen = True
        elif keys:
            self._evaluation_keys = keys

    def said_elsewhere(self) -> None:
        """The missing objective was said another way (the daemon's health): not again."""
        if not self._seen:
            self._said_missing = True

    def polled(self, logged: Iterable[str], *, last: bool = False) -> str | None:
        """What to tell the user after a poll that read the keys the run has ``logged`` (the
        client's ``last`` poll: the end of training), or None."""
        logged = set(logged)
        if self._seen or self.metric in logged:
            self._seen = True
            if not self._said_missing:
                return None
            self._said_missing = False
            return f"{self.metric} is logged now; the manager can decide ({self.objective})"
        if self._said_missing:
            return None
        if self._logging_since is None and script_keys(logged):
            self._logging_since = self._clock()
        evaluation = self._evaluation_keys
        waited = self._logging_since is not None and (
            self._clock() - self._logging_since >= self.grace_s
        )
        if not (last or waited or evaluation is not None):
            return None
        self._said_missing = True
        return self._missing(logged | (evaluation or set()))

    def _missing(self, logged: set[str]) -> str:
        """The health line, and what to do about it."""
        reason = objective_missing(self.metric, logged)
        health = Health(state=HealthState.WAITING_OBJECTIVE, reason=reason)
        match = closest(self.metric, script_keys(logged))
        if match is None:
            fix = "give the objective as a metric the run logs"
        else:
            fix = f"if {match} is the objective, give it as {self.objective.direction}:{match}"
        return f"{health}. No decisions until {self.metric} is logged; {fix}"


# How long a published run may go without any daemon looking at it before the client says so.
NO_DAEMON_S = 120.0
# How long the daemon must have found the objective missing before the client repeats it (the
# daemon's own log waits as long).
OBJECTIVE_WAIT_S = 60.0


class DaemonWatch:
    """Says in the training process what the daemon says of the run (its health, once per
    state), and when no daemon is watching the run at all.

    A daemon that sees a run writes its health tag; one that supervises it holds its lease.
    A missing objective is said once the daemon has found it missing for a minute, unless the
    objective watch (``ObjectiveWatch``) said it first.
    Neither, ``grace_s`` after the client published the run, means that no daemon runs on this
    tracker (or none watches this run's experiment): decisions will never come.
    """

    def __init__(self, grace_s: float = NO_DAEMON_S, clock: Callable[[], float] = time.time):
        self.grace_s = grace_s
        self._clock = clock
        self._since = clock()
        self._said: set[HealthState] = set()
        self._said_unwatched = False
        self._waiting_since: float | None = None

    def objective_said(self) -> None:
        """The objective watch has said that the objective is missing: not again here."""
        self._said.add(HealthState.WAITING_OBJECTIVE)

    @property
    def said_objective_missing(self) -> bool:
        return HealthState.WAITING_OBJECTIVE in self._said

    def polled(self, tags: dict[str, str], *, last: bool = False) -> list[str]:
        """What to tell the user after a poll that read the run's ``tags`` (the client's
        ``last`` one: training has ended)."""
        said: list[str] = []
        watched = self._watched(tags)
        waited = self._clock() - self._since
        if not watched and not self._said_unwatched and last and waited < self.grace_s:
            self._said_unwatched = True
            said.append(
                f"the run ended after {waited:.0f} s, before any daemon looked at it: nothing "
                "was supervised (a daemon looks at its runs every tick, 10 s by default)"
            )
        elif not watched and not self._said_unwatched and waited >= self.grace_s:
            self._said_unwatched = True
            said.append(
                f"no daemon has looked at this run in {self.grace_s / 60:.0f} min, so no decision "
                "will come: start `atm daemon` on this tracker (for this run's experiment)"
            )
        elif watched and self._said_unwatched:
            self._said_unwatched = False
            said.append("a daemon is watching this run now")
        health = Health.parse(tags.get(TAG_HEALTH))
        if health is None or not watched:
            return said
        if health.state is HealthState.WAITING_OBJECTIVE:
            # Before its first evaluation every run waits for its objective: said here only
            # once the daemon has found it missing for a while (or at the end), unless the
            # objective watch said it first.
            if self._waiting_since is None:
                self._waiting_since = self._clock()
            long = self._clock() - self._waiting_since >= OBJECTIVE_WAIT_S
            if not (long or last) or health.state in self._said:
                return said
        else:
            self._waiting_since = None
        if not health.ok and health.state not in self._said:
            self._said.add(health.state)
            self._said.discard(HealthState.DECIDING)
            said.append(f"the manager says: {health}")
        elif health.ok and self._said and HealthState.DECIDING not in self._said:
            self._said.add(HealthState.DECIDING)
            said.append("the manager is deciding for this run again")
        return said

    def _watched(self, tags: dict[str, str]) -> bool:
        lease = Lease.parse(tags.get(TAG_DAEMON_LEASE))
        if lease is not None:
            return self._clock() - lease.renewed_at <= 2 * lease.ttl_s
        return TAG_HEALTH in tags


class RunSteps:
    """The step a run logs its metrics at, where that is not the training step.

    A script that logs per epoch (``mlflow.log_metrics(..., step=epoch)``) counts its steps on
    a scale of its own, while the framework hands the client optimizer steps. The daemon reads
    the run's steps, so a version recorded at an optimizer step would sit far beyond every
    evaluation, and its outcome would never be measured. Where the run's latest step is far
    below the training step, a version is recorded at the next step the run logs; the user is
    told once.
    """

    # The run's latest step is this many times below the training step: another scale.
    RATIO = 4
    # Steps the run must have logged before its scale is judged (a metric logged once at
    # step 0 says nothing of it).
    MIN_RUN_STEP = 3

    def __init__(self) -> None:
        self.run_step: int | None = None
        self.other_scale = False
        self._said = False

    def polled(self, latest_steps: dict[str, int], training_step: int | None) -> str | None:
        """Judge the run's scale from a poll; what to tell the user, the first time."""
        steps = [latest_steps[k] for k in script_keys(latest_steps)]
        if not steps or training_step is None:
            return None
        self.run_step = max(steps)
        self.other_scale = (
            self.run_step >= self.MIN_RUN_STEP and self.run_step * self.RATIO < training_step
        )
        if self.other_scale and not self._said:
            self._said = True
            return (
                f"the run logs its metrics at step {self.run_step} while training has taken "
                f"{training_step} steps (a step per epoch?): versions are recorded at the "
                "run's own steps, so the manager can measure what each did"
            )
        return None

    def step(self, training_step: int) -> int:
        """The step to record a version applied at ``training_step`` at."""
        if self.other_scale and self.run_step is not None:
            return self.run_step + 1
        return training_step
