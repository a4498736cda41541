"""The HTTP port of the daemon: ``/metrics``, ``/livez``, ``/readyz``, served from its event loop.

A minimal, strict HTTP/1.1 server on ``asyncio.start_server``: one ``GET`` per connection
(``Connection: close``), ``405`` for any other method, ``404`` for any other path, ``400`` for a
request that is not HTTP/1.x. It runs on the daemon's own event loop, so ``/livez`` answering
means the loop is alive, and nothing a client does can stall the tick:

* the request head must arrive within ``timeout`` seconds and fit in ``max_request`` bytes
  (else the connection is closed);
* the response must be taken by the client within ``timeout`` seconds (else it is aborted);
* at most ``max_connections`` are served at once; more are closed at once (reset).

Rendering the page is the caller's ``metrics()`` (cheap by design, see :mod:`metricsd.exposition`);
an exception in it is a bug: logged, answered ``500``, and the daemon goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

__all__ = ["Probes"]

log = structlog.get_logger(__name__)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"


class Probes:
    """The HTTP server; ``start()`` binds (``port`` 0: a free port, see :attr:`port`)."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Callable[[], bytes],
        not_ready: Callable[[], str | None],
        *,
        timeout: float = 5.0,
        max_request: int = 8192,
        max_connections: int = 16,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.metrics = metrics
        self.not_ready = not_ready
        self.timeout = timeout
        self.max_request = max_request
        self.max_connections = max_connections
        self.requests = 0
        self.refused = 0  # connections beyond max_connections
        self._server: asyncio.Server | None = None
        self._active: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The bound port (the one chosen by the system when ``port`` was 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the HTTP server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = "[::1]" if host == "::" else f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.requested_port, limit=self.max_request
        )

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._active):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._active) >= self.max_connections:
            # Cut at once: answering would mean reading its request first, i.e. holding it.
            self.refused += 1
            writer.transport.abort()
            return
        self._active.add(writer)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return  # slow, truncated or oversized: no answer is owed
            self.requests += 1
            writer.write(self._respond(head))
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (TimeoutError, OSError):
            writer.transport.abort()
        finally:
            self._active.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), self.timeout)

    def _respond(self, head: bytes) -> bytes:
        line = head.split(b"\r\n", 1)[0]
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(400, b"bad request\n", _TEXT)
        method, target = parts[0], parts[1]
        if method != b"GET":
            return _response(405, b"only GET\n", _TEXT, extra=b"Allow: GET\r\n")
        path = target.split(b"?", 1)[0]
        if path == b"/metrics":
            try:
                body = self.metrics()
            except Exception:
                log.exception("metrics_render_failed")
                return _response(500, b"could not render the metrics\n", _TEXT)
            return _response(200, body, CONTENT_TYPE_PLAIN_0_0_4)
        if path == b"/livez":
            return _response(200, b"ok\n", _TEXT)
        if path == b"/readyz":
            reason = self.not_ready()
            if reason is None:
                return _response(200, b"ready\n", _TEXT)
            return _response(503, reason.encode() + b"\n", _TEXT)
        return _response(404, b"not found\n", _TEXT)


def _response(status: int, body: bytes, content_type: str, *, extra: bytes = b"") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    ).encode()
    return head + extra + b"\r\n" + body
