"""A TCP proxy that can cut chosen connections, to make a browser's EventSource reconnect by
itself (Playwright's offline mode leaves open connections alone)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

BUFFER = 65536
SENT_KEPT_BYTES = 65536


@dataclass
class Connection:
    client: socket.socket
    upstream: socket.socket
    # What the client sent (requests on a kept-alive connection follow one another), bounded.
    sent: bytes = b""
    closed: bool = False


@dataclass
class DroppingProxy:
    upstream_port: int
    port: int = 0
    connections: list[Connection] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None

    def start(self) -> DroppingProxy:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, marker: bytes) -> list[bytes]:
        with self._lock:
            return [c.sent for c in self.connections if marker in c.sent]

    def drop(self, marker: bytes, reset: bool = False) -> int:
        """Cut every open connection whose request contains ``marker``; how many were cut.
        ``reset``: with a TCP RST both ways (a network that vanished), not a FIN."""
        with self._lock:
            chosen = [c for c in self.connections if marker in c.sent and not c.closed]
        for c in chosen:
            self._close(c, reset)
        return len(chosen)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            every = list(self.connections)
        for c in every:
            self._close(c)

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            upstream.settimeout(None)
            conn = Connection(client, upstream)
            with self._lock:
                self.connections.append(conn)
            threading.Thread(target=self._pump, args=(conn, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, False), daemon=True).start()

    def _pump(self, conn: Connection, from_client: bool) -> None:
        src, dst = (conn.client, conn.upstream) if from_client else (conn.upstream, conn.client)
        with contextlib.suppress(OSError):
            while data := src.recv(BUFFER):
                if from_client and len(conn.sent) < SENT_KEPT_BYTES:
                    conn.sent += data
                dst.sendall(data)
        self._close(conn)

    def _close(self, conn: Connection, reset: bool = False) -> None:
        with self._lock:
            if conn.closed:
                return  # by drop(), or by the pump of the other direction
            conn.closed = True
        for s in (conn.client, conn.upstream):
            with contextlib.suppress(OSError):
                if reset:
                    # Closing with a zero linger sends RST; shutting down the reading side
                    # (which sends nothing) wakes the pump blocked in recv(), without which
                    # close() would not end the connection.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RD)
                else:
                    s.shutdown(socket.SHUT_RDWR)
            s.close()
