"""A TLS terminator for the integration tests, written with Python's ``ssl`` and asyncio.

Tansu 0.6.0 serves no TLS itself (``--cert`` with ``--key`` is refused, ``--cert`` alone still
serves plaintext), so TLS is terminated here and the broker advertises this terminator's address.
It does what stunnel did before (and needs no system package): accept TLS on
``127.0.0.1:<free port>`` with the server certificate, optionally require a client certificate
signed by a given CA (mutual TLS), and pipe the plaintext to ``target`` unchanged. The server side
is OpenSSL through the ``ssl`` module, so a refused handshake ends with the same TLS alerts
(``certificate required``, ``unknown ca``) a client sees from any OpenSSL-based terminator.

It runs on its own event loop in a daemon thread of the test process (like ``TcpProxy`` and
``SaslFront``), so daemon subprocesses, librdkafka and aiokafka clients can all use it. Each
connection and each refused handshake is written to ``log_path`` for failure messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections import Counter
from pathlib import Path
from types import TracebackType

from metricsd.devbroker import free_port
from pki import Pki

__all__ = ["TlsTerminator"]

_HOST = "127.0.0.1"
_HANDSHAKE_TIMEOUT_S = 30.0


class TlsTerminator:
    """TLS on ``address`` forwarded as plaintext to ``target`` (``host:port``). With
    ``client_ca``, clients must present a certificate signed by it (mutual TLS). ``handshakes``
    counts finished handshakes by outcome (``ok`` / ``failed``). Use as a context manager."""

    def __init__(
        self, target: str, pki: Pki, directory: Path, *, client_ca: Path | None = None
    ) -> None:
        self.port = free_port()
        self.address = f"{_HOST}:{self.port}"
        self.target = target
        self.log_path = directory / f"tls-{self.port}.log"
        self.handshakes: Counter[str] = Counter()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(pki.server_cert, pki.server_key)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=client_ca)
        self._context = context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()

    def _log(self, message: str) -> None:
        with self._lock, self.log_path.open("a") as log:
            log.write(message + "\n")

    def start(self) -> TlsTerminator:
        """Listen (returns once the port accepts connections)."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, _HOST, self.port), self._loop
        )
        self._server = future.result(timeout=10)
        self._log(f"listening on {self.address}, forwarding to {self.target}")
        return self

    def stop(self) -> None:
        """Close the listener and every connection, stop the thread; idempotent."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        peer = writer.get_extra_info("peername")
        up_writer: asyncio.StreamWriter | None = None
        tls = _Tls(self._context)
        try:
            try:
                async with asyncio.timeout(_HANDSHAKE_TIMEOUT_S):
                    await tls.handshake(reader, writer)
            except (TimeoutError, ssl.SSLError, OSError, asyncio.IncompleteReadError) as exc:
                self.handshakes["failed"] += 1
                self._log(f"{peer}: handshake failed: {exc!r}")
                return
            self.handshakes["ok"] += 1
            host, port = self.target.rsplit(":", 1)
            try:
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
            except OSError as exc:
                self._log(f"{peer}: upstream {self.target} unreachable: {exc!r}")
                return
            self._log(f"{peer}: connected to {self.target}")
            await asyncio.gather(
                tls.decrypt(reader, writer, up_writer), tls.encrypt(up_reader, writer)
            )
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(w.wait_closed(), 5)
            self._tasks.discard(task)  # type: ignore[arg-type]

    def __enter__(self) -> TlsTerminator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Tls:
    """The server side of one TLS connection over memory BIOs. asyncio's own TLS transport drops
    the alert OpenSSL wants to send when it refuses a handshake (the client would see a bare
    reset instead of ``certificate required``), so the bytes are moved by hand: whatever OpenSSL
    has to send, the alert of a refused handshake included, is written before the socket closes.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    async def flush(self, writer: asyncio.StreamWriter) -> None:
        if data := self.outgoing.read():
            writer.write(data)
            await writer.drain()

    async def handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    self.obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self.flush(writer)
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionResetError("peer closed during the handshake") from None
                    self.incoming.write(data)
        finally:
            with contextlib.suppress(OSError):
                await self.flush(writer)  # the server's last flight, or its alert

    async def decrypt(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """TLS records from the client, as plaintext to the broker, until either side ends."""
        with contextlib.suppress(OSError, ssl.SSLError):
            while True:  # records may have come with the handshake's last flight: read them first
                while True:
                    try:
                        chunk = self.obj.read(65536)
                    except ssl.SSLWantReadError:
                        break
                    if not chunk:  # the client's close_notify: answer it (see close_notify)
                        await self.close_notify(writer)
                        up_writer.close()
                        return
                    up_writer.write(chunk)
                await self.flush(writer)  # e.g. a key update's answer
                await up_writer.drain()
                data = await reader.read(65536)
                if not data:
                    break
                self.incoming.write(data)
        up_writer.close()

    async def encrypt(self, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Plaintext from the broker, as TLS records to the client, until either side ends."""
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await up_reader.read(65536):
                view = memoryview(data)
                while view:  # SSLObject.write may take less than all of it
                    view = view[self.obj.write(view) :]
                await self.flush(writer)
        await self.close_notify(writer)
        writer.close()

    async def close_notify(self, writer: asyncio.StreamWriter) -> None:
        """Send close_notify. Python's own TLS clients wait up to 30 s for it after sending
        theirs before they give up the connection (as any TLS server sends it, so must this)."""
        with contextlib.suppress(ssl.SSLError, OSError):
            self.obj.unwrap()
        with contextlib.suppress(OSError):
            await self.flush(writer)
