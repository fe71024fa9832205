"""A loopback TCP proxy that can lose answers: it forwards a request, then hangs up instead of answering.

That is what a client sees when a connection drops after the server committed a request: the
outcome is unknown, and only an idempotent retry is safe.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from types import TracebackType

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_IDEMPOTENCY_KEY = re.compile(rb"\r\nidempotency-key:\s*(\S+)", re.IGNORECASE)


def read_message(sock: socket.socket) -> bytes:
    """One HTTP/1.1 message with a Content-Length body (or none), read whole from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = _CONTENT_LENGTH.search(head)
    length = int(m.group(1)) if m else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class DroppingProxy:
    """Forwards loopback HTTP/1.1 connections to `127.0.0.1:target_port`, one request at a time.

    `drop` lists regular expressions: the first request whose request line matches one of them
    (each pattern is used once) is forwarded, the server's whole answer is read, and the client's
    connection is closed without it (with `hang`, kept open and silent until the client gives
    up). Every other request is answered as usual. `requests` lists every request forwarded (its
    request line and idempotency key); `dropped` the answers the client never saw.
    """

    def __init__(self, target_port: int, drop: list[str] | None = None, *, hang: bool = False) -> None:
        self.target_port = target_port
        self._drop = [re.compile(p) for p in drop or []]
        self._hang = hang
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str | None]] = []
        self.dropped: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take_drop(self, line: str) -> bool:
        with self._lock:
            for i, pattern in enumerate(self._drop):
                if pattern.search(line):
                    del self._drop[i]
                    return True
        return False

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        with self._lock:
            self._sockets += [client, upstream]
        try:
            while True:
                request = read_message(client)
                if not request:
                    break
                line = request.split(b"\r\n", 1)[0].decode(errors="replace")
                key = _IDEMPOTENCY_KEY.search(request.partition(b"\r\n\r\n")[0])
                with self._lock:
                    self.requests.append((line, key.group(1).decode() if key else None))
                drop = self._take_drop(line)
                upstream.sendall(request)
                answer = read_message(upstream)
                if drop:
                    with self._lock:
                        self.dropped.append(answer)
                    while self._hang and client.recv(65536):
                        pass  # say nothing until the client hangs up
                    break
                client.sendall(answer)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        """Stops accepting and closes every connection."""
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> DroppingProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
