"""TLS for the integration tests: a throwaway PKI (openssl CLI) and stunnel in front of the broker.

Tansu 0.6.0 serves no TLS itself (``--cert`` with ``--key`` is refused, ``--cert`` alone still
serves plaintext), so TLS is terminated by stunnel (Debian package ``stunnel4``) and the broker
advertises stunnel's address. Both tools are required: a missing one fails the test with the
package to install, it never skips. stunnel runs in the foreground as our child, its log in a file,
and is stopped by PID.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest
from daemon_process import DaemonProcess, LogLine
from metricsd.devbroker import free_port

__all__ = ["FAST_EXIT_S", "Pki", "Stunnel", "expect_auth_failure", "make_pki", "require_tool"]

_HOST = "127.0.0.1"
#: The daemon process exits in about 0.5 s here; a retry loop would take 60 s (ensure_topics).
FAST_EXIT_S = 5.0


def require_tool(*names: str, package: str) -> str:
    """The path of the first of ``names`` on PATH; fails the test naming the Debian package."""
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail(
        f"{' / '.join(names)} not found: install the Debian package {package!r} "
        f"(apt-get install -y {package})",
        pytrace=False,
    )


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate it signed (127.0.0.1 and localhost), a client
    certificate it signed, and an unrelated CA with its own key (the "wrong CA")."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    openssl = require_tool("openssl", package="openssl")
    done = subprocess.run(
        [openssl, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, f"openssl {' '.join(map(str, args))} failed:\n{done.stderr}"


def make_pki(directory: Path) -> Pki:
    """Generate the PEM files of :class:`Pki` in ``directory`` (EC P-256 keys, valid one day)."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for name, subject in (("ca", "metricsd test CA"), ("other-ca", "some other CA")):
        _openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem",
                 "-days", "1", "-subj", f"/CN={subject}", cwd=directory)  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject in (("server", "localhost"), ("client", "metricsd")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={subject}", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=directory)  # fmt: skip
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
        other_key=directory / "other-ca.key",
    )


class Stunnel:
    """stunnel terminating TLS on ``127.0.0.1:<free port>`` (``address``) and forwarding the
    plaintext to ``target`` (``host:port``). With ``client_ca``, clients must present a
    certificate signed by it (mutual TLS). Use as a context manager."""

    def __init__(
        self, target: str, pki: Pki, directory: Path, *, client_ca: Path | None = None
    ) -> None:
        self.port = free_port()
        self.address = f"{_HOST}:{self.port}"
        self.target = target
        self.log_path = directory / f"stunnel-{self.port}.log"
        self._config = directory / f"stunnel-{self.port}.conf"
        lines = [
            "foreground = yes",
            "pid =",
            "syslog = no",
            "debug = 5",
            "[kafka]",
            f"accept = {self.address}",
            f"connect = {target}",
            f"cert = {pki.server_cert}",
            f"key = {pki.server_key}",
        ]
        if client_ca is not None:
            lines += [f"CAfile = {client_ca}", "verifyChain = yes", "requireCert = yes"]
        self._config.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Stunnel:
        """Spawn stunnel and wait until its port accepts TCP connections."""
        binary = require_tool("stunnel4", "stunnel", package="stunnel4")
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [binary, str(self._config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            assert self._proc.poll() is None, f"stunnel exited:\n{self.log()}"
            try:
                socket.create_connection((_HOST, self.port), timeout=0.5).close()
                return self
            except OSError:
                assert time.monotonic() < deadline, f"stunnel not listening:\n{self.log()}"
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL after 5 s; idempotent."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def __enter__(self) -> Stunnel:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def expect_auth_failure(
    args: list[str], log_path: Path, *, kind: str, server: str, expected: str, secret: str = ""
) -> LogLine:
    """Run ``metricsd run`` with ``args`` and check the one-clear-error contract: exit 1 within
    ``FAST_EXIT_S`` seconds, exactly one error-level log line, ``kafka_auth_failed`` of ``kind``
    naming ``server`` with ``expected`` in its error, no retry warnings, the same message on the
    exit line, and ``secret`` nowhere in the output. Returns the error line."""
    started = time.monotonic()
    with DaemonProcess(args, log_path) as daemon:
        assert daemon.proc is not None
        code = daemon.proc.wait(timeout=90)
        elapsed = time.monotonic() - started
    lines = daemon.logs()
    assert code == 1, daemon.tail()
    assert elapsed < FAST_EXIT_S, f"took {elapsed:.1f} s:\n{daemon.tail()}"
    errors = [line for line in lines if line.get("level") in ("error", "critical")]
    assert len(errors) == 1, daemon.tail()
    [error] = errors
    assert (error["event"], error["kind"], error["server"]) == ("kafka_auth_failed", kind, server)
    assert expected in error["error"], error
    assert not [line for line in lines if line.get("event") == "broker_unreachable"]
    exits = [line["text"] for line in lines if line.get("event") == "_unparsed"]
    assert exits == [f"metricsd: error: {error['error']}"], daemon.tail()
    if secret:
        assert secret.encode() not in log_path.read_bytes()
    return error
