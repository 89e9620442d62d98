"""Credentials out of everything shown or written: messages, logs, tables, audit records.

A tracker or endpoint URI may carry ``user:password@``; an error from a server may echo a key.
Whatever text is built from them passes through ``redact`` first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

# User info runs to the "@" that ends it: RFC 3986 allows any sub-delimiter in it (quotes,
# parentheses, "!$&*+,;="), so only what ends an authority or a word stops it.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]+@")
# An Authorization header's value, as a server may echo it.
_AUTHORIZATION = re.compile(r"\b(?P<kind>Bearer|Basic)\s+[^\s'\",;]+")
MASK = "***"


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with the user info of every URI in it masked, every credential that follows
    ``Bearer`` or ``Basic``, and each of ``secrets``."""
    text = _USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    text = _AUTHORIZATION.sub(rf"\g<kind> {MASK}", text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """A handler's filter that passes every record on with ``redact``-ed text, whichever
    library logged it (an HTTP client logs the URLs it requests, user info and all)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = redact(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True
