"""An OpenAI-compatible HTTP server on loopback that replays scripted answers.

Each POST to ``/v1/chat/completions`` takes the next scripted ``Reply``: its HTTP status, the
message content (or a tool call), and an optional delay. Once the script is spent, ``answer``
(when given) makes the reply from the request. Requests are kept for assertions.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    content: str = ""
    status: int = 200
    delay_s: float = 0.0
    refuse_response_format: bool = False
    prompt_tokens: int = 900
    completion_tokens: int = 40
    # An error that echoes the request's credentials, as some servers do.
    echo_credentials: bool = False


@dataclass
class ReplayServer:
    replies: list[Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    answer: Callable[[dict[str, Any]], Reply] | None = None

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                reply = server.next_reply(body)
                time.sleep(reply.delay_s)
                if reply.refuse_response_format and "response_format" in body:
                    return self._send(
                        400, {"error": {"message": "response_format is not supported"}}
                    )
                if reply.status != 200:
                    message = f"scripted {reply.status}"
                    if reply.echo_credentials:
                        message += f" for {self.headers.get('Authorization')} at {self.path}"
                    return self._send(reply.status, {"error": {"message": message}})
                message: dict[str, Any] = {"role": "assistant", "content": reply.content}
                if "tools" in body:
                    message = {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "decide", "arguments": reply.content},
                            }
                        ],
                    }
                self._send(
                    200,
                    {
                        "id": "cmpl-1",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "replay"),
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                        "usage": {
                            "prompt_tokens": reply.prompt_tokens,
                            "completion_tokens": reply.completion_tokens,
                            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                        },
                    },
                )

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # The client may have given up already (a timeout test).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def next_reply(self, body: dict[str, Any]) -> Reply:
        if self.replies:
            return self.replies.pop(0)
        return self.answer(body) if self.answer is not None else Reply(status=500)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def halve_lr(start: float) -> Reply:
    """A composed decision: halve the learning rate from ``start``."""
    return Reply(
        json.dumps(
            {
                "action": "adjust",
                "changes": {"learning_rate": start / 2},
                "reason": "halve the learning rate",
                "expect": "smoother loss",
                "watch": "the objective",
            }
        )
    )


def turning_lr(targets: tuple[float, ...] = (0.005, 0.02)) -> Callable[[dict[str, Any]], Reply]:
    """Answers that move the learning rate towards each of ``targets`` in turn: of the
    menu's learning rates (the enum in the request's schema), the one nearest the target.
    Every answer is a change to issue; no action when the learning rate is not on the menu
    (while it settles), and the next answer turns to the next target."""
    turns = itertools.count()

    def answer(body: dict[str, Any]) -> Reply:
        choices = _enum_of("learning_rate", body)
        if not choices:
            decision: dict[str, Any] = {"action": "no_action", "changes": {}}
        else:
            target = targets[next(turns) % len(targets)]
            nearest = min(choices, key=lambda c: abs(math.log(c / target)))
            decision = {"action": "adjust", "changes": {"learning_rate": nearest}}
        texts = {"reason": "try another learning rate", "expect": "a lower loss"}
        return Reply(json.dumps(decision | texts | {"watch": "eval_loss"}))

    return answer


def _enum_of(name: str, node: object) -> list[float]:
    """The enum given for property ``name`` anywhere in a request body."""
    if isinstance(node, dict):
        found = node.get(name)
        if isinstance(found, dict) and isinstance(found.get("enum"), list):
            return [float(v) for v in found["enum"]]
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            if values := _enum_of(name, item):
                return values
    return []
