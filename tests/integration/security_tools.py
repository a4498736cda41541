"""TLS/SASL helpers for the integration tests: the throwaway PKI (``pki.py``, made with the
``cryptography`` package), the TLS terminator in front of the broker (``tls_terminator.py``,
Python's ``ssl``; Tansu serves no TLS itself) and the one-clear-error check for refused logins.
No system program is needed.
"""

from __future__ import annotations

import time
from pathlib import Path

from daemon_process import DaemonProcess, LogLine
from pki import Pki, make_pki
from tls_terminator import TlsTerminator

__all__ = ["FAST_EXIT_S", "Pki", "TlsTerminator", "expect_auth_failure", "make_pki"]

#: The daemon process exits in about 0.5 s here (3 s on a loaded machine); a retry loop would take
#: 60 s (ensure_topics). The bound sits between the two so a slow machine cannot fail it while a
#: retrying daemon still does (and no ``broker_unreachable`` warning may appear either).
FAST_EXIT_S = 30.0


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
