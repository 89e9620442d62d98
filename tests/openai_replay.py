"""An OpenAI-compatible HTTP server on loopback that replays scripted answers.

Each POST to ``/v1/chat/completions`` takes the next scripted ``Reply``: its HTTP status, the
message content (or a tool call), and an optional delay. Requests are kept for assertions.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
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

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                reply = server.replies.pop(0) if server.replies else Reply(status=500)
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
