"""Crash points, for fault tests only: the daemon kills itself at a named point of a decision.

``ATM_TEST_CRASH_AT=<point>[:<nth>]`` makes the process SIGKILL itself the ``nth`` time
(default: the first) it reaches ``<point>``, to prove that a daemon dying there loses no
decision and issues none twice. The variable is read once, at import; unset (always, outside
tests) every call is a comparison and nothing else. Not a setting: no flag, no Helm value.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

ENV = "ATM_TEST_CRASH_AT"

# The points of one decision, in the order a decision reaches them.
POINTS = (
    "after_read",  # the run's new points are read
    "after_answer",  # the policy (the model) answered
    "after_params",  # the params file is written
    "after_audit",  # the audit record is written
    "before_tag",  # an issued decision, about to set the version tag
    "after_tag",  # the version tag is set
)


def _parse(raw: str | None) -> tuple[str, int] | None:
    if not raw:
        return None
    point, _, nth = raw.partition(":")
    if point not in POINTS or (nth and not nth.isdigit()):
        raise ValueError(f"{ENV}={raw!r}: expected <point>[:<nth>], point one of {POINTS}")
    return point, int(nth or 1)


_target = _parse(os.environ.get(ENV))
_reached = 0
_lock = threading.Lock()


def crash_point(point: str) -> None:
    """Die here with SIGKILL when ``ATM_TEST_CRASH_AT`` names this point (and its turn)."""
    global _reached
    if _target is None or _target[0] != point:
        return
    with _lock:
        _reached += 1
        if _reached != _target[1]:
            return
    log.warning("%s=%s: killing this process at %s", ENV, os.environ.get(ENV), point)
    _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
