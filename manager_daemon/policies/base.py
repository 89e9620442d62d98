"""The policy interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from integrations.protocol import Proposal, Source
from manager_daemon.telemetry import Snapshot
from manager_daemon.validation import Menu


@dataclass
class PolicyAnswer:
    """A proposal and everything the audit record needs to explain it."""

    proposal: Proposal
    model: str | None = None
    prompt: str | None = None
    raw_response: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    # Who actually decided, when not the policy itself (an LLM policy falling back to rules).
    source: Source | None = None
    # Why the decision was made by whom it was (the rules acting for a model too slow for the
    # run, say): kept in the audit record.
    note: str | None = None


class Policy(Protocol):
    name: str
    source: Source
    # Who decides on the run's current state when this policy's answer arrives too late to
    # use (None: the late answer is discarded and nothing is done).
    fallback: Policy | None

    def propose(self, snapshot: Snapshot, menu: Menu) -> PolicyAnswer: ...
