"""The seam between the LLM policy and a model: one call, a JSON schema, a text answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

ChatErrorKind = Literal["timeout", "rate_limited", "server_error", "unavailable", "bad_request"]


class ChatError(RuntimeError):
    """A model call failed; ``kind`` says how, for the audit record and the fallback."""

    def __init__(self, kind: ChatErrorKind, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass
class ChatResult:
    """A model's raw answer and what it cost."""

    text: str
    model: str
    mode: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    # A choosing model's score for each listed answer, in order (mean token log-likelihood).
    scores: list[float] = field(default_factory=list)


class ChatModel(Protocol):
    """A chat model that answers under a JSON schema (strictly, where it can)."""

    name: str

    def complete(
        self, messages: list[dict[str, Any]], schema: dict[str, Any], *, timeout: float
    ) -> ChatResult: ...
