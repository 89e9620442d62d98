"""Saying what the manager cannot do for a run, in words both sides share.

The daemon works out a run's health from what it reads (``manager_daemon.health``); the client
says what it sees in-process (an objective missing from an evaluation, a run it cannot find).
The reasons below are written once, here, so a user reads the same sentence in the client's
output, the daemon's log, ``atm status`` and the report.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from integrations.protocol import METRIC_PARAMS_VERSION

# How many of a run's metric keys a reason names before "and N more".
_NAMED_KEYS = 8


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name`` (a misspelling, a prefix left out), or None."""
    names = sorted(set(candidates))
    found = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if found:
        return found[0]
    # "val_loss" for "loss", "eval/accuracy" for "accuracy": the name inside a longer one.
    tail = name.rsplit("/", 1)[-1]
    inside = [c for c in names if tail and tail in c]
    return min(inside, key=len) if inside else None


def script_keys(keys: Iterable[str]) -> list[str]:
    """The metric keys a script logged itself: the manager's own markers left out."""
    return sorted(
        k for k in set(keys) if k != METRIC_PARAMS_VERSION and not k.startswith(("atm.", "atm/"))
    )


def objective_missing(metric: str, logged: Iterable[str]) -> str:
    """Why nothing can be decided yet: the objective ``metric`` is not among ``logged``."""
    keys = script_keys(logged)
    if not keys:
        return f"waiting for {metric}: the run has logged no metrics yet"
    named = ", ".join(keys[:_NAMED_KEYS])
    if len(keys) > _NAMED_KEYS:
        named += f" and {len(keys) - _NAMED_KEYS} more"
    text = f"{metric} never logged; the run logs {named}"
    if (match := closest(metric, keys)) is not None:
        text += f"; closest: {match}"
    return text


def no_tracker_logger(what: str, kind: str, names: Iterable[str], fix: str) -> str:
    """Why a framework's run is not managed: ``what`` (a Lightning Trainer, an Accelerator)
    logs through none of the trackers the manager reads; ``names`` are the ``kind`` (logger,
    tracker) it logs through instead, ``fix`` what the user can do."""
    named = ", ".join(names) or "none"
    return (
        f"{what} logs to no MLflow or W&B {kind} (its {kind}s: {named}); "
        f"the run is not managed — {fix}"
    )
