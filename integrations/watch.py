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
from integrations.protocol import Health, HealthState, Objective


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
