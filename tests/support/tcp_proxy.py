"""A loopback TCP relay a test can cut and restore, to take a shared server "down" for one client.

Cutting closes every relayed connection and stops listening (new connections are refused), which
is what a client sees when its broker goes away; restoring listens again on the same port. The
real server behind it is never touched, so other tests keep using it.

The proxy remembers what the server sent in the last `RECENT_SECONDS` before each cut: a reply in
flight when a connection drops may never be read by its client, and a test can ask whether some
bytes (a message's id) were among them (`sent_just_before_a_cut`).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from types import TracebackType

RECENT_SECONDS = 2.0  # how long before a cut a server's reply counts as possibly in flight


class TcpProxy:
    """Relays 127.0.0.1:<port> to `upstream`; `cut()` / `restore()` simulate an outage."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._from_server: deque[tuple[float, bytes]] = deque()  # (when read, bytes) of the last seconds
        self._before_cuts: list[bytes] = []  # what the server sent in the seconds before each cut
        self.port = 0
        self.restore()

    def restore(self) -> None:
        """Listen (again, on the same port once chosen) and relay new connections."""
        listener = socket.create_server(("127.0.0.1", self.port))
        listener.settimeout(0.1)  # lets the accept loop notice a cut without relying on close() waking it
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and drop every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            doomed, self._sockets = self._sockets, set()
            self._before_cuts.append(b"".join(data for _, data in self._from_server))
            self._from_server.clear()
        for sock in ([listener] if listener else []) + list(doomed):
            _close(sock)

    def close(self) -> None:
        self.cut()

    def sent_just_before_a_cut(self, needle: bytes) -> bool:
        """Whether the server sent `needle` to a client in the seconds before any cut so far."""
        with self._lock:
            return any(needle in sent for sent in self._before_cuts)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            for sock in (client, server):
                sock.settimeout(None)
            with self._lock:
                self._sockets |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink, source is server), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_server:
                    self._remember(data)
                sink.sendall(data)
        except OSError:
            pass  # the other side or a cut closed it
        finally:
            for sock in (source, sink):
                _close(sock)
            with self._lock:
                self._sockets -= {source, sink}

    def _remember(self, data: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            self._from_server.append((now, data))
            while self._from_server[0][0] < now - RECENT_SECONDS:
                self._from_server.popleft()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
