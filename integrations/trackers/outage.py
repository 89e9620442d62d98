"""Quiet retries while an outage of the tracker is reported.

The daemon and the training-side client each say once that the tracker is unreachable and
once that it answers again. In between, the warning a tracker SDK's HTTP client logs at each
retry (urllib3's "Retrying (Retry(...)) after connection broken by ...") only repeats what was
said, every tick or poll, for as long as the outage lasts: it is left out of the logs. Nothing
is filtered before the first report, so a process that never reports an outage (an import
without ``atm run``) is left as it was.
"""

from __future__ import annotations

import logging
import threading
import weakref

# The logger and the message of urllib3's warning, logged before each retry of a request.
_HTTP_LOGGER = "urllib3.connectionpool"
_RETRY_WARNING = "Retrying ("

_lock = threading.Lock()
# Those that reported an outage not yet over; one that is gone reports nothing any more.
_reporters: weakref.WeakSet[object] = weakref.WeakSet()
_installed = False


class _QuietRetries(logging.Filter):
    """Drops the HTTP client's retry warnings while an outage is reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_reporters and str(record.msg).startswith(_RETRY_WARNING))


def outage_reported(reporter: object) -> None:
    """``reporter`` (the daemon, a client) has said that the tracker is unreachable."""
    global _installed
    with _lock:
        _reporters.add(reporter)
        if not _installed:
            logging.getLogger(_HTTP_LOGGER).addFilter(_QuietRetries())
            _installed = True


def outage_over(reporter: object) -> None:
    """``reporter`` has said that the tracker answers again, or stopped (closed)."""
    with _lock:
        _reporters.discard(reporter)
