"""A loopback TCP proxy for fault tests: forwards to a local port, and can delay, reset or
drop the connections it is given.

``mode``: ``"pass"`` forwards; ``"slow"`` forwards after ``delay_s`` (each request waits that
long, on connections already open too); ``"reset"`` answers new connections with a TCP reset;
``"drop"`` accepts new connections and never answers (a black hole), until the connection is
closed by the client or the proxy. Entering ``reset`` or ``drop`` ends the connections already
open, so that pooled keep-alive connections meet the fault too. Loopback only; at most ``max_connections`` at once, the rest reset.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import struct
import threading
import time
from typing import Literal

log = logging.getLogger(__name__)

Mode = Literal["pass", "slow", "reset", "drop"]


class TcpProxy:
    def __init__(self, target_port: int, *, max_connections: int = 64) -> None:
        self.target = ("127.0.0.1", target_port)
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.max_connections = max_connections
        self.connections = 0
        self._open: set[socket.socket] = set()  # forwarded connections, both ends
        self._held: set[socket.socket] = set()  # dropped ones, unanswered
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: Mode, delay_s: float = 0.0) -> None:
        """Faults from now on; connections already open keep theirs, except that leaving
        ``drop`` closes the held ones."""
        self.mode, self.delay_s = mode, delay_s
        if mode != "drop":
            self._close_held()
        if mode in ("reset", "drop"):
            # Pooled keep-alive connections would dodge the fault: end them, so that the next
            # request opens a new connection and meets it.
            with self._lock:
                open_now = list(self._open)
            for sock in open_now:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self._listener.close()
        self._close_held(everything=True)

    # ---- inside ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with self._lock:
                full = len(self._open) + len(self._held) >= 2 * self.max_connections
            mode = "reset" if full else self.mode
            if mode == "reset":
                _reset(client)
                continue
            if mode == "drop":
                with self._lock:  # held open, unanswered, until the mode changes or it closes
                    self._held.add(client)
                continue
            with self._lock:
                self._open.add(client)
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._forget(client)
            _reset(client)
            return
        with self._lock:
            self._open.add(upstream)
        peer = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            for sock in peer:
                selector.register(sock, selectors.EVENT_READ)
            try:
                while not self._closing.is_set():
                    for key, _ in selector.select(timeout=0.2):
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        data = sock.recv(65536)
                        if not data:
                            return
                        # Slow while the mode is slow, for connections already open too.
                        if sock is client and self.mode == "slow":
                            time.sleep(self.delay_s)
                        peer[sock].sendall(data)
            except (OSError, ValueError):
                return
            finally:
                for sock in peer:
                    self._forget(sock)
                    with contextlib.suppress(OSError):
                        sock.close()

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)

    def _close_held(self, everything: bool = False) -> None:
        with self._lock:
            held, self._held = self._held, set()
            if everything:
                held |= self._open
        for sock in held:
            _reset(sock)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0) rather than an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
