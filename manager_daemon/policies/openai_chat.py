"""A ``ChatModel`` over any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp…).

The answer is constrained as strictly as the server allows: ``response_format`` json_schema,
else json_object, else a forced tool call. With ``mode="auto"`` the first mode a server
accepts is remembered.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

import openai

from integrations.redact import redact
from manager_daemon.policies.chat import ChatError, ChatResult


class ResponseMode(StrEnum):
    """How a server is asked to keep to the answer's schema; auto tries them in order."""

    AUTO = "auto"
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    TOOLS = "tools"


MODES = (ResponseMode.JSON_SCHEMA, ResponseMode.JSON_OBJECT, ResponseMode.TOOLS)


def _without(schema: Any, key: str) -> Any:
    """``schema`` without ``key`` anywhere (strict servers refuse some keywords)."""
    if isinstance(schema, dict):
        return {k: _without(v, key) for k, v in schema.items() if k != key}
    if isinstance(schema, list):
        return [_without(v, key) for v in schema]
    return schema


class OpenAIChat:
    """Chat completions through the ``openai`` client."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        mode: str = ResponseMode.AUTO,
        max_tokens: int = 300,
    ) -> None:
        try:
            self.mode = ResponseMode(mode)
        except ValueError:
            expected = ", ".join(m.value for m in ResponseMode)
            raise ValueError(f"unknown response mode {mode!r}: expected {expected}") from None
        self.name = model
        self.max_tokens = max_tokens
        # Retries are the policy's business: one retry with the validation error, then fallback.
        self._api_key = api_key
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "not-needed", max_retries=0
        )

    def complete(
        self, messages: list[dict[str, Any]], schema: dict[str, Any], *, timeout: float
    ) -> ChatResult:
        try:
            return self._complete(messages, schema, timeout)
        except ChatError as exc:
            # A server may echo the key or the endpoint's credentials back in its error.
            safe = redact(str(exc).partition(": ")[2], [self._api_key])
            raise ChatError(exc.kind, safe) from None

    def _complete(
        self, messages: list[dict[str, Any]], schema: dict[str, Any], timeout: float
    ) -> ChatResult:
        modes = MODES if self.mode is ResponseMode.AUTO else (self.mode,)
        for i, mode in enumerate(modes):
            try:
                result = self._call(mode, messages, schema, timeout)
            except openai.BadRequestError as exc:
                if i + 1 < len(modes):
                    continue  # this server does not take this mode; try the next
                raise ChatError("bad_request", _message(exc)) from exc
            except openai.APITimeoutError as exc:
                raise ChatError("timeout", f"no answer within {timeout:g} s") from exc
            except openai.RateLimitError as exc:
                raise ChatError("rate_limited", _message(exc)) from exc
            except openai.APIStatusError as exc:
                raise ChatError("server_error", f"HTTP {exc.status_code}: {_message(exc)}") from exc
            except openai.APIConnectionError as exc:
                raise ChatError("unavailable", _message(exc)) from exc
            self.mode = mode
            return result
        raise ChatError("bad_request", "no response mode accepted")  # pragma: no cover

    def _call(
        self, mode: str, messages: list[dict[str, Any]], schema: dict[str, Any], timeout: float
    ) -> ChatResult:
        kwargs: dict[str, Any] = {}
        if mode == "json_schema":
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "decision",
                    "schema": _without(schema, "maxLength"),
                    # Not strict: strict mode wants every property required, and the knobs
                    # are optional. Servers that decode under the schema still enforce it.
                    "strict": False,
                },
            }
        elif mode == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        else:
            kwargs["tools"] = [
                {"type": "function", "function": {"name": "decide", "parameters": schema}}
            ]
            kwargs["tool_choice"] = {"type": "function", "function": {"name": "decide"}}
        response = self.client.chat.completions.create(
            model=self.name,
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=self.max_tokens,
            timeout=timeout,
            **kwargs,
        )
        if not response.choices:
            raise ChatError("server_error", "the answer has no choices")
        message = response.choices[0].message
        if mode == "tools" and message.tool_calls:
            text = message.tool_calls[0].function.arguments  # type: ignore[union-attr]
        else:
            text = message.content or ""
        usage = response.usage
        return ChatResult(
            text=text,
            model=response.model or self.name,
            mode=mode,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )


def _message(exc: openai.APIError) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
        return json.dumps(body)[:300]
    return str(exc)[:300]
