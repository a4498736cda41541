"""A test-only TCP proxy on loopback that can be cut (every connection dropped, new ones refused)
and restored, to make a broker unreachable for a while without stopping it.

It can also hold the broker's replies on the connection that carried a given Produce request
(``hold_after_produce``): the request reaches the broker (which stores the records) but its ack
never comes back, so a cut right after it always finds that publish in flight. Requests from the
client are read as Kafka frames (4-byte size, then api_key, api_version, correlation id) for this;
bytes are forwarded unchanged either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading

from metricsd.devbroker import free_port

_PRODUCE = 0


class _Conn:
    """One proxied connection; ``held`` stops the broker->client direction."""

    def __init__(self) -> None:
        self.held = False


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target`` in a background thread with its own event loop."""

    def __init__(self, target: str, port: int | None = None) -> None:
        host, _, target_port = target.rpartition(":")
        self.target = (host, int(target_port))
        self.port = port if port is not None else free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self._hold_topic: bytes | None = None
        #: Set once a Produce request to the armed topic was forwarded and its replies held.
        self.held = threading.Event()
        #: Replies (bytes) from the broker dropped because their connection was held.
        self.held_bytes = 0

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def hold_after_produce(self, topic: str) -> None:
        """Arm: the next Produce request naming ``topic`` is forwarded, then every reply on its
        connection is dropped (no ack) until the connection goes; ``held`` is set. Once."""
        self.held.clear()
        self._hold_topic = topic.encode()

    def _matches(self, frame: bytes) -> bool:
        if self._hold_topic is None or len(frame) < 2:
            return False
        (api_key,) = struct.unpack(">h", frame[:2])
        name = self._hold_topic
        # The topic name as a STRING (int16 length) or, in flexible versions, a COMPACT_STRING.
        encoded = (struct.pack(">h", len(name)) + name, bytes([len(name) + 1]) + name)
        return api_key == _PRODUCE and any(e in frame for e in encoded)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        conn = _Conn()

        async def requests() -> None:
            """Client -> broker, frame by frame (to see Produce requests)."""
            with contextlib.suppress(OSError, asyncio.CancelledError, asyncio.IncompleteReadError):
                while True:
                    size = await reader.readexactly(4)
                    frame = await reader.readexactly(struct.unpack(">i", size)[0])
                    up_writer.write(size + frame)
                    await up_writer.drain()
                    if self._matches(frame):
                        self._hold_topic = None
                        conn.held = True
                        self.held.set()
            up_writer.close()

        async def replies() -> None:
            """Broker -> client, unless held."""
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await up_reader.read(65536):
                    if conn.held:
                        self.held_bytes += len(data)
                        continue
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(requests(), replies())
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        """Drop every connection and stop listening: clients see a dead broker."""
        self._call(self._cut())

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        """Listen again on the same port."""
        self._call(self._listen())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
