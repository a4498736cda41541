"""TLS end to end: the daemon behind a TLS terminator (mutual TLS) in front of the real broker.

Tansu serves no TLS itself, so ``TlsTerminator`` (Python's ``ssl``, tls_terminator.py) terminates
it and the broker advertises the terminator's address: every client the daemon creates (admin,
producer, group consumer, changelog reader) must speak TLS with the client certificate, or it
gets nowhere. The events are
produced and the summaries read back by librdkafka over TLS (an independent TLS client). A wrong CA
or a missing client certificate must stop the daemon within seconds with one clear error line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from daemon_process import DaemonProcess, LogLine
from kafka_tools import produce_foreign, read_topic_foreign
from metricsd.devbroker import DevBroker, free_port
from security_tools import Pki, TlsTerminator, expect_auth_failure, make_pki

pytestmark = pytest.mark.integration

PARTITIONS = 2


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pki, TlsTerminator]]:
    """A throwaway PKI and a broker reachable only through the TLS terminator with mutual TLS."""
    directory = tmp_path_factory.mktemp("tls")
    pki = make_pki(directory / "pki")
    port = free_port()
    with (
        TlsTerminator(f"127.0.0.1:{port}", pki, directory, client_ca=pki.ca) as terminator,
        DevBroker(port, log_path=directory / "tansu.log", advertised=terminator.address),
    ):
        yield pki, terminator


def librdkafka_tls(pki: Pki) -> dict[str, object]:
    return {
        "security.protocol": "SSL",
        "ssl.ca.location": str(pki.ca),
        "ssl.certificate.location": str(pki.client_cert),
        "ssl.key.location": str(pki.client_key),
    }


def errors(lines: list[LogLine]) -> list[LogLine]:
    return [line for line in lines if line.get("level") in ("error", "critical")]


def test_daemon_summarises_events_produced_and_read_over_mutual_tls(
    tls: tuple[Pki, TlsTerminator], topic_name: str, tmp_path: Path
) -> None:
    """Events produced over TLS come back as summaries over TLS, with the oracle's mean."""
    pki, terminator = tls
    args = [
        "--bootstrap-servers", terminator.address,
        "--security-protocol", "SSL",
        "--ssl-cafile", str(pki.ca),
        "--ssl-certfile", str(pki.client_cert),
        "--ssl-keyfile", str(pki.client_key),
        "--input-topic", topic_name,
        "--output-topic", f"{topic_name}.out",
        "--group-id", f"{topic_name}-group",
        "--partitions", str(PARTITIONS),
        "--interval", "0.5",
        "--time-window", "0",
    ]  # fmt: skip
    rng = np.random.default_rng(3)
    seconds = {f"run-{r}": rng.lognormal(-2, 0.3, 40).round(6) for r in range(3)}
    records: list[tuple[bytes | None, bytes, int | None]] = [
        (run.encode(), orjson.dumps({"type": "batch_time", "run_id": run, "seconds": s}), None)
        for run, values in seconds.items()
        for s in values.tolist()
    ]

    def latest(out: list[Any]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for _, value, _, _ in out:
            rec = orjson.loads(value)
            if rec["type"] == "summary" and rec["stream"] == "batch_time":
                found[rec["run_id"]] = rec
        return found

    with DaemonProcess(args, tmp_path / "daemon.log") as daemon:
        daemon.wait_for_log(lambda line: line.get("event") == "started", timeout=30)
        produce_foreign(terminator.address, topic_name, records, config=librdkafka_tls(pki))
        out = read_topic_foreign(
            terminator.address,
            f"{topic_name}.out",
            range(PARTITIONS),
            until=lambda got: all(latest(got).get(run, {}).get("total") == 40 for run in seconds),
            timeout=30,
            config=librdkafka_tls(pki),
        )
        summaries = latest(out)
        assert set(summaries) == set(seconds), f"daemon log:\n{daemon.tail()}"
        for run, values in seconds.items():
            assert summaries[run]["count"] == 40
            assert summaries[run]["metrics"]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert daemon.terminate() == 0
        assert errors(daemon.logs()) == [], daemon.tail()


@pytest.mark.parametrize(
    ("case", "cafile", "with_client_cert", "expected"),
    [
        ("wrong_ca", "other_ca", True, "certificate verify failed"),
        ("no_client_certificate", "ca", False, "certificate required"),
    ],
)
def test_refused_tls_handshake_stops_the_daemon_fast_with_one_error(
    tls: tuple[Pki, TlsTerminator],
    tmp_path: Path,
    case: str,
    cafile: str,
    with_client_cert: bool,
    expected: str,
) -> None:
    """A wrong CA (refused by the client) or no client certificate (refused by the server) ends
    the daemon within seconds, exit 1, with exactly one error line naming the server."""
    pki, terminator = tls
    args = [
        "--bootstrap-servers", terminator.address,
        "--security-protocol", "SSL",
        "--ssl-cafile", str(getattr(pki, cafile)),
    ]  # fmt: skip
    if with_client_cert:
        args += ["--ssl-certfile", str(pki.client_cert), "--ssl-keyfile", str(pki.client_key)]
    error = expect_auth_failure(
        args, tmp_path / f"{case}.log", kind="tls", server=terminator.address, expected=expected
    )
    assert error["error"].startswith(f"TLS handshake with {terminator.address} failed")
