"""What a process launched by ``atm run`` shares between its hooks and integrations.

``atm run`` passes its options in the ``ATM_RUN`` environment variable (``InjectConfig``);
the hooks installed at start-up keep one ``Session``; the first integration that manages the
process claims it, so the others (the global optimizer hook, above all) stand back. A leaf
module: it imports nothing heavy, so that start-up stays cheap.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

ENV = "ATM_RUN"


@dataclass
class InjectConfig:
    """``atm run``'s options (validated there), as the launched process receives them."""

    objective: str = "minimize:eval_loss"
    poll_interval: float | None = None  # None: the client's setting (ATM_POLL_INTERVAL)
    apply_at: str | None = None  # step, eval or rollout; None: each framework's default
    bounds: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, text: str) -> InjectConfig:
        return cls(**json.loads(text))


class Session:
    """The state the hooks share within one process."""

    def __init__(self, config: InjectConfig) -> None:
        self.config = config
        self.owner: str | None = None  # the integration managing this process
        self.lock = threading.Lock()
        # The lr schedulers built on each optimizer, for a loop managed through its optimizer.
        self.schedulers: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
        self.loop: Any = None
        # What the integrations have told the user, each cause once per process.
        self.said: set[str] = set()

    def claim(self, owner: str) -> None:
        with self.lock:
            if self.owner is None:
                self.owner = owner


_current: Session | None = None


def start(config: InjectConfig) -> Session:
    """The session of this process, started once."""
    global _current
    if _current is None:
        _current = Session(config)
    return _current


def current() -> Session | None:
    """The session, when this process was launched by ``atm run``."""
    return _current


def claim(owner: str) -> None:
    """An integration manages this process: the hooks stand back."""
    if _current is not None:
        _current.claim(owner)
