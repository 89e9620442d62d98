"""Reading a JSON artifact that anyone with write access to the tracker may have put there.

Every file the manager reads back (the spec, params versions, audit records) is small: a params
file is under 10 KB, an audit record tens of KB. What is read is held to that before it is
parsed, and parsed strictly: a file too large, nested too deep, or holding a number JSON cannot
carry (``NaN``, ``Infinity``, ``1e309``; an integer over Python's 4,300 digits) is refused
with a reason, as ``CorruptArtifact``, rather than parsed at length on a thread beside training, or
accepted and left to fail later where nothing expects it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from integrations.trackers.base import CorruptArtifact

# Far above any file the manager writes, far below what would stall or bloat a process.
MAX_BYTES = 1 << 20
# The manager's files nest a few levels (an audit record's telemetry: five or six).
MAX_DEPTH = 32


def too_large(size: int, where: str) -> CorruptArtifact | None:
    """The refusal of an artifact of ``size`` bytes, or None if it may be read."""
    if size <= MAX_BYTES:
        return None
    return CorruptArtifact(f"{where} is {size:,} bytes, over the {MAX_BYTES:,}-byte limit")


def parse(raw: bytes, where: str) -> Any:
    """The JSON value in ``raw``; raises CorruptArtifact (naming ``where``) when it is too
    large, not UTF-8 JSON, nested too deep, or holds a number out of JSON's range."""
    if (refused := too_large(len(raw), where)) is not None:
        raise refused
    try:
        value = json.loads(
            raw.decode("utf-8"),
            parse_constant=_constant,
            parse_float=_float,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # json.JSONDecodeError is a ValueError, as are the refusals below.
        raise CorruptArtifact(f"{where} is not valid JSON: {exc}") from exc
    if _depth(value) > MAX_DEPTH:
        raise CorruptArtifact(f"{where} nests deeper than {MAX_DEPTH} levels")
    return value


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _depth(value: Any) -> int:
    """How deep containers nest in ``value`` (a scalar: 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((child, depth) for child in node)
    return deepest
